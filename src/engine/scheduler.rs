//! The continuous-batching scheduler: which requests run in the next step, how many of their
//! tokens, and which are preempted. Pure bookkeeping, no tensors, so it is unit-tested alone.
//!
//! Memory is accounted in blocks of [`BLOCK_TOKENS`] positions: a request holding `len`
//! positions is charged `ceil(len / BLOCK_TOKENS) · BLOCK_TOKENS · bytes_per_token`, where
//! `bytes_per_token` covers every row of the request (the patient row and one row per doctor,
//! for each choice).

use std::collections::VecDeque;

/// Positions per KV block.
pub const BLOCK_TOKENS: usize = 16;

/// Identifies a request inside the engine.
pub type RequestId = u64;

/// Limits of the scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// KV-cache budget in bytes, over all rows of all running requests.
    pub kv_budget_bytes: usize,
    /// Maximum number of running requests.
    pub max_num_seqs: usize,
    /// Maximum number of waiting requests; one more is rejected as overloaded.
    pub max_waiting: usize,
    /// Tokens a step may process, decode and prefill together.
    pub step_token_budget: usize,
    /// Prompt tokens of one request processed per step. Chunk boundaries depend only on the
    /// prompt length and this value, never on the load, so a request's numerics do not depend
    /// on what else runs.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            kv_budget_bytes: 2 << 30,
            max_num_seqs: 64,
            max_waiting: 256,
            step_token_budget: 512,
            prefill_chunk: 256,
        }
    }
}

/// The scheduler's record of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    id: RequestId,
    /// Bytes of KV cache per position, over all of the request's rows.
    bytes_per_token: usize,
    /// Positions already in the cache.
    computed: usize,
    /// Positions that must be computed before the next token can be sampled.
    pending: usize,
}

impl Entry {
    fn charge(&self, positions: usize) -> usize {
        positions.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS * self.bytes_per_token
    }
}

/// The reason a request cannot be admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The waiting queue is full.
    #[error("the server is overloaded: {waiting} requests are already waiting")]
    Overloaded {
        /// Requests waiting.
        waiting: usize,
    },
    /// The request alone needs more KV cache than the whole budget.
    #[error(
        "the request needs {needed} bytes of KV cache, more than the budget of {budget} bytes"
    )]
    TooLarge {
        /// Bytes the request would need.
        needed: usize,
        /// The configured budget.
        budget: usize,
    },
}

/// One request's work in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// The request.
    pub id: RequestId,
    /// Positions to compute in this step.
    pub tokens: usize,
}

/// The decisions for one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Work to run, decodes first, then prefill chunks, oldest request first.
    pub scheduled: Vec<Scheduled>,
    /// Requests whose caches must be freed: they go back to the front of the queue and
    /// recompute their positions when readmitted.
    pub preempted: Vec<RequestId>,
}

/// Waiting queue, running set and the KV budget.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    waiting: VecDeque<Entry>,
    /// In admission order: the last one is the newest.
    running: Vec<Entry>,
    used_bytes: usize,
}

