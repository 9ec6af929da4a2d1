//! Preference pairs: loading them from JSONL files and splitting them by prompt.
//!
//! # Input formats
//! Files hold one JSON object per line. Blank lines are ignored, and a file whose name ends in
//! `.gz` is decompressed while it is read. Two line formats are accepted:
//!
//! - **HH-RLHF**: `{"chosen": "...", "rejected": "..."}`, where each string is a whole dialogue
//!   `\n\nHuman: ...\n\nAssistant: ...` that may have several turns. The text before the last
//!   `\n\nAssistant:` is the prompt and must be byte-identical in both strings. What follows it
//!   is the response. Prompt messages and responses are trimmed of surrounding whitespace,
//!   because the format puts a space after every role marker. `Human` becomes the `user` role.
//!   Consecutive turns of one role, which occur in the published data, stay separate messages.
//! - **Generic**: `"chosen"` and `"rejected"` strings plus either `"prompt"` (a string, which
//!   becomes one user message) or `"messages"` (a list of `{"role", "content"}` with roles
//!   `system`, `user` and `assistant`). Texts are kept byte for byte.
//!
//! A line with `"prompt"` or `"messages"` is read as generic, any other line as HH-RLHF. Either
//! format may carry an `"id"` (string or integer). Without one, the id is the first 16 hex
//! digits of the SHA-256 of the prompt and both responses, so it does not change when lines are
//! reordered.
//!
//! # Malformed lines
//! [`Strictness::Strict`] stops at the first malformed line. [`Strictness::Lenient`] skips it,
//! logs a warning with its line number and lists it in [`LoadReport::skipped`]. Warnings never
//! quote the line, because preference data often contain offensive text.

mod hh;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Lines skipped in lenient mode that get their own warning. Later ones are only counted, so a
/// file in the wrong format does not flood the log.
const MAX_SKIP_WARNINGS: usize = 20;

/// Hex digits kept from the SHA-256 for a derived pair id: 64 bits, so two distinct pairs in
/// one file collide with negligible probability.
const DERIVED_ID_HEX_DIGITS: usize = 16;

/// The author of a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person talking to the model (`Human` in HH-RLHF).
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// Returns the role name that chat templates expect: `system`, `user` or `assistant`.
    pub fn role_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "system" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }
}

/// One message of a prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// The author of the message.
    pub role: Role,
    /// The message text.
    pub content: String,
}

/// A prompt with a preferred and a dispreferred response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The line's `id`, or a hash of its prompt and responses when it has none.
    pub id: String,
    /// The conversation before the responses. It ends where the assistant's reply would start.
    pub prompt: Vec<PromptMessage>,
    /// The preferred response.
    pub chosen: String,
    /// The dispreferred response.
    pub rejected: String,
}

/// The treatment of malformed lines by [`load_pairs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// Skip the line, log a warning and record it in [`LoadReport::skipped`].
    Lenient,
    /// Fail with [`DataError::Malformed`].
    Strict,
}

/// The reason a line is not a usable preference pair.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SkipReason {
    /// The line is not valid UTF-8.
    #[error("the line is not valid UTF-8")]
    NotUtf8,
    /// The line is not valid JSON.
    #[error("not valid JSON: {message}")]
    NotJson {
        /// The parser's message, which gives the column but not the text.
        message: String,
    },
    /// The line is JSON but not an object.
    #[error("the line is not a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field name.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    InvalidField {
        /// The field name.
        field: &'static str,
        /// The accepted type, for example `a string`.
        expected: &'static str,
    },
    /// A generic line has both `prompt` and `messages`.
    #[error("the line has both `prompt` and `messages`; keep one of them")]
    ConflictingPrompt,
    /// An HH-RLHF string is not a `Human:`/`Assistant:` dialogue ending in an assistant turn.
    #[error("`{field}` is not an HH-RLHF dialogue: {problem}")]
    NotHhDialogue {
        /// `chosen` or `rejected`.
        field: &'static str,
        /// The problem with the dialogue.
        problem: &'static str,
    },
    /// The two HH-RLHF dialogues differ before their final assistant turn.
    #[error("`chosen` and `rejected` differ before their final assistant turn")]
    PromptMismatch,
    /// A message has a role other than system, user or assistant.
    #[error("message {index} has unknown role `{role}`; expected system, user or assistant")]
    UnknownRole {
        /// The message's position in `messages`, from 0.
        index: usize,
        /// The role found.
        role: String,
    },
    /// The prompt has no text.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A response is empty or only whitespace.
    #[error("the `{field}` response is empty")]
    EmptyResponse {
        /// `chosen` or `rejected`.
        field: &'static str,
    },
    /// Both responses are the same text, so the pair expresses no preference.
    #[error("`chosen` and `rejected` are identical")]
    IdenticalResponses,
    /// Another line already has this pair id.
    #[error("pair id `{id}` is already used on line {first_line}")]
    DuplicateId {
        /// The repeated id.
        id: String,
        /// The line that has it first.
        first_line: usize,
    },
}

