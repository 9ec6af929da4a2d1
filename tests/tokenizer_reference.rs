//! Checks the tokenizer built from the default patient's GGUF metadata against ids that
//! llama.cpp produced for the same file, and the streaming detokenizer against full decodes.
//!
//! The model is found through `LLMDOCTOR_MODEL`, else at
//! `$LLMDOCTOR_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf` (`LLMDOCTOR_HOME` defaults to
//! `~/.cache/llmdoctor`). The reference files are read from `shared/reference/` beside the
//! repository. Tests print a line and pass when either is missing.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file;
use llmdoctor::tokenizer::{
    ChatMessage, GenerationPrompt, IncrementalDetokenizer, SpecialTokens, Tokenizer,
};
use proptest::prelude::*;
use serde::Deserialize;

type TestResult = Result<(), Box<dyn Error>>;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LLMDOCTOR_MODEL") {
        return Some(PathBuf::from(path));
    }
    let home = match std::env::var_os("LLMDOCTOR_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/llmdoctor"),
    };
    Some(home.join("models").join(MODEL_FILE))
}

/// Loads the SmolLM2 tokenizer once for all tests. Returns `None`, after printing a line, when
/// the model file is absent.
fn smollm2() -> Option<Arc<Tokenizer>> {
    static TOKENIZER: OnceLock<Option<Arc<Tokenizer>>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let path = model_path().filter(|path| path.is_file());
            let Some(path) = path else {
                println!("skipped: {MODEL_FILE} not found (set LLMDOCTOR_MODEL or LLMDOCTOR_HOME)");
                return None;
            };
            let mut file = std::fs::File::open(&path).expect("open the model file");
            let content = gguf_file::Content::read(&mut file).expect("read the GGUF header");
            Some(Arc::new(
                Tokenizer::from_gguf(&content).expect("build the tokenizer from GGUF metadata"),
            ))
        })
        .clone()
}

/// Reads a reference file from `shared/reference/`. Returns `None`, after printing a line, when
/// the file is absent.
fn reference<T: for<'de> Deserialize<'de>>(name: &str) -> Result<Option<T>, Box<dyn Error>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference")
        .join(name);
    if !path.is_file() {
        println!("skipped: reference file {} not found", path.display());
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&std::fs::read_to_string(path)?)?))
}

#[derive(Deserialize)]
struct TokenizationCases {
    cases: Vec<TokenizationCase>,
}

#[derive(Deserialize)]
struct TokenizationCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCases {
    cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    prompt_text: String,
    prompt_ids: Vec<u32>,
}

