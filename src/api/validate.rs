//! Turns raw OpenAI request bodies into validated engine requests.

use crate::doctor::DoctorRegistry;
use crate::engine::handle::EngineHandle;
use crate::engine::request::{EosPolicy, GenerationRequest};
use crate::engine::sampling::{RawSamplingParams, SamplingParams};
use crate::generate::{resolve_doctors, DoctorChoice};
use crate::tokenizer::{ChatMessage, GenerationPrompt, SpecialTokens, Tokenizer};

use super::error::ApiError;
use super::wire::{
    ChatCompletionRequest, CommonFields, CompletionRequest, DoctorField, DoctorItem,
    MessageContent, PromptField, RequestMessage, StopField,
};

/// The maximum `n` (choices per request).
pub const MAX_N: i64 = 16;

/// Server parts that validation reads.
pub struct ValidationContext<'a> {
    /// The patient's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The loaded doctors.
    pub registry: &'a DoctorRegistry,
    /// The engine, for context limits.
    pub engine: &'a EngineHandle,
    /// The patient's model id.
    pub patient_id: &'a str,
    /// `max_tokens` when the request sets none.
    pub default_max_tokens: usize,
}

/// A validated request, ready for the engine, with what rendering its output needs.
#[derive(Debug)]
pub struct ValidRequest {
    /// The engine request.
    pub engine: GenerationRequest,
    /// Stream the output.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Return log-probabilities.
    pub logprobs: bool,
    /// The `model` echoed in responses.
    pub model: String,
}

fn invalid(param: &str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: Some(param.to_string()),
    }
}

/// Validates a chat request.
pub fn validate_chat(
    raw: ChatCompletionRequest,
    ctx: &ValidationContext<'_>,
) -> Result<ValidRequest, ApiError> {
    if raw.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::Unsupported {
            param: "tools".into(),
        });
    }
    if let Some(choice) = &raw.tool_choice {
        if !(choice.is_null() || choice == "none") {
            return Err(ApiError::Unsupported {
                param: "tool_choice".into(),
            });
        }
    }
    if let Some(format) = &raw.response_format {
        let is_text = format.is_null() || format.get("type").is_some_and(|t| t == "text");
        if !is_text {
            return Err(ApiError::Unsupported {
                param: "response_format".into(),
            });
        }
    }
    let prompt_ids = chat_prompt_ids(ctx.tokenizer, &raw.messages)?;
    let logprobs = raw.logprobs.unwrap_or(false);
    if raw.top_logprobs.is_some() && !logprobs {
        return Err(invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs` to be true".into(),
        ));
    }
    let top_logprobs = logprobs.then(|| raw.top_logprobs.unwrap_or(0));
    let max_tokens = match raw.max_completion_tokens {
        Some(value) => Some(("max_completion_tokens", value)),
        None => raw.common.max_tokens.map(|value| ("max_tokens", value)),
    };
    let prompt = Prompt {
        ids: prompt_ids,
        field: "messages",
    };
    validate_common(raw.common, prompt, top_logprobs, max_tokens, ctx)
}

/// Renders `messages` with the chat template and tokenizes the result.
pub fn chat_prompt_ids(
    tokenizer: &Tokenizer,
    messages: &[RequestMessage],
) -> Result<Vec<u32>, ApiError> {
    let messages = chat_messages(messages)?;
    let text = tokenizer.apply_chat_template(&messages, GenerationPrompt::Add)?;
    Ok(with_bos(
        tokenizer,
        tokenizer.encode(&text, SpecialTokens::Parse)?,
    ))
}

fn chat_messages(raw: &[RequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if raw.is_empty() {
        return Err(invalid(
            "messages",
            "`messages` must contain at least one message".into(),
        ));
    }
    let mut messages = Vec::with_capacity(raw.len());
    for (index, message) in raw.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(invalid(
                    &format!("messages[{index}].role"),
                    format!("`messages[{index}].role` must be `system`, `developer`, `user` or `assistant`, got `{other}`"),
                ))
            }
        };
        let content = match &message.content {
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(part_text)) => text.push_str(part_text),
                        _ => {
                            return Err(invalid(
                                &format!("messages[{index}].content"),
                                format!("`messages[{index}].content` parts must be `{{\"type\": \"text\", \"text\": ...}}`, got type `{}`", part.kind),
                            ))
                        }
                    }
                }
                text
            }
            None if role == "assistant" => String::new(),
            None => {
                return Err(invalid(
                    &format!("messages[{index}].content"),
                    format!("`messages[{index}].content` is required for role `{role}`"),
                ))
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    Ok(messages)
}

