//! `llmdoctor eval`: preference accuracy and steering effect of a doctor.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llmdoctor::doctor::{DoctorBase, DoctorRegistry};
use llmdoctor::engine::core::{self as engine, EngineConfig};
use llmdoctor::eval::preference::{accuracy, pair_log_probs, PreferenceAccuracy};
use llmdoctor::eval::steering::{steering_effect, SteeringEffect, SteeringEvalConfig};
use llmdoctor::loader::load_model;
use llmdoctor::model::LoadOptions;
use llmdoctor::train::scoring::template_prompt;
use llmdoctor::train::{load_pairs, Strictness};
use serde::Serialize;

use super::model_path;
use super::rewards::{print_load_report, SelectionArgs};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The doctor's name: a folder under --doctors-dir.
    #[arg(long)]
    doctor: String,
    /// Preference pairs: HH-RLHF or generic JSONL, optionally gzipped.
    #[arg(long)]
    data: PathBuf,
    /// Folder holding one sub-folder per doctor.
    #[arg(long, default_value = "doctors")]
    doctors_dir: PathBuf,
    /// The patient (.gguf or Hugging Face folder); defaults to the fetched patient.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    selection: SelectionArgs,
    /// Prompts sampled for the steering measurements (the first ones of the selected pairs).
    #[arg(long, default_value_t = 20)]
    steering_prompts: usize,
    /// Samples per prompt, steered and unsteered each.
    #[arg(long, default_value_t = 2)]
    samples_per_prompt: usize,
    /// Maximum generated tokens per sample.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Sampling temperature of the steering samples.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// β of the steered samples; defaults to the doctor's default β.
    #[arg(long)]
    beta: Option<f32>,
    /// First sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct EvalReport {
    doctor: String,
    data: String,
    preference: PreferenceAccuracy,
    steering: SteeringEffect,
}

fn bar(len: usize, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta}}]");
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let report = load_pairs(&args.data, Strictness::Lenient)?;
    if !args.json {
        print_load_report(&report);
    }
    let pairs = args.selection.selection().apply(report.pairs)?;
    let path = model_path(args.model.clone())?;
    let load_options = LoadOptions::default();
    let patient = load_model(&path, &load_options, &Device::Cpu)
        .with_context(|| format!("failed to load the model `{}`", path.display()))?;
    let registry = DoctorRegistry::new(args.doctors_dir.clone(), patient.clone(), load_options);
    let doctor = registry.load(&args.doctor).with_context(|| {
        format!(
            "failed to load doctor `{}` from `{}`",
            args.doctor,
            args.doctors_dir.display()
        )
    })?;
    let base = match &doctor.base {
        DoctorBase::Patient => patient.model.clone(),
        DoctorBase::Separate(base) => base.model.clone(),
    };

    let progress = bar(pairs.len(), "pairs");
    let mut scored = Vec::new();
    let mut skipped = 0;
    for pair in &pairs {
        match pair_log_probs(&base, &doctor.adapter, &patient.tokenizer, pair)? {
            Some(log_probs) => scored.push(log_probs),
            None => skipped += 1,
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let preference = accuracy(&scored, skipped)?;

    let prompts = pairs
        .iter()
        .take(args.steering_prompts)
        .map(|pair| template_prompt(&patient.tokenizer, None, &pair.prompt))
        .collect::<Result<Vec<_>, _>>()?;
    let config = SteeringEvalConfig {
        samples_per_prompt: args.samples_per_prompt,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        beta: args.beta.unwrap_or_else(|| doctor.default_beta()),
    };
    let vocab_size = patient.tokenizer.vocab_size();
    // Every token is measured, so the KL and changed-token figures are exact.
    let handle = engine::start(
        patient,
        EngineConfig {
            steering_stats_interval: std::num::NonZeroUsize::MIN,
            ..EngineConfig::default()
        },
    )?;
    let progress = bar(prompts.len(), "prompts");
    let steering = steering_effect(
        &handle,
        &doctor,
        &prompts,
        vocab_size,
        &config,
        &mut |done| progress.set_position(done as u64),
    );
    progress.finish_and_clear();
    handle.shutdown();
    let report = EvalReport {
        doctor: args.doctor.clone(),
        data: args.data.display().to_string(),
        preference,
        steering: steering?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &EvalReport) {
    let p = &report.preference;
    let s = &report.steering;
    println!("doctor `{}` on `{}`", report.doctor, report.data);
    println!(
        "preference accuracy over {} pairs ({} skipped):",
        p.pairs, p.skipped
    );
    println!(
        "  {:<44} {:>7.1}%",
        "doctor implicit reward",
        100.0 * p.implicit_reward
    );
    println!(
        "  {:<44} {:>7.1}%",
        "patient total log-likelihood",
        100.0 * p.patient_log_likelihood
    );
    println!(
        "  {:<44} {:>7.1}%",
        "patient log-likelihood per token",
        100.0 * p.patient_mean_log_likelihood
    );
    println!(
        "  {:<44} {:>8.3}",
        "mean implicit margin (nats)", p.mean_implicit_margin
    );
    println!(
        "steering at β = {} over {} prompts ({} steered tokens):",
        s.beta, s.prompts, s.steered_tokens
    );
    println!(
        "  {:<44} {:>8.4}",
        "mean KL(steered ‖ patient) per token (nats)", s.mean_kl
    );
    println!(
        "  {:<44} {:>7.1}%",
        "tokens whose top token changed",
        100.0 * s.top_token_changed
    );
    println!("  {:<44} {:>8}  {:>8}", "", "steered", "patient");
    println!(
        "  {:<44} {:>8.3}  {:>8.3}",
        "distinct-1", s.steered_distinct_1, s.unsteered_distinct_1
    );
    println!(
        "  {:<44} {:>8.3}  {:>8.3}",
        "distinct-2", s.steered_distinct_2, s.unsteered_distinct_2
    );
}
