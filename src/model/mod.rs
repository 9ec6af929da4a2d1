//! The transformer runtime on candle.
//!
//! Model structs hold weights only. Every piece of per-sequence state (the KV cache and the
//! position) lives in a [`KvCache`] owned by the caller, so one [`Llama::forward`] call can run
//! any mix of sequences: prefill chunks and single decode tokens, each row at its own position,
//! each with or without a LoRA adapter.
//!
//! - [`config`]: raw and resolved model configuration.
//! - [`weights`]: GGUF and safetensors reading, the quantisation policy, linear layers.
//! - [`lora`]: LoRA adapters in PEFT's safetensors layout.
//! - [`kv`]: per-row KV cache storage.
//! - [`llama`]: the llama-family decoder and its batched forward.

mod attention;
pub mod config;
pub mod kv;
pub mod llama;
pub mod lora;
pub mod qgemm;
pub mod tiny;
pub mod weights;

use std::path::PathBuf;

pub use config::{Architecture, ModelConfig, RopeLayout};
pub use kv::KvCache;
pub use llama::{Kernels, Llama, LogitsSelection, Row};
pub use lora::LoraAdapter;
pub use weights::{LoadOptions, QuantPolicy, WeightFormat};

/// Errors raised while loading or running a model. Each names the file, tensor or value at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("failed to read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a readable GGUF or safetensors file.
    #[error("`{file}` is not a valid model file: {message}")]
    InvalidFile {
        /// The file.
        file: PathBuf,
        /// What the parser reported.
        message: String,
    },
    /// The architecture named by the file is not implemented.
    #[error(
        "unsupported architecture `{architecture}` in `{file}`; supported: llama, mistral, qwen2"
    )]
    UnsupportedArchitecture {
        /// The architecture the file names.
        architecture: String,
        /// The file.
        file: PathBuf,
    },
    /// A required GGUF metadata key is absent.
    #[error("missing metadata key `{key}` in `{file}`")]
    MissingMetadata {
        /// The key.
        key: String,
        /// The file.
        file: PathBuf,
    },
    /// The configuration values are inconsistent or unreadable.
    #[error("invalid model configuration in `{file}`: {message}")]
    InvalidConfig {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{name}` in `{file}`")]
    MissingTensor {
        /// The tensor name as stored in the file.
        name: String,
        /// The file.
        file: PathBuf,
    },
    /// A tensor does not have the shape the configuration implies.
    #[error("tensor `{name}` in `{file}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor name as stored in the file.
        name: String,
        /// The file.
        file: PathBuf,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor's data could not be read, typically because the file is truncated.
    #[error("failed to read tensor `{name}` from `{file}`: {message}")]
    TensorRead {
        /// The tensor name.
        name: String,
        /// The file.
        file: PathBuf,
        /// The reader's message.
        message: String,
    },
    /// A LoRA adapter is malformed or does not fit the model.
    #[error("invalid LoRA adapter `{file}`: {message}")]
    InvalidAdapter {
        /// The adapter file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A row would run past the model's context window.
    #[error(
        "context length exceeded: {requested} positions requested, the model's context is {limit}"
    )]
    ContextOverflow {
        /// Positions the row would occupy after this step.
        requested: usize,
        /// The model's maximum context.
        limit: usize,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A row has no tokens to process.
    #[error("row {row} has no tokens")]
    EmptyRow {
        /// Index of the row in the batch.
        row: usize,
    },
    /// A row's `fork_from` does not name a row it can share layers with.
    #[error("row {row} cannot fork from row {from}: {message}")]
    InvalidFork {
        /// Index of the forking row in the batch.
        row: usize,
        /// Index of the row it names.
        from: usize,
        /// The mismatch.
        message: String,
    },
    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// The message of a candle error without the backtrace that candle attaches when
/// `RUST_BACKTRACE` is set: users need the message, and the trace would bury it.
pub fn candle_message(err: &candle_core::Error) -> String {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}
