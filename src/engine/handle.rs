//! The engine thread's public face: a cloneable handle that submits requests and reads the
//! engine's live state.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::request::{Event, GenerationRequest};
use super::scheduler::{RequestId, ScheduleError, SchedulerConfig, BLOCK_TOKENS};

/// Errors returned when submitting a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full; retry later.
    #[error("the server is overloaded: {waiting} requests are already waiting, retry later")]
    Overloaded {
        /// Requests waiting.
        waiting: usize,
    },
    /// The request needs more KV cache than the whole budget.
    #[error("the request needs {needed} bytes of KV cache, more than the budget of {budget} bytes; lower `n`, `max_tokens` or the prompt length")]
    TooLarge {
        /// Bytes needed.
        needed: usize,
        /// The budget.
        budget: usize,
    },
    /// The prompt leaves no room to generate.
    #[error("the prompt has {prompt_tokens} tokens but the context window is {limit} tokens")]
    ContextOverflow {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// The smallest context among the patient and the request's doctors.
        limit: usize,
    },
    /// The request has no prompt tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The engine thread has stopped.
    #[error("the engine has shut down")]
    ShutDown,
}

impl From<ScheduleError> for EngineError {
    fn from(err: ScheduleError) -> Self {
        match err {
            ScheduleError::Overloaded { waiting } => Self::Overloaded { waiting },
            ScheduleError::TooLarge { needed, budget } => Self::TooLarge { needed, budget },
        }
    }
}

pub(crate) enum Command {
    Submit {
        id: RequestId,
        request: Box<GenerationRequest>,
        bytes_per_token: usize,
        events: UnboundedSender<Event>,
    },
    /// Blocks the engine loop for a while, as a stuck step would (for health-check tests).
    Stall(Duration),
    /// Finishes every request with `abort` and stops the loop.
    Shutdown,
}

/// Live counters the engine publishes after every step.
#[derive(Debug)]
pub struct EngineState {
    started: Instant,
    /// Requests in the scheduler's waiting queue, as of the last tick.
    pub waiting: AtomicUsize,
    /// Requests submitted through a handle that the engine loop has not picked up yet.
    pub submitted: AtomicUsize,
    /// Requests running.
    pub running: AtomicUsize,
    /// KV bytes charged to running requests.
    pub kv_used_bytes: AtomicUsize,
    /// Milliseconds since start at the end of the last loop iteration.
    last_tick_ms: AtomicU64,
    /// Whether the engine had work at the last tick.
    pub busy: AtomicBool,
    /// Set once the loop has exited.
    pub stopped: AtomicBool,
    /// Prompt and recomputed positions processed by patient rows since start.
    pub prefill_tokens: AtomicU64,
    /// Tokens sampled since start, over all choices.
    pub generated_tokens: AtomicU64,
}

impl EngineState {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            waiting: AtomicUsize::new(0),
            submitted: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_used_bytes: AtomicUsize::new(0),
            last_tick_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            prefill_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
        }
    }

    /// Requests not running yet: queued in the scheduler or not yet picked up.
    pub fn waiting_total(&self) -> usize {
        self.waiting.load(Ordering::Relaxed) + self.submitted.load(Ordering::Relaxed)
    }

    pub(crate) fn tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the loop last completed an iteration.
    pub fn since_last_tick(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed)))
    }
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) state: Arc<EngineState>,
    pub(crate) next_id: Arc<AtomicU64>,
    pub(crate) scheduler: SchedulerConfig,
    /// KV bytes per position of one patient row.
    pub(crate) patient_bytes_per_token: usize,
    /// The patient's layer count.
    pub(crate) patient_layers: usize,
    /// Returns the patient's context window.
    pub(crate) patient_context: usize,
    pub(crate) thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

/// The receiving end of one request's events.
pub type EventReceiver = UnboundedReceiver<Event>;

impl EngineHandle {
    /// Submits a request. Returns its event stream, or an error when the request cannot be
    /// queued. Dropping the receiver cancels the request at the next step.
    pub fn submit(&self, request: GenerationRequest) -> Result<EventReceiver, EngineError> {
        if self.state.stopped.load(Ordering::Relaxed) {
            return Err(EngineError::ShutDown);
        }
        let prompt_tokens = request.prompt_ids.len();
        if prompt_tokens == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = self.context_limit(&request);
        if prompt_tokens >= limit {
            return Err(EngineError::ContextOverflow {
                prompt_tokens,
                limit,
            });
        }
        let waiting = self.state.waiting_total();
        if waiting >= self.scheduler.max_waiting {
            return Err(EngineError::Overloaded { waiting });
        }
        let bytes_per_token = self.bytes_per_token(&request);
        let needed = (prompt_tokens + 1).div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS * bytes_per_token;
        if needed > self.scheduler.kv_budget_bytes {
            return Err(EngineError::TooLarge {
                needed,
                budget: self.scheduler.kv_budget_bytes,
            });
        }
        let (events, receiver) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.state.submitted.fetch_add(1, Ordering::Relaxed);
        self.commands
            .send(Command::Submit {
                id,
                request: Box::new(request),
                bytes_per_token,
                events,
            })
            .map_err(|_| EngineError::ShutDown)?;
        Ok(receiver)
    }

    /// Returns the smallest context window among the patient and the request's doctors.
    pub fn context_limit(&self, request: &GenerationRequest) -> usize {
        request.context_limit(self.patient_context)
    }

    /// The patient's context window.
    pub fn patient_context(&self) -> usize {
        self.patient_context
    }

    /// KV bytes per position over all rows of a request, for every choice.
    pub fn bytes_per_token(&self, request: &GenerationRequest) -> usize {
        let doctor_rows: usize = request
            .steering
            .doctors
            .iter()
            .map(|d| match &d.doctor.base {
                // Such a row keeps only the layers from its adapter's first one on.
                crate::doctor::DoctorBase::Patient => {
                    let layers = self.patient_layers.max(1);
                    let kept_layers = layers - d.doctor.adapter.first_layer().min(layers);
                    self.patient_bytes_per_token / layers * kept_layers
                }
                crate::doctor::DoctorBase::Separate(base) => {
                    base.model.config().kv_bytes_per_token()
                }
            })
            .sum();
        request.n * (self.patient_bytes_per_token + doctor_rows)
    }

    /// Returns the live counters.
    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// Returns the scheduler limits.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Blocks the engine loop for `duration`, as a stuck step would. For health-check tests.
    pub fn stall(&self, duration: Duration) {
        let _ = self.commands.send(Command::Stall(duration));
    }

    /// Aborts every request and stops the engine thread, waiting for it to exit.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