impl SkipReason {
    /// Returns a short label for counting skipped lines by reason, for example `missing_field`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotUtf8 => "not_utf8",
            Self::NotJson { .. } => "not_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField { .. } => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::ConflictingPrompt => "conflicting_prompt",
            Self::NotHhDialogue { .. } => "not_hh_dialogue",
            Self::PromptMismatch => "prompt_mismatch",
            Self::UnknownRole { .. } => "unknown_role",
            Self::EmptyPrompt => "empty_prompt",
            Self::EmptyResponse { .. } => "empty_response",
            Self::IdenticalResponses => "identical_responses",
            Self::DuplicateId { .. } => "duplicate_id",
        }
    }
}

/// A line that lenient loading skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedLine {
    /// The line number, from 1.
    pub line: usize,
    /// The reason it was skipped.
    pub reason: SkipReason,
}

/// The result of [`load_pairs`].
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// The pairs, in file order.
    pub pairs: Vec<PreferencePair>,
    /// Malformed lines, in file order. Always empty in strict mode.
    pub skipped: Vec<SkippedLine>,
}

impl LoadReport {
    /// Counts the skipped lines by [`SkipReason::kind`].
    pub fn skipped_by_reason(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for skipped in &self.skipped {
            *counts.entry(skipped.reason.kind()).or_insert(0) += 1;
        }
        counts
    }
}

/// Errors raised while loading or splitting preference data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened, read or decompressed.
    #[error("failed to read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line is malformed and loading is strict.
    #[error(
        "`{}` line {line}: {reason}; fix the line or load the file in lenient mode",
        path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// The problem with the line.
        reason: SkipReason,
    },
    /// The file yields no pairs: it is empty or every line was skipped.
    #[error("`{}` contains no preference pairs ({skipped} malformed lines skipped)", path.display())]
    NoPairs {
        /// The file.
        path: PathBuf,
        /// Malformed lines that were skipped.
        skipped: usize,
    },
    /// The validation fraction is outside `[0, 1)`.
    #[error("invalid validation fraction {value}: it must be at least 0 and below 1")]
    InvalidFraction {
        /// The fraction given.
        value: f64,
    },
}

/// Loads preference pairs from a JSONL file, or a gzipped one when the name ends in `.gz`.
///
/// See the module documentation for the accepted formats and for how `mode` treats malformed
/// lines.
pub fn load_pairs(path: &Path, mode: Strictness) -> Result<LoadReport, DataError> {
    let io_error = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|ext| ext == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::new(reader);

    let mut report = LoadReport::default();
    let mut first_line_of_id: HashMap<String, usize> = HashMap::new();
    let mut buffer = Vec::new();
    let mut line = 0;
    loop {
        buffer.clear();
        if reader.read_until(b'\n', &mut buffer).map_err(io_error)? == 0 {
            break;
        }
        line += 1;
        let parsed = match std::str::from_utf8(&buffer) {
            Ok(text) if text.trim().is_empty() => continue,
            // A byte-order mark, which some editors write at the start of a file, is not JSON.
            Ok(text) => parse_line(text.strip_prefix('\u{feff}').unwrap_or(text)),
            Err(_) => Err(SkipReason::NotUtf8),
        };
        let checked = parsed.and_then(|pair| match first_line_of_id.get(&pair.id) {
            Some(&first_line) => Err(SkipReason::DuplicateId {
                id: pair.id,
                first_line,
            }),
            None => Ok(pair),
        });
        match checked {
            Ok(pair) => {
                first_line_of_id.insert(pair.id.clone(), line);
                report.pairs.push(pair);
            }
            Err(reason) if mode == Strictness::Strict => {
                return Err(DataError::Malformed {
                    path: path.to_owned(),
                    line,
                    reason,
                });
            }
            Err(reason) => skip_line(&mut report, path, line, reason),
        }
    }

    if report.pairs.is_empty() {
        return Err(DataError::NoPairs {
            path: path.to_owned(),
            skipped: report.skipped.len(),
        });
    }
    if !report.skipped.is_empty() {
        tracing::warn!(
            path = %path.display(),
            loaded = report.pairs.len(),
            skipped = report.skipped.len(),
            by_reason = ?report.skipped_by_reason(),
            "skipped malformed preference pairs"
        );
    }
    Ok(report)
}

