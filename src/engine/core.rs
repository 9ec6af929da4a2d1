//! The engine thread: it owns the models and the KV caches, and runs the step loop
//! (plan → build rows → forward → steer → sample → emit).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use crate::doctor::DoctorBase;
use crate::loader::LoadedModel;
use crate::metrics::Metrics;
use crate::model::{KvCache, Llama, LogitsSelection, ModelConfig, ModelError, Row};
use crate::tokenizer::{IncrementalDetokenizer, StopMatcher, StopOutcome};

use super::handle::{Command, EngineHandle, EngineState};
use super::request::{
    ChoiceEnd, EosPolicy, Event, FinishReason, GenerationRequest, SteeringSummary, TokenEvent,
    TokenLogprobs, Usage,
};
use super::sampling::{Sampler, TokenHistory};
use super::scheduler::{RequestId, Scheduled, Scheduler, SchedulerConfig};
use super::steering::{self, SteeringInput, Term};
use super::step_logits::{ChoiceLogits, RowKey, Slot, StepLogits};

/// Settings of the engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
    /// Seeds the RNG that draws seeds for requests without one.
    pub seed: Option<u64>,
    /// Interval of the steering statistics (KL to the patient, changed top token): they are
    /// measured on one generated token in every n of each steered choice, and on every token
    /// of a request with log-probabilities. Each measurement runs the patient's own row through the
    /// output layer, which a steered step otherwise skips. 1 measures every token.
    ///
    /// The measured tokens are `p, p + n, p + 2n, …`, with the phase `p < n` drawn from the
    /// choice's seed. A fixed phase of 0 would always include the first token, where steering
    /// tends to move the distribution most, and bias the means of short replies.
    pub steering_stats_interval: NonZeroUsize,
}

/// The default of [`EngineConfig::steering_stats_interval`].
pub const DEFAULT_STEERING_STATS_INTERVAL: NonZeroUsize = match NonZeroUsize::new(8) {
    Some(n) => n,
    None => unreachable!(),
};

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            seed: None,
            steering_stats_interval: DEFAULT_STEERING_STATS_INTERVAL,
        }
    }
}

/// Starts the engine thread for `patient` and returns its handle.
pub fn start(patient: LoadedModel, config: EngineConfig) -> std::io::Result<EngineHandle> {
    start_with_metrics(patient, config, None)
}

/// Starts the engine thread like [`start`], recording step, batch, queue and doctor timings
/// into `metrics`.
pub fn start_with_metrics(
    patient: LoadedModel,
    config: EngineConfig,
    metrics: Option<Arc<Metrics>>,
) -> std::io::Result<EngineHandle> {
    let (commands, receiver) = mpsc::channel();
    let state = Arc::new(EngineState::new());
    let model_config = patient.model.config().clone();
    let seed = config.seed.unwrap_or_else(rand::random);
    let engine = Engine {
        patient,
        scheduler: Scheduler::new(config.scheduler),
        active: HashMap::new(),
        commands: receiver,
        state: state.clone(),
        seeds: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        metrics,
        stats_interval: config.steering_stats_interval.get(),
    };
    let thread = std::thread::Builder::new()
        .name("llmdoctor-engine".into())
        .spawn(move || engine.run())?;
    Ok(EngineHandle {
        commands,
        state,
        next_id: Arc::new(AtomicU64::new(1)),
        scheduler: config.scheduler,
        patient_bytes_per_token: model_config.kv_bytes_per_token(),
        patient_layers: model_config.num_layers,
        patient_context: model_config.max_position_embeddings,
        thread: Arc::new(std::sync::Mutex::new(Some(thread))),
    })
}

use rand::{RngCore, SeedableRng};

