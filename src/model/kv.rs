//! Per-row KV cache storage.
//!
//! Each layer keeps one key and one value buffer of shape `(n_kv_heads, capacity, head_dim)`.
//! New positions are written in place and the buffers grow geometrically. Appending a token
//! therefore copies only that token's keys and values, and growth copies the filled part once
//! per doubling.

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::ModelError;

/// Smallest number of positions allocated at a time.
const MIN_CAPACITY: usize = 64;

#[derive(Debug)]
struct LayerKv {
    /// `(n_kv_heads, capacity, head_dim)`
    k: Tensor,
    /// `(n_kv_heads, capacity, head_dim)`
    v: Tensor,
}

/// The keys and values of one row (one sequence under one model variant), over all layers.
///
/// Writes go into the buffers in place, so the type is not `Clone`: use [`KvCache::fork`].
#[derive(Debug, Default)]
pub struct KvCache {
    /// Tensor storage, used by candle's attention (training, and non-CPU devices).
    layers: Vec<LayerKv>,
    /// Host storage, used by the CPU serving attention: per layer, keys and values laid out
    /// `(positions, n_kv_heads, head_dim)`, so appending a position is a plain extend.
    host: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Creates an empty cache. Buffers are allocated on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Reports whether no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes currently allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        let tensors: usize = self
            .layers
            .iter()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum();
        let host: usize = self
            .host
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * std::mem::size_of::<f32>())
            .sum();
        tensors + host
    }

    /// Drops every position and frees the buffers.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.host.clear();
        self.len = 0;
        self.capacity = 0;
    }

    /// Returns a deep copy whose writes do not affect `self`, for sequences that share a prefix.
    pub fn fork(&self) -> Result<Self, ModelError> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                Ok(LayerKv {
                    k: layer.k.copy()?,
                    v: layer.v.copy()?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            layers,
            host: self.host.clone(),
            len: self.len,
            capacity: self.capacity,
        })
    }

    /// Forgets positions from `len` on, keeping the buffers.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for (k, v) in &mut self.host {
                let width = k.len() / self.len.max(1);
                k.truncate(len * width);
                v.truncate(len * width);
            }
        }
        self.len = self.len.min(len);
    }

    /// Keys and values of `layer` in host storage, created on first use.
    pub(crate) fn host_layer_mut(
        &mut self,
        layer: usize,
        num_layers: usize,
    ) -> Result<&mut (Vec<f32>, Vec<f32>), ModelError> {
        if !self.layers.is_empty() {
            return Err(ModelError::InvalidConfig {
                file: std::path::PathBuf::new(),
                message: "a KV cache filled by tensor attention was passed to host attention"
                    .into(),
            });
        }
        if self.host.len() < num_layers {
            self.host.resize_with(num_layers, Default::default);
        }
        Ok(&mut self.host[layer])
    }

    /// Keys and values of `layer` in host storage.
    pub(crate) fn host_layer(&self, layer: usize) -> (&[f32], &[f32]) {
        match self.host.get(layer) {
            Some((k, v)) => (k, v),
            None => (&[], &[]),
        }
    }

    /// Makes room for `total` positions.
    pub(crate) fn reserve(
        &mut self,
        total: usize,
        config: &ModelConfig,
        device: &Device,
    ) -> Result<(), ModelError> {
        if total <= self.capacity && !self.layers.is_empty() {
            return Ok(());
        }
        let capacity = total
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(config.max_position_embeddings.max(total));
        let shape = (config.num_kv_heads, capacity, config.head_dim);
        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let k = Tensor::zeros(shape, DType::F32, device)?;
            let v = Tensor::zeros(shape, DType::F32, device)?;
            if let Some(old) = self.layers.get(layer) {
                if self.len > 0 {
                    k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            layers.push(LayerKv { k, v });
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `(n_kv_heads, seq, head_dim)` keys and values at position `start` of `layer`.
    pub(crate) fn write(
        &self,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), ModelError> {
        let slot = &self.layers[layer];
        slot.k.slice_set(k, 1, start)?;
        slot.v.slice_set(v, 1, start)?;
        Ok(())
    }

    /// The first `len` positions of `layer`: two `(n_kv_heads, len, head_dim)` views.
    pub(crate) fn view(&self, layer: usize, len: usize) -> Result<(Tensor, Tensor), ModelError> {
        let slot = &self.layers[layer];
        Ok((slot.k.narrow(1, 0, len)?, slot.v.narrow(1, 0, len)?))
    }

    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
