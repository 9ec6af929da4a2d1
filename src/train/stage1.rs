//! The `rewards` job: scores every selected pair that the output file does not already hold
//! and appends one record per pair.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::model::Llama;
use crate::tokenizer::Tokenizer;

use super::data::PreferencePair;
use super::faces::Faces;
use super::reward_file::{open_for_append, RewardFileError};
use super::rewards::{nonzero_fraction, ResponseSign, RewardParams};
use super::scoring::{score_pair, PairOutcome, ScoringError};

/// A scoring job: the model, faces, pairs and output file.
pub struct RewardsJob<'a> {
    /// The patient.
    pub model: &'a Llama,
    /// The patient's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The face instructions.
    pub faces: &'a Faces,
    /// `ε`, `τ` and `θ`. `θ` only affects the reported fraction of non-zero rewards, because
    /// records store scores.
    pub params: RewardParams,
    /// The pairs to score, already split and limited.
    pub pairs: Vec<PreferencePair>,
    /// The JSONL output, appended to.
    pub out: PathBuf,
    /// Skip pairs whose prompt, templated without a face, has more tokens than this.
    pub max_prompt_tokens: Option<usize>,
}

/// Counts reported at the end of a `rewards` run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardsSummary {
    /// Pairs scored by this run.
    pub scored: usize,
    /// Pairs skipped because the output already held them.
    pub already_done: usize,
    /// Pairs skipped by this run, by reason (see [`super::scoring::PairSkip::kind`]).
    pub skipped: BTreeMap<&'static str, usize>,
    /// Responses cut at the end to fit the context window.
    pub truncated_responses: usize,
    /// Records in the output after the run.
    pub records_in_file: usize,
    /// Whether a partial line left by an interrupted run was dropped.
    pub partial_line_dropped: bool,
    /// The fraction of non-zero rewards over every record in the output, at the job's `θ`.
    pub nonzero_fraction: f32,
}

/// Errors of [`run_rewards`].
#[derive(Debug, thiserror::Error)]
pub enum RewardsJobError {
    /// The output file could not be read or written.
    #[error(transparent)]
    File(#[from] RewardFileError),
    /// Scoring a pair failed.
    #[error("failed to score pair `{pair_id}`: {source}")]
    Scoring {
        /// The pair.
        pair_id: String,
        /// The error.
        source: Box<ScoringError>,
    },
}

/// Runs the job. `on_pair` is called after each pair, scored or not, with the number of pairs
/// handled so far.
pub fn run_rewards(
    job: RewardsJob<'_>,
    on_pair: &mut dyn FnMut(usize),
) -> Result<RewardsSummary, RewardsJobError> {
    let (mut writer, existing) = open_for_append(&job.out)?;
    let done = existing.pair_ids();
    let mut summary = RewardsSummary {
        partial_line_dropped: existing.partial_line_dropped,
        ..RewardsSummary::default()
    };
    let mut rewards: Vec<f32> = Vec::new();
    for record in &existing.records {
        rewards.extend(
            record
                .chosen
                .rewards(ResponseSign::Chosen, job.params.theta),
        );
        rewards.extend(
            record
                .rejected
                .rewards(ResponseSign::Rejected, job.params.theta),
        );
    }
    let mut records_in_file = existing.records.len();

    for (index, pair) in job.pairs.iter().enumerate() {
        if done.contains(&pair.id) {
            summary.already_done += 1;
            on_pair(index + 1);
            continue;
        }
        let outcome = score_pair(
            job.model,
            job.tokenizer,
            job.faces,
            pair,
            &job.params,
            job.max_prompt_tokens,
        )
        .map_err(|source| RewardsJobError::Scoring {
            pair_id: pair.id.clone(),
            source: Box::new(source),
        })?;
        match outcome {
            PairOutcome::Scored {
                record,
                truncated_responses,
            } => {
                writer.append(&record)?;
                rewards.extend(
                    record
                        .chosen
                        .rewards(ResponseSign::Chosen, job.params.theta),
                );
                rewards.extend(
                    record
                        .rejected
                        .rewards(ResponseSign::Rejected, job.params.theta),
                );
                summary.scored += 1;
                summary.truncated_responses += truncated_responses;
                records_in_file += 1;
            }
            PairOutcome::Skipped(skip) => {
                tracing::debug!(pair = %pair.id, reason = ?skip, "skipping pair");
                *summary.skipped.entry(skip.kind()).or_insert(0) += 1;
            }
        }
        on_pair(index + 1);
    }
    summary.records_in_file = records_in_file;
    summary.nonzero_fraction = nonzero_fraction(&rewards);
    tracing::info!(
        scored = summary.scored,
        records = records_in_file,
        nonzero_fraction = summary.nonzero_fraction,
        "rewards done"
    );
    Ok(summary)
}
