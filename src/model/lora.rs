//! LoRA adapters in PEFT's layout.
//!
//! An adapter adds `scale · B·A·x` to a projection, with `A: (rank, in)`, `B: (out, rank)` and
//! `scale = lora_alpha / rank` (`lora_alpha / sqrt(rank)` with `use_rslora`). Files use PEFT's
//! tensor names, for example `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`,
//! and PEFT's `adapter_config.json`, so adapters trained with PEFT load as they are.
//!
//! Stored adapters follow the Hugging Face layout of the q and k projections (rotary pairs
//! `(i, i + head_dim/2)`). llama.cpp stores llama and mistral q/k weights with adjacent pairs
//! instead, so the rows of `B` for q and k are permuted the same way when the base uses that
//! layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::{ModelConfig, RopeLayout};
use super::ModelError;

/// The seven projections of a llama decoder layer that an adapter may target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Projection {
    /// Every projection, in layer order.
    pub const ALL: [Projection; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// PEFT's module name (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// `(out, in)` of this projection's weight.
    pub fn shape(self, config: &ModelConfig) -> (usize, usize) {
        let hidden = config.hidden_size;
        let q_width = config.num_heads * config.head_dim;
        let kv_width = config.num_kv_heads * config.head_dim;
        match self {
            Self::Q => (q_width, hidden),
            Self::K | Self::V => (kv_width, hidden),
            Self::O => (hidden, q_width),
            Self::Gate | Self::Up => (config.intermediate_size, hidden),
            Self::Down => (hidden, config.intermediate_size),
        }
    }

    /// PEFT tensor name prefix for layer `layer`, up to `lora_A`/`lora_B`.
    pub fn peft_prefix(self, layer: usize) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}",
            self.parent(),
            self.module_name()
        )
    }
}

/// PEFT's `adapter_config.json`, the fields this runtime reads or writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// The rank.
    pub r: usize,
    /// The scaling numerator.
    pub lora_alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Module names the adapter targets.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Always `LORA`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// The base model the adapter was trained on, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The layers the adapter covers, or `None` for every layer. PEFT also writes one index as
    /// a plain number.
    #[serde(
        default,
        deserialize_with = "layer_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub layers_to_transform: Option<Vec<usize>>,
}

/// Reads PEFT's `layers_to_transform`: a list of indices, one index, or null.
fn layer_list<'de, D>(deserializer: D) -> Result<Option<Vec<usize>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Layers {
        One(usize),
        Many(Vec<usize>),
    }
    let layers = Option::<Layers>::deserialize(deserializer).map_err(|_| {
        serde::de::Error::custom(
            "`layers_to_transform` must be a layer index (a number from 0), a list of them, or null",
        )
    })?;
    Ok(layers.map(|layers| match layers {
        Layers::One(layer) => vec![layer],
        Layers::Many(list) => list,
    }))
}

fn default_peft_type() -> String {
    "LORA".to_string()
}

impl AdapterConfig {
    /// Returns the factor applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Reports whether the adapter may have weights in `layer`.
    pub fn covers(&self, layer: usize) -> bool {
        self.layers_to_transform
            .as_ref()
            .is_none_or(|layers| layers.contains(&layer))
    }
}

/// The low-rank pair for one projection: `A: (rank, in)`, `B: (out, rank)`, in the base's rotary
/// layout.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// Down projection `(rank, in)`.
    pub a: Tensor,
    /// Up projection `(out, rank)`.
    pub b: Tensor,
    /// Host copies for the CPU serving kernel; `None` for trainable pairs.
    pub host: Option<Arc<HostPair>>,
}

/// A frozen pair in host memory, laid out for [`HostPair::add_delta`].
#[derive(Debug)]
pub struct HostPair {
    rank: usize,
    in_features: usize,
    out_features: usize,
    /// `A`, `(rank, in)` row-major.
    a: Vec<f32>,
    /// `Bᵀ`, `(rank, out)` row-major, so each rank's column of `B` is contiguous.
    b_t: Vec<f32>,
}

impl HostPair {
    fn new(a: &Tensor, b: &Tensor) -> Result<Self, ModelError> {
        let (rank, in_features) = a.dims2()?;
        let (out_features, _) = b.dims2()?;
        Ok(Self {
            rank,
            in_features,
            out_features,
            a: a.flatten_all()?.to_vec1()?,
            b_t: b.t()?.contiguous()?.flatten_all()?.to_vec1()?,
        })
    }