/// Records a malformed line in lenient mode, warning about each of the first
/// [`MAX_SKIP_WARNINGS`] lines.
fn skip_line(report: &mut LoadReport, path: &Path, line: usize, reason: SkipReason) {
    let earlier = report.skipped.len();
    if earlier < MAX_SKIP_WARNINGS {
        tracing::warn!(path = %path.display(), line, %reason, "skipping malformed preference pair");
    } else if earlier == MAX_SKIP_WARNINGS {
        tracing::warn!(
            path = %path.display(),
            line,
            "more malformed lines follow; only their count is logged from here on"
        );
    }
    report.skipped.push(SkippedLine { line, reason });
}

/// Parses one non-blank line into a pair.
fn parse_line(text: &str) -> Result<PreferencePair, SkipReason> {
    let value: Value = serde_json::from_str(text).map_err(|err| SkipReason::NotJson {
        message: err.to_string(),
    })?;
    let Value::Object(object) = value else {
        return Err(SkipReason::NotAnObject);
    };
    let chosen = string_field(&object, "chosen")?;
    let rejected = string_field(&object, "rejected")?;

    let generic = object.contains_key("prompt") || object.contains_key("messages");
    let (prompt, chosen, rejected) = if generic {
        (
            generic_prompt(&object)?,
            chosen.to_owned(),
            rejected.to_owned(),
        )
    } else if hh::looks_like_dialogue(chosen) || hh::looks_like_dialogue(rejected) {
        hh::split_pair(chosen, rejected)?
    } else {
        return Err(SkipReason::MissingField { field: "prompt" });
    };

    if prompt
        .iter()
        .all(|message| message.content.trim().is_empty())
    {
        return Err(SkipReason::EmptyPrompt);
    }
    if chosen.trim().is_empty() {
        return Err(SkipReason::EmptyResponse { field: "chosen" });
    }
    if rejected.trim().is_empty() {
        return Err(SkipReason::EmptyResponse { field: "rejected" });
    }
    if chosen == rejected {
        return Err(SkipReason::IdenticalResponses);
    }

    let id = match object.get("id") {
        None | Some(Value::Null) => derived_id(&prompt, &chosen, &rejected),
        Some(Value::String(id)) => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        Some(_) => {
            return Err(SkipReason::InvalidField {
                field: "id",
                expected: "a string or a number",
            })
        }
    };
    Ok(PreferencePair {
        id,
        prompt,
        chosen,
        rejected,
    })
}

