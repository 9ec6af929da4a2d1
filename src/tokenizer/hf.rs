//! Loading a tokenizer from a Hugging Face model folder.

use std::path::Path;

use serde_json::Value as Json;

use super::{TokenizerError, TokenizerParts};

/// Reads `tokenizer.json` and the optional files beside it:
/// - `tokenizer_config.json`: `chat_template`, `bos_token`, `eos_token`, `add_bos_token`;
/// - `chat_template.jinja`, which newer transformers versions write instead of the
///   `chat_template` key, and which wins when both exist;
/// - `generation_config.json`: `eos_token_id` (an id or a list), added to the stop tokens.
pub(crate) fn load_dir(dir: &Path) -> Result<TokenizerParts, TokenizerError> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(TokenizerError::MissingFile {
            path: tokenizer_path,
        });
    }
    let inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|err| {
        TokenizerError::InvalidFile {
            path: tokenizer_path.clone(),
            message: err.to_string(),
        }
    })?;

    let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let config = config.as_ref();
    let token_id = |field: &str| {
        config
            .and_then(|c| c.get(field))
            .and_then(added_token_text)
            .and_then(|text| inner.token_to_id(text))
    };
    let bos_token_id = token_id("bos_token");
    let eos_token_id = token_id("eos_token");

    let add_bos = match config
        .and_then(|c| c.get("add_bos_token"))
        .and_then(Json::as_bool)
    {
        Some(add) => add,
        None => post_processor_adds(&inner, bos_token_id)?,
    };

    let template_path = dir.join("chat_template.jinja");
    let chat_template = if template_path.is_file() {
        Some(std::fs::read_to_string(&template_path).map_err(|err| {
            TokenizerError::InvalidFile {
                path: template_path.clone(),
                message: err.to_string(),
            }
        })?)
    } else {
        config
            .and_then(|c| c.get("chat_template"))
            .and_then(default_chat_template)
    };

    let generation_config = read_optional_json(&dir.join("generation_config.json"))?;
    let extra_stop_ids = match generation_config
        .as_ref()
        .and_then(|c| c.get("eos_token_id"))
    {
        Some(Json::Number(id)) => id.as_u64().into_iter().collect(),
        Some(Json::Array(ids)) => ids.iter().filter_map(Json::as_u64).collect(),
        _ => Vec::new(),
    };
    let extra_stop_ids = extra_stop_ids
        .into_iter()
        .filter_map(|id| u32::try_from(id).ok())
        .collect();

    Ok(TokenizerParts {
        inner,
        bos_token_id,
        eos_token_id,
        add_bos,
        extra_stop_ids,
        chat_template,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let invalid = |message: String| TokenizerError::InvalidFile {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|err| invalid(err.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|err| invalid(err.to_string()))
}

/// Extracts the text of a special token in `tokenizer_config.json`, which is a plain string or
/// an added-token object with a `content` field.
fn added_token_text(value: &Json) -> Option<&str> {
    match value {
        Json::String(text) => Some(text),
        Json::Object(fields) => fields.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// Extracts the chat template of `tokenizer_config.json`, which is a string or a list of named
/// templates. From a list, transformers uses the one named `default`.
fn default_chat_template(value: &Json) -> Option<String> {
    match value {
        Json::String(source) => Some(source.clone()),
        Json::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|entry| entry.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// Checks whether the tokenizer's post-processor puts the BOS token in front of an encoding,
/// which is how `tokenizer.json` alone declares that a model expects BOS.
fn post_processor_adds(
    tokenizer: &tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
) -> Result<bool, TokenizerError> {
    let Some(bos) = bos_token_id else {
        return Ok(false);
    };
    let encoding = tokenizer
        .encode_fast("a", true)
        .map_err(|err| TokenizerError::Encode {
            message: err.to_string(),
        })?;
    Ok(encoding.get_ids().first() == Some(&bos))
}
