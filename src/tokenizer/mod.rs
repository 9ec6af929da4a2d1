//! Tokenizers, chat templates, streaming detokenization and stop strings.
//!
//! A [`Tokenizer`] is built from GGUF metadata ([`Tokenizer::from_gguf`]) or from a Hugging
//! Face model folder ([`Tokenizer::from_hf_dir`]). GGUF vocabularies are assembled so that their
//! token ids match llama.cpp's on the same file:
//! - `gpt2` vocabularies are byte-level BPE with the pre-tokenizer that `tokenizer.ggml.pre`
//!   names (see `bpe.rs` for the supported names);
//! - `llama` vocabularies are SentencePiece-style BPE with merges derived from the scores, byte
//!   fallback and `▁` for spaces (see `spm.rs`).
//!
//! Control tokens (`token_type` 3) and tokens of unknown type (2) are special: encoding with
//! [`SpecialTokens::Parse`] maps their text to their id, and [`SpecialTokens::AsText`] splits
//! their text like any other. User-defined tokens (`token_type` 4) are always matched whole, in
//! both modes, as llama.cpp does. Neither mode adds a BOS token.
//!
//! [`IncrementalDetokenizer`] turns generated ids into UTF-8-safe text deltas, and
//! [`StopMatcher`] cuts those deltas at stop strings.

mod bpe;
mod chat;
mod detok;
mod error;
mod gguf;
mod hf;
mod special;
mod spm;
mod stop;
#[cfg(test)]
pub(crate) mod test_fixtures;

use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tokenizers::AddedToken;

pub use chat::{ChatMessage, ChatTemplate, GenerationPrompt};
pub use detok::IncrementalDetokenizer;
pub use error::TokenizerError;
pub use stop::{StopMatcher, StopOutcome};

use gguf::{GgufVocab, TokenType};

/// The treatment of special-token text such as `<|im_start|>` by [`Tokenizer::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialTokens {
    /// Special-token text becomes the special token's id. Use for prompts built by a chat
    /// template.
    Parse,
    /// Special-token text is split into ordinary tokens. Use for text that users typed, so
    /// that they cannot inject control tokens.
    AsText,
}