    /// Adds `scale · B·A·x` to `out` for one token: `x` is `(in,)`, `out` is `(out,)`.
    ///
    /// The arithmetic runs in a fixed order per token, so a token's delta is the same whatever
    /// other tokens are in the batch. On CPUs with AVX2 the same code runs on wider vectors,
    /// lane by lane, so the result is the same there too.
    pub fn add_delta(&self, x: &[f32], scale: f32, out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.in_features);
        debug_assert_eq!(out.len(), self.out_features);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.add_delta_avx2(x, scale, out) };
        }
        self.add_delta_generic(x, scale, out);
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_delta_avx2(&self, x: &[f32], scale: f32, out: &mut [f32]) {
        self.add_delta_generic(x, scale, out);
    }

    #[inline(always)]
    fn add_delta_generic(&self, x: &[f32], scale: f32, out: &mut [f32]) {
        for k in 0..self.rank {
            let row = &self.a[k * self.in_features..(k + 1) * self.in_features];
            let coefficient = scale * super::attention::dot(row, x);
            let column = &self.b_t[k * self.out_features..(k + 1) * self.out_features];
            for (o, &b) in out.iter_mut().zip(column) {
                *o += coefficient * b;
            }
        }
    }
}

/// A LoRA adapter bound to one model configuration.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `layers[l][projection]`.
    layers: Vec<[Option<LoraPair>; 7]>,
    scale: f64,
    config: AdapterConfig,
}

impl LoraAdapter {
    /// Returns the factor applied to `B·A·x`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Returns the PEFT configuration.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Returns the adapter's size in bytes: its tensors plus their host copies, if any.
    pub fn size_bytes(&self) -> usize {
        let bytes = |pair: &LoraPair| {
            let tensors =
                (pair.a.elem_count() + pair.b.elem_count()) * pair.a.dtype().size_in_bytes();
            let host = pair.host.as_ref().map_or(0, |h| {
                (h.a.len() + h.b_t.len()) * std::mem::size_of::<f32>()
            });
            tensors + host
        };
        self.layers.iter().flatten().flatten().map(bytes).sum()
    }

