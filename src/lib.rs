//! llmdoctor serves one frozen *patient* LLM and steers it token by token with small trained
//! *doctor* models (LoRA adapters on a base that shares the patient's tokenizer).
//!
//! # Layout
//! - [`model`]: the transformer runtime on candle: llama-family configuration, GGUF and
//!   safetensors loading, quantised and dense linear layers, LoRA adapters, the batched ragged
//!   forward and per-row KV caches.
//! - [`tokenizer`]: tokenizers built from GGUF metadata or `tokenizer.json`, chat templates,
//!   incremental UTF-8-safe detokenization and stop-string matching.
//! - [`loader`]: loads a model together with its tokenizer.
//! - [`doctor`]: doctor manifests and the registry that loads, replaces and unloads them.
//! - [`engine`]: the engine thread: continuous-batching scheduler, sequences, sampling and
//!   steering.
//! - [`bench`]: engine throughput and latency measurements behind `llmdoctor bench`.
//! - [`fetch`]: the model cache and `fetch-model`, which installs the default patient.
//! - [`generate`]: single-prompt generation on top of the runtime, used by the CLI.
//! - [`api`]: the OpenAI-compatible HTTP server: routes, wire types, validation, SSE, errors
//!   and auth.
//! - [`config`]: settings of `llmdoctor serve` from flags, environment, file and defaults.
//! - [`metrics`]: Prometheus metrics of the server and the engine.
//! - [`train`]: preference data, stage-1 token rewards and the TFPO losses and value head used
//!   to train doctors.
//!
//! Lower layers never import higher ones: `model` and `tokenizer` know nothing of the CLI.

#![warn(missing_docs)]

pub mod api;
pub mod bench;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod tokenizer;
pub mod train;
