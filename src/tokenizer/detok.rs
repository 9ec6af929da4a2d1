//! Streaming detokenization: token ids in, UTF-8-safe text deltas out.

use std::sync::Arc;

use super::{Tokenizer, TokenizerError};

/// Turns token ids, pushed one at a time, into text deltas.
///
/// Decoding a token alone is wrong in two ways: a byte-level token can hold part of a UTF-8
/// character, and some decoders (SentencePiece's leading-space strip) depend on the tokens
/// around it. So each push decodes a window that starts with tokens already emitted, and
/// emits the text that the window adds beyond them. While that text ends in U+FFFD (an
/// incomplete UTF-8 sequence), nothing is emitted and the window grows.
///
/// The deltas concatenate to [`Tokenizer::decode`] of all pushed ids whenever decoding a
/// longer sequence only appends to the text of a shorter one. Byte-level vocabularies always
/// behave so. A byte-fallback vocabulary does not when its byte tokens form invalid UTF-8,
/// because it then decodes every byte of the run as U+FFFD. In that case the text after the
/// last shared prefix is emitted, since text already sent cannot be retracted.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    /// The decode window: ids already emitted (`..emitted`), then ids still pending.
    window: Vec<u32>,
    /// How many ids at the start of `window` have had their text emitted.
    emitted: usize,
    /// The decoded text of `window[..emitted]`.
    emitted_text: String,
}

impl IncrementalDetokenizer {
    /// Creates a detokenizer for a new sequence of generated ids.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            window: Vec::new(),
            emitted: 0,
            emitted_text: String::new(),
        }
    }

    /// Adds one token id and returns the text that became complete, if any.
    ///
    /// Returns [`TokenizerError::UnknownTokenId`] for an id outside the vocabulary, and leaves
    /// the detokenizer unchanged.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.window.push(id);
        let text = match self.tokenizer.decode(&self.window) {
            Ok(text) => text,
            Err(err) => {
                self.window.pop();
                return Err(err);
            }
        };
        if text.len() <= self.emitted_text.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }

        let delta = text[shared_prefix_len(&self.emitted_text, &text)..].to_owned();
        // The next window starts at the ids just emitted, because the next token's decoding may
        // depend on them. Older ids are no longer needed.
        self.window.drain(..self.emitted);
        self.emitted = self.window.len();
        self.emitted_text = self.tokenizer.decode(&self.window)?;
        Ok(Some(delta))
    }

    /// Returns the text still held back (an incomplete UTF-8 sequence decodes to U+FFFD here)
    /// and resets the detokenizer for a new sequence.
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        let text = self.tokenizer.decode(&self.window)?;
        let start = shared_prefix_len(&self.emitted_text, &text);
        self.window.clear();
        self.emitted = 0;
        self.emitted_text.clear();
        Ok((start < text.len()).then(|| text[start..].to_owned()))
    }
}

/// Returns the byte length of the longest common prefix of `a` and `b` that ends on a character
/// boundary of both.
fn shared_prefix_len(a: &str, b: &str) -> usize {
    if b.starts_with(a) {
        return a.len();
    }
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((at, _), _)| at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_fixtures::tiny_byte_level;

    fn stream(
        detok: &mut IncrementalDetokenizer,
        ids: &[u32],
    ) -> Result<Vec<String>, TokenizerError> {
        let mut deltas = Vec::new();
        for &id in ids {
            deltas.extend(detok.push(id)?);
        }
        deltas.extend(detok.finish()?);
        Ok(deltas)
    }

    #[test]
    fn multibyte_character_waits_for_its_last_byte() -> Result<(), TokenizerError> {
        let tokenizer = Arc::new(tiny_byte_level());
        // "é" is C3 A9 and "🙂" is F0 9F 99 82. Each byte is one token because the fixture has
        // no merges for them.
        let ids = tokenizer.encode("aé🙂b", super::super::SpecialTokens::AsText)?;
        assert_eq!(ids.len(), 1 + 2 + 4 + 1);

        let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
        let outputs: Vec<Option<String>> = ids
            .iter()
            .map(|&id| detok.push(id))
            .collect::<Result<_, _>>()?;
        let expected = [
            Some("a"),
            None,
            Some("é"),
            None,
            None,
            None,
            Some("🙂"),
            Some("b"),
        ];
        assert_eq!(
            outputs,
            expected.map(|s| s.map(str::to_owned)).to_vec(),
            "deltas per pushed id"
        );
        assert_eq!(detok.finish()?, None);
        Ok(())
    }

    #[test]
    fn deltas_concatenate_to_full_decode() -> Result<(), TokenizerError> {
        let tokenizer = Arc::new(tiny_byte_level());
        let text = "<|im_start|>hello 日本語 🚀 world<|im_end|>";
        let ids = tokenizer.encode(text, super::super::SpecialTokens::Parse)?;
        let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
        let joined: String = stream(&mut detok, &ids)?.concat();
        assert_eq!(joined, tokenizer.decode(&ids)?);
        assert_eq!(joined, text);
        Ok(())
    }

    #[test]
    fn truncated_character_is_flushed_by_finish() -> Result<(), TokenizerError> {
        let tokenizer = Arc::new(tiny_byte_level());
        let ids = tokenizer.encode("x🙂", super::super::SpecialTokens::AsText)?;
        let cut = &ids[..ids.len() - 1];
        let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
        let deltas = stream(&mut detok, cut)?;
        assert_eq!(deltas, vec!["x".to_owned(), "\u{FFFD}".to_owned()]);
        assert_eq!(deltas.concat(), tokenizer.decode(cut)?);
        Ok(())
    }

    #[test]
    fn unknown_id_is_rejected_without_losing_state() -> Result<(), TokenizerError> {
        let tokenizer = Arc::new(tiny_byte_level());
        let ids = tokenizer.encode("ab", super::super::SpecialTokens::AsText)?;
        let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
        assert_eq!(detok.push(ids[0])?, Some("a".to_owned()));
        let err = detok.push(1_000_000).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::UnknownTokenId { id: 1_000_000, .. }
        ));
        assert_eq!(detok.push(ids[1])?, Some("b".to_owned()));
        Ok(())
    }

    #[test]
    fn finish_resets_for_next_sequence() -> Result<(), TokenizerError> {
        let tokenizer = Arc::new(tiny_byte_level());
        let ids = tokenizer.encode("hi", super::super::SpecialTokens::AsText)?;
        let mut detok = IncrementalDetokenizer::new(tokenizer.clone());
        assert_eq!(stream(&mut detok, &ids)?.concat(), "hi");
        assert_eq!(stream(&mut detok, &ids)?.concat(), "hi");
        Ok(())
    }

    #[test]
    fn shared_prefix_stops_at_char_boundary() {
        assert_eq!(shared_prefix_len("ab", "abc"), 2);
        assert_eq!(shared_prefix_len("aé", "aè"), 1);
        assert_eq!(shared_prefix_len("abc", "ab"), 2);
    }
}
