//! Choosing which pairs of a file a command uses: a side of a reproducible split by prompt,
//! then at most a given number of them.

use super::data::{split_by_prompt, DataError, PreferencePair};

/// The part of a split by prompt that a command uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitSide {
    /// Every pair; no split.
    All,
    /// The training side.
    Train,
    /// The held-out validation side.
    Validation,
}

/// A split by prompt and a cap on the number of pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairSelection {
    /// Which side of the split to keep.
    pub side: SplitSide,
    /// The share of pairs held out for validation, in `[0, 1)`.
    pub validation_fraction: f64,
    /// The seed that orders prompts for the split.
    pub split_seed: u64,
    /// Keep at most this many pairs, the first ones in file order.
    pub limit: Option<usize>,
}

impl Default for PairSelection {
    fn default() -> Self {
        Self {
            side: SplitSide::All,
            validation_fraction: 0.1,
            split_seed: 0,
            limit: None,
        }
    }
}

impl PairSelection {
    /// Applies the split and the limit. The same pairs, fraction and seed always select the
    /// same pairs, so `rewards`, `train` and `eval` agree on the split.
    pub fn apply(&self, pairs: Vec<PreferencePair>) -> Result<Vec<PreferencePair>, DataError> {
        let mut selected = match self.side {
            SplitSide::All => pairs,
            SplitSide::Train => {
                split_by_prompt(pairs, self.validation_fraction, self.split_seed)?.train
            }
            SplitSide::Validation => {
                split_by_prompt(pairs, self.validation_fraction, self.split_seed)?.validation
            }
        };
        if let Some(limit) = self.limit {
            selected.truncate(limit);
        }
        Ok(selected)
    }
}
