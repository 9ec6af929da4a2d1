//! `llmdoctor bench`: throughput and latency of the engine, driven directly (no HTTP).
//!
//! Each configuration (steering mode × concurrency) runs `repeats` times. Every run submits
//! `concurrency` requests with distinct prompts and `ignore_eos`, so every request generates
//! exactly `max_tokens` tokens. Figures are medians over the runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::doctor::Doctor;
use crate::engine::handle::{EngineError, EngineHandle};
use crate::engine::request::{DoctorWeight, EosPolicy, Event, GenerationRequest, Steering};
use crate::engine::sampling::SamplingParams;

/// A steering mode to measure.
#[derive(Clone, Debug)]
pub struct BenchMode {
    /// Label in the output (`unsteered`, `1 doctor`, …).
    pub name: String,
    /// Doctors and their β.
    pub doctors: Vec<(Arc<Doctor>, f32)>,
}

/// The configurations to run.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// Steering modes; the first is the baseline for ratios.
    pub modes: Vec<BenchMode>,
    /// Concurrency levels.
    pub concurrency: Vec<usize>,
    /// Runs per configuration.
    pub repeats: usize,
    /// Tokens generated per request.
    pub max_tokens: usize,
    /// Prompts; request `i` uses `prompts[i % len]`.
    pub prompts: Vec<Vec<u32>>,
}

/// Medians of one configuration.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BenchResult {
    /// Steering mode.
    pub mode: String,
    /// Concurrent requests.
    pub concurrency: usize,
    /// Runs measured.
    pub runs: usize,
    /// Generated tokens per second over all requests, after each request's first token.
    pub decode_tokens_per_second: f64,
    /// Median gap between consecutive tokens of one request, milliseconds.
    pub itl_p50_ms: f64,
    /// 95th percentile of that gap, milliseconds.
    pub itl_p95_ms: f64,
    /// Median time to first token, milliseconds.
    pub ttft_p50_ms: f64,
    /// Decode throughput relative to the first mode at the same concurrency.
    pub ratio_to_baseline: f64,
    /// Peak resident memory of the process during this configuration's runs, in MiB (Linux
    /// only). Its growth from one mode to the next at the same concurrency is what steering
    /// adds: adapters, the doctor rows' KV cache and their logits.
    pub peak_rss_mib: Option<f64>,
}

/// One run's raw measurements.
struct RunStats {
    decode_tokens_per_second: f64,
    itl_ms: Vec<f64>,
    ttft_ms: Vec<f64>,
}

/// Runs every configuration of `plan`.
pub fn run(engine: &EngineHandle, plan: &BenchPlan) -> Result<Vec<BenchResult>, EngineError> {
    let mut results: Vec<BenchResult> = Vec::new();
    for &concurrency in &plan.concurrency {
        for mode in &plan.modes {
            let mut runs = Vec::with_capacity(plan.repeats);
            reset_peak_resident();
            for _ in 0..plan.repeats {
                runs.push(run_once(engine, plan, mode, concurrency)?);
            }
            let mut throughput: Vec<f64> =
                runs.iter().map(|r| r.decode_tokens_per_second).collect();
            let mut itl: Vec<f64> = runs.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
            let mut ttft: Vec<f64> = runs
                .iter()
                .flat_map(|r| r.ttft_ms.iter().copied())
                .collect();
            let decode = percentile(&mut throughput, 0.5);
            let baseline = results
                .iter()
                .find(|r| r.concurrency == concurrency)
                .map_or(decode, |r| r.decode_tokens_per_second);
            results.push(BenchResult {
                mode: mode.name.clone(),
                concurrency,
                runs: runs.len(),
                decode_tokens_per_second: decode,
                itl_p50_ms: percentile(&mut itl, 0.5),
                itl_p95_ms: percentile(&mut itl, 0.95),
                ttft_p50_ms: percentile(&mut ttft, 0.5),
                ratio_to_baseline: decode / baseline,
                peak_rss_mib: resident_mib("VmHWM"),
            });
        }
    }
    Ok(results)
}

/// Reads a memory field of `/proc/self/status` (`VmRSS`, `VmHWM`) in MiB. Returns `None` where
/// the file or the field is missing.
pub fn resident_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets the process's peak resident memory (`VmHWM`) to its current value, where Linux allows
/// it; elsewhere the peak keeps counting from the start.
pub fn reset_peak_resident() {
    // Writing 5 to clear_refs resets the peak resident set size (Linux 4.0 and later).
    if let Err(err) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::debug!(%err, "failed to reset the peak resident memory, so VmHWM counts from the start");
    }
}

