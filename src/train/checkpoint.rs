//! Training checkpoints: `checkpoints/step-NNNNNN/` inside the output folder, holding the
//! trainable variables, the optimizer moments and a JSON state with the step count and the
//! loss history.
//!
//! The order of training pairs is a pure function of the seed and the step (see
//! [`super::trainer`]), so the step count is the whole position of the sampler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::TrainError;

/// The folder under the output folder that contains checkpoints.
pub const CHECKPOINT_DIR: &str = "checkpoints";

const VARS_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// The loss and optimizer numbers of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// The step, from 1.
    pub step: usize,
    /// The pair trained on.
    pub pair_id: String,
    /// The TFPO loss.
    pub loss: f32,
    /// The SubTB part.
    pub subtb: f32,
    /// The value hinge before `λ`, when the responses diverge.
    pub value: Option<f32>,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The JSON part of a checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Steps completed.
    pub step: usize,
    /// Wall-clock seconds spent training so far, over all runs.
    pub wall_seconds: f64,
    /// Every step so far.
    pub history: Vec<StepLog>,
}

fn checkpoint_error(path: &Path, message: impl ToString) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINT_DIR).join(format!("step-{step:06}"))
}

/// Writes a checkpoint. The folder is written under a temporary name and renamed, so a crash
/// never leaves a half-written checkpoint that looks complete.
pub fn save(
    out: &Path,
    vars: &[Var],
    optimizer: HashMap<String, Tensor>,
    state: &CheckpointState,
) -> Result<PathBuf, TrainError> {
    let final_dir = step_dir(out, state.step);
    let tmp_dir = final_dir.with_extension("partial");
    std::fs::create_dir_all(&tmp_dir).map_err(|err| checkpoint_error(&tmp_dir, err))?;
    let named: HashMap<String, Tensor> = vars
        .iter()
        .enumerate()
        .map(|(index, var)| (format!("var.{index}"), var.as_tensor().clone()))
        .collect();
    let vars_path = tmp_dir.join(VARS_FILE);
    candle_core::safetensors::save(&named, &vars_path)
        .map_err(|err| checkpoint_error(&vars_path, err))?;
    let optimizer_path = tmp_dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::save(&optimizer, &optimizer_path)
        .map_err(|err| checkpoint_error(&optimizer_path, err))?;
    let state_path = tmp_dir.join(STATE_FILE);
    let json = serde_json::to_string(state).map_err(|err| checkpoint_error(&state_path, err))?;
    std::fs::write(&state_path, json).map_err(|err| checkpoint_error(&state_path, err))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|err| checkpoint_error(&final_dir, err))?;
    }
    std::fs::rename(&tmp_dir, &final_dir).map_err(|err| checkpoint_error(&final_dir, err))?;
    Ok(final_dir)
}

/// Returns the folder of the checkpoint with the highest step under `out`, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out.join(CHECKPOINT_DIR)).ok()?;
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, entry.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, path)| path)
}

/// A checkpoint read back.
pub struct LoadedCheckpoint {
    /// The JSON state.
    pub state: CheckpointState,
    /// The optimizer moments.
    pub optimizer: HashMap<String, Tensor>,
}

/// Loads a checkpoint and sets `vars` from it. Fails when the variables differ in number or
/// shape, which means the checkpoint comes from other settings.
pub fn load(dir: &Path, vars: &[Var], device: &Device) -> Result<LoadedCheckpoint, TrainError> {
    let vars_path = dir.join(VARS_FILE);
    let mut saved = candle_core::safetensors::load(&vars_path, device)
        .map_err(|err| checkpoint_error(&vars_path, err))?;
    if saved.len() != vars.len() {
        return Err(TrainError::CheckpointMismatch {
            path: vars_path,
            message: format!(
                "it holds {} variables but the current settings have {}. Use the same \
                 --lora-rank, --lora-layers and model as the run that wrote it, or a new --out",
                saved.len(),
                vars.len()
            ),
        });
    }
    for (index, var) in vars.iter().enumerate() {
        let name = format!("var.{index}");
        let tensor = saved
            .remove(&name)
            .ok_or_else(|| TrainError::MissingTensor {
                name: name.clone(),
                path: vars_path.clone(),
            })?;
        if tensor.dims() != var.dims() {
            return Err(TrainError::Shape {
                input: format!("checkpoint variable `{name}`"),
                expected: format!("{:?}", var.dims()),
                found: tensor.dims().to_vec(),
            });
        }
        var.set(&tensor)?;
    }
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let optimizer = candle_core::safetensors::load(&optimizer_path, device)
        .map_err(|err| checkpoint_error(&optimizer_path, err))?;
    let state_path = dir.join(STATE_FILE);
    let json =
        std::fs::read_to_string(&state_path).map_err(|err| checkpoint_error(&state_path, err))?;
    let state: CheckpointState =
        serde_json::from_str(&json).map_err(|err| checkpoint_error(&state_path, err))?;
    Ok(LoadedCheckpoint { state, optimizer })
}
