//! Llama-family model configuration: the raw forms found in GGUF metadata and in Hugging Face
//! `config.json`, and the resolved [`ModelConfig`] the runtime uses.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use super::ModelError;

/// Architectures the runtime implements. All of them are pre-norm decoders with RMSNorm, rotary
/// position embeddings, grouped-query attention and a SwiGLU MLP; they differ in biases and in
/// how the checkpoint lays out the rotary dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM and other models that report `llama`.
    Llama,
    /// Mistral: the llama layout under another name.
    Mistral,
    /// Qwen2: llama layout with biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Some(Self::Llama),
            "mistral" | "MistralForCausalLM" => Some(Self::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// Whether the q, k and v projections carry a bias.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// How the two halves of each rotary pair are laid out inside a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs are adjacent dimensions `(2i, 2i+1)`. llama.cpp's converter permutes the q and k
    /// weights of llama and mistral checkpoints into this layout.
    Interleaved,
    /// Pairs are `(i, i + head_dim/2)`, as in Hugging Face checkpoints and Qwen2 GGUF files.
    Halves,
}

/// The resolved configuration of a llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Inner width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Dimension of one attention head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    pub rope_theta: f32,
    /// Rotary pair layout of the q and k projections as stored.
    pub rope_layout: RopeLayout,
    /// Maximum context length in tokens.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Number of query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Bytes of f32 key and value cache needed per token, over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Reads the configuration from GGUF metadata (`general.architecture` and the
    /// `<arch>.*` keys written by llama.cpp's converters).
    pub fn from_gguf(content: &gguf_file::Content, file: &Path) -> Result<Self, ModelError> {
        let meta = GgufMeta {
            metadata: &content.metadata,
            file,
        };
        let arch_name = meta.string("general.architecture")?;
        let architecture =
            Architecture::parse(&arch_name).ok_or_else(|| ModelError::UnsupportedArchitecture {
                architecture: arch_name.clone(),
                file: file.to_path_buf(),
            })?;
        let key = |suffix: &str| format!("{arch_name}.{suffix}");

        let hidden_size = meta.usize(&key("embedding_length"))?;
        let num_heads = meta.usize(&key("attention.head_count"))?;
        let num_kv_heads = meta
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
            Some(dim) => dim,
            None => hidden_size / num_heads.max(1),
        };
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                    file: file.to_path_buf(),
                })
            }
        };
        let config = Self {
            architecture,
            hidden_size,
            intermediate_size: meta.usize(&key("feed_forward_length"))?,
            num_layers: meta.usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            rope_layout: match architecture {
                Architecture::Llama | Architecture::Mistral => RopeLayout::Interleaved,
                Architecture::Qwen2 => RopeLayout::Halves,
            },
            max_position_embeddings: meta.usize(&key("context_length"))?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        config.validate(file)?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawHfConfig =
            serde_json::from_str(&text).map_err(|err| ModelError::InvalidConfig {
                file: path.to_path_buf(),
                message: err.to_string(),
            })?;
        let arch_name = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let architecture =
            Architecture::parse(&arch_name).ok_or_else(|| ModelError::UnsupportedArchitecture {
                architecture: arch_name.clone(),
                file: path.to_path_buf(),
            })?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let config = Self {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_layout: RopeLayout::Halves,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, file: &Path) -> Result<(), ModelError> {
        let invalid = |message: String| ModelError::InvalidConfig {
            file: file.to_path_buf(),
            message,
        };
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return Err(invalid(format!(
                "head and layer counts must be positive (heads {}, kv heads {}, layers {})",
                self.num_heads, self.num_kv_heads, self.num_layers
            )));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "head dimension {} must be even for rotary embeddings",
                self.head_dim
            )));
        }
        Ok(())
    }
}

/// The subset of a Hugging Face `config.json` that llama-family models use.
#[derive(Debug, Deserialize)]
struct RawHfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
}

/// Typed access to GGUF metadata with errors that name the key and the file.
struct GgufMeta<'a> {
    metadata: &'a HashMap<String, gguf_file::Value>,
    file: &'a Path,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value, ModelError> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::MissingMetadata {
                key: key.to_string(),
                file: self.file.to_path_buf(),
            })
    }

    fn invalid(&self, key: &str, err: candle_core::Error) -> ModelError {
        ModelError::InvalidConfig {
            file: self.file.to_path_buf(),
            message: format!("metadata key `{key}`: {}", super::candle_message(&err)),
        }
    }

    fn string(&self, key: &str) -> Result<String, ModelError> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|err| self.invalid(key, err))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        let Some(value) = self.metadata.get(key) else {
            return Ok(None);
        };
        let number = match value {
            gguf_file::Value::U64(v) => *v,
            gguf_file::Value::I64(v) => *v as u64,
            gguf_file::Value::I32(v) => *v as u64,
            other => other.to_u32().map_err(|err| self.invalid(key, err))? as u64,
        };
        Ok(Some(number as usize))
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::MissingMetadata {
                key: key.to_string(),
                file: self.file.to_path_buf(),
            })
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        let Some(value) = self.metadata.get(key) else {
            return Ok(None);
        };
        let number = match value {
            gguf_file::Value::F64(v) => *v,
            other => other.to_f32().map_err(|err| self.invalid(key, err))? as f64,
        };
        Ok(Some(number))
    }

    fn f64(&self, key: &str) -> Result<f64, ModelError> {
        self.opt_f64(key)?
            .ok_or_else(|| ModelError::MissingMetadata {
                key: key.to_string(),
                file: self.file.to_path_buf(),
            })
    }
}
