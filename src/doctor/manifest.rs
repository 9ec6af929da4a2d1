//! The `doctor.toml` manifest.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the manifest inside a doctor's folder.
pub const MANIFEST_FILE: &str = "doctor.toml";

/// Default steering strength when a manifest does not set one.
pub const DEFAULT_BETA: f32 = 0.5;

/// The contents of `doctor.toml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoctorManifest {
    /// The name requests use; must equal the folder name.
    pub name: String,
    /// One line on what the doctor prefers.
    #[serde(default)]
    pub description: String,
    /// The base model the adapter applies to.
    #[serde(default)]
    pub base: DoctorBaseSpec,
    /// Adapter weights, relative to the doctor's folder.
    #[serde(default = "default_adapter")]
    pub adapter: PathBuf,
    /// PEFT adapter configuration, relative to the doctor's folder.
    #[serde(default = "default_adapter_config")]
    pub adapter_config: PathBuf,
    /// β used when a request names the doctor without one.
    #[serde(default = "default_beta")]
    pub default_beta: f32,
    /// How the doctor was trained: data, commands, settings and final losses. Free-form.
    #[serde(default)]
    pub training: toml::Table,
}

/// The base model of a doctor.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum DoctorBaseSpec {
    /// The patient's own weights, written `base = "patient"`: the doctor costs only its adapter.
    #[default]
    #[serde(with = "patient_literal")]
    Patient,
    /// Another model sharing the patient's tokenizer: a `.gguf` file or a Hugging Face folder,
    /// relative to the doctor's folder.
    Path(PathBuf),
}

mod patient_literal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("patient")
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
        let value = String::deserialize(deserializer)?;
        if value == "patient" {
            Ok(())
        } else {
            Err(serde::de::Error::custom("not the literal `patient`"))
        }
    }
}

fn default_adapter() -> PathBuf {
    PathBuf::from("adapter.safetensors")
}

fn default_adapter_config() -> PathBuf {
    PathBuf::from("adapter_config.json")
}

fn default_beta() -> f32 {
    DEFAULT_BETA
}

impl DoctorManifest {
    /// Reads and parses `doctor.toml` in `dir`.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|err| format!("failed to read `{}`: {err}", path.display()))?;
        toml::from_str(&text).map_err(|err| format!("invalid `{}`: {err}", path.display()))
    }

    /// Writes `doctor.toml` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = toml::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(MANIFEST_FILE), text)
    }
}
