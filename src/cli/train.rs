//! `llmdoctor train`: stage 2, TFPO training of a doctor from a reward file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llmdoctor::doctor::DoctorBaseSpec;
use llmdoctor::model::lora::Projection;
use llmdoctor::model::{LoadOptions, WeightFormat};
use llmdoctor::train::checkpoint::StepLog;
use llmdoctor::train::export::{write_doctor, DoctorDescription};
use llmdoctor::train::reward_file::read_records;
use llmdoctor::train::tfpo::{PolicyTerm, TrainingPair};
use llmdoctor::train::trainer::{train, TrainConfig};
use llmdoctor::train::LossParams;

use super::model_path;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The reward file written by `llmdoctor rewards`.
    #[arg(long)]
    rewards: PathBuf,
    /// The doctor's folder, usually `doctors/NAME`; the folder name is the doctor's name.
    /// Checkpoints go to its `checkpoints/` folder, and a rerun resumes from the latest one.
    #[arg(long)]
    out: PathBuf,
    /// The doctor's base: `patient`, or a model (.gguf or Hugging Face folder) with the
    /// patient's tokenizer.
    #[arg(long, default_value = "patient")]
    base: String,
    /// The patient (.gguf or Hugging Face folder); defaults to the fetched patient.
    #[arg(long)]
    model: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha; the adapter's scale is alpha / rank.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Put the adapter on the top N layers only (default: every layer). A doctor on the
    /// patient's base then shares the patient's lower layers when serving, so steering with it
    /// costs much less.
    #[arg(long, value_name = "N")]
    lora_layers: Option<usize>,
    /// Optimizer steps, one preference pair each.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the pairs (default 1 when --steps is not given).
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Steps of linear warm-up before the cosine decay (default: 5% of the steps).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Cut every response to at most this many tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Skip pairs whose prompt has more than this many tokens.
    #[arg(long)]
    max_prompt_len: Option<usize>,
    /// Save a checkpoint every this many steps (one is always saved at the end).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Seed of the initial weights and the pair order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// θ: token scores at or below it give a zero reward.
    #[arg(long, default_value_t = 0.1)]
    theta: f32,
    /// SubTB's policy term: the doctor's log-probability (`absolute`), or its log-probability
    /// relative to its frozen base (`relative-to-base`).
    #[arg(long, value_enum, default_value_t = PolicyTerm::Absolute)]
    policy_term: PolicyTerm,
    /// Width of the value head's inner layer.
    #[arg(long, default_value_t = 128)]
    value_inner: usize,
    /// β written to doctor.toml, used when a request names the doctor without one.
    #[arg(long, default_value_t = 0.5)]
    default_beta: f32,
    /// One line on what the doctor prefers, written to doctor.toml.
    #[arg(long, default_value = "")]
    description: String,
}

/// Counts of reward records that were not trained on.
#[derive(Debug, Default)]
struct PairCounts {
    records: usize,
    empty: usize,
    prompt_too_long: usize,
    over_context: usize,
}

fn training_pairs(
    args: &TrainArgs,
    context: usize,
) -> anyhow::Result<(Vec<TrainingPair>, PairCounts, String)> {
    let contents = read_records(&args.rewards)?;
    let faces = contents
        .records
        .first()
        .map(|r| r.faces.clone())
        .unwrap_or_default();
    let mut counts = PairCounts {
        records: contents.records.len(),
        ..PairCounts::default()
    };
    let mut pairs = Vec::new();
    for record in &contents.records {
        let Some(pair) = TrainingPair::from_record(record, args.theta, args.max_len) else {
            counts.empty += 1;
            continue;
        };
        if args
            .max_prompt_len
            .is_some_and(|max| pair.prompt_ids.len() > max)
        {
            counts.prompt_too_long += 1;
        } else if pair.max_sequence_len() > context {
            counts.over_context += 1;
        } else {
            pairs.push(pair);
        }
    }
    if pairs.is_empty() {
        anyhow::bail!(
            "no trainable pairs in `{}` ({} records, {} with an empty response, {} with a prompt over --max-prompt-len, {} over the context)",
            args.rewards.display(),
            counts.records,
            counts.empty,
            counts.prompt_too_long,
            counts.over_context
        );
    }
    Ok((pairs, counts, faces))
}

fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn mean_of_last<F: Fn(&StepLog) -> Option<f32>>(history: &[StepLog], count: usize, f: F) -> f64 {
    let values: Vec<f64> = history
        .iter()
        .rev()
        .take(count)
        .filter_map(|s| f(s).map(f64::from))
        .collect();
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let patient_path = model_path(args.model.clone())?;
    let (base_path, base_spec) = match args.base.as_str() {
        "patient" => (patient_path.clone(), DoctorBaseSpec::Patient),
        path => (
            PathBuf::from(path),
            DoctorBaseSpec::Path(PathBuf::from(path)),
        ),
    };
    let dense = LoadOptions {
        format: WeightFormat::Dense,
    };
    let base = llmdoctor::loader::load_model(&base_path, &dense, &Device::Cpu)
        .with_context(|| format!("failed to load the base `{}`", base_path.display()))?;
    let num_layers = base.model.config().num_layers;
    let layers = match args.lora_layers {
        None => None,
        Some(n) if (1..=num_layers).contains(&n) => Some((num_layers - n..num_layers).collect()),
        Some(n) => anyhow::bail!(
            "`--lora-layers {n}` is out of range: the base has {num_layers} layers, so pass a \
             number from 1 to {num_layers}, or leave it out for every layer"
        ),
    };
    let context = base.model.config().max_position_embeddings;
    let (pairs, counts, faces) = training_pairs(&args, context)?;
    println!(
        "training pairs: {} of {} records (skipped: {} with an empty response, {} with a prompt over --max-prompt-len, {} over the context)",
        pairs.len(),
        counts.records,
        counts.empty,
        counts.prompt_too_long,
        counts.over_context
    );
    let steps = args
        .steps
        .unwrap_or_else(|| args.epochs.unwrap_or(1) * pairs.len());
    let config = TrainConfig {
        lora_rank: args.lora_rank,
        lora_alpha: args.lora_alpha,
        targets: Projection::ALL.to_vec(),
        layers,
        value_inner: args.value_inner,
        steps,
        lr: args.lr,
        warmup_steps: args.warmup_steps.unwrap_or(steps / 20),
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        loss: LossParams::default(),
        policy_term: args.policy_term,
    };

    let bar = progress_bar(steps);
    let mut recent: Vec<f32> = Vec::new();
    let doctor = train(&base.model, &pairs, &config, &args.out, &mut |log| {
        recent.push(log.loss);
        let window = &recent[recent.len().saturating_sub(20)..];
        let mean = window.iter().sum::<f32>() / window.len() as f32;
        bar.set_position(log.step as u64);
        bar.set_message(format!("loss {:.4} (mean of last 20: {mean:.4})", log.loss));
    })?;
    bar.finish();

    let training = provenance(
        &args,
        &config,
        &doctor.history,
        &counts,
        &faces,
        doctor.wall_seconds,
        pairs.len(),
    );
    let name = doctor_name(&args.out)?;
    write_doctor(
        &args.out,
        &doctor,
        &config.adapter_config(),
        base.model.config(),
        DoctorDescription {
            name,
            description: args.description.clone(),
            base: base_spec,
            default_beta: args.default_beta,
            training,
        },
    )?;
    let last = |f: fn(&StepLog) -> Option<f32>| mean_of_last(&doctor.history, 20, f);
    println!(
        "trained {} steps in {:.0} s; mean of the last 20 steps: loss {:.4}, SubTB {:.4}, value hinge {:.4}",
        doctor.history.len(),
        doctor.wall_seconds,
        last(|s| Some(s.loss)),
        last(|s| Some(s.subtb)),
        last(|s| s.value)
    );
    println!("wrote the doctor to `{}`", args.out.display());
    Ok(())
}

fn doctor_name(out: &Path) -> anyhow::Result<String> {
    out.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .with_context(|| {
            format!(
                "`{}` has no folder name to use as the doctor's name",
                out.display()
            )
        })
}

/// The `[training]` table of doctor.toml.
fn provenance(
    args: &TrainArgs,
    config: &TrainConfig,
    history: &[StepLog],
    counts: &PairCounts,
    faces: &str,
    wall_seconds: f64,
    pair_count: usize,
) -> toml::Table {
    let mut table = toml::Table::new();
    let mut put = |key: &str, value: toml::Value| {
        table.insert(key.to_string(), value);
    };
    let command: Vec<String> = std::env::args().collect();
    put("command", command.join(" ").into());
    put("rewards_file", args.rewards.display().to_string().into());
    put("faces", faces.into());
    put("records", (counts.records as i64).into());
    put("pairs_trained_on", (pair_count as i64).into());
    put("steps", (history.len() as i64).into());
    put("wall_seconds", wall_seconds.round().into());
    put("lora_rank", (config.lora_rank as i64).into());
    put("lora_alpha", config.lora_alpha.into());
    if let Some(layers) = &config.layers {
        put("lora_layers", (layers.len() as i64).into());
    }
    put("lr", config.lr.into());
    put("warmup_steps", (config.warmup_steps as i64).into());
    put("max_len", args.max_len.map_or(-1, |v| v as i64).into());
    put(
        "max_prompt_len",
        args.max_prompt_len.map_or(-1, |v| v as i64).into(),
    );
    put("seed", (config.seed as i64).into());
    put("theta", f64::from(args.theta).into());
    put("gamma", config.loss.gamma.into());
    put("lambda", config.loss.lambda.into());
    put("value_inner", (config.value_inner as i64).into());
    put("policy_term", config.policy_term.as_str().into());
    put(
        "max_grad_norm",
        llmdoctor::train::trainer::MAX_GRAD_NORM.into(),
    );
    let last = |f: fn(&StepLog) -> Option<f32>| mean_of_last(history, 20, f);
    put("final_loss_mean_last_20", last(|s| Some(s.loss)).into());
    put("final_subtb_mean_last_20", last(|s| Some(s.subtb)).into());
    put("final_value_hinge_mean_last_20", last(|s| s.value).into());
    table
}
