//! Prometheus metrics of the server and the engine.
//!
//! Every metric name is a constant below and is registered exactly once, in [`Metrics::new`].
//! Labels take bounded values only: `finish_reason` is one of [`FINISH_REASONS`] and `doctor`
//! is the name of a doctor that was loaded in the registry.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Requests running in the engine.
pub const REQUESTS_RUNNING: &str = "llmdoctor_requests_running";
/// Requests waiting in the engine's queue.
pub const REQUESTS_WAITING: &str = "llmdoctor_requests_waiting";
/// Fraction of the KV-cache budget in use, 0 to 1.
pub const KV_CACHE_USAGE_RATIO: &str = "llmdoctor_kv_cache_usage_ratio";
/// Seconds from the request's arrival to its first generated token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "llmdoctor_time_to_first_token_seconds";
/// Seconds between consecutive tokens of one choice.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "llmdoctor_inter_token_latency_seconds";
/// Seconds from the request's arrival to its end.
pub const E2E_REQUEST_LATENCY_SECONDS: &str = "llmdoctor_e2e_request_latency_seconds";
/// Seconds a request waited in the engine before its first step.
pub const QUEUE_TIME_SECONDS: &str = "llmdoctor_queue_time_seconds";
/// Rows (a patient row plus one per doctor, per choice) in one engine step.
pub const BATCH_SIZE_ROWS: &str = "llmdoctor_batch_size_rows";
/// Seconds one engine step takes, forward, steering and sampling.
pub const STEP_DURATION_SECONDS: &str = "llmdoctor_step_duration_seconds";
/// Prompt tokens of finished requests.
pub const PROMPT_TOKENS_TOTAL: &str = "llmdoctor_prompt_tokens_total";
/// Generated tokens of finished requests.
pub const GENERATION_TOKENS_TOTAL: &str = "llmdoctor_generation_tokens_total";
/// Finished choices by finish reason.
pub const REQUEST_SUCCESS_TOTAL: &str = "llmdoctor_request_success_total";
/// Requests steered by each doctor.
pub const DOCTOR_REQUESTS_TOTAL: &str = "llmdoctor_doctor_requests_total";
/// Tokens generated under each doctor's steering.
pub const DOCTOR_TOKENS_TOTAL: &str = "llmdoctor_doctor_tokens_total";
/// Seconds of doctor rows' forward per step.
pub const DOCTOR_FORWARD_SECONDS: &str = "llmdoctor_doctor_forward_seconds";
/// Mean per-token KL(steered ‖ patient) of one steered choice, in nats.
pub const STEERING_KL_NATS: &str = "llmdoctor_steering_kl_nats";
/// Measured tokens where steering changed the patient's most likely token.
pub const STEERING_TOP_TOKEN_CHANGED_TOTAL: &str = "llmdoctor_steering_top_token_changed_total";
/// Tokens on which steering statistics were measured.
pub const STEERING_MEASURED_TOKENS_TOTAL: &str = "llmdoctor_steering_measured_tokens_total";

/// Values of the `finish_reason` label: the engine's reasons plus `cancelled` for a client
/// that left and `error` for a failed generation.
pub const FINISH_REASONS: [&str; 5] = ["stop", "length", "abort", "cancelled", "error"];

/// Latency buckets in seconds: a geometric series from 1 ms to about 65 s (factor 2), wide
/// enough for a token on a GPU and for a long CPU prefill.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}

/// Batch-size buckets in rows: powers of two up to 1024.
fn batch_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 11).unwrap_or_default()
}

/// KL buckets in nats: from 0.001 to about 16 (factor 4 between buckets).
fn kl_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 4.0, 8).unwrap_or_default()
}

/// The metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// [`REQUESTS_RUNNING`].
    pub requests_running: IntGauge,
    /// [`REQUESTS_WAITING`].
    pub requests_waiting: IntGauge,
    /// [`KV_CACHE_USAGE_RATIO`].
    pub kv_cache_usage: Gauge,
    /// [`TIME_TO_FIRST_TOKEN_SECONDS`].
    pub time_to_first_token: Histogram,
    /// [`INTER_TOKEN_LATENCY_SECONDS`].
    pub inter_token_latency: Histogram,
    /// [`E2E_REQUEST_LATENCY_SECONDS`].
    pub e2e_latency: Histogram,
    /// [`QUEUE_TIME_SECONDS`].
    pub queue_time: Histogram,
    /// [`BATCH_SIZE_ROWS`].
    pub batch_size: Histogram,
    /// [`STEP_DURATION_SECONDS`].
    pub step_duration: Histogram,
    /// [`PROMPT_TOKENS_TOTAL`].
    pub prompt_tokens: IntCounter,
    /// [`GENERATION_TOKENS_TOTAL`].
    pub generation_tokens: IntCounter,
    /// [`REQUEST_SUCCESS_TOTAL`], by `finish_reason`.
    pub finished: IntCounterVec,
    /// [`DOCTOR_REQUESTS_TOTAL`], by `doctor`.
    pub doctor_requests: IntCounterVec,
    /// [`DOCTOR_TOKENS_TOTAL`], by `doctor`.
    pub doctor_tokens: IntCounterVec,
    /// [`DOCTOR_FORWARD_SECONDS`].
    pub doctor_forward: Histogram,
    /// [`STEERING_KL_NATS`], by `doctor`: each doctor of a steered choice gets its KL.
    pub steering_kl: HistogramVec,
    /// [`STEERING_TOP_TOKEN_CHANGED_TOTAL`], by `doctor`: each doctor of the request is credited.
    pub top_token_changed: IntCounterVec,
    /// [`STEERING_MEASURED_TOKENS_TOTAL`], by doctor.
    pub measured_tokens: IntCounterVec,
}

