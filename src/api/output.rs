//! Pure state machines that turn engine events into OpenAI output: [`ChunkBuilder`] for
//! streams and [`Collector`] for whole responses. Both share the per-token conversion, so a
//! stream's concatenated deltas equal the non-streamed text.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::engine::request::{ChoiceEnd, Event, SteeringSummary, TokenEvent, Usage};
use crate::tokenizer::Tokenizer;

use super::error::ApiError;
use super::wire::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs, Chunk, Completion,
    CompletionChoice, CompletionChunkChoice, CompletionLogprobs, DoctorLogprob,
    DoctorTokenLogprobs, ResponseMessage, SteeringBody, SteeringDoctor, TokenLogprobBody,
    TopLogprob, UsageBody,
};

/// The endpoint whose shapes are produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `chat.completion` and `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// Fields shared by every output object of one request.
#[derive(Clone, Debug)]
pub struct OutputMeta {
    /// Request id.
    pub id: String,
    /// Unix time in seconds.
    pub created: u64,
    /// The `model` echoed back.
    pub model: String,
    /// Endpoint shapes.
    pub kind: Kind,
    /// Number of choices.
    pub n: usize,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// Doctor names in request order, for the log-probability extension.
    pub doctors: Vec<String>,
}

/// One generated token's log-probabilities, in wire form for both endpoints.
#[derive(Clone, Debug)]
struct TokenRecord {
    chat: TokenLogprobBody,
    top: BTreeMap<String, f32>,
    /// Characters of the choice's text before this token's text.
    offset: usize,
}

#[derive(Default)]
struct ChoiceState {
    text: String,
    chars: usize,
    records: Vec<TokenRecord>,
    end: Option<ChoiceEnd>,
}

/// Per-choice bookkeeping shared by both state machines.
struct Choices {
    meta: OutputMeta,
    tokenizer: Arc<Tokenizer>,
    states: Vec<ChoiceState>,
}

impl Choices {
    fn new(meta: OutputMeta, tokenizer: Arc<Tokenizer>) -> Self {
        let states = (0..meta.n).map(|_| ChoiceState::default()).collect();
        Self {
            meta,
            tokenizer,
            states,
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// Records a token; returns the choice index.
    fn push_token(&mut self, token: &TokenEvent) -> Result<usize, ApiError> {
        let record = token.logprobs.as_ref().map(|lp| {
            let text = self.token_text(token.id);
            let top: Vec<TopLogprob> = lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let token = self.token_text(id);
                    TopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob,
                    }
                })
                .collect();
            let steered = !self.meta.doctors.is_empty();
            TokenRecord {
                top: top.iter().map(|t| (t.token.clone(), t.logprob)).collect(),
                chat: TokenLogprobBody {
                    bytes: text.as_bytes().to_vec(),
                    token: text,
                    logprob: lp.logprob,
                    top_logprobs: top,
                    patient_logprob: steered.then_some(lp.patient),
                    doctor_logprobs: steered.then(|| {
                        self.meta
                            .doctors
                            .iter()
                            .zip(&lp.doctors)
                            .map(|(name, &logprob)| DoctorLogprob {
                                name: name.clone(),
                                logprob,
                            })
                            .collect()
                    }),
                },
                offset: 0,
            }
        });
        let state = self.states.get_mut(token.choice).ok_or_else(|| {
            ApiError::Internal(format!("event for unknown choice {}", token.choice))
        })?;
        if let Some(mut record) = record {
            record.offset = state.chars;
            state.records.push(record);
        }
        state.chars += token.text.chars().count();
        state.text.push_str(&token.text);
        Ok(token.choice)
    }

    fn push_end(&mut self, end: ChoiceEnd) -> Result<usize, ApiError> {
        let index = end.choice;
        let state = self
            .states
            .get_mut(index)
            .ok_or_else(|| ApiError::Internal(format!("end of unknown choice {index}")))?;
        state.chars += end.text.chars().count();
        state.text.push_str(&end.text);
        state.end = Some(end);
        Ok(index)
    }

    fn chat_logprobs(records: &[TokenRecord]) -> ChatLogprobs {
        ChatLogprobs {
            content: records.iter().map(|r| r.chat.clone()).collect(),
        }
    }

    fn completion_logprobs(records: &[TokenRecord]) -> CompletionLogprobs {
        let steered = records.iter().any(|r| r.chat.patient_logprob.is_some());
        CompletionLogprobs {
            tokens: records.iter().map(|r| r.chat.token.clone()).collect(),
            token_logprobs: records.iter().map(|r| r.chat.logprob).collect(),
            top_logprobs: records.iter().map(|r| r.top.clone()).collect(),
            text_offset: records.iter().map(|r| r.offset).collect(),
            patient_token_logprobs: steered.then(|| {
                records
                    .iter()
                    .map(|r| r.chat.patient_logprob.unwrap_or(f32::NAN))
                    .collect()
            }),
            doctor_token_logprobs: steered.then(|| doctor_token_logprobs(records)),
        }
    }
}

