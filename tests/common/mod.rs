//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The real default patient, from `LLMDOCTOR_MODEL` or the model cache. `None` (with a printed
/// note) when it is not installed; CI fetches it before the tests run.
pub fn real_model_path() -> Option<PathBuf> {
    let path = match std::env::var_os("LLMDOCTOR_MODEL") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = match std::env::var_os("LLMDOCTOR_HOME") {
                Some(home) => PathBuf::from(home),
                None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/llmdoctor"),
            };
            home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipped: real model not found at {} (run `llmdoctor fetch-model`)",
            path.display()
        );
        None
    }
}

/// A file under the shared reference folder beside the repository.
pub fn reference_file(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference")
        .join(name);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipped: reference file {} not found", path.display());
        None
    }
}
