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

/// Sizes the compute pool and candle's own thread pool. Both read their environment variables
/// when first used, so this must run before any model is loaded.
///
/// The commands that run the engine (`serve`, `generate`, `bench`) give candle's pool no extra
/// threads. There our kernels do the heavy work on the compute pool, and candle's pool only
/// splits element-wise operations of 64K elements or more. Its worker spins for a while after
/// each one, which took a core from the compute pool: perf put about 13% of a 16-stream run
/// in that spinning and waiting. The other commands keep candle's default. A
/// `CANDLE_NUM_THREADS` set in the environment always wins.
pub fn init_threads(args: &Cli) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        anyhow::ensure!(threads > 0, "`--threads` must be at least 1, got 0");
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let runs_engine = matches!(
        args.command,
        Command::Serve(_) | Command::Generate(_) | Command::Bench(_)
    );
    let candle_set = std::env::var_os("CANDLE_NUM_THREADS").is_some();
    if let Some(threads) = candle_threads(runs_engine, candle_set, args.threads) {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    Ok(())
}

/// Returns the `CANDLE_NUM_THREADS` to set, if any (see [`init_threads`]).
fn candle_threads(runs_engine: bool, already_set: bool, threads: Option<usize>) -> Option<usize> {
    match (already_set, runs_engine) {
        (true, _) => None,
        (false, true) => Some(1),
        (false, false) => threads,
    }
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

#[cfg(test)]
mod tests {
    use super::candle_threads;

    #[test]
    fn engine_commands_keep_candle_single_threaded() {
        assert_eq!(candle_threads(true, false, None), Some(1));
        assert_eq!(candle_threads(true, false, Some(4)), Some(1));
        assert_eq!(candle_threads(false, false, Some(4)), Some(4));
        assert_eq!(candle_threads(false, false, None), None);
        // A value the user set is kept.
        assert_eq!(candle_threads(true, true, Some(4)), None);
        assert_eq!(candle_threads(false, true, Some(4)), None);
    }
}
