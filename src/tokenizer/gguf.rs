//! Reading the `tokenizer.ggml.*` metadata of a GGUF file into a typed [`GgufVocab`].

use candle_core::quantized::gguf_file::{Content, Value};

use super::TokenizerError;

pub(crate) const KEY_MODEL: &str = "tokenizer.ggml.model";
pub(crate) const KEY_PRE: &str = "tokenizer.ggml.pre";
pub(crate) const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub(crate) const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub(crate) const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub(crate) const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub(crate) const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub(crate) const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
pub(crate) const KEY_EOT_ID: &str = "tokenizer.ggml.eot_token_id";
pub(crate) const KEY_EOM_ID: &str = "tokenizer.ggml.eom_token_id";
pub(crate) const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
pub(crate) const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub(crate) const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub(crate) const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The kind of a vocabulary entry, as `tokenizer.ggml.token_type` stores it (the numbering of
/// llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Self {
        match code {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Returns whether BPE merges may produce this token from plain text. Other kinds are
    /// matched whole (control, user-defined) or never come from text (byte, unused).
    pub(crate) fn is_mergeable(self) -> bool {
        matches!(self, Self::Normal | Self::Undefined)
    }
}

/// The tokenizer metadata of a GGUF file.
#[derive(Debug, Clone, Default)]
pub(crate) struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama` here.
    pub model: String,
    /// `tokenizer.ggml.pre`, the name of the pre-tokenizer of a `gpt2` vocabulary.
    pub pre: Option<String>,
    /// Token strings indexed by id. Empty strings are replaced by `[EMPTY_<id>]` as llama.cpp
    /// does, so that every id keeps a distinct entry.
    pub tokens: Vec<String>,
    /// One entry per token; `Normal` for every token when the key is absent.
    pub token_types: Vec<TokenType>,
    /// SentencePiece scores, one per token (required by `llama` vocabularies).
    pub scores: Option<Vec<f32>>,
    /// BPE merges as `"left right"` strings, highest priority first (required by `gpt2`).
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub eot_token_id: Option<u32>,
    pub eom_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads every `tokenizer.*` key that the builders use from `content`.
    pub(crate) fn from_content(content: &Content) -> Result<Self, TokenizerError> {
        let metadata = &content.metadata;
        let get = |key: &str| metadata.get(key);

        let model = require_string(get(KEY_MODEL), KEY_MODEL)?;
        let tokens: Vec<String> = require_array(get(KEY_TOKENS), KEY_TOKENS)?
            .iter()
            .enumerate()
            .map(|(id, value)| match value {
                Value::String(s) if s.is_empty() => Ok(format!("[EMPTY_{id}]")),
                Value::String(s) => Ok(s.clone()),
                other => Err(invalid(
                    KEY_TOKENS,
                    format!("entry {id} is {:?}, expected a string", other.value_type()),
                )),
            })
            .collect::<Result<_, _>>()?;

        let token_types = match get(KEY_TOKEN_TYPE) {
            None => vec![TokenType::Normal; tokens.len()],
            Some(value) => {
                let codes = require_array(Some(value), KEY_TOKEN_TYPE)?;
                check_length(codes.len(), tokens.len(), KEY_TOKEN_TYPE)?;
                codes
                    .iter()
                    .enumerate()
                    .map(|(id, code)| {
                        integer(code).map(TokenType::from_code).ok_or_else(|| {
                            invalid(KEY_TOKEN_TYPE, format!("entry {id} is not an integer"))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };

        let scores = match get(KEY_SCORES) {
            None => None,
            Some(value) => {
                let entries = require_array(Some(value), KEY_SCORES)?;
                check_length(entries.len(), tokens.len(), KEY_SCORES)?;
                let scores = entries
                    .iter()
                    .enumerate()
                    .map(|(id, entry)| match entry {
                        Value::F32(x) => Ok(*x),
                        Value::F64(x) => Ok(*x as f32),
                        _ => Err(invalid(KEY_SCORES, format!("entry {id} is not a float"))),
                    })
                    .collect::<Result<_, _>>()?;
                Some(scores)
            }
        };

        let merges = match get(KEY_MERGES) {
            None => None,
            Some(value) => Some(
                require_array(Some(value), KEY_MERGES)?
                    .iter()
                    .enumerate()
                    .map(|(index, entry)| match entry {
                        Value::String(s) => Ok(s.clone()),
                        _ => Err(invalid(
                            KEY_MERGES,
                            format!("entry {index} is not a string"),
                        )),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };

        let vocab_size = tokens.len();
        Ok(Self {
            model,
            pre: optional_string(get(KEY_PRE), KEY_PRE)?,
            tokens,
            token_types,
            scores,
            merges,
            bos_token_id: optional_token_id(get(KEY_BOS_ID), KEY_BOS_ID, vocab_size)?,
            eos_token_id: optional_token_id(get(KEY_EOS_ID), KEY_EOS_ID, vocab_size)?,
            eot_token_id: optional_token_id(get(KEY_EOT_ID), KEY_EOT_ID, vocab_size)?,
            eom_token_id: optional_token_id(get(KEY_EOM_ID), KEY_EOM_ID, vocab_size)?,
            unknown_token_id: optional_token_id(get(KEY_UNK_ID), KEY_UNK_ID, vocab_size)?,
            add_bos_token: optional_bool(get(KEY_ADD_BOS), KEY_ADD_BOS)?,
            add_space_prefix: optional_bool(get(KEY_ADD_SPACE_PREFIX), KEY_ADD_SPACE_PREFIX)?,
            chat_template: optional_string(get(KEY_CHAT_TEMPLATE), KEY_CHAT_TEMPLATE)?,
        })
    }

    /// Returns the text of a token id, when the id is in range.
    pub(crate) fn token_text(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|id| self.tokens.get(id as usize))
            .map(String::as_str)
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidMetadata {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn missing(key: &str) -> TokenizerError {
    TokenizerError::MissingMetadata {
        key: key.to_owned(),
    }
}

fn check_length(actual: usize, expected: usize, key: &str) -> Result<(), TokenizerError> {
    if actual == expected {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("has {actual} entries but `{KEY_TOKENS}` has {expected}"),
        ))
    }
}

fn require_string(value: Option<&Value>, key: &str) -> Result<String, TokenizerError> {
    optional_string(value, key)?.ok_or_else(|| missing(key))
}

fn optional_string(value: Option<&Value>, key: &str) -> Result<Option<String>, TokenizerError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(
            key,
            format!("is {:?}, expected a string", other.value_type()),
        )),
    }
}

fn require_array<'a>(value: Option<&'a Value>, key: &str) -> Result<&'a [Value], TokenizerError> {
    match value {
        None => Err(missing(key)),
        Some(Value::Array(values)) => Ok(values),
        Some(other) => Err(invalid(
            key,
            format!("is {:?}, expected an array", other.value_type()),
        )),
    }
}

fn optional_bool(value: Option<&Value>, key: &str) -> Result<Option<bool>, TokenizerError> {
    match value {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(
            key,
            format!("is {:?}, expected a bool", other.value_type()),
        )),
    }
}

/// Reads a token id stored with any integer type, because converters differ between u32 and
/// i32. An id outside the vocabulary reads as absent.
fn optional_token_id(
    value: Option<&Value>,
    key: &str,
    vocab_size: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let id = integer(value).ok_or_else(|| {
        invalid(
            key,
            format!("is {:?}, expected an integer", value.value_type()),
        )
    })?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
        // llama.cpp also ignores such ids (with a warning), and some published files have them.
        _ => {
            tracing::warn!(
                key,
                id,
                vocab_size,
                "ignoring a token id outside the vocabulary"
            );
            Ok(None)
        }
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}
