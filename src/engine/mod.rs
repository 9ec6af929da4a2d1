//! The engine: sequences, scheduling, sampling and steering.
//!
//! - [`sampling`]: validated per-request sampling parameters, the token history that penalties
//!   read, and the seeded per-request sampler.
//! - [`steering`]: the weighted combination of the patient's and the doctors' log-probabilities
//!   that steers each token, with the log-space helpers it needs.

pub mod sampling;
pub mod steering;
