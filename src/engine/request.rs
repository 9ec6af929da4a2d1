//! Requests the engine accepts and the events it sends back.

use std::sync::Arc;

use crate::doctor::Doctor;

use super::sampling::SamplingParams;

/// A doctor steering a request, with its weight.
#[derive(Clone, Debug)]
pub struct DoctorWeight {
    /// The doctor version the request started with; a later replacement does not affect it.
    pub doctor: Arc<Doctor>,
    /// β.
    pub beta: f32,
}

/// The steering of a request: α and the doctors with their β.
#[derive(Clone, Debug)]
pub struct Steering {
    /// α, the patient's weight.
    pub alpha: f32,
    /// The doctors, in request order.
    pub doctors: Vec<DoctorWeight>,
}

impl Default for Steering {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            doctors: Vec::new(),
        }
    }
}

impl Steering {
    /// Whether any doctor row must run.
    pub fn is_steered(&self) -> bool {
        !self.doctors.is_empty()
    }

    /// Reports whether the steered distribution can differ from the patient's: α ≠ 1, or a
    /// doctor has β ≠ 0. Otherwise the engine samples from the patient's own distribution, bit for bit.
    pub fn changes_distribution(&self) -> bool {
        self.alpha != 1.0 || self.doctors.iter().any(|d| d.beta != 0.0)
    }
}

impl GenerationRequest {
    /// Returns the smallest context window among the patient (`patient_context`) and the
    /// request's doctors that run on their own base.
    pub fn context_limit(&self, patient_context: usize) -> usize {
        self.steering
            .doctors
            .iter()
            .filter_map(|d| d.doctor.own_context_length())
            .fold(patient_context, usize::min)
    }
}

/// Whether the model's end-of-sequence tokens end generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EosPolicy {
    /// EOS and end-of-turn tokens stop (the default).
    #[default]
    Stop,
    /// Generate until `max_tokens` or a stop string, for fixed-length benchmarks.
    Ignore,
}

/// A validated generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Prompt token ids, templated and tokenized.
    pub prompt_ids: Vec<u32>,
    /// Sampling controls.
    pub sampling: SamplingParams,
    /// Maximum tokens generated per choice.
    pub max_tokens: usize,
    /// Stop strings; the text never contains them.
    pub stop_strings: Vec<String>,
    /// Extra stop token ids, added to the model's EOS and end-of-turn tokens.
    pub stop_token_ids: Vec<u32>,
    /// Whether EOS stops.
    pub eos: EosPolicy,
    /// Number of choices; they share the prompt's prefill.
    pub n: usize,
    /// Steering.
    pub steering: Steering,
}

/// The reason a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token, a stop token or a stop string.
    Stop,
    /// `max_tokens`, or the context window is full.
    Length,
    /// The server shut down before the choice finished.
    Abort,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// Log-probabilities of a generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the token under the distribution it was sampled from (steered,
    /// after bias and penalties, before temperature and truncation).
    pub logprob: f32,
    /// The most likely alternatives with their log-probabilities.
    pub top: Vec<(u32, f32)>,
    /// The token's log-probability under the patient alone.
    pub patient: f32,
    /// The token's log-probability under each doctor, in request order.
    pub doctors: Vec<f32>,
}

/// One generated token of one choice.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    /// The choice index.
    pub choice: usize,
    /// The token id.
    pub id: u32,
    /// New text released by this token: complete UTF-8, with anything that could still begin a
    /// stop string held back. Often empty.
    pub text: String,
    /// Present when the request asked for log-probabilities.
    pub logprobs: Option<TokenLogprobs>,
}

/// Steering measurements of one choice.
#[derive(Clone, Debug, PartialEq)]
pub struct SteeringSummary {
    /// `(doctor name, β)` in request order.
    pub doctors: Vec<(String, f32)>,
    /// α.
    pub alpha: f32,
    /// Measured tokens where the steered top token differs from the patient's.
    pub changed_tokens: usize,
    /// Generated tokens on which the statistics were measured (see
    /// [`crate::engine::core::EngineConfig::steering_stats_interval`]).
    pub measured_tokens: usize,
    /// Mean KL(steered ‖ patient) over the measured tokens, nats.
    pub mean_kl: f32,
}

/// The end of one choice.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceEnd {
    /// The choice index.
    pub choice: usize,
    /// The reason it ended.
    pub reason: FinishReason,
    /// Text still held back, released at the end (may be empty).
    pub text: String,
    /// Tokens generated by this choice, a final stop token included.
    pub completion_tokens: usize,
    /// The EOS, end-of-turn or stop token that ended the choice; it has no text.
    pub stop_token: Option<u32>,
    /// Present when the request was steered.
    pub steering: Option<SteeringSummary>,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (counted once for all choices).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
}

/// Messages from the engine to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A token was generated.
    Token(TokenEvent),
    /// A choice ended.
    Finished(ChoiceEnd),
    /// Every choice ended; nothing follows.
    Done(Usage),
    /// The request failed; nothing follows.
    Error(String),
}
