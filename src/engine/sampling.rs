//! Per-request token sampling.
//!
//! [`RawSamplingParams`] mirrors the request fields. [`SamplingParams::validate`] turns it into
//! [`SamplingParams`], which has no sentinels: greedy decoding is its own [`Decoding`] variant
//! and every truncation is an `Option`. A [`Sampler`] owns one request's parameters and RNG and
//! turns one row of scores (normally the steered log-probabilities) into a [`SampledToken`].
//!
//! [`Sampler::sample`] processes a row in this order:
//!
//! 1. `logit_bias` is added.
//! 2. The repetition penalty divides positive and multiplies negative scores of every token
//!    seen in the prompt or the output (the Hugging Face transformers rule).
//! 3. Presence and frequency penalties are subtracted for tokens of the output only (OpenAI's
//!    rule: `score − count · frequency − [count > 0] · presence`).
//! 4. Greedy decoding stops here and takes the argmax, the lowest id on ties.
//! 5. Otherwise the scores are divided by the temperature. Min-p removes tokens below `min_p`
//!    times the top probability. Top-k keeps the `k` highest. Top-p keeps the smallest set of
//!    highest tokens whose probability reaches `top_p`. One token is drawn from what remains
//!    with the request's RNG.
//!
//! Min-p runs after temperature and before top-k and top-p, the order vLLM's V1 sampler
//! documents. The order matters for top-p only: min-p removes mass before top-p renormalises,
//! so top-p can keep fewer tokens than it would on the whole row.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use super::steering::{argmax, exp, lane_sum, max_and_argmax, LogNormaliser};

mod params;

pub use params::{
    AllowedRange, Decoding, Penalties, RandomSampling, RawSamplingParams, SamplingError,
    SamplingParameter, SamplingParams, TokenBias, MAX_TOP_LOGPROBS,
};

/// Size of the first sorted block when top-p runs without top-k. A larger nucleus doubles the
/// block until the nucleus fits.
const NUCLEUS_FIRST_BLOCK: usize = 64;

/// Occurrence counts of the tokens of one sequence, split into prompt and output, so that
/// penalties cost time in the number of distinct tokens rather than the sequence length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenHistory {
    prompt: HashMap<u32, u32>,
    output: HashMap<u32, u32>,
}

impl TokenHistory {
    /// Counts the tokens of `prompt`. The output starts empty.
    pub fn new(prompt: &[u32]) -> Self {
        let mut counts = HashMap::new();
        for &token in prompt {
            *counts.entry(token).or_insert(0) += 1;
        }
        Self {
            prompt: counts,
            output: HashMap::new(),
        }
    }

    /// Records one generated token.
    pub fn push(&mut self, token: u32) {
        *self.output.entry(token).or_insert(0) += 1;
    }

    /// Number of times `token` occurs in the prompt.
    pub fn prompt_count(&self, token: u32) -> u32 {
        self.prompt.get(&token).copied().unwrap_or(0)
    }

    /// Number of times `token` occurs in the output.
    pub fn output_count(&self, token: u32) -> u32 {
        self.output.get(&token).copied().unwrap_or(0)
    }

    /// Iterates over the distinct tokens of the prompt and the output, each once.
    fn seen_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        let output_only = self
            .output
            .keys()
            .filter(|token| !self.prompt.contains_key(token));
        self.prompt.keys().chain(output_only).copied()
    }
}

/// A token with its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    /// The token id.
    pub token: u32,
    /// Natural-log probability, at most 0.
    pub logprob: f32,
}

/// The outcome of one [`Sampler::sample`] call.
///
/// Log-probabilities come from the distribution after logit bias and penalties but before
/// temperature and truncation, so they describe what the (steered) model preferred rather than
/// the sampling settings. A token that truncation could never have picked still gets its
/// finite log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token id.
    pub token: u32,
    /// Log-probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens, highest first (lowest id on ties), as many as
    /// [`SamplingParams::top_logprobs`] requests. Empty when it is `None` or `Some(0)`. The
    /// chosen token appears only if it is among them.
    pub top_logprobs: Vec<TokenLogprob>,
}

/// The error of [`Sampler::sample`] on a row with no scores.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error("cannot sample from an empty row of scores")]
pub struct EmptyScoresError;

