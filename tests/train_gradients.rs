//! The TFPO loss's gradient through a tiny model's LoRA adapter and value head, checked against
//! central finite differences.
//!
//! The model runs in f32 only, so the check uses the entries with the largest gradient in each
//! checked tensor, where f32 round-off is smallest relative to the derivative. The step of 1e-2
//! balances round-off (about 1e-7 of the loss, divided by the step) against the O(step²)
//! truncation error. Every weight comes from a fixed seed, so the checked point is the same on
//! every run. A random point could sit within one step of the value hinge's kink, where the
//! finite difference is wrong by design.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor, Var};
use llmdoctor::model::lora::{AdapterConfig, Projection};
use llmdoctor::model::tiny::{TinySpec, TinyWeights};
use llmdoctor::model::{KvCache, LogitsSelection, Row};
use llmdoctor::model::{Llama, LoadOptions, LoraAdapter, WeightFormat};
use llmdoctor::train::loss::{divergence_point, pair_tfpo_loss, Trajectory};
use llmdoctor::train::rewards::cumulative_log_q;
use llmdoctor::train::tfpo::{
    pair_loss, reference_log_probs, ReferenceLogProbs, TrainingPair, TrainingResponse,
};
use llmdoctor::train::{LossParams, ValueHead, ValueHeadDims};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STEP: f32 = 1e-2;
const TOLERANCE: f64 = 1e-3;

fn tiny_dense_model(dir: &std::path::Path) -> Llama {
    let path = dir.join("tiny.gguf");
    TinyWeights::random(TinySpec::default())
        .unwrap()
        .write_gguf(&path, GgmlDType::F32)
        .unwrap();
    let options = LoadOptions {
        format: WeightFormat::Dense,
    };
    Llama::load(&path, &options, &Device::Cpu).unwrap()
}

/// Returns a rank-4 adapter configuration. The targets go to `init_trainable`.
fn rank4_config() -> AdapterConfig {
    AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        target_modules: Vec::new(),
        peft_type: "LORA".into(),
        base_model_name_or_path: None,
        layers_to_transform: None,
    }
}

fn pair() -> TrainingPair {
    TrainingPair {
        pair_id: "p".into(),
        prompt_ids: vec![257, 40, 41, 42, 10],
        chosen: TrainingResponse {
            token_ids: vec![90, 90, 33, 34],
            rewards: vec![0.9, 0.8, 0.0, 0.3],
        },
        rejected: TrainingResponse {
            token_ids: vec![90, 71, 72],
            rewards: vec![0.0, -0.7, -0.2],
        },
    }
}

fn loss_value(
    model: &Llama,
    adapter: &LoraAdapter,
    head: &ValueHead,
    pair: &TrainingPair,
    reference: &ReferenceLogProbs,
) -> f64 {
    let loss = pair_loss(
        model,
        adapter,
        head,
        pair,
        Some(reference),
        &LossParams::default(),
    )
    .unwrap();
    f64::from(loss.total.to_scalar::<f32>().unwrap())
}

