//! Doctors: manifests, loading, and the registry that loads, replaces and unloads them while
//! the server runs.
//!
//! A doctor lives in `<doctors dir>/<name>/`:
//! - `doctor.toml`: the [`DoctorManifest`];
//! - `adapter.safetensors` and `adapter_config.json`: a LoRA adapter in PEFT's layout;
//! - optionally `value_head.safetensors`, used in training only and ignored here.
//!
//! Sequences hold an `Arc<Doctor>`, so replacing or unloading a doctor never disturbs the
//! requests that started with the old version.

mod manifest;
mod registry;

pub use manifest::{DoctorBaseSpec, DoctorManifest, MANIFEST_FILE};
pub use registry::{Doctor, DoctorBase, DoctorError, DoctorRegistry};
