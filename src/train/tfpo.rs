//! The TFPO loss of one preference pair, computed through the doctor (base plus LoRA adapter)
//! and the value head, ready for `backward`.
//!
//! For a response of `L` tokens after a prompt of `P` tokens, the states `s_0..s_L` sit at
//! sequence positions `P−1..P+L−1` (the last prompt token, then every response token). The
//! hidden state at each of them gives `log V(s_t)`, and the logits at `s_0..s_{L−1}` give
//! `log π(y_{t+1} | s_t)`.
//!
//! SubTB's policy term `log π̂` is, by default, the doctor's log-probability.
//! [`PolicyTerm::RelativeToBase`] measures it relative to the frozen base instead
//! (`log π_doctor − log π_base`). With the raw log-probability the balance requires
//! `log π(y_t) = r_t + Δ log V`, that is probability one for every token with a zero reward.
//! Every response then pushes the doctor toward its own tokens, chosen and rejected alike, by
//! about the patient's per-token surprisal (2 to 3 nats). That drift hides the rewards, which
//! are below one nat. Relative to the base, an untrained doctor balances already except for the
//! rewards, and training moves each token's log-ratio toward `r_t`, which is the implicit reward
//! that `llmdoctor eval` measures. The tilt is then bounded by the rewards (at most one nat per
//! token), so such doctors steer gently.
//!
//! NOTE: on the tiny synthetic task of `tests/train_end_to_end.rs`, a doctor trained relative
//! to its base did not raise the marker rate significantly (z = 1.75 at β = 1, none at β = 3),
//! while the absolute form did (z ≈ 6). On 330 HH-RLHF pairs the absolute form also scored
//! higher on held-out pairs (60.1% against 57.6%, `doctors/harmless/README.md`).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::model::{KvCache, Llama, LogitsSelection, LoraAdapter, Row};

use super::loss::{divergence_point, pair_tfpo_loss, value_hinge, LossParams, Trajectory};
use super::rewards::{cumulative_log_q, ResponseSign, RewardRecord};
use super::scoring::{response_log_probs, ScoringError};
use super::value_head::ValueHead;
use super::TrainError;

/// One response with its per-token rewards, ready for training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingResponse {
    /// The response tokens.
    pub token_ids: Vec<u32>,
    /// `r_t` for each token.
    pub rewards: Vec<f32>,
}

/// A preference pair ready for training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPair {
    /// The pair id from the reward file.
    pub pair_id: String,
    /// The prompt templated without a face instruction.
    pub prompt_ids: Vec<u32>,
    /// The preferred response.
    pub chosen: TrainingResponse,
    /// The dispreferred response.
    pub rejected: TrainingResponse,
}

impl TrainingPair {
    /// Builds a pair from a reward record: rewards at `θ`, responses cut to at most `max_len`
    /// tokens. Returns `None` when either response is empty.
    pub fn from_record(record: &RewardRecord, theta: f32, max_len: Option<usize>) -> Option<Self> {
        let response = |scored: &super::rewards::ScoredResponse, sign| {
            let keep = max_len.map_or(scored.token_ids.len(), |max| {
                max.min(scored.token_ids.len())
            });
            let rewards = scored.rewards(sign, theta);
            TrainingResponse {
                token_ids: scored.token_ids[..keep].to_vec(),
                rewards: rewards[..keep].to_vec(),
            }
        };
        let chosen = response(&record.chosen, ResponseSign::Chosen);
        let rejected = response(&record.rejected, ResponseSign::Rejected);
        if chosen.token_ids.is_empty() || rejected.token_ids.is_empty() {
            return None;
        }
        Some(Self {
            pair_id: record.pair_id.clone(),
            prompt_ids: record.prompt_ids.clone(),
            chosen,
            rejected,
        })
    }

    /// Tokens of the longer of the two full sequences, prompt included.
    pub fn max_sequence_len(&self) -> usize {
        self.prompt_ids.len()
            + self
                .chosen
                .token_ids
                .len()
                .max(self.rejected.token_ids.len())
    }
}

/// The quantity that SubTB's policy term `log π̂(y_{t+1} | s_t)` measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyTerm {
    /// `log π_doctor` alone.
    #[default]
    Absolute,
    /// `log π_doctor − log π_base`: the doctor's log-probability relative to its frozen base
    /// (the base without the adapter).
    RelativeToBase,
}

impl PolicyTerm {
    /// Returns the name used on the command line and in `doctor.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RelativeToBase => "relative-to-base",
            Self::Absolute => "absolute",
        }
    }
}

/// The frozen base's log-probability of every response token of one pair, the reference that
/// [`PolicyTerm::RelativeToBase`] subtracts.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceLogProbs {
    /// `log π_base(y_t)` for each chosen token.
    pub chosen: Vec<f32>,
    /// `log π_base(y_t)` for each rejected token.
    pub rejected: Vec<f32>,
}