/// Regroups the per-token doctor log-probabilities by doctor, in request order.
fn doctor_token_logprobs(records: &[TokenRecord]) -> Vec<DoctorTokenLogprobs> {
    let names: Vec<String> = records
        .first()
        .and_then(|r| r.chat.doctor_logprobs.as_ref())
        .map(|doctors| doctors.iter().map(|d| d.name.clone()).collect())
        .unwrap_or_default();
    names
        .into_iter()
        .enumerate()
        .map(|(index, name)| DoctorTokenLogprobs {
            name,
            token_logprobs: records
                .iter()
                .map(|r| {
                    r.chat
                        .doctor_logprobs
                        .as_ref()
                        .and_then(|doctors| doctors.get(index))
                        .map_or(f32::NAN, |d| d.logprob)
                })
                .collect(),
        })
        .collect()
}

fn steering_body(summary: &Option<SteeringSummary>) -> Option<SteeringBody> {
    summary.as_ref().map(|s| SteeringBody {
        patient_alpha: s.alpha,
        doctors: s
            .doctors
            .iter()
            .map(|(name, beta)| SteeringDoctor {
                name: name.clone(),
                beta: *beta,
            })
            .collect(),
        changed_tokens: s.changed_tokens,
        measured_tokens: s.measured_tokens,
        mean_kl: s.mean_kl,
    })
}

fn usage_body(usage: Usage) -> UsageBody {
    UsageBody {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
    }
}

/// One item of a stream.
#[derive(Debug)]
pub enum StreamItem {
    /// A chunk, serialised as JSON.
    Data(String),
    /// A failure after the stream started; `[DONE]` follows.
    Error(ApiError),
    /// The end: `[DONE]` follows.
    Done,
}

/// Turns engine events into streamed chunks.
pub struct ChunkBuilder {
    choices: Choices,
    /// Records not sent yet, per choice (tokens whose text is held back).
    sent_records: Vec<usize>,
    logprobs: bool,
}

impl ChunkBuilder {
    /// Creates a builder; `logprobs` adds log-probabilities to chunks.
    pub fn new(meta: OutputMeta, tokenizer: Arc<Tokenizer>, logprobs: bool) -> Self {
        let n = meta.n;
        Self {
            choices: Choices::new(meta, tokenizer),
            sent_records: vec![0; n],
            logprobs,
        }
    }

    fn usage_field(&self) -> Option<Option<UsageBody>> {
        self.choices.meta.include_usage.then_some(None)
    }

