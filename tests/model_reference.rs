//! Teacher-forces llama.cpp's greedy generations through the real model and compares per-step
//! log-probabilities, argmaxes and the first step's top 5.
//!
//! Tolerances. Both runtimes quantise activations to 8 bits before each quantised matmul, so a
//! difference in float summation order can flip a rounding and the two trajectories drift apart
//! by a few hundredths. Dequantising every weight to f32 (no activation rounding at all) lands
//! just as far from llama.cpp: mean |Δ log p| 0.038, max 0.37 over the 133 reference steps. A
//! bound of 0.1 on every single step therefore fails for any implementation that is not
//! bit-exact with llama.cpp, so the test bounds the mean, the share of steps within 0.1, and the
//! worst step. On the first step, each of llama.cpp's top 5 tokens must get a log-probability
//! within 0.2 of llama.cpp's (0.35 for the requantised and dense formats). At least 4 of them
//! must be in our top 5. In one reference case the fifth and sixth tokens are a near tie
//! (llama.cpp's fifth is at −4.885), which a change in summation order can swap.

mod common;

use candle_core::{Device, D};
use llmdoctor::model::{
    llama::log_softmax, KvCache, Llama, LoadOptions, LogitsSelection, QuantPolicy, Row,
    WeightFormat,
};
use serde_json::Value;

struct Bounds {
    max_mean: f32,
    max_worst: f32,
    min_share_within_0_1: f32,
    /// Steps whose recorded top-1/top-2 margin is at least this must have the same argmax.
    argmax_margin: f64,
    /// How many of llama.cpp's first-step top 5 must be in ours.
    top5_shared: usize,
    /// Each of llama.cpp's first-step top 5 must get a log-probability within this of
    /// llama.cpp's, whether or not it is in our top 5.
    top5_tolerance: f32,
}

struct Agreement {
    mean: f32,
    worst: f32,
    share_within_0_1: f32,
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id array")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

fn check_against_llamacpp(format: WeightFormat, bounds: &Bounds) -> Option<Agreement> {
    let model_path = common::real_model_path()?;
    let reference = common::reference_file("smollm2-q4_1-llamacpp.json")?;
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let model = Llama::load(&model_path, &LoadOptions { format }, &Device::Cpu).unwrap();

    let mut diffs = Vec::new();
    for (case_index, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let greedy = ids(&case["greedy_ids"]);
        let tokens: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let mut cache = KvCache::new();
        let logits = model
            .forward(&mut [Row {
                tokens: &tokens,
                cache: &mut cache,
                adapter: None,
                logits: LogitsSelection::All,
                fork_from: None,
            }])
            .unwrap()
            .remove(0);
        let logprobs = log_softmax(&logits).unwrap();
        let argmax: Vec<u32> = logprobs.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let logprobs: Vec<Vec<f32>> = logprobs.to_vec2().unwrap();

        for (step, entry) in case["steps"].as_array().unwrap().iter().enumerate() {
            let token = entry[0].as_u64().unwrap() as usize;
            let expected = entry[1].as_f64().unwrap() as f32;
            let margin = entry[2].as_f64().unwrap();
            let position = prompt.len() - 1 + step;
            diffs.push((logprobs[position][token] - expected).abs());
            if margin >= bounds.argmax_margin {
                assert_eq!(
                    argmax[position] as usize, token,
                    "case {case_index} step {step}: argmax differs (llama.cpp margin {margin})"
                );
            }
        }

        let position = prompt.len() - 1;
        let expected_pairs = case["first_step_top5_logprobs"].as_array().unwrap();
        for pair in expected_pairs {
            let token = pair[0].as_u64().unwrap() as usize;
            let expected = pair[1].as_f64().unwrap() as f32;
            let found = logprobs[position][token];
            assert!(
                (found - expected).abs() <= bounds.top5_tolerance,
                "case {case_index}: first-step log p of token {token} is {found}, llama.cpp {expected}"
            );
        }
        let mut expected_top5: Vec<u64> = expected_pairs
            .iter()
            .map(|pair| pair[0].as_u64().unwrap())
            .collect();
        let mut order: Vec<usize> = (0..logprobs[position].len()).collect();
        order.sort_by(|&a, &b| logprobs[position][b].total_cmp(&logprobs[position][a]));
        let mut top5: Vec<u64> = order[..5].iter().map(|&i| i as u64).collect();
        expected_top5.sort();
        top5.sort();
        let shared = top5.iter().filter(|id| expected_top5.contains(id)).count();
        assert!(
            shared >= bounds.top5_shared,
            "case {case_index}: first-step top 5 {top5:?}, llama.cpp {expected_top5:?}"
        );
    }

    let agreement = Agreement {
        mean: diffs.iter().sum::<f32>() / diffs.len() as f32,
        worst: diffs.iter().copied().fold(0.0, f32::max),
        share_within_0_1: diffs.iter().filter(|&&d| d <= 0.1).count() as f32 / diffs.len() as f32,
    };
    eprintln!(
        "{format:?}: {} steps, mean |Δ log p| {:.4}, max {:.4}, within 0.1: {:.1}%",
        diffs.len(),
        agreement.mean,
        agreement.worst,
        100.0 * agreement.share_within_0_1
    );
    assert!(
        agreement.mean <= bounds.max_mean,
        "mean |Δ log p| {}",
        agreement.mean
    );
    assert!(
        agreement.worst <= bounds.max_worst,
        "max |Δ log p| {}",
        agreement.worst
    );
    assert!(
        agreement.share_within_0_1 >= bounds.min_share_within_0_1,
        "only {:.1}% of steps within 0.1",
        100.0 * agreement.share_within_0_1
    );
    Some(agreement)
}

/// Bounds for the file's own Q4_1 weights, which both the as-stored and the default policy keep.
const STORED_Q4_1: Bounds = Bounds {
    max_mean: 0.05,
    max_worst: 0.6,
    min_share_within_0_1: 0.85,
    argmax_margin: 0.3,
    top5_shared: 4,
    top5_tolerance: 0.2,
};

#[test]
fn stored_q4_1_agrees_with_llamacpp() {
    check_against_llamacpp(WeightFormat::Quantized(QuantPolicy::AsStored), &STORED_Q4_1);
}

#[test]
fn default_fast_policy_agrees_with_llamacpp() {
    // Q4_1 has a batched kernel of its own, so the default policy keeps the file's weights.
    check_against_llamacpp(
        WeightFormat::Quantized(QuantPolicy::FastTypes),
        &STORED_Q4_1,
    );
}

#[test]
fn requantized_q8_0_agrees_with_llamacpp() {
    check_against_llamacpp(
        WeightFormat::Quantized(QuantPolicy::AllQ8_0),
        &Bounds {
            max_mean: 0.07,
            max_worst: 0.6,
            min_share_within_0_1: 0.8,
            argmax_margin: 0.5,
            top5_shared: 4,
            top5_tolerance: 0.35,
        },
    );
}

#[test]
fn dense_f32_agrees_with_llamacpp() {
    check_against_llamacpp(
        WeightFormat::Dense,
        &Bounds {
            max_mean: 0.05,
            max_worst: 0.6,
            min_share_within_0_1: 0.85,
            argmax_margin: 0.3,
            top5_shared: 4,
            top5_tolerance: 0.35,
        },
    );
}
