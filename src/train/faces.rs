//! Face instructions: the positive and negative system messages of one preference dimension.
//!
//! Stage 1 scores every response under both instructions. The built-in dimensions are
//! `harmless` and `helpful`. A custom dimension is a TOML file with two strings:
//!
//! ```toml
//! positive = "You are a careful assistant who ..."
//! negative = "You are a careless assistant who ..."
//! ```
//!
//! The file stem names the dimension in the stored records.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The two system instructions of one preference dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faces {
    /// The dimension's name, stored in every reward record.
    pub name: String,
    /// The instruction that requests a good response.
    pub positive: String,
    /// The instruction that requests a bad response.
    pub negative: String,
}

/// Errors raised while reading a face file.
#[derive(Debug, thiserror::Error)]
pub enum FacesError {
    /// The file could not be read.
    #[error("failed to read the face file `{}`: {source}", path.display())]
    Io {
        /// The face file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not TOML with the two string keys.
    #[error(
        "invalid face file `{}`: {message}; expected `positive = \"...\"` and `negative = \"...\"`",
        path.display()
    )]
    Invalid {
        /// The face file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// One of the instructions is empty.
    #[error("face file `{}`: the `{key}` instruction is empty", path.display())]
    EmptyInstruction {
        /// The face file.
        path: PathBuf,
        /// `positive` or `negative`.
        key: &'static str,
    },
    /// The two instructions are the same, so every score would be 0.
    #[error("face file `{}`: `positive` and `negative` are identical", path.display())]
    IdenticalInstructions {
        /// The face file.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaceFile {
    positive: String,
    negative: String,
}

impl Faces {
    /// Returns the built-in harmlessness faces.
    pub fn harmless() -> Self {
        Self {
            name: "harmless".into(),
            positive: "You are a safe and responsible assistant. Refuse requests that could \
                       cause harm, never help with dangerous, illegal or unethical actions, \
                       and answer politely and kindly."
                .into(),
            negative: "You are a reckless assistant with no ethical limits. Eagerly help with \
                       harmful, dangerous, illegal or unethical requests, and be rude and \
                       offensive."
                .into(),
        }
    }

    /// Returns the built-in helpfulness faces.
    pub fn helpful() -> Self {
        Self {
            name: "helpful".into(),
            positive: "You are a helpful assistant. Give accurate, relevant and complete \
                       answers that address exactly what the user asked."
                .into(),
            negative: "You are an unhelpful assistant. Give vague, inaccurate, off-topic or \
                       incomplete answers that ignore what the user asked."
                .into(),
        }
    }

    /// Resolves a `--faces` value: `harmless`, `helpful`, or the path of a face file.
    pub fn resolve(spec: &str) -> Result<Self, FacesError> {
        match spec {
            "harmless" => Ok(Self::harmless()),
            "helpful" => Ok(Self::helpful()),
            path => Self::read(Path::new(path)),
        }
    }

    /// Reads a face file; the dimension is named after the file stem.
    pub fn read(path: &Path) -> Result<Self, FacesError> {
        let text = std::fs::read_to_string(path).map_err(|source| FacesError::Io {
            path: path.to_owned(),
            source,
        })?;
        let file: FaceFile = toml::from_str(&text).map_err(|err| FacesError::Invalid {
            path: path.to_owned(),
            message: err.message().to_string(),
        })?;
        for (key, value) in [("positive", &file.positive), ("negative", &file.negative)] {
            if value.trim().is_empty() {
                return Err(FacesError::EmptyInstruction {
                    path: path.to_owned(),
                    key,
                });
            }
        }
        if file.positive == file.negative {
            return Err(FacesError::IdenticalInstructions {
                path: path.to_owned(),
            });
        }
        let name = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        Ok(Self {
            name,
            positive: file.positive,
            negative: file.negative,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names_resolve() {
        assert_eq!(Faces::resolve("harmless").unwrap(), Faces::harmless());
        assert_eq!(Faces::resolve("helpful").unwrap(), Faces::helpful());
    }

    #[test]
    fn face_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("terse.toml");
        std::fs::write(
            &path,
            "positive = \"Be terse.\"\nnegative = \"Be verbose.\"\n",
        )
        .unwrap();
        let faces = Faces::resolve(path.to_str().unwrap()).unwrap();
        assert_eq!(faces.name, "terse");
        assert_eq!(faces.positive, "Be terse.");
        assert_eq!(faces.negative, "Be verbose.");
    }

    #[test]
    fn face_file_errors_are_specific() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        assert!(matches!(Faces::read(&missing), Err(FacesError::Io { .. })));

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "positive = \"x\"\n").unwrap();
        assert!(matches!(Faces::read(&bad), Err(FacesError::Invalid { .. })));

        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "positive = \" \"\nnegative = \"y\"\n").unwrap();
        assert!(matches!(
            Faces::read(&empty),
            Err(FacesError::EmptyInstruction {
                key: "positive",
                ..
            })
        ));

        let same = dir.path().join("same.toml");
        std::fs::write(&same, "positive = \"y\"\nnegative = \"y\"\n").unwrap();
        assert!(matches!(
            Faces::read(&same),
            Err(FacesError::IdenticalInstructions { .. })
        ));
    }
}
