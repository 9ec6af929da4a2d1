//! One-prompt generation through the engine, as `llmdoctor generate` runs it.

use std::sync::Arc;

use serde::Serialize;

use crate::doctor::{DoctorError, DoctorRegistry};
use crate::engine::handle::{EngineError, EngineHandle};
use crate::engine::request::{
    DoctorWeight, EosPolicy, Event, FinishReason, GenerationRequest, Steering,
};
use crate::engine::sampling::{RawSamplingParams, SamplingError, SamplingParams};
use crate::tokenizer::{ChatMessage, GenerationPrompt, SpecialTokens, Tokenizer, TokenizerError};

/// A doctor named on the command line, with an optional β.
#[derive(Clone, Debug, PartialEq)]
pub struct DoctorChoice {
    /// Registry name.
    pub name: String,
    /// β; the doctor's default when absent.
    pub beta: Option<f32>,
}

impl std::str::FromStr for DoctorChoice {
    type Err = String;

    /// Parses `NAME` or `NAME:BETA`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.rsplit_once(':') {
            Some((name, beta)) => {
                let beta: f32 = beta.parse().map_err(|_| {
                    format!("invalid β `{beta}` in `{text}`: expected NAME or NAME:BETA with a number, e.g. harmless:0.5")
                })?;
                if !beta.is_finite() {
                    return Err(format!("β in `{text}` must be a finite number"));
                }
                Ok(Self {
                    name: name.to_string(),
                    beta: Some(beta),
                })
            }
            None => Ok(Self {
                name: text.to_string(),
                beta: None,
            }),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// The user message.
    pub prompt: String,
    /// An optional system message.
    pub system: Option<String>,
    /// Maximum generated tokens.
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Doctors steering the generation.
    pub doctors: Vec<DoctorChoice>,
    /// α, the patient's weight.
    pub patient_alpha: f32,
}

/// The result, as `generate --json` prints it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GenerateOutput {
    /// Token ids of the templated prompt.
    pub prompt_ids: Vec<u32>,
    /// Generated token ids, including a final stop token.
    pub ids: Vec<u32>,
    /// Generated text, without stop tokens.
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// Errors of [`generate`].
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Templating or tokenizing the prompt failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A sampling option is out of range.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// A doctor is not loaded.
    #[error(transparent)]
    Doctor(#[from] Box<DoctorError>),
    /// The engine rejected the request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Generation failed inside the engine.
    #[error("generation failed: {0}")]
    Failed(String),
}

/// Templates a user (and optional system) message into prompt ids: the chat template when the
/// model has one, the plain text otherwise.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    system: Option<&str>,
    prompt: &str,
) -> Result<Vec<u32>, TokenizerError> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", prompt));
    let mut ids = match tokenizer.chat_template() {
        Some(_) => {
            let text = tokenizer.apply_chat_template(&messages, GenerationPrompt::Add)?;
            tokenizer.encode(&text, SpecialTokens::Parse)?
        }
        None => tokenizer.encode(prompt, SpecialTokens::AsText)?,
    };
    if let Some(bos) = tokenizer.bos_token_id().filter(|_| tokenizer.add_bos()) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// Resolves doctor choices against the registry.
pub fn resolve_doctors(
    registry: &DoctorRegistry,
    alpha: f32,
    choices: &[DoctorChoice],
) -> Result<Steering, DoctorError> {
    let doctors = choices
        .iter()
        .map(|choice| {
            let doctor = registry.get(&choice.name)?;
            let beta = choice.beta.unwrap_or_else(|| doctor.default_beta());
            Ok(DoctorWeight { doctor, beta })
        })
        .collect::<Result<Vec<_>, DoctorError>>()?;
    Ok(Steering { alpha, doctors })
}

/// Generates one reply through the engine and waits for it.
pub fn generate(
    engine: &EngineHandle,
    tokenizer: &Arc<Tokenizer>,
    registry: &DoctorRegistry,
    options: &GenerateOptions,
) -> Result<GenerateOutput, GenerateError> {
    let prompt_ids = prompt_ids(tokenizer, options.system.as_deref(), &options.prompt)?;
    let sampling = SamplingParams::validate(
        RawSamplingParams {
            temperature: Some(options.temperature),
            seed: options.seed,
            ..RawSamplingParams::default()
        },
        tokenizer.vocab_size(),
    )?;
    let request = GenerationRequest {
        prompt_ids: prompt_ids.clone(),
        sampling,
        max_tokens: options.max_tokens,
        stop_strings: Vec::new(),
        stop_token_ids: Vec::new(),
        eos: EosPolicy::Stop,
        n: 1,
        steering: resolve_doctors(registry, options.patient_alpha, &options.doctors)
            .map_err(Box::new)?,
    };
    let mut events = engine.submit(request)?;
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut finish_reason = FinishReason::Abort;
    let mut completion_tokens = 0;
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(token) => {
                ids.push(token.id);
                text.push_str(&token.text);
            }
            Event::Finished(end) => {
                ids.extend(end.stop_token);
                text.push_str(&end.text);
                finish_reason = end.reason;
                completion_tokens = end.completion_tokens;
            }
            Event::Done(_) => break,
            Event::Error(message) => return Err(GenerateError::Failed(message)),
        }
    }
    Ok(GenerateOutput {
        prompt_tokens: prompt_ids.len(),
        prompt_ids,
        ids,
        text,
        completion_tokens,
        finish_reason: finish_reason.as_str().to_string(),
    })
}
