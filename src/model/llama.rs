//! The llama-family decoder (llama, mistral, qwen2) and its batched ragged forward.
//!
//! One [`Llama::forward`] call takes any number of rows. Their new tokens are concatenated into
//! one `(tokens, hidden)` matrix, so every linear layer runs once per step over all rows, and
//! attention runs per row against that row's own [`KvCache`]. LoRA deltas are added per row on
//! top of the shared base projection, so doctor rows read the base weights together with the
//! patient rows.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops;
use rayon::prelude::*;

use super::attention::{self, AttentionShape, AttentionSpan};
use super::config::{ModelConfig, RopeLayout};
use super::kv::KvCache;
use super::lora::{HostPair, LoraAdapter, LoraPair, Projection};
use super::weights::{Embedding, Linear, LoadOptions, WeightFormat, WeightSource};
use super::ModelError;

/// The implementation of RMSNorm, RoPE and attention that the forward uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// candle's fused kernels; they have no backward pass.
    Fused,
    /// Compositions of basic ops that candle can differentiate (training).
    Differentiable,
}

/// The positions of a row that get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsSelection {
    /// Only the last new token (generation).
    Last,
    /// Every new token (scoring and training).
    All,
}

/// One row of a batched step: a sequence under one model variant.
pub struct Row<'a> {
    /// New token ids: a prefill chunk of any length, or one decode token.
    pub tokens: &'a [u32],
    /// The row's cache; its length is the position of `tokens[0]`.
    pub cache: &'a mut KvCache,
    /// The adapter applied on top of the base weights, if any.
    pub adapter: Option<&'a LoraAdapter>,
    /// The positions that get logits.
    pub logits: LogitsSelection,
    /// Another row of the same step whose hidden states this row takes over below its
    /// adapter's first layer, so those layers run once for both rows. The other row must have
    /// the same tokens and cache length, no `fork_from` of its own, and no adapter below that
    /// layer. Both rows then run the same weights on the same tokens up to there, so the result
    /// is the same as without the fork, and this row's cache keeps only the layers it runs.
    pub fork_from: Option<usize>,
}

impl Row<'_> {
    /// Returns the layer at which this row joins a step of a model with `num_layers` layers:
    /// 0, or for a row with `fork_from` its adapter's first layer (`num_layers` without one).
    pub fn entry_layer(&self, num_layers: usize) -> usize {
        match (self.fork_from, self.adapter) {
            (None, _) => 0,
            (Some(_), Some(adapter)) => adapter.first_layer().min(num_layers),
            (Some(_), None) => num_layers,
        }
    }
}

struct DecoderLayer {
    attn_norm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    ffn_norm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn linear(&self, projection: Projection) -> &Linear {
        match projection {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::O => &self.o_proj,
            Projection::Gate => &self.gate_proj,
            Projection::Up => &self.up_proj,
            Projection::Down => &self.down_proj,
        }
    }
}

/// A llama-family causal LM. It contains weights only, because per-sequence state lives in
/// [`KvCache`]s.
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    /// `(head_dim/2,)` rotary inverse frequencies.
    inv_freq: Tensor,
    kernels: Kernels,
    device: Device,
}

/// The position of one row's tokens in the batch.
#[derive(Clone, Copy)]
struct RowSpan {
    offset: usize,
    len: usize,
    past: usize,
}

/// The rows that run a range of layers, and their layout in the hidden-state matrix.
struct Segment<'a> {
    /// Indices into the step's rows, in row order.
    members: Vec<usize>,
    /// One span per member, with offsets into this segment's matrix.
    spans: Vec<RowSpan>,
    cos: Tensor,
    sin: Tensor,
    groups: LoraPlan<'a>,
}

/// Tensor names of one checkpoint flavour.
struct Names {
    gguf: bool,
}

