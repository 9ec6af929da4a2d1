//! Steering: the per-token combination of the patient's and the doctors' distributions.
//!
//! For one step with patient logits `z_p` and doctor logits `z_i`, the steered distribution is
//!
//! ```text
//! log p(y | s) = α · log_softmax(z_p) + Σ_i β_i · log_softmax(z_i) − log Z
//! ```
//!
//! where `log Z` (a log-sum-exp over the vocabulary) renormalises the weighted sum into a
//! log-probability vector. The sampler then applies the request's bias, penalties, temperature
//! and truncation to that vector.
//!
//! Each `log_softmax` differs from its raw logits by a constant, and the renormalisation
//! removes constants, so [`combine`] sums weighted raw logits. The engine goes one step
//! further for rows that share the patient's output layer: `α·W·h_p + Σ β_i·W·h_i` equals
//! `W·(α·h_p + Σ β_i·h_i)`, so it mixes their final hidden states and runs the output layer
//! once. Such a mixed row enters [`combine`] as one term of weight 1.
//!
//! NOTE: the equality is exact only in exact arithmetic. The quantised output layer rounds
//! each row's activations to int8 first, so the mixed row and the sum of separate rows differ
//! by that rounding (up to about 0.3 nats in a log-probability gap at β = 0.5).
//!
//! A weight of exactly 0 drops its term. [`unsteered`] is the patient's own distribution,
//! which the engine uses whenever α = 1 and every β = 0, so such a request decodes exactly like
//! an unsteered one.

use thiserror::Error;

/// Errors raised by [`combine`]. Both mean the caller built the step wrongly, because the
/// doctor registry rejects doctors whose vocabulary differs from the patient's.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SteeringError {
    /// No term has a nonzero weight and logits.
    #[error("cannot steer a step without logits: every term is empty or has weight 0")]
    NothingToCombine,

    /// A term or the patient row differs in length from the first term.
    #[error(
        "term {index} has {len} logits but the first term has {expected}; steering needs one \
         vocabulary in every row"
    )]
    VocabularyMismatch {
        /// Position of the term in [`SteeringInput::terms`], or the number of terms for the
        /// patient row.
        index: usize,
        /// Length of that row.
        len: usize,
        /// Length of the first term.
        expected: usize,
    },
}

/// One weighted row of the sum.
#[derive(Debug, Clone, Copy)]
pub struct Term<'a> {
    /// The weight: α for the patient, β for a doctor (negative steers away from what the
    /// doctor prefers), 1 for a row mixed before the output layer. 0 drops the term.
    pub weight: f32,
    /// Raw logits, `(vocab,)`.
    pub logits: &'a [f32],
}

/// The rows and weights of one steered step for one sequence.
#[derive(Debug, Clone, Copy)]
pub struct SteeringInput<'a> {
    /// The terms of the weighted sum.
    pub terms: &'a [Term<'a>],
    /// The patient's own raw logits, when this step measures [`SteeringStats`].
    pub patient: Option<&'a [f32]>,
}

/// Per-step measurements of how much steering moved the patient's distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteeringStats {
    /// KL(steered ‖ patient) in nats. Exactly 0 on the unsteered path, and +∞ when the
    /// steered distribution puts mass on a token the patient gives probability 0.
    pub kl_steered_patient: f32,
    /// Most likely token under the patient alone (lowest id on ties).
    pub patient_argmax: u32,
    /// Most likely token under the steered distribution (lowest id on ties).
    pub steered_argmax: u32,
}

impl SteeringStats {
    /// Reports whether steering changed the most likely token.
    pub fn changed_top_token(&self) -> bool {
        self.patient_argmax != self.steered_argmax
    }
}

