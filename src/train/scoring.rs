//! Stage 1 on a model: teacher-forced log-probabilities of responses, and the token scores of
//! one preference pair under the patient's two faces.
//!
//! Each response is tokenized once, as plain text, and the same ids are appended to every
//! templated prompt, so both faces score exactly the same tokens. A prompt runs once per face;
//! its KV cache is then forked for the chosen and the rejected response.

use candle_core::{Tensor, D};

use crate::model::{KvCache, Llama, LogitsSelection, LoraAdapter, ModelError, Row};
use crate::tokenizer::{ChatMessage, GenerationPrompt, SpecialTokens, Tokenizer, TokenizerError};

use super::data::{PreferencePair, PromptMessage};
use super::faces::Faces;
use super::rewards::{token_scores, RewardParams, RewardRecord, ScoredResponse};
use super::TrainError;

/// Errors raised while scoring a pair.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    /// Templating or tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The score formula rejected its input.
    #[error(transparent)]
    Train(#[from] TrainError),
}

impl From<candle_core::Error> for ScoringError {
    fn from(err: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(err))
    }
}

/// The reason a pair produced no record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairSkip {
    /// A templated prompt leaves no room for even one response token in the context window.
    PromptTooLong {
        /// Tokens of the longest templated prompt.
        prompt_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// The templated prompt is longer than the job's limit.
    PromptOverLimit {
        /// Tokens of the prompt templated without a face.
        prompt_tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// A response tokenizes to no tokens.
    EmptyResponse,
}

impl PairSkip {
    /// Returns a short label for counting skips by reason.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::PromptOverLimit { .. } => "prompt_over_limit",
            Self::EmptyResponse => "empty_response_tokens",
        }
    }
}

/// The result of [`score_pair`].
#[derive(Clone, Debug, PartialEq)]
pub enum PairOutcome {
    /// The pair was scored.
    Scored {
        /// The record to store.
        record: RewardRecord,
        /// How many of its two responses were cut to fit the context window.
        truncated_responses: usize,
    },
    /// The pair was skipped.
    Skipped(PairSkip),
}

/// Templates a conversation into prompt ids that end with the assistant header, with an
/// optional system message first. Without a chat template the message texts are joined by
/// newlines. A BOS token is added when the tokenizer requires one.
pub fn template_prompt(
    tokenizer: &Tokenizer,
    system: Option<&str>,
    messages: &[PromptMessage],
) -> Result<Vec<u32>, TokenizerError> {
    let mut chat = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system {
        chat.push(ChatMessage::new("system", system));
    }
    chat.extend(
        messages
            .iter()
            .map(|message| ChatMessage::new(message.role.role_str(), message.content.clone())),
    );
    let mut ids = match tokenizer.chat_template() {
        Some(_) => {
            let text = tokenizer.apply_chat_template(&chat, GenerationPrompt::Add)?;
            tokenizer.encode(&text, SpecialTokens::Parse)?
        }
        None => {
            let text: Vec<&str> = chat.iter().map(|m| m.content.as_str()).collect();
            tokenizer.encode(&(text.join("\n") + "\n"), SpecialTokens::AsText)?
        }
    };
    if let Some(bos) = tokenizer.bos_token_id().filter(|_| tokenizer.add_bos()) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// Teacher-forces `responses` after each of `prompts` and returns
/// `log π(y_t | prompt, y_<t)` for every response token: `result[prompt][response][t]`.
///
/// Each prompt runs once; its cache is forked for every response. Every response must have at
/// least one token, and prompt plus response must fit the model's context.
pub fn response_log_probs(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompts: &[&[u32]],
    responses: &[&[u32]],
) -> Result<Vec<Vec<Vec<f32>>>, ScoringError> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
    let mut rows: Vec<Row<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(prompt, cache)| Row {
            tokens: prompt,
            cache,
            adapter,
            logits: LogitsSelection::Last,
            fork_from: None,
        })
        .collect();
    let last_prompt_hidden = model.forward_hidden(&mut rows)?; // per prompt: (1, hidden)
    drop(rows);

    // Every response token but the last is fed; the last prompt position predicts token 0.
    let mut forked = Vec::new();
    for cache in &caches {
        for response in responses {
            if response.len() > 1 {
                forked.push(cache.fork()?);
            }
        }
    }
    let fed: Vec<&[u32]> = prompts
        .iter()
        .flat_map(|_| responses.iter())
        .filter(|response| response.len() > 1)
        .map(|response| &response[..response.len() - 1])
        .collect();
    let mut rows: Vec<Row<'_>> = fed
        .iter()
        .zip(forked.iter_mut())
        .map(|(tokens, cache)| Row {
            tokens,
            cache,
            adapter,
            logits: LogitsSelection::All,
            fork_from: None,
        })
        .collect();
    let mut fed_hidden = if rows.is_empty() {
        Vec::new()
    } else {
        model.forward_hidden(&mut rows)?
    }
    .into_iter();

    let mut result = Vec::with_capacity(prompts.len());
    for first in &last_prompt_hidden {
        let mut per_response = Vec::with_capacity(responses.len());
        for response in responses {
            let hidden = if response.len() > 1 {
                let rest = fed_hidden.next().ok_or(TrainError::LengthMismatch {
                    input: "forward outputs",
                    expected: fed.len(),
                    found: 0,
                })?;
                Tensor::cat(&[first, &rest], 0)?
            } else {
                first.clone()
            };
            per_response.push(gather_log_probs(model, &hidden, response)?);
        }
        result.push(per_response);
    }
    Ok(result)
}

