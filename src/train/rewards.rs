//! Stage-1 token rewards from the patient's two faces, and the record that stores them.
//!
//! Each response of a pair is teacher-forced through the patient twice, once under a positive
//! face (a system instruction that requests a good response) and once under a negative face. With
//! `lp_pos_t` and `lp_neg_t` the log-probabilities of response token `t` under the two faces:
//!
//! ```text
//! Δ_t = |lp_pos_t − lp_neg_t|
//! S_t = tanh(Δ_t / (mean_j Δ_j + ε) / τ)      mean over the tokens of this response
//! r_t = sign · S_t · 1[S_t > θ]               sign = +1 for chosen, −1 for rejected
//! ```
//!
//! [`token_scores`] computes `S_t`, which needs the patient. [`token_rewards`] turns scores into
//! rewards, so a different `θ` needs no new patient run.
//!
//! # Stored format
//! The `rewards` command writes one [`RewardRecord`] per pair as one line of JSON:
//!
//! ```json
//! {"pair_id": "3f2a9c01d4e5b6a7",
//!  "prompt_ids": [1, 9690, 198],
//!  "chosen": {"token_ids": [504, 314, 2], "scores": [0.65, 0.0, 0.99]},
//!  "rejected": {"token_ids": [1045, 2], "scores": [0.81, 0.08]},
//!  "faces": "harmlessness"}
//! ```
//!
//! The example is wrapped for reading, but each record is one line in the file. `pair_id` is
//! [`PreferencePair::id`](super::data::PreferencePair::id). `prompt_ids` is the prompt that the
//! doctor is trained on, templated without any face instruction. `token_ids` are the response
//! tokens, identical under both faces, and `scores[t]` is `S_t` for `token_ids[t]`, so the two
//! lists have equal length. `faces` names the face pair, that is the preference dimension, that
//! produced the scores. Rewards are not stored because they follow from the scores, the sign
//! and `θ`.

use serde::{Deserialize, Serialize};

use super::TrainError;

/// Parameters of the token score and reward formulas.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardParams {
    /// `ε`, added to the mean difference so a response whose faces agree everywhere scores 0
    /// instead of dividing by zero.
    pub epsilon: f32,
    /// `τ`, the temperature of the `tanh`: larger values flatten the scores.
    pub tau: f32,
    /// `θ`, the score at or below which a token's reward is zero.
    pub theta: f32,
}

impl Default for RewardParams {
    fn default() -> Self {
        Self {
            epsilon: 1e-6,
            tau: 1.0,
            theta: 0.1,
        }
    }
}

/// The side of a preference pair that a response is on, which sets the sign of its rewards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseSign {
    /// The preferred response: rewards are positive.
    Chosen,
    /// The dispreferred response: rewards are negative.
    Rejected,
}

impl ResponseSign {
    /// `+1` for [`ResponseSign::Chosen`], `−1` for [`ResponseSign::Rejected`].
    pub fn value(self) -> f32 {
        match self {
            Self::Chosen => 1.0,
            Self::Rejected => -1.0,
        }
    }
}

/// Computes the token scores `S_t` of one response from its per-token log-probabilities under
/// the positive and the negative face.
///
/// Both slices hold one value per response token, in order. An empty response has no scores.
/// Fails when the lengths differ, a log-probability is not finite, or `ε` or `τ` is not positive.
pub fn token_scores(
    lp_pos: &[f32],
    lp_neg: &[f32],
    params: &RewardParams,
) -> Result<Vec<f32>, TrainError> {
    check_positive("epsilon", params.epsilon)?;
    check_positive("tau", params.tau)?;
    if lp_neg.len() != lp_pos.len() {
        return Err(TrainError::LengthMismatch {
            input: "negative-face log-probs",
            expected: lp_pos.len(),
            found: lp_neg.len(),
        });
    }
    check_finite("positive-face log-probs", lp_pos)?;
    check_finite("negative-face log-probs", lp_neg)?;
    if lp_pos.is_empty() {
        return Ok(Vec::new());
    }

    let deltas: Vec<f64> = lp_pos
        .iter()
        .zip(lp_neg)
        .map(|(&pos, &neg)| (f64::from(pos) - f64::from(neg)).abs())
        .collect();
    let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
    let scale = (mean + f64::from(params.epsilon)) * f64::from(params.tau);
    Ok(deltas
        .iter()
        .map(|delta| (delta / scale).tanh() as f32)
        .collect())
}

