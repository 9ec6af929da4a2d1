//! `llmdoctor bench`.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use llmdoctor::bench::{self, BenchMode, BenchPlan};
use llmdoctor::doctor::{Doctor, DoctorBase, DoctorManifest};
use llmdoctor::engine::core::{self as engine, EngineConfig, DEFAULT_STEERING_STATS_INTERVAL};
use llmdoctor::generate::prompt_ids;
use llmdoctor::loader::{load_model, LoadedModel};
use llmdoctor::model::lora::{AdapterConfig, Projection};
use llmdoctor::model::tiny::uniform;
use llmdoctor::model::LoraAdapter;
use rand::SeedableRng;

use super::{model_path, QuantArg};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model file (.gguf) or Hugging Face folder; defaults to the fetched patient.
    #[arg(long)]
    model: Option<PathBuf>,
    /// How quantised weights are kept in memory.
    #[arg(long, value_enum, default_value_t = QuantArg::Fast)]
    quant: QuantArg,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
    concurrency: Vec<usize>,
    /// Runs per configuration; figures are medians.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Tokens generated per request (EOS is ignored).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Prompt length of the prefill measurement, in tokens.
    #[arg(long, default_value_t = 200)]
    prefill_tokens: usize,
    /// LoRA rank of the benchmark doctors (random adapters on every projection).
    #[arg(long, default_value_t = 8)]
    doctor_rank: usize,
    /// Put the benchmark doctors' adapters on the top N layers only, as `llmdoctor train
    /// --lora-layers N` does (default: every layer).
    #[arg(long, value_name = "N")]
    doctor_layers: Option<usize>,
    /// Measure steering statistics on one in every N generated tokens, as `serve
    /// --steering-stats-interval` does; 1 measures every token [default: 8, as `serve`].
    #[arg(long, value_name = "N")]
    steering_stats_interval: Option<usize>,
    /// Print one JSON object per configuration instead of a table.
    #[arg(long)]
    json: bool,
    /// Time the quantised matmul kernels alone instead of the engine, with the `--concurrency`
    /// levels and `--prefill-tokens` as batch sizes. Every type with a batched kernel is timed
    /// on random weights of the model's projection and output shapes, K-quants only where the
    /// inner size is a multiple of 256.
    #[arg(long)]
    kernels: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0, "`--repeats` must be at least 1");
    anyhow::ensure!(
        args.concurrency.iter().all(|&c| c > 0),
        "every `--concurrency` level must be at least 1"
    );
    anyhow::ensure!(
        args.prefill_tokens > 0,
        "`--prefill-tokens` must be at least 1, got 0"
    );
    let stats_interval = match args.steering_stats_interval {
        None => DEFAULT_STEERING_STATS_INTERVAL,
        Some(n) => NonZeroUsize::new(n).context(
            "`--steering-stats-interval` must be at least 1 (1 measures every token), got 0",
        )?,
    };
    let path = model_path(args.model.clone())?;
    let before_load = bench::resident_mib("VmRSS");
    let patient = load_model(&path, &args.quant.load_options(), &Device::Cpu)
        .with_context(|| format!("failed to load the model `{}`", path.display()))?;
    let after_patient = bench::resident_mib("VmRSS");
    if args.kernels {
        return run_kernels(&args, &patient);
    }
    let num_layers = patient.model.config().num_layers;
    let doctor_layers = args.doctor_layers.unwrap_or(num_layers);
    anyhow::ensure!(
        (1..=num_layers).contains(&doctor_layers),
        "`--doctor-layers {doctor_layers}` is out of range: the model has {num_layers} layers, \
         so pass a number from 1 to {num_layers}"
    );
    let doctors: Vec<Arc<Doctor>> = (0..2)
        .map(|i| {
            let name = format!("bench-{i}");
            random_doctor(&patient, &name, args.doctor_rank, doctor_layers, i as u64)
        })
        .collect::<anyhow::Result<_>>()?;
    let suffix = if doctor_layers < num_layers {
        format!(" (top {doctor_layers} layers)")
    } else {
        String::new()
    };
    let after_doctors = bench::resident_mib("VmRSS");
    let memory = serde_json::json!({
        "mode": "memory",
        "rss_before_load_mib": before_load,
        "rss_after_patient_mib": after_patient,
        "rss_after_two_doctors_mib": after_doctors,
        "adapter_mib_each": doctors[0].adapter.size_bytes() as f64 / (1024.0 * 1024.0),
    });
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let text = format!(
                "Question {i}: describe {} in a few sentences.",
                TOPICS[i % TOPICS.len()]
            );
            prompt_ids(&patient.tokenizer, None, &text)
        })
        .collect::<Result<_, _>>()?;
    let long_prompt = prefill_prompt(&patient, args.prefill_tokens)?;

    let handle = engine::start(
        patient,
        EngineConfig {
            steering_stats_interval: stats_interval,
            ..EngineConfig::default()
        },
    )?;
    let plan = BenchPlan {
        modes: vec![
            BenchMode {
                name: "unsteered".into(),
                doctors: Vec::new(),
            },
            BenchMode {
                name: format!("1 doctor{suffix}"),
                doctors: vec![(doctors[0].clone(), 0.5)],
            },
            BenchMode {
                name: format!("2 doctors{suffix}"),
                doctors: vec![(doctors[0].clone(), 0.5), (doctors[1].clone(), 0.5)],
            },
        ],
        concurrency: args.concurrency.clone(),
        repeats: args.repeats,
        max_tokens: args.max_tokens,
        prompts,
    };
    let prefill = bench::prefill_tokens_per_second(&handle, &long_prompt, args.repeats)?;
    let results = bench::run(&handle, &plan)?;
    handle.shutdown();

    if args.json {
        println!(
            "{}",
            serde_json::json!({"mode": "prefill", "prompt_tokens": long_prompt.len(), "runs": args.repeats, "prefill_tokens_per_second": prefill})
        );
        println!("{memory}");
        for result in &results {
            println!("{}", serde_json::to_string(result)?);
        }
        return Ok(());
    }
    println!(
        "prefill: {:.1} tok/s ({} prompt tokens, median of {})",
        prefill,
        long_prompt.len(),
        args.repeats
    );
    let mib = |v: &serde_json::Value| v.as_f64().map_or("n/a".into(), |v| format!("{v:.1} MiB"));
    println!(
        "memory: resident {} before loading, {} with the patient, {} with two doctors ({} of adapter each)",
        mib(&memory["rss_before_load_mib"]),
        mib(&memory["rss_after_patient_mib"]),
        mib(&memory["rss_after_two_doctors_mib"]),
        mib(&memory["adapter_mib_each"]),
    );
    let width = results
        .iter()
        .map(|r| r.mode.len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "{:<width$} {:>4} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "mode", "conc", "decode tok/s", "ITL p50 ms", "ITL p95 ms", "TTFT ms", "ratio", "peak MiB"
    );
    for r in &results {
        println!(
            "{:<width$} {:>4} {:>12.1} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>9}",
            r.mode,
            r.concurrency,
            r.decode_tokens_per_second,
            r.itl_p50_ms,
            r.itl_p95_ms,
            r.ttft_p50_ms,
            r.ratio_to_baseline,
            r.peak_rss_mib.map_or("n/a".into(), |v| format!("{v:.0}"))
        );
    }
    Ok(())
}