fn perturbed(var: &Var, index: usize, delta: f32) -> Tensor {
    let shape = var.shape().clone();
    let mut values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[index] += delta;
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn lora_and_value_head_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_dense_model(dir.path());
    let config = rank4_config();
    let targets = [Projection::Q, Projection::V, Projection::Down];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (adapter, mut vars) =
        LoraAdapter::init_trainable(model.config(), config, &targets, &mut rng, &Device::Cpu)
            .unwrap();
    // B starts at zero, which would make every gradient of A zero: give B random values.
    for b in vars.iter().skip(1).step_by(2) {
        let count = b.elem_count();
        let values: Vec<f32> = (0..count).map(|_| rng.gen_range(-0.3..0.3)).collect();
        b.set(&Tensor::from_vec(values, b.shape().clone(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let lora_count = vars.len();
    let dims = ValueHeadDims {
        hidden: model.config().hidden_size,
        inner: 16,
    };
    let head = ValueHead::new(
        dims,
        candle_core::DType::F32,
        &Device::Cpu,
        &mut vars,
        &mut rng,
    )
    .unwrap();
    let pair = pair();
    // The policy term relative to the base; the reference is a constant, so the gradient is
    // the absolute form's, and this also checks that path.
    let reference = reference_log_probs(&model, &pair).unwrap();

    let loss = pair_loss(
        &model,
        &adapter,
        &head,
        &pair,
        Some(&reference),
        &LossParams::default(),
    )
    .unwrap();
    let grads = loss.total.backward().unwrap();

    let missing: Vec<usize> = (0..vars.len())
        .filter(|&i| grads.get(vars[i].as_tensor()).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "variables without a gradient: {missing:?} of {}",
        vars.len()
    );
    // A and B of the first and the last LoRA target, and the value head's first weight.
    let checked = [0, 1, lora_count - 2, lora_count - 1, lora_count];
    for &var_index in &checked {
        let var = &vars[var_index];
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("variable {var_index} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &entry in order.iter().take(3) {
            let original = perturbed(var, entry, 0.0);
            var.set(&perturbed(var, entry, STEP)).unwrap();
            let plus = loss_value(&model, &adapter, &head, &pair, &reference);
            var.set(&original).unwrap();
            var.set(&perturbed(var, entry, -STEP)).unwrap();
            let minus = loss_value(&model, &adapter, &head, &pair, &reference);
            var.set(&original).unwrap();

            let numeric = (plus - minus) / (2.0 * f64::from(STEP));
            let analytic = f64::from(grad[entry]);
            let relative = (numeric - analytic).abs() / analytic.abs().max(1e-6);
            eprintln!("variable {var_index} entry {entry}: autograd {analytic:.6}, finite difference {numeric:.6}, relative error {relative:.2e}");
            assert!(
                relative <= TOLERANCE,
                "variable {var_index} entry {entry}: autograd {analytic:.6}, finite difference {numeric:.6}, relative error {relative:.2e}"
            );
        }
    }
}

/// An untrained doctor (B = 0) equals its base, so relative to the base its policy term is zero
/// at every token and the loss depends on the rewards and the value head alone.
#[test]
fn relative_term_untrained_doctor_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_dense_model(dir.path());
    let config = rank4_config();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (adapter, mut vars) = LoraAdapter::init_trainable(
        model.config(),
        config,
        &Projection::ALL,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap();
    let dims = ValueHeadDims {
        hidden: model.config().hidden_size,
        inner: 16,
    };
    let head = ValueHead::new(
        dims,
        candle_core::DType::F32,
        &Device::Cpu,
        &mut vars,
        &mut rng,
    )
    .unwrap();
    let pair = pair();
    let params = LossParams::default();
    let reference = reference_log_probs(&model, &pair).unwrap();
    assert_eq!(reference.chosen.len(), pair.chosen.token_ids.len());
    assert_eq!(reference.rejected.len(), pair.rejected.token_ids.len());
    assert!(reference.chosen.iter().all(|v| v.is_finite()));
    assert!(reference.chosen.iter().all(|&v| v < 0.0));

    let relative = pair_loss(&model, &adapter, &head, &pair, Some(&reference), &params).unwrap();
    let absolute = pair_loss(&model, &adapter, &head, &pair, None, &params).unwrap();

    // The expected loss: log π̂ = 0 everywhere, log V from the head on the base's states.
    let mut terms = Vec::new();
    for response in [&pair.chosen, &pair.rejected] {
        let tokens = [pair.prompt_ids.as_slice(), &response.token_ids].concat();
        let mut cache = KvCache::new();
        let mut rows = vec![Row {
            tokens: &tokens,
            cache: &mut cache,
            adapter: None,
            logits: LogitsSelection::All,
            fork_from: None,
        }];
        let hidden = model.forward_hidden(&mut rows).unwrap().remove(0);
        let len = response.token_ids.len();
        let states = hidden
            .narrow(0, pair.prompt_ids.len() - 1, len + 1)
            .unwrap();
        let log_v = head.forward(&states).unwrap();
        let log_q = Tensor::new(cumulative_log_q(&response.rewards), &Device::Cpu).unwrap();
        let log_pi = Tensor::zeros(len, candle_core::DType::F32, &Device::Cpu).unwrap();
        terms.push((log_q, log_v, log_pi));
    }
    let [chosen, rejected] = [&terms[0], &terms[1]].map(|(log_q, log_v, log_pi)| Trajectory {
        log_q,
        log_v,
        log_pi,
    });
    let expected = pair_tfpo_loss(
        chosen,
        rejected,
        divergence_point(&pair.chosen.token_ids, &pair.rejected.token_ids),
        &params,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    let found = relative.total.to_scalar::<f32>().unwrap();
    assert!(
        (found - expected).abs() <= 1e-4 * expected.abs().max(1.0),
        "relative loss {found}, expected {expected} from rewards and log V alone"
    );
    // The absolute term carries the base's surprisal, so it is a different, larger loss.
    let absolute = absolute.total.to_scalar::<f32>().unwrap();
    assert!(
        absolute > found + 1.0,
        "absolute loss {absolute} should exceed the relative loss {found}"
    );
}

/// The adapter's A matrices come from the caller's RNG alone, so `llmdoctor train --seed`
/// starts every run from the same weights.
#[test]
fn adapter_init_follows_seed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_dense_model(dir.path());
    let draw = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (_, vars) = LoraAdapter::init_trainable(
            model.config(),
            rank4_config(),
            &[Projection::Q, Projection::Up],
            &mut rng,
            &Device::Cpu,
        )
        .unwrap();
        vars.iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let first = draw(3);
    assert_eq!(first, draw(3));
    assert_ne!(first, draw(4));
}