/// Writes the steered log-probabilities of one step into `out` (cleared first, `(vocab,)` on
/// return). Measures how far they moved from the patient's when `input.patient` is given.
///
/// Terms of weight 0 are skipped. A single term of weight 1 gives exactly its
/// `log_softmax`.
pub fn combine(
    input: &SteeringInput<'_>,
    out: &mut Vec<f32>,
) -> Result<Option<SteeringStats>, SteeringError> {
    let mut active = input.terms.iter().filter(|term| term.weight != 0.0);
    let Some(first) = active.next().filter(|term| !term.logits.is_empty()) else {
        return Err(SteeringError::NothingToCombine);
    };
    let expected = first.logits.len();
    let lengths = input
        .terms
        .iter()
        .map(|term| term.logits.len())
        .chain(input.patient.map(<[f32]>::len));
    for (index, len) in lengths.enumerate() {
        if len != expected {
            return Err(SteeringError::VocabularyMismatch {
                index,
                len,
                expected,
            });
        }
    }

    out.clear();
    if first.weight == 1.0 {
        out.extend_from_slice(first.logits);
    } else {
        out.extend(first.logits.iter().map(|&logit| first.weight * logit));
    }
    for term in active {
        for (combined, &logit) in out.iter_mut().zip(term.logits) {
            *combined += term.weight * logit;
        }
    }
    let steered_argmax = log_softmax_in_place(out).unwrap_or(0);

    let Some(patient) = input.patient else {
        return Ok(None);
    };
    let (patient_max, patient_argmax) = max_and_argmax(patient);
    let patient_normaliser = LogNormaliser::with_max(patient, patient_max);
    Ok(Some(SteeringStats {
        kl_steered_patient: kl_divergence(out, patient, patient_normaliser),
        patient_argmax: patient_argmax.unwrap_or(0),
        steered_argmax,
    }))
}

/// Writes the patient's own log-probabilities into `out` (cleared first), untouched by any
/// arithmetic that could change a bit. This is the distribution of an unsteered request.
pub fn unsteered(patient: &[f32], out: &mut Vec<f32>) -> SteeringStats {
    let (max, top) = max_and_argmax(patient);
    let normaliser = LogNormaliser::with_max(patient, max);
    out.clear();
    out.extend(patient.iter().map(|&logit| normaliser.log_prob(logit)));
    let top = top.unwrap_or(0);
    SteeringStats {
        kl_steered_patient: 0.0,
        patient_argmax: top,
        steered_argmax: top,
    }
}

/// KL(steered ‖ patient) in nats, from the steered log-probabilities and the patient's raw
/// logits with their normaliser. Clamped at 0 because rounding can push a tiny true divergence
/// below it. Tokens the steered distribution gives probability 0 contribute nothing.
fn kl_divergence(steered: &[f32], patient: &[f32], patient_normaliser: LogNormaliser) -> f32 {
    let total = lane_sum(steered, patient, |log_p, logit| {
        let p = exp(log_p);
        let log_q = patient_normaliser.log_prob(logit);
        // A select rather than a skip, so the loop still vectorises.
        if p > 0.0 {
            p * (log_p - log_q)
        } else {
            0.0
        }
    });
    total.max(0.0) as f32
}

/// Replaces each score by its log-probability, `v_i − log Σ_j exp(v_j)`.
///
/// Stable for large scores because it subtracts the maximum before exponentiating. Entries of
/// −∞ stay −∞, and a row that is entirely −∞ is left as it is. Returns the index of the
/// largest score as [`max_and_argmax`] finds it, since that pass is needed anyway.
pub fn log_softmax_in_place(v: &mut [f32]) -> Option<u32> {
    let (max, top) = max_and_argmax(v);
    let normaliser = LogNormaliser::with_max(v, max);
    for score in v.iter_mut() {
        *score = normaliser.log_prob(*score);
    }
    top
}

/// Returns the index of the largest value, the lowest index on ties, or `None` for an empty
/// input. NaN never wins, and a row with nothing above −∞ gives index 0.
pub fn argmax(values: &[f32]) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    Some(max_and_argmax(values).1.unwrap_or(0))
}

