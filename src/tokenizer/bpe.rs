//! The byte-level BPE tokenizer of `tokenizer.ggml.model = "gpt2"` vocabularies.
//!
//! The pre-tokenizer is chosen from `tokenizer.ggml.pre` with the splitting rules that llama.cpp
//! (`llm_tokenizer_bpe` in `src/llama-vocab.cpp`, late-2025 versions) applies to each name, so
//! that token ids match llama.cpp on the same file. llama.cpp applies its regexes one after the
//! other, and each one splits the pieces left by the previous one. Both the matches and the text
//! between them become pieces, which is what a `Split` pre-tokenizer with the `Isolated`
//! behaviour does.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::gguf::{GgufVocab, KEY_MERGES, KEY_PRE};
use super::TokenizerError;

/// One splitting step of a pre-tokenizer, applied before the byte-to-character mapping.
#[derive(Debug, Clone, Copy)]
enum SplitStep {
    /// Every numeric character (`\p{N}`) becomes its own piece.
    IndividualDigits,
    /// Matches of a regex become pieces, and so does the text between them.
    Regex(&'static str),
    /// The GPT-2 regex, run by the `ByteLevel` pre-tokenizer itself.
    Gpt2,
}

/// The splitting steps of a named pre-tokenizer, plus the llama.cpp defaults that come with the
/// name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreTokenizerSpec {
    steps: &'static [SplitStep],
    /// A word that is already a token is kept whole instead of being rebuilt by merges.
    pub ignore_merges: bool,
    /// Whether a BOS token is added when `tokenizer.ggml.add_bos_token` is absent.
    pub default_add_bos: bool,
}

/// GPT-2's regex as llama.cpp writes it. `ByteLevel` uses the same one with a trailing `|\s+`,
/// which changes nothing because text between matches is kept as pieces anyway.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_V3_MAIN: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

const fn spec(steps: &'static [SplitStep]) -> PreTokenizerSpec {
    PreTokenizerSpec {
        steps,
        ignore_merges: false,
        default_add_bos: false,
    }
}

const fn spec_with_bos(steps: &'static [SplitStep], ignore_merges: bool) -> PreTokenizerSpec {
    PreTokenizerSpec {
        steps,
        ignore_merges,
        default_add_bos: true,
    }
}

/// llama.cpp's fallback for files without `tokenizer.ggml.pre` (converted before the key
/// existed): punctuation runs, then GPT-2 pieces, then digit runs cut into groups of three.
const DEFAULT: PreTokenizerSpec = spec(&[
    SplitStep::Regex(r"[\p{P}\$\+<=>\^~\|]+"),
    SplitStep::Regex(GPT2),
    SplitStep::Regex(r"\p{N}+"),
    SplitStep::Regex("[0-9][0-9][0-9]"),
]);

/// Pre-tokenizer names and their specs, grouped as llama.cpp groups them.
const PRE_TOKENIZERS: &[(&[&str], PreTokenizerSpec)] = &[
    (&["default"], DEFAULT),
    (
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        spec(&[SplitStep::Gpt2]),
    ),
    (
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
        spec(&[SplitStep::IndividualDigits, SplitStep::Gpt2]),
    ),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
        ],
        spec_with_bos(&[SplitStep::Regex(LLAMA3)], true),
    ),
    (
        &["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"],
        spec(&[SplitStep::Regex(LLAMA3)]),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "megrez",
            "stablelm2",
            "hunyuan",
        ],
        spec(&[SplitStep::Regex(QWEN2)]),
    ),
    (
        &["falcon"],
        spec(&[
            SplitStep::Regex(r"[\p{P}\$\+<=>\^~\|`]+"),
            SplitStep::Regex(GPT2),
            SplitStep::Regex("[0-9][0-9][0-9]"),
        ]),
    ),
    (
        &["deepseek-coder"],
        spec(&[
            SplitStep::Regex(r"[\r\n]"),
            SplitStep::Regex(r"\s?\p{L}+"),
            SplitStep::Regex(r"\s?\p{P}+"),
            SplitStep::Regex("[一-龥ࠀ-一가-퟿]+"),
            SplitStep::IndividualDigits,
        ]),
    ),
    (
        &["deepseek-v3", "hunyuan-dense"],
        spec(&[
            SplitStep::Regex(r"\p{N}{1,3}"),
            SplitStep::Regex("[一-龥぀-ゟ゠-ヿ]+"),
            SplitStep::Regex(DEEPSEEK_V3_MAIN),
        ]),
    ),
    (
        &["poro-chat", "bloom", "gpt3-finnish"],
        spec(&[SplitStep::Regex(BLOOM)]),
    ),
    (
        &["viking"],
        spec(&[SplitStep::Regex(BLOOM), SplitStep::IndividualDigits]),
    ),
    (
        &["tekken"],
        spec_with_bos(&[SplitStep::Regex(TEKKEN)], true),
    ),
    (
        &["gpt-4o", "llama4", "minimax-m2"],
        spec(&[SplitStep::Regex(GPT4O)]),
    ),
];

