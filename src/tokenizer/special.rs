//! End-of-generation tokens: the token ids that stop generation whatever the request sets.

/// Token texts that end a turn or a whole generation in common chat formats.
///
/// This is llama.cpp's list of end-of-generation texts (`special_eog_ids` in
/// `src/llama-vocab.cpp`) plus `</s>`, the EOS text of SentencePiece vocabularies.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "</s>",
];

/// Returns whether a token with this text ends generation. llama.cpp treats such tokens as control
/// tokens even when the file types them as normal, and so does this crate.
pub(crate) fn is_end_of_generation_text(text: &str) -> bool {
    END_OF_GENERATION_TEXTS.contains(&text)
}

/// Collects the stop token ids: the `explicit` ones (EOS and the like) plus every token of the
/// vocabulary whose text is an end-of-generation text. Sorted, without duplicates.
pub(crate) fn stop_token_ids(
    tokenizer: &tokenizers::Tokenizer,
    explicit: impl IntoIterator<Item = u32>,
) -> Vec<u32> {
    let has = |text: &str| tokenizer.token_to_id(text).is_some();
    // gpt-oss (the o200k_harmony format) ends a message with `<|end|>` but goes on with another
    // message; its generation ends on `<|return|>` or `<|call|>`. llama.cpp applies the same rule.
    let harmony_format = has("<|return|>") && has("<|call|>");

    let mut ids: Vec<u32> = explicit.into_iter().collect();
    ids.extend(
        END_OF_GENERATION_TEXTS
            .iter()
            .filter(|text| !(harmony_format && **text == "<|end|>"))
            .filter_map(|text| tokenizer.token_to_id(text)),
    );
    ids.sort_unstable();
    ids.dedup();
    ids
}