impl Names {
    fn embed(&self) -> String {
        if self.gguf {
            "token_embd.weight"
        } else {
            "model.embed_tokens.weight"
        }
        .into()
    }
    fn norm(&self) -> String {
        if self.gguf {
            "output_norm.weight"
        } else {
            "model.norm.weight"
        }
        .into()
    }
    fn lm_head(&self) -> String {
        if self.gguf {
            "output.weight"
        } else {
            "lm_head.weight"
        }
        .into()
    }
    fn layer_norm(&self, layer: usize, attn: bool) -> String {
        match (self.gguf, attn) {
            (true, true) => format!("blk.{layer}.attn_norm.weight"),
            (true, false) => format!("blk.{layer}.ffn_norm.weight"),
            (false, true) => format!("model.layers.{layer}.input_layernorm.weight"),
            (false, false) => format!("model.layers.{layer}.post_attention_layernorm.weight"),
        }
    }
    /// Weight name and bias name of a projection.
    fn projection(&self, layer: usize, projection: Projection) -> (String, String) {
        if self.gguf {
            let short = match projection {
                Projection::Q => "attn_q",
                Projection::K => "attn_k",
                Projection::V => "attn_v",
                Projection::O => "attn_output",
                Projection::Gate => "ffn_gate",
                Projection::Up => "ffn_up",
                Projection::Down => "ffn_down",
            };
            (
                format!("blk.{layer}.{short}.weight"),
                format!("blk.{layer}.{short}.bias"),
            )
        } else {
            let parent = match projection {
                Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
                _ => "mlp",
            };
            let base = format!("model.layers.{layer}.{parent}.{}", projection.module_name());
            (format!("{base}.weight"), format!("{base}.bias"))
        }
    }
}

