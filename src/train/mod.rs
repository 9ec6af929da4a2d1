//! Preference data, stage-1 token rewards and TFPO training of doctors.
//!
//! - [`data`]: preference pairs from HH-RLHF dialogues or generic JSONL, and a split into
//!   training and validation sets that never puts one prompt in both.
//! - [`rewards`]: token rewards from the patient's positive and negative faces, and the JSONL
//!   record that stores them.
//! - [`loss`]: the subtrajectory-balance and value-discrimination losses on candle tensors.
//! - [`value_head`]: the MLP that predicts `log V` from the doctor's last hidden state.
//! - [`faces`]: the positive and negative system instructions of a preference dimension.
//! - [`scoring`] and [`stage1`]: stage 1 on the patient, and the `rewards` job.
//! - [`reward_file`]: the JSONL reward file, appended to and resumed after a crash.
//! - [`selection`]: which pairs of a file a command uses (split by prompt, limit).
//!
//! [`data`], [`rewards`], [`loss`] and [`value_head`] run no model: callers pass in
//! log-probabilities and hidden states.

pub mod checkpoint;
pub mod data;
pub mod export;
pub mod faces;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod reward_file;
pub mod rewards;
pub mod scoring;
pub mod selection;
pub mod stage1;
pub mod tfpo;
pub mod trainer;
pub mod value_head;

use std::path::PathBuf;

pub use data::{
    load_pairs, split_by_prompt, DataError, LoadReport, PairSplit, PreferencePair, PromptMessage,
    Role, SkipReason, SkippedLine, Strictness,
};
pub use loss::{
    divergence_point, pair_tfpo_loss, subtb_brute_force, subtb_closed_form, tfpo_loss, value_hinge,
    LossParams, Trajectory,
};
pub use rewards::{
    cumulative_log_q, nonzero_fraction, token_rewards, token_scores, ResponseSign, RewardParams,
    RewardRecord, ScoredResponse,
};
pub use value_head::{ValueHead, ValueHeadDims};

/// Errors raised by the reward, loss and value-head code. Data loading has its own
/// [`DataError`].
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Two per-token sequences that must align have different lengths.
    #[error("{input}: expected {expected} values, found {found}")]
    LengthMismatch {
        /// The misaligned sequence, for example `negative-face log-probs`.
        input: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        found: usize,
    },
    /// A response with no tokens reached a computation that needs at least one.
    #[error("{computation} needs a response of at least one token")]
    EmptyResponse {
        /// The computation, for example `subtrajectory balance`.
        computation: &'static str,
    },
    /// A log-probability is NaN or infinite.
    #[error("{input} at token {index} is not finite ({value})")]
    NonFinite {
        /// The input, for example `positive-face log-probs`.
        input: &'static str,
        /// The token position.
        index: usize,
        /// The value found.
        value: f32,
    },
    /// The loss of a training step is NaN or infinite.
    #[error(
        "the TFPO loss at step {step} is not finite ({value}); lower --lr or check the reward file"
    )]
    NonFiniteLoss {
        /// The step, from 1.
        step: usize,
        /// The loss.
        value: f32,
    },
    /// A parameter is outside its valid range.
    #[error("invalid `{name}` = {value}: {expected}")]
    InvalidParam {
        /// The parameter name.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The valid range, for example `must be positive`.
        expected: &'static str,
    },
    /// A tensor has a shape the function does not accept.
    #[error("{input} has shape {found:?}, expected {expected}")]
    Shape {
        /// The argument or tensor name.
        input: String,
        /// The accepted shape, in words, for example `(positions, 576)`.
        expected: String,
        /// The shape received.
        found: Vec<usize>,
    },
    /// A required tensor is absent from a checkpoint.
    #[error("missing tensor `{name}` in `{}`", path.display())]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The checkpoint file.
        path: PathBuf,
    },
    /// A checkpoint could not be read or written.
    #[error("failed to access `{}`: {message}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// The reader's or writer's message.
        message: String,
    },
    /// A checkpoint was read but was trained with other settings.
    #[error("the checkpoint `{}` does not match this run: {message}", path.display())]
    CheckpointMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The difference, and the fix.
        message: String,
    },
    /// A stored reward record is not valid JSON or does not match the record format.
    #[error("invalid reward record: {message}")]
    InvalidRecord {
        /// The problem with the record.
        message: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The doctor's forward pass failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}
