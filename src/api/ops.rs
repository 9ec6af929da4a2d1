//! Operational routes: health, metrics, the OpenAPI document, and the tokenizer.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::tokenizer::SpecialTokens;

use super::auth::ApiKey;
use super::error::{body_rejection, health_status, ApiError, ErrorBody};
use super::json::parse_object;
use super::wire::{
    DetokenizeRequest, DetokenizeResponse, HealthBody, TokenizeRequest, TokenizeResponse,
};
use super::{validate, AppState, Ready};

/// Whether the server can take requests: 200 when ready; 503 while loading, after the engine
/// stopped, or when the engine loop has not completed an iteration within
/// `health_stall_timeout` while requests are pending.
#[utoipa::path(
    get,
    path = "/health",
    responses(
        (status = 200, body = HealthBody),
        (status = 503, description = "Loading, stalled or stopped", body = HealthBody),
    ),
    tag = "operations"
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let status = match state.ready() {
        Err(_) => "loading",
        Ok(ready) => {
            let engine = ready.engine.state();
            if engine.stopped.load(Ordering::Relaxed) {
                "stopped"
            } else if (engine.busy.load(Ordering::Relaxed) || engine.waiting_total() > 0)
                && engine.since_last_tick() > state.config.health_stall_timeout
            {
                "stalled"
            } else {
                "ok"
            }
        }
    };
    (health_status(status == "ok"), Json(HealthBody { status })).into_response()
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Metrics in Prometheus' text format", content_type = "text/plain")),
    tag = "operations"
)]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let metrics = &state.metrics;
    if let Ok(ready) = state.ready() {
        let engine = ready.engine.state();
        metrics
            .requests_running
            .set(engine.running.load(Ordering::Relaxed) as i64);
        metrics.requests_waiting.set(engine.waiting_total() as i64);
        let budget = ready.engine.scheduler_config().kv_budget_bytes.max(1);
        metrics
            .kv_cache_usage
            .set(engine.kv_used_bytes.load(Ordering::Relaxed) as f64 / budget as f64);
    }
    let text = metrics
        .render()
        .map_err(|err| ApiError::Internal(err.to_string()))?;
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")),
    tag = "operations"
)]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    let json = state.openapi.get().cloned().unwrap_or_default();
    ([(CONTENT_TYPE, "application/json")], json).into_response()
}

fn check_model(ready: &Ready, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(model) if model != &ready.patient_id && ready.registry.get(model).is_err() => {
            let mut available = vec![ready.patient_id.clone()];
            available.extend(ready.registry.list().iter().map(|d| d.name().to_string()));
            Err(ApiError::ModelNotFound {
                model: model.clone(),
                available,
            })
        }
        _ => Ok(()),
    }
}

/// Tokenizes a prompt, or messages rendered with the chat template, as generation would.
#[utoipa::path(
    post,
    path = "/tokenize",
    request_body = TokenizeRequest,
    responses(
        (status = 200, body = TokenizeResponse),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "tokenizer"
)]
pub async fn tokenize(
    State(state): State<AppState>,
    _key: ApiKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.config.max_body_bytes))?;
    let request: TokenizeRequest = parse_object(
        &body,
        &[&["model", "prompt", "messages", "add_special_tokens"]],
    )?;
    let ready = state.ready()?;
    check_model(ready, &request.model)?;
    let tokens = match (request.prompt, request.messages) {
        (Some(prompt), None) => {
            let special = if request.add_special_tokens.unwrap_or(true) {
                SpecialTokens::Parse
            } else {
                SpecialTokens::AsText
            };
            ready.tokenizer.encode(&prompt, special)?
        }
        (None, Some(messages)) => validate::chat_prompt_ids(&ready.tokenizer, &messages)?,
        _ => {
            return Err(ApiError::InvalidRequest {
                message: "set exactly one of `prompt` and `messages`".into(),
                param: Some("prompt".into()),
            })
        }
    };
    let max_model_len = ready
        .registry
        .list()
        .iter()
        .filter_map(|d| d.own_context_length())
        .fold(ready.engine.patient_context(), usize::min);
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len,
    }))
}

/// Decodes token ids to text.
#[utoipa::path(
    post,
    path = "/detokenize",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, body = DetokenizeResponse),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "tokenizer"
)]
pub async fn detokenize(
    State(state): State<AppState>,
    _key: ApiKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.config.max_body_bytes))?;
    let request: DetokenizeRequest = parse_object(&body, &[&["model", "tokens"]])?;
    let ready = state.ready()?;
    check_model(ready, &request.model)?;
    let vocab = ready.tokenizer.vocab_size();
    if let Some(bad) = request.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::InvalidRequest {
            message: format!("`tokens` has id {bad}, but the vocabulary has {vocab} tokens"),
            param: Some("tokens".into()),
        });
    }
    let prompt = ready.tokenizer.decode(&request.tokens)?;
    Ok(Json(DetokenizeResponse { prompt }))
}
