//! JSON request bodies: parsing with errors that name the field at fault.
//!
//! serde's `deny_unknown_fields` does not work together with `flatten`, which the request types
//! use to share fields, so top-level keys are checked against explicit lists first.

use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::wire::{CommonFields, COMMON_FIELDS};

/// Parses `body` as a JSON object whose top-level keys are all in `known`, then as `T`.
pub fn parse_object<T: DeserializeOwned>(body: &[u8], known: &[&[&str]]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| ApiError::InvalidJson {
            message: err.to_string(),
            param: None,
        })?;
    let serde_json::Value::Object(map) = &value else {
        return Err(ApiError::InvalidJson {
            message: "the body must be a JSON object".into(),
            param: None,
        });
    };
    for key in map.keys() {
        if !known.iter().any(|list| list.contains(&key.as_str())) {
            return Err(ApiError::UnknownField {
                field: key.clone(),
                suggestion: closest(key, known),
            });
        }
    }
    parse_value(value)
}

/// Parses a generation request: [`COMMON_FIELDS`] plus `specific`. The shared fields are
/// parsed on their own first because serde loses the path of an error inside a flattened
/// struct, and the error should name the field.
pub fn parse_request<T: DeserializeOwned>(body: &[u8], specific: &[&str]) -> Result<T, ApiError> {
    let value: serde_json::Value = parse_object(body, &[COMMON_FIELDS, specific])?;
    if let serde_json::Value::Object(map) = &value {
        let common: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .filter(|(key, _)| COMMON_FIELDS.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        parse_value::<CommonFields>(serde_json::Value::Object(common))?;
    }
    parse_value(value)
}

/// Parses a value as `T`, naming the path of a field with the wrong type.
pub fn parse_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(path) => format!("`{path}`: {}", err.inner()),
            None => err.inner().to_string(),
        };
        ApiError::InvalidJson { message, param }
    })
}

/// Finds the known key nearest to `key` by edit distance, if it is within two edits.
fn closest(key: &str, known: &[&[&str]]) -> Option<String> {
    known
        .iter()
        .flat_map(|list| list.iter())
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, candidate)| candidate.to_string())
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::{ChatCompletionRequest, CHAT_FIELDS};

    #[test]
    fn misspelt_doctor_is_rejected_with_suggestion() {
        let body = br#"{"messages": [], "docter": "x"}"#;
        let err =
            parse_object::<ChatCompletionRequest>(body, &[COMMON_FIELDS, CHAT_FIELDS]).unwrap_err();
        assert!(matches!(
            err,
            ApiError::UnknownField { ref field, suggestion: Some(ref s) } if field == "docter" && s == "doctor"
        ));
    }

    #[test]
    fn every_listed_chat_field_parses() {
        for field in COMMON_FIELDS
            .iter()
            .chain(CHAT_FIELDS)
            .filter(|f| **f != "messages")
        {
            let body = format!(r#"{{"messages": [], "{field}": null}}"#);
            parse_object::<ChatCompletionRequest>(body.as_bytes(), &[COMMON_FIELDS, CHAT_FIELDS])
                .unwrap_or_else(|err| panic!("{field}: {err}"));
        }
    }

    #[test]
    fn wrong_type_names_the_path() {
        let body = br#"{"messages": [{"role": 1, "content": "x"}]}"#;
        let err =
            parse_object::<ChatCompletionRequest>(body, &[COMMON_FIELDS, CHAT_FIELDS]).unwrap_err();
        let ApiError::InvalidJson { param, .. } = err else {
            panic!("{err}");
        };
        assert_eq!(param.as_deref(), Some("messages[0].role"));
    }
}