fn run_once(
    engine: &EngineHandle,
    plan: &BenchPlan,
    mode: &BenchMode,
    concurrency: usize,
) -> Result<RunStats, EngineError> {
    let steering = Steering {
        alpha: 1.0,
        doctors: mode
            .doctors
            .iter()
            .map(|(doctor, beta)| DoctorWeight {
                doctor: doctor.clone(),
                beta: *beta,
            })
            .collect(),
    };
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(concurrency);
    for index in 0..concurrency {
        let request = GenerationRequest {
            prompt_ids: plan.prompts[index % plan.prompts.len()].clone(),
            sampling: SamplingParams::greedy(),
            max_tokens: plan.max_tokens,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            eos: EosPolicy::Ignore,
            n: 1,
            steering: steering.clone(),
        };
        receivers.push(engine.submit(request)?);
    }
    // Token arrival times per request. The receivers are drained in turn; events queue in
    // the channels meanwhile, so timestamps are taken when each event is read. Reading is far
    // faster than a decode step, so the error is small next to the step time.
    let mut arrivals: Vec<Vec<Duration>> = vec![Vec::new(); concurrency];
    let mut open = concurrency;
    let mut done = vec![false; concurrency];
    while open > 0 {
        let mut progressed = false;
        for (index, receiver) in receivers.iter_mut().enumerate() {
            if done[index] {
                continue;
            }
            while let Ok(event) = receiver.try_recv() {
                progressed = true;
                match event {
                    Event::Token(_) => arrivals[index].push(start.elapsed()),
                    Event::Done(_) | Event::Error(_) => {
                        done[index] = true;
                        open -= 1;
                        break;
                    }
                    Event::Finished(_) => {}
                }
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    let first_token = arrivals
        .iter()
        .filter_map(|a| a.first().copied())
        .min()
        .unwrap_or_default();
    let end = arrivals
        .iter()
        .filter_map(|a| a.last().copied())
        .max()
        .unwrap_or_default();
    let decode_tokens: usize = arrivals.iter().map(|a| a.len().saturating_sub(1)).sum();
    let window = (end - first_token).as_secs_f64().max(1e-9);
    let itl_ms = arrivals
        .iter()
        .flat_map(|a| a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3))
        .collect();
    let ttft_ms = arrivals
        .iter()
        .filter_map(|a| a.first().map(|t| t.as_secs_f64() * 1e3))
        .collect();
    Ok(RunStats {
        decode_tokens_per_second: decode_tokens as f64 / window,
        itl_ms,
        ttft_ms,
    })
}

/// Measures prefill throughput: one request with `prompt` and a single generated token, as
/// prompt tokens per second of time to first token. Returns the median of `repeats` runs.
pub fn prefill_tokens_per_second(
    engine: &EngineHandle,
    prompt: &[u32],
    repeats: usize,
) -> Result<f64, EngineError> {
    let mut rates = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let request = GenerationRequest {
            prompt_ids: prompt.to_vec(),
            sampling: SamplingParams::greedy(),
            max_tokens: 1,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            eos: EosPolicy::Ignore,
            n: 1,
            steering: Steering::default(),
        };
        let start = Instant::now();
        let mut receiver = engine.submit(request)?;
        let mut first = None;
        while let Some(event) = receiver.blocking_recv() {
            match event {
                Event::Token(_) if first.is_none() => first = Some(start.elapsed()),
                Event::Done(_) | Event::Error(_) => break,
                _ => {}
            }
        }
        let elapsed = first.unwrap_or_else(|| start.elapsed()).as_secs_f64();
        rates.push(prompt.len() as f64 / elapsed.max(1e-9));
    }
    Ok(percentile(&mut rates, 0.5))
}

/// One kernel measurement: a quantised matmul of one type, shape and batch size.
#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    /// Always `"kernel"`, to tell these lines apart in `--json` output.
    pub mode: &'static str,
    /// Weight type, as GGUF names it.
    pub dtype: String,
    /// Output width of the weight matrix.
    pub out_features: usize,
    /// Input width of the weight matrix.
    pub in_features: usize,
    /// Activation rows per call.
    pub rows: usize,
    /// Median over the runs, in microseconds per call.
    pub micros_per_call: f64,
    /// Median ratio to the Q8_0 call of the same shape and batch in the same run (below 1 is
    /// faster than Q8_0).
    pub ratio_to_q8_0: f64,
}