/// Turns token scores into rewards: `sign · S_t` where `S_t > θ`, and 0 elsewhere.
pub fn token_rewards(scores: &[f32], sign: ResponseSign, theta: f32) -> Vec<f32> {
    let sign = sign.value();
    scores
        .iter()
        .map(|&score| if score > theta { sign * score } else { 0.0 })
        .collect()
}

/// Returns the fraction of rewards that are not zero, and 0 for an empty slice. Worth logging, because a
/// `θ` set too high leaves almost nothing to learn from.
pub fn nonzero_fraction(rewards: &[f32]) -> f32 {
    if rewards.is_empty() {
        return 0.0;
    }
    let nonzero = rewards.iter().filter(|&&reward| reward != 0.0).count();
    nonzero as f32 / rewards.len() as f32
}

/// Accumulates rewards into `log Q(s_t) = Σ_{k≤t} r_k` for `t = 0..=L`, with `log Q(s_0) = 0`
/// for the prompt alone. The result has one more element than `rewards`.
pub fn cumulative_log_q(rewards: &[f32]) -> Vec<f32> {
    let mut log_q = Vec::with_capacity(rewards.len() + 1);
    let mut total = 0.0f64;
    log_q.push(0.0);
    for &reward in rewards {
        total += f64::from(reward);
        log_q.push(total as f32);
    }
    log_q
}

/// A response's token ids with the score `S_t` of each token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredResponse {
    /// The response tokens, identical under both faces.
    pub token_ids: Vec<u32>,
    /// `S_t` for each token, in `[0, 1)`.
    pub scores: Vec<f32>,
}

impl ScoredResponse {
    /// Computes the rewards `r_t` of this response for a given side and `θ`.
    pub fn rewards(&self, sign: ResponseSign, theta: f32) -> Vec<f32> {
        token_rewards(&self.scores, sign, theta)
    }
}

/// The stage-1 output for one preference pair, stored as one JSON line. See the module
/// documentation for the format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardRecord {
    /// The id of the preference pair.
    pub pair_id: String,
    /// The prompt templated without a face instruction, as the doctor is trained on it.
    pub prompt_ids: Vec<u32>,
    /// The preferred response.
    pub chosen: ScoredResponse,
    /// The dispreferred response.
    pub rejected: ScoredResponse,
    /// The name of the face pair that produced the scores.
    pub faces: String,
}

impl RewardRecord {
    /// Serialises the record as one line of JSON, without the trailing newline.
    pub fn to_json_line(&self) -> Result<String, TrainError> {
        self.check_lengths()?;
        serde_json::to_string(self).map_err(|err| TrainError::InvalidRecord {
            message: err.to_string(),
        })
    }

    /// Parses one line of JSON and checks that every response has one score per token.
    pub fn from_json_line(line: &str) -> Result<Self, TrainError> {
        let record: Self = serde_json::from_str(line).map_err(|err| TrainError::InvalidRecord {
            message: err.to_string(),
        })?;
        record.check_lengths()?;
        Ok(record)
    }

