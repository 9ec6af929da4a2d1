//! The `llmdoctor` binary on good and bad input: exit codes, messages and JSON output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llmdoctor::model::tiny::{TinySpec, TinyWeights};

fn llmdoctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmdoctor"))
        .args(args)
        .env(
            "LLMDOCTOR_HOME",
            std::env::temp_dir().join("llmdoctor-cli-test-home"),
        )
        .output()
        .expect("the binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, no panic, and every fragment in the message.
fn assert_fails_with(output: &Output, fragments: &[&str]) {
    let err = stderr(output);
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "the binary panicked: {err}");
    for fragment in fragments {
        assert!(err.contains(fragment), "missing `{fragment}` in: {err}");
    }
}

fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    TinyWeights::random(TinySpec::default())
        .unwrap()
        .write_gguf(&path, GgmlDType::Q8_0)
        .unwrap();
    path
}

#[test]
fn generate_json_prints_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let output = llmdoctor(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--max-tokens",
        "5",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let object = value.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "completion_tokens",
            "finish_reason",
            "ids",
            "prompt_ids",
            "prompt_tokens",
            "text"
        ]
    );
    let prompt_ids = value["prompt_ids"].as_array().unwrap();
    assert_eq!(
        value["prompt_tokens"].as_u64().unwrap() as usize,
        prompt_ids.len()
    );
    let ids = value["ids"].as_array().unwrap();
    assert_eq!(
        value["completion_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
    let reason = value["finish_reason"].as_str().unwrap();
    assert!(
        reason == "length" && ids.len() == 5 || reason == "stop",
        "{value}"
    );
}

#[test]
fn missing_model_file_is_named() {
    let output = llmdoctor(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "Hi",
    ]);
    assert_fails_with(&output, &["/nonexistent/model.gguf", "not found"]);
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let output = llmdoctor(&[
        "generate",
        "--model",
        truncated.to_str().unwrap(),
        "--prompt",
        "Hi",
    ]);
    assert_fails_with(&output, &["truncated.gguf", "failed to read tensor"]);

    let header_only = dir.path().join("header.gguf");
    std::fs::write(&header_only, &bytes[..100]).unwrap();
    let output = llmdoctor(&[
        "generate",
        "--model",
        header_only.to_str().unwrap(),
        "--prompt",
        "Hi",
    ]);
    assert_fails_with(&output, &["header.gguf", "not a valid model file"]);
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falcon.gguf");
    let embedding = QTensor::quantize(
        &Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("falcon".into());
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut file,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &embedding)],
    )
    .unwrap();
    let output = llmdoctor(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "Hi",
    ]);
    assert_fails_with(
        &output,
        &["unsupported architecture `falcon`", "falcon.gguf"],
    );
}

#[test]
fn prompt_longer_than_context_states_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prompt = "x".repeat(400);
    let output = llmdoctor(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
    ]);
    assert_fails_with(&output, &["context window is 256 tokens", "the prompt has"]);
}

#[test]
fn adapter_that_does_not_fit_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let doctor_dir = dir.path().join("doctors/wide");
    std::fs::create_dir_all(&doctor_dir).unwrap();
    let mut tensors = HashMap::new();
    let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
    tensors.insert(
        format!("{prefix}.lora_A.weight"),
        Tensor::zeros((2, 96), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        format!("{prefix}.lora_B.weight"),
        Tensor::zeros((64, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, doctor_dir.join("adapter.safetensors")).unwrap();
    std::fs::write(
        doctor_dir.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 4}"#,
    )
    .unwrap();
    std::fs::write(doctor_dir.join("doctor.toml"), "name = \"wide\"\n").unwrap();
    let output = llmdoctor(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--doctors-dir",
        dir.path().join("doctors").to_str().unwrap(),
        "--doctor",
        "wide:0.5",
    ]);
    assert_fails_with(
        &output,
        &[
            "doctor `wide`",
            "q_proj.lora_A.weight",
            "[2, 96]",
            "[2, 64]",
        ],
    );
}

#[test]
fn bad_doctor_argument_names_the_fix() {
    let output = llmdoctor(&["generate", "--prompt", "Hi", "--doctor", "harmless:lots"]);
    assert_fails_with(&output, &["harmless:lots", "NAME:BETA"]);
}

#[test]
fn unknown_doctor_lists_loaded_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    std::fs::create_dir_all(dir.path().join("doctors")).unwrap();
    let output = llmdoctor(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--doctors-dir",
        dir.path().join("doctors").to_str().unwrap(),
        "--doctor",
        "nobody",
    ]);
    assert_fails_with(&output, &["doctor `nobody`"]);
}

#[test]
fn bench_rejects_zero_stats_interval() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let output = llmdoctor(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--steering-stats-interval",
        "0",
    ]);
    assert_fails_with(
        &output,
        &["--steering-stats-interval", "at least 1", "got 0"],
    );
}

#[test]
fn bench_runs_with_every_token_measured() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let output = llmdoctor(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--steering-stats-interval",
        "1",
        "--concurrency",
        "2",
        "--repeats",
        "1",
        "--max-tokens",
        "4",
        "--prefill-tokens",
        "8",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let modes: Vec<String> = stdout
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|value| value["mode"].as_str().map(str::to_owned))
        .collect();
    assert!(modes.iter().any(|m| m.starts_with("1 doctor")), "{modes:?}");
}
