//! Sampling parameters: the raw request fields and their validation into [`SamplingParams`].
//!
//! Ranges follow OpenAI's API for its fields (`temperature`, `top_p`, the penalties,
//! `logit_bias`, `top_logprobs`). The extensions accept `top_k` of at least 1, `min_p` from 0
//! to 1 and `repetition_penalty` above 0.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

/// The largest number of alternatives a request can get per token, as in OpenAI's API.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The temperature a request gets when it sets none (OpenAI's default).
const DEFAULT_TEMPERATURE: f32 = 1.0;

/// Sampling fields of a request as the client sent them. Absent fields take OpenAI's defaults
/// in [`SamplingParams::validate`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSamplingParams {
    /// `temperature`, 0 to 2. 0 selects greedy decoding. Defaults to 1.
    pub temperature: Option<f32>,
    /// `top_k` (extension), at least 1.
    pub top_k: Option<i64>,
    /// `top_p`, greater than 0 and at most 1.
    pub top_p: Option<f32>,
    /// `min_p` (extension), 0 to 1.
    pub min_p: Option<f32>,
    /// `presence_penalty`, −2 to 2. Defaults to 0.
    pub presence_penalty: Option<f32>,
    /// `frequency_penalty`, −2 to 2. Defaults to 0.
    pub frequency_penalty: Option<f32>,
    /// `repetition_penalty` (extension), greater than 0. Defaults to 1, which is no penalty.
    pub repetition_penalty: Option<f32>,
    /// `logit_bias`: token ids written as decimal strings, mapped to biases from −100 to 100.
    pub logit_bias: BTreeMap<String, f32>,
    /// `seed`.
    pub seed: Option<u64>,
    /// Number of most likely alternatives to report per token (`top_logprobs` in chat,
    /// `logprobs` in completions), 0 to [`MAX_TOP_LOGPROBS`]. `None` reports no
    /// log-probabilities.
    pub top_logprobs: Option<i64>,
}

/// Validated sampling parameters of one request.
///
/// The only way to build one is [`SamplingParams::validate`] (or the two presets), so every
/// value inside is in range.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    decoding: Decoding,
    penalties: Penalties,
    logit_bias: Vec<TokenBias>,
    seed: Option<u64>,
    top_logprobs: Option<usize>,
}

/// Rule for choosing the next token from the processed scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The most likely token, the lowest id on ties (`temperature: 0`).
    Greedy,
    /// A draw from the tempered and truncated distribution.
    Random(RandomSampling),
}

/// Temperature and truncation settings of [`Decoding::Random`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomSampling {
    /// Divisor of the scores before the softmax, greater than 0 and at most 2.
    pub temperature: f32,
    /// Number of highest tokens kept, at least 1.
    pub top_k: Option<usize>,
    /// Probability mass of the nucleus, greater than 0 and less than 1. A request's `top_p` of
    /// 1 keeps every token and is stored as `None`.
    pub top_p: Option<f32>,
    /// Minimum probability relative to the top token, greater than 0 and at most 1. A
    /// request's `min_p` of 0 is stored as `None`.
    pub min_p: Option<f32>,
}

/// Penalties for tokens that already occurred. The neutral values (1 for repetition, 0 for the
/// others) leave the scores unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token present in the output, −2 to 2.
    pub presence: f32,
    /// Subtracted from every output token once per occurrence, −2 to 2.
    pub frequency: f32,
    /// Divides positive and multiplies negative scores of tokens in the prompt or the output.
    /// Greater than 0.
    pub repetition: f32,
}

/// A bias added to one token's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBias {
    /// The token id, below the vocabulary size.
    pub token: u32,
    /// The value added, −100 to 100.
    pub bias: f32,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, no truncation, no penalties, no bias.
    fn default() -> Self {
        Self {
            decoding: Decoding::Random(RandomSampling {
                temperature: DEFAULT_TEMPERATURE,
                top_k: None,
                top_p: None,
                min_p: None,
            }),
            penalties: Penalties::NONE,
            logit_bias: Vec::new(),
            seed: None,
            top_logprobs: None,
        }
    }
}

impl Penalties {
    /// Penalties that change nothing.
    pub const NONE: Self = Self {
        presence: 0.0,
        frequency: 0.0,
        repetition: 1.0,
    };
}

impl SamplingParams {
    /// Greedy decoding with no penalties, bias or log-probabilities.
    pub fn greedy() -> Self {
        Self {
            decoding: Decoding::Greedy,
            ..Self::default()
        }
    }

