//! Reading and appending the JSONL file of reward records, with resumption after a crash.
//!
//! Every record is written as one line and flushed, so an interrupted run leaves at most one
//! partial line at the end of the file. [`open_for_append`] drops such a line before appending,
//! and [`read_records`] ignores it with a warning. A malformed line anywhere else is an error,
//! because it means the file was edited or is not a reward file.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::rewards::RewardRecord;

/// Errors raised while reading or writing a reward file.
#[derive(Debug, thiserror::Error)]
pub enum RewardFileError {
    /// The file could not be read or written.
    #[error("failed to access the reward file `{}`: {source}", path.display())]
    Io {
        /// The reward file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A complete line is not a valid record.
    #[error(
        "`{}` line {line} is not a valid reward record: {message}; \
         remove the line or write to a new file",
        path.display()
    )]
    InvalidLine {
        /// The reward file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// The parser's message.
        message: String,
    },
}

/// The records found in a reward file.
#[derive(Debug, Default)]
pub struct RewardFileContents {
    /// The complete records, in file order.
    pub records: Vec<RewardRecord>,
    /// Whether the file ended in a partial line, left by an interrupted run.
    pub partial_line_dropped: bool,
    /// The length in bytes of the complete lines.
    valid_len: u64,
}

impl RewardFileContents {
    /// Returns the pair ids of the records.
    pub fn pair_ids(&self) -> HashSet<String> {
        self.records.iter().map(|r| r.pair_id.clone()).collect()
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<RewardFileContents, RewardFileError> {
    let mut contents = RewardFileContents::default();
    let mut offset = 0usize;
    for (index, chunk) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let complete = chunk.last() == Some(&b'\n');
        if !complete {
            contents.partial_line_dropped = true;
            break;
        }
        offset += chunk.len();
        let text = String::from_utf8_lossy(chunk);
        if text.trim().is_empty() {
            continue;
        }
        let record = RewardRecord::from_json_line(text.trim()).map_err(|err| {
            RewardFileError::InvalidLine {
                path: path.to_owned(),
                line: index + 1,
                message: err.to_string(),
            }
        })?;
        contents.records.push(record);
    }
    contents.valid_len = offset as u64;
    Ok(contents)
}

/// Reads every complete record of a reward file. A partial last line is skipped with a warning.
pub fn read_records(path: &Path) -> Result<RewardFileContents, RewardFileError> {
    let io_error = |source| RewardFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(io_error)?;
    let contents = parse(path, &bytes)?;
    if contents.partial_line_dropped {
        tracing::warn!(
            file = %path.display(),
            "ignoring a partial last line, left by an interrupted `rewards` run"
        );
    }
    Ok(contents)
}

/// An open reward file that records are appended to.
pub struct RewardWriter {
    path: PathBuf,
    file: File,
}

impl RewardWriter {
    /// Appends one record as a line and flushes it, so a crash cannot leave it half written
    /// except as the last line.
    pub fn append(&mut self, record: &RewardRecord) -> Result<(), RewardFileError> {
        let line = record
            .to_json_line()
            .map_err(|err| RewardFileError::InvalidLine {
                path: self.path.clone(),
                line: 0,
                message: err.to_string(),
            })?;
        let io_error = |source| RewardFileError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io_error)?;
        self.file.flush().map_err(io_error)
    }
}

/// Opens a reward file for appending, creating it if needed, and returns the records already
/// in it. A partial last line is cut off so that new records start on a line of their own.
pub fn open_for_append(path: &Path) -> Result<(RewardWriter, RewardFileContents), RewardFileError> {
    let io_error = |source| RewardFileError::Io {
        path: path.to_owned(),
        source,
    };
    let contents = if path.exists() {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .map_err(io_error)?;
        parse(path, &bytes)?
    } else {
        RewardFileContents::default()
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error)?;
    if contents.partial_line_dropped {
        tracing::warn!(
            file = %path.display(),
            "dropping a partial last line, left by an interrupted run"
        );
        file.set_len(contents.valid_len).map_err(io_error)?;
    }
    Ok((
        RewardWriter {
            path: path.to_owned(),
            file,
        },
        contents,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rewards::ScoredResponse;

    fn record(id: &str) -> RewardRecord {
        RewardRecord {
            pair_id: id.into(),
            prompt_ids: vec![1, 2],
            chosen: ScoredResponse {
                token_ids: vec![3],
                scores: vec![0.5],
            },
            rejected: ScoredResponse {
                token_ids: vec![4, 5],
                scores: vec![0.2, 0.9],
            },
            faces: "harmless".into(),
        }
    }

    #[test]
    fn partial_line_is_dropped_before_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let full = record("a").to_json_line().unwrap();
        let partial = &record("b").to_json_line().unwrap()[..20];
        std::fs::write(&path, format!("{full}\n{partial}")).unwrap();

        let (mut writer, contents) = open_for_append(&path).unwrap();
        assert!(contents.partial_line_dropped);
        assert_eq!(contents.pair_ids(), HashSet::from(["a".to_string()]));
        writer.append(&record("c")).unwrap();

        let reread = read_records(&path).unwrap();
        assert!(!reread.partial_line_dropped);
        let ids: Vec<_> = reread.records.iter().map(|r| r.pair_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }

    #[test]
    fn malformed_complete_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let full = record("a").to_json_line().unwrap();
        std::fs::write(&path, format!("not json\n{full}\n")).unwrap();
        let err = read_records(&path).unwrap_err();
        assert!(matches!(err, RewardFileError::InvalidLine { line: 1, .. }));
    }
}