    fn check_lengths(&self) -> Result<(), TrainError> {
        for (side, response) in [("chosen", &self.chosen), ("rejected", &self.rejected)] {
            if response.scores.len() != response.token_ids.len() {
                return Err(TrainError::InvalidRecord {
                    message: format!(
                        "pair `{}`: the {side} response has {} token ids but {} scores",
                        self.pair_id,
                        response.token_ids.len(),
                        response.scores.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

fn check_positive(name: &'static str, value: f32) -> Result<(), TrainError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(TrainError::InvalidParam {
            name,
            value: f64::from(value),
            expected: "must be a positive finite number",
        })
    }
}

fn check_finite(input: &'static str, values: &[f32]) -> Result<(), TrainError> {
    match values.iter().position(|value| !value.is_finite()) {
        Some(index) => Err(TrainError::NonFinite {
            input,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(found: &[f32], expected: &[f32]) {
        assert_eq!(found.len(), expected.len());
        for (index, (f, e)) in found.iter().zip(expected).enumerate() {
            assert!(
                (f - e).abs() < 1e-5,
                "index {index}: found {f}, expected {e}"
            );
        }
    }

    // Δ = [0.5, 0, 2, 0.05] and mean Δ = 0.6375, so S = tanh(Δ / 0.6375).
    const LP_POS: [f32; 4] = [-1.0, -2.0, -0.5, -3.0];
    const LP_NEG: [f32; 4] = [-1.5, -2.0, -2.5, -3.05];
    const EXPECTED_SCORES: [f32; 4] = [0.655_175, 0.0, 0.996_24, 0.078_271];

    #[test]
    fn scores_match_hand_computation() {
        let scores = token_scores(&LP_POS, &LP_NEG, &RewardParams::default()).unwrap();
        assert_close(&scores, &EXPECTED_SCORES);
    }

    #[test]
    fn scores_use_temperature() {
        let params = RewardParams {
            tau: 2.0,
            ..RewardParams::default()
        };
        let scores = token_scores(&LP_POS, &LP_NEG, &params).unwrap();
        assert_close(&scores, &[0.373_218, 0.0, 0.916_807, 0.039_196]);
    }

    #[test]
    fn rewards_apply_threshold_and_sign() {
        let chosen = token_rewards(&EXPECTED_SCORES, ResponseSign::Chosen, 0.1);
        // The last score, 0.078, is below θ = 0.1 and its reward is zero.
        assert_eq!(chosen, vec![0.655_175, 0.0, 0.996_24, 0.0]);
        let rejected = token_rewards(&EXPECTED_SCORES, ResponseSign::Rejected, 0.1);
        assert_eq!(rejected, vec![-0.655_175, 0.0, -0.996_24, 0.0]);
        let strict = token_rewards(&EXPECTED_SCORES, ResponseSign::Chosen, 0.7);
        assert_eq!(strict, vec![0.0, 0.0, 0.996_24, 0.0]);
        assert_eq!(nonzero_fraction(&chosen), 0.5);
    }

    #[test]
    fn scores_zero_when_faces_agree() {
        let scores = token_scores(&[-1.0, -2.0], &[-1.0, -2.0], &RewardParams::default()).unwrap();
        assert_eq!(scores, vec![0.0, 0.0]);
    }

    #[test]
    fn scores_reject_bad_input() {
        let params = RewardParams::default();
        assert!(matches!(
            token_scores(&[-1.0], &[-1.0, -2.0], &params),
            Err(TrainError::LengthMismatch {
                expected: 1,
                found: 2,
                ..
            })
        ));
        assert!(matches!(
            token_scores(&[-1.0, f32::NEG_INFINITY], &[-1.0, -2.0], &params),
            Err(TrainError::NonFinite { index: 1, .. })
        ));
        let no_tau = RewardParams { tau: 0.0, ..params };
        assert!(matches!(
            token_scores(&[-1.0], &[-2.0], &no_tau),
            Err(TrainError::InvalidParam { name: "tau", .. })
        ));
        assert_eq!(token_scores(&[], &[], &params).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn cumulative_log_q_starts_at_zero() {
        assert_eq!(
            cumulative_log_q(&[0.5, 0.0, -0.25]),
            vec![0.0, 0.5, 0.5, 0.25]
        );
        assert_eq!(cumulative_log_q(&[]), vec![0.0]);
    }

    #[test]
    fn record_round_trips_through_json() {
        let record = RewardRecord {
            pair_id: "p1".into(),
            prompt_ids: vec![1, 2, 3],
            chosen: ScoredResponse {
                token_ids: vec![4, 5],
                scores: vec![0.5, 0.05],
            },
            rejected: ScoredResponse {
                token_ids: vec![6],
                scores: vec![0.25],
            },
            faces: "harmlessness".into(),
        };
        let line = record.to_json_line().unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(RewardRecord::from_json_line(&line).unwrap(), record);
        assert_eq!(
            record.chosen.rewards(ResponseSign::Chosen, 0.1),
            vec![0.5, 0.0]
        );
    }

    #[test]
    fn record_rejects_misaligned_scores() {
        let line = r#"{"pair_id": "p", "prompt_ids": [], "chosen": {"token_ids": [1, 2], "scores": [0.5]}, "rejected": {"token_ids": [], "scores": []}, "faces": "f"}"#;
        let err = RewardRecord::from_json_line(line).unwrap_err();
        assert!(err.to_string().contains("2 token ids but 1 scores"));
    }
}