    /// Checks every field of `raw` against OpenAI's ranges (and the ranges of the extensions)
    /// and resolves defaults. `vocab_size` bounds the `logit_bias` token ids.
    pub fn validate(raw: RawSamplingParams, vocab_size: usize) -> Result<Self, SamplingError> {
        let decoding = validate_decoding(&raw)?;
        let penalties = Penalties {
            presence: check_float(
                SamplingParameter::PresencePenalty,
                raw.presence_penalty.unwrap_or(0.0),
                PENALTY_RANGE,
            )?,
            frequency: check_float(
                SamplingParameter::FrequencyPenalty,
                raw.frequency_penalty.unwrap_or(0.0),
                PENALTY_RANGE,
            )?,
            repetition: check_float(
                SamplingParameter::RepetitionPenalty,
                raw.repetition_penalty.unwrap_or(1.0),
                AllowedRange::GreaterThan { min: 0.0 },
            )?,
        };
        let logit_bias = validate_logit_bias(&raw.logit_bias, vocab_size)?;
        let top_logprobs = raw
            .top_logprobs
            .map(|count| {
                let range = AllowedRange::Closed {
                    min: 0.0,
                    max: MAX_TOP_LOGPROBS as f64,
                };
                check_count(SamplingParameter::TopLogprobs, count, range)
            })
            .transpose()?;
        Ok(Self {
            decoding,
            penalties,
            logit_bias,
            seed: raw.seed,
            top_logprobs,
        })
    }

    /// Returns the rule for choosing the next token.
    pub fn decoding(&self) -> &Decoding {
        &self.decoding
    }

    /// Returns the penalties for repeated tokens.
    pub fn penalties(&self) -> &Penalties {
        &self.penalties
    }

    /// Returns the biases sorted by token id, at most one per token.
    pub fn logit_bias(&self) -> &[TokenBias] {
        &self.logit_bias
    }

    /// Returns the request's seed, if it set one.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The same parameters with another seed; the engine gives each choice of `n > 1` its own.
    pub fn with_seed(mut self, seed: Option<u64>) -> Self {
        self.seed = seed;
        self
    }

    /// Returns the number of alternatives reported per token: `None` when the request wants
    /// no log-probabilities, `Some(0)` when it wants only the chosen token's.
    pub fn top_logprobs(&self) -> Option<usize> {
        self.top_logprobs
    }
}

const PENALTY_RANGE: AllowedRange = AllowedRange::Closed {
    min: -2.0,
    max: 2.0,
};

const LOGIT_BIAS_RANGE: AllowedRange = AllowedRange::Closed {
    min: -100.0,
    max: 100.0,
};

fn validate_decoding(raw: &RawSamplingParams) -> Result<Decoding, SamplingError> {
    let temperature = check_float(
        SamplingParameter::Temperature,
        raw.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        AllowedRange::Closed { min: 0.0, max: 2.0 },
    )?;
    let top_k = raw
        .top_k
        .map(|k| {
            check_count(
                SamplingParameter::TopK,
                k,
                AllowedRange::AtLeast { min: 1.0 },
            )
        })
        .transpose()?;
    let top_p = raw
        .top_p
        .map(|p| {
            let range = AllowedRange::LeftOpen { min: 0.0, max: 1.0 };
            check_float(SamplingParameter::TopP, p, range)
        })
        .transpose()?
        .filter(|&p| p < 1.0);
    let min_p = raw
        .min_p
        .map(|p| {
            let range = AllowedRange::Closed { min: 0.0, max: 1.0 };
            check_float(SamplingParameter::MinP, p, range)
        })
        .transpose()?
        .filter(|&p| p > 0.0);

    // Truncation settings are checked above even for greedy requests, so an invalid value is
    // reported whatever the temperature.
    if temperature == 0.0 {
        return Ok(Decoding::Greedy);
    }
    Ok(Decoding::Random(RandomSampling {
        temperature,
        top_k,
        top_p,
        min_p,
    }))
}