/// The pieces that a loader passes to [`Tokenizer::assemble`].
pub(crate) struct TokenizerParts {
    /// The tokenizer with special tokens registered (it parses them).
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    add_bos: bool,
    /// Stop tokens besides EOS and the end-of-generation texts (EOT, EOM, a generation
    /// config's list).
    extra_stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

#[derive(Clone)]
enum ChatTemplateState {
    Missing,
    Ready(Box<ChatTemplate>),
    /// The model ships a template that does not compile; rendering reports this message.
    Invalid {
        message: String,
    },
}

/// A tokenizer with the model's special-token ids, stop tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    /// Encodes special-token text as the special token.
    parsing: tokenizers::Tokenizer,
    /// The same tokenizer with `encode_special_tokens` on, so special-token text is split.
    /// The flag lives inside the `tokenizers` object, hence two copies.
    literal: tokenizers::Tokenizer,
    vocab_size: usize,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    add_bos: bool,
    stop_token_ids: Vec<u32>,
    chat_template: ChatTemplateState,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("add_bos", &self.add_bos)
            .field("stop_token_ids", &self.stop_token_ids)
            .field(
                "chat_template",
                &matches!(self.chat_template, ChatTemplateState::Ready(_)),
            )
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by the `tokenizer.ggml.*` metadata of a GGUF file.
    ///
    /// Returns [`TokenizerError::MissingMetadata`] naming an absent key,
    /// [`TokenizerError::UnsupportedModel`] for a `tokenizer.ggml.model` other than `gpt2` and
    /// `llama`, and [`TokenizerError::UnsupportedPreTokenizer`] for an unknown
    /// `tokenizer.ggml.pre`. A chat template that does not compile does not fail the load; it
    /// is logged and reported by [`Tokenizer::apply_chat_template`].
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        let vocab = GgufVocab::from_content(content)?;
        Self::from_gguf_vocab(&vocab)
    }

    fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Self, TokenizerError> {
        let (mut inner, default_add_bos) = match vocab.model.as_str() {
            "gpt2" => {
                let spec = bpe::pre_tokenizer_spec(vocab.pre.as_deref())?;
                (bpe::build_byte_level(vocab, &spec)?, spec.default_add_bos)
            }
            "llama" => (spm::build_sentencepiece(vocab)?, true),
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    model: other.to_owned(),
                })
            }
        };
        register_added_tokens(&mut inner, vocab)?;

        Self::assemble(TokenizerParts {
            inner,
            bos_token_id: vocab.bos_token_id,
            eos_token_id: vocab.eos_token_id,
            add_bos: vocab.add_bos_token.unwrap_or(default_add_bos),
            extra_stop_ids: [vocab.eot_token_id, vocab.eom_token_id]
                .into_iter()
                .flatten()
                .collect(),
            chat_template: vocab.chat_template.clone(),
        })
    }

    /// Loads a tokenizer from a Hugging Face model folder: `tokenizer.json`, plus
    /// `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, `add_bos_token`),
    /// `chat_template.jinja` and `generation_config.json` (`eos_token_id`) when present.
    ///
    /// When `add_bos_token` is absent, BOS counts as added if `tokenizer.json`'s
    /// post-processor adds it. Returns [`TokenizerError::MissingFile`] with the path when
    /// `tokenizer.json` is absent.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::assemble(hf::load_dir(dir)?)
    }

    fn assemble(parts: TokenizerParts) -> Result<Self, TokenizerError> {
        let mut parsing = parts.inner;
        // A tokenizer.json may carry truncation or padding settings meant for training.
        parsing
            .with_truncation(None)
            .map_err(|err| TokenizerError::Build {
                message: err.to_string(),
            })?;
        parsing.with_padding(None);
        let mut literal = parsing.clone();
        literal.set_encode_special_tokens(true);

        let vocab_size = parsing
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |max_id| max_id as usize + 1);
        let stop_token_ids = special::stop_token_ids(
            &parsing,
            parts.eos_token_id.into_iter().chain(parts.extra_stop_ids),
        );

        let token_text = |id: Option<u32>| id.and_then(|id| parsing.id_to_token(id));
        let chat_template = match parts.chat_template {
            None => ChatTemplateState::Missing,
            Some(source) => match ChatTemplate::new(
                &source,
                token_text(parts.bos_token_id).as_deref(),
                token_text(parts.eos_token_id).as_deref(),
            ) {
                Ok(template) => ChatTemplateState::Ready(Box::new(template)),
                Err(err) => {
                    tracing::warn!(error = %err, "the model's chat template does not compile; chat requests will fail");
                    ChatTemplateState::Invalid {
                        message: match err {
                            TokenizerError::ChatTemplateSyntax { message } => message,
                            other => other.to_string(),
                        },
                    }
                }
            },
        };

        Ok(Self {
            parsing,
            literal,
            vocab_size,
            bos_token_id: parts.bos_token_id,
            eos_token_id: parts.eos_token_id,
            add_bos: parts.add_bos,
            stop_token_ids,
            chat_template,
        })
    }

    /// Replaces the chat template, for example by one given in the server configuration.
    pub fn with_chat_template(mut self, template: ChatTemplate) -> Self {
        self.chat_template = ChatTemplateState::Ready(Box::new(template));
        self
    }

    /// Encodes `text` into token ids. Never adds BOS, so callers add it when
    /// [`Tokenizer::add_bos`] returns true.
    pub fn encode(&self, text: &str, special: SpecialTokens) -> Result<Vec<u32>, TokenizerError> {
        let tokenizer = match special {
            SpecialTokens::Parse => &self.parsing,
            SpecialTokens::AsText => &self.literal,
        };
        let encoding =
            tokenizer
                .encode_fast(text, false)
                .map_err(|err| TokenizerError::Encode {
                    message: err.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes token ids into text. Special tokens are not skipped: they decode to their text.
    ///
    /// Returns [`TokenizerError::UnknownTokenId`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.parsing
            .decode(ids, false)
            .map_err(|err| TokenizerError::Decode {
                message: err.to_string(),
            })
    }

    /// Returns the number of token ids, which is one more than the largest id (added tokens
    /// included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Returns the token string of every id, indexed by id, in the vocabulary's own spelling (`Ġthe`,
    /// `▁the`). An id without a token gets an empty string. Two models with equal tables
    /// tokenize identically only if their merges and pre-tokenizers also match, but different
    /// tables always mean incompatible vocabularies.
    pub fn token_table(&self) -> Vec<String> {
        (0..self.vocab_size as u32)
            .map(|id| self.parsing.id_to_token(id).unwrap_or_default())
            .collect()
    }

    /// Returns the vocabulary's spelling of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.parsing.id_to_token(id)
    }

    /// Returns the BOS (beginning of sequence) token id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Returns whether the model expects BOS in front of a prompt that does not already start
    /// with it.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Returns the EOS (end of sequence) token id, if the model has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Returns the sorted token ids on which generation always stops. They are the EOS, EOT and
    /// EOM ids of the metadata and a `generation_config.json`'s EOS list. They also include
    /// every vocabulary token whose text ends a turn in a common chat format (`<|im_end|>`,
    /// `<|eot_id|>`, `<|end|>`, `<end_of_turn>`, `</s>`, `<|endoftext|>` and the others of
    /// llama.cpp's list).
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// Returns the chat template, if the model has one that compiles.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match &self.chat_template {
            ChatTemplateState::Ready(template) => Some(template),
            _ => None,
        }
    }

    /// Renders `messages` with the model's chat template.
    ///
    /// Returns [`TokenizerError::MissingChatTemplate`] when the model has none, and
    /// [`TokenizerError::ChatTemplateSyntax`] when its template does not compile.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        generation_prompt: GenerationPrompt,
    ) -> Result<String, TokenizerError> {
        match &self.chat_template {
            ChatTemplateState::Ready(template) => template.render(messages, generation_prompt),
            ChatTemplateState::Missing => Err(TokenizerError::MissingChatTemplate),
            ChatTemplateState::Invalid { message } => Err(TokenizerError::ChatTemplateSyntax {
                message: message.clone(),
            }),
        }
    }
}

