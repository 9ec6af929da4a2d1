//! Preference accuracy of the doctor's implicit reward and of patient-only baselines.

use serde::Serialize;

use crate::model::{Llama, LoraAdapter};
use crate::tokenizer::{SpecialTokens, Tokenizer};
use crate::train::data::PreferencePair;
use crate::train::scoring::{response_log_probs, template_prompt};

use super::EvalError;

/// The log-probabilities of one pair's responses under the patient and the doctor.
#[derive(Clone, Debug, PartialEq)]
pub struct PairLogProbs {
    /// `log π_patient` per token of the chosen response.
    pub patient_chosen: Vec<f32>,
    /// `log π_patient` per token of the rejected response.
    pub patient_rejected: Vec<f32>,
    /// `log π_doctor` per token of the chosen response.
    pub doctor_chosen: Vec<f32>,
    /// `log π_doctor` per token of the rejected response.
    pub doctor_rejected: Vec<f32>,
}

/// Accuracy of each score, as fractions of the evaluated pairs. A tie counts as half right.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PreferenceAccuracy {
    /// Pairs evaluated.
    pub pairs: usize,
    /// Pairs skipped because a response has no tokens or the pair exceeds the context.
    pub skipped: usize,
    /// The doctor's implicit reward `Σ_t [log π_doctor − log π_patient]`.
    pub implicit_reward: f64,
    /// The patient's total log-likelihood `Σ_t log π_patient`.
    pub patient_log_likelihood: f64,
    /// The patient's mean log-likelihood per token.
    pub patient_mean_log_likelihood: f64,
    /// Mean implicit-reward margin (chosen minus rejected), in nats.
    pub mean_implicit_margin: f64,
}

/// Scores both responses of `pair` under the patient (`base` without an adapter) and the doctor
/// (`base` with `adapter`), after the prompt templated without a system message. Returns
/// `None` when a response has no tokens or the pair does not fit the context.
pub fn pair_log_probs(
    base: &Llama,
    adapter: &LoraAdapter,
    tokenizer: &Tokenizer,
    pair: &PreferencePair,
) -> Result<Option<PairLogProbs>, EvalError> {
    let prompt = template_prompt(tokenizer, None, &pair.prompt)
        .map_err(crate::train::scoring::ScoringError::from)?;
    let encode = |text: &str| {
        tokenizer
            .encode(text, SpecialTokens::AsText)
            .map_err(crate::train::scoring::ScoringError::from)
    };
    let chosen = encode(&pair.chosen)?;
    let rejected = encode(&pair.rejected)?;
    let longest = prompt.len() + chosen.len().max(rejected.len());
    if chosen.is_empty() || rejected.is_empty() || longest > base.config().max_position_embeddings {
        return Ok(None);
    }
    let responses: [&[u32]; 2] = [&chosen, &rejected];
    let mut patient = response_log_probs(base, None, &[&prompt], &responses)?.remove(0);
    let mut doctor = response_log_probs(base, Some(adapter), &[&prompt], &responses)?.remove(0);
    Ok(Some(PairLogProbs {
        patient_rejected: patient.remove(1),
        patient_chosen: patient.remove(0),
        doctor_rejected: doctor.remove(1),
        doctor_chosen: doctor.remove(0),
    }))
}

fn sum(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v)).sum()
}

fn mean(values: &[f32]) -> f64 {
    sum(values) / values.len().max(1) as f64
}

/// 1 when `chosen > rejected`, ½ on a tie, 0 otherwise.
fn credit(chosen: f64, rejected: f64) -> f64 {
    if chosen > rejected {
        1.0
    } else if chosen == rejected {
        0.5
    } else {
        0.0
    }
}

/// Aggregates per-pair log-probabilities into accuracies. `skipped` is carried into the result.
pub fn accuracy(pairs: &[PairLogProbs], skipped: usize) -> Result<PreferenceAccuracy, EvalError> {
    if pairs.is_empty() {
        return Err(EvalError::NoPairs);
    }
    let mut result = PreferenceAccuracy {
        pairs: pairs.len(),
        skipped,
        ..PreferenceAccuracy::default()
    };
    for pair in pairs {
        let implicit_chosen = sum(&pair.doctor_chosen) - sum(&pair.patient_chosen);
        let implicit_rejected = sum(&pair.doctor_rejected) - sum(&pair.patient_rejected);
        result.implicit_reward += credit(implicit_chosen, implicit_rejected);
        result.mean_implicit_margin += implicit_chosen - implicit_rejected;
        result.patient_log_likelihood +=
            credit(sum(&pair.patient_chosen), sum(&pair.patient_rejected));
        result.patient_mean_log_likelihood +=
            credit(mean(&pair.patient_chosen), mean(&pair.patient_rejected));
    }
    let count = pairs.len() as f64;
    result.implicit_reward /= count;
    result.mean_implicit_margin /= count;
    result.patient_log_likelihood /= count;
    result.patient_mean_log_likelihood /= count;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_credits_each_score() {
        let pairs = [
            PairLogProbs {
                patient_chosen: vec![-1.0, -1.0, -1.0],
                patient_rejected: vec![-2.0],
                doctor_chosen: vec![-0.5, -1.0, -1.0],
                doctor_rejected: vec![-2.0],
            },
            PairLogProbs {
                patient_chosen: vec![-1.0],
                patient_rejected: vec![-1.0],
                doctor_chosen: vec![-2.0],
                doctor_rejected: vec![-0.5],
            },
        ];
        let acc = accuracy(&pairs, 3).unwrap();
        assert_eq!(acc.pairs, 2);
        assert_eq!(acc.skipped, 3);
        // Pair 1: implicit +0.5 vs 0 (right); total −3 vs −2 (wrong); mean −1 vs −2 (right).
        // Pair 2: implicit −1 vs +0.5 (wrong); total and mean tie (half each).
        assert!((acc.implicit_reward - 0.5).abs() < 1e-12);
        assert!((acc.patient_log_likelihood - 0.25).abs() < 1e-12);
        assert!((acc.patient_mean_log_likelihood - 0.75).abs() < 1e-12);
        assert!((acc.mean_implicit_margin - (0.5 - 1.5) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn accuracy_of_nothing_is_an_error() {
        assert!(matches!(accuracy(&[], 0), Err(EvalError::NoPairs)));
    }
}