fn validate_logit_bias(
    raw: &BTreeMap<String, f32>,
    vocab_size: usize,
) -> Result<Vec<TokenBias>, SamplingError> {
    let mut biases = Vec::with_capacity(raw.len());
    for (key, &bias) in raw {
        let token = key
            .parse::<u64>()
            .map_err(|_| SamplingError::LogitBiasInvalidKey { key: key.clone() })?;
        let token = u32::try_from(token)
            .ok()
            .filter(|&token| (token as usize) < vocab_size)
            .ok_or(SamplingError::LogitBiasUnknownToken { token, vocab_size })?;
        if !LOGIT_BIAS_RANGE.contains(f64::from(bias)) {
            return Err(SamplingError::LogitBiasOutOfRange { token, value: bias });
        }
        biases.push(TokenBias { token, bias });
    }
    biases.sort_by_key(|entry| entry.token);
    if let Some(pair) = biases
        .windows(2)
        .find(|pair| pair[0].token == pair[1].token)
    {
        return Err(SamplingError::LogitBiasDuplicateToken {
            token: pair[0].token,
        });
    }
    Ok(biases)
}

fn check_float(
    parameter: SamplingParameter,
    value: f32,
    allowed: AllowedRange,
) -> Result<f32, SamplingError> {
    if allowed.contains(f64::from(value)) {
        Ok(value)
    } else {
        Err(SamplingError::OutOfRange {
            parameter,
            value,
            allowed,
        })
    }
}

fn check_count(
    parameter: SamplingParameter,
    value: i64,
    allowed: AllowedRange,
) -> Result<usize, SamplingError> {
    usize::try_from(value)
        .ok()
        .filter(|_| allowed.contains(value as f64))
        .ok_or(SamplingError::CountOutOfRange {
            parameter,
            value,
            allowed,
        })
}

/// Errors raised by [`SamplingParams::validate`]. Each is a client mistake and names the
/// request field at fault (see [`SamplingError::parameter`]).
#[derive(Debug, Clone, Error, PartialEq)]
pub enum SamplingError {
    /// A real-valued parameter is outside its range (or NaN).
    #[error("`{parameter}` must be {allowed}, got {value}")]
    OutOfRange {
        /// The request field.
        parameter: SamplingParameter,
        /// The value received.
        value: f32,
        /// The values accepted.
        allowed: AllowedRange,
    },

    /// An integer parameter is outside its range.
    #[error("`{parameter}` must be {allowed}, got {value}")]
    CountOutOfRange {
        /// The request field.
        parameter: SamplingParameter,
        /// The value received.
        value: i64,
        /// The values accepted.
        allowed: AllowedRange,
    },

    /// A `logit_bias` key is not a decimal token id.
    #[error("`logit_bias` key `{key}` is not a token id; keys must be non-negative integers")]
    LogitBiasInvalidKey {
        /// The key received.
        key: String,
    },

    /// A `logit_bias` key is a token id outside the vocabulary.
    #[error(
        "`logit_bias` names token {token}, but the vocabulary has {vocab_size} tokens \
         (ids below {vocab_size})"
    )]
    LogitBiasUnknownToken {
        /// The token id received.
        token: u64,
        /// Number of tokens in the patient's vocabulary.
        vocab_size: usize,
    },

    /// A `logit_bias` value is outside −100 to 100.
    #[error("`logit_bias` for token {token} must be between -100 and 100, got {value}")]
    LogitBiasOutOfRange {
        /// The token id.
        token: u32,
        /// The bias received.
        value: f32,
    },

    /// Two `logit_bias` keys name the same token (for example `"7"` and `"07"`).
    #[error("`logit_bias` sets token {token} more than once")]
    LogitBiasDuplicateToken {
        /// The token id.
        token: u32,
    },
}

impl SamplingError {
    /// Returns the request field at fault, for the `param` member of an OpenAI error.
    pub fn parameter(&self) -> SamplingParameter {
        match self {
            Self::OutOfRange { parameter, .. } | Self::CountOutOfRange { parameter, .. } => {
                *parameter
            }
            Self::LogitBiasInvalidKey { .. }
            | Self::LogitBiasUnknownToken { .. }
            | Self::LogitBiasOutOfRange { .. }
            | Self::LogitBiasDuplicateToken { .. } => SamplingParameter::LogitBias,
        }
    }
}

/// A sampling field of a request, displayed as its JSON name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplingParameter {
    /// `temperature`.
    Temperature,
    /// `top_k`.
    TopK,
    /// `top_p`.
    TopP,
    /// `min_p`.
    MinP,
    /// `presence_penalty`.
    PresencePenalty,
    /// `frequency_penalty`.
    FrequencyPenalty,
    /// `repetition_penalty`.
    RepetitionPenalty,
    /// `logit_bias`.
    LogitBias,
    /// `top_logprobs`.
    TopLogprobs,
}

