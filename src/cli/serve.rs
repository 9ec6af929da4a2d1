//! `llmdoctor serve`: the OpenAI-compatible HTTP server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use llmdoctor::api::{self, AppState, Ready};
use llmdoctor::config::{Quant, RawConfig, ServeConfig};
use llmdoctor::fetch::{self, FetchOptions};
use llmdoctor::loader::load_model;
use llmdoctor::metrics::Metrics;

use super::QuantArg;

/// Every flag also reads the environment variable named in its help. A flag wins over the
/// variable, the variable over the config file, and the file over the default.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with settings; see `config.toml` in the repository for every key.
    #[arg(long, env = "LLMDOCTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1].
    #[arg(long, env = "LLMDOCTOR_HOST")]
    host: Option<String>,
    /// Listen port; 0 picks a free port [default: 8080].
    #[arg(long, env = "LLMDOCTOR_PORT")]
    port: Option<u16>,
    /// Patient model file (.gguf) or Hugging Face folder [default: the fetched
    /// SmolLM2-135M-Instruct, downloaded on first start].
    #[arg(long, env = "LLMDOCTOR_MODEL")]
    model: Option<PathBuf>,
    /// Storage of quantised weights in memory [default: fast].
    #[arg(long, value_enum, env = "LLMDOCTOR_QUANT")]
    quant: Option<QuantArg>,
    /// Folder with one sub-folder per doctor, all loaded at start [default: doctors].
    #[arg(long, env = "LLMDOCTOR_DOCTORS_DIR")]
    doctors_dir: Option<PathBuf>,
    /// API keys for the generation, tokenizer and listing routes, comma-separated
    /// [default: none, no key required].
    #[arg(
        long,
        env = "LLMDOCTOR_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Option<Vec<String>>,
    /// Key for loading and unloading doctors [default: none, admin routes disabled].
    #[arg(long, env = "LLMDOCTOR_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Origins allowed by CORS, comma-separated; `*` allows any [default: none, CORS off].
    #[arg(long, env = "LLMDOCTOR_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    cors_allowed_origins: Option<Vec<String>>,
    /// Largest request body in bytes [default: 4194304].
    #[arg(long, env = "LLMDOCTOR_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// KV-cache budget in bytes over all running requests [default: 2147483648].
    #[arg(long, env = "LLMDOCTOR_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<usize>,
    /// Most requests running at once [default: 64].
    #[arg(long, env = "LLMDOCTOR_MAX_NUM_SEQS")]
    max_num_seqs: Option<usize>,
    /// Most requests waiting; more get 429 [default: 256].
    #[arg(long, env = "LLMDOCTOR_MAX_WAITING")]
    max_waiting: Option<usize>,
    /// Tokens per engine step, prefill and decode together [default: 512].
    #[arg(long, env = "LLMDOCTOR_STEP_TOKEN_BUDGET")]
    step_token_budget: Option<usize>,
    /// Prompt tokens of one request per step [default: 256].
    #[arg(long, env = "LLMDOCTOR_PREFILL_CHUNK")]
    prefill_chunk: Option<usize>,
    /// Seconds without an engine-loop iteration, while requests are pending, before /health
    /// returns 503 [default: 30].
    #[arg(long, env = "LLMDOCTOR_HEALTH_STALL_TIMEOUT")]
    health_stall_timeout: Option<f64>,
    /// max_tokens of requests that set none [default: 256].
    #[arg(long, env = "LLMDOCTOR_DEFAULT_MAX_TOKENS")]
    default_max_tokens: Option<usize>,
    /// The patient's id in /v1/models and responses [default: the model file name without
    /// extension].
    #[arg(long, env = "LLMDOCTOR_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Seed of the RNG that draws seeds for requests without `seed` [default: random].
    #[arg(long, env = "LLMDOCTOR_SEED")]
    seed: Option<u64>,
    /// Measure steering statistics (KL to the patient, changed top token) on one in every N
    /// generated tokens of a steered choice; 1 measures every token [default: 8].
    #[arg(long, value_name = "N", env = "LLMDOCTOR_STEERING_STATS_INTERVAL")]
    steering_stats_interval: Option<usize>,
}