fn string_field<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, SkipReason> {
    match object.get(field) {
        None => Err(SkipReason::MissingField { field }),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(SkipReason::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

/// Reads the prompt of a generic line from `prompt` or `messages`.
fn generic_prompt(object: &Map<String, Value>) -> Result<Vec<PromptMessage>, SkipReason> {
    match (object.get("prompt"), object.get("messages")) {
        (Some(_), Some(_)) => Err(SkipReason::ConflictingPrompt),
        (Some(_), None) => Ok(vec![PromptMessage {
            role: Role::User,
            content: string_field(object, "prompt")?.to_owned(),
        }]),
        (None, Some(Value::Array(messages))) => messages
            .iter()
            .enumerate()
            .map(|(index, message)| parse_message(index, message))
            .collect(),
        (None, Some(_)) => Err(SkipReason::InvalidField {
            field: "messages",
            expected: "a list of {\"role\", \"content\"} objects",
        }),
        (None, None) => Err(SkipReason::MissingField { field: "prompt" }),
    }
}

fn parse_message(index: usize, message: &Value) -> Result<PromptMessage, SkipReason> {
    let invalid = SkipReason::InvalidField {
        field: "messages",
        expected: "a list of {\"role\", \"content\"} objects with string values",
    };
    let Value::Object(message) = message else {
        return Err(invalid);
    };
    let (Some(Value::String(role)), Some(Value::String(content))) =
        (message.get("role"), message.get("content"))
    else {
        return Err(invalid);
    };
    let role = Role::parse(role).ok_or_else(|| SkipReason::UnknownRole {
        index,
        role: role.clone(),
    })?;
    Ok(PromptMessage {
        role,
        content: content.clone(),
    })
}

/// Hashes the prompt and both responses into a pair id.
fn derived_id(prompt: &[PromptMessage], chosen: &str, rejected: &str) -> String {
    let mut hasher = Sha256::new();
    hash_prompt(&mut hasher, prompt);
    // Each text is followed by a NUL so that moving characters between fields changes the hash.
    for text in [chosen, rejected] {
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut id: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    id.truncate(DERIVED_ID_HEX_DIGITS);
    id
}

fn hash_prompt(hasher: &mut Sha256, prompt: &[PromptMessage]) {
    for message in prompt {
        hasher.update(message.role.role_str().as_bytes());
        hasher.update([0]);
        hasher.update(message.content.as_bytes());
        hasher.update([0]);
    }
}

/// Pairs divided into a training set and a validation set.
#[derive(Clone, Debug, Default)]
pub struct PairSplit {
    /// Pairs to train on, in input order.
    pub train: Vec<PreferencePair>,
    /// Pairs held out for validation, in input order.
    pub validation: Vec<PreferencePair>,
}

/// Splits pairs into training and validation sets so that all pairs with the same prompt land
/// in the same set.
///
/// Prompts are ordered by a SHA-256 of `seed` and the prompt's messages, and whole prompts go
/// to validation in that order until it contains at least `round(validation_fraction · pairs)`
/// pairs. The result depends only on the pairs, the fraction and the seed, not on input order.
/// The last prompt taken can overshoot the target by its number of pairs minus one, and a
/// fraction small enough to round to zero pairs leaves validation empty.
pub fn split_by_prompt(
    pairs: Vec<PreferencePair>,
    validation_fraction: f64,
    seed: u64,
) -> Result<PairSplit, DataError> {
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(DataError::InvalidFraction {
            value: validation_fraction,
        });
    }
    let keys: Vec<[u8; 32]> = pairs
        .iter()
        .map(|pair| {
            let mut hasher = Sha256::new();
            hasher.update(seed.to_le_bytes());
            hash_prompt(&mut hasher, &pair.prompt);
            hasher.finalize().into()
        })
        .collect();

    // Pairs per prompt, ordered by key.
    let mut group_sizes: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    for key in &keys {
        *group_sizes.entry(*key).or_insert(0) += 1;
    }
    // The cast is exact for any realistic pair count, and the product is at most that count.
    let target = (validation_fraction * pairs.len() as f64).round() as usize;
    let mut validation_keys = Vec::new();
    let mut validation_count = 0;
    for (key, size) in group_sizes {
        if validation_count >= target {
            break;
        }
        validation_keys.push(key);
        validation_count += size;
    }

    let mut split = PairSplit::default();
    for (pair, key) in pairs.into_iter().zip(&keys) {
        if validation_keys.binary_search(key).is_ok() {
            split.validation.push(pair);
        } else {
            split.train.push(pair);
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(name: &str, lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let mut file = File::create(&path).unwrap();
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
        (dir, path)
    }

    fn pair_with_prompt(id: &str, prompt: &str) -> PreferencePair {
        PreferencePair {
            id: id.to_owned(),
            prompt: vec![PromptMessage {
                role: Role::User,
                content: prompt.to_owned(),
            }],
            chosen: "yes".to_owned(),
            rejected: "no".to_owned(),
        }
    }

    const HH_LINE: &str = r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! ", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}"#;

    #[test]
    fn loads_hh_line() {
        let with_bom = format!("\u{feff}{HH_LINE}");
        let (_dir, path) = write_file("pairs.jsonl", &[&with_bom]);
        let report = load_pairs(&path, Strictness::Strict).unwrap();
        assert_eq!(report.pairs.len(), 1);
        let pair = &report.pairs[0];
        assert_eq!(
            pair.prompt,
            vec![PromptMessage {
                role: Role::User,
                content: "Hi".to_owned()
            }]
        );
        assert_eq!(pair.chosen, "Hello!");
        assert_eq!(pair.rejected, "Go away.");
        assert_eq!(pair.id.len(), DERIVED_ID_HEX_DIGITS);
    }

    #[test]
    fn loads_generic_prompt_and_messages() {
        let (_dir, path) = write_file(
            "pairs.jsonl",
            &[
                r#"{"prompt": "Add 2 and 2.", "chosen": " 4", "rejected": " 5", "id": 7}"#,
                r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Bye", "id": "b"}"#,
            ],
        );
        let report = load_pairs(&path, Strictness::Strict).unwrap();
        assert_eq!(report.pairs.len(), 2);
        assert_eq!(report.pairs[0].id, "7");
        assert_eq!(report.pairs[0].prompt[0].role, Role::User);
        assert_eq!(
            report.pairs[0].chosen, " 4",
            "generic responses keep whitespace"
        );
        assert_eq!(report.pairs[1].id, "b");
        assert_eq!(report.pairs[1].prompt[0].role, Role::System);
        assert_eq!(report.pairs[1].prompt[1].content, "Hi");
    }

    #[test]
    fn lenient_skips_each_malformed_kind() {
        let lines = [
            HH_LINE,
            "not json",
            "[1, 2]",
            r#"{"chosen": "a"}"#,
            r#"{"chosen": "a", "rejected": 3, "prompt": "p"}"#,
            r#"{"chosen": "a", "rejected": "b", "prompt": "p", "messages": []}"#,
            r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: a\n\nHuman: b", "rejected": "\n\nHuman: Hi\n\nAssistant: c"}"#,
            r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Yo\n\nAssistant: c"}"#,
            r#"{"messages": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"}"#,
            r#"{"prompt": "  ", "chosen": "a", "rejected": "b"}"#,
            r#"{"chosen": "\n\nHuman: Hi\n\nAssistant:  ", "rejected": "\n\nHuman: Hi\n\nAssistant: c"}"#,
            r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#,
            HH_LINE,
            r#"{"chosen": "a", "rejected": "b"}"#,
            "",
        ];
        let (_dir, path) = write_file("pairs.jsonl", &lines);
        let report = load_pairs(&path, Strictness::Lenient).unwrap();
        assert_eq!(report.pairs.len(), 1);
        let reasons: Vec<(usize, &str)> = report
            .skipped
            .iter()
            .map(|skipped| (skipped.line, skipped.reason.kind()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (2, "not_json"),
                (3, "not_an_object"),
                (4, "missing_field"),
                (5, "invalid_field"),
                (6, "conflicting_prompt"),
                (7, "not_hh_dialogue"),
                (8, "prompt_mismatch"),
                (9, "unknown_role"),
                (10, "empty_prompt"),
                (11, "empty_response"),
                (12, "identical_responses"),
                (13, "duplicate_id"),
                (14, "missing_field"),
            ]
        );
        assert_eq!(report.skipped_by_reason()["missing_field"], 2);
    }

    #[test]
    fn strict_names_line_and_reason() {
        let (_dir, path) = write_file("pairs.jsonl", &[HH_LINE, "", r#"{"chosen": "a"}"#]);
        let err = load_pairs(&path, Strictness::Strict).unwrap_err();
        match &err {
            DataError::Malformed { line, reason, .. } => {
                assert_eq!(*line, 3);
                assert_eq!(*reason, SkipReason::MissingField { field: "rejected" });
            }
            other => panic!("expected a malformed-line error, got {other:?}"),
        }
        assert!(err.to_string().contains("line 3: missing field `rejected`"));
    }

    #[test]
    fn empty_file_is_an_error() {
        let (_dir, path) = write_file("pairs.jsonl", &["", "  "]);
        let err = load_pairs(&path, Strictness::Lenient).unwrap_err();
        assert!(matches!(err, DataError::NoPairs { skipped: 0, .. }));
        assert!(err.to_string().contains("contains no preference pairs"));
    }

    #[test]
    fn all_lines_malformed_is_an_error() {
        let (_dir, path) = write_file("pairs.jsonl", &["x", "y"]);
        let err = load_pairs(&path, Strictness::Lenient).unwrap_err();
        assert!(matches!(err, DataError::NoPairs { skipped: 2, .. }));
    }

    #[test]
    fn reads_gzip_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.jsonl.gz");
        let mut encoder = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        writeln!(encoder, "{HH_LINE}").unwrap();
        encoder.finish().unwrap();
        let report = load_pairs(&path, Strictness::Strict).unwrap();
        assert_eq!(report.pairs[0].chosen, "Hello!");
    }

    #[test]
    fn missing_file_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_pairs(&dir.path().join("absent.jsonl"), Strictness::Lenient).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
    }

    #[test]
    fn loads_shipped_hh_rlhf_file() {
        // The published harmless-base test split: 1,986 lines, of which 4 have an empty final
        // response and 4 continue the dialogue inside a response.
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/hh-rlhf/harmless-base-pairs.jsonl.gz");
        if !path.exists() {
            eprintln!("skipping: {} is not present", path.display());
            return;
        }
        let report = load_pairs(&path, Strictness::Lenient).unwrap();
        assert_eq!(report.pairs.len() + report.skipped.len(), 1986);
        let counts = report.skipped_by_reason();
        assert_eq!(counts.get("empty_response"), Some(&4));
        assert_eq!(counts.get("prompt_mismatch"), Some(&4));
        assert_eq!(report.pairs.len(), 1978);
        assert!(report
            .pairs
            .iter()
            .all(|pair| pair.prompt.last().map(|m| m.role) == Some(Role::User)));
    }

    #[test]
    fn split_never_shares_a_prompt() {
        let pairs: Vec<PreferencePair> = (0..200)
            .map(|i| pair_with_prompt(&i.to_string(), &format!("prompt {}", i % 70)))
            .collect();
        let split = split_by_prompt(pairs, 0.2, 11).unwrap();
        let train_prompts: Vec<&str> = split
            .train
            .iter()
            .map(|p| p.prompt[0].content.as_str())
            .collect();
        for pair in &split.validation {
            assert!(!train_prompts.contains(&pair.prompt[0].content.as_str()));
        }
        assert_eq!(split.train.len() + split.validation.len(), 200);
        // Target 40; the last prompt taken adds at most 2 more.
        assert!((40..=42).contains(&split.validation.len()));
    }

    #[test]
    fn split_is_deterministic_and_order_free() {
        let pairs: Vec<PreferencePair> = (0..50)
            .map(|i| pair_with_prompt(&i.to_string(), &format!("prompt {i}")))
            .collect();
        let mut reversed = pairs.clone();
        reversed.reverse();
        let ids = |pairs: &[PreferencePair]| {
            let mut ids: Vec<String> = pairs.iter().map(|p| p.id.clone()).collect();
            ids.sort();
            ids
        };
        let first = split_by_prompt(pairs.clone(), 0.1, 3).unwrap();
        let again = split_by_prompt(pairs.clone(), 0.1, 3).unwrap();
        let from_reversed = split_by_prompt(reversed, 0.1, 3).unwrap();
        let other_seed = split_by_prompt(pairs, 0.1, 4).unwrap();
        assert_eq!(first.validation.len(), 5);
        assert_eq!(ids(&first.validation), ids(&again.validation));
        assert_eq!(ids(&first.validation), ids(&from_reversed.validation));
        assert_ne!(ids(&first.validation), ids(&other_seed.validation));
    }

    #[test]
    fn split_rejects_bad_fraction() {
        for value in [-0.1, 1.0, f64::NAN] {
            let err = split_by_prompt(vec![], value, 0).unwrap_err();
            assert!(matches!(err, DataError::InvalidFraction { .. }));
        }
    }

    #[test]
    fn split_with_zero_fraction_keeps_all_for_training() {
        let pairs = vec![pair_with_prompt("a", "p"), pair_with_prompt("b", "q")];
        let split = split_by_prompt(pairs, 0.0, 0).unwrap();
        assert_eq!(split.train.len(), 2);
        assert!(split.validation.is_empty());
    }
}