/// Returns the largest value of `v` other than NaN (−∞ when there is none) and its lowest
/// index, or `None` for the index when no value is above −∞.
///
/// Sixteen lanes each keep their best value and the block it came from. Comparisons are
/// selects, so the loop vectorises, unlike a fold over `f32::max`.
pub(crate) fn max_and_argmax(v: &[f32]) -> (f32, Option<u32>) {
    const LANES: usize = 16;
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut block = [0_u32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (index, chunk) in (0_u32..).zip(chunks) {
        for ((best, block), &x) in best.iter_mut().zip(&mut block).zip(chunk) {
            let better = x > *best;
            *best = if better { x } else { *best };
            *block = if better { index } else { *block };
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut at = None;
    let candidates = (0..LANES).map(|lane| (block[lane] * LANES as u32 + lane as u32, best[lane]));
    let start = (v.len() - tail.len()) as u32;
    for (index, x) in candidates.chain((start..).zip(tail.iter().copied())) {
        let better = x > max || (x == max && at.is_some_and(|at| index < at));
        if better && x > f32::NEG_INFINITY {
            max = x;
            at = Some(index);
        }
    }
    (max, at)
}

/// The maximum of a row of scores and `log Σ exp(v − max)`, which together turn any score of
/// that row into a log-probability. Computing both once lets callers map scores one at a time
/// without a temporary row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogNormaliser {
    max: f32,
    log_sum: f32,
}

impl LogNormaliser {
    /// Measures `v`, whose maximum ignoring NaN is `max` (from [`max_and_argmax`], which
    /// callers run anyway). A row with no finite maximum (empty, or all −∞) gets the identity,
    /// so its entries pass through unchanged.
    pub(crate) fn with_max(v: &[f32], max: f32) -> Self {
        if max == f32::NEG_INFINITY {
            return Self {
                max: 0.0,
                log_sum: 0.0,
            };
        }
        let sum = lane_sum(v, v, |x, _| exp(x - max));
        Self {
            max,
            log_sum: sum.ln() as f32,
        }
    }

    /// Returns the log-probability of a score of the measured row.
    pub(crate) fn log_prob(self, score: f32) -> f32 {
        (score - self.max) - self.log_sum
    }
}

/// Computes e^x in f32 with plain arithmetic, so that loops over a row vectorise. Rust's
/// `f32::exp` calls libm's `expf`, and LLVM keeps such calls scalar.
///
/// Relative error stays below 2e-7 on [−87, 88] (checked by a unit test on a fine grid). Inputs below −87
/// give exactly 0, so e^−∞ = 0, and e^0 is exactly 1. Inputs above 88 saturate at e^88. NaN
/// gives NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln 2 split into a part with few mantissa bits and a correction, so that n · LN2_HIGH is
    // exact and the reduced argument keeps full precision (the Cody–Waite reduction).
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer and leaves that integer in the low mantissa
    // bits, which avoids a float-to-int conversion.
    const ROUNDING_SHIFT: f32 = 12_582_912.0;
    const ROUNDING_SHIFT_BITS: u32 = 0x4B40_0000;

    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUNDING_SHIFT;
    let n = shifted - ROUNDING_SHIFT;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    // Degree-7 polynomial for e^r on [−ln2/2, ln2/2] in Horner form. Its accuracy is what the
    // unit test below checks.
    let mut polynomial = 1.987_569_1e-4_f32;
    polynomial = polynomial * r + 1.398_199_9e-3;
    polynomial = polynomial * r + 8.333_452e-3;
    polynomial = polynomial * r + 4.166_579_6e-2;
    polynomial = polynomial * r + 1.666_666_5e-1;
    polynomial = polynomial * r + 0.5;
    let exp_r = polynomial * r * r + r + 1.0;
    // 2^n built from its exponent bits: (n + 127) << 23.
    let two_to_n = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUNDING_SHIFT_BITS - 127)
            .wrapping_shl(23),
    );
    if x < -87.0 {
        0.0
    } else {
        exp_r * two_to_n
    }
}

