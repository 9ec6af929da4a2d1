//! `llmdoctor rewards`: stage 1, token rewards from the patient's two faces.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use llmdoctor::loader::load_model;
use llmdoctor::model::{LoadOptions, WeightFormat};
use llmdoctor::train::faces::Faces;
use llmdoctor::train::selection::{PairSelection, SplitSide};
use llmdoctor::train::stage1::{run_rewards, RewardsJob};
use llmdoctor::train::{load_pairs, LoadReport, RewardParams, Strictness};

use super::model_path;

const RECORD_FORMAT_HELP: &str = "\
Output format: one JSON object per line and per pair:
  {\"pair_id\": \"...\", \"prompt_ids\": [...],
   \"chosen\": {\"token_ids\": [...], \"scores\": [...]},
   \"rejected\": {\"token_ids\": [...], \"scores\": [...]}, \"faces\": \"harmless\"}
prompt_ids is the prompt templated without a face instruction. scores[t] is S_t of token_ids[t].
Rewards follow from the scores: r_t = ±S_t where S_t > θ (+ for chosen, − for rejected), else 0.
Rerunning with the same --out skips pairs already in the file and appends the rest.";

/// Which pairs of the data file to use.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SplitArg {
    /// Every pair.
    All,
    /// The training side of the split by prompt.
    Train,
    /// The validation side of the split by prompt.
    Validation,
}

/// How model weights are held in memory.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeightsArg {
    /// Dense f32, dequantised at load: the same numbers training uses.
    Dense,
    /// Quantised as served (Q2_K requantised to Q8_0).
    Quantized,
}

impl WeightsArg {
    pub fn load_options(self) -> LoadOptions {
        match self {
            Self::Dense => LoadOptions {
                format: WeightFormat::Dense,
            },
            Self::Quantized => LoadOptions::default(),
        }
    }
}

/// The split and limit options shared by `rewards` and `eval`.
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// Use only this side of a reproducible split by prompt.
    #[arg(long, value_enum, default_value_t = SplitArg::All)]
    split: SplitArg,
    /// The share of pairs held out for validation by the split, in [0, 1).
    #[arg(long, default_value_t = 0.1)]
    validation_fraction: f64,
    /// The seed that orders prompts for the split.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Use at most this many pairs (the first ones of the selected side, in file order).
    #[arg(long)]
    limit: Option<usize>,
}

impl SelectionArgs {
    pub fn selection(&self) -> PairSelection {
        PairSelection {
            side: match self.split {
                SplitArg::All => SplitSide::All,
                SplitArg::Train => SplitSide::Train,
                SplitArg::Validation => SplitSide::Validation,
            },
            validation_fraction: self.validation_fraction,
            split_seed: self.split_seed,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Args)]
#[command(after_long_help = RECORD_FORMAT_HELP)]
pub struct RewardsArgs {
    /// Preference pairs: HH-RLHF or generic JSONL, optionally gzipped.
    #[arg(long)]
    data: PathBuf,
    /// The JSONL file that reward records are appended to.
    #[arg(long)]
    out: PathBuf,
    /// Face instructions: `harmless`, `helpful`, or a TOML file with `positive` and `negative`.
    #[arg(long, default_value = "harmless")]
    faces: String,
    #[command(flatten)]
    selection: SelectionArgs,
    /// The patient (.gguf or Hugging Face folder); defaults to the fetched patient.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The in-memory form of the patient's weights while scoring.
    #[arg(long, value_enum, default_value_t = WeightsArg::Dense)]
    weights: WeightsArg,
    /// Skip pairs whose prompt (templated without a face) has more than this many tokens.
    #[arg(long)]
    max_prompt_len: Option<usize>,
    /// Stop at the first malformed line instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// θ: scores at or below it give a zero reward (only affects the reported fraction).
    #[arg(long, default_value_t = 0.1)]
    theta: f32,
    /// τ: the temperature of the tanh in the score.
    #[arg(long, default_value_t = 1.0)]
    tau: f32,
}

pub fn run(args: RewardsArgs) -> anyhow::Result<()> {
    let faces = Faces::resolve(&args.faces)?;
    let strictness = if args.strict {
        Strictness::Strict
    } else {
        Strictness::Lenient
    };
    let report = load_pairs(&args.data, strictness)?;
    print_load_report(&report);
    let pairs = args.selection.selection().apply(report.pairs)?;

    let path = model_path(args.model)?;
    let patient = load_model(&path, &args.weights.load_options(), &Device::Cpu)
        .with_context(|| format!("failed to load the model `{}`", path.display()))?;
    let params = RewardParams {
        theta: args.theta,
        tau: args.tau,
        ..RewardParams::default()
    };
    let bar = ProgressBar::new(pairs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} pairs [{elapsed_precise}<{eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let job = RewardsJob {
        model: &patient.model,
        tokenizer: &patient.tokenizer,
        faces: &faces,
        params,
        pairs,
        out: args.out.clone(),
        max_prompt_tokens: args.max_prompt_len,
    };
    let summary = run_rewards(job, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();

    if summary.partial_line_dropped {
        println!("dropped a partial last line left by an interrupted run");
    }
    println!("pairs scored: {}", summary.scored);
    println!("pairs already in the output: {}", summary.already_done);
    for (reason, count) in &summary.skipped {
        println!("pairs skipped ({reason}): {count}");
    }
    println!(
        "responses truncated at the end to fit the context: {}",
        summary.truncated_responses
    );
    println!(
        "records in `{}`: {}",
        args.out.display(),
        summary.records_in_file
    );
    println!(
        "non-zero rewards at θ = {}: {:.1}%",
        args.theta,
        100.0 * summary.nonzero_fraction
    );
    Ok(())
}

/// Prints how many lines the loader skipped, by reason.
pub fn print_load_report(report: &LoadReport) {
    println!("pairs loaded: {}", report.pairs.len());
    for (reason, count) in report.skipped_by_reason() {
        println!("lines skipped ({reason}): {count}");
    }
}
