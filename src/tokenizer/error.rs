//! The error type of the tokenizer module.

use std::path::PathBuf;

/// Errors raised while building a tokenizer, encoding, decoding or rendering a chat template.
#[derive(thiserror::Error, Debug)]
pub enum TokenizerError {
    /// A GGUF metadata key that the tokenizer needs is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingMetadata {
        /// The metadata key, for example `tokenizer.ggml.tokens`.
        key: String,
    },

    /// A GGUF metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata key `{key}` is invalid: {reason}")]
    InvalidMetadata {
        /// The metadata key.
        key: String,
        /// The problem with the value.
        reason: String,
    },

    /// `tokenizer.ggml.model` names a tokenizer family that this crate does not build.
    #[error(
        "unsupported tokenizer model `{model}` in `tokenizer.ggml.model`; supported models: gpt2, llama"
    )]
    UnsupportedModel {
        /// The value of `tokenizer.ggml.model`.
        model: String,
    },

    /// `tokenizer.ggml.pre` names a pre-tokenizer whose splitting rules are not known here.
    #[error(
        "unsupported pre-tokenizer `{pre}` in `tokenizer.ggml.pre`; supported pre-tokenizers: {supported}"
    )]
    UnsupportedPreTokenizer {
        /// The value of `tokenizer.ggml.pre`.
        pre: String,
        /// Comma-separated names that are supported.
        supported: String,
    },

    /// A file that the tokenizer needs does not exist.
    #[error("tokenizer file not found: {}", path.display())]
    MissingFile {
        /// The path that was looked up.
        path: PathBuf,
    },

    /// A file exists but could not be read or parsed.
    #[error("failed to load {}: {message}", path.display())]
    InvalidFile {
        /// The file that failed.
        path: PathBuf,
        /// The reader's or parser's message.
        message: String,
    },

    /// The `tokenizers` crate rejected the assembled vocabulary, merges or settings.
    #[error("failed to build the tokenizer: {message}")]
    Build {
        /// The message of the `tokenizers` crate.
        message: String,
    },

    /// Encoding a text failed inside the `tokenizers` crate.
    #[error("failed to encode text: {message}")]
    Encode {
        /// The message of the `tokenizers` crate.
        message: String,
    },

    /// Decoding token ids failed inside the `tokenizers` crate.
    #[error("failed to decode token ids: {message}")]
    Decode {
        /// The message of the `tokenizers` crate.
        message: String,
    },

    /// A token id is not in the vocabulary.
    #[error("token id {id} is out of range for a vocabulary of {vocab_size} tokens")]
    UnknownTokenId {
        /// The rejected id.
        id: u32,
        /// The number of ids in the vocabulary.
        vocab_size: usize,
    },

    /// A chat was rendered but the model has no chat template.
    #[error(
        "the model has no chat template; configure one or use the completions endpoint with a raw prompt"
    )]
    MissingChatTemplate,

    /// The chat template does not parse.
    #[error("invalid chat template: {message}")]
    ChatTemplateSyntax {
        /// The template engine's message, with the line of the error.
        message: String,
    },

    /// The chat template called `raise_exception`, usually because the messages break its rules
    /// (for example roles that do not alternate).
    #[error("the chat template rejected the messages: {message}")]
    ChatTemplateException {
        /// The message that the template passed to `raise_exception`.
        message: String,
    },

    /// Rendering the chat template failed for another reason (an undefined function, a type
    /// error in an expression).
    #[error("failed to render the chat template: {message}")]
    ChatTemplateRender {
        /// The template engine's message, with the line of the error.
        message: String,
    },
}