/// One token in the candidate list of a random draw.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    token: u32,
    /// Processed score, before temperature.
    score: f32,
    /// `exp((score − max) / temperature)`: the unnormalised probability after temperature.
    weight: f32,
}

/// Orders candidates from most to least likely, the lowest id first on ties, so every sort and
/// selection has one correct result whatever algorithm computes it.
fn most_likely_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.score.total_cmp(&a.score).then(a.token.cmp(&b.token))
}

/// Sorts the `count` most likely candidates to the front of `candidates` in
/// [`most_likely_first`] order, in O(n + count · log count).
fn sort_most_likely(candidates: &mut [Candidate], count: usize) {
    let count = count.min(candidates.len());
    if count == 0 {
        return;
    }
    if count < candidates.len() {
        candidates.select_nth_unstable_by(count - 1, most_likely_first);
    }
    candidates[..count].sort_unstable_by(most_likely_first);
}

/// The sampler of one request: its validated parameters, its own RNG and a reusable buffer.
///
/// Each request has its own RNG, so with a seed its draws do not depend on the other requests
/// in the batch.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Candidate list of one call, `(vocab,)` at most. Kept to avoid allocating a vocabulary-
    /// sized buffer per token.
    candidates: Vec<Candidate>,
}

impl Sampler {
    /// Creates the sampler of one request. The RNG is seeded from the request's `seed`, or from
    /// `fallback_seed` when the request set none. Give every request (and every choice of
    /// `n > 1`) its own fallback seed.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed().unwrap_or(fallback_seed));
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Returns the request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from one row of scores, `(vocab,)`.
    ///
    /// `scores` are log-probabilities (or raw logits, because the result only depends on
    /// differences between scores). They are updated in place: on return they hold the scores
    /// after logit bias and penalties. `history` supplies the counts for the penalties. The
    /// caller records the chosen token with [`TokenHistory::push`].
    ///
    /// Costs O(vocab), plus O(k log k) to sort the k tokens that top-k keeps. Top-p without
    /// top-k adds one O(vocab) selection per doubling of its sorted block, instead of sorting
    /// the whole row.
    pub fn sample(
        &mut self,
        scores: &mut [f32],
        history: &TokenHistory,
    ) -> Result<SampledToken, EmptyScoresError> {
        apply_logit_bias(scores, self.params.logit_bias());
        apply_repetition_penalty(scores, history, self.params.penalties().repetition);
        apply_output_penalties(scores, history, self.params.penalties());

        if scores.is_empty() {
            return Err(EmptyScoresError);
        }
        let (max_score, top) = max_and_argmax(scores);
        let token = match *self.params.decoding() {
            Decoding::Greedy => top.unwrap_or(0),
            Decoding::Random(random) => self
                .draw(scores, max_score, &random)
                .ok_or(EmptyScoresError)?,
        };

        let normaliser = LogNormaliser::with_max(scores, max_score);
        let logprob = normaliser.log_prob(scores[token as usize]);
        let top_logprobs = match self.params.top_logprobs() {
            Some(count) if count > 0 => self.most_likely(scores, count, normaliser),
            _ => Vec::new(),
        };
        Ok(SampledToken {
            token,
            logprob,
            top_logprobs,
        })
    }

    /// Draws a token after temperature, min-p, top-k and top-p. Returns `None` only for an
    /// empty row.
    fn draw(&mut self, scores: &[f32], max_score: f32, random: &RandomSampling) -> Option<u32> {
        let inverse_temperature = random.temperature.recip();
        let unit: f64 = self.rng.gen();
        let truncates = random.top_k.is_some_and(|k| k < scores.len())
            || random.top_p.is_some()
            || random.min_p.is_some();
        if !truncates {
            return draw_untruncated(scores, max_score, inverse_temperature, unit);
        }

        // p_i / p_max = exp((s_i − max) / T), so min-p compares scaled scores with ln(min_p).
        let scaled_floor = random.min_p.map_or(f32::NEG_INFINITY, f32::ln);
        let scale = |score: f32| (score - max_score) * inverse_temperature;
        self.candidates.clear();
        self.candidates.extend(
            (0_u32..)
                .zip(scores)
                .filter(|&(_, &score)| scale(score) >= scaled_floor)
                .map(|(token, &score)| Candidate {
                    token,
                    score,
                    weight: 0.0,
                }),
        );
        if self.candidates.is_empty() {
            // Only an empty row, or one whose maximum is not finite, gets here.
            return argmax(scores);
        }

        let mut sorted = false;
        if let Some(top_k) = random.top_k.filter(|&k| k < self.candidates.len()) {
            sort_most_likely(&mut self.candidates, top_k);
            self.candidates.truncate(top_k);
            sorted = true;
        }
        // Weights only for the tokens that survived, so top-k over a large row costs few exps.
        for candidate in &mut self.candidates {
            candidate.weight = exp(scale(candidate.score));
        }
        if let Some(top_p) = random.top_p {
            let keep = nucleus_len(&mut self.candidates, top_p, sorted);
            self.candidates.truncate(keep);
        }
        pick_by_weight(&self.candidates, unit)
    }