impl Llama {
    /// Loads a model from a `.gguf` file or from a Hugging Face folder with `config.json` and
    /// `*.safetensors`.
    pub fn load(path: &Path, options: &LoadOptions, device: &Device) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        if path.is_dir() {
            let config = ModelConfig::from_hf_config(&path.join("config.json"))?;
            let source = WeightSource::open_safetensors_dir(path)?;
            Self::from_source(config, &source, options, device)
        } else {
            let source = WeightSource::open_gguf(path)?;
            let WeightSource::Gguf { content, .. } = &source else {
                unreachable!("open_gguf returns the Gguf variant")
            };
            let config = ModelConfig::from_gguf(content, path)?;
            Self::from_source(config, &source, options, device)
        }
    }

    /// Builds the model from an opened checkpoint and its resolved configuration.
    pub fn from_source(
        config: ModelConfig,
        source: &WeightSource,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let names = Names {
            gguf: matches!(source, WeightSource::Gguf { .. }),
        };
        let format = options.format;
        let hidden = config.hidden_size;
        let (embed_tokens, embed_q) =
            source.embedding(&names.embed(), (config.vocab_size, hidden), format, device)?;

        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let load = |projection: Projection| -> Result<Linear, ModelError> {
                let (weight, bias) = names.projection(layer, projection);
                let with_bias = config.architecture.has_qkv_bias()
                    && matches!(projection, Projection::Q | Projection::K | Projection::V);
                let bias = with_bias.then_some(bias.as_str());
                source.linear(&weight, bias, projection.shape(&config), format, device)
            };
            layers.push(DecoderLayer {
                attn_norm: source.dense(&names.layer_norm(layer, true), &[hidden], device)?,
                q_proj: load(Projection::Q)?,
                k_proj: load(Projection::K)?,
                v_proj: load(Projection::V)?,
                o_proj: load(Projection::O)?,
                ffn_norm: source.dense(&names.layer_norm(layer, false), &[hidden], device)?,
                gate_proj: load(Projection::Gate)?,
                up_proj: load(Projection::Up)?,
                down_proj: load(Projection::Down)?,
            });
        }

        let norm = source.dense(&names.norm(), &[hidden], device)?;
        let head_shape = (config.vocab_size, hidden);
        let lm_head = if source.contains(&names.lm_head()) {
            source.linear(&names.lm_head(), None, head_shape, format, device)?
        } else {
            match (&embed_q, &embed_tokens) {
                (Some(q), _) => Linear::quantized(q.clone(), None)?,
                (None, Embedding::Dense(w)) => Linear::dense(w.clone(), None)?,
                (None, Embedding::Quantized(_)) => {
                    source.linear(&names.embed(), None, head_shape, format, device)?
                }
            }
        };

        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (half,), device)?;
        let kernels = match format {
            WeightFormat::Dense => Kernels::Differentiable,
            WeightFormat::Quantized(_) => Kernels::Fused,
        };
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            kernels,
            device: device.clone(),
        })
    }

    /// Returns the resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Returns the device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Selects the kernel implementations; [`Kernels::Differentiable`] is needed for training.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Returns the dense f32 weight of a projection, `(out, in)`, for tests and merges.
    pub fn projection_weight(
        &self,
        layer: usize,
        projection: Projection,
    ) -> Result<Tensor, ModelError> {
        self.layers[layer].linear(projection).dense_weight()
    }

    /// Runs one step over `rows` and returns, per row, `(selected_positions, vocab)` f32 logits:
    /// one position for [`LogitsSelection::Last`], every new token for
    /// [`LogitsSelection::All`]. Each row's cache grows by its number of new tokens.
    pub fn forward(&self, rows: &mut [Row<'_>]) -> Result<Vec<Tensor>, ModelError> {
        let hidden = self.forward_hidden(rows)?;
        self.lm_head_rows(&hidden)
    }

    /// Projects several rows' hidden states to logits, `(positions, hidden)` to
    /// `(positions, vocab)` each, in one call, so the output matrix, the largest weight, is
    /// read once rather than once per row.
    pub fn lm_head_rows(&self, hidden: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        if hidden.len() < 2 {
            return hidden.iter().map(|h| self.lm_head.forward(h)).collect();
        }
        let logits = self.lm_head.forward(&Tensor::cat(hidden, 0)?)?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(hidden.len());
        for h in hidden {
            let len = h.dim(0)?;
            out.push(logits.narrow(0, offset, len)?);
            offset += len;
        }
        Ok(out)
    }

    /// Like [`Llama::forward`] but returns the final normalised hidden states,
    /// `(selected_positions, hidden)` per row.
    pub fn forward_hidden(&self, rows: &mut [Row<'_>]) -> Result<Vec<Tensor>, ModelError> {
        let spans = self.plan_rows(rows)?;
        let entries = self.entry_layers(rows, &spans)?;
        if !self.uses_host_attention() {
            for (row, span) in rows.iter_mut().zip(&spans) {
                row.cache
                    .reserve(span.past + span.len, &self.config, &self.device)?;
            }
        }

        let first: Vec<usize> = (0..rows.len()).filter(|&r| entries[r] == 0).collect();
        let ids: Vec<u32> = first
            .iter()
            .flat_map(|&r| rows[r].tokens.iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (spans_tokens(&spans, &first),), &self.device)?;
        let mut x = self.embed_tokens.forward(&ids)?; // (tokens, hidden)
        let mut segment = self.segment(rows, &spans, first)?;
        for index in 0..=self.layers.len() {
            if index > 0 && entries.contains(&index) {
                let members: Vec<usize> =
                    (0..rows.len()).filter(|&r| entries[r] <= index).collect();
                x = fork_rows(&x, &segment, &members, &spans, rows)?;
                segment = self.segment(rows, &spans, members)?;
            }
            let Some(layer) = self.layers.get(index) else {
                break;
            };
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let attn = self.attention(index, layer, &h, rows, &segment)?;
            x = (x + attn)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let groups = &segment.groups;
            let [gate, up] =
                project_many(layer, index, [Projection::Gate, Projection::Up], &h, groups)?;
            let mlp = project(
                layer,
                index,
                Projection::Down,
                &(ops::silu(&gate)? * up)?,
                groups,
            )?;
            x = (x + mlp)?;
        }
        for (row, span) in rows.iter_mut().zip(&spans) {
            row.cache.advance(span.len);
        }

        // Every row has joined by now, so the segment's spans are in row order.
        let mut outputs = Vec::with_capacity(rows.len());
        for (row, span) in rows.iter().zip(&segment.spans) {
            let selected = match row.logits {
                LogitsSelection::Last => x.narrow(0, span.offset + span.len - 1, 1)?,
                LogitsSelection::All => x.narrow(0, span.offset, span.len)?,
            };
            outputs.push(self.rms_norm(&selected, &self.norm)?);
        }
        Ok(outputs)
    }

    /// Returns each row's [`Row::entry_layer`] after checking that each fork is exact.
    fn entry_layers(&self, rows: &[Row<'_>], spans: &[RowSpan]) -> Result<Vec<usize>, ModelError> {
        let layers = self.layers.len();
        let mut entries = Vec::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            let entry = row.entry_layer(layers);
            let Some(source) = row.fork_from else {
                entries.push(entry);
                continue;
            };
            let fail = |message: String| ModelError::InvalidFork {
                row: index,
                from: source,
                message,
            };
            let Some(other) = rows.get(source) else {
                return Err(fail(format!("the step has only {} rows", rows.len())));
            };
            if source == index || other.fork_from.is_some() {
                return Err(fail("the source row must start at layer 0".into()));
            }
            if other.tokens != row.tokens || spans[source].past != spans[index].past {
                return Err(fail("the rows have different tokens or positions".into()));
            }
            let other_first = other
                .adapter
                .map_or(layers, |a| a.first_layer().min(layers));
            if other_first < entry {
                return Err(fail(format!(
                    "the source row's adapter changes layers below {entry}"
                )));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Lays out `members` (row indices, in order) one after another.
    fn segment<'a>(
        &self,
        rows: &[Row<'a>],
        spans: &[RowSpan],
        members: Vec<usize>,
    ) -> Result<Segment<'a>, ModelError> {
        let mut offset = 0;
        let mut local = Vec::with_capacity(members.len());
        let mut positions = Vec::new();
        for &r in &members {
            let span = spans[r];
            local.push(RowSpan { offset, ..span });
            positions.extend((span.past..span.past + span.len).map(|p| p as f32));
            offset += span.len;
        }
        let (cos, sin) = self.rotary(positions)?;
        let adapters: Vec<_> = members.iter().map(|&r| rows[r].adapter).collect();
        let groups = LoraPlan::new(&adapters, &local, self.kernels);
        Ok(Segment {
            members,
            spans: local,
            cos,
            sin,
            groups,
        })
    }

    /// Projects hidden states to logits: `(positions, hidden) -> (positions, vocab)`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        self.lm_head.forward(hidden)
    }

    fn plan_rows(&self, rows: &[Row<'_>]) -> Result<Vec<RowSpan>, ModelError> {
        let mut spans = Vec::with_capacity(rows.len());
        let mut offset = 0;
        for (index, row) in rows.iter().enumerate() {
            if row.tokens.is_empty() {
                return Err(ModelError::EmptyRow { row: index });
            }
            if let Some(&id) = row
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab_size: self.config.vocab_size,
                });
            }
            let past = row.cache.len();
            let requested = past + row.tokens.len();
            if requested > self.config.max_position_embeddings {
                return Err(ModelError::ContextOverflow {
                    requested,
                    limit: self.config.max_position_embeddings,
                });
            }
            spans.push(RowSpan {
                offset,
                len: row.tokens.len(),
                past,
            });
            offset += row.tokens.len();
        }
        Ok(spans)
    }

    /// `(tokens,)` positions -> `(tokens, head_dim/2)` cosines and sines.
    fn rotary(&self, positions: Vec<f32>) -> Result<(Tensor, Tensor), ModelError> {
        let n = positions.len();
        let positions = Tensor::from_vec(positions, (n, 1), &self.device)?;
        let freqs = positions.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?; // (tokens, head_dim/2)
        Ok((freqs.cos()?, freqs.sin()?))
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor, ModelError> {
        let eps = self.config.rms_norm_eps as f32;
        Ok(match self.kernels {
            Kernels::Fused => ops::rms_norm(&x.contiguous()?, weight, eps)?,
            Kernels::Differentiable => ops::rms_norm_slow(x, weight, eps)?,
        })
    }

    /// Applies RoPE to `(1, heads, tokens, head_dim)` with `(tokens, head_dim/2)` tables.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, ModelError> {
        use candle_nn::rotary_emb;
        Ok(match (self.config.rope_layout, self.kernels) {
            (RopeLayout::Interleaved, Kernels::Fused) => rotary_emb::rope_i(x, cos, sin)?,
            (RopeLayout::Interleaved, Kernels::Differentiable) => {
                rotary_emb::rope_i_slow(x, cos, sin)?
            }
            (RopeLayout::Halves, Kernels::Fused) => rotary_emb::rope(x, cos, sin)?,
            (RopeLayout::Halves, Kernels::Differentiable) => rotary_emb::rope_slow(x, cos, sin)?,
        })
    }

    /// Serving on the CPU uses host caches and [`super::attention`]; training and other
    /// devices use candle's ops.
    fn uses_host_attention(&self) -> bool {
        self.kernels == Kernels::Fused && self.device.is_cpu()
    }

    /// Attention through [`super::attention`] over host caches: `q` `(n_heads, tokens,
    /// head_dim)`, `k` and `v` `(n_kv, tokens, head_dim)` -> `(tokens, n_heads*head_dim)`.
    fn host_attention(
        &self,
        index: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        rows: &mut [Row<'_>],
        segment: &Segment<'_>,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        let (_, tokens, _) = q.dims3()?;
        let shape = AttentionShape {
            tokens,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let q_host: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let k_host: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v_host: Vec<f32> = v.flatten_all()?.to_vec1()?;
        let attention_spans: Vec<AttentionSpan> = segment
            .spans
            .iter()
            .map(|s| AttentionSpan {
                offset: s.offset,
                len: s.len,
                past: s.past,
            })
            .collect();
        for (&r, span) in segment.members.iter().zip(&attention_spans) {
            let (keys, values) = rows[r].cache.host_layer_mut(index, cfg.num_layers)?;
            attention::append(keys, &k_host, span, shape);
            attention::append(values, &v_host, span, shape);
        }
        let caches: Vec<(&[f32], &[f32])> = segment
            .members
            .iter()
            .map(|&r| rows[r].cache.host_layer(index))
            .collect();
        let out = attention::attend(&q_host, &caches, &attention_spans, shape);
        Ok(Tensor::from_vec(
            out,
            (tokens, cfg.num_heads * cfg.head_dim),
            &self.device,
        )?)
    }

    /// Self-attention over the batch: `(tokens, hidden) -> (tokens, hidden)`.
    fn attention(
        &self,
        index: usize,
        layer: &DecoderLayer,
        h: &Tensor,
        rows: &mut [Row<'_>],
        segment: &Segment<'_>,
    ) -> Result<Tensor, ModelError> {
        let (cos, sin, groups) = (&segment.cos, &segment.sin, &segment.groups);
        let cfg = &self.config;
        let (total, _) = h.dims2()?;
        let (n_heads, n_kv, head_dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads_first = |t: Tensor, heads: usize| -> Result<Tensor, ModelError> {
            // (tokens, heads*head_dim) -> (1, heads, tokens, head_dim)
            Ok(t.reshape((total, heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let [q, k, v] = project_many(
            layer,
            index,
            [Projection::Q, Projection::K, Projection::V],
            h,
            groups,
        )?;
        let q = heads_first(q, n_heads)?;
        let k = heads_first(k, n_kv)?;
        let v = heads_first(v, n_kv)?;
        let q = self.rope(&q, cos, sin)?.squeeze(0)?; // (n_heads, tokens, head_dim)
        let k = self.rope(&k, cos, sin)?.squeeze(0)?; // (n_kv, tokens, head_dim)
        let v = v.squeeze(0)?; // (n_kv, tokens, head_dim)
        if self.uses_host_attention() {
            let out = self.host_attention(index, (&q, &k, &v), rows, segment)?;
            return project(layer, index, Projection::O, &out, groups);
        }

        let scale = 1.0 / (head_dim as f64).sqrt();
        let group = cfg.group_size();
        let mut outputs = Vec::with_capacity(segment.members.len());
        for (&r, span) in segment.members.iter().zip(&segment.spans) {
            let row = &rows[r];
            let t = span.len;
            let k_new = k.narrow(1, span.offset, t)?.contiguous()?; // (n_kv, t, head_dim)
            let v_new = v.narrow(1, span.offset, t)?.contiguous()?;
            row.cache.write(index, span.past, &k_new, &v_new)?;
            let (k_all, v_all) = if span.past == 0 {
                (k_new, v_new)
            } else {
                row.cache.view(index, span.past + t)? // (n_kv, kv_len, head_dim)
            };
            let kv_len = span.past + t;
            // Query heads h = kv_head * group + g share kv_head, so (n_heads, t, d) regroups as
            // (n_kv, group * t, d) without repeating keys.
            let q_row =
                q.narrow(1, span.offset, t)?
                    .contiguous()?
                    .reshape((n_kv, group * t, head_dim))?;
            let scores = (q_row.matmul(&k_all.t()?)? * scale)?; // (n_kv, group*t, kv_len)
            let scores = if t > 1 {
                let mask = causal_mask(t, span.past, &self.device)?; // (t, kv_len)
                scores
                    .reshape((n_kv, group, t, kv_len))?
                    .broadcast_add(&mask)?
                    .reshape((n_kv, group * t, kv_len))?
            } else {
                scores
            };
            // candle's fused softmax has no backward pass, so training uses the composed one.
            let probs = match self.kernels {
                Kernels::Fused => ops::softmax_last_dim(&scores)?,
                Kernels::Differentiable => ops::softmax(&scores, D::Minus1)?,
            };
            let out = probs.matmul(&v_all)?; // (n_kv, group*t, head_dim)
            let out = out
                .reshape((n_heads, t, head_dim))?
                .transpose(0, 1)? // (t, n_heads, head_dim)
                .reshape((t, n_heads * head_dim))?;
            outputs.push(out);
        }
        let out = Tensor::cat(&outputs, 0)?; // (tokens, n_heads*head_dim)
        project(layer, index, Projection::O, &out, groups)
    }
}

/// Returns the number of tokens in the rows `members`.
fn spans_tokens(spans: &[RowSpan], members: &[usize]) -> usize {
    members.iter().map(|&r| spans[r].len).sum()
}

/// Rebuilds the hidden-state matrix for `members`: rows already in `segment` keep their hidden
/// states, and joining rows copy those of the row they fork from.
fn fork_rows(
    x: &Tensor,
    segment: &Segment<'_>,
    members: &[usize],
    spans: &[RowSpan],
    rows: &[Row<'_>],
) -> Result<Tensor, ModelError> {
    let mut gather = Vec::with_capacity(spans_tokens(spans, members));
    for &r in members {
        let source = match segment.members.binary_search(&r) {
            Ok(position) => position,
            Err(_) => {
                let from = rows[r].fork_from.unwrap_or(r);
                segment
                    .members
                    .binary_search(&from)
                    .map_err(|_| ModelError::InvalidFork {
                        row: r,
                        from,
                        message: "the source row is not in the step".into(),
                    })?
            }
        };
        let span = segment.spans[source];
        gather.extend((span.offset..span.offset + span.len).map(|t| t as u32));
    }
    let n = gather.len();
    let gather = Tensor::from_vec(gather, (n,), x.device())?;
    Ok(x.index_select(&gather, 0)?)
}

/// Applies a projection and the LoRA deltas of the batch's adapters:
/// `(tokens, in) -> (tokens, out)`.
fn project(
    layer: &DecoderLayer,
    index: usize,
    projection: Projection,
    x: &Tensor,
    lora: &LoraPlan<'_>,
) -> Result<Tensor, ModelError> {
    let y = layer.linear(projection).forward(x)?;
    add_lora(y, index, projection, x, lora)
}

/// Applies several projections to the same input, as [`project`] does for one. Their base
/// matmuls share one call to the kernels.
fn project_many<const N: usize>(
    layer: &DecoderLayer,
    index: usize,
    projections: [Projection; N],
    x: &Tensor,
    lora: &LoraPlan<'_>,
) -> Result<[Tensor; N], ModelError> {
    let linears = projections.map(|projection| layer.linear(projection));
    let bases = Linear::forward_many(&linears, x)?;
    let mut out = Vec::with_capacity(N);
    for (y, projection) in bases.into_iter().zip(projections) {
        out.push(add_lora(y, index, projection, x, lora)?);
    }
    Ok(out
        .try_into()
        .unwrap_or_else(|_| unreachable!("one output per projection")))
}

/// Adds the LoRA deltas of `projection` to its base output `y` for the rows that have them.
fn add_lora(
    y: Tensor,
    index: usize,
    projection: Projection,
    x: &Tensor,
    lora: &LoraPlan<'_>,
) -> Result<Tensor, ModelError> {
    if let Some(adapter) = lora.whole_batch {
        let Some(pair) = adapter.pair(index, projection) else {
            return Ok(y);
        };
        return Ok((y + lora_delta(x, pair, adapter.scale())?)?);
    }
    if !lora.spans.iter().any(|span| {
        span.adapter
            .is_some_and(|adapter| adapter.pair(index, projection).is_some())
    }) {
        return Ok(y);
    }
    let out_features = y.dim(1)?;
    if x.device().is_cpu() {
        if let Some(delta) = host_deltas(index, projection, x, out_features, lora)? {
            return Ok((y + delta)?);
        }
    }
    let mut pieces = Vec::with_capacity(lora.spans.len());
    for span in &lora.spans {
        let pair = span
            .adapter
            .and_then(|adapter| Some((adapter.pair(index, projection)?, adapter.scale())));
        pieces.push(match pair {
            Some((pair, scale)) => lora_delta(&x.narrow(0, span.offset, span.len)?, pair, scale)?,
            None => Tensor::zeros((span.len, out_features), DType::F32, x.device())?,
        });
    }
    Ok((y + Tensor::cat(&pieces, 0)?)?)
}

/// Computes the LoRA deltas of a step on the host, `(tokens, out)`, or `None` when a pair has
/// no host copy (trainable adapters). One pass over the batch replaces two small matmuls per
/// row, and each token's delta is computed in a fixed order.
fn host_deltas(
    index: usize,
    projection: Projection,
    x: &Tensor,
    out_features: usize,
    lora: &LoraPlan<'_>,
) -> Result<Option<Tensor>, ModelError> {
    let (tokens, in_features) = x.dims2()?;
    // The pair and scale of each token, if its row has an adapter on this projection.
    let mut pairs: Vec<Option<(&HostPair, f32)>> = vec![None; tokens];
    for span in &lora.spans {
        let Some(adapter) = span.adapter else {
            continue;
        };
        let Some(pair) = adapter.pair(index, projection) else {
            continue;
        };
        let Some(host) = &pair.host else {
            return Ok(None);
        };
        let scale = adapter.scale() as f32;
        pairs[span.offset..span.offset + span.len].fill(Some((host.as_ref(), scale)));
    }
    let x_host: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut delta = vec![0f32; tokens * out_features];
    delta
        .par_chunks_mut(out_features)
        .zip(x_host.par_chunks(in_features))
        .zip(pairs)
        .for_each(|((out, x), pair)| {
            if let Some((host, scale)) = pair {
                host.add_delta(x, scale, out);
            }
        });
    Ok(Some(Tensor::from_vec(
        delta,
        (tokens, out_features),
        x.device(),
    )?))
}

/// `scale · (x·Aᵀ)·Bᵀ`: `(tokens, in) -> (tokens, out)`.
fn lora_delta(x: &Tensor, pair: &LoraPair, scale: f64) -> Result<Tensor, ModelError> {
    Ok((x.matmul(&pair.a.t()?)?.matmul(&pair.b.t()?)? * scale)?)
}

/// One row's tokens in the batch and the adapter they use.
struct LoraSpan<'a> {
    offset: usize,
    len: usize,
    adapter: Option<&'a LoraAdapter>,
}

/// How LoRA deltas are computed for one step.
///
/// Serving computes each row's delta on that row's tokens alone. An f32 GEMM rounds
/// differently for different row counts. A delta computed over a group of rows would therefore
/// make a row's logits depend on the other rows that share its adapter in that step, and seeded
/// sampling would depend on the batch. Training, where every row uses the same adapter
/// and no such guarantee is needed, runs one GEMM over the whole batch.
struct LoraPlan<'a> {
    spans: Vec<LoraSpan<'a>>,
    whole_batch: Option<&'a LoraAdapter>,
}

impl<'a> LoraPlan<'a> {
    fn new(adapters: &[Option<&'a LoraAdapter>], spans: &[RowSpan], kernels: Kernels) -> Self {
        let lora_spans: Vec<LoraSpan<'a>> = adapters
            .iter()
            .zip(spans)
            .map(|(&adapter, span)| LoraSpan {
                offset: span.offset,
                len: span.len,
                adapter,
            })
            .collect();
        let first = adapters.first().copied().flatten();
        let shared = first.filter(|&first| {
            adapters
                .iter()
                .all(|adapter| adapter.is_some_and(|a| std::ptr::eq(a, first)))
        });
        let whole_batch = match kernels {
            Kernels::Differentiable => shared,
            Kernels::Fused => None,
        };
        Self {
            spans: lora_spans,
            whole_batch,
        }
    }
}

/// Additive causal mask for a chunk of `t` new queries after `past` cached positions:
/// `(t, past + t)`, 0 where key `j <= past + i`, `-inf` elsewhere. For `t = 2, past = 1`:
/// `[[0, 0, -inf], [0, 0, 0]]`.
fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor, ModelError> {
    let kv_len = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, kv_len), device)?.to_dtype(DType::F32)?)
}

/// Log-softmax over the vocabulary of `(positions, vocab)` logits.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor, ModelError> {
    Ok(ops::log_softmax(logits, D::Minus1)?)
}