fn with_bos(tokenizer: &Tokenizer, mut ids: Vec<u32>) -> Vec<u32> {
    if let Some(bos) = tokenizer.bos_token_id().filter(|_| tokenizer.add_bos()) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids
}

/// Validates a text-completion request.
pub fn validate_completion(
    raw: CompletionRequest,
    ctx: &ValidationContext<'_>,
) -> Result<ValidRequest, ApiError> {
    if raw.echo == Some(true) {
        return Err(ApiError::Unsupported {
            param: "echo".into(),
        });
    }
    if raw.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::Unsupported {
            param: "suffix".into(),
        });
    }
    if let Some(best_of) = raw.best_of {
        if best_of != raw.common.n.unwrap_or(1) {
            return Err(ApiError::Unsupported {
                param: "best_of".into(),
            });
        }
    }
    let prompt_ids = match raw.prompt {
        PromptField::Text(text) => encode_prompt(ctx.tokenizer, &text)?,
        PromptField::Texts(texts) => match texts.as_slice() {
            [text] => encode_prompt(ctx.tokenizer, text)?,
            _ => return Err(one_prompt_only(texts.len())),
        },
        PromptField::Ids(ids) => checked_ids(ctx.tokenizer, ids)?,
        PromptField::IdLists(lists) => match <[Vec<u32>; 1]>::try_from(lists) {
            Ok([ids]) => checked_ids(ctx.tokenizer, ids)?,
            Err(lists) => return Err(one_prompt_only(lists.len())),
        },
    };
    let max_tokens = raw.common.max_tokens.map(|value| ("max_tokens", value));
    let prompt = Prompt {
        ids: prompt_ids,
        field: "prompt",
    };
    validate_common(raw.common, prompt, raw.logprobs, max_tokens, ctx)
}

fn one_prompt_only(count: usize) -> ApiError {
    invalid(
        "prompt",
        format!("`prompt` must hold exactly one prompt, got {count}; send one request per prompt"),
    )
}

fn encode_prompt(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    Ok(with_bos(
        tokenizer,
        tokenizer.encode(text, SpecialTokens::Parse)?,
    ))
}

fn checked_ids(tokenizer: &Tokenizer, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    let vocab = tokenizer.vocab_size();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(invalid(
            "prompt",
            format!("`prompt` has token id {bad}, but the vocabulary has {vocab} tokens"),
        ));
    }
    Ok(ids)
}

/// Doctors named by `model` (first) and by `doctor`, in order.
fn doctor_choices(
    model_doctor: Option<String>,
    field: Option<DoctorField>,
) -> Result<Vec<DoctorChoice>, ApiError> {
    let items = match field {
        None => Vec::new(),
        Some(DoctorField::One(item)) => vec![item],
        Some(DoctorField::Many(items)) => items,
    };
    let mut choices: Vec<DoctorChoice> = model_doctor
        .map(|name| DoctorChoice { name, beta: None })
        .into_iter()
        .collect();
    for item in items {
        let choice = match item {
            DoctorItem::Name(name) => DoctorChoice { name, beta: None },
            DoctorItem::Spec(spec) => DoctorChoice {
                name: spec.name,
                beta: spec.beta,
            },
        };
        if let Some(beta) = choice.beta.filter(|b| !b.is_finite()) {
            return Err(invalid(
                "doctor",
                format!(
                    "β of doctor `{}` must be a finite number, got {beta}",
                    choice.name
                ),
            ));
        }
        if choices.iter().any(|c| c.name == choice.name) {
            return Err(invalid(
                "doctor",
                format!(
                    "doctor `{}` is named more than once (in `model` or `doctor`)",
                    choice.name
                ),
            ));
        }
        choices.push(choice);
    }
    Ok(choices)
}

fn stop_strings(stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let strings = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(list)) => list,
    };
    if strings.iter().any(String::is_empty) {
        return Err(invalid("stop", "`stop` strings must not be empty".into()));
    }
    Ok(strings)
}

