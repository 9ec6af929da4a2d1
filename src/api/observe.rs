//! Per-request metrics, recorded from the same engine events for streamed and whole responses.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::request::Event;
use crate::metrics::Metrics;

/// Watches one request's events and records latency, token and steering metrics. A request
/// dropped before its end (the client left) is counted as `cancelled`.
pub struct RequestObserver {
    metrics: Arc<Metrics>,
    arrived: Instant,
    first_token: bool,
    last_token: Vec<Option<Instant>>,
    doctors: Vec<String>,
    ended: bool,
}

impl RequestObserver {
    /// Starts observing a request that arrived at `arrived` and was accepted by the engine.
    pub fn new(metrics: Arc<Metrics>, arrived: Instant, n: usize, doctors: Vec<String>) -> Self {
        for doctor in &doctors {
            metrics.doctor_requests.with_label_values(&[doctor]).inc();
        }
        Self {
            metrics,
            arrived,
            first_token: false,
            last_token: vec![None; n],
            doctors,
            ended: false,
        }
    }

    /// Records one event.
    pub fn observe(&mut self, event: &Event) {
        let now = Instant::now();
        match event {
            Event::Token(token) => {
                if !self.first_token {
                    self.first_token = true;
                    self.metrics
                        .time_to_first_token
                        .observe((now - self.arrived).as_secs_f64());
                }
                if let Some(slot) = self.last_token.get_mut(token.choice) {
                    if let Some(previous) = slot.replace(now) {
                        self.metrics
                            .inter_token_latency
                            .observe((now - previous).as_secs_f64());
                    }
                }
            }
            Event::Finished(end) => {
                self.metrics
                    .finished
                    .with_label_values(&[end.reason.as_str()])
                    .inc();
                for doctor in &self.doctors {
                    self.metrics
                        .doctor_tokens
                        .with_label_values(&[doctor])
                        .inc_by(end.completion_tokens as u64);
                    if let Some(steering) = &end.steering {
                        self.metrics
                            .steering_kl
                            .with_label_values(&[doctor])
                            .observe(f64::from(steering.mean_kl));
                        self.metrics
                            .top_token_changed
                            .with_label_values(&[doctor])
                            .inc_by(steering.changed_tokens as u64);
                        self.metrics
                            .measured_tokens
                            .with_label_values(&[doctor])
                            .inc_by(steering.measured_tokens as u64);
                    }
                }
            }
            Event::Done(usage) => {
                self.ended = true;
                self.metrics
                    .prompt_tokens
                    .inc_by(usage.prompt_tokens as u64);
                self.metrics
                    .generation_tokens
                    .inc_by(usage.completion_tokens as u64);
                self.metrics
                    .e2e_latency
                    .observe(self.arrived.elapsed().as_secs_f64());
            }
            Event::Error(_) => {
                self.ended = true;
                self.metrics.finished.with_label_values(&["error"]).inc();
            }
        }
    }
}

impl Drop for RequestObserver {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics
                .finished
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}