impl Scheduler {
    /// Creates an empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            used_bytes: 0,
        }
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request that must compute `prompt_tokens` positions before its first sample.
    pub fn enqueue(
        &mut self,
        id: RequestId,
        prompt_tokens: usize,
        bytes_per_token: usize,
    ) -> Result<(), ScheduleError> {
        if self.waiting.len() >= self.config.max_waiting {
            return Err(ScheduleError::Overloaded {
                waiting: self.waiting.len(),
            });
        }
        let entry = Entry {
            id,
            bytes_per_token,
            computed: 0,
            pending: prompt_tokens,
        };
        // One more block for the first generated token.
        let needed = entry.charge(prompt_tokens + 1);
        if needed > self.config.kv_budget_bytes {
            return Err(ScheduleError::TooLarge {
                needed,
                budget: self.config.kv_budget_bytes,
            });
        }
        self.waiting.push_back(entry);
        Ok(())
    }

    /// Removes a request, waiting or running, and releases its memory.
    pub fn remove(&mut self, id: RequestId) -> bool {
        if let Some(pos) = self.waiting.iter().position(|e| e.id == id) {
            self.waiting.remove(pos);
            return true;
        }
        if let Some(pos) = self.running.iter().position(|e| e.id == id) {
            let entry = self.running.remove(pos);
            self.used_bytes -= entry.charge(entry.computed + entry.pending);
            return true;
        }
        false
    }

    /// Records that `tokens` positions of a running request were computed.
    pub fn advance(&mut self, id: RequestId, tokens: usize) {
        if let Some(entry) = self.running.iter_mut().find(|e| e.id == id) {
            let tokens = tokens.min(entry.pending);
            entry.computed += tokens;
            entry.pending -= tokens;
        }
    }

    /// Records that a request sampled a token (one more position to compute) and that its
    /// rows now cost `bytes_per_token` (choices that finished no longer count).
    pub fn sampled(&mut self, id: RequestId, bytes_per_token: usize) {
        if let Some(entry) = self.running.iter_mut().find(|e| e.id == id) {
            let before = entry.charge(entry.computed + entry.pending);
            entry.bytes_per_token = bytes_per_token;
            entry.pending += 1;
            let after = entry.charge(entry.computed + entry.pending);
            self.used_bytes = self.used_bytes + after - before;
        }
    }

    /// Number of waiting requests.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Number of running requests.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Bytes charged to running requests.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// KV blocks in use, over all rows, as `(used, total)` in units of the charge of one block
    /// of one byte per token: a ratio, for the usage gauge.
    pub fn usage_ratio(&self) -> f64 {
        self.used_bytes as f64 / self.config.kv_budget_bytes.max(1) as f64
    }

    /// Reports whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Decides the next step.
    ///
    /// 1. Running requests with one pending position (decodes) are scheduled oldest first. When
    ///    one needs a new block and the budget is spent, the newest running request is
    ///    preempted until it fits. That may be the decoding request itself.
    /// 2. Running requests still in prefill get their next chunk while the step's token budget
    ///    lasts.
    /// 3. Waiting requests are admitted in order while their whole pending prompt fits the
    ///    memory budget and `max_num_seqs` allows, and get their first chunk.
    ///
    /// A step with no work scheduled under these rules still runs the oldest chunk, so a
    /// prompt larger than the token budget makes progress.
    pub fn plan_step(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut tokens_left = self.config.step_token_budget;

        self.plan_decodes(&mut plan, &mut tokens_left);

        for entry in &self.running {
            if entry.pending <= 1 && entry.computed > 0 {
                continue;
            }
            let chunk = entry.pending.min(self.config.prefill_chunk);
            if chunk <= tokens_left {
                tokens_left -= chunk;
                plan.scheduled.push(Scheduled {
                    id: entry.id,
                    tokens: chunk,
                });
            }
        }

        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.config.max_num_seqs {
                break;
            }
            let charge = front.charge(front.computed + front.pending);
            if self.used_bytes + charge > self.config.kv_budget_bytes {
                break;
            }
            let chunk = front.pending.min(self.config.prefill_chunk);
            if chunk > tokens_left && !plan.scheduled.is_empty() {
                break;
            }
            let Some(entry) = self.waiting.pop_front() else {
                break;
            };
            self.used_bytes += charge;
            tokens_left = tokens_left.saturating_sub(chunk);
            plan.scheduled.push(Scheduled {
                id: entry.id,
                tokens: chunk,
            });
            self.running.push(entry);
        }

        if plan.scheduled.is_empty() {
            if let Some(entry) = self.running.iter().find(|e| e.pending > 0) {
                plan.scheduled.push(Scheduled {
                    id: entry.id,
                    tokens: entry.pending.min(self.config.prefill_chunk),
                });
            }
        }
        plan
    }

    fn plan_decodes(&mut self, plan: &mut StepPlan, tokens_left: &mut usize) {
        let mut index = 0;
        while index < self.running.len() {
            let entry = &self.running[index];
            let is_decode = entry.pending == 1 && entry.computed > 0;
            if !is_decode {
                index += 1;
                continue;
            }
            // Decodes already charged their new position in `sampled`; the charge includes
            // the next block, so this loop only has to restore the budget invariant.
            while self.used_bytes > self.config.kv_budget_bytes && index < self.running.len() {
                let newest = self.running.len() - 1;
                self.preempt(newest, plan);
            }
            if index >= self.running.len() {
                break;
            }
            let entry = &self.running[index];
            *tokens_left = tokens_left.saturating_sub(1);
            plan.scheduled.push(Scheduled {
                id: entry.id,
                tokens: 1,
            });
            index += 1;
        }
    }

    fn preempt(&mut self, index: usize, plan: &mut StepPlan) {
        let mut entry = self.running.remove(index);
        self.used_bytes -= entry.charge(entry.computed + entry.pending);
        plan.scheduled.retain(|s| s.id != entry.id);
        plan.preempted.push(entry.id);
        entry.pending += entry.computed;
        entry.computed = 0;
        self.waiting.push_front(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(budget_tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            kv_budget_bytes: budget_tokens,
            max_num_seqs: 8,
            max_waiting: 4,
            step_token_budget: 64,
            prefill_chunk: 32,
        }
    }

    /// Runs the plan as the engine would: advance every scheduled request, and sample for
    /// those that computed all their pending positions.
    fn execute(s: &mut Scheduler, plan: &StepPlan) -> Vec<RequestId> {
        let mut sampled = Vec::new();
        for work in &plan.scheduled {
            s.advance(work.id, work.tokens);
            let entry = s.running.iter().find(|e| e.id == work.id).unwrap();
            if entry.pending == 0 {
                s.sampled(work.id, 1);
                sampled.push(work.id);
            }
        }
        sampled
    }

    #[test]
    fn prefill_is_chunked_and_decodes_go_first() {
        let mut s = Scheduler::new(config(10_000));
        s.enqueue(1, 5, 1).unwrap();
        let plan = s.plan_step();
        assert_eq!(plan.scheduled, vec![Scheduled { id: 1, tokens: 5 }]);
        execute(&mut s, &plan);

        s.enqueue(2, 100, 1).unwrap();
        let plan = s.plan_step();
        assert_eq!(
            plan.scheduled,
            vec![
                Scheduled { id: 1, tokens: 1 },
                Scheduled { id: 2, tokens: 32 }
            ]
        );
        execute(&mut s, &plan);
        let plan = s.plan_step();
        assert_eq!(
            plan.scheduled,
            vec![
                Scheduled { id: 1, tokens: 1 },
                Scheduled { id: 2, tokens: 32 }
            ]
        );
    }

    #[test]
    fn chunks_respect_step_token_budget() {
        let mut s = Scheduler::new(config(10_000));
        for id in 1..=3 {
            s.enqueue(id, 40, 1).unwrap();
        }
        let plan = s.plan_step();
        // 64 tokens: two chunks of 32; the third request waits.
        assert_eq!(
            plan.scheduled,
            vec![
                Scheduled { id: 1, tokens: 32 },
                Scheduled { id: 2, tokens: 32 }
            ]
        );
        assert_eq!(s.waiting_len(), 1);
    }

    #[test]
    fn full_queue_is_overloaded() {
        let mut s = Scheduler::new(config(10_000));
        for id in 0..4 {
            s.enqueue(id, 3, 1).unwrap();
        }
        assert_eq!(
            s.enqueue(9, 3, 1),
            Err(ScheduleError::Overloaded { waiting: 4 })
        );
    }

    #[test]
    fn request_larger_than_budget_is_rejected() {
        let mut s = Scheduler::new(config(64));
        let err = s.enqueue(1, 100, 1).unwrap_err();
        assert_eq!(
            err,
            ScheduleError::TooLarge {
                needed: 112,
                budget: 64
            }
        );
    }

    #[test]
    fn admission_waits_for_memory() {
        let mut s = Scheduler::new(config(64));
        s.enqueue(1, 20, 1).unwrap(); // charged 32
        s.enqueue(2, 20, 1).unwrap(); // charged 32
        s.enqueue(3, 20, 1).unwrap();
        let plan = s.plan_step();
        assert_eq!(plan.scheduled.len(), 2);
        assert_eq!(s.running_len(), 2);
        assert_eq!(s.waiting_len(), 1);
        assert_eq!(s.used_bytes(), 64);
    }

    #[test]
    fn max_num_seqs_limits_running() {
        let mut cfg = config(10_000);
        cfg.max_num_seqs = 1;
        let mut s = Scheduler::new(cfg);
        s.enqueue(1, 2, 1).unwrap();
        s.enqueue(2, 2, 1).unwrap();
        s.plan_step();
        assert_eq!(s.running_len(), 1);
    }

    #[test]
    fn newest_is_preempted_and_everything_completes() {
        // Two requests of 14 prompt tokens fit in 64 positions until they grow past 32 each.
        let mut s = Scheduler::new(config(64));
        s.enqueue(1, 14, 1).unwrap();
        s.enqueue(2, 14, 1).unwrap();
        let mut generated = [0usize; 3];
        let mut preempted = Vec::new();
        for _ in 0..200 {
            let plan = s.plan_step();
            assert!(s.used_bytes() <= 64, "budget exceeded: {}", s.used_bytes());
            preempted.extend(plan.preempted.iter().copied());
            for id in execute(&mut s, &plan) {
                generated[id as usize] += 1;
                if generated[id as usize] == 30 {
                    s.remove(id);
                }
            }
            if !s.has_work() {
                break;
            }
        }
        assert_eq!(generated[1], 30);
        assert_eq!(generated[2], 30);
        assert_eq!(
            preempted.first(),
            Some(&2),
            "the newest request is preempted"
        );
        assert_eq!(s.used_bytes(), 0);
    }

    #[test]
    fn removing_a_waiting_request_never_runs_it() {
        let mut s = Scheduler::new(config(10_000));
        s.enqueue(1, 3, 1).unwrap();
        assert!(s.remove(1));
        assert!(s.plan_step().scheduled.is_empty());
        assert!(!s.has_work());
    }

    #[test]
    fn removing_a_running_request_frees_memory() {
        let mut s = Scheduler::new(config(10_000));
        s.enqueue(1, 20, 2).unwrap();
        let plan = s.plan_step();
        execute(&mut s, &plan);
        assert!(s.used_bytes() > 0);
        s.remove(1);
        assert_eq!(s.used_bytes(), 0);
    }
}
