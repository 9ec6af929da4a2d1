//! The TFPO training loop: a LoRA adapter on a frozen dense base plus a value head, trained
//! with AdamW, warm-up and cosine decay, and global gradient-norm clipping, one preference pair
//! per step.
//!
//! Pair order: epoch `e` visits the pairs in a permutation drawn from a ChaCha8 RNG seeded with
//! `seed + e`, and step `s` (from 0) trains on position `s mod n` of epoch `s / n`. The order is
//! therefore a function of the seed and the step alone, and a resumed run continues exactly
//! where the checkpoint stopped.

use std::path::Path;
use std::time::Instant;

use candle_core::Var;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::lora::{AdapterConfig, Projection};
use crate::model::{Llama, LoraAdapter};

use super::checkpoint::{self, CheckpointState, StepLog};
use super::loss::LossParams;
use super::optim::{clip_grad_norm, learning_rate, AdamW, AdamWParams};
use super::tfpo::{pair_loss, reference_log_probs, PolicyTerm, ReferenceLogProbs, TrainingPair};
use super::value_head::{ValueHead, ValueHeadDims};
use super::TrainError;

/// Gradients are rescaled so that their global L2 norm is at most this.
pub const MAX_GRAD_NORM: f64 = 1.0;

/// Settings of a training run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha; the adapter's scale is `alpha / rank`.
    pub lora_alpha: f64,
    /// The projections that get an adapter.
    pub targets: Vec<Projection>,
    /// The layers that get an adapter; `None` for every layer.
    pub layers: Option<Vec<usize>>,
    /// The width of the value head's inner layer.
    pub value_inner: usize,
    /// Total optimizer steps (one pair per step).
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Save a checkpoint every this many steps; `None` saves none.
    pub checkpoint_every: Option<usize>,
    /// Seed of the initial weights and the pair order.
    pub seed: u64,
    /// `γ` and `λ` of the loss.
    pub loss: LossParams,
    /// The quantity that SubTB's policy term measures.
    pub policy_term: PolicyTerm,
}

impl TrainConfig {
    /// Returns the PEFT configuration of the adapter these settings train.
    pub fn adapter_config(&self) -> AdapterConfig {
        AdapterConfig {
            r: self.lora_rank,
            lora_alpha: self.lora_alpha,
            use_rslora: false,
            target_modules: self
                .targets
                .iter()
                .map(|p| p.module_name().to_string())
                .collect(),
            peft_type: "LORA".into(),
            base_model_name_or_path: None,
            layers_to_transform: self.layers.clone(),
        }
    }
}

/// A trained (or partly trained) doctor and its history.
pub struct TrainedDoctor {
    /// The adapter; its tensors are the trained variables.
    pub adapter: LoraAdapter,
    /// The value head.
    pub head: ValueHead,
    /// Every step, resumed ones included.
    pub history: Vec<StepLog>,
    /// The step a checkpoint resumed from, if any.
    pub resumed_from: Option<usize>,
    /// Wall-clock seconds spent training, over all runs.
    pub wall_seconds: f64,
}

/// Returns the index into `pairs` that step `step` (from 0) trains on.
pub fn pair_index(step: usize, pair_count: usize, seed: u64) -> usize {
    let epoch = step / pair_count;
    let mut order: Vec<usize> = (0..pair_count).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(epoch as u64),
    ));
    order[step % pair_count]
}

/// Creates the adapter and head with weights drawn from `seed`.
fn init_trainables(
    model: &Llama,
    config: &TrainConfig,
) -> Result<(LoraAdapter, ValueHead, Vec<Var>), TrainError> {
    let device = model.device();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let (adapter, mut vars) = LoraAdapter::init_trainable(
        model.config(),
        config.adapter_config(),
        &config.targets,
        &mut rng,
        device,
    )?;
    let dims = ValueHeadDims {
        hidden: model.config().hidden_size,
        inner: config.value_inner,
    };
    let head = ValueHead::new(dims, candle_core::DType::F32, device, &mut vars, &mut rng)?;
    Ok((adapter, head, vars))
}

/// Trains on `pairs` for `config.steps` steps, writing checkpoints under `out` and resuming
/// from the latest one found there. `on_step` is called after every new step.
pub fn train(
    model: &Llama,
    pairs: &[TrainingPair],
    config: &TrainConfig,
    out: &Path,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<TrainedDoctor, TrainError> {
    if pairs.is_empty() {
        return Err(TrainError::InvalidParam {
            name: "pairs",
            value: 0.0,
            expected: "training needs at least one pair",
        });
    }
    let (adapter, head, vars) = init_trainables(model, config)?;
    let mut optimizer = AdamW::new(vars.clone(), AdamWParams::default())?;
    let mut state = CheckpointState::default();
    let mut resumed_from = None;
    if let Some(dir) = checkpoint::latest(out) {
        let loaded = checkpoint::load(&dir, &vars, model.device())?;
        optimizer.restore(loaded.optimizer, loaded.state.step)?;
        tracing::info!(checkpoint = %dir.display(), step = loaded.state.step, "resuming");
        resumed_from = Some(loaded.state.step);
        state = loaded.state;
    }

    let started = Instant::now();
    let wall_before = state.wall_seconds;
    // The base is frozen, so each pair's reference is computed on its first visit and kept.
    let mut references: Vec<Option<ReferenceLogProbs>> = vec![None; pairs.len()];
    for step in state.step..config.steps {
        let index = pair_index(step, pairs.len(), config.seed);
        let pair = &pairs[index];
        let reference = match config.policy_term {
            PolicyTerm::Absolute => None,
            PolicyTerm::RelativeToBase => {
                if references[index].is_none() {
                    references[index] = Some(reference_log_probs(model, pair)?);
                }
                references[index].as_ref()
            }
        };
        let loss = pair_loss(model, &adapter, &head, pair, reference, &config.loss)?;
        let loss_value = loss.total.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: step + 1,
                value: loss_value,
            });
        }
        let mut grads = loss.total.backward()?;
        let grad_norm = clip_grad_norm(&mut grads, &vars, MAX_GRAD_NORM)?;
        let lr = learning_rate(step, config.steps, config.warmup_steps, config.lr);
        optimizer.step(&grads, lr)?;

        let log = StepLog {
            step: step + 1,
            pair_id: pair.pair_id.clone(),
            loss: loss_value,
            subtb: loss.subtb,
            value: loss.value,
            lr,
            grad_norm,
        };
        on_step(&log);
        state.history.push(log);
        state.step = step + 1;
        state.wall_seconds = wall_before + started.elapsed().as_secs_f64();
        let due = config
            .checkpoint_every
            .is_some_and(|every| every > 0 && state.step % every == 0);
        if due || state.step == config.steps {
            checkpoint::save(out, &vars, optimizer.state_tensors(), &state)?;
        }
    }
    Ok(TrainedDoctor {
        adapter,
        head,
        history: state.history,
        resumed_from,
        wall_seconds: state.wall_seconds,
    })
}