    /// Finds the `count` most likely tokens of the processed row with their log-probabilities.
    fn most_likely(
        &mut self,
        scores: &[f32],
        count: usize,
        normaliser: LogNormaliser,
    ) -> Vec<TokenLogprob> {
        self.candidates.clear();
        self.candidates
            .extend((0_u32..).zip(scores).map(|(token, &score)| Candidate {
                token,
                score,
                weight: 0.0,
            }));
        sort_most_likely(&mut self.candidates, count);
        self.candidates
            .iter()
            .take(count)
            .map(|candidate| TokenLogprob {
                token: candidate.token,
                logprob: normaliser.log_prob(candidate.score),
            })
            .collect()
    }
}

fn apply_logit_bias(scores: &mut [f32], biases: &[TokenBias]) {
    for entry in biases {
        if let Some(score) = scores.get_mut(entry.token as usize) {
            *score += entry.bias;
        }
    }
}

fn apply_repetition_penalty(scores: &mut [f32], history: &TokenHistory, penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    for token in history.seen_tokens() {
        if let Some(score) = scores.get_mut(token as usize) {
            *score = if *score > 0.0 {
                *score / penalty
            } else {
                *score * penalty
            };
        }
    }
}

fn apply_output_penalties(scores: &mut [f32], history: &TokenHistory, penalties: &Penalties) {
    if penalties.presence == 0.0 && penalties.frequency == 0.0 {
        return;
    }
    for (&token, &count) in &history.output {
        if let Some(score) = scores.get_mut(token as usize) {
            *score -= count as f32 * penalties.frequency + penalties.presence;
        }
    }
}

/// Returns how many of the most likely candidates form the top-p nucleus: the shortest prefix
/// whose weight reaches `top_p` of the total weight (at least 1). Sorts that prefix to the
/// front of `candidates`.
///
/// When `candidates` is not yet sorted, it sorts a block of [`NUCLEUS_FIRST_BLOCK`] candidates,
/// then blocks of doubling size, until the nucleus ends inside one. Each block costs one
/// O(n) selection plus the sort of the block, so a nucleus of m tokens costs about
/// O(n · log2(m / 64) + m log m) instead of O(n log n) for sorting the whole row.
fn nucleus_len(candidates: &mut [Candidate], top_p: f32, sorted: bool) -> usize {
    let total: f64 = candidates.iter().map(|c| f64::from(c.weight)).sum();
    let target = f64::from(top_p) * total;
    let mut cumulative = 0.0_f64;
    let mut start = 0;
    let mut block = NUCLEUS_FIRST_BLOCK;
    while start < candidates.len() {
        let rest = &mut candidates[start..];
        let len = block.min(rest.len());
        if !sorted {
            sort_most_likely(rest, len);
        }
        for (offset, candidate) in rest[..len].iter().enumerate() {
            cumulative += f64::from(candidate.weight);
            if cumulative >= target {
                return start + offset + 1;
            }
        }
        start += len;
        block = block.saturating_mul(2);
    }
    // Rounding can leave the sum just short of the target: then every candidate stays.
    candidates.len()
}

