//! The SentencePiece-style tokenizer of `tokenizer.ggml.model = "llama"` vocabularies.
//!
//! GGUF stores such a vocabulary as pieces with scores, without merges. SentencePiece's BPE
//! repeatedly joins the adjacent pair whose concatenation is the piece with the highest score.
//! So the same tokens come from a BPE whose merges are all splits of every piece into two
//! pieces, ranked by the score of the joined piece. Text that the pieces cannot cover falls back
//! to byte tokens (`<0x0A>`), spaces become `▁`, and one `▁` is prepended unless
//! `add_space_prefix` is off.

use std::collections::HashSet;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper};

use super::bpe::vocab_map;
use super::gguf::{GgufVocab, KEY_SCORES};
use super::TokenizerError;

/// The SentencePiece word-boundary mark that stands for a space.
const SPACE_MARK: &str = "\u{2581}";

/// Builds the BPE model, normalizer and decoder of a `llama` vocabulary. Added (special and
/// user-defined) tokens are registered by the caller.
pub(crate) fn build_sentencepiece(
    vocab: &GgufVocab,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let scores = vocab
        .scores
        .as_ref()
        .ok_or_else(|| TokenizerError::MissingMetadata {
            key: KEY_SCORES.to_owned(),
        })?;
    let add_space_prefix = vocab.add_space_prefix.unwrap_or(true);

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_map(&vocab.tokens), merges_from_scores(vocab, scores))
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unknown) = vocab.token_text(vocab.unknown_token_id) {
        builder = builder.unk_token(unknown.to_owned());
    }
    let bpe = builder.build().map_err(|err| TokenizerError::Build {
        message: format!("SentencePiece BPE from `{KEY_SCORES}`: {err}"),
    })?;

    let replace_spaces = map_build_error(Replace::new(" ", SPACE_MARK))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![
            Prepend::new(SPACE_MARK.to_owned()).into(),
            replace_spaces.into(),
        ])
        .into()
    } else {
        replace_spaces.into()
    };

    let mut decoders: Vec<DecoderWrapper> = vec![
        map_build_error(Replace::new(SPACE_MARK, " "))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        // The prepended mark decodes to a leading space that the original text did not have.
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|err| TokenizerError::Build {
            message: err.to_string(),
        })?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

fn map_build_error<T>(result: tokenizers::Result<T>) -> Result<T, TokenizerError> {
    result.map_err(|err| TokenizerError::Build {
        message: err.to_string(),
    })
}

/// Derives BPE merges from piece scores: every split of a mergeable piece into two mergeable
/// pieces, highest score of the joined piece first, lower id first among equal scores.
///
/// NOTE: two cases differ from llama.cpp's SentencePiece tokenizer. It breaks score ties by
/// position in the text, while here the lower id wins. It can also join a character that is not
/// a piece itself, which BPE merges cannot express. Both matter only for vocabularies with
/// repeated scores or with pieces made of characters that are not pieces.
fn merges_from_scores(vocab: &GgufVocab, scores: &[f32]) -> Vec<(String, String)> {
    let mergeable: HashSet<&str> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, kind)| kind.is_mergeable())
        .map(|(token, _)| token.as_str())
        .collect();

    let mut ranked: Vec<(f32, u32, &str, &str)> = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        if !vocab.token_types[id].is_mergeable() {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if mergeable.contains(left) && mergeable.contains(right) {
                ranked.push((scores[id], id as u32, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked
        .into_iter()
        .map(|(_, _, left, right)| (left.to_owned(), right.to_owned()))
        .collect()
}
