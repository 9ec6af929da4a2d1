//! Tiny random llama models written to real GGUF files and Hugging Face folders.
//!
//! Tests, examples and benchmarks use them where the real patient is too slow or absent. The
//! weights are seeded, so the same [`TinySpec`] always gives the same model. The vocabulary is
//! byte-level: the 256 byte tokens followed by ChatML's special tokens, with no merges.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::lora::{halves_to_interleaved, Projection};
use super::ModelError;

/// Special tokens appended after the 256 byte tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Range of the embedding entries. With tied embeddings the logits scale with the square of
/// this; 0.25 keeps the next-token distribution spread out enough for sampling tests, where 1.0
/// made every tiny model repeat its last input token.
const EMBEDDING_BOUND: f32 = 0.25;

/// ChatML without a default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shape and seed of a tiny model.
#[derive(Clone, Copy, Debug)]
pub struct TinySpec {
    /// Width of the residual stream; a multiple of 32 so every GGUF block type fits.
    pub hidden_size: usize,
    /// MLP width; a multiple of 32.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Context length.
    pub context_length: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            context_length: 256,
            seed: 7,
        }
    }
}

impl TinySpec {
    /// Number of tokens: 256 bytes plus the special tokens.
    pub fn vocab_size(&self) -> usize {
        256 + SPECIAL_TOKENS.len()
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// `(out, in)` of a projection.
    fn shape(&self, projection: Projection) -> (usize, usize) {
        let q = self.num_heads * self.head_dim();
        let kv = self.num_kv_heads * self.head_dim();
        match projection {
            Projection::Q => (q, self.hidden_size),
            Projection::K | Projection::V => (kv, self.hidden_size),
            Projection::O => (self.hidden_size, q),
            Projection::Gate | Projection::Up => (self.intermediate_size, self.hidden_size),
            Projection::Down => (self.hidden_size, self.intermediate_size),
        }
    }
}

/// Random weights under Hugging Face names and layout (rotary pairs `(i, i + d/2)`).
pub struct TinyWeights {
    /// The spec they were drawn from.
    pub spec: TinySpec,
    /// Tensors by Hugging Face name.
    pub tensors: HashMap<String, Tensor>,
}

/// Draws `(rows, cols)` values uniformly from `[-bound, bound]`.
pub fn uniform(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize),
    bound: f32,
) -> Result<Tensor, ModelError> {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.gen_range(-bound..=bound))
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

impl TinyWeights {
    /// Draws the weights of `spec`.
    pub fn random(spec: TinySpec) -> Result<Self, ModelError> {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut tensors = HashMap::new();
        let hidden = spec.hidden_size;
        tensors.insert(
            "model.embed_tokens.weight".to_string(),
            uniform(&mut rng, (spec.vocab_size(), hidden), EMBEDDING_BOUND)?,
        );
        for layer in 0..spec.num_layers {
            for projection in Projection::ALL {
                let shape = spec.shape(projection);
                let bound = 1.5 / (shape.1 as f32).sqrt();
                tensors.insert(
                    format!("model.{}", hf_projection_name(layer, projection)),
                    uniform(&mut rng, shape, bound)?,
                );
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                let weight = (uniform(&mut rng, (1, hidden), 0.2)? + 1.0)?.squeeze(0)?;
                tensors.insert(format!("model.layers.{layer}.{norm}.weight"), weight);
            }
        }
        let norm = (uniform(&mut rng, (1, hidden), 0.2)? + 1.0)?.squeeze(0)?;
        tensors.insert("model.norm.weight".to_string(), norm);
        Ok(Self { spec, tensors })
    }

    /// Adds `scale · B·A` to a projection's weight (a merged LoRA), for comparisons.
    pub fn merge_delta(
        &mut self,
        layer: usize,
        projection: Projection,
        delta: &Tensor,
    ) -> Result<(), ModelError> {
        let name = format!("model.{}", hf_projection_name(layer, projection));
        let weight = &self.tensors[&name];
        let merged = (weight + delta)?;
        self.tensors.insert(name, merged);
        Ok(())
    }

    /// Writes a GGUF file with architecture `llama`, matrices stored as `dtype` (norms stay
    /// f32), q and k permuted to llama.cpp's interleaved rotary layout, tied embeddings, and a
    /// byte-level tokenizer with a ChatML template.
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<(), ModelError> {
        let spec = &self.spec;
        let mut named: Vec<(String, QTensor)> = Vec::new();
        let quantize = |t: &Tensor, dtype: GgmlDType| QTensor::quantize(t, dtype);
        named.push((
            "token_embd.weight".into(),
            quantize(&self.tensors["model.embed_tokens.weight"], dtype)?,
        ));
        for layer in 0..spec.num_layers {
            for projection in Projection::ALL {
                let mut weight = self.tensors
                    [&format!("model.{}", hf_projection_name(layer, projection))]
                    .clone();
                weight = match projection {
                    Projection::Q => halves_to_interleaved(&weight, spec.num_heads)?,
                    Projection::K => halves_to_interleaved(&weight, spec.num_kv_heads)?,
                    _ => weight,
                };
                named.push((
                    format!("blk.{layer}.{}.weight", gguf_projection_name(projection)),
                    quantize(&weight, dtype)?,
                ));
            }
            for (hf, gguf) in [
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "ffn_norm"),
            ] {
                let weight = &self.tensors[&format!("model.layers.{layer}.{hf}.weight")];
                named.push((
                    format!("blk.{layer}.{gguf}.weight"),
                    quantize(weight, GgmlDType::F32)?,
                ));
            }
        }
        named.push((
            "output_norm.weight".into(),
            quantize(&self.tensors["model.norm.weight"], GgmlDType::F32)?,
        ));