/// A metric failed to register (a duplicate name: a bug).
#[derive(Debug, thiserror::Error)]
#[error("failed to register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, MetricsError> {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntCounterVec, MetricsError> {
    let metric = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let requests_running = IntGauge::new(REQUESTS_RUNNING, "Requests running in the engine")?;
        registry.register(Box::new(requests_running.clone()))?;
        let requests_waiting =
            IntGauge::new(REQUESTS_WAITING, "Requests waiting in the engine queue")?;
        registry.register(Box::new(requests_waiting.clone()))?;
        let kv_cache_usage = Gauge::new(
            KV_CACHE_USAGE_RATIO,
            "Fraction of the KV-cache budget in use",
        )?;
        registry.register(Box::new(kv_cache_usage.clone()))?;
        let prompt_tokens = IntCounter::new(PROMPT_TOKENS_TOTAL, "Prompt tokens processed")?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        let generation_tokens = IntCounter::new(GENERATION_TOKENS_TOTAL, "Tokens generated")?;
        registry.register(Box::new(generation_tokens.clone()))?;
        let steering_kl = HistogramVec::new(
            HistogramOpts::new(
                STEERING_KL_NATS,
                "Mean per-token KL(steered || patient) of a steered choice, nats",
            )
            .buckets(kl_buckets()),
            &["doctor"],
        )?;
        registry.register(Box::new(steering_kl.clone()))?;
        let finished = counter_vec(
            &registry,
            REQUEST_SUCCESS_TOTAL,
            "Finished choices by finish reason",
            "finish_reason",
        )?;
        for reason in FINISH_REASONS {
            finished.with_label_values(&[reason]);
        }
        Ok(Self {
            requests_running,
            requests_waiting,
            kv_cache_usage,
            time_to_first_token: histogram(
                &registry,
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Seconds from arrival to the first generated token",
                latency_buckets(),
            )?,
            inter_token_latency: histogram(
                &registry,
                INTER_TOKEN_LATENCY_SECONDS,
                "Seconds between consecutive tokens of a choice",
                latency_buckets(),
            )?,
            e2e_latency: histogram(
                &registry,
                E2E_REQUEST_LATENCY_SECONDS,
                "Seconds from arrival to the end of a request",
                latency_buckets(),
            )?,
            queue_time: histogram(
                &registry,
                QUEUE_TIME_SECONDS,
                "Seconds a request waited before its first engine step",
                latency_buckets(),
            )?,
            batch_size: histogram(
                &registry,
                BATCH_SIZE_ROWS,
                "Rows in one engine step",
                batch_buckets(),
            )?,
            step_duration: histogram(
                &registry,
                STEP_DURATION_SECONDS,
                "Seconds per engine step",
                latency_buckets(),
            )?,
            prompt_tokens,
            generation_tokens,
            finished,
            doctor_requests: counter_vec(
                &registry,
                DOCTOR_REQUESTS_TOTAL,
                "Requests steered by each doctor",
                "doctor",
            )?,
            doctor_tokens: counter_vec(
                &registry,
                DOCTOR_TOKENS_TOTAL,
                "Tokens generated under each doctor's steering",
                "doctor",
            )?,
            doctor_forward: histogram(
                &registry,
                DOCTOR_FORWARD_SECONDS,
                "Seconds of doctor rows' forward per engine step (shared-base rows: their share of the step's forward, by tokens times layers run)",
                latency_buckets(),
            )?,
            steering_kl,
            top_token_changed: counter_vec(
                &registry,
                STEERING_TOP_TOKEN_CHANGED_TOTAL,
                "Measured tokens where steering changed the patient's most likely token",
                "doctor",
            )?,
            measured_tokens: counter_vec(
                &registry,
                STEERING_MEASURED_TOKENS_TOTAL,
                "Tokens on which steering statistics were measured: one in every steering_stats_interval generated tokens, every token of requests with logprobs",
                "doctor",
            )?,
            registry,
        })
    }

    /// Renders every metric in Prometheus' text format.
    pub fn render(&self) -> Result<String, MetricsError> {
        Ok(TextEncoder::new().encode_to_string(&self.registry.gather())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_rendered_once() {
        let metrics = Metrics::new().unwrap();
        metrics.doctor_requests.with_label_values(&["d"]).inc();
        metrics.doctor_tokens.with_label_values(&["d"]).inc();
        metrics.top_token_changed.with_label_values(&["d"]).inc();
        metrics.measured_tokens.with_label_values(&["d"]).inc();
        metrics.steering_kl.with_label_values(&["d"]).observe(0.1);
        let text = metrics.render().unwrap();
        for name in [
            REQUESTS_RUNNING,
            REQUESTS_WAITING,
            KV_CACHE_USAGE_RATIO,
            TIME_TO_FIRST_TOKEN_SECONDS,
            INTER_TOKEN_LATENCY_SECONDS,
            E2E_REQUEST_LATENCY_SECONDS,
            QUEUE_TIME_SECONDS,
            BATCH_SIZE_ROWS,
            STEP_DURATION_SECONDS,
            PROMPT_TOKENS_TOTAL,
            GENERATION_TOKENS_TOTAL,
            REQUEST_SUCCESS_TOTAL,
            DOCTOR_REQUESTS_TOTAL,
            DOCTOR_TOKENS_TOTAL,
            DOCTOR_FORWARD_SECONDS,
            STEERING_KL_NATS,
            STEERING_TOP_TOKEN_CHANGED_TOTAL,
            STEERING_MEASURED_TOKENS_TOTAL,
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
    }
}
