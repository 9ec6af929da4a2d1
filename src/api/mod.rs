//! The OpenAI-compatible HTTP API.
//!
//! - [`wire`]: request and response bodies (OpenAI shapes plus the steering extensions).
//! - [`json`]: body parsing with errors that name the field at fault.
//! - [`validate`]: raw requests to engine requests.
//! - [`output`]: pure state machines from engine events to chunks and whole responses.
//! - [`observe`]: per-request metrics.
//! - [`error`]: the API's errors and their one mapping to statuses and OpenAI's error shape.
//! - [`auth`]: API-key and admin-key extractors.
//! - `generation`, `admin`, `ops`: the route handlers.
//!
//! [`router`] builds the same router for the server and the tests; [`serve`] runs it until a
//! shutdown future resolves, then aborts in-flight requests with finish reason `abort`.

pub mod auth;
pub mod error;
pub mod json;
pub mod observe;
pub mod output;
pub mod validate;
pub mod wire;

mod admin;
mod generation;
mod ops;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, Uri};
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{Cors, ServeConfig};
use crate::doctor::DoctorRegistry;
use crate::engine::core::start_with_metrics;
use crate::engine::handle::EngineHandle;
use crate::loader::LoadedModel;
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;

use error::ApiError;

/// The loaded model, doctors and engine. Absent while the server is loading.
pub struct Ready {
    /// The engine.
    pub engine: EngineHandle,
    /// The loaded doctors.
    pub registry: Arc<DoctorRegistry>,
    /// The patient's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The patient's model id.
    pub patient_id: String,
    /// Unix time in seconds when the patient was loaded.
    pub loaded_at: u64,
}

impl Ready {
    /// Loads every doctor under the configured folder (logging those that fail) and starts the
    /// engine for `patient`.
    pub fn start(
        patient: LoadedModel,
        patient_id: String,
        config: &ServeConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let registry = Arc::new(DoctorRegistry::new(
            config.doctors_dir.clone(),
            patient.clone(),
            config.load_options(),
        ));
        if config.doctors_dir.is_dir() {
            for (name, err) in registry.load_all() {
                tracing::warn!(doctor = %name, error = %err, "doctor failed to load and is skipped");
            }
        } else {
            tracing::warn!(dir = %config.doctors_dir.display(), "doctors folder not found; serving without doctors");
        }
        let tokenizer = patient.tokenizer.clone();
        let engine = start_with_metrics(patient, config.engine(), Some(metrics))?;
        Ok(Self {
            engine,
            registry,
            tokenizer,
            patient_id,
            loaded_at: unix_now(),
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// State shared by every handler.
pub struct Shared {
    /// Settings.
    pub config: ServeConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    ready: OnceLock<Ready>,
    openapi: OnceLock<String>,
}

/// The router's state: cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Creates a state that reports "loading" until [`AppState::set_ready`].
    pub fn new(config: ServeConfig, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Shared {
            config,
            metrics,
            ready: OnceLock::new(),
            openapi: OnceLock::new(),
        }))
    }

    /// Marks the server ready. A second call is ignored.
    pub fn set_ready(&self, ready: Ready) {
        if self.0.ready.set(ready).is_err() {
            tracing::warn!("the server was already marked ready");
        }
    }

    /// Returns the loaded parts, or 503 while loading.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.0.ready.get().ok_or(ApiError::Loading)
    }

    fn ready_if_loaded(&self) -> Option<&Ready> {
        self.0.ready.get()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "llmdoctor",
        description = "OpenAI-compatible API serving a frozen patient LLM steered per token by doctor models"
    ),
    modifiers(&BearerAuth),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Builds the routes with their OpenAPI document. Every route is registered through `routes!`,
/// so a route cannot exist without its document entry.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(generation::chat_completions))
        .routes(routes!(generation::completions))
        .routes(routes!(admin::list_models))
        .routes(routes!(admin::list_doctors, admin::load_doctor))
        .routes(routes!(admin::unload_doctor))
        .routes(routes!(ops::health))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi_json))
        .routes(routes!(ops::tokenize))
        .routes(routes!(ops::detokenize))
}

/// Returns the OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
}

/// Builds the router with its state, body limit, CORS and tracing layers.
pub fn router(state: AppState) -> Router {
    let (router, openapi) = api_routes().split_for_parts();
    let json = openapi
        .to_pretty_json()
        .unwrap_or_else(|err| format!("{{\"error\": \"failed to render the document: {err}\"}}"));
    let _ = state.openapi.set(json);
    let cors = cors_layer(&state.config.cors);
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    match cors {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

fn cors_layer(cors: &Cors) -> Option<CorsLayer> {
    let origins = match cors {
        Cors::Off => return None,
        Cors::Any => AllowOrigin::any(),
        Cors::Origins(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers(Any),
    )
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// Serves `state` on `listener` until `shutdown` resolves. Then the server stops accepting
/// connections, the engine finishes every in-flight request with finish reason `abort` (so
/// streams end with their last chunk and `[DONE]`), and this returns once every connection
/// has closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, aborting in-flight requests");
        if let Some(ready) = state.ready_if_loaded() {
            let engine = ready.engine.clone();
            tokio::task::spawn_blocking(move || engine.shutdown());
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await
}