impl SamplingParameter {
    /// Returns the field's name in the request JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Temperature => "temperature",
            Self::TopK => "top_k",
            Self::TopP => "top_p",
            Self::MinP => "min_p",
            Self::PresencePenalty => "presence_penalty",
            Self::FrequencyPenalty => "frequency_penalty",
            Self::RepetitionPenalty => "repetition_penalty",
            Self::LogitBias => "logit_bias",
            Self::TopLogprobs => "top_logprobs",
        }
    }
}

impl fmt::Display for SamplingParameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The values a parameter accepts. Displayed as the end of "must be …" in error messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AllowedRange {
    /// `min ≤ value ≤ max`.
    Closed {
        /// Smallest accepted value.
        min: f64,
        /// Largest accepted value.
        max: f64,
    },
    /// `min < value ≤ max`.
    LeftOpen {
        /// Largest rejected lower value.
        min: f64,
        /// Largest accepted value.
        max: f64,
    },
    /// `min < value`, and finite.
    GreaterThan {
        /// Largest rejected value.
        min: f64,
    },
    /// `min ≤ value`.
    AtLeast {
        /// Smallest accepted value.
        min: f64,
    },
}

impl AllowedRange {
    /// Reports whether `value` is accepted. NaN never is.
    pub fn contains(self, value: f64) -> bool {
        match self {
            Self::Closed { min, max } => min <= value && value <= max,
            Self::LeftOpen { min, max } => min < value && value <= max,
            Self::GreaterThan { min } => min < value && value.is_finite(),
            Self::AtLeast { min } => min <= value,
        }
    }
}