/// Sums `term(a_i, b_i)` over two rows of equal length.
///
/// Partial sums run in 16 f32 lanes over blocks of 256 values, which the compiler vectorises,
/// and each block's sum is added in f64. Each f32 partial sum therefore has at most 16 terms,
/// which keeps the relative error near 1e-7. A unit test checks 1e-6 on a vocabulary-sized
/// row.
pub(crate) fn lane_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f64 {
    const LANES: usize = 16;
    const BLOCK: usize = 256;
    let mut total = 0.0_f64;
    for (block_a, block_b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut lanes = [0.0_f32; LANES];
        let chunks_a = block_a.chunks_exact(LANES);
        let chunks_b = block_b.chunks_exact(LANES);
        let tail: f32 = chunks_a
            .remainder()
            .iter()
            .zip(chunks_b.remainder())
            .map(|(&x, &y)| term(x, y))
            .sum();
        for (chunk_a, chunk_b) in chunks_a.zip(chunks_b) {
            for ((lane, &x), &y) in lanes.iter_mut().zip(chunk_a).zip(chunk_b) {
                *lane += term(x, y);
            }
        }
        total += f64::from(lanes.iter().sum::<f32>() + tail);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log_softmax(v: &[f32]) -> Vec<f32> {
        let mut out = v.to_vec();
        log_softmax_in_place(&mut out);
        out
    }

    fn log_sum_exp(v: &[f32]) -> f64 {
        v.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln()
    }

    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(actual.len(), expected.len(), "lengths differ");
        for (index, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance,
                "index {index}: got {a}, expected {e} (tolerance {tolerance})"
            );
        }
    }

    const PATIENT: [f32; 5] = [1.5, -0.25, 3.0, 0.0, -7.0];
    const DOCTOR: [f32; 5] = [0.5, 2.0, -1.0, 4.0, 0.0];

    #[test]
    fn log_softmax_is_stable_for_large_logits() {
        let out = log_softmax(&[1000.0, 1001.0, 1002.0]);
        let expected = [-2.407_606, -1.407_606, -0.407_606];
        assert_close(&out, &expected, 1e-5);
    }

    #[test]
    fn log_softmax_keeps_negative_infinity() {
        let out = log_softmax(&[f32::NEG_INFINITY, 0.0, 0.0]);
        assert_eq!(out[0], f32::NEG_INFINITY);
        assert_close(&out[1..], &[-std::f32::consts::LN_2; 2], 1e-6);
    }

    #[test]
    fn log_softmax_leaves_all_negative_infinity_row() {
        let out = log_softmax(&[f32::NEG_INFINITY; 3]);
        assert_eq!(out, vec![f32::NEG_INFINITY; 3]);
    }

    #[test]
    fn exp_matches_std_to_f32_precision() {
        let mut worst = 0.0_f64;
        let mut x = -87.0_f32;
        while x <= 88.0 {
            let expected = f64::from(x).exp();
            let relative = ((f64::from(exp(x)) - expected) / expected).abs();
            worst = worst.max(relative);
            x += 0.000_71;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_handles_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), exp(88.0));
    }

    #[test]
    fn lane_sum_matches_f64_sum() {
        let row: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7_919) % 1_000) as f32 / 100.0 - 10.0)
            .collect();
        let expected: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
        let actual = lane_sum(&row, &row, |x, _| exp(x));
        assert!(
            ((actual - expected) / expected).abs() < 1e-6,
            "{actual} vs {expected}"
        );
    }

    #[test]
    fn argmax_picks_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    /// Builds a row of varied logits as long as SmolLM2's vocabulary, so the bitwise checks
    /// cover a realistic row.
    fn wide_logits() -> Vec<f32> {
        (0..49_152)
            .map(|i| ((i * 7_919) % 1_000) as f32 / 37.0 - 13.0)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn unsteered_is_bitwise_log_softmax() {
        let patient = wide_logits();
        let mut out = Vec::new();
        let stats = unsteered(&patient, &mut out);
        assert_eq!(bits(&out), bits(&log_softmax(&patient)));
        assert_eq!(stats.kl_steered_patient, 0.0);
        assert_eq!(Some(stats.patient_argmax), argmax(&patient));
        assert!(!stats.changed_top_token());
    }

    #[test]
    fn one_unit_term_is_bitwise_log_softmax() -> Result<(), SteeringError> {
        let patient = wide_logits();
        let doctor: Vec<f32> = patient.iter().rev().copied().collect();
        let terms = [
            Term {
                weight: 0.0,
                logits: &doctor,
            },
            Term {
                weight: 1.0,
                logits: &patient,
            },
            Term {
                weight: 0.0,
                logits: &doctor,
            },
        ];
        let mut out = vec![9.0; 2];
        let stats = combine(
            &SteeringInput {
                terms: &terms,
                patient: Some(&patient),
            },
            &mut out,
        )?
        .expect("the patient row was given");
        assert_eq!(bits(&out), bits(&log_softmax(&patient)));
        assert_eq!(stats.kl_steered_patient, 0.0);
        Ok(())
    }

    /// Runs [`combine`] on `(weight, logits)` terms and returns its output and statistics.
    fn combine_terms(
        terms: &[(f32, &[f32])],
        patient: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Option<SteeringStats>), SteeringError> {
        let terms: Vec<Term<'_>> = terms
            .iter()
            .map(|&(weight, logits)| Term { weight, logits })
            .collect();
        let mut out = Vec::new();
        let stats = combine(
            &SteeringInput {
                terms: &terms,
                patient,
            },
            &mut out,
        )?;
        Ok((out, stats))
    }

    #[test]
    fn combine_without_patient_measures_nothing() -> Result<(), SteeringError> {
        let (out, stats) = combine_terms(&[(0.5, &DOCTOR)], None)?;
        assert!(stats.is_none());
        let halved: Vec<f32> = DOCTOR.iter().map(|x| 0.5 * x).collect();
        assert_close(&out, &log_softmax(&halved), 1e-6);
        Ok(())
    }

    #[test]
    fn combine_with_doctor_alone_returns_doctor() -> Result<(), SteeringError> {
        let patient = [f32::NEG_INFINITY, 0.0, 1.0, 2.0, 3.0];
        let (out, stats) = combine_terms(&[(0.0, &patient), (1.0, &DOCTOR)], Some(&patient))?;
        let stats = stats.expect("the patient row was given");
        assert_close(&out, &log_softmax(&DOCTOR), 1e-6);
        assert_eq!(stats.steered_argmax, 3);
        assert_eq!(stats.patient_argmax, 4);
        assert_eq!(stats.kl_steered_patient, f32::INFINITY);
        Ok(())
    }

    #[test]
    fn combine_matches_hand_computed_three_tokens() -> Result<(), SteeringError> {
        // Patient probabilities (0.5, 0.25, 0.25), doctor (0.25, 0.25, 0.5), α = β = 1.
        // The product is (0.125, 0.0625, 0.125), which normalises to (0.4, 0.2, 0.4).
        let patient = [0.5_f32.ln(), 0.25_f32.ln(), 0.25_f32.ln()];
        let doctor = [0.25_f32.ln(), 0.25_f32.ln(), 0.5_f32.ln()];
        let (out, stats) = combine_terms(&[(1.0, &patient), (1.0, &doctor)], Some(&patient))?;
        let stats = stats.expect("the patient row was given");

        let probabilities: Vec<f32> = out.iter().map(|x| x.exp()).collect();
        assert_close(&probabilities, &[0.4, 0.2, 0.4], 1e-6);

        let expected_kl =
            0.4 * (0.4_f64 / 0.5).ln() + 0.2 * (0.2_f64 / 0.25).ln() + 0.4 * (0.4_f64 / 0.25).ln();
        assert!((f64::from(stats.kl_steered_patient) - expected_kl).abs() < 1e-6);
        assert_eq!(stats.patient_argmax, 0);
        Ok(())
    }

    #[test]
    fn premixed_term_equals_separate_terms() -> Result<(), SteeringError> {
        // A row mixed before a linear output layer, α·z_p + β·z_d, enters with weight 1.
        let mixed: Vec<f32> = PATIENT
            .iter()
            .zip(&DOCTOR)
            .map(|(p, d)| 0.8 * p + 0.5 * d)
            .collect();
        let (from_mixed, mixed_stats) = combine_terms(&[(1.0, &mixed)], Some(&PATIENT))?;
        let (from_terms, term_stats) =
            combine_terms(&[(0.8, &PATIENT), (0.5, &DOCTOR)], Some(&PATIENT))?;

        assert_close(&from_mixed, &from_terms, 1e-6);
        let kl = |stats: Option<SteeringStats>| stats.map(|s| s.kl_steered_patient);
        let (a, b) = (kl(mixed_stats), kl(term_stats));
        assert!(
            a.zip(b).is_some_and(|(a, b)| (a - b).abs() < 1e-6),
            "{a:?} vs {b:?}"
        );
        Ok(())
    }

    #[test]
    fn combine_lets_strong_doctor_choose_top_token() -> Result<(), SteeringError> {
        let mut doctor = [0.0; 5];
        doctor[1] = 20.0;
        let (_, stats) = combine_terms(&[(1.0, &PATIENT), (0.5, &doctor)], Some(&PATIENT))?;
        let stats = stats.expect("the patient row was given");
        assert_eq!(stats.patient_argmax, 2);
        assert_eq!(stats.steered_argmax, 1);
        assert!(stats.changed_top_token());
        assert!(stats.kl_steered_patient > 0.0);
        Ok(())
    }

    #[test]
    fn combine_with_negative_beta_steers_away() -> Result<(), SteeringError> {
        let mut doctor = [0.0; 5];
        doctor[2] = 10.0;
        let (out, _) = combine_terms(&[(1.0, &PATIENT), (-1.0, &doctor)], None)?;
        let patient = log_softmax(&PATIENT);
        assert!(out[2] < patient[2]);
        Ok(())
    }

    #[test]
    fn combine_rejects_mismatched_rows() {
        let result = combine_terms(&[(0.5, &DOCTOR), (0.5, &DOCTOR[..4])], Some(&PATIENT));
        assert_eq!(
            result.err(),
            Some(SteeringError::VocabularyMismatch {
                index: 1,
                len: 4,
                expected: 5,
            })
        );
        let result = combine_terms(&[(0.5, &DOCTOR)], Some(&PATIENT[..3]));
        assert_eq!(
            result.err(),
            Some(SteeringError::VocabularyMismatch {
                index: 1,
                len: 3,
                expected: 5,
            })
        );
    }

    #[test]
    fn combine_rejects_empty_steps() {
        let empty: &[(f32, &[f32])] = &[(1.0, &[])];
        let zero: &[(f32, &[f32])] = &[(0.0, &PATIENT)];
        for terms in [&[][..], empty, zero] {
            let result = combine_terms(terms, None);
            assert_eq!(result.err(), Some(SteeringError::NothingToCombine));
        }
    }

    /// Owned rows for one randomly generated steering step.
    #[derive(Debug, Clone)]
    struct StepRows {
        alpha: f32,
        patient: Vec<f32>,
        doctors: Vec<(f32, Vec<f32>)>,
    }

    fn step_rows() -> impl Strategy<Value = StepRows> {
        (1_usize..64).prop_flat_map(|vocab| {
            let logits = prop::collection::vec(-30.0_f32..30.0, vocab);
            let doctor = (-2.0_f32..2.0, prop::collection::vec(-30.0_f32..30.0, vocab));
            (-0.5_f32..2.0, logits, prop::collection::vec(doctor, 0..4)).prop_map(
                |(alpha, patient, doctors)| StepRows {
                    alpha,
                    patient,
                    doctors,
                },
            )
        })
    }

    /// Values from a small set, so that ties, NaN and −∞ land in every lane and in the tail.
    fn lane_values() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            Just(f32::NAN),
            Just(f32::NEG_INFINITY),
            Just(f32::INFINITY),
            (-3_i32..4).prop_map(|v| v as f32),
        ];
        prop::collection::vec(value, 0..80)
    }

    proptest! {
        #[test]
        fn max_and_argmax_match_a_scan(values in lane_values()) {
            let mut expected: (f32, Option<u32>) = (f32::NEG_INFINITY, None);
            for (index, &x) in (0_u32..).zip(&values) {
                if x > expected.0 {
                    expected = (x, Some(index));
                }
            }
            let (max, at) = max_and_argmax(&values);
            prop_assert_eq!(at, expected.1);
            prop_assert_eq!(max.to_bits(), expected.0.to_bits());
        }

        #[test]
        fn combine_output_is_normalised_with_nonnegative_kl(rows in step_rows()) {
            let mut terms = vec![Term { weight: rows.alpha, logits: &rows.patient }];
            terms.extend(
                rows.doctors
                    .iter()
                    .map(|(weight, logits)| Term { weight: *weight, logits }),
            );
            let input = SteeringInput {
                terms: &terms,
                patient: Some(&rows.patient),
            };
            let mut out = Vec::new();
            match combine(&input, &mut out) {
                Ok(stats) => {
                    let stats = stats.expect("the patient row was given");
                    prop_assert_eq!(out.len(), rows.patient.len());
                    prop_assert!(
                        log_sum_exp(&out).abs() < 1e-5,
                        "log-sum-exp {}",
                        log_sum_exp(&out)
                    );
                    prop_assert!(stats.kl_steered_patient >= 0.0);
                    prop_assert!((stats.steered_argmax as usize) < rows.patient.len());
                }
                Err(err) => {
                    prop_assert_eq!(err, SteeringError::NothingToCombine);
                    prop_assert!(terms.iter().all(|term| term.weight == 0.0));
                }
            }
        }
    }
}
