//! The API's errors and their one mapping to HTTP statuses and OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}`, for plain responses and inside streams.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::doctor::DoctorError;
use crate::engine::handle::EngineError;
use crate::engine::sampling::SamplingError;
use crate::tokenizer::TokenizerError;

/// Seconds a client should wait before retrying after a 429 or 503.
const RETRY_AFTER_SECONDS: &str = "1";

/// Errors of the HTTP layer. Each variant has one status and one OpenAI error `type`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is invalid.
    #[error("{message}")]
    InvalidRequest {
        /// The problem, naming the field and the value received.
        message: String,
        /// The field at fault.
        param: Option<String>,
    },
    /// A field names a feature this server does not implement yet.
    #[error("`{param}` is not supported yet")]
    Unsupported {
        /// The field.
        param: String,
    },
    /// The body is not valid JSON or a field has the wrong type.
    #[error("invalid JSON body: {message}")]
    InvalidJson {
        /// The parser's message.
        message: String,
        /// The field at fault, when known.
        param: Option<String>,
    },
    /// The body has a field this API does not know.
    #[error("unknown field `{field}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownField {
        /// The field.
        field: String,
        /// A known field with a similar name.
        suggestion: Option<String>,
    },
    /// The prompt and `max_tokens` do not fit the context window.
    #[error("this request needs {prompt_tokens} prompt tokens + {max_tokens} `max_tokens` = {} tokens, but the context window is {limit} tokens (the smallest among the patient and the requested doctors); shorten the prompt or lower `max_tokens`", prompt_tokens + max_tokens)]
    ContextOverflow {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Requested `max_tokens`.
        max_tokens: usize,
        /// The context window.
        limit: usize,
        /// The field holding the prompt: `messages` or `prompt`.
        prompt_field: &'static str,
    },
    /// Templating or tokenizing the prompt failed.
    #[error("{0}")]
    Tokenizer(#[from] TokenizerError),
    /// A sampling field is out of range.
    #[error("{0}")]
    Sampling(#[from] SamplingError),
    /// `model` names neither the patient nor a loaded doctor.
    #[error("model `{model}` does not exist; available models: {}", available.join(", "))]
    ModelNotFound {
        /// The requested model.
        model: String,
        /// The patient and the loaded doctors.
        available: Vec<String>,
    },
    /// A doctor error: not loaded (404) or failed to load (400).
    #[error("{0}")]
    Doctor(Box<DoctorError>),
    /// The engine refused the request.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// No or a wrong API key.
    #[error("invalid or missing API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// An admin route was called without the admin key, or none is configured.
    #[error("{message}")]
    Forbidden {
        /// Why.
        message: String,
    },
    /// The body is larger than the configured limit.
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// No route at this path.
    #[error("no route for {method} {path}")]
    RouteNotFound {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The route exists but not for this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The model is still loading.
    #[error("the model is still loading; retry shortly")]
    Loading,
    /// Generation failed inside the engine.
    #[error("generation failed: {0}")]
    Generation(String),
    /// A bug or an unexpected failure on the server.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DoctorError> for ApiError {
    fn from(err: DoctorError) -> Self {
        Self::Doctor(Box::new(err))
    }
}

/// An OpenAI error object.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct ErrorDetail {
    /// The failure and the fix, in words.
    #[schema(example = "unknown field `docter`; did you mean `doctor`?")]
    pub message: String,
    /// The error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    #[schema(example = "invalid_request_error")]
    pub kind: &'static str,
    /// The request field at fault, when one is.
    #[schema(example = "docter")]
    pub param: Option<String>,
    /// A stable machine-readable code, when one applies.
    #[schema(example = "unknown_field")]
    pub code: Option<&'static str>,
}

/// The body of every error response and of an in-stream error event.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

impl ApiError {
    /// Returns the HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. }
            | Self::Unsupported { .. }
            | Self::InvalidJson { .. }
            | Self::UnknownField { .. }
            | Self::ContextOverflow { .. }
            | Self::Tokenizer(_)
            | Self::Sampling(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::Doctor(err) => match **err {
                DoctorError::NotFound { .. } | DoctorError::FolderNotFound { .. } => {
                    StatusCode::NOT_FOUND
                }
                _ => StatusCode::BAD_REQUEST,
            },
            Self::Engine(err) => match err {
                EngineError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
                EngineError::ShutDown => StatusCode::SERVICE_UNAVAILABLE,
                EngineError::TooLarge { .. }
                | EngineError::ContextOverflow { .. }
                | EngineError::EmptyPrompt => StatusCode::BAD_REQUEST,
            },
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Loading => StatusCode::SERVICE_UNAVAILABLE,
            Self::Generation(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::InvalidRequest { param, .. } | Self::InvalidJson { param, .. } => param.clone(),
            Self::Unsupported { param } => Some(param.clone()),
            Self::UnknownField { field, .. } => Some(field.clone()),
            Self::ContextOverflow { prompt_field, .. } => Some((*prompt_field).into()),
            Self::Sampling(err) => Some(err.parameter().name().into()),
            Self::ModelNotFound { .. } => Some("model".into()),
            Self::Doctor(err) if matches!(**err, DoctorError::NotFound { .. }) => {
                Some("doctor".into())
            }
            Self::Doctor(err) if matches!(**err, DoctorError::FolderNotFound { .. }) => {
                Some("name".into())
            }
            Self::Engine(EngineError::TooLarge { .. }) => Some("max_tokens".into()),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownField { .. } => Some("unknown_field"),
            Self::Unsupported { .. } => Some("unsupported_parameter"),
            Self::ContextOverflow { .. } | Self::Engine(EngineError::ContextOverflow { .. }) => {
                Some("context_length_exceeded")
            }
            Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::Doctor(err)
                if matches!(
                    **err,
                    DoctorError::NotFound { .. } | DoctorError::FolderNotFound { .. }
                ) =>
            {
                Some("doctor_not_found")
            }
            Self::Unauthorized => Some("invalid_api_key"),
            Self::Engine(EngineError::Overloaded { .. }) => Some("overloaded"),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// Builds the OpenAI error body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// Builds the body as one server-sent event, for an error after the stream has started.
    pub fn sse_event(&self) -> axum::response::sse::Event {
        let json = serde_json::to_string(&self.body()).unwrap_or_else(|err| {
            format!(r#"{{"error":{{"message":"failed to encode an error: {err}","type":"server_error","param":null,"code":null}}}}"#)
        });
        axum::response::sse::Event::default().data(json)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "request rejected");
        }
        let mut response = (status, Json(self.body())).into_response();
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// Maps a failed body read: the only failure a limited body has besides I/O is its size.
pub fn body_rejection(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::InvalidJson {
            message: rejection.body_text(),
            param: None,
        }
    }
}

/// Returns the status of a health probe: 200 or 503.
pub fn health_status(healthy: bool) -> StatusCode {
    if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_is_429_rate_limit() {
        let err = ApiError::Engine(EngineError::Overloaded { waiting: 3 });
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.body().error.kind, "rate_limit_error");
    }

    #[test]
    fn unknown_field_names_the_field() {
        let err = ApiError::UnknownField {
            field: "docter".into(),
            suggestion: Some("doctor".into()),
        };
        let body = err.body();
        assert_eq!(body.error.param.as_deref(), Some("docter"));
        assert_eq!(
            body.error.message,
            "unknown field `docter`; did you mean `doctor`?"
        );
    }

    #[test]
    fn context_overflow_states_every_number() {
        let err = ApiError::ContextOverflow {
            prompt_tokens: 300,
            max_tokens: 16,
            limit: 256,
            prompt_field: "messages",
        };
        let message = err.to_string();
        for number in ["300", "16", "316", "256"] {
            assert!(message.contains(number), "{message}");
        }
    }
}