/// Looks up the pre-tokenizer of `tokenizer.ggml.pre`. An absent key means llama.cpp's default.
///
/// Unknown names are an error rather than llama.cpp's silent fallback to the default rules,
/// because a wrong split gives plausible but wrong token ids.
pub(crate) fn pre_tokenizer_spec(pre: Option<&str>) -> Result<PreTokenizerSpec, TokenizerError> {
    let name = pre.unwrap_or("default");
    PRE_TOKENIZERS
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, spec)| *spec)
        .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer {
            pre: name.to_owned(),
            supported: PRE_TOKENIZERS
                .iter()
                .flat_map(|(names, _)| names.iter().copied())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Builds the `Sequence` of splits followed by the byte-to-character mapping.
fn build_pre_tokenizer(spec: &PreTokenizerSpec) -> Result<PreTokenizerWrapper, TokenizerError> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.steps.len() + 1);
    let mut byte_level_regex = false;
    for step in spec.steps {
        match step {
            SplitStep::IndividualDigits => steps.push(Digits::new(true).into()),
            SplitStep::Regex(pattern) => {
                let split = Split::new(
                    SplitPattern::Regex((*pattern).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|err| TokenizerError::Build {
                    message: format!("pre-tokenizer regex {pattern:?}: {err}"),
                })?;
                steps.push(split.into());
            }
            // `ByteLevel` runs its regex itself, so it has to come last.
            SplitStep::Gpt2 => byte_level_regex = true,
        }
    }
    steps.push(ByteLevel::new(false, true, byte_level_regex).into());
    Ok(Sequence::new(steps).into())
}

/// Builds the byte-level BPE model, pre-tokenizer and decoder of a `gpt2` vocabulary. Added
/// (special and user-defined) tokens are registered by the caller.
pub(crate) fn build_byte_level(
    vocab: &GgufVocab,
    spec: &PreTokenizerSpec,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges = vocab
        .merges
        .as_ref()
        .ok_or_else(|| TokenizerError::MissingMetadata {
            key: KEY_MERGES.to_owned(),
        })?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(index, merge)| split_merge(index, merge))
        .collect::<Result<Vec<_>, _>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(&vocab.tokens), merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|err| TokenizerError::Build {
            message: format!("byte-level BPE from `{KEY_MERGES}`: {err}"),
        })?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(build_pre_tokenizer(spec).map_err(
        |err| match err {
            TokenizerError::Build { message } => TokenizerError::Build {
                message: format!("`{KEY_PRE}`: {message}"),
            },
            other => other,
        },
    )?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// Maps token strings to ids. When a string occurs twice the later id wins, as in llama.cpp.
///
/// NOTE: the earlier id of such a pair then has no entry, so it decodes to nothing.
pub(crate) fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect()
}

/// Splits a `"left right"` merge at its first space after the first byte, as llama.cpp does,
/// so that a left part that is itself a space still works.
fn split_merge(index: usize, merge: &str) -> Result<(String, String), TokenizerError> {
    merge
        .as_bytes()
        .iter()
        .skip(1)
        .position(|&byte| byte == b' ')
        .map(|at| (merge[..=at].to_owned(), merge[at + 2..].to_owned()))
        .ok_or_else(|| TokenizerError::InvalidMetadata {
            key: KEY_MERGES.to_owned(),
            reason: format!("merge {index} {merge:?} is not two tokens separated by a space"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_pre_tokenizer_builds() -> Result<(), TokenizerError> {
        for (names, spec) in PRE_TOKENIZERS {
            build_pre_tokenizer(spec).map_err(|err| TokenizerError::Build {
                message: format!("{names:?}: {err}"),
            })?;
        }
        Ok(())
    }

    #[test]
    fn unknown_pre_tokenizer_is_rejected_by_name() {
        let err = pre_tokenizer_spec(Some("made-up")).unwrap_err();
        assert!(matches!(
            &err,
            TokenizerError::UnsupportedPreTokenizer { pre, supported }
                if pre == "made-up" && supported.contains("smollm")
        ));
    }

    #[test]
    fn absent_pre_tokenizer_uses_default_rules() -> Result<(), TokenizerError> {
        let spec = pre_tokenizer_spec(None)?;
        assert_eq!(spec.steps.len(), DEFAULT.steps.len());
        Ok(())
    }

    #[test]
    fn merge_splits_at_first_inner_space() -> Result<(), TokenizerError> {
        assert_eq!(split_merge(0, "Ġ t")?, ("Ġ".to_owned(), "t".to_owned()));
        assert_eq!(split_merge(0, "  x")?, (" ".to_owned(), "x".to_owned()));
        assert!(split_merge(3, "nospace").is_err());
        Ok(())
    }
}
