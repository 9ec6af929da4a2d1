//! Bad input to `rewards`, `train` and `eval`, run through the binary: every case ends with a
//! clear message and, where the run can go on, a count in the summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use llmdoctor::model::tiny::{TinySpec, TinyWeights};

/// The binary under test: `LLMDOCTOR_BIN` when set (for example a release build), else the one
/// cargo built for this test run.
fn llmdoctor_binary() -> PathBuf {
    std::env::var_os("LLMDOCTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_llmdoctor")))
}

fn tiny_model(dir: &Path) -> PathBuf {
    let spec = TinySpec {
        context_length: 512,
        ..TinySpec::default()
    };
    let path = dir.join("tiny.gguf");
    TinyWeights::random(spec)
        .unwrap()
        .write_gguf(&path, GgmlDType::F32)
        .unwrap();
    path
}

fn rewards(data: &Path, out: &Path, model: &Path, extra: &[&str]) -> Output {
    Command::new(llmdoctor_binary())
        .args(["rewards", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--model")
        .arg(model)
        .args(extra)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn good_line(id: usize) -> String {
    serde_json::json!({"id": id, "prompt": "hi", "chosen": "yes ok", "rejected": "no"}).to_string()
}

#[test]
fn empty_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("empty.jsonl");
    std::fs::write(&data, "").unwrap();
    let output = rewards(&data, &dir.path().join("out.jsonl"), &model, &[]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("contains no preference pairs"), "{stderr}");
}

#[test]
fn malformed_lines_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("mixed.jsonl");
    let identical =
        serde_json::json!({"prompt": "hi", "chosen": "same", "rejected": "same"}).to_string();
    let lines = [
        good_line(1),
        "this is not json".to_string(),
        "{\"chosen\": ".to_string(),
        identical,
        good_line(2),
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("out.jsonl");
    let output = rewards(&data, &out, &model, &[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("lines skipped (not_json): 2"), "{stdout}");
    assert!(
        stdout.contains("lines skipped (identical_responses): 1"),
        "{stdout}"
    );
    assert!(stdout.contains("pairs scored: 2"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);

    let strict = rewards(
        &data,
        &dir.path().join("strict.jsonl"),
        &model,
        &["--strict"],
    );
    assert!(!strict.status.success());
    let stderr = text(&strict.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[test]
fn long_responses_are_truncated_and_long_prompts_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("long.jsonl");
    let long_response = "abcdefgh ".repeat(40);
    let long_prompt = "question ".repeat(60);
    let lines = [
        good_line(1),
        serde_json::json!({"id": 2, "prompt": "hi", "chosen": long_response, "rejected": "no"})
            .to_string(),
        serde_json::json!({"id": 3, "prompt": long_prompt, "chosen": "a", "rejected": "b"})
            .to_string(),
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("out.jsonl");
    let output = rewards(&data, &out, &model, &[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("pairs scored: 2"), "{stdout}");
    assert!(
        stdout.contains("pairs skipped (prompt_too_long): 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("responses truncated at the end to fit the context: 1"),
        "{stdout}"
    );
}

#[test]
fn rerun_resumes_after_partial_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (1..=3).map(good_line).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("out.jsonl");
    assert!(rewards(&data, &out, &model, &["--limit", "2"])
        .status
        .success());
    // Simulate a kill in the middle of writing a third record.
    let mut contents = std::fs::read_to_string(&out).unwrap();
    contents.push_str("{\"pair_id\": \"3\", \"prompt_");
    std::fs::write(&out, contents).unwrap();

    let output = rewards(&data, &out, &model, &[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("dropped a partial last line"), "{stdout}");
    assert!(
        stdout.contains("pairs already in the output: 2"),
        "{stdout}"
    );
    assert!(stdout.contains("pairs scored: 1"), "{stdout}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(written.lines().count(), 3);
    assert!(written.ends_with('\n'));
}

#[test]
fn train_rejects_unusable_reward_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let train = |rewards: &Path| {
        Command::new(llmdoctor_binary())
            .args(["train", "--rewards"])
            .arg(rewards)
            .arg("--out")
            .arg(dir.path().join("doctors/x"))
            .arg("--model")
            .arg(&model)
            .args(["--steps", "1"])
            .output()
            .unwrap()
    };
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let output = train(&empty);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("no trainable pairs"), "{stderr}");

    let garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&garbage, "not a record\n").unwrap();
    let output = train(&garbage);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("line 1 is not a valid reward record"),
        "{stderr}"
    );
}

#[test]
fn train_rejects_out_of_range_lora_layers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let rewards = dir.path().join("rewards.jsonl");
    std::fs::write(&rewards, "").unwrap();
    for layers in ["0", "3"] {
        let output = Command::new(llmdoctor_binary())
            .args(["train", "--rewards"])
            .arg(&rewards)
            .arg("--out")
            .arg(dir.path().join("doctors/x"))
            .arg("--model")
            .arg(&model)
            .args(["--lora-layers", layers])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        let expected = format!("`--lora-layers {layers}` is out of range: the base has 2 layers");
        assert!(stderr.contains(&expected), "{stderr}");
    }
}

#[test]
fn eval_names_a_missing_doctor() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, good_line(1)).unwrap();
    let output = Command::new(llmdoctor_binary())
        .args(["eval", "--doctor", "absent", "--data"])
        .arg(&data)
        .arg("--doctors-dir")
        .arg(dir.path().join("doctors"))
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("failed to load doctor `absent`"),
        "{stderr}"
    );
}