    /// Returns the lowest layer the adapter changes, or the layer count if it changes none.
    /// Below it, a row under this adapter computes exactly what a row of the base computes.
    pub fn first_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|slots| slots.iter().any(Option::is_some))
            .unwrap_or(self.layers.len())
    }

    /// Returns the pair for `projection` in `layer`, if the adapter targets it.
    pub fn pair(&self, layer: usize, projection: Projection) -> Option<&LoraPair> {
        self.layers.get(layer)?[projection.index()].as_ref()
    }

    /// Loads `adapter.safetensors`-style weights and `adapter_config.json`, checks every shape
    /// against `model`, and converts q/k rows to the base's rotary layout.
    pub fn load(
        weights: &Path,
        adapter_config: &Path,
        model: &ModelConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config_text =
            std::fs::read_to_string(adapter_config).map_err(|source| ModelError::Io {
                path: adapter_config.to_path_buf(),
                source,
            })?;
        let config: AdapterConfig =
            serde_json::from_str(&config_text).map_err(|err| ModelError::InvalidAdapter {
                file: adapter_config.to_path_buf(),
                message: err.to_string(),
            })?;
        if config.r == 0 {
            return Err(invalid(adapter_config, "`r` must be positive".into()));
        }
        let tensors = candle_core::safetensors::load(weights, device).map_err(|err| {
            if weights.exists() {
                ModelError::InvalidAdapter {
                    file: weights.to_path_buf(),
                    message: super::candle_message(&err),
                }
            } else {
                ModelError::Io {
                    path: weights.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                }
            }
        })?;
        Self::from_tensors(tensors, config, model, weights)
    }

    /// Builds an adapter from PEFT-named tensors in the Hugging Face rotary layout.
    pub fn from_tensors(
        mut tensors: HashMap<String, Tensor>,
        config: AdapterConfig,
        model: &ModelConfig,
        file: &Path,
    ) -> Result<Self, ModelError> {
        if let Some(&layer) = config
            .layers_to_transform
            .iter()
            .flatten()
            .find(|&&layer| layer >= model.num_layers)
        {
            return Err(invalid(
                file,
                format!(
                    "`layers_to_transform` names layer {layer}, but the model has {} layers",
                    model.num_layers
                ),
            ));
        }
        let mut layers = Vec::with_capacity(model.num_layers);
        let mut used = 0usize;
        for layer in 0..model.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for projection in Projection::ALL {
                let prefix = projection.peft_prefix(layer);
                let a = take_tensor(&mut tensors, &prefix, "lora_A");
                let b = take_tensor(&mut tensors, &prefix, "lora_B");
                let (a, b) = match (a, b) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => {
                        return Err(invalid(
                            file,
                            format!("`{prefix}` has only one of lora_A and lora_B"),
                        ))
                    }
                };
                if !config.covers(layer) {
                    return Err(invalid(
                        file,
                        format!(
                            "`{prefix}` is in layer {layer}, which `layers_to_transform` leaves out"
                        ),
                    ));
                }
                let (out_features, in_features) = projection.shape(model);
                check_dims(
                    file,
                    &format!("{prefix}.lora_A.weight"),
                    &a,
                    &[config.r, in_features],
                )?;
                check_dims(
                    file,
                    &format!("{prefix}.lora_B.weight"),
                    &b,
                    &[out_features, config.r],
                )?;
                let a = a.to_dtype(DType::F32)?;
                let mut b = b.to_dtype(DType::F32)?;
                if model.rope_layout == RopeLayout::Interleaved {
                    b = match projection {
                        Projection::Q => halves_to_interleaved(&b, model.num_heads)?,
                        Projection::K => halves_to_interleaved(&b, model.num_kv_heads)?,
                        _ => b,
                    };
                }
                let host = Some(Arc::new(HostPair::new(&a, &b)?));
                slots[projection.index()] = Some(LoraPair { a, b, host });
                used += 1;
            }
            layers.push(slots);
        }
        if let Some(name) = tensors.keys().find(|k| k.contains("lora_")) {
            return Err(invalid(
                file,
                format!(
                    "tensor `{name}` does not match any of the model's {} layers and 7 projections",
                    model.num_layers
                ),
            ));
        }
        if used == 0 {
            return Err(invalid(file, "the file contains no LoRA tensors".into()));
        }
        let scale = config.scale();
        Ok(Self {
            layers,
            scale,
            config,
        })
    }

    /// Creates trainable pairs for the given projections of every layer that `config` covers
    /// (see [`AdapterConfig::covers`]): `A` drawn from `rng`,
    /// uniform in `±1/√in` as PEFT's Kaiming-style range, and `B = 0`, so the adapter starts as a
    /// no-op. Returns the adapter and its variables, alternating A and B for every layer and
    /// target. The same RNG state always gives the same adapter.
    pub fn init_trainable(
        model: &ModelConfig,
        config: AdapterConfig,
        targets: &[Projection],
        rng: &mut impl rand::Rng,
        device: &Device,
    ) -> Result<(Self, Vec<Var>), ModelError> {
        let mut vars = Vec::new();
        let mut layers = Vec::with_capacity(model.num_layers);
        for layer in 0..model.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            if !config.covers(layer) {
                layers.push(slots);
                continue;
            }
            for &projection in targets {
                let (out_features, in_features) = projection.shape(model);
                let bound = 1.0 / (in_features as f32).sqrt();
                let values: Vec<f32> = (0..config.r * in_features)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                let a =
                    Var::from_tensor(&Tensor::from_vec(values, (config.r, in_features), device)?)?;
                let b = Var::zeros((out_features, config.r), DType::F32, device)?;
                slots[projection.index()] = Some(LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    host: None,
                });
                vars.push(a);
                vars.push(b);
            }
            layers.push(slots);
        }
        let scale = config.scale();
        Ok((
            Self {
                layers,
                scale,
                config,
            },
            vars,
        ))
    }

    /// Returns the adapter's tensors under PEFT names, in the Hugging Face rotary layout, ready for
    /// `safetensors` serialisation.
    pub fn to_peft_tensors(
        &self,
        model: &ModelConfig,
    ) -> Result<HashMap<String, Tensor>, ModelError> {
        let mut out = HashMap::new();
        for (layer, slots) in self.layers.iter().enumerate() {
            for projection in Projection::ALL {
                let Some(pair) = &slots[projection.index()] else {
                    continue;
                };
                let mut b = pair.b.detach();
                if model.rope_layout == RopeLayout::Interleaved {
                    b = match projection {
                        Projection::Q => interleaved_to_halves(&b, model.num_heads)?,
                        Projection::K => interleaved_to_halves(&b, model.num_kv_heads)?,
                        _ => b,
                    };
                }
                let prefix = projection.peft_prefix(layer);
                out.insert(format!("{prefix}.lora_A.weight"), pair.a.detach());
                out.insert(format!("{prefix}.lora_B.weight"), b);
            }
        }
        Ok(out)
    }
}

fn invalid(file: &Path, message: String) -> ModelError {
    ModelError::InvalidAdapter {
        file: PathBuf::from(file),
        message,
    }
}

fn take_tensor(tensors: &mut HashMap<String, Tensor>, prefix: &str, which: &str) -> Option<Tensor> {
    tensors
        .remove(&format!("{prefix}.{which}.weight"))
        .or_else(|| tensors.remove(&format!("{prefix}.{which}.default.weight")))
}

fn check_dims(file: &Path, name: &str, t: &Tensor, expected: &[usize]) -> Result<(), ModelError> {
    if t.dims() != expected {
        return Err(invalid(
            file,
            format!(
                "tensor `{name}` has shape {:?}, the model needs {:?}",
                t.dims(),
                expected
            ),
        ));
    }
    Ok(())
}

/// Permutes the rows of a `(heads·head_dim, cols)` matrix from rotary pairs `(i, i + d/2)` to
/// adjacent pairs `(2i, 2i+1)`, the permutation llama.cpp applies to llama q/k weights.
pub fn halves_to_interleaved(w: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / heads;
    // (heads, 2, head_dim/2, cols) -> (heads, head_dim/2, 2, cols)
    Ok(w.reshape((heads, 2, head_dim / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Inverse of [`halves_to_interleaved`].
pub fn interleaved_to_halves(w: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / heads;
    // (heads, head_dim/2, 2, cols) -> (heads, 2, head_dim/2, cols)
    Ok(w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}
