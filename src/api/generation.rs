//! `POST /v1/chat/completions` and `POST /v1/completions`: parse → validate → submit →
//! render, streamed as server-sent events or as one JSON body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::HeaderName;
use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;

use crate::engine::handle::EventReceiver;

use super::auth::ApiKey;
use super::error::{body_rejection, ApiError, ErrorBody};
use super::json::parse_request;
use super::observe::RequestObserver;
use super::output::{ChunkBuilder, Collector, FullResponse, Kind, OutputMeta, StreamItem};
use super::validate::{validate_chat, validate_completion, ValidRequest, ValidationContext};
use super::wire::{
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, CHAT_FIELDS,
    COMPLETION_FIELDS,
};
use super::{unix_now, AppState, Ready};

/// Interval of the SSE keep-alive comments that stop proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

fn request_id(prefix: &str) -> String {
    let serial = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{serial:x}", unix_now())
}

fn context<'a>(state: &'a AppState, ready: &'a Ready) -> ValidationContext<'a> {
    ValidationContext {
        tokenizer: &ready.tokenizer,
        registry: &ready.registry,
        engine: &ready.engine,
        patient_id: &ready.patient_id,
        default_max_tokens: state.config.default_max_tokens,
    }
}

/// Creates a chat completion, optionally steered by doctors.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, `text/event-stream` of `chat.completion.chunk` objects ending with `data: [DONE]`", body = ChatCompletion),
        (status = 400, description = "Invalid request, unknown field or context overflow", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model or doctor", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "generation"
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    _key: ApiKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body.map_err(|r| body_rejection(r, state.config.max_body_bytes))?;
    let raw: ChatCompletionRequest = parse_request(&body, CHAT_FIELDS)?;
    let ready = state.ready()?;
    let valid = validate_chat(raw, &context(&state, ready))?;
    respond(&state, ready, valid, Kind::Chat, arrived).await
}

/// Creates a text completion from a raw prompt, optionally steered by doctors.
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, `text/event-stream` of `text_completion` chunks ending with `data: [DONE]`", body = Completion),
        (status = 400, description = "Invalid request, unknown field or context overflow", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model or doctor", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "generation"
)]
pub async fn completions(
    State(state): State<AppState>,
    _key: ApiKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body.map_err(|r| body_rejection(r, state.config.max_body_bytes))?;
    let raw: CompletionRequest = parse_request(&body, COMPLETION_FIELDS)?;
    let ready = state.ready()?;
    let valid = validate_completion(raw, &context(&state, ready))?;
    respond(&state, ready, valid, Kind::Completion, arrived).await
}

/// Submits a validated request and renders its events.
async fn respond(
    state: &AppState,
    ready: &Ready,
    valid: ValidRequest,
    kind: Kind,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let doctors: Vec<String> = valid
        .engine
        .steering
        .doctors
        .iter()
        .map(|d| d.doctor.name().to_string())
        .collect();
    let meta = OutputMeta {
        id: request_id(match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }),
        created: unix_now(),
        model: valid.model,
        kind,
        n: valid.engine.n,
        include_usage: valid.include_usage,
        doctors: doctors.clone(),
    };
    let events = ready.engine.submit(valid.engine)?;
    let observer = RequestObserver::new(state.metrics.clone(), arrived, meta.n, doctors);
    let tokenizer = ready.tokenizer.clone();
    if valid.stream {
        let builder = ChunkBuilder::new(meta, tokenizer, valid.logprobs);
        return Ok(sse_response(events, builder, observer));
    }
    let collector = Collector::new(meta, tokenizer, valid.logprobs);
    match collect(events, collector, observer).await? {
        FullResponse::Chat(body) => Ok(Json(body).into_response()),
        FullResponse::Completion(body) => Ok(Json(body).into_response()),
    }
}

/// Waits for the whole response. If the client leaves, this future is dropped with `events`,
/// which cancels the request in the engine.
async fn collect(
    mut events: EventReceiver,
    mut collector: Collector,
    mut observer: RequestObserver,
) -> Result<FullResponse, ApiError> {
    while let Some(event) = events.recv().await {
        observer.observe(&event);
        if let Some(response) = collector.push(event)? {
            return Ok(response);
        }
    }
    Err(ApiError::Generation(
        "the engine stopped before the request finished".into(),
    ))
}

struct StreamState {
    events: EventReceiver,
    builder: ChunkBuilder,
    observer: RequestObserver,
    queue: VecDeque<SseEvent>,
    finished: bool,
}

fn done_event() -> SseEvent {
    SseEvent::default().data("[DONE]")
}

impl StreamState {
    /// Queues the SSE events for `items`; after an error or the end, queues `[DONE]` and stops.
    fn enqueue(&mut self, items: Vec<StreamItem>) {
        for item in items {
            match item {
                StreamItem::Data(json) => self.queue.push_back(SseEvent::default().data(json)),
                StreamItem::Error(err) => {
                    tracing::warn!(error = %err, "stream failed after its headers were sent");
                    self.queue.push_back(err.sse_event());
                    self.queue.push_back(done_event());
                    self.finished = true;
                    return;
                }
                StreamItem::Done => {
                    self.queue.push_back(done_event());
                    self.finished = true;
                    return;
                }
            }
        }
    }
}

/// Builds the SSE response. Dropping it (the client left) drops `events`, which cancels the
/// request.
fn sse_response(
    events: EventReceiver,
    builder: ChunkBuilder,
    observer: RequestObserver,
) -> Response {
    let mut state = StreamState {
        events,
        observer,
        queue: VecDeque::new(),
        finished: false,
        builder,
    };
    let start = state.builder.start();
    state.enqueue(start);
    let stream = stream::unfold(state, next_event);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Tell reverse proxies such as nginx not to buffer the stream.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    response
}

async fn next_event(mut state: StreamState) -> Option<(Result<SseEvent, Infallible>, StreamState)> {
    loop {
        if let Some(event) = state.queue.pop_front() {
            return Some((Ok(event), state));
        }
        if state.finished {
            return None;
        }
        match state.events.recv().await {
            Some(event) => {
                state.observer.observe(&event);
                let items = state.builder.push(event);
                state.enqueue(items);
            }
            None => state.enqueue(vec![StreamItem::Error(ApiError::Generation(
                "the engine stopped before the request finished".into(),
            ))]),
        }
    }
}