/// Draws from the whole row given a uniform `unit` in [0, 1), without a candidate list: one
/// vectorised pass sums the weights, then a walk in id order stops at the drawn token. Falls
/// back to the argmax when no token has a positive weight (a row whose maximum is not finite).
fn draw_untruncated(
    scores: &[f32],
    max_score: f32,
    inverse_temperature: f32,
    unit: f64,
) -> Option<u32> {
    let weight = |score: f32| exp((score - max_score) * inverse_temperature);
    let total = lane_sum(scores, scores, |score, _| weight(score));
    let target = unit * total;
    let mut cumulative = 0.0_f64;
    let mut last_possible = None;
    for (token, &score) in (0_u32..).zip(scores) {
        let token_weight = weight(score);
        if token_weight > 0.0 {
            cumulative += f64::from(token_weight);
            last_possible = Some(token);
            if cumulative > target {
                return Some(token);
            }
        }
    }
    // Rounding can leave the running sum at or just below `target`.
    last_possible.or_else(|| argmax(scores))
}

/// Picks a candidate with probability proportional to its weight, given a uniform `unit` in
/// [0, 1). Returns `None` only when `candidates` is empty, and the first candidate when every
/// weight is 0.
fn pick_by_weight(candidates: &[Candidate], unit: f64) -> Option<u32> {
    let total: f64 = candidates.iter().map(|c| f64::from(c.weight)).sum();
    let target = unit * total;
    let mut cumulative = 0.0_f64;
    let mut last_possible = candidates.first()?.token;
    for candidate in candidates.iter().filter(|c| c.weight > 0.0) {
        cumulative += f64::from(candidate.weight);
        last_possible = candidate.token;
        if cumulative > target {
            return Some(candidate.token);
        }
    }
    // Rounding can leave the running sum at or just below `target`.
    Some(last_possible)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type TestResultOf<T> = Result<T, Box<dyn std::error::Error>>;
    type TestResult = TestResultOf<()>;

    const VOCAB: usize = 49_152;

    fn log_probs(probabilities: &[f32]) -> Vec<f32> {
        probabilities.iter().map(|p| p.ln()).collect()
    }

    use super::params::tests::{logit_bias, random};

    fn sampler(raw: RawSamplingParams, fallback_seed: u64) -> Result<Sampler, SamplingError> {
        Ok(Sampler::new(
            SamplingParams::validate(raw, VOCAB)?,
            fallback_seed,
        ))
    }

    /// Draws `draws` tokens from fresh copies of `scores` and returns the frequency of each.
    fn frequencies(sampler: &mut Sampler, scores: &[f32], draws: usize) -> TestResultOf<Vec<f64>> {
        let history = TokenHistory::default();
        let mut counts = vec![0_usize; scores.len()];
        for _ in 0..draws {
            let mut row = scores.to_vec();
            let sampled = sampler.sample(&mut row, &history)?;
            counts[sampled.token as usize] += 1;
        }
        Ok(counts.iter().map(|&c| c as f64 / draws as f64).collect())
    }

    fn assert_frequencies(actual: &[f64], expected: &[f64], tolerance: f64) {
        assert_eq!(actual.len(), expected.len(), "lengths differ");
        for (token, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance,
                "token {token}: frequency {a}, expected {e} ± {tolerance}"
            );
        }
    }

    #[test]
    fn token_history_counts_prompt_and_output() {
        let mut history = TokenHistory::new(&[5, 5, 9]);
        history.push(9);
        history.push(1);
        history.push(1);
        assert_eq!(history.prompt_count(5), 2);
        assert_eq!(history.prompt_count(1), 0);
        assert_eq!(history.output_count(1), 2);
        assert_eq!(history.output_count(9), 1);
        let mut seen: Vec<u32> = history.seen_tokens().collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 5, 9]);
    }

    #[test]
    fn greedy_picks_most_likely_token() -> TestResult {
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0);
        let mut scores = log_probs(&[0.2, 0.5, 0.3]);
        let sampled = sampler.sample(&mut scores, &TokenHistory::default())?;
        assert_eq!(sampled.token, 1);
        assert!((sampled.logprob - 0.5_f32.ln()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn greedy_breaks_ties_by_lowest_id() -> TestResult {
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0);
        let mut scores = vec![-3.0, -1.0, -2.0, -1.0];
        let sampled = sampler.sample(&mut scores, &TokenHistory::default())?;
        assert_eq!(sampled.token, 1);
        Ok(())
    }

    #[test]
    fn logit_bias_changes_greedy_choice() -> TestResult {
        let raw = RawSamplingParams {
            temperature: Some(0.0),
            ..logit_bias(&[("2", 5.0)])
        };
        let mut sampler = sampler(raw, 0)?;
        let mut scores = log_probs(&[0.6, 0.3, 0.1]);
        let sampled = sampler.sample(&mut scores, &TokenHistory::default())?;
        assert_eq!(sampled.token, 2);
        Ok(())
    }

    #[test]
    fn negative_logit_bias_bans_token() -> TestResult {
        let mut sampler = sampler(logit_bias(&[("0", -100.0)]), 3)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.9, 0.05, 0.05]), 2_000)?;
        assert_eq!(found[0], 0.0);
        Ok(())
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() -> TestResult {
        let raw = RawSamplingParams {
            temperature: Some(0.0),
            repetition_penalty: Some(2.0),
            ..RawSamplingParams::default()
        };
        let mut sampler = sampler(raw, 0)?;
        let mut history = TokenHistory::new(&[0, 0]);
        history.push(1);
        let mut scores = vec![2.0, -2.0, 1.0, 0.5];
        let sampled = sampler.sample(&mut scores, &history)?;
        assert_eq!(scores, vec![1.0, -4.0, 1.0, 0.5]);
        assert_eq!(sampled.token, 0);
        Ok(())
    }

    #[test]
    fn presence_and_frequency_penalise_output_only() -> TestResult {
        let raw = RawSamplingParams {
            temperature: Some(0.0),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(0.25),
            ..RawSamplingParams::default()
        };
        let mut sampler = sampler(raw, 0)?;
        let mut history = TokenHistory::new(&[0, 3]);
        for token in [1, 1, 2] {
            history.push(token);
        }
        let mut scores = vec![-1.0, -1.0, -1.0, -1.0];
        sampler.sample(&mut scores, &history)?;
        assert_eq!(scores, vec![-1.0, -2.0, -1.75, -1.0]);
        Ok(())
    }

    #[test]
    fn same_seed_gives_same_tokens() -> TestResult {
        let scores = log_probs(&[0.1, 0.2, 0.05, 0.15, 0.1, 0.1, 0.2, 0.1]);
        let raw = RawSamplingParams {
            seed: Some(42),
            ..random(1.0)
        };
        let history = TokenHistory::default();
        // The request's seed wins over the fallback seeds, which differ.
        let mut first = sampler(raw.clone(), 1)?;
        let mut second = sampler(raw, 2)?;
        let mut other = sampler(random(1.0), 7)?;
        let mut first_tokens = Vec::new();
        let mut second_tokens = Vec::new();
        let mut other_tokens = Vec::new();
        for _ in 0..100 {
            first_tokens.push(first.sample(&mut scores.clone(), &history)?.token);
            second_tokens.push(second.sample(&mut scores.clone(), &history)?.token);
            other_tokens.push(other.sample(&mut scores.clone(), &history)?.token);
        }
        assert_eq!(first_tokens, second_tokens);
        assert_ne!(first_tokens, other_tokens);
        Ok(())
    }

    #[test]
    fn draws_ignore_other_requests() -> TestResult {
        let scores = log_probs(&[0.25, 0.25, 0.25, 0.25]);
        let history = TokenHistory::default();
        let mut alone = sampler(random(1.0), 11)?;
        let mut interleaved = sampler(random(1.0), 11)?;
        let mut neighbour = sampler(random(1.0), 12)?;
        for _ in 0..50 {
            neighbour.sample(&mut scores.clone(), &history)?;
            let expected = alone.sample(&mut scores.clone(), &history)?;
            let actual = interleaved.sample(&mut scores.clone(), &history)?;
            assert_eq!(actual, expected);
        }
        Ok(())
    }

    #[test]
    fn draws_follow_distribution() -> TestResult {
        let mut sampler = sampler(random(1.0), 5)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.6, 0.3, 0.1]), 20_000)?;
        assert_frequencies(&found, &[0.6, 0.3, 0.1], 0.015);
        Ok(())
    }

    #[test]
    fn temperature_two_flattens_distribution() -> TestResult {
        let mut sampler = sampler(random(2.0), 6)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.6, 0.3, 0.1]), 20_000)?;
        // p^(1/2) normalised: (0.7746, 0.5477, 0.3162) / 1.6385.
        assert_frequencies(&found, &[0.4727, 0.3343, 0.1930], 0.015);
        Ok(())
    }

    #[test]
    fn top_k_one_is_greedy() -> TestResult {
        let raw = RawSamplingParams {
            top_k: Some(1),
            ..random(2.0)
        };
        let mut sampler = sampler(raw, 8)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.3, 0.4, 0.3]), 500)?;
        assert_eq!(found, vec![0.0, 1.0, 0.0]);
        Ok(())
    }

    #[test]
    fn top_p_keeps_nucleus() -> TestResult {
        let raw = RawSamplingParams {
            top_p: Some(0.7),
            ..random(1.0)
        };
        let mut sampler = sampler(raw, 9)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.5, 0.3, 0.15, 0.05]), 20_000)?;
        assert_frequencies(&found, &[0.625, 0.375, 0.0, 0.0], 0.015);
        assert_eq!(found[2], 0.0);
        assert_eq!(found[3], 0.0);
        Ok(())
    }

    #[test]
    fn min_p_drops_tokens_below_ratio() -> TestResult {
        let raw = RawSamplingParams {
            min_p: Some(0.5),
            ..random(1.0)
        };
        let mut sampler = sampler(raw, 10)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.5, 0.3, 0.15, 0.05]), 20_000)?;
        assert_frequencies(&found, &[0.625, 0.375, 0.0, 0.0], 0.015);
        assert_eq!(found[2], 0.0);
        assert_eq!(found[3], 0.0);
        Ok(())
    }

    #[test]
    fn min_p_runs_before_top_p() -> TestResult {
        // min_p 0.6 keeps tokens 0 and 1 (p ≥ 0.24), which renormalise to (0.571, 0.429), so
        // top_p 0.5 then keeps token 0 alone. Top-p first would have kept both.
        let raw = RawSamplingParams {
            min_p: Some(0.6),
            top_p: Some(0.5),
            ..random(1.0)
        };
        let mut sampler = sampler(raw, 12)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.4, 0.3, 0.2, 0.1]), 500)?;
        assert_eq!(found, vec![1.0, 0.0, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn top_k_then_top_p_renormalises() -> TestResult {
        // top_k 2 leaves (0.4, 0.3) → (0.571, 0.429). top_p 0.5 then keeps token 0 alone.
        let raw = RawSamplingParams {
            top_k: Some(2),
            top_p: Some(0.5),
            ..random(1.0)
        };
        let mut sampler = sampler(raw, 13)?;
        let found = frequencies(&mut sampler, &log_probs(&[0.4, 0.3, 0.2, 0.1]), 500)?;
        assert_eq!(found, vec![1.0, 0.0, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn logprobs_ignore_temperature_and_truncation() -> TestResult {
        let raw = RawSamplingParams {
            top_k: Some(2),
            top_logprobs: Some(2),
            ..random(0.3)
        };
        let mut sampler = sampler(raw, 14)?;
        let probabilities = [0.6_f32, 0.3, 0.1];
        for _ in 0..20 {
            let mut scores = log_probs(&probabilities);
            let sampled = sampler.sample(&mut scores, &TokenHistory::default())?;
            let expected = probabilities[sampled.token as usize].ln();
            assert!((sampled.logprob - expected).abs() < 1e-6);
            assert_eq!(sampled.top_logprobs.len(), 2);
            assert_eq!(sampled.top_logprobs[0].token, 0);
            assert!((sampled.top_logprobs[0].logprob - 0.6_f32.ln()).abs() < 1e-6);
            assert_eq!(sampled.top_logprobs[1].token, 1);
            assert!((sampled.top_logprobs[1].logprob - 0.3_f32.ln()).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn logprobs_include_logit_bias() -> TestResult {
        // A bias of ln 2 on token 2 turns (0.6, 0.3, 0.1) into (0.6, 0.3, 0.2) / 1.1.
        let raw = RawSamplingParams {
            temperature: Some(0.0),
            top_logprobs: Some(3),
            ..logit_bias(&[("2", 2.0_f32.ln())])
        };
        let mut sampler = sampler(raw, 0)?;
        let mut scores = log_probs(&[0.6, 0.3, 0.1]);
        let sampled = sampler.sample(&mut scores, &TokenHistory::default())?;
        let tokens: Vec<u32> = sampled.top_logprobs.iter().map(|t| t.token).collect();
        assert_eq!(tokens, vec![0, 1, 2]);
        let expected = [0.6_f32 / 1.1, 0.3 / 1.1, 0.2 / 1.1];
        for (entry, p) in sampled.top_logprobs.iter().zip(expected) {
            assert!((entry.logprob - p.ln()).abs() < 1e-6, "{entry:?} vs {p}");
        }
        Ok(())
    }

    #[test]
    fn top_logprobs_zero_reports_chosen_only() -> TestResult {
        let raw = RawSamplingParams {
            top_logprobs: Some(0),
            ..random(0.0)
        };
        let mut sampler = sampler(raw, 0)?;
        let sampled = sampler.sample(&mut log_probs(&[0.6, 0.4]), &TokenHistory::default())?;
        assert!(sampled.top_logprobs.is_empty());
        assert!((sampled.logprob - 0.6_f32.ln()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn top_logprobs_stop_at_vocab_size() -> TestResult {
        let raw = RawSamplingParams {
            top_logprobs: Some(20),
            ..random(0.0)
        };
        let mut sampler = sampler(raw, 0)?;
        let sampled = sampler.sample(&mut log_probs(&[0.6, 0.4]), &TokenHistory::default())?;
        assert_eq!(sampled.top_logprobs.len(), 2);
        Ok(())
    }

    #[test]
    fn sample_rejects_empty_row() {
        let history = TokenHistory::default();
        let mut greedy = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(greedy.sample(&mut [], &history), Err(EmptyScoresError));
        let mut random = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(random.sample(&mut [], &history), Err(EmptyScoresError));
    }

    #[test]
    fn sample_handles_full_vocabulary_with_top_p() -> TestResult {
        // Logits spread wide enough that the 0.95 nucleus needs several sorted blocks.
        let scores: Vec<f32> = (0..VOCAB)
            .map(|i| ((i * 7_919) % 1_000) as f32 / 100.0)
            .collect();
        let raw = RawSamplingParams {
            top_p: Some(0.95),
            ..random(1.0)
        };
        let mut sampler = sampler(raw, 15)?;
        let history = TokenHistory::default();
        for _ in 0..20 {
            let sampled = sampler.sample(&mut scores.clone(), &history)?;
            assert!((sampled.token as usize) < VOCAB);
            assert!(scores[sampled.token as usize] > 5.0);
        }
        Ok(())
    }

    fn candidates_from(scores: &[f32]) -> Vec<Candidate> {
        (0_u32..)
            .zip(scores)
            .map(|(token, &score)| Candidate {
                token,
                score,
                weight: score.exp(),
            })
            .collect()
    }

    fn tokens(candidates: &[Candidate]) -> Vec<u32> {
        candidates.iter().map(|c| c.token).collect()
    }

    /// Scores with repeats, so ties between tokens are common.
    fn score_rows() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec((-40_i32..10).prop_map(|x| x as f32 / 4.0), 1..700)
    }

    proptest! {
        #[test]
        fn sort_most_likely_matches_full_sort(scores in score_rows(), count in 1_usize..800) {
            let mut partial = candidates_from(&scores);
            sort_most_likely(&mut partial, count);
            let mut full = candidates_from(&scores);
            full.sort_by(most_likely_first);
            let kept = count.min(scores.len());
            prop_assert_eq!(tokens(&partial[..kept]), tokens(&full[..kept]));
        }

        #[test]
        fn nucleus_len_matches_full_sort(scores in score_rows(), top_p in 0.01_f32..0.999) {
            let mut partial = candidates_from(&scores);
            let partial_len = nucleus_len(&mut partial, top_p, false);
            let mut full = candidates_from(&scores);
            full.sort_by(most_likely_first);
            let full_len = nucleus_len(&mut full, top_p, true);
            prop_assert_eq!(partial_len, full_len);
            prop_assert_eq!(tokens(&partial[..partial_len]), tokens(&full[..full_len]));
        }
    }
}