/// One choice of a request: its tokens, its caches (one per row) and its output state.
struct Choice {
    index: usize,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    generated: usize,
    patient_cache: KvCache,
    /// One per doctor, in request order.
    doctor_caches: Vec<KvCache>,
    sampler: Sampler,
    history: TokenHistory,
    detokenizer: IncrementalDetokenizer,
    stop: StopMatcher,
    finished: bool,
    /// KL summed over the measured tokens.
    kl_sum: f64,
    changed_tokens: usize,
    measured_tokens: usize,
    /// The generated-token index, modulo the stats interval, of the measured tokens.
    stats_phase: usize,
}

impl Choice {
    fn computed(&self) -> usize {
        self.patient_cache.len()
    }

    /// Reports whether the token this choice samples next measures steering statistics, with
    /// the engine's `interval` (see [`EngineConfig::steering_stats_interval`]).
    fn measures(&self, interval: usize) -> bool {
        self.sampler.params().top_logprobs().is_some()
            || self.generated % interval == self.stats_phase
    }

    fn clear_caches(&mut self) {
        self.patient_cache.clear();
        for cache in &mut self.doctor_caches {
            cache.clear();
        }
    }
}

/// A request the engine has accepted.
struct Active {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    choices: Vec<Choice>,
    /// Whether the `n` choices exist yet (they fork from choice 0 after the prompt's prefill).
    forked: bool,
    /// KV bytes per position of one choice, over its rows.
    bytes_per_choice_token: usize,
    context_limit: usize,
    base_seed: u64,
    /// When the engine accepted the request, for the queue-time metric.
    accepted_at: Instant,
    /// Whether any of its rows has run yet.
    scheduled_once: bool,
}

struct Engine {
    patient: LoadedModel,
    scheduler: Scheduler,
    active: HashMap<RequestId, Active>,
    commands: mpsc::Receiver<Command>,
    state: Arc<EngineState>,
    seeds: rand_chacha::ChaCha8Rng,
    metrics: Option<Arc<Metrics>>,
    /// [`EngineConfig::steering_stats_interval`].
    stats_interval: usize,
}

/// How long an idle engine waits for a command before refreshing its heartbeat.
const IDLE_TICK: Duration = Duration::from_millis(200);

