//! Small handmade GGUF vocabularies, so that tests need no model file.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

use super::Tokenizer;

/// GPT-2's reversible byte-to-character table: printable Latin-1 bytes map to themselves,
/// the others to U+0100 and up, in byte order.
pub(crate) fn byte_to_char(byte: u8) -> char {
    let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        char::from(byte)
    } else {
        let rank = (0..byte)
            .filter(|&b| !matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
            .count() as u32;
        char::from_u32(256 + rank).expect("U+0100..U+0143 are valid chars")
    }
}

pub(crate) fn strings(items: &[&str]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|s| Value::String((*s).to_owned()))
            .collect(),
    )
}

pub(crate) fn content(metadata: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

/// The id of byte 0 in the byte-level fixture, whose vocabulary is three control tokens, the
/// 256 byte tokens in byte order, then merged tokens.
pub(crate) const BYTE_BASE: u32 = 3;

/// Metadata of a byte-level BPE vocabulary with ChatML control tokens and merges for
/// "hello", " world" and "he".
pub(crate) fn byte_level_metadata() -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(str::to_owned)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    ];
    for merge in merges {
        tokens.push(merge.replace(' ', ""));
    }
    let mut types = vec![Value::I32(3); 3];
    types.extend(std::iter::repeat_n(Value::I32(1), tokens.len() - 3));

    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".to_owned())),
        ("tokenizer.ggml.pre", Value::String("smollm".to_owned())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ]
}

/// Builds a byte-level tokenizer from [`byte_level_metadata`].
pub(crate) fn tiny_byte_level() -> Tokenizer {
    Tokenizer::from_gguf(&content(byte_level_metadata())).expect("the byte-level fixture builds")
}
