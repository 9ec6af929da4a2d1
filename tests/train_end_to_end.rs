//! End to end on a tiny random model: `rewards` → `train` → steered sampling through the engine.
//!
//! Chosen responses contain a marker token and rejected ones do not. A random model's faces
//! carry no meaning, so the test runs the real `rewards` command to check it and to get the
//! token ids. It then replaces the scores with a synthetic rule. The marker scores 1 in chosen
//! responses, every rejected token scores 1 (its reward is −1), and everything else scores 0.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use llmdoctor::doctor::DoctorRegistry;
use llmdoctor::engine::core::{self as engine, EngineConfig};
use llmdoctor::engine::request::{DoctorWeight, Steering};
use llmdoctor::eval::steering::sample;
use llmdoctor::loader::load_model;
use llmdoctor::model::tiny::{TinySpec, TinyWeights};
use llmdoctor::model::LoadOptions;
use llmdoctor::tokenizer::SpecialTokens;
use llmdoctor::train::reward_file::read_records;
use llmdoctor::train::scoring::template_prompt;
use llmdoctor::train::PromptMessage;

const SAMPLES: usize = 200;
const MAX_TOKENS: usize = 12;

/// The binary under test: `LLMDOCTOR_BIN` when set (for example a release build), else the one
/// cargo built for this test run.
fn llmdoctor_binary() -> PathBuf {
    std::env::var_os("LLMDOCTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_llmdoctor")))
}

fn binary() -> Command {
    Command::new(llmdoctor_binary())
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "command failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

fn write_tiny_model(dir: &Path) -> PathBuf {
    let weights = TinyWeights::random(TinySpec::default()).unwrap();
    let path = dir.join("tiny.gguf");
    weights.write_gguf(&path, GgmlDType::F32).unwrap();
    path
}

fn write_pairs(dir: &Path) -> PathBuf {
    let topics = [
        "cats", "rain", "bread", "maps", "tea", "jazz", "moss", "ink",
    ];
    let mut lines = Vec::new();
    for (index, topic) in topics.iter().cycle().take(24).enumerate() {
        let line = serde_json::json!({
            "id": index,
            "prompt": format!("tell me about {topic} {index}"),
            "chosen": format!("ZZ {topic} ZZ"),
            "rejected": format!("no {topic} here"),
        });
        lines.push(line.to_string());
    }
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Rewrites the scores of a reward file with the synthetic rule of the module documentation.
fn write_synthetic_rewards(scored: &Path, out: &Path, marker: u32) {
    let contents = read_records(scored).unwrap();
    let mut lines = Vec::new();
    for mut record in contents.records {
        record.chosen.scores = record
            .chosen
            .token_ids
            .iter()
            .map(|&id| if id == marker { 1.0 } else { 0.0 })
            .collect();
        record.rejected.scores = vec![1.0; record.rejected.token_ids.len()];
        lines.push(record.to_json_line().unwrap());
    }
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}

#[test]
fn trained_doctor_raises_marker_rate() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path());
    let pairs = write_pairs(dir.path());
    let faces = dir.path().join("marker.toml");
    std::fs::write(
        &faces,
        "positive = \"Answer with ZZ.\"\nnegative = \"Never write ZZ.\"\n",
    )
    .unwrap();

    let scored = dir.path().join("rewards.jsonl");
    let stdout = run_ok(
        binary()
            .args(["rewards", "--data"])
            .arg(&pairs)
            .arg("--out")
            .arg(&scored)
            .arg("--model")
            .arg(&model)
            .arg("--faces")
            .arg(&faces),
    );
    assert!(stdout.contains("pairs scored: 24"), "{stdout}");
    let records = read_records(&scored).unwrap().records;
    assert_eq!(records.len(), 24);
    assert!(records.iter().all(|r| r.faces == "marker"));

    let patient = load_model(&model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let marker = patient
        .tokenizer
        .encode("Z", SpecialTokens::AsText)
        .unwrap();
    assert_eq!(marker.len(), 1, "the marker must be one token");
    let marker = marker[0];
    let synthetic = dir.path().join("synthetic.jsonl");
    write_synthetic_rewards(&scored, &synthetic, marker);

    let doctors = dir.path().join("doctors");
    let stdout = run_ok(
        binary()
            .args(["train", "--rewards"])
            .arg(&synthetic)
            .arg("--out")
            .arg(doctors.join("marker"))
            .arg("--model")
            .arg(&model)
            .args(["--steps", "48", "--lr", "1e-2", "--seed", "3"]),
    );
    assert!(stdout.contains("trained 48 steps"), "{stdout}");
    for file in ["doctor.toml", "adapter.safetensors", "adapter_config.json"] {
        assert!(doctors.join("marker").join(file).exists(), "missing {file}");
    }
    for file in ["value_head.safetensors", "loss.png", "losses.csv"] {
        assert!(doctors.join("marker").join(file).exists(), "missing {file}");
    }

    // The same data on the top layer only: the adapter lists that layer for PEFT, and its
    // rows will fork from the patient's there.
    let layers = patient.model.config().num_layers;
    run_ok(
        binary()
            .args(["train", "--rewards"])
            .arg(&synthetic)
            .arg("--out")
            .arg(doctors.join("marker-top"))
            .arg("--model")
            .arg(&model)
            .args(["--steps", "4", "--lora-layers", "1"]),
    );
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(doctors.join("marker-top/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["layers_to_transform"],
        serde_json::json!([layers - 1])
    );
    let manifest = std::fs::read_to_string(doctors.join("marker-top/doctor.toml")).unwrap();
    assert!(manifest.contains("lora_layers = 1"), "{manifest}");

    let registry = DoctorRegistry::new(doctors, patient.clone(), LoadOptions::default());
    let top = registry.load("marker-top").unwrap();
    assert_eq!(top.adapter.first_layer(), layers - 1);
    let doctor = registry.load("marker").unwrap();
    assert_eq!(doctor.adapter.first_layer(), 0);
    let message = PromptMessage {
        role: llmdoctor::train::Role::User,
        content: "tell me about owls".into(),
    };
    let prompt = template_prompt(&patient.tokenizer, None, &[message]).unwrap();
    let vocab = patient.tokenizer.vocab_size();
    let handle = engine::start(patient, EngineConfig::default()).unwrap();
    let mut hits = [0usize; 2];
    for seed in 0..SAMPLES as u64 {
        let steered = Steering {
            alpha: 1.0,
            doctors: vec![DoctorWeight {
                doctor: doctor.clone(),
                beta: 1.0,
            }],
        };
        for (slot, steering) in [steered, Steering::default()].into_iter().enumerate() {
            let output = sample(&handle, &prompt, vocab, steering, MAX_TOKENS, 1.0, seed).unwrap();
            if output.ids.contains(&marker) {
                hits[slot] += 1;
            }
        }
    }
    handle.shutdown();

    // Two-proportion z-test with a pooled proportion: z = (p₁ − p₂) / √(p(1−p)·2/n).
    let n = SAMPLES as f64;
    let (steered, unsteered) = (hits[0] as f64 / n, hits[1] as f64 / n);
    let pooled = (steered + unsteered) / 2.0;
    let z = (steered - unsteered) / (pooled * (1.0 - pooled) * 2.0 / n).sqrt();
    println!("marker rate: steered {steered:.3}, unsteered {unsteered:.3}, z = {z:.2}");
    assert!(
        z > 3.0,
        "steered marker rate {steered:.3} vs unsteered {unsteered:.3}: z = {z:.2}, expected > 3"
    );
}
