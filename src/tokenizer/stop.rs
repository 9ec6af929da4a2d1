//! Stop strings: cutting generated text at the first stop string without ever emitting part of
//! one.

/// The result of feeding one text delta to a [`StopMatcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string has matched. `text` is safe to emit now (it may be empty); a suffix that
    /// could still begin a stop string is held back.
    Continue {
        /// Text to emit.
        text: String,
    },
    /// A stop string matched. `text` is the not yet emitted text before it; generation ends.
    Stopped {
        /// Text to emit before ending.
        text: String,
        /// Index of the matched string in the list given to [`StopMatcher::new`].
        stop_index: usize,
    },
}

/// Finds stop strings in streamed text.
///
/// The first stop string to be completed wins: among matches, the one that ends earliest, and of
/// those the one that starts earliest. This is what a character-by-character scan finds, so the
/// outcome does not depend on how the text is cut into deltas.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released because it could be the start of a stop string.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// Creates a matcher for `stops`. Empty strings are ignored, because they would match
    /// before any text.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        Self {
            stops: stops.into_iter().map(Into::into).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Returns the stop strings, in the order given to [`StopMatcher::new`].
    pub fn stop_strings(&self) -> &[String] {
        &self.stops
    }

    /// Returns whether a stop string has matched. Later deltas are then ignored.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next text delta.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::Continue {
                text: String::new(),
            };
        }
        let mut buffer = std::mem::take(&mut self.pending);
        buffer.push_str(delta);

        if let Some((start, stop_index)) = self.first_completed_match(&buffer) {
            self.stopped = true;
            buffer.truncate(start);
            return StopOutcome::Stopped {
                text: buffer,
                stop_index,
            };
        }

        let keep_from = self.pending_suffix_start(&buffer);
        self.pending = buffer.split_off(keep_from);
        StopOutcome::Continue { text: buffer }
    }

    /// Releases the held-back text when generation ends for another reason (a stop token or
    /// the length limit). Returns an empty string after a stop string matched.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Finds the match that ends first in `text` (of those, the one that starts first) and
    /// returns its start and stop index.
    fn first_completed_match(&self, text: &str) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter(|(_, stop)| !stop.is_empty())
            .filter_map(|(index, stop)| {
                text.find(stop.as_str())
                    .map(|start| (start + stop.len(), start, index))
            })
            .min()
            .map(|(_, start, index)| (start, index))
    }

    /// Returns where the longest suffix of `text` that is a proper prefix of a stop string
    /// begins, or `text.len()` when there is none.
    fn pending_suffix_start(&self, text: &str) -> usize {
        text.char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let suffix = &text[at..];
                self.stops
                    .iter()
                    .any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
            })
            .unwrap_or(text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cont(text: &str) -> StopOutcome {
        StopOutcome::Continue {
            text: text.to_owned(),
        }
    }

    fn stopped(text: &str, stop_index: usize) -> StopOutcome {
        StopOutcome::Stopped {
            text: text.to_owned(),
            stop_index,
        }
    }

    #[test]
    fn stop_inside_one_delta() {
        let mut matcher = StopMatcher::new(["END"]);
        assert_eq!(matcher.push("abc ENDxyz"), stopped("abc ", 0));
        assert!(matcher.is_stopped());
        assert_eq!(matcher.push("more"), cont(""));
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn stop_across_deltas() {
        let mut matcher = StopMatcher::new(["</answer>"]);
        assert_eq!(matcher.push("42 </"), cont("42 "));
        assert_eq!(matcher.push("ans"), cont(""));
        assert_eq!(matcher.push("wer>tail"), stopped("", 0));
    }

    #[test]
    fn false_start_is_released() {
        let mut matcher = StopMatcher::new(["STOP"]);
        assert_eq!(matcher.push("a ST"), cont("a "));
        assert_eq!(matcher.push("O"), cont(""));
        assert_eq!(matcher.push("P"), stopped("", 0));

        let mut matcher = StopMatcher::new(["STOP"]);
        assert_eq!(matcher.push("a ST"), cont("a "));
        assert_eq!(matcher.push("OR"), cont("STOR"));
        assert_eq!(matcher.push("E S"), cont("E "));
        assert_eq!(matcher.finish(), "S");
    }

    #[test]
    fn held_suffix_restarts_inside_false_start() {
        // "aab" is not a stop, but its tail "ab" may start "abc".
        let mut matcher = StopMatcher::new(["aabx", "abc"]);
        assert_eq!(matcher.push("aab"), cont(""));
        assert_eq!(matcher.push("c"), stopped("a", 1));
    }

    #[test]
    fn overlapping_stops_first_completed_wins() {
        let mut matcher = StopMatcher::new(["abcd", "bc"]);
        assert_eq!(matcher.push("xabcd"), stopped("xa", 1));

        // Same end: the longer one, which starts first, so that none of it leaks.
        let mut matcher = StopMatcher::new(["bc", "abc"]);
        assert_eq!(matcher.push("xab"), cont("x"));
        assert_eq!(matcher.push("c"), stopped("", 1));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut matcher = StopMatcher::new(["日本"]);
        assert_eq!(matcher.push("é日"), cont("é"));
        assert_eq!(matcher.push("語"), cont("日語"));
        assert_eq!(matcher.push("日本"), stopped("", 0));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut matcher = StopMatcher::new(["", "z"]);
        assert_eq!(matcher.push("abc"), cont("abc"));
        assert_eq!(matcher.push("yz"), stopped("y", 1));
    }

    #[test]
    fn no_stops_releases_everything() {
        let mut matcher = StopMatcher::new(Vec::<String>::new());
        assert_eq!(matcher.push("abc"), cont("abc"));
        assert_eq!(matcher.finish(), "");
    }

    /// Feeds `chunks` and returns the emitted text and the stop index, if any.
    fn run(stops: &[String], chunks: &[String]) -> (String, Option<usize>) {
        let mut matcher = StopMatcher::new(stops.iter().cloned());
        let mut emitted = String::new();
        for chunk in chunks {
            match matcher.push(chunk) {
                StopOutcome::Continue { text } => emitted.push_str(&text),
                StopOutcome::Stopped { text, stop_index } => {
                    emitted.push_str(&text);
                    return (emitted, Some(stop_index));
                }
            }
        }
        emitted.push_str(&matcher.finish());
        (emitted, None)
    }

    proptest! {
        #[test]
        fn outcome_does_not_depend_on_chunking(
            text in "[abc]{0,24}",
            stops in prop::collection::vec("[abc]{1,4}", 1..4),
            cuts in prop::collection::vec(0usize..25, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len()).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for cut in cuts.into_iter().chain([text.len()]) {
                chunks.push(text[last..cut].to_owned());
                last = cut;
            }
            let whole = run(&stops, std::slice::from_ref(&text));
            let per_char: Vec<String> = text.chars().map(String::from).collect();
            prop_assert_eq!(&run(&stops, &chunks), &whole);
            prop_assert_eq!(&run(&stops, &per_char), &whole);

            let (emitted, stop) = whole;
            prop_assert!(text.starts_with(&emitted));
            match stop {
                None => prop_assert_eq!(&emitted, &text),
                Some(index) => {
                    prop_assert!(text[emitted.len()..].starts_with(&stops[index]));
                    // No stop string is complete within the emitted text plus the matched one,
                    // short of the matched one's end.
                    let end = emitted.len() + stops[index].len();
                    for stop in &stops {
                        prop_assert!(!text[..end - 1].contains(stop.as_str()));
                    }
                }
            }
        }
    }
}
