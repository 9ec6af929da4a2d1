//! The registry of loaded doctors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::loader::{load_model, LoadError, LoadedModel};
use crate::model::{LoadOptions, LoraAdapter, ModelError};

use super::manifest::{DoctorBaseSpec, DoctorManifest, MANIFEST_FILE};

/// Errors from loading or looking up doctors. Each names the doctor or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// The name is not a plain folder name.
    #[error("invalid doctor name `{name}`: use letters, digits, `-`, `_` or `.`, and no path separators")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// No loaded doctor has this name.
    #[error(
        "doctor `{name}` is not loaded; loaded doctors: {}{}",
        list_or_none(.loaded),
        beta_hint(.name)
    )]
    NotFound {
        /// The requested name.
        name: String,
        /// Names of the loaded doctors.
        loaded: Vec<String>,
    },
    /// The doctors directory has no folder of this name.
    #[error(
        "doctor folder `{path}` does not exist; put the doctor's files in a folder of that name"
    )]
    FolderNotFound {
        /// The folder.
        path: PathBuf,
    },
    /// The folder resolves outside the doctors directory, or the directory itself is missing.
    #[error("doctor folder `{path}` {reason}")]
    BadFolder {
        /// The folder.
        path: PathBuf,
        /// The reason it cannot be used.
        reason: String,
    },
    /// `doctor.toml` is missing or invalid.
    #[error("{message}")]
    Manifest {
        /// The parser's or reader's message, naming the file.
        message: String,
    },
    /// The manifest's name differs from its folder.
    #[error("`{folder}/{MANIFEST_FILE}` names the doctor `{manifest_name}`; the name must equal the folder name")]
    NameMismatch {
        /// The folder name.
        folder: String,
        /// The name in the manifest.
        manifest_name: String,
    },
    /// The doctor's base model uses another vocabulary than the patient.
    #[error("doctor `{doctor}` cannot steer this patient: {detail}")]
    VocabularyMismatch {
        /// The doctor.
        doctor: String,
        /// The first difference found.
        detail: String,
    },
    /// The adapter does not load or does not fit its base. The message includes the cause,
    /// which is therefore not exposed as the error's source: reports that print the source
    /// chain would repeat it.
    #[error("doctor `{doctor}`: {cause}")]
    Adapter {
        /// The doctor.
        doctor: String,
        /// The cause.
        cause: ModelError,
    },
    /// The doctor's own base model does not load. Its message includes the cause, as for
    /// [`DoctorError::Adapter`].
    #[error("doctor `{doctor}`: failed to load its base model: {cause}")]
    Base {
        /// The doctor.
        doctor: String,
        /// The cause.
        cause: LoadError,
    },
}

