//! The engine: it owns the models and runs the step loop on its own thread.
//!
//! - [`handle`]: the cloneable handle that submits requests and reads live counters.
//! - [`core`]: the engine thread: plan, build rows, forward, steer, sample, emit.
//! - [`scheduler`]: continuous batching with chunked prefill, KV accounting and preemption.
//! - [`request`]: validated requests and the events sent back.
//! - [`sampling`]: validated per-request sampling parameters, the token history that penalties
//!   read, and the seeded per-request sampler.
//! - [`steering`]: the weighted combination of the patient's and the doctors' log-probabilities
//!   that steers each token, with the log-space helpers it needs.

pub mod core;
pub mod handle;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod steering;
mod step_logits;
