//! Loading a model together with its tokenizer, from a GGUF file or a Hugging Face folder.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

use crate::model::weights::read_gguf;
use crate::model::{Llama, LoadOptions, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// A model and the tokenizer that belongs to it.
#[derive(Clone)]
pub struct LoadedModel {
    /// The weights.
    pub model: Arc<Llama>,
    /// The tokenizer from the same checkpoint.
    pub tokenizer: Arc<Tokenizer>,
}

/// Errors from [`load_model`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The weights could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be built.
    #[error("failed to build the tokenizer of `{path}`: {source}")]
    Tokenizer {
        /// The model file or folder.
        path: std::path::PathBuf,
        /// The cause.
        source: TokenizerError,
    },
    /// The tokenizer and the embedding matrix disagree on the vocabulary size.
    #[error(
        "`{path}`: the tokenizer has {tokenizer} tokens but the embedding matrix has {model} rows"
    )]
    VocabularyMismatch {
        /// The model file or folder.
        path: std::path::PathBuf,
        /// Tokens in the tokenizer.
        tokenizer: usize,
        /// Rows of the embedding matrix.
        model: usize,
    },
}

/// Loads the weights and the tokenizer at `path` (a `.gguf` file or a Hugging Face folder).
pub fn load_model(
    path: &Path,
    options: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let model = Llama::load(path, options, device)?;
    let tokenizer = if path.is_dir() {
        Tokenizer::from_hf_dir(path)
    } else {
        let (content, _) = read_gguf(path)?;
        Tokenizer::from_gguf(&content)
    }
    .map_err(|source| LoadError::Tokenizer {
        path: path.to_path_buf(),
        source,
    })?;
    // Checkpoints often pad the embedding matrix beyond the tokenizer, never the reverse.
    if tokenizer.vocab_size() > model.config().vocab_size {
        return Err(LoadError::VocabularyMismatch {
            path: path.to_path_buf(),
            tokenizer: tokenizer.vocab_size(),
            model: model.config().vocab_size,
        });
    }
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
    })
}