impl fmt::Display for AllowedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed { min, max } => write!(f, "between {min} and {max}"),
            Self::LeftOpen { min, max } => write!(f, "greater than {min} and at most {max}"),
            Self::GreaterThan { min } => write!(f, "a finite number greater than {min}"),
            Self::AtLeast { min } => write!(f, "at least {min}"),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const VOCAB: usize = 49_152;

    pub(in crate::engine::sampling) fn random(temperature: f32) -> RawSamplingParams {
        RawSamplingParams {
            temperature: Some(temperature),
            ..RawSamplingParams::default()
        }
    }

    fn validation_message(raw: RawSamplingParams) -> String {
        match SamplingParams::validate(raw, VOCAB) {
            Ok(params) => format!("accepted: {params:?}"),
            Err(error) => error.to_string(),
        }
    }

    pub(in crate::engine::sampling) fn logit_bias(entries: &[(&str, f32)]) -> RawSamplingParams {
        RawSamplingParams {
            logit_bias: entries
                .iter()
                .map(|&(key, bias)| (key.to_owned(), bias))
                .collect(),
            ..RawSamplingParams::default()
        }
    }

    #[test]
    fn validate_applies_openai_defaults() -> TestResult {
        let params = SamplingParams::validate(RawSamplingParams::default(), VOCAB)?;
        assert_eq!(params, SamplingParams::default());
        assert_eq!(
            params.decoding(),
            &Decoding::Random(RandomSampling {
                temperature: 1.0,
                top_k: None,
                top_p: None,
                min_p: None,
            })
        );
        assert_eq!(params.penalties(), &Penalties::NONE);
        assert_eq!(params.top_logprobs(), None);
        Ok(())
    }

    #[test]
    fn validate_maps_zero_temperature_to_greedy() -> TestResult {
        let params = SamplingParams::validate(random(0.0), VOCAB)?;
        assert_eq!(params.decoding(), &Decoding::Greedy);
        Ok(())
    }

    #[test]
    fn validate_drops_neutral_truncation() -> TestResult {
        let raw = RawSamplingParams {
            top_p: Some(1.0),
            min_p: Some(0.0),
            top_k: Some(40),
            ..RawSamplingParams::default()
        };
        let params = SamplingParams::validate(raw, VOCAB)?;
        let Decoding::Random(random) = params.decoding() else {
            panic!("expected random sampling, got {:?}", params.decoding());
        };
        assert_eq!(random.top_p, None);
        assert_eq!(random.min_p, None);
        assert_eq!(random.top_k, Some(40));
        Ok(())
    }

    #[test]
    fn validate_rejects_temperature_above_two() {
        let result = SamplingParams::validate(random(3.5), VOCAB);
        let Err(error) = result else {
            panic!("temperature 3.5 was accepted");
        };
        assert_eq!(
            error.to_string(),
            "`temperature` must be between 0 and 2, got 3.5"
        );
        assert_eq!(error.parameter(), SamplingParameter::Temperature);
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        let cases = [
            (
                random(f32::NAN),
                "`temperature` must be between 0 and 2, got NaN",
            ),
            (
                random(-0.5),
                "`temperature` must be between 0 and 2, got -0.5",
            ),
            (
                RawSamplingParams {
                    top_p: Some(0.0),
                    ..RawSamplingParams::default()
                },
                "`top_p` must be greater than 0 and at most 1, got 0",
            ),
            (
                RawSamplingParams {
                    top_k: Some(0),
                    ..RawSamplingParams::default()
                },
                "`top_k` must be at least 1, got 0",
            ),
            (
                RawSamplingParams {
                    top_k: Some(-1),
                    ..RawSamplingParams::default()
                },
                "`top_k` must be at least 1, got -1",
            ),
            (
                RawSamplingParams {
                    min_p: Some(1.5),
                    ..RawSamplingParams::default()
                },
                "`min_p` must be between 0 and 1, got 1.5",
            ),
            (
                RawSamplingParams {
                    presence_penalty: Some(2.5),
                    ..RawSamplingParams::default()
                },
                "`presence_penalty` must be between -2 and 2, got 2.5",
            ),
            (
                RawSamplingParams {
                    frequency_penalty: Some(-3.0),
                    ..RawSamplingParams::default()
                },
                "`frequency_penalty` must be between -2 and 2, got -3",
            ),
            (
                RawSamplingParams {
                    repetition_penalty: Some(0.0),
                    ..RawSamplingParams::default()
                },
                "`repetition_penalty` must be a finite number greater than 0, got 0",
            ),
            (
                RawSamplingParams {
                    repetition_penalty: Some(f32::INFINITY),
                    ..RawSamplingParams::default()
                },
                "`repetition_penalty` must be a finite number greater than 0, got inf",
            ),
            (
                RawSamplingParams {
                    top_logprobs: Some(21),
                    ..RawSamplingParams::default()
                },
                "`top_logprobs` must be between 0 and 20, got 21",
            ),
            (
                RawSamplingParams {
                    top_logprobs: Some(-1),
                    ..RawSamplingParams::default()
                },
                "`top_logprobs` must be between 0 and 20, got -1",
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(validation_message(raw), expected);
        }
    }

    #[test]
    fn validate_checks_truncation_of_greedy_requests() {
        let raw = RawSamplingParams {
            temperature: Some(0.0),
            top_p: Some(1.5),
            ..RawSamplingParams::default()
        };
        assert_eq!(
            validation_message(raw),
            "`top_p` must be greater than 0 and at most 1, got 1.5"
        );
    }

    #[test]
    fn validate_rejects_bad_logit_bias() {
        let cases = [
            (
                logit_bias(&[("49152", 1.0)]),
                "`logit_bias` names token 49152, but the vocabulary has 49152 tokens \
                 (ids below 49152)",
            ),
            (
                logit_bias(&[("99999999999", 1.0)]),
                "`logit_bias` names token 99999999999, but the vocabulary has 49152 tokens \
                 (ids below 49152)",
            ),
            (
                logit_bias(&[("hello", 1.0)]),
                "`logit_bias` key `hello` is not a token id; keys must be non-negative integers",
            ),
            (
                logit_bias(&[("-3", 1.0)]),
                "`logit_bias` key `-3` is not a token id; keys must be non-negative integers",
            ),
            (
                logit_bias(&[("12", 150.0)]),
                "`logit_bias` for token 12 must be between -100 and 100, got 150",
            ),
            (
                logit_bias(&[("7", 1.0), ("07", 2.0)]),
                "`logit_bias` sets token 7 more than once",
            ),
        ];
        for (raw, expected) in cases {
            let message = validation_message(raw.clone());
            assert_eq!(message, expected);
            let parameter = SamplingParams::validate(raw, VOCAB)
                .err()
                .map(|e| e.parameter());
            assert_eq!(parameter, Some(SamplingParameter::LogitBias));
        }
    }

    #[test]
    fn validate_sorts_logit_bias_by_token() -> TestResult {
        let params = SamplingParams::validate(logit_bias(&[("30", -1.0), ("4", 2.5)]), VOCAB)?;
        assert_eq!(
            params.logit_bias(),
            &[
                TokenBias {
                    token: 4,
                    bias: 2.5
                },
                TokenBias {
                    token: 30,
                    bias: -1.0
                },
            ]
        );
        Ok(())
    }
}