        let u32v = |v: usize| gguf_file::Value::U32(v as u32);
        let tokens = vocabulary();
        let token_types: Vec<gguf_file::Value> = (0..tokens.len())
            .map(|i| gguf_file::Value::I32(if i < 256 { 1 } else { 3 }))
            .collect();
        let metadata: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            (
                "general.name",
                gguf_file::Value::String("tiny-random-llama".into()),
            ),
            ("llama.block_count", u32v(spec.num_layers)),
            ("llama.context_length", u32v(spec.context_length)),
            ("llama.embedding_length", u32v(spec.hidden_size)),
            ("llama.feed_forward_length", u32v(spec.intermediate_size)),
            ("llama.attention.head_count", u32v(spec.num_heads)),
            ("llama.attention.head_count_kv", u32v(spec.num_kv_heads)),
            ("llama.rope.freq_base", gguf_file::Value::F32(10_000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(1e-5),
            ),
            (
                "tokenizer.ggml.model",
                gguf_file::Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre",
                gguf_file::Value::String("smollm".into()),
            ),
            (
                "tokenizer.ggml.tokens",
                gguf_file::Value::Array(tokens.into_iter().map(gguf_file::Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                gguf_file::Value::Array(token_types),
            ),
            ("tokenizer.ggml.merges", gguf_file::Value::Array(Vec::new())),
            ("tokenizer.ggml.bos_token_id", u32v(257)),
            ("tokenizer.ggml.eos_token_id", u32v(258)),
            (
                "tokenizer.ggml.add_bos_token",
                gguf_file::Value::Bool(false),
            ),
            (
                "tokenizer.chat_template",
                gguf_file::Value::String(CHAT_TEMPLATE.into()),
            ),
        ];
        let file = File::create(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut writer = BufWriter::new(file);
        let metadata_refs: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            named.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut writer, &metadata_refs, &tensor_refs)?;
        Ok(())
    }

    /// Writes a Hugging Face folder: `config.json`, `model.safetensors`, `tokenizer.json` and
    /// `tokenizer_config.json`.
    pub fn write_hf_dir(&self, dir: &Path) -> Result<(), ModelError> {
        let spec = &self.spec;
        let io = |source: std::io::Error| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "vocab_size": spec.vocab_size(),
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": spec.context_length,
            "tie_word_embeddings": true,
            "bos_token_id": 257,
            "eos_token_id": 258,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
        candle_core::safetensors::save(&self.tensors, dir.join("model.safetensors"))?;

        let vocab: serde_json::Map<String, serde_json::Value> = vocabulary()
            .into_iter()
            .enumerate()
            .map(|(id, token)| (token, json!(id)))
            .collect();
        let added: Vec<serde_json::Value> = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, token)| {
                json!({"id": 256 + i, "content": token, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).map_err(io)?;
        let tokenizer_config = json!({
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "add_bos_token": false,
            "chat_template": CHAT_TEMPLATE,
        });
        std::fs::write(
            dir.join("tokenizer_config.json"),
            tokenizer_config.to_string(),
        )
        .map_err(io)?;
        Ok(())
    }
}

/// The token strings: GPT-2's byte-to-character mapping for ids 0..256, then the specials.
fn vocabulary() -> Vec<String> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
    tokens
}

/// GPT-2's reversible byte-to-character table: printable Latin-1 bytes map to themselves, the
/// others to U+0100 and up, in byte order.
fn byte_to_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// `layers.{layer}.self_attn.q_proj.weight`-style name without the `model.` prefix.
fn hf_projection_name(layer: usize, projection: Projection) -> String {
    let parent = match projection {
        Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
        _ => "mlp",
    };
    format!(
        "layers.{layer}.{parent}.{}.weight",
        projection.module_name()
    )
}

fn gguf_projection_name(projection: Projection) -> &'static str {
    match projection {
        Projection::Q => "attn_q",
        Projection::K => "attn_k",
        Projection::V => "attn_v",
        Projection::O => "attn_output",
        Projection::Gate => "ffn_gate",
        Projection::Up => "ffn_up",
        Projection::Down => "ffn_down",
    }
}