/// Returns a hint for a name written as the CLI's `NAME:BETA`, which the API takes as an
/// object, or an empty string.
fn beta_hint(name: &str) -> String {
    match name.split_once(':') {
        Some((doctor, beta)) if beta.parse::<f32>().is_ok() => {
            format!("; to set β in a request, send {{\"name\": \"{doctor}\", \"beta\": {beta}}}")
        }
        _ => String::new(),
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// The model a doctor's adapter applies to.
#[derive(Clone)]
pub enum DoctorBase {
    /// The patient's weights: the doctor's rows share the patient's forward.
    Patient,
    /// Another model with the same vocabulary: its rows run in their own forward.
    Separate(LoadedModel),
}

/// A loaded doctor. Immutable; a replacement is a new `Doctor` with a higher version.
pub struct Doctor {
    /// The manifest as read.
    pub manifest: DoctorManifest,
    /// The base its adapter applies to.
    pub base: DoctorBase,
    /// The adapter.
    pub adapter: LoraAdapter,
    /// Increases with every load or replacement within this process.
    pub version: u64,
    /// The folder it was loaded from.
    pub dir: PathBuf,
}

impl Doctor {
    /// Returns the doctor's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// β when a request does not set one.
    pub fn default_beta(&self) -> f32 {
        self.manifest.default_beta
    }

    /// Returns the context length of the doctor's base, or `None` when it is the patient.
    pub fn own_context_length(&self) -> Option<usize> {
        match &self.base {
            DoctorBase::Patient => None,
            DoctorBase::Separate(base) => Some(base.model.config().max_position_embeddings),
        }
    }
}

impl std::fmt::Debug for Doctor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doctor")
            .field("name", &self.manifest.name)
            .field("version", &self.version)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The doctors loaded for one patient. Shared by the API (lookups, admin routes) and the
/// engine (through the `Arc<Doctor>` each request carries).
pub struct DoctorRegistry {
    dir: PathBuf,
    patient: LoadedModel,
    load_options: LoadOptions,
    doctors: RwLock<BTreeMap<String, Arc<Doctor>>>,
    bases: Mutex<HashMap<PathBuf, LoadedModel>>,
    next_version: AtomicU64,
}

impl DoctorRegistry {
    /// Creates an empty registry for doctors under `dir`.
    pub fn new(dir: PathBuf, patient: LoadedModel, load_options: LoadOptions) -> Self {
        Self {
            dir,
            patient,
            load_options,
            doctors: RwLock::new(BTreeMap::new()),
            bases: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(1),
        }
    }

    /// Returns the doctors directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads every folder of the doctors directory that contains a `doctor.toml`. A doctor that
    /// fails to load is skipped; the errors are returned with the folder names.
    pub fn load_all(&self) -> Vec<(String, DoctorError)> {
        let mut failures = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return failures;
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().join(MANIFEST_FILE).is_file())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            if let Err(err) = self.load(&name) {
                failures.push((name, err));
            }
        }
        failures
    }

    /// Loads the doctor in folder `name` of the doctors directory, replacing a loaded doctor of
    /// that name. On failure the registry is unchanged.
    pub fn load(&self, name: &str) -> Result<Arc<Doctor>, DoctorError> {
        let dir = self.resolve_folder(name)?;
        let manifest =
            DoctorManifest::read(&dir).map_err(|message| DoctorError::Manifest { message })?;
        if manifest.name != name {
            return Err(DoctorError::NameMismatch {
                folder: name.to_string(),
                manifest_name: manifest.name,
            });
        }
        let base = match &manifest.base {
            DoctorBaseSpec::Patient => DoctorBase::Patient,
            DoctorBaseSpec::Path(path) => {
                DoctorBase::Separate(self.load_base(name, &dir.join(path))?)
            }
        };
        let config = match &base {
            DoctorBase::Patient => self.patient.model.config().clone(),
            DoctorBase::Separate(loaded) => loaded.model.config().clone(),
        };
        let adapter = LoraAdapter::load(
            &dir.join(&manifest.adapter),
            &dir.join(&manifest.adapter_config),
            &config,
            self.patient.model.device(),
        )
        .map_err(|cause| DoctorError::Adapter {
            doctor: name.to_string(),
            cause,
        })?;
        let doctor = Arc::new(Doctor {
            manifest,
            base,
            adapter,
            version: self.next_version.fetch_add(1, Ordering::Relaxed),
            dir,
        });
        let mut doctors = self.doctors.write().unwrap_or_else(|e| e.into_inner());
        doctors.insert(name.to_string(), doctor.clone());
        tracing::info!(doctor = name, version = doctor.version, "doctor loaded");
        Ok(doctor)
    }

    /// Removes a doctor. Requests that already hold it finish with it.
    pub fn unload(&self, name: &str) -> Result<Arc<Doctor>, DoctorError> {
        let mut doctors = self.doctors.write().unwrap_or_else(|e| e.into_inner());
        match doctors.remove(name) {
            Some(doctor) => {
                tracing::info!(doctor = name, version = doctor.version, "doctor unloaded");
                Ok(doctor)
            }
            None => Err(DoctorError::NotFound {
                name: name.to_string(),
                loaded: doctors.keys().cloned().collect(),
            }),
        }
    }

    /// The current version of a doctor.
    pub fn get(&self, name: &str) -> Result<Arc<Doctor>, DoctorError> {
        let doctors = self.doctors.read().unwrap_or_else(|e| e.into_inner());
        doctors
            .get(name)
            .cloned()
            .ok_or_else(|| DoctorError::NotFound {
                name: name.to_string(),
                loaded: doctors.keys().cloned().collect(),
            })
    }

    /// Returns every loaded doctor, ordered by name.
    pub fn list(&self) -> Vec<Arc<Doctor>> {
        let doctors = self.doctors.read().unwrap_or_else(|e| e.into_inner());
        doctors.values().cloned().collect()
    }

    /// Checks that `name` is a plain folder name and that its folder, after resolving
    /// symlinks, lies inside the doctors directory.
    fn resolve_folder(&self, name: &str) -> Result<PathBuf, DoctorError> {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && matches!(
                Path::new(name).components().collect::<Vec<_>>().as_slice(),
                [Component::Normal(_)]
            );
        if !plain {
            return Err(DoctorError::InvalidName {
                name: name.to_string(),
            });
        }
        let bad = |path: &Path, reason: &str| DoctorError::BadFolder {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let joined = self.dir.join(name);
        let root = self
            .dir
            .canonicalize()
            .map_err(|_| bad(&self.dir, "does not exist"))?;
        let folder = joined
            .canonicalize()
            .map_err(|_| DoctorError::FolderNotFound {
                path: joined.clone(),
            })?;
        if !folder.starts_with(&root) || !folder.is_dir() {
            return Err(bad(&joined, "is not a folder inside the doctors directory"));
        }
        Ok(folder)
    }

    fn load_base(&self, doctor: &str, path: &Path) -> Result<LoadedModel, DoctorError> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let mut bases = self.bases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(loaded) = bases.get(&key) {
            return Ok(loaded.clone());
        }
        let loaded =
            load_model(path, &self.load_options, self.patient.model.device()).map_err(|cause| {
                DoctorError::Base {
                    doctor: doctor.to_string(),
                    cause,
                }
            })?;
        self.check_vocabulary(doctor, &loaded)?;
        bases.insert(key, loaded.clone());
        Ok(loaded)
    }

    /// Compares token tables entry by entry: two vocabularies of the same size can still map
    /// ids to different strings, and steering would then mix unrelated tokens.
    fn check_vocabulary(&self, doctor: &str, base: &LoadedModel) -> Result<(), DoctorError> {
        let mismatch = |detail: String| DoctorError::VocabularyMismatch {
            doctor: doctor.to_string(),
            detail,
        };
        let patient = self.patient.tokenizer.token_table();
        let other = base.tokenizer.token_table();
        if patient.len() != other.len() {
            return Err(mismatch(format!(
                "its base has {} tokens, the patient {}",
                other.len(),
                patient.len()
            )));
        }
        if let Some(id) = (0..patient.len()).find(|&i| patient[i] != other[i]) {
            return Err(mismatch(format!(
                "token {id} is `{}` in its base and `{}` in the patient",
                other[id], patient[id]
            )));
        }
        if base.model.config().vocab_size != self.patient.model.config().vocab_size {
            return Err(mismatch(format!(
                "its base has {} output logits, the patient {}",
                base.model.config().vocab_size,
                self.patient.model.config().vocab_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_found(name: &str) -> String {
        DoctorError::NotFound {
            name: name.into(),
            loaded: vec!["harmless".into()],
        }
        .to_string()
    }

    #[test]
    fn not_found_hints_at_the_beta_object() {
        let message = not_found("harmless:0.8");
        assert!(
            message.contains(r#"{"name": "harmless", "beta": 0.8}"#),
            "{message}"
        );
    }

    #[test]
    fn not_found_without_beta_has_no_hint() {
        for name in ["harmles", "a:b"] {
            let message = not_found(name);
            assert!(!message.contains("beta"), "{message}");
        }
    }
}