/// Scores both responses of `pair` under `model` without an adapter. The base is frozen, so a
/// trainer computes this once per pair.
pub fn reference_log_probs(
    model: &Llama,
    pair: &TrainingPair,
) -> Result<ReferenceLogProbs, TrainError> {
    let responses: [&[u32]; 2] = [&pair.chosen.token_ids, &pair.rejected.token_ids];
    let mut scored = response_log_probs(model, None, &[&pair.prompt_ids], &responses)
        .map_err(|err| match err {
            ScoringError::Model(err) => TrainError::Model(err),
            ScoringError::Train(err) => err,
            ScoringError::Tokenizer(err) => TrainError::InvalidRecord {
                message: err.to_string(),
            },
        })?
        .remove(0);
    let rejected = scored.remove(1);
    let chosen = scored.remove(0);
    Ok(ReferenceLogProbs { chosen, rejected })
}

/// The loss of one pair and its parts, as plain numbers for logging.
#[derive(Debug)]
pub struct PairLoss {
    /// The scalar loss to differentiate.
    pub total: Tensor,
    /// SubTB of both responses, summed.
    pub subtb: f32,
    /// The value hinge before `λ`, when the responses diverge.
    pub value: Option<f32>,
}

/// Runs both responses of `pair` through the doctor in one batched forward and returns the TFPO
/// loss. The base weights are not variables, so gradients reach only the adapter and the head.
///
/// With `reference`, the policy term is the doctor's log-probability minus the reference's
/// ([`PolicyTerm::RelativeToBase`]). Without it, the term is the doctor's log-probability.
pub fn pair_loss(
    model: &Llama,
    adapter: &LoraAdapter,
    head: &ValueHead,
    pair: &TrainingPair,
    reference: Option<&ReferenceLogProbs>,
    params: &LossParams,
) -> Result<PairLoss, TrainError> {
    let sequences: Vec<Vec<u32>> = [&pair.chosen, &pair.rejected]
        .iter()
        .map(|response| [pair.prompt_ids.as_slice(), &response.token_ids].concat())
        .collect();
    let mut caches = [KvCache::new(), KvCache::new()];
    let mut rows: Vec<Row<'_>> = sequences
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| Row {
            tokens,
            cache,
            adapter: Some(adapter),
            logits: LogitsSelection::All,
            fork_from: None,
        })
        .collect();
    let hidden = model.forward_hidden(&mut rows)?; // per row: (P+L, hidden)

    let prompt_len = pair.prompt_ids.len();
    let mut parts = Vec::with_capacity(2);
    let references = reference.map(|r| [r.chosen.as_slice(), r.rejected.as_slice()]);
    for (side, (response, hidden)) in [&pair.chosen, &pair.rejected]
        .iter()
        .zip(&hidden)
        .enumerate()
    {
        let reference = references.map(|r| r[side]);
        parts.push(response_terms(
            model, head, hidden, prompt_len, response, reference,
        )?);
    }
    let divergence = divergence_point(&pair.chosen.token_ids, &pair.rejected.token_ids);
    let [chosen, rejected] = [&parts[0], &parts[1]].map(|(log_q, log_v, log_pi)| Trajectory {
        log_q,
        log_v,
        log_pi,
    });
    let total = pair_tfpo_loss(chosen, rejected, divergence, params)?;

    // The parts, for logging only.
    let value = match divergence {
        Some(index) => {
            let hinge = value_hinge(
                &chosen.log_v.get(index + 1)?,
                &rejected.log_v.get(index + 1)?,
                params.gamma,
            )?;
            Some(hinge.to_scalar::<f32>()?)
        }
        None => None,
    };
    let total_value = total.to_scalar::<f32>()?;
    let subtb = total_value - (params.lambda as f32) * value.unwrap_or(0.0);
    Ok(PairLoss {
        total,
        subtb,
        value,
    })
}

/// Computes `(log_q, log_v, log_pi)` of one response from its row's hidden states
/// `(P+L, hidden)`. `log_pi` is relative to `reference` when one is given.
fn response_terms(
    model: &Llama,
    head: &ValueHead,
    hidden: &Tensor,
    prompt_len: usize,
    response: &TrainingResponse,
    reference: Option<&[f32]>,
) -> Result<(Tensor, Tensor, Tensor), TrainError> {
    let len = response.token_ids.len();
    let states = hidden.narrow(0, prompt_len - 1, len + 1)?; // (L+1, hidden): s_0..s_L
    let log_v = head.forward(&states)?; // (L+1,)
    let logits = model.lm_head(&states.narrow(0, 0, len)?)?; // (L, vocab)
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::from_slice(&response.token_ids, (len, 1), hidden.device())?;
    let mut log_pi = log_probs.gather(&targets, 1)?.squeeze(1)?; // (L,)
    if let Some(reference) = reference {
        if reference.len() != len {
            return Err(TrainError::Shape {
                input: "reference log-probabilities".into(),
                expected: format!("{len} values, one per response token"),
                found: vec![reference.len()],
            });
        }
        let reference = Tensor::from_slice(reference, (len,), hidden.device())?;
        log_pi = (log_pi - reference)?;
    }
    let log_q = cumulative_log_q(&response.rewards);
    let log_q = Tensor::from_vec(log_q, (len + 1,), hidden.device())?;
    Ok((log_q, log_v, log_pi))
}