/// Times the kernels on the model's three projection shapes and its output layer's, and
/// prints the results.
fn run_kernels(args: &BenchArgs, patient: &LoadedModel) -> anyhow::Result<()> {
    let config = patient.model.config();
    let hidden = config.hidden_size;
    let shapes = [
        (hidden, hidden),
        (config.intermediate_size, hidden),
        (hidden, config.intermediate_size),
        (config.vocab_size, hidden),
    ];
    let mut batch_sizes = args.concurrency.clone();
    batch_sizes.push(args.prefill_tokens);
    let results = bench::kernel_timings(&shapes, &batch_sizes, args.repeats)?;
    if args.json {
        for result in &results {
            println!("{}", serde_json::to_string(result)?);
        }
        return Ok(());
    }
    println!(
        "{:<6} {:>12} {:>5} {:>12} {:>10}",
        "type", "out x in", "rows", "us per call", "vs Q8_0"
    );
    for r in &results {
        println!(
            "{:<6} {:>12} {:>5} {:>12.1} {:>10.2}",
            r.dtype,
            format!("{}x{}", r.out_features, r.in_features),
            r.rows,
            r.micros_per_call,
            r.ratio_to_q8_0
        );
    }
    Ok(())
}

const TOPICS: [&str; 8] = [
    "the moon",
    "a rainforest",
    "the history of bread",
    "how bicycles work",
    "volcanoes",
    "a chess opening",
    "the water cycle",
    "jazz music",
];

/// Builds a chat prompt of `tokens` tokens.
fn prefill_prompt(patient: &LoadedModel, tokens: usize) -> anyhow::Result<Vec<u32>> {
    let sentence = "The quick brown fox jumps over the lazy dog near the river bank. ";
    let mut text = String::new();
    loop {
        let ids = prompt_ids(&patient.tokenizer, None, &text)?;
        if ids.len() >= tokens {
            return Ok(ids[ids.len() - tokens..].to_vec());
        }
        text.push_str(sentence);
    }
}

/// Builds a doctor on the patient's base with a random rank-`rank` adapter on every projection
/// of the top `layers` layers, so it costs what a trained doctor costs.
fn random_doctor(
    patient: &LoadedModel,
    name: &str,
    rank: usize,
    layers: usize,
    seed: u64,
) -> anyhow::Result<Arc<Doctor>> {
    let config = patient.model.config();
    let first = config.num_layers - layers;
    let adapter_config = AdapterConfig {
        r: rank,
        lora_alpha: 2.0 * rank as f64,
        use_rslora: false,
        target_modules: Projection::ALL
            .iter()
            .map(|p| p.module_name().to_string())
            .collect(),
        peft_type: "LORA".into(),
        base_model_name_or_path: None,
        layers_to_transform: (first > 0).then(|| (first..config.num_layers).collect()),
    };
    // Seeded, so that every run times the same adapters. A uniform draw in ±√3·scale has the
    // standard deviation `scale`.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let bound = (0.01 * (seed as f64 + 1.0) * 3f64.sqrt()) as f32;
    let mut tensors = std::collections::HashMap::new();
    for layer in first..config.num_layers {
        for projection in Projection::ALL {
            let (out_features, in_features) = projection.shape(config);
            let prefix = projection.peft_prefix(layer);
            let a = uniform(&mut rng, (rank, in_features), bound)?;
            let b = uniform(&mut rng, (out_features, rank), bound)?;
            tensors.insert(format!("{prefix}.lora_A.weight"), a);
            tensors.insert(format!("{prefix}.lora_B.weight"), b);
        }
    }
    let adapter =
        LoraAdapter::from_tensors(tensors, adapter_config, config, std::path::Path::new(name))?;
    Ok(Arc::new(Doctor {
        manifest: DoctorManifest {
            name: name.to_string(),
            description: "random adapter for benchmarks".into(),
            base: Default::default(),
            adapter: "adapter.safetensors".into(),
            adapter_config: "adapter_config.json".into(),
            default_beta: 0.5,
            training: toml::Table::new(),
        },
        base: DoctorBase::Patient,
        adapter,
        version: 0,
        dir: PathBuf::from(name),
    }))
}