/// `log_softmax(lm_head(hidden))[t, targets[t]]` for every row `t` of `(L, hidden)`.
fn gather_log_probs(
    model: &Llama,
    hidden: &Tensor,
    targets: &[u32],
) -> Result<Vec<f32>, ScoringError> {
    let logits = model.lm_head(hidden)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let index = Tensor::from_slice(targets, (targets.len(), 1), hidden.device())?;
    Ok(log_probs.gather(&index, 1)?.squeeze(1)?.to_vec1()?)
}

/// Scores one preference pair under both faces and builds its reward record.
///
/// A response that does not fit the context after the longest of the three templated prompts
/// (positive face, negative face, and no face, which is what the doctor trains on) is cut at
/// the end; the pair is skipped when not even one response token fits, or when the prompt
/// templated without a face has more than `max_prompt_tokens` tokens.
pub fn score_pair(
    model: &Llama,
    tokenizer: &Tokenizer,
    faces: &Faces,
    pair: &PreferencePair,
    params: &RewardParams,
    max_prompt_tokens: Option<usize>,
) -> Result<PairOutcome, ScoringError> {
    let doctor_prompt = template_prompt(tokenizer, None, &pair.prompt)?;
    if let Some(limit) = max_prompt_tokens.filter(|&limit| doctor_prompt.len() > limit) {
        return Ok(PairOutcome::Skipped(PairSkip::PromptOverLimit {
            prompt_tokens: doctor_prompt.len(),
            limit,
        }));
    }
    let positive = template_prompt(tokenizer, Some(&faces.positive), &pair.prompt)?;
    let negative = template_prompt(tokenizer, Some(&faces.negative), &pair.prompt)?;
    let mut chosen = tokenizer.encode(&pair.chosen, SpecialTokens::AsText)?;
    let mut rejected = tokenizer.encode(&pair.rejected, SpecialTokens::AsText)?;
    if chosen.is_empty() || rejected.is_empty() {
        return Ok(PairOutcome::Skipped(PairSkip::EmptyResponse));
    }

    let context = model.config().max_position_embeddings;
    let longest_prompt = doctor_prompt.len().max(positive.len()).max(negative.len());
    if longest_prompt >= context {
        return Ok(PairOutcome::Skipped(PairSkip::PromptTooLong {
            prompt_tokens: longest_prompt,
            context,
        }));
    }
    let room = context - longest_prompt;
    let mut truncated_responses = 0;
    for response in [&mut chosen, &mut rejected] {
        if response.len() > room {
            response.truncate(room);
            truncated_responses += 1;
        }
    }

    let log_probs =
        response_log_probs(model, None, &[&positive, &negative], &[&chosen, &rejected])?;
    let [pos, neg] = [&log_probs[0], &log_probs[1]];
    let chosen_scores = token_scores(&pos[0], &neg[0], params)?;
    let rejected_scores = token_scores(&pos[1], &neg[1], params)?;
    let record = RewardRecord {
        pair_id: pair.id.clone(),
        prompt_ids: doctor_prompt,
        chosen: ScoredResponse {
            token_ids: chosen,
            scores: chosen_scores,
        },
        rejected: ScoredResponse {
            token_ids: rejected,
            scores: rejected_scores,
        },
        faces: faces.name.clone(),
    };
    Ok(PairOutcome::Scored {
        record,
        truncated_responses,
    })
}
