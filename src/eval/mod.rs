//! Evaluation of a doctor on preference pairs.
//!
//! - [`preference`]: how often a score ranks the chosen response above the rejected one: the
//!   doctor's implicit reward `Σ_t [log π_doctor(y_t) − log π_patient(y_t)]`, and the
//!   patient-only baselines (total and per-token log-likelihood).
//! - [`steering`]: what steering at a given β does to sampling through the engine: mean
//!   per-token KL(steered ‖ patient), how often the top token changes, and distinct-n of the
//!   sampled responses with and without the doctor.

pub mod preference;
pub mod steering;

/// Errors raised while evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Templating, tokenizing or the forward pass failed.
    #[error(transparent)]
    Scoring(#[from] crate::train::scoring::ScoringError),
    /// The engine rejected a request or failed while generating.
    #[error("steered sampling failed: {message}")]
    Generation {
        /// The engine's message.
        message: String,
    },
    /// The sampling parameters are invalid.
    #[error(transparent)]
    Sampling(#[from] crate::engine::sampling::SamplingError),
    /// No pair could be evaluated.
    #[error("no preference pairs to evaluate")]
    NoPairs,
}
