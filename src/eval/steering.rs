//! The effect of steering on sampling, measured through the engine.
//!
//! Every prompt is sampled `samples_per_prompt` times with the doctor at β and as many times
//! without it, with the same seeds. The engine reports, for each steered choice, the mean
//! per-token KL(steered ‖ patient) and the number of tokens whose most likely token changed.
//! Distinct-n is the number of distinct token n-grams divided by the number of n-grams, over
//! all sampled responses of one condition together.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use crate::doctor::Doctor;
use crate::engine::handle::EngineHandle;
use crate::engine::request::{DoctorWeight, EosPolicy, Event, GenerationRequest, Steering};
use crate::engine::sampling::{RawSamplingParams, SamplingParams};

use super::EvalError;

/// How to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteeringEvalConfig {
    /// Samples per prompt and condition.
    pub samples_per_prompt: usize,
    /// Maximum generated tokens per sample.
    pub max_tokens: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// The first seed; sample `j` of prompt `i` uses `seed + i · samples_per_prompt + j`.
    pub seed: u64,
    /// The doctor's weight.
    pub beta: f32,
}

/// The steering measurements.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SteeringEffect {
    /// β used.
    pub beta: f32,
    /// Prompts sampled.
    pub prompts: usize,
    /// Steered tokens generated.
    pub steered_tokens: usize,
    /// Mean per-token KL(steered ‖ patient) over steered tokens, in nats.
    pub mean_kl: f64,
    /// Fraction of steered tokens whose most likely token differs from the patient's.
    pub top_token_changed: f64,
    /// Distinct-1 of the steered samples.
    pub steered_distinct_1: f64,
    /// Distinct-2 of the steered samples.
    pub steered_distinct_2: f64,
    /// Distinct-1 of the unsteered samples.
    pub unsteered_distinct_1: f64,
    /// Distinct-2 of the unsteered samples.
    pub unsteered_distinct_2: f64,
}

/// One sampled response and, when steered, the engine's measurements.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// The generated token ids, without the final stop token.
    pub ids: Vec<u32>,
    /// The generated text.
    pub text: String,
    /// Tokens generated, stop token included.
    pub completion_tokens: usize,
    /// Mean KL(steered ‖ patient) of the choice, when steered.
    pub mean_kl: Option<f32>,
    /// Measured tokens whose top token changed, when steered.
    pub changed_tokens: Option<usize>,
    /// Tokens the engine measured `mean_kl` and `changed_tokens` on, when steered.
    pub measured_tokens: Option<usize>,
}

/// Samples one response through the engine.
pub fn sample(
    engine: &EngineHandle,
    prompt_ids: &[u32],
    vocab_size: usize,
    steering: Steering,
    max_tokens: usize,
    temperature: f32,
    seed: u64,
) -> Result<Sample, EvalError> {
    let sampling = SamplingParams::validate(
        RawSamplingParams {
            temperature: Some(temperature),
            seed: Some(seed),
            ..RawSamplingParams::default()
        },
        vocab_size,
    )?;
    let request = GenerationRequest {
        prompt_ids: prompt_ids.to_vec(),
        sampling,
        max_tokens,
        stop_strings: Vec::new(),
        stop_token_ids: Vec::new(),
        eos: EosPolicy::Stop,
        n: 1,
        steering,
    };
    let generation_error = |message: String| EvalError::Generation { message };
    let mut events = engine
        .submit(request)
        .map_err(|err| generation_error(err.to_string()))?;
    let mut result = Sample::default();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(token) => {
                result.ids.push(token.id);
                result.text.push_str(&token.text);
            }
            Event::Finished(end) => {
                result.text.push_str(&end.text);
                result.completion_tokens = end.completion_tokens;
                if let Some(summary) = end.steering {
                    result.mean_kl = Some(summary.mean_kl);
                    result.changed_tokens = Some(summary.changed_tokens);
                    result.measured_tokens = Some(summary.measured_tokens);
                }
            }
            Event::Done(_) => break,
            Event::Error(message) => return Err(generation_error(message)),
        }
    }
    Ok(result)
}

/// Distinct token n-grams over all n-grams of `samples`, or 0 when there are none.
pub fn distinct_n(samples: &[Vec<u32>], n: usize) -> f64 {
    let mut seen: HashSet<&[u32]> = HashSet::new();
    let mut total = 0usize;
    for ids in samples {
        for gram in ids.windows(n) {
            seen.insert(gram);
            total += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// Samples every prompt with and without `doctor` and aggregates the measurements.
pub fn steering_effect(
    engine: &EngineHandle,
    doctor: &Arc<Doctor>,
    prompts: &[Vec<u32>],
    vocab_size: usize,
    config: &SteeringEvalConfig,
    on_prompt: &mut dyn FnMut(usize),
) -> Result<SteeringEffect, EvalError> {
    let steered_with = || Steering {
        alpha: 1.0,
        doctors: vec![DoctorWeight {
            doctor: doctor.clone(),
            beta: config.beta,
        }],
    };
    let mut steered = Vec::new();
    let mut unsteered = Vec::new();
    let (mut kl_sum, mut changed, mut tokens, mut measured) = (0.0f64, 0usize, 0usize, 0usize);
    for (index, prompt) in prompts.iter().enumerate() {
        for j in 0..config.samples_per_prompt {
            let seed = config.seed + (index * config.samples_per_prompt + j) as u64;
            let run = |steering| {
                sample(
                    engine,
                    prompt,
                    vocab_size,
                    steering,
                    config.max_tokens,
                    config.temperature,
                    seed,
                )
            };
            let with = run(steered_with())?;
            let with_measured = with.measured_tokens.unwrap_or(0);
            kl_sum += f64::from(with.mean_kl.unwrap_or(0.0)) * with_measured as f64;
            changed += with.changed_tokens.unwrap_or(0);
            measured += with_measured;
            tokens += with.completion_tokens;
            steered.push(with.ids);
            unsteered.push(run(Steering::default())?.ids);
        }
        on_prompt(index + 1);
    }
    // Means over the tokens the engine measured: all of them when its
    // `steering_stats_interval` is 1, as `llmdoctor eval` sets it.
    let per_token = |value: f64| {
        if measured == 0 {
            0.0
        } else {
            value / measured as f64
        }
    };
    Ok(SteeringEffect {
        beta: config.beta,
        prompts: prompts.len(),
        steered_tokens: tokens,
        mean_kl: per_token(kl_sum),
        top_token_changed: per_token(changed as f64),
        steered_distinct_1: distinct_n(&steered, 1),
        steered_distinct_2: distinct_n(&steered, 2),
        unsteered_distinct_1: distinct_n(&unsteered, 1),
        unsteered_distinct_2: distinct_n(&unsteered, 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_n_counts_unique_grams() {
        let samples = vec![vec![1, 2, 1, 2], vec![1, 2]];
        assert!((distinct_n(&samples, 1) - 2.0 / 6.0).abs() < 1e-12);
        // Bigrams: (1,2) (2,1) (1,2) and (1,2): 2 distinct of 4.
        assert!((distinct_n(&samples, 2) - 0.5).abs() < 1e-12);
        assert_eq!(distinct_n(&[vec![5]], 2), 0.0);
    }
}