impl ServeArgs {
    fn raw(&self) -> RawConfig {
        RawConfig {
            host: self.host.clone(),
            port: self.port,
            model: self.model.clone(),
            quant: self.quant.map(|q| match q {
                QuantArg::Fast => Quant::Fast,
                QuantArg::AsStored => Quant::AsStored,
                QuantArg::Q8_0 => Quant::Q8_0,
            }),
            doctors_dir: self.doctors_dir.clone(),
            api_keys: self.api_keys.clone(),
            admin_key: self.admin_key.clone(),
            cors_allowed_origins: self.cors_allowed_origins.clone(),
            max_body_bytes: self.max_body_bytes,
            kv_cache_bytes: self.kv_cache_bytes,
            max_num_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            step_token_budget: self.step_token_budget,
            prefill_chunk: self.prefill_chunk,
            health_stall_timeout: self.health_stall_timeout,
            default_max_tokens: self.default_max_tokens,
            served_model_name: self.served_model_name.clone(),
            seed: self.seed,
            steering_stats_interval: self.steering_stats_interval,
        }
    }
}

/// Resolves the settings: flags and environment, then the file, then defaults.
fn settings(args: &ServeArgs) -> anyhow::Result<ServeConfig> {
    let file = match &args.config {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    Ok(ServeConfig::validate(args.raw().or(file))?)
}

/// Returns the patient's path: the configured one, or the default patient, fetched if missing.
fn patient_path(config: &ServeConfig) -> anyhow::Result<PathBuf> {
    if let Some(path) = &config.model {
        return Ok(path.clone());
    }
    let path = fetch::default_model_path()?;
    if !path.exists() {
        tracing::info!(path = %path.display(), "default model not installed; fetching it now (about 100 MB, once)");
        fetch::fetch_model(&fetch::DEFAULT_PATIENT, &FetchOptions::default())?;
    }
    Ok(path)
}

/// Loads the patient and doctors and starts the engine. It runs on a blocking thread while the
/// server already returns 503 from `/health`.
fn load(config: &ServeConfig, metrics: Arc<Metrics>) -> anyhow::Result<Ready> {
    let path = patient_path(config)?;
    tracing::info!(path = %path.display(), "loading the patient model");
    let patient = load_model(&path, &config.load_options(), &Device::Cpu)
        .with_context(|| format!("failed to load the model `{}`", path.display()))?;
    let patient_id = config.served_model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "patient".into())
    });
    Ok(Ready::start(patient, patient_id, config, metrics)?)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "failed to listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "failed to listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = settings(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let address = std::net::SocketAddr::new(config.host, config.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("failed to listen on {address}"))?;
        let bound = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new()?);
        let state = AppState::new(config.clone(), metrics.clone());
        tracing::info!(address = %bound, "listening; /health returns 503 until the model is loaded");
        let loader_state = state.clone();
        let loading = tokio::task::spawn_blocking(move || {
            match load(&loader_state.config, metrics) {
                Ok(ready) => {
                    tracing::info!(model = %ready.patient_id, doctors = ready.registry.list().len(), "ready");
                    loader_state.set_ready(ready);
                    Ok(())
                }
                Err(err) => Err(err),
            }
        });
        let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        tokio::spawn(async move {
            match loading.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    let _ = fail_tx.send(err);
                }
                Err(err) => {
                    let _ = fail_tx.send(anyhow::anyhow!("the loading task failed: {err}"));
                }
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<anyhow::Error>>();
        let stop = async move {
            tokio::select! {
                () = shutdown_signal() => { let _ = stop_tx.send(None); }
                Ok(err) = fail_rx => { let _ = stop_tx.send(Some(err)); }
            }
        };
        api::serve(listener, state, stop).await?;
        match stop_rx.await {
            Ok(Some(err)) => Err(err.context("failed to load the model")),
            _ => {
                tracing::info!("server stopped");
                Ok(())
            }
        }
    })
}