/// Registers the tokens that are matched whole before BPE runs: control and unknown-type tokens
/// (and end-of-generation texts of any type) as special tokens, user-defined tokens as plain
/// added tokens. Their text is matched in the raw input, before normalization.
fn register_added_tokens(
    tokenizer: &mut tokenizers::Tokenizer,
    vocab: &GgufVocab,
) -> Result<(), TokenizerError> {
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (text, kind) in vocab.tokens.iter().zip(&vocab.token_types) {
        if matches!(kind, TokenType::Control | TokenType::Unknown)
            || special::is_end_of_generation_text(text)
        {
            special.push(AddedToken::from(text.clone(), true).normalized(false));
        } else if *kind == TokenType::UserDefined {
            user_defined.push(AddedToken::from(text.clone(), false).normalized(false));
        }
    }
    let build_error = |err: tokenizers::Error| TokenizerError::Build {
        message: format!("registering added tokens: {err}"),
    };
    tokenizer.add_special_tokens(special).map_err(build_error)?;
    tokenizer.add_tokens(user_defined).map_err(build_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::gguf_file::Value;

    use super::test_fixtures::*;
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn set(metadata: &mut Vec<(&'static str, Value)>, key: &'static str, value: Value) {
        metadata.retain(|(k, _)| *k != key);
        metadata.push((key, value));
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Tokenizer>();
        shareable::<IncrementalDetokenizer>();
    }

    #[test]
    fn byte_level_applies_merges() -> TestResult {
        let tokenizer = tiny_byte_level();
        let hello = 3 + 256 + 3; // "hello" is the fourth merged token
        let world = 3 + 256 + 8;
        assert_eq!(
            tokenizer.encode("hello world", SpecialTokens::AsText)?,
            vec![hello, world]
        );
        Ok(())
    }

    #[test]
    fn special_tokens_parse_or_split() -> TestResult {
        let tokenizer = tiny_byte_level();
        let parsed = tokenizer.encode("<|im_start|>hello", SpecialTokens::Parse)?;
        assert_eq!(parsed[0], 1);
        assert_eq!(parsed.len(), 2);

        let literal = tokenizer.encode("<|im_start|>", SpecialTokens::AsText)?;
        let bytes: Vec<u32> = "<|im_start|>"
            .bytes()
            .map(|b| BYTE_BASE + u32::from(b))
            .collect();
        assert_eq!(literal, bytes);
        assert_eq!(tokenizer.decode(&literal)?, "<|im_start|>");
        assert_eq!(tokenizer.decode(&parsed)?, "<|im_start|>hello");
        Ok(())
    }

    #[test]
    fn digits_are_split_one_by_one() -> TestResult {
        let tokenizer = tiny_byte_level();
        let ids = tokenizer.encode("a 123", SpecialTokens::AsText)?;
        let expected: Vec<u32> = "a 123".bytes().map(|b| BYTE_BASE + u32::from(b)).collect();
        assert_eq!(ids, expected);
        Ok(())
    }

    #[test]
    fn special_ids_and_stop_tokens() {
        let tokenizer = tiny_byte_level();
        assert_eq!(tokenizer.bos_token_id(), Some(1));
        assert_eq!(tokenizer.eos_token_id(), Some(2));
        assert!(!tokenizer.add_bos());
        // EOS plus <|endoftext|>, which ends generation in any vocabulary that has it.
        assert_eq!(tokenizer.stop_token_ids(), &[0, 2]);
        assert_eq!(tokenizer.vocab_size(), 3 + 256 + 9);
        let table = tokenizer.token_table();
        assert_eq!(table.len(), tokenizer.vocab_size());
        assert_eq!(table[1], "<|im_start|>");
        assert_eq!(table[(BYTE_BASE + u32::from(b' ')) as usize], "Ġ");
        assert_eq!(tokenizer.id_to_token(3 + 256 + 3).as_deref(), Some("hello"));
    }

    #[test]
    fn decode_rejects_out_of_range_id() {
        let tokenizer = tiny_byte_level();
        let err = tokenizer.decode(&[5, 9999]).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::UnknownTokenId {
                id: 9999,
                vocab_size: 268
            }
        ));
    }

    #[test]
    fn missing_merges_are_named() {
        let mut metadata = byte_level_metadata();
        metadata.retain(|(k, _)| *k != "tokenizer.ggml.merges");
        let err = Tokenizer::from_gguf(&content(metadata)).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::MissingMetadata { key } if key == "tokenizer.ggml.merges"),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer.ggml.merges"));
    }

    #[test]
    fn missing_tokens_are_named() {
        let err = Tokenizer::from_gguf(&content(vec![(
            "tokenizer.ggml.model",
            Value::String("gpt2".to_owned()),
        )]))
        .unwrap_err();
        assert!(
            matches!(&err, TokenizerError::MissingMetadata { key } if key == "tokenizer.ggml.tokens")
        );
    }

    #[test]
    fn unsupported_model_is_named() {
        let mut metadata = byte_level_metadata();
        set(
            &mut metadata,
            "tokenizer.ggml.model",
            Value::String("bert".to_owned()),
        );
        let err = Tokenizer::from_gguf(&content(metadata)).unwrap_err();
        assert!(matches!(&err, TokenizerError::UnsupportedModel { model } if model == "bert"));
        assert!(err.to_string().contains("`bert`"));
    }

    #[test]
    fn token_type_length_mismatch_is_rejected() {
        let mut metadata = byte_level_metadata();
        set(
            &mut metadata,
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1)]),
        );
        let err = Tokenizer::from_gguf(&content(metadata)).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::InvalidMetadata { key, .. } if key == "tokenizer.ggml.token_type")
        );
    }

    #[test]
    fn user_defined_tokens_match_in_both_modes() -> TestResult {
        let mut metadata = byte_level_metadata();
        let mut types: Vec<Value> = vec![Value::I32(3); 3];
        types.extend(std::iter::repeat_n(Value::I32(1), 256 + 9));
        // Make "hello" (a merged token) user-defined.
        types[3 + 256 + 3] = Value::I32(4);
        set(
            &mut metadata,
            "tokenizer.ggml.token_type",
            Value::Array(types),
        );
        let tokenizer = Tokenizer::from_gguf(&content(metadata))?;
        let hello = 3 + 256 + 3;
        // Matched whole even inside a word, where the merges would not see it.
        for mode in [SpecialTokens::Parse, SpecialTokens::AsText] {
            let ids = tokenizer.encode("xhello", mode)?;
            assert_eq!(ids, vec![BYTE_BASE + u32::from(b'x'), hello], "{mode:?}");
        }
        Ok(())
    }

    #[test]
    fn broken_chat_template_fails_only_chat() -> TestResult {
        let mut metadata = byte_level_metadata();
        metadata.push((
            "tokenizer.chat_template",
            Value::String("{% if %}".to_owned()),
        ));
        let tokenizer = Tokenizer::from_gguf(&content(metadata))?;
        assert!(tokenizer.chat_template().is_none());
        let err = tokenizer
            .apply_chat_template(&[ChatMessage::new("user", "hi")], GenerationPrompt::Add)
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::ChatTemplateSyntax { .. }),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn missing_chat_template_is_reported() {
        let err = tiny_byte_level()
            .apply_chat_template(&[ChatMessage::new("user", "hi")], GenerationPrompt::Add)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::MissingChatTemplate));
    }

    #[test]
    fn gguf_chat_template_gets_token_texts() -> TestResult {
        let mut metadata = byte_level_metadata();
        metadata.push((
            "tokenizer.chat_template",
            Value::String("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}".to_owned()),
        ));
        let tokenizer = Tokenizer::from_gguf(&content(metadata))?;
        let text = tokenizer
            .apply_chat_template(&[ChatMessage::new("user", "hi")], GenerationPrompt::Add)?;
        assert_eq!(text, "<|im_start|>hi<|im_end|>");
        Ok(())
    }

    /// Builds a SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, 256 byte tokens, then pieces.
    fn sentencepiece_metadata() -> Vec<(&'static str, Value)> {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(str::to_owned).to_vec();
        let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
        let mut scores = vec![0.0f32; 3];
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            types.push(Value::I32(6));
            scores.push(0.0);
        }
        // Higher score = merged earlier. "ll" beats "lo", so "llo" splits as "ll" + "o".
        let pieces: [(&str, f32); 10] = [
            ("▁", -5.0),
            ("h", -6.0),
            ("e", -6.0),
            ("l", -6.0),
            ("o", -6.0),
            ("he", -2.0),
            ("▁he", -1.0),
            ("ll", -3.0),
            ("lo", -3.5),
            ("▁lo", -7.0),
        ];
        for (piece, score) in pieces {
            tokens.push(piece.to_owned());
            types.push(Value::I32(1));
            scores.push(score);
        }
        vec![
            ("tokenizer.ggml.model", Value::String("llama".to_owned())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]
    }

    /// Returns the id of a piece in [`sentencepiece_metadata`].
    fn piece(name: &str) -> u32 {
        let pieces = ["▁", "h", "e", "l", "o", "he", "▁he", "ll", "lo", "▁lo"];
        259 + pieces
            .iter()
            .position(|p| *p == name)
            .expect("fixture piece") as u32
    }

    fn byte(value: u8) -> u32 {
        3 + u32::from(value)
    }

    #[test]
    fn sentencepiece_merges_by_score() -> TestResult {
        let tokenizer = Tokenizer::from_gguf(&content(sentencepiece_metadata()))?;
        assert_eq!(
            tokenizer.encode("hello", SpecialTokens::AsText)?,
            vec![piece("▁he"), piece("ll"), piece("o")]
        );
        // "▁lo" has the lowest score but is still reached: "lo" merges first, then "▁" + "lo".
        assert_eq!(
            tokenizer.encode("he lo", SpecialTokens::AsText)?,
            vec![piece("▁he"), piece("▁lo")]
        );
        Ok(())
    }

    #[test]
    fn sentencepiece_falls_back_to_bytes() -> TestResult {
        let tokenizer = Tokenizer::from_gguf(&content(sentencepiece_metadata()))?;
        let ids = tokenizer.encode("hé", SpecialTokens::AsText)?;
        assert_eq!(ids, vec![piece("▁"), piece("h"), byte(0xC3), byte(0xA9)]);
        assert_eq!(tokenizer.decode(&ids)?, "hé");
        Ok(())
    }

    #[test]
    fn sentencepiece_decode_drops_prefix_space() -> TestResult {
        let tokenizer = Tokenizer::from_gguf(&content(sentencepiece_metadata()))?;
        let ids = tokenizer.encode("he lo hello", SpecialTokens::AsText)?;
        assert_eq!(tokenizer.decode(&ids)?, "he lo hello");
        Ok(())
    }

    #[test]
    fn sentencepiece_special_tokens() -> TestResult {
        let tokenizer = Tokenizer::from_gguf(&content(sentencepiece_metadata()))?;
        // The text after a special token gets its own prefix space, as in llama.cpp.
        assert_eq!(
            tokenizer.encode("<s>hello", SpecialTokens::Parse)?,
            vec![1, piece("▁he"), piece("ll"), piece("o")]
        );
        assert_eq!(
            tokenizer.encode("<s>", SpecialTokens::AsText)?,
            vec![piece("▁"), byte(b'<'), byte(b's'), byte(b'>')]
        );
        assert!(
            tokenizer.add_bos(),
            "SentencePiece models add BOS unless told otherwise"
        );
        assert_eq!(tokenizer.stop_token_ids(), &[2]);
        Ok(())
    }

    #[test]
    fn sentencepiece_without_space_prefix() -> TestResult {
        let mut metadata = sentencepiece_metadata();
        metadata.push(("tokenizer.ggml.add_space_prefix", Value::Bool(false)));
        metadata.push(("tokenizer.ggml.add_bos_token", Value::Bool(false)));
        let tokenizer = Tokenizer::from_gguf(&content(metadata))?;
        let ids = tokenizer.encode("hello", SpecialTokens::AsText)?;
        assert_eq!(ids, vec![piece("he"), piece("ll"), piece("o")]);
        assert_eq!(tokenizer.decode(&[piece("▁he")])?, " he");
        assert!(!tokenizer.add_bos());
        Ok(())
    }

    #[test]
    fn sentencepiece_requires_scores() {
        let mut metadata = sentencepiece_metadata();
        metadata.retain(|(k, _)| *k != "tokenizer.ggml.scores");
        let err = Tokenizer::from_gguf(&content(metadata)).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::MissingMetadata { key } if key == "tokenizer.ggml.scores")
        );
    }

    #[test]
    fn sentencepiece_stream_keeps_spaces() -> TestResult {
        let tokenizer = Arc::new(Tokenizer::from_gguf(&content(sentencepiece_metadata()))?);
        let ids = tokenizer.encode("he lo hé", SpecialTokens::AsText)?;
        let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
        let mut text = String::new();
        for id in &ids {
            text.extend(detok.push(*id)?);
        }
        text.extend(detok.finish()?);
        assert_eq!(text, "he lo hé");
        Ok(())
    }

    #[test]
    fn hf_dir_without_tokenizer_json_names_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
        let expected = dir.path().join("tokenizer.json");
        assert!(matches!(&err, TokenizerError::MissingFile { path } if *path == expected));
        assert!(err.to_string().contains("tokenizer.json"));
    }

    #[test]
    fn hf_dir_reads_config_files() -> TestResult {
        let dir = tempfile::tempdir()?;
        tiny_byte_level()
            .parsing
            .save(dir.path().join("tokenizer.json"), false)
            .map_err(|err| err.to_string())?;
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{
                "bos_token": {"content": "<|im_start|>", "special": true},
                "eos_token": "<|im_end|>",
                "add_bos_token": true,
                "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
            }"#,
        )?;
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [2, 7]}"#,
        )?;

        let tokenizer = Tokenizer::from_hf_dir(dir.path())?;
        assert_eq!(tokenizer.bos_token_id(), Some(1));
        assert_eq!(tokenizer.eos_token_id(), Some(2));
        assert!(tokenizer.add_bos());
        assert_eq!(tokenizer.stop_token_ids(), &[0, 2, 7]);
        let text = tokenizer
            .apply_chat_template(&[ChatMessage::new("user", "hi")], GenerationPrompt::Add)?;
        assert_eq!(text, "<|im_start|>hi");
        assert_eq!(
            tokenizer.encode("<|im_end|>", SpecialTokens::Parse)?,
            vec![2]
        );
        assert_eq!(
            tokenizer.encode("<|im_end|>", SpecialTokens::AsText)?.len(),
            10
        );

        // A chat_template.jinja file wins over the config key.
        std::fs::write(dir.path().join("chat_template.jinja"), "from file")?;
        let tokenizer = Tokenizer::from_hf_dir(dir.path())?;
        assert_eq!(
            tokenizer.apply_chat_template(&[], GenerationPrompt::Add)?,
            "from file"
        );
        Ok(())
    }
}