    fn chunk<C: serde::Serialize>(
        &self,
        choices: Vec<C>,
        usage: Option<Option<UsageBody>>,
    ) -> StreamItem {
        let meta = &self.choices.meta;
        let chunk = Chunk {
            id: meta.id.clone(),
            object: match meta.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion => "text_completion",
            },
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
        };
        match serde_json::to_string(&chunk) {
            Ok(json) => StreamItem::Data(json),
            Err(err) => StreamItem::Error(ApiError::Internal(format!(
                "failed to encode a chunk: {err}"
            ))),
        }
    }

    /// Returns the chunks that open the stream: one role chunk per chat choice, none for
    /// completions.
    pub fn start(&self) -> Vec<StreamItem> {
        if self.choices.meta.kind == Kind::Completion {
            return Vec::new();
        }
        let choices = (0..self.choices.meta.n)
            .map(|index| ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
                steering: None,
            })
            .collect();
        vec![self.chunk(choices, self.usage_field())]
    }

    /// Takes the records of `choice` not sent yet.
    fn unsent(&mut self, choice: usize) -> Vec<TokenRecord> {
        let records = &self.choices.states[choice].records;
        let start = self.sent_records[choice];
        self.sent_records[choice] = records.len();
        records[start..].to_vec()
    }

    fn choice_chunk(
        &mut self,
        index: usize,
        text: String,
        finish_reason: Option<String>,
        steering: Option<SteeringBody>,
    ) -> StreamItem {
        let records = self.unsent(index);
        let usage = self.usage_field();
        match self.choices.meta.kind {
            Kind::Chat => {
                let delta = ChatDelta {
                    role: None,
                    content: (!text.is_empty() || finish_reason.is_none()).then_some(text),
                };
                let choice = ChatChunkChoice {
                    index,
                    delta,
                    logprobs: self.logprobs.then(|| Choices::chat_logprobs(&records)),
                    finish_reason,
                    steering,
                };
                self.chunk(vec![choice], usage)
            }
            Kind::Completion => {
                let choice = CompletionChunkChoice {
                    index,
                    text,
                    logprobs: self
                        .logprobs
                        .then(|| Choices::completion_logprobs(&records)),
                    finish_reason,
                    steering,
                };
                self.chunk(vec![choice], usage)
            }
        }
    }

    /// Handles one event and returns what to send for it.
    pub fn push(&mut self, event: Event) -> Vec<StreamItem> {
        match event {
            Event::Token(token) => match self.choices.push_token(&token) {
                // A token whose text is held back sends nothing now; its log-probabilities go
                // out with the next chunk of its choice.
                Ok(_) if token.text.is_empty() => Vec::new(),
                Ok(index) => vec![self.choice_chunk(index, token.text, None, None)],
                Err(err) => vec![StreamItem::Error(err)],
            },
            Event::Finished(end) => {
                let text = end.text.clone();
                let reason = end.reason.as_str().to_string();
                let steering = steering_body(&end.steering);
                match self.choices.push_end(end) {
                    Ok(index) => vec![self.choice_chunk(index, text, Some(reason), steering)],
                    Err(err) => vec![StreamItem::Error(err)],
                }
            }
            Event::Done(usage) => {
                let mut items = Vec::new();
                if self.choices.meta.include_usage {
                    let empty: Vec<ChatChunkChoice> = Vec::new();
                    items.push(self.chunk(empty, Some(Some(usage_body(usage)))));
                }
                items.push(StreamItem::Done);
                items
            }
            Event::Error(message) => vec![StreamItem::Error(ApiError::Generation(message))],
        }
    }
}

/// A whole response.
#[derive(Debug)]
pub enum FullResponse {
    /// `chat.completion`.
    Chat(ChatCompletion),
    /// `text_completion`.
    Completion(Completion),
}

/// Collects engine events into one response.
pub struct Collector {
    choices: Choices,
    logprobs: bool,
}

impl Collector {
    /// Creates a collector; `logprobs` adds log-probabilities to choices.
    pub fn new(meta: OutputMeta, tokenizer: Arc<Tokenizer>, logprobs: bool) -> Self {
        Self {
            choices: Choices::new(meta, tokenizer),
            logprobs,
        }
    }

    /// Handles one event; returns the response after the last one.
    pub fn push(&mut self, event: Event) -> Result<Option<FullResponse>, ApiError> {
        match event {
            Event::Token(token) => {
                self.choices.push_token(&token)?;
                Ok(None)
            }
            Event::Finished(end) => {
                self.choices.push_end(end)?;
                Ok(None)
            }
            Event::Done(usage) => Ok(Some(self.finish(usage_body(usage)))),
            Event::Error(message) => Err(ApiError::Generation(message)),
        }
    }