/// Returns the doctor that `model` names, `None` for the patient, or 404 for anything else.
fn model_doctor(model: &str, ctx: &ValidationContext<'_>) -> Result<Option<String>, ApiError> {
    if model == ctx.patient_id {
        return Ok(None);
    }
    if ctx.registry.get(model).is_ok() {
        return Ok(Some(model.to_string()));
    }
    let mut available = vec![ctx.patient_id.to_string()];
    available.extend(ctx.registry.list().iter().map(|d| d.name().to_string()));
    Err(ApiError::ModelNotFound {
        model: model.to_string(),
        available,
    })
}

/// Checks that the prompt plus `max_tokens` fits the smallest context among the patient and
/// the request's doctors, and returns the `max_tokens` to use.
fn fit_max_tokens(
    request: &GenerationRequest,
    requested: Option<usize>,
    prompt_field: &'static str,
    ctx: &ValidationContext<'_>,
) -> Result<usize, ApiError> {
    let limit = ctx.engine.context_limit(request);
    let prompt_tokens = request.prompt_ids.len();
    let overflow = |max_tokens| ApiError::ContextOverflow {
        prompt_tokens,
        max_tokens,
        limit,
        prompt_field,
    };
    match requested {
        Some(value) if prompt_tokens + value > limit => Err(overflow(value)),
        Some(value) => Ok(value),
        // Without an explicit `max_tokens`, the reply may use what the context leaves.
        None if prompt_tokens >= limit => Err(overflow(1)),
        None => Ok(ctx.default_max_tokens.min(limit - prompt_tokens)),
    }
}

/// Prompt ids and the request field they came from.
struct Prompt {
    ids: Vec<u32>,
    field: &'static str,
}

fn validate_common(
    common: CommonFields,
    prompt: Prompt,
    top_logprobs: Option<i64>,
    max_tokens: Option<(&str, i64)>,
    ctx: &ValidationContext<'_>,
) -> Result<ValidRequest, ApiError> {
    let n = common.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(invalid(
            "n",
            format!("`n` must be from 1 to {MAX_N}, got {n}"),
        ));
    }
    let requested_max = match max_tokens {
        Some((param, value)) if value < 1 => {
            return Err(invalid(
                param,
                format!("`{param}` must be at least 1, got {value}"),
            ))
        }
        Some((_, value)) => Some(value as usize),
        None => None,
    };
    let model = common
        .model
        .clone()
        .unwrap_or_else(|| ctx.patient_id.to_string());
    let model_doctor = model_doctor(&model, ctx)?;
    let alpha = common.patient_alpha.unwrap_or(1.0);
    if !alpha.is_finite() {
        return Err(invalid(
            "patient_alpha",
            format!("`patient_alpha` must be a finite number, got {alpha}"),
        ));
    }
    let choices = doctor_choices(model_doctor, common.doctor)?;
    let steering = resolve_doctors(ctx.registry, alpha, &choices)?;
    let sampling = SamplingParams::validate(
        RawSamplingParams {
            temperature: common.temperature,
            top_k: common.top_k,
            top_p: common.top_p,
            min_p: common.min_p,
            presence_penalty: common.presence_penalty,
            frequency_penalty: common.frequency_penalty,
            repetition_penalty: common.repetition_penalty,
            logit_bias: common.logit_bias.unwrap_or_default(),
            seed: common.seed,
            top_logprobs,
        },
        ctx.tokenizer.vocab_size(),
    )?;
    let mut request = GenerationRequest {
        prompt_ids: prompt.ids,
        sampling,
        max_tokens: 0,
        stop_strings: stop_strings(common.stop)?,
        stop_token_ids: Vec::new(),
        eos: if common.ignore_eos.unwrap_or(false) {
            EosPolicy::Ignore
        } else {
            EosPolicy::Stop
        },
        n: n as usize,
        steering,
    };
    request.max_tokens = fit_max_tokens(&request, requested_max, prompt.field, ctx)?;
    let stream = common.stream.unwrap_or(false);
    let include_usage = common
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(ValidRequest {
        engine: request,
        stream,
        include_usage: stream && include_usage,
        logprobs: top_logprobs.is_some(),
        model,
    })
}
