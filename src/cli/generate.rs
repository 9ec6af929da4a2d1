//! `llmdoctor generate`.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use llmdoctor::doctor::DoctorRegistry;
use llmdoctor::engine::core::{self as engine, EngineConfig};
use llmdoctor::generate::{generate, DoctorChoice, GenerateOptions};
use llmdoctor::loader::load_model;

use super::{model_path, QuantArg};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model file (.gguf) or Hugging Face folder; defaults to the fetched patient.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// A system message placed before the user message.
    #[arg(long)]
    system: Option<String>,
    /// Maximum number of generated tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token at every step.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampler, for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// A doctor that steers generation, as NAME or NAME:BETA; repeat for several doctors.
    #[arg(long = "doctor", value_name = "NAME[:BETA]")]
    doctors: Vec<DoctorChoice>,
    /// α, the weight of the patient's log-probabilities.
    #[arg(long, default_value_t = 1.0)]
    patient_alpha: f32,
    /// Folder holding one sub-folder per doctor.
    #[arg(long, default_value = "doctors")]
    doctors_dir: PathBuf,
    /// How quantised weights are kept in memory.
    #[arg(long, value_enum, default_value_t = QuantArg::Fast)]
    quant: QuantArg,
    /// Print one JSON object with ids, text, token counts and the finish reason.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let path = model_path(args.model.clone())?;
    let load_options = args.quant.load_options();
    let patient = load_model(&path, &load_options, &Device::Cpu)
        .with_context(|| format!("failed to load the model `{}`", path.display()))?;
    let registry = DoctorRegistry::new(args.doctors_dir.clone(), patient.clone(), load_options);
    for choice in &args.doctors {
        registry.load(&choice.name).with_context(|| {
            format!(
                "failed to load doctor `{}` from `{}`",
                choice.name,
                args.doctors_dir.display()
            )
        })?;
    }
    let tokenizer = patient.tokenizer.clone();
    let handle = engine::start(patient, EngineConfig::default())?;
    let options = GenerateOptions {
        prompt: args.prompt,
        system: args.system,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        doctors: args.doctors,
        patient_alpha: args.patient_alpha,
    };
    let result = generate(&handle, &tokenizer, &registry, &options);
    handle.shutdown();
    let output = result?;
    if args.json {
        println!("{}", serde_json::to_string(&output)?);
    } else {
        println!("{}", output.text);
    }
    Ok(())
}