#[test]
fn ids_match_llamacpp_reference() -> TestResult {
    let Some(tokenizer) = smollm2() else {
        return Ok(());
    };
    let Some(reference) = reference::<TokenizationCases>("smollm2-tokenizer-llamacpp.json")? else {
        return Ok(());
    };
    assert!(!reference.cases.is_empty());

    let mut mismatches = Vec::new();
    for case in &reference.cases {
        let ids = tokenizer.encode(&case.text, SpecialTokens::AsText)?;
        if ids != case.ids {
            mismatches.push(format!(
                "text {:?}\n  llama.cpp: {:?}\n  ours:      {:?}",
                case.text, case.ids, ids
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        mismatches.len(),
        reference.cases.len(),
        mismatches.join("\n")
    );
    Ok(())
}

#[test]
fn ids_match_models_md_table() -> TestResult {
    let Some(tokenizer) = smollm2() else {
        return Ok(());
    };
    let cases: [(&str, &[u32]); 3] = [
        ("Hello, world!", &[19556, 28, 905, 17]),
        (
            "What is the capital of France?",
            &[1780, 314, 260, 3575, 282, 4649, 47],
        ),
        (
            "  leading spaces\nand\ttabs",
            &[216, 2899, 5600, 198, 397, 197, 100, 7366],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            tokenizer.encode(text, SpecialTokens::AsText)?,
            expected,
            "text {text:?}"
        );
    }
    Ok(())
}

#[test]
fn chat_template_matches_llamacpp_prompts() -> TestResult {
    let Some(tokenizer) = smollm2() else {
        return Ok(());
    };
    let Some(reference) = reference::<ChatCases>("smollm2-q4_1-llamacpp.json")? else {
        return Ok(());
    };
    assert!(!reference.cases.is_empty());

    for case in &reference.cases {
        let prompt = tokenizer.apply_chat_template(&case.messages, GenerationPrompt::Add)?;
        assert_eq!(prompt, case.prompt_text, "messages {:?}", case.messages);
        let ids = tokenizer.encode(&case.prompt_text, SpecialTokens::Parse)?;
        assert_eq!(ids, case.prompt_ids, "prompt {:?}", case.prompt_text);
    }
    Ok(())
}

#[test]
fn special_tokens_of_smollm2() {
    let Some(tokenizer) = smollm2() else {
        return;
    };
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.eos_token_id(), Some(2));
    assert!(!tokenizer.add_bos());
    // <|endoftext|> (0) and <|im_end|> (2, also EOS).
    assert_eq!(tokenizer.stop_token_ids(), &[0, 2]);
    let table = tokenizer.token_table();
    assert_eq!(table.len(), 49152);
    assert_eq!(table[1], "<|im_start|>");
    assert_eq!(tokenizer.id_to_token(19556).as_deref(), Some("Hello"));
    assert!(tokenizer.chat_template().is_some());
}

#[test]
fn emoji_and_cjk_stream_without_broken_chars() -> TestResult {
    let Some(tokenizer) = smollm2() else {
        return Ok(());
    };
    let text = "emoji 🙂🚀👩‍👩‍👧, 日本語のテキスト, Ελληνικά, naïve";
    let ids = tokenizer.encode(text, SpecialTokens::AsText)?;
    let single_token_failures = ids
        .iter()
        .filter(|&&id| {
            tokenizer
                .decode(&[id])
                .is_ok_and(|s| s.contains('\u{FFFD}'))
        })
        .count();
    assert!(
        single_token_failures > 0,
        "the text should contain characters split over several tokens"
    );

    let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
    let mut deltas = Vec::new();
    for &id in &ids {
        deltas.extend(detok.push(id)?);
    }
    deltas.extend(detok.finish()?);
    for delta in &deltas {
        assert!(
            !delta.contains('\u{FFFD}'),
            "delta {delta:?} has a broken character"
        );
    }
    assert_eq!(deltas.concat(), text);
    Ok(())
}

fn stream_all(tokenizer: &Arc<Tokenizer>, ids: &[u32]) -> Result<String, TestCaseError> {
    let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
    let mut text = String::new();
    for &id in ids {
        text.extend(
            detok
                .push(id)
                .map_err(|err| TestCaseError::fail(err.to_string()))?,
        );
    }
    text.extend(
        detok
            .finish()
            .map_err(|err| TestCaseError::fail(err.to_string()))?,
    );
    Ok(text)
}

/// Text with the characters that exercise the pre-tokenizer: any Unicode, ChatML markers,
/// digits, spaces and newlines.
fn text_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(\\PC|<\\|im_start\\|>|<\\|im_end\\|>|[0-9]+| +|\n|\t|🙂|日本){0,24}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_decode_round_trips(text in text_strategy()) {
        let Some(tokenizer) = smollm2() else {
            return Ok(());
        };
        let ids = tokenizer
            .encode(&text, SpecialTokens::AsText)
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        let decoded = tokenizer
            .decode(&ids)
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(decoded, text);
    }

    #[test]
    fn stream_of_encoded_text_equals_decode(text in text_strategy(), cut in any::<prop::sample::Index>()) {
        let Some(tokenizer) = smollm2() else {
            return Ok(());
        };
        let ids = tokenizer
            .encode(&text, SpecialTokens::Parse)
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        // A prefix of the ids may end inside a character.
        let ids = &ids[..cut.index(ids.len() + 1)];
        let full = tokenizer.decode(ids).map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(stream_all(&tokenizer, ids)?, full);
    }

    #[test]
    fn stream_of_random_ids_equals_decode(ids in prop::collection::vec(0u32..49152, 0..48)) {
        let Some(tokenizer) = smollm2() else {
            return Ok(());
        };
        let full = tokenizer.decode(&ids).map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(stream_all(&tokenizer, &ids)?, full);
    }
}