impl Engine {
    fn run(mut self) {
        tracing::info!("engine started");
        loop {
            let command = if self.scheduler.has_work() {
                self.commands.try_recv().ok()
            } else {
                match self.commands.recv_timeout(IDLE_TICK) {
                    Ok(command) => Some(command),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(command) = command {
                if !self.handle_command(command) {
                    break;
                }
                // Drain everything else that is queued before stepping.
                let mut stop = false;
                while let Ok(command) = self.commands.try_recv() {
                    if !self.handle_command(command) {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
            if self.scheduler.has_work() {
                // The step runs on a worker of the compute pool. Its kernels then split work
                // among the workers directly, instead of handing every parallel call over from
                // this thread and blocking on its completion (about 150 hand-offs per step).
                rayon::scope(|_| self.step());
            }
            self.publish();
        }
        self.abort_all();
        self.publish();
        self.state.stopped.store(true, Ordering::Relaxed);
        tracing::info!("engine stopped");
    }

    /// Applies one command; returns `false` on shutdown.
    fn handle_command(&mut self, command: Command) -> bool {
        match command {
            Command::Submit {
                id,
                request,
                bytes_per_token,
                events,
            } => self.accept(id, *request, bytes_per_token, events),
            Command::Stall(duration) => {
                tracing::warn!(?duration, "engine loop stalled on request");
                std::thread::sleep(duration);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn accept(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        bytes_per_token: usize,
        events: UnboundedSender<Event>,
    ) {
        let enqueued = self
            .scheduler
            .enqueue(id, request.prompt_ids.len(), bytes_per_token);
        // Count the request as waiting before it stops counting as submitted, so that
        // `EngineState::waiting_total` never dips below the true number in between, which
        // would let one request too many past the handle's queue limit.
        self.state
            .waiting
            .store(self.scheduler.waiting_len(), Ordering::Relaxed);
        self.state.submitted.fetch_sub(1, Ordering::Relaxed);
        if let Err(err) = enqueued {
            let _ = events.send(Event::Error(err.to_string()));
            return;
        }
        let context_limit =
            request.context_limit(self.patient.model.config().max_position_embeddings);
        let base_seed = request
            .sampling
            .seed()
            .unwrap_or_else(|| self.seeds.next_u64());
        let first = self.new_choice(
            &request,
            0,
            base_seed,
            request.prompt_ids.clone(),
            TokenHistory::new(&request.prompt_ids),
        );
        self.active.insert(
            id,
            Active {
                bytes_per_choice_token: bytes_per_token / request.n.max(1),
                choices: vec![first],
                forked: request.n == 1,
                request,
                events,
                context_limit,
                base_seed,
                accepted_at: Instant::now(),
                scheduled_once: false,
            },
        );
    }

    fn new_choice(
        &self,
        request: &GenerationRequest,
        index: usize,
        base_seed: u64,
        tokens: Vec<u32>,
        history: TokenHistory,
    ) -> Choice {
        let seed = base_seed.wrapping_add(index as u64);
        Choice {
            index,
            tokens,
            generated: 0,
            patient_cache: KvCache::new(),
            doctor_caches: request
                .steering
                .doctors
                .iter()
                .map(|_| KvCache::new())
                .collect(),
            sampler: Sampler::new(request.sampling.clone().with_seed(Some(seed)), seed),
            history,
            detokenizer: IncrementalDetokenizer::new(self.patient.tokenizer.clone()),
            stop: StopMatcher::new(request.stop_strings.clone()),
            finished: false,
            kl_sum: 0.0,
            changed_tokens: 0,
            measured_tokens: 0,
            // A multiplicative hash, so that nearby seeds get different phases.
            stats_phase: (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize
                % self.stats_interval,
        }
    }

    fn publish(&self) {
        self.state
            .waiting
            .store(self.scheduler.waiting_len(), Ordering::Relaxed);
        self.state
            .running
            .store(self.scheduler.running_len(), Ordering::Relaxed);
        self.state
            .kv_used_bytes
            .store(self.scheduler.used_bytes(), Ordering::Relaxed);
        self.state
            .busy
            .store(self.scheduler.has_work(), Ordering::Relaxed);
        self.state.tick();
    }

    /// Drops requests whose receiver is gone, waiting or running, and frees their caches.
    fn drop_cancelled(&mut self) {
        let cancelled: Vec<RequestId> = self
            .active
            .iter()
            .filter(|(_, active)| active.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in cancelled {
            self.scheduler.remove(id);
            self.active.remove(&id);
            tracing::debug!(request_id = id, "request cancelled by the client");
        }
    }

    fn step(&mut self) {
        self.drop_cancelled();
        let plan = self.scheduler.plan_step();
        for id in &plan.preempted {
            if let Some(active) = self.active.get_mut(id) {
                tracing::debug!(request_id = id, "request preempted, its cache is freed");
                for choice in &mut active.choices {
                    choice.clear_caches();
                }
            }
        }
        if plan.scheduled.is_empty() {
            return;
        }
        let step_started = Instant::now();
        let logits = match self.forward(&plan.scheduled) {
            Ok((logits, stats)) => {
                if let Some(metrics) = &self.metrics {
                    metrics.batch_size.observe(stats.rows as f64);
                    if stats.doctor_rows > 0 {
                        metrics.doctor_forward.observe(stats.doctor_seconds);
                    }
                }
                logits
            }
            Err(err) => {
                tracing::error!(%err, "engine step failed");
                for work in &plan.scheduled {
                    self.fail(work.id, format!("the model failed: {err}"));
                }
                return;
            }
        };
        let mut logits = logits;
        for work in &plan.scheduled {
            self.scheduler.advance(work.id, work.tokens);
            let Some(active) = self.active.get(&work.id) else {
                continue;
            };
            let ready = active
                .choices
                .iter()
                .filter(|c| !c.finished)
                .all(|c| c.computed() == c.tokens.len());
            if ready {
                let mut per_choice = HashMap::new();
                for ((request, choice), value) in logits.drain_filter_request(work.id) {
                    debug_assert_eq!(request, work.id);
                    per_choice.insert(choice, value);
                }
                self.sample_request(work.id, per_choice);
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics
                .step_duration
                .observe(step_started.elapsed().as_secs_f64());
        }
    }

    /// Runs every scheduled row: the patient's rows and the rows of doctors on the patient's
    /// base in one forward, the rows of each other base in their own forward.
    ///
    /// Only choices that sample this step get output rows. A steered choice gets one row that
    /// mixes the final hidden states of its patient row and its doctors on the patient's
    /// base, `α·h_p + Σ β_i·h_i`. The output layer is linear, so its logits are
    /// `α·z_p + Σ β_i·z_i` up to activation rounding, and the doctors' own output rows are
    /// skipped. The patient's own row is added when the step measures steering statistics or
    /// the request has log-probabilities, and each doctor's own row when it has
    /// log-probabilities.
    fn forward(
        &mut self,
        scheduled: &[Scheduled],
    ) -> Result<(StepLogits, ForwardStats), ModelError> {
        let work: HashMap<RequestId, usize> = scheduled.iter().map(|s| (s.id, s.tokens)).collect();
        let patient_model = self.patient.model.clone();
        let mut batches = vec![Batch::new(patient_model.clone())];

        for (&id, active) in self.active.iter_mut() {
            let Some(&tokens) = work.get(&id) else {
                continue;
            };
            if !active.scheduled_once {
                active.scheduled_once = true;
                if let Some(metrics) = &self.metrics {
                    metrics
                        .queue_time
                        .observe(active.accepted_at.elapsed().as_secs_f64());
                }
            }
            let Active {
                request, choices, ..
            } = active;
            let steering = &request.steering;
            let steered = steering.changes_distribution();
            for choice in choices.iter_mut().filter(|c| !c.finished) {
                let start = choice.patient_cache.len();
                let end = (start + tokens).min(choice.tokens.len());
                let is_decode =
                    end - start == 1 && choice.generated > 0 && end == choice.tokens.len();
                if !is_decode {
                    self.state
                        .prefill_tokens
                        .fetch_add((end - start) as u64, Ordering::Relaxed);
                }
                // The choice samples its next token after this step.
                let samples = end == choice.tokens.len();
                let logprobs = choice.sampler.params().top_logprobs().is_some();
                let measures = choice.measures(self.stats_interval);
                let Choice {
                    tokens: ids,
                    patient_cache,
                    doctor_caches,
                    index,
                    ..
                } = choice;
                let key = |slot| RowKey {
                    request: id,
                    choice: *index,
                    slot,
                };
                let chunk = &ids[start..end];
                let patient_row = batches[0].push(
                    Row {
                        tokens: chunk,
                        cache: patient_cache,
                        adapter: None,
                        logits: LogitsSelection::Last,
                        fork_from: None,
                    },
                    false,
                );
                if samples && (!steered || measures) {
                    batches[0].output(key(Slot::Patient), vec![(patient_row, 1.0)], steered);
                }
                let mut mix = Vec::with_capacity(1 + steering.doctors.len());
                if steering.alpha != 0.0 {
                    mix.push((patient_row, steering.alpha));
                }
                for (doctor_index, (weight, cache)) in steering
                    .doctors
                    .iter()
                    .zip(doctor_caches.iter_mut())
                    .enumerate()
                {
                    let model = match &weight.doctor.base {
                        DoctorBase::Patient => patient_model.clone(),
                        DoctorBase::Separate(base) => base.model.clone(),
                    };
                    let batch_index = match batches
                        .iter()
                        .position(|batch| Arc::ptr_eq(&batch.model, &model))
                    {
                        Some(index) => index,
                        None => {
                            batches.push(Batch::new(model));
                            batches.len() - 1
                        }
                    };
                    let on_patient_base = batch_index == 0;
                    // A doctor on the patient's base shares the patient row's hidden states
                    // below its adapter's first layer (none for an adapter on every layer).
                    let row = batches[batch_index].push(
                        Row {
                            tokens: chunk,
                            cache,
                            adapter: Some(&weight.doctor.adapter),
                            logits: LogitsSelection::Last,
                            fork_from: on_patient_base.then_some(patient_row),
                        },
                        true,
                    );
                    if !samples {
                        continue;
                    }
                    if on_patient_base && steered && weight.beta != 0.0 {
                        mix.push((row, weight.beta));
                    }
                    if !on_patient_base || logprobs {
                        batches[batch_index].output(
                            key(Slot::Doctor(doctor_index)),
                            vec![(row, 1.0)],
                            true,
                        );
                    }
                }
                if samples && steered && !mix.is_empty() {
                    batches[0].output(key(Slot::Steered), mix, false);
                }
            }
        }

        run_batches(batches)
    }

    fn fail(&mut self, id: RequestId, message: String) {
        self.scheduler.remove(id);
        if let Some(active) = self.active.remove(&id) {
            let _ = active.events.send(Event::Error(message));
        }
    }

    /// Samples the next token of every unfinished choice of a request whose rows are all
    /// computed, then emits tokens and finishes.
    fn sample_request(&mut self, id: RequestId, logits: HashMap<usize, ChoiceLogits>) {
        let Some(mut active) = self.active.remove(&id) else {
            return;
        };
        if let Err(message) = self.sample_choices(&mut active, logits) {
            self.scheduler.remove(id);
            let _ = active.events.send(Event::Error(message));
            return;
        }
        let alive = active.choices.iter().filter(|c| !c.finished).count();
        if alive == 0 {
            self.scheduler.remove(id);
            let usage = Usage {
                prompt_tokens: active.request.prompt_ids.len(),
                completion_tokens: active.choices.iter().map(|c| c.generated).sum(),
            };
            let _ = active.events.send(Event::Done(usage));
            tracing::info!(
                request_id = id,
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                "request finished"
            );
            return;
        }
        self.scheduler
            .sampled(id, alive * active.bytes_per_choice_token);
        self.active.insert(id, active);
    }

    fn sample_choices(
        &self,
        active: &mut Active,
        mut logits: HashMap<usize, ChoiceLogits>,
    ) -> Result<(), String> {
        let vocab = self.patient.tokenizer.vocab_size();
        if !active.forked {
            // Choice 0 just finished the prompt: the other choices start from copies of its
            // caches and sample from the same distribution with their own seeds.
            let source = logits.remove(&0).unwrap_or_default();
            for index in 1..active.request.n {
                let first = &active.choices[0];
                let mut choice = self.new_choice(
                    &active.request,
                    index,
                    active.base_seed,
                    first.tokens.clone(),
                    first.history.clone(),
                );
                choice.patient_cache = first.patient_cache.fork().map_err(|e| e.to_string())?;
                choice.doctor_caches = first
                    .doctor_caches
                    .iter()
                    .map(|c| c.fork())
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                active.choices.push(choice);
                logits.insert(index, source.clone());
            }
            logits.insert(0, source);
            active.forked = true;
        }

        let steering = &active.request.steering;
        let steered = steering.changes_distribution();
        let mut combined = Vec::with_capacity(vocab);
        for choice in active.choices.iter_mut().filter(|c| !c.finished) {
            // A choice whose every term has weight 0 gets no output row on a step that does
            // not measure, so an absent entry means no rows, and a missing row is an error
            // below.
            let rows = logits.remove(&choice.index).unwrap_or_default();
            let stats = if steered {
                // The patient and the doctors on its base arrive mixed in `rows.steered`.
                // Doctors on other bases add their own rows.
                let zeros: Vec<f32>;
                let mut terms = Vec::with_capacity(1 + steering.doctors.len());
                if let Some(mixed) = &rows.steered {
                    terms.push(Term {
                        weight: 1.0,
                        logits: mixed,
                    });
                }
                for (index, weight) in steering.doctors.iter().enumerate() {
                    if let DoctorBase::Separate(_) = weight.doctor.base {
                        let logits = rows.doctor(index).ok_or("missing doctor logits")?;
                        terms.push(Term {
                            weight: weight.beta,
                            logits,
                        });
                    }
                }
                // With α = 0 and every β = 0 the sum has no term: every logit is 0, so the
                // steered distribution is uniform.
                if terms.is_empty() {
                    zeros = vec![0.0; vocab];
                    terms.push(Term {
                        weight: 1.0,
                        logits: &zeros,
                    });
                }
                let input = SteeringInput {
                    terms: &terms,
                    patient: rows.patient.as_deref(),
                };
                steering::combine(&input, &mut combined).map_err(|e| e.to_string())?
            } else {
                let patient = rows.patient.as_deref().ok_or("missing patient logits")?;
                Some(steering::unsteered(patient, &mut combined))
            };
            let sampled = choice
                .sampler
                .sample(&mut combined, &choice.history)
                .map_err(|e| e.to_string())?;
            let measured = steering.is_steered() && choice.measures(self.stats_interval);
            if let Some(stats) = stats.filter(|_| measured) {
                choice.measured_tokens += 1;
                choice.kl_sum += f64::from(stats.kl_steered_patient);
                if stats.changed_top_token() {
                    choice.changed_tokens += 1;
                }
            }
            let logprobs = choice
                .sampler
                .params()
                .top_logprobs()
                .map(|_| TokenLogprobs {
                    logprob: sampled.logprob,
                    top: sampled
                        .top_logprobs
                        .iter()
                        .map(|t| (t.token, t.logprob))
                        .collect(),
                    patient: rows
                        .patient
                        .as_deref()
                        .map_or(f32::NAN, |p| row_logprob(p, sampled.token)),
                    doctors: (0..steering.doctors.len())
                        .map(|i| {
                            rows.doctor(i)
                                .map_or(f32::NAN, |d| row_logprob(d, sampled.token))
                        })
                        .collect(),
                });
            self.push_token(
                RequestParts {
                    request: &active.request,
                    events: &active.events,
                    context_limit: active.context_limit,
                },
                choice,
                sampled.token,
                logprobs,
            );
        }
        Ok(())
    }

    /// Appends a sampled token to a choice, emits its text, and finishes the choice when a
    /// stop condition holds.
    fn push_token(
        &self,
        parts: RequestParts<'_>,
        choice: &mut Choice,
        token: u32,
        logprobs: Option<TokenLogprobs>,
    ) {
        choice.generated += 1;
        self.state.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let is_stop_token = parts.request.stop_token_ids.contains(&token)
            || (parts.request.eos == EosPolicy::Stop
                && self.patient.tokenizer.stop_token_ids().contains(&token));
        if is_stop_token {
            self.finish(parts, choice, FinishReason::Stop, Some(token));
            return;
        }
        choice.tokens.push(token);
        choice.history.push(token);
        let delta = choice
            .detokenizer
            .push(token)
            .ok()
            .flatten()
            .unwrap_or_default();
        let (text, stopped) = match choice.stop.push(&delta) {
            StopOutcome::Continue { text } => (text, false),
            StopOutcome::Stopped { text, .. } => (text, true),
        };
        let _ = parts.events.send(Event::Token(TokenEvent {
            choice: choice.index,
            id: token,
            text,
            logprobs,
        }));
        if stopped {
            self.finish(parts, choice, FinishReason::Stop, None);
        } else if choice.generated >= parts.request.max_tokens
            || choice.tokens.len() >= parts.context_limit
        {
            self.finish(parts, choice, FinishReason::Length, None);
        }
    }

    fn finish(
        &self,
        parts: RequestParts<'_>,
        choice: &mut Choice,
        reason: FinishReason,
        stop_token: Option<u32>,
    ) {
        choice.finished = true;
        let mut text = String::new();
        if reason != FinishReason::Stop || !choice.stop.is_stopped() {
            let flushed = choice
                .detokenizer
                .finish()
                .ok()
                .flatten()
                .unwrap_or_default();
            if let StopOutcome::Continue { text: released } = choice.stop.push(&flushed) {
                text.push_str(&released);
            }
            text.push_str(&choice.stop.finish());
        }
        choice.clear_caches();
        let steering = parts
            .request
            .steering
            .is_steered()
            .then(|| SteeringSummary {
                doctors: parts
                    .request
                    .steering
                    .doctors
                    .iter()
                    .map(|d| (d.doctor.name().to_string(), d.beta))
                    .collect(),
                alpha: parts.request.steering.alpha,
                changed_tokens: choice.changed_tokens,
                measured_tokens: choice.measured_tokens,
                mean_kl: if choice.measured_tokens > 0 {
                    (choice.kl_sum / choice.measured_tokens as f64) as f32
                } else {
                    0.0
                },
            });
        let _ = parts.events.send(Event::Finished(ChoiceEnd {
            choice: choice.index,
            reason,
            text,
            completion_tokens: choice.generated,
            stop_token,
            steering,
        }));
    }

    /// Finishes every request with `abort`, for shutdown.
    fn abort_all(&mut self) {
        let ids: Vec<RequestId> = self.active.keys().copied().collect();
        for id in ids {
            let Some(mut active) = self.active.remove(&id) else {
                continue;
            };
            self.scheduler.remove(id);
            let parts_request = active.request.clone();
            for choice in active.choices.iter_mut().filter(|c| !c.finished) {
                self.finish(
                    RequestParts {
                        request: &parts_request,
                        events: &active.events,
                        context_limit: active.context_limit,
                    },
                    choice,
                    FinishReason::Abort,
                    None,
                );
            }
            let usage = Usage {
                prompt_tokens: active.request.prompt_ids.len(),
                completion_tokens: active.choices.iter().map(|c| c.generated).sum(),
            };
            let _ = active.events.send(Event::Done(usage));
        }
    }
}

/// The rows of one model in a step and the output-layer rows wanted from them.
struct Batch<'a> {
    model: Arc<Llama>,
    rows: Vec<Row<'a>>,
    /// Per row, whether it is a doctor's.
    doctor_rows: Vec<bool>,
    outputs: Vec<Output>,
}

/// One row of a forward's output layer: the weighted sum of the final hidden states of some
/// rows of the batch, `(row, weight)`.
struct Output {
    key: RowKey,
    terms: Vec<(usize, f32)>,
    /// Whether only steering needs it: a doctor's own row, or the patient's own row of a
    /// steered choice.
    for_steering: bool,
}

impl<'a> Batch<'a> {
    fn new(model: Arc<Llama>) -> Self {
        Self {
            model,
            rows: Vec::new(),
            doctor_rows: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Adds a row and returns its index.
    fn push(&mut self, row: Row<'a>, doctor: bool) -> usize {
        self.rows.push(row);
        self.doctor_rows.push(doctor);
        self.rows.len() - 1
    }

    fn output(&mut self, key: RowKey, terms: Vec<(usize, f32)>, for_steering: bool) {
        self.outputs.push(Output {
            key,
            terms,
            for_steering,
        });
    }
}

/// Runs each model's rows in one forward, then its output layer once over the wanted rows,
/// and collects the logits with row and timing counts.
fn run_batches(batches: Vec<Batch<'_>>) -> Result<(StepLogits, ForwardStats), ModelError> {
    let mut out = StepLogits::default();
    let mut stats = ForwardStats::default();
    for (batch_index, batch) in batches.into_iter().enumerate() {
        let Batch {
            model,
            mut rows,
            doctor_rows,
            outputs,
        } = batch;
        if rows.is_empty() {
            continue;
        }
        let config = model.config();
        let layers = config.num_layers;
        // Work in units of one layer for one token: each row's tokens times the layers it
        // runs, and the output layer's share for each output row.
        let row_work =
            |row: &Row<'_>| (row.tokens.len() * (layers - row.entry_layer(layers))) as f64;
        let output_work = output_layer_share(config);
        let total_work =
            rows.iter().map(row_work).sum::<f64>() + outputs.len() as f64 * output_work;
        let doctor_work = rows
            .iter()
            .zip(&doctor_rows)
            .filter(|(_, &doctor)| doctor)
            .map(|(row, _)| row_work(row))
            .sum::<f64>()
            + outputs.iter().filter(|o| o.for_steering).count() as f64 * output_work;

        let started = Instant::now();
        let hidden = model.forward_hidden(&mut rows)?;
        let inputs = outputs
            .iter()
            .map(|output| mix_rows(&hidden, &output.terms))
            .collect::<Result<Vec<_>, _>>()?;
        for (output, logits) in outputs.iter().zip(model.lm_head_rows(&inputs)?) {
            out.insert(output.key, logits);
        }
        let seconds = started.elapsed().as_secs_f64();
        // NOTE: rows of doctors on the patient's base share one forward with the patient,
        // so their time is estimated as the doctor rows' share of that forward's work.
        stats.doctor_seconds += if batch_index == 0 {
            seconds * doctor_work / total_work.max(1.0)
        } else {
            seconds
        };
        stats.rows += rows.len();
        stats.doctor_rows += doctor_rows.iter().filter(|&&doctor| doctor).count();
    }
    Ok((out, stats))
}

/// Returns `Σ weight · hidden[row]`. One term of weight 1 is the row itself, bit for bit.
fn mix_rows(hidden: &[Tensor], terms: &[(usize, f32)]) -> Result<Tensor, ModelError> {
    let mut sum: Option<Tensor> = None;
    for &(row, weight) in terms {
        let term = if weight == 1.0 {
            hidden[row].clone()
        } else {
            hidden[row].affine(f64::from(weight), 0.0)?
        };
        sum = Some(match sum {
            Some(sum) => (sum + term)?,
            None => term,
        });
    }
    sum.ok_or_else(|| candle_core::Error::Msg("an output row without terms".into()).into())
}

/// Returns the output layer's work for one token relative to one layer's, from the weight
/// counts of the projections.
fn output_layer_share(config: &ModelConfig) -> f64 {
    let hidden = config.hidden_size;
    let kv = config.num_kv_heads * config.head_dim;
    let attention = 2 * hidden * config.num_heads * config.head_dim + 2 * hidden * kv;
    let mlp = 3 * hidden * config.intermediate_size;
    (config.vocab_size * hidden) as f64 / (attention + mlp).max(1) as f64
}

/// Row counts and doctor time of one step's forward.
#[derive(Default)]
struct ForwardStats {
    rows: usize,
    doctor_rows: usize,
    doctor_seconds: f64,
}

/// The parts of a request that emitting a token needs, borrowed apart from its choices.
#[derive(Clone, Copy)]
struct RequestParts<'a> {
    request: &'a GenerationRequest,
    events: &'a UnboundedSender<Event>,
    context_limit: usize,
}

/// The log-probability of `token` under one row's raw logits.
fn row_logprob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits[token as usize] - max - sum.ln()
}
