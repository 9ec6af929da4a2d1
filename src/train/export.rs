//! Writing a trained doctor's folder: `doctor.toml`, the adapter in PEFT's layout, the value
//! head, the loss history as CSV and its plot.

use std::path::Path;

use crate::doctor::{DoctorBaseSpec, DoctorManifest};
use crate::model::lora::AdapterConfig;
use crate::model::ModelConfig;

use super::plot::{plot_losses, write_history_csv};
use super::trainer::TrainedDoctor;
use super::value_head::ValueHead;
use super::TrainError;

/// File names inside a doctor's folder.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// The PEFT configuration.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The loss plot.
pub const LOSS_PLOT_FILE: &str = "loss.png";
/// The loss history.
pub const LOSS_CSV_FILE: &str = "losses.csv";

/// The manifest fields of a doctor other than its weight files.
pub struct DoctorDescription {
    /// The doctor's name; the folder's name.
    pub name: String,
    /// One line on what it prefers.
    pub description: String,
    /// The base.
    pub base: DoctorBaseSpec,
    /// β used when a request names the doctor without one.
    pub default_beta: f32,
    /// The `[training]` provenance table.
    pub training: toml::Table,
}

fn io_error(path: &Path, err: impl ToString) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        message: err.to_string(),
    }
}

/// Writes every file of the doctor's folder `dir`, creating it if needed.
pub fn write_doctor(
    dir: &Path,
    doctor: &TrainedDoctor,
    adapter_config: &AdapterConfig,
    model: &ModelConfig,
    description: DoctorDescription,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|err| io_error(dir, err))?;
    let tensors = doctor.adapter.to_peft_tensors(model)?;
    let adapter_path = dir.join(ADAPTER_FILE);
    candle_core::safetensors::save(&tensors, &adapter_path)
        .map_err(|err| io_error(&adapter_path, err))?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let json =
        serde_json::to_string_pretty(adapter_config).map_err(|err| io_error(&config_path, err))?;
    std::fs::write(&config_path, json).map_err(|err| io_error(&config_path, err))?;
    doctor.head.save(&dir.join(ValueHead::FILE_NAME))?;
    write_history_csv(&doctor.history, &dir.join(LOSS_CSV_FILE))?;
    plot_losses(&doctor.history, &dir.join(LOSS_PLOT_FILE))?;

    let manifest = DoctorManifest {
        name: description.name,
        description: description.description,
        base: description.base,
        adapter: ADAPTER_FILE.into(),
        adapter_config: ADAPTER_CONFIG_FILE.into(),
        default_beta: description.default_beta,
        training: description.training,
    };
    manifest.write(dir).map_err(|err| io_error(dir, err))
}