    fn finish(&mut self, usage: UsageBody) -> FullResponse {
        let states = std::mem::take(&mut self.choices.states);
        let meta = &self.choices.meta;
        let parts = states.into_iter().enumerate().map(|(index, state)| {
            let reason = state
                .end
                .as_ref()
                .map_or("abort", |e| e.reason.as_str())
                .to_string();
            let steering = state.end.as_ref().and_then(|e| steering_body(&e.steering));
            (index, state.text, state.records, reason, steering)
        });
        match meta.kind {
            Kind::Chat => FullResponse::Chat(ChatCompletion {
                id: meta.id.clone(),
                object: "chat.completion",
                created: meta.created,
                model: meta.model.clone(),
                choices: parts
                    .map(
                        |(index, text, records, finish_reason, steering)| ChatChoice {
                            index,
                            message: ResponseMessage {
                                role: "assistant",
                                content: text,
                            },
                            logprobs: self.logprobs.then(|| Choices::chat_logprobs(&records)),
                            finish_reason,
                            steering,
                        },
                    )
                    .collect(),
                usage,
            }),
            Kind::Completion => FullResponse::Completion(Completion {
                id: meta.id.clone(),
                object: "text_completion",
                created: meta.created,
                model: meta.model.clone(),
                choices: parts
                    .map(
                        |(index, text, records, finish_reason, steering)| CompletionChoice {
                            index,
                            text,
                            logprobs: self
                                .logprobs
                                .then(|| Choices::completion_logprobs(&records)),
                            finish_reason,
                            steering,
                        },
                    )
                    .collect(),
                usage,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::{FinishReason, TokenEvent};
    use crate::tokenizer::test_fixtures::tiny_byte_level;

    fn meta(kind: Kind, include_usage: bool) -> OutputMeta {
        OutputMeta {
            id: "id-1".into(),
            created: 7,
            model: "m".into(),
            kind,
            n: 1,
            include_usage,
            doctors: Vec::new(),
        }
    }

    fn token(text: &str) -> Event {
        Event::Token(TokenEvent {
            choice: 0,
            id: 1,
            text: text.into(),
            logprobs: None,
        })
    }

    fn end(text: &str, reason: FinishReason) -> Event {
        Event::Finished(ChoiceEnd {
            choice: 0,
            reason,
            text: text.into(),
            completion_tokens: 3,
            stop_token: None,
            steering: None,
        })
    }

    fn json(item: &StreamItem) -> serde_json::Value {
        match item {
            StreamItem::Data(text) => serde_json::from_str(text).unwrap(),
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn chat_stream_opens_with_role_and_ends_with_usage() {
        let mut builder =
            ChunkBuilder::new(meta(Kind::Chat, true), Arc::new(tiny_byte_level()), false);
        let start = builder.start();
        assert_eq!(start.len(), 1);
        let first = json(&start[0]);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["usage"], serde_json::Value::Null);

        let items = builder.push(token("Hel"));
        assert_eq!(json(&items[0])["choices"][0]["delta"]["content"], "Hel");
        assert!(
            builder.push(token("")).is_empty(),
            "held-back text sends nothing"
        );

        let items = builder.push(end("lo", FinishReason::Length));
        let last = json(&items[0]);
        assert_eq!(last["choices"][0]["delta"]["content"], "lo");
        assert_eq!(last["choices"][0]["finish_reason"], "length");

        let items = builder.push(Event::Done(Usage {
            prompt_tokens: 4,
            completion_tokens: 3,
        }));
        assert_eq!(items.len(), 2);
        let usage = json(&items[0]);
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert!(matches!(items[1], StreamItem::Done));
    }

    #[test]
    fn finish_without_text_sends_empty_delta() {
        let mut builder =
            ChunkBuilder::new(meta(Kind::Chat, false), Arc::new(tiny_byte_level()), false);
        let last = json(&builder.push(end("", FinishReason::Stop))[0]);
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last.get("usage").is_none());
    }

    #[test]
    fn engine_error_becomes_stream_error() {
        let mut builder = ChunkBuilder::new(
            meta(Kind::Completion, false),
            Arc::new(tiny_byte_level()),
            false,
        );
        let items = builder.push(Event::Error("boom".into()));
        assert!(matches!(&items[0], StreamItem::Error(ApiError::Generation(m)) if m == "boom"));
    }

    #[test]
    fn collector_joins_tokens_and_end_text() {
        let mut collector = Collector::new(
            meta(Kind::Completion, false),
            Arc::new(tiny_byte_level()),
            false,
        );
        assert!(collector.push(token("ab")).unwrap().is_none());
        assert!(collector
            .push(end("c", FinishReason::Stop))
            .unwrap()
            .is_none());
        let done = collector
            .push(Event::Done(Usage {
                prompt_tokens: 1,
                completion_tokens: 3,
            }))
            .unwrap();
        let Some(FullResponse::Completion(body)) = done else {
            panic!("expected a completion");
        };
        assert_eq!(body.choices[0].text, "abc");
        assert_eq!(body.choices[0].finish_reason, "stop");
        assert_eq!(body.usage.total_tokens, 4);
    }
}
