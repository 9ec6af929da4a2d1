//! Command-line arguments and dispatch.

mod bench;
mod eval;
mod generate;
mod rewards;
mod serve;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use llmdoctor::fetch::{self, FetchOptions, Verbosity};
use llmdoctor::model::{LoadOptions, QuantPolicy, WeightFormat};

/// Serve a frozen LLM with per-token steering by small trained doctor models.
#[derive(Debug, Parser)]
#[command(name = "llmdoctor", version, about)]
pub struct Cli {
    /// Log filter, e.g. `info` or `llmdoctor=debug` (overrides `LLMDOCTOR_LOG`).
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// Threads for tensor kernels (default: every core). The engine runs one step at a time
    /// and the kernels parallelise inside it, so this is the whole compute budget.
    #[arg(long, global = true, env = "LLMDOCTOR_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download the default patient (SmolLM2-135M-Instruct Q4_1) into the model cache.
    FetchModel {
        /// Print nothing but errors.
        #[arg(long)]
        quiet: bool,
    },
    /// Generate a reply to one chat prompt, optionally steered by doctors.
    Generate(generate::GenerateArgs),
    /// Measure engine throughput and latency on the model, unsteered and with doctors.
    Bench(bench::BenchArgs),
    /// Serve the patient and its doctors through an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Score preference pairs with the patient's two faces (stage 1) and write token rewards.
    Rewards(rewards::RewardsArgs),
    /// Train a doctor with TFPO on a reward file (stage 2).
    Train(train::TrainArgs),
    /// Measure a doctor's preference accuracy and steering effect on preference pairs.
    Eval(eval::EvalArgs),
}

/// How quantised weights are kept in memory.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum QuantArg {
    /// Requantise the one type without a batched CPU kernel (Q2_K) to Q8_0.
    Fast,
    /// Keep every tensor as stored in the file.
    AsStored,
    /// Requantise every block type to Q8_0, 4-bit ones included (for comparisons).
    #[value(name = "q8-0")]
    Q8_0,
}

impl QuantArg {
    pub fn load_options(self) -> LoadOptions {
        let policy = match self {
            Self::Fast => QuantPolicy::FastTypes,
            Self::AsStored => QuantPolicy::AsStored,
            Self::Q8_0 => QuantPolicy::AllQ8_0,
        };
        LoadOptions {
            format: WeightFormat::Quantized(policy),
        }
    }
}

/// Returns the model path given on the command line, or the fetched default patient.
pub fn model_path(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let path = fetch::default_model_path()?;
    if !path.exists() {
        anyhow::bail!(
            "the default model is not installed at `{}`: run `llmdoctor fetch-model`, or pass `--model PATH`",
            path.display()
        );
    }
    Ok(path)
}

/// Sizes candle's kernel thread pool. candle reads `CANDLE_NUM_THREADS` when the pool is first
/// used, so this must run before any model is loaded.
pub fn init_threads(args: &Cli) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        anyhow::ensure!(threads > 0, "`--threads` must be at least 1, got 0");
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    Ok(())
}

pub fn init_logging(args: &Cli) {
    let default = match args.command {
        Command::FetchModel { quiet: true } => "warn",
        Command::FetchModel { quiet: false } => "info",
        Command::Generate(_)
        | Command::Bench(_)
        | Command::Rewards(_)
        | Command::Train(_)
        | Command::Eval(_) => "warn",
        Command::Serve(_) => "info",
    };
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("LLMDOCTOR_LOG").ok())
        .unwrap_or_else(|| default.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(args: Cli) -> anyhow::Result<()> {
    match args.command {
        Command::FetchModel { quiet } => {
            let options = FetchOptions {
                verbosity: if quiet {
                    Verbosity::Quiet
                } else {
                    Verbosity::Normal
                },
                ..FetchOptions::default()
            };
            let path = fetch::fetch_model(&fetch::DEFAULT_PATIENT, &options)?;
            if !quiet {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Generate(generate) => generate::run(generate),
        Command::Bench(bench) => bench::run(bench),
        Command::Serve(serve) => serve::run(serve),
        Command::Rewards(rewards) => rewards::run(rewards),
        Command::Train(train) => train::run(train),
        Command::Eval(eval) => eval::run(eval),
    }
}