/// Times [`QuantMatrix::matmul`] for every type with a batched kernel on random weights of each
/// `(out, in)` shape and each batch size. K-quants are timed only on shapes whose inner size is
/// a multiple of 256. Each run times every type back to back, so the
/// ratios to Q8_0 compare calls made moments apart. Returns one result per type, shape and
/// batch size, with medians over `repeats` runs.
pub fn kernel_timings(
    shapes: &[(usize, usize)],
    batch_sizes: &[usize],
    repeats: usize,
) -> candle_core::Result<Vec<KernelResult>> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    // The ratios are to Q8_0, the first of the list.
    use crate::model::qgemm::{QuantMatrix, NATIVE_TYPES as TYPES};

    if batch_sizes.contains(&0) {
        return Err(candle_core::Error::Msg(
            "invalid batch size 0: every batch needs at least one row".into(),
        ));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut results = Vec::new();
    for &(out_features, in_features) in shapes {
        let weights: Vec<f32> = (0..out_features * in_features)
            .map(|_| rng.gen_range(-0.1..0.1))
            .collect();
        let weights = Tensor::from_vec(weights, (out_features, in_features), &Device::Cpu)?;
        let types: Vec<GgmlDType> = TYPES
            .into_iter()
            .filter(|dtype| in_features % dtype.block_size() == 0)
            .collect();
        let matrices: Vec<QuantMatrix> = types
            .iter()
            .map(|&dtype| {
                let tensor = QTensor::quantize(&weights, dtype)?;
                QuantMatrix::from_qtensor(&tensor).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{dtype:?} has no batched kernel for ({out_features}, {in_features})"
                    ))
                })
            })
            .collect::<candle_core::Result<_>>()?;
        for &rows in batch_sizes {
            let x: Vec<f32> = (0..rows * in_features)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            // Enough calls that one timing covers about four million multiply-adds.
            let calls = (4_000_000 / (rows * out_features * in_features)).clamp(1, 1000);
            let mut times = vec![Vec::with_capacity(repeats); types.len()];
            for _ in 0..repeats {
                for (matrix, samples) in matrices.iter().zip(&mut times) {
                    let start = Instant::now();
                    for _ in 0..calls {
                        std::hint::black_box(matrix.matmul(std::hint::black_box(&x), rows));
                    }
                    samples.push(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
                }
            }
            let mut ratios: Vec<Vec<f64>> = times
                .iter()
                .map(|samples| {
                    samples
                        .iter()
                        .zip(&times[0])
                        .map(|(t, q8)| t / q8)
                        .collect()
                })
                .collect();
            for ((dtype, samples), ratios) in types.iter().zip(&mut times).zip(&mut ratios) {
                results.push(KernelResult {
                    mode: "kernel",
                    dtype: format!("{dtype:?}"),
                    out_features,
                    in_features,
                    rows,
                    micros_per_call: percentile(samples, 0.5),
                    ratio_to_q8_0: percentile(ratios, 0.5),
                });
            }
        }
    }
    Ok(results)
}

/// Returns the `q` quantile (0..=1) by nearest rank, or 0 for an empty slice.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() - 1) as f64 * q).round() as usize;
    values[rank.min(values.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::{kernel_timings, percentile};

    #[test]
    fn kernel_timings_cover_types_and_batches() {
        // Five 32-block types on both shapes, and the four K-quants on the 256-wide one too.
        let results = kernel_timings(&[(64, 32), (32, 256)], &[1, 5], 2).unwrap();
        assert_eq!(results.len(), 2 * 5 + 2 * 9);
        let q8: Vec<_> = results.iter().filter(|r| r.dtype == "Q8_0").collect();
        assert_eq!(q8.len(), 4);
        assert!(q8.iter().all(|r| r.ratio_to_q8_0 == 1.0));
        assert!(results.iter().all(|r| r.micros_per_call > 0.0));
        let q6k: Vec<(usize, usize)> = results
            .iter()
            .filter(|r| r.dtype == "Q6K")
            .map(|r| (r.in_features, r.rows))
            .collect();
        assert_eq!(q6k, [(256, 1), (256, 5)]);
        let rows: Vec<usize> = results.iter().map(|r| r.rows).collect();
        assert_eq!(rows[..10], [1, 1, 1, 1, 1, 5, 5, 5, 5, 5]);
    }

    #[test]
    fn percentile_picks_nearest_rank() {
        let mut values = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut values, 0.5), 3.0);
        assert_eq!(percentile(&mut values, 0.0), 1.0);
        assert_eq!(percentile(&mut values, 1.0), 5.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
