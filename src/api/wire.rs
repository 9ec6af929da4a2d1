//! OpenAI wire types: request bodies as clients send them and the response shapes.
//!
//! Requests are raw: every field is optional or loosely typed as in OpenAI's API, and
//! [`super::validate`] turns them into engine requests. Field names outside OpenAI's API are
//! extensions: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `doctor` and
//! `patient_alpha` in requests, `steering` and the patient and doctor log-probabilities in
//! responses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or a list of strings.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(untagged, expecting = "expected a string or a list of strings")]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// One doctor with an optional β.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoctorSpec {
    /// The doctor's name, as listed by `GET /v1/doctors`.
    pub name: String,
    /// β, the doctor's weight; the doctor's default when absent.
    pub beta: Option<f32>,
}

/// A doctor given by name alone or with a β.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(
    untagged,
    expecting = "expected a doctor name or {\"name\": string, \"beta\": number}"
)]
pub enum DoctorItem {
    /// The doctor's name; β is the doctor's default.
    Name(String),
    /// Name and β.
    Spec(DoctorSpec),
}

/// `doctor` (extension): one doctor or a list of doctors steering the request.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(
    untagged,
    expecting = "expected a doctor name, {\"name\": string, \"beta\": number}, or a list of them"
)]
pub enum DoctorField {
    /// One doctor.
    One(DoctorItem),
    /// Several doctors, each with its own β.
    Many(Vec<DoctorItem>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send one extra chunk with the request's `usage` and no choices before `[DONE]`.
    pub include_usage: Option<bool>,
}

/// One part of a message's content in the list form.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// A message's content: a string, or a list of text parts.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts, joined in order.
    Parts(Vec<ContentPart>),
}

/// One chat message of a request.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The text; `null` only for an assistant message.
    pub content: Option<MessageContent>,
    /// A participant name; accepted and not passed to the chat template.
    pub name: Option<String>,
}

/// Fields that chat and text completions share, with OpenAI's names.
#[derive(Clone, Debug, Default, Deserialize, ToSchema, PartialEq)]
pub struct CommonFields {
    /// The patient's id, or a doctor's name to steer with that doctor.
    pub model: Option<String>,
    /// Choices to generate, at least 1.
    pub n: Option<i64>,
    /// Seed of the sampler: the same seed gives the same output.
    pub seed: Option<u64>,
    /// Stop strings; the output ends before the first one and never contains it.
    pub stop: Option<StopField>,
    /// Maximum generated tokens per choice.
    pub max_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f32>,
    /// −2 to 2.
    pub presence_penalty: Option<f32>,
    /// −2 to 2.
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to a bias from −100 to 100.
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Stream chunks as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// An end-user id; accepted and ignored.
    pub user: Option<String>,
    /// Extension: keep the `top_k` most likely tokens.
    pub top_k: Option<i64>,
    /// Extension: drop tokens below `min_p` times the top probability.
    pub min_p: Option<f32>,
    /// Extension: multiplicative repetition penalty, above 0.
    pub repetition_penalty: Option<f32>,
    /// Extension: keep generating after an end-of-sequence token.
    pub ignore_eos: Option<bool>,
    /// Extension: doctors steering the request.
    pub doctor: Option<DoctorField>,
    /// Extension: α, the patient's weight in the steered combination (default 1).
    pub patient_alpha: Option<f32>,
}

/// `POST /v1/chat/completions` request body.
#[derive(Clone, Debug, Default, Deserialize, ToSchema, PartialEq)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<RequestMessage>,
    /// Maximum generated tokens per choice; takes precedence over `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities of the generated tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per token, 0 to 20; needs `logprobs`.
    pub top_logprobs: Option<i64>,
    /// Not supported yet: a request that sets it is rejected.
    #[schema(value_type = Object)]
    pub tools: Option<serde_json::Value>,
    /// Not supported yet: a request that sets it is rejected.
    #[schema(value_type = Object)]
    pub tool_choice: Option<serde_json::Value>,
    /// Only `{"type": "text"}` is supported.
    #[schema(value_type = Object)]
    pub response_format: Option<serde_json::Value>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `prompt`: a string, a list with one string, or token ids.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(untagged)]
pub enum PromptField {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A list of texts; only one is supported.
    Texts(Vec<String>),
    /// A list of id lists; only one is supported.
    IdLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions` request body.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
pub struct CompletionRequest {
    /// The prompt, used as is (no chat template).
    pub prompt: PromptField,
    /// Alternatives per token, 0 to 20.
    pub logprobs: Option<i64>,
    /// Only `false` is supported.
    pub echo: Option<bool>,
    /// Not supported.
    pub suffix: Option<String>,
    /// Must equal `n` when set.
    pub best_of: Option<i64>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// Top-level fields [`CommonFields`] accepts.
pub const COMMON_FIELDS: &[&str] = &[
    "model",
    "n",
    "seed",
    "stop",
    "max_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "doctor",
    "patient_alpha",
];

/// Top-level fields of a chat request besides [`COMMON_FIELDS`].
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
];

/// Top-level fields of a completion request besides [`COMMON_FIELDS`].
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "suffix", "best_of"];

/// Token counts.
#[derive(Clone, Copy, Debug, Serialize, ToSchema, PartialEq)]
pub struct UsageBody {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// A doctor with the β it steered with.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct SteeringDoctor {
    /// Name.
    pub name: String,
    /// β.
    pub beta: f32,
}

/// Extension: how steering shaped one choice.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct SteeringBody {
    /// α, the patient's weight.
    pub patient_alpha: f32,
    /// The doctors in request order.
    pub doctors: Vec<SteeringDoctor>,
    /// Measured tokens where the steered top token differs from the patient's.
    pub changed_tokens: usize,
    /// Generated tokens on which `changed_tokens` and `mean_kl` were measured: one in every n
    /// (the server's `steering_stats_interval`), or every token when logprobs were requested.
    pub measured_tokens: usize,
    /// Mean KL(steered ‖ patient) over the measured tokens, nats.
    pub mean_kl: f32,
}

/// An alternative token and its log-probability.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct TopLogprob {
    /// The token's text (U+FFFD where it is part of a multi-byte character).
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
}

/// One doctor's log-probability of a token.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct DoctorLogprob {
    /// The doctor.
    pub name: String,
    /// The token's log-probability under the doctor alone.
    pub logprob: f32,
}

/// Log-probability of one generated token in a chat response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct TokenLogprobBody {
    /// The token's text.
    pub token: String,
    /// Its log-probability under the distribution it was sampled from.
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
    /// The most likely alternatives.
    pub top_logprobs: Vec<TopLogprob>,
    /// Extension, steered requests only: the token's log-probability under the patient alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_logprob: Option<f32>,
    /// Extension, steered requests only: the token's log-probability under each doctor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doctor_logprobs: Option<Vec<DoctorLogprob>>,
}

/// Chat log-probabilities.
#[derive(Clone, Debug, Default, Serialize, ToSchema, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprobBody>,
}

/// Completion log-probabilities (the legacy shape).
#[derive(Clone, Debug, Default, Serialize, ToSchema, PartialEq)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Alternatives per token, text to log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
    /// Extension, steered requests only: log-probabilities under the patient alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_token_logprobs: Option<Vec<f32>>,
    /// Extension, steered requests only: log-probabilities under each doctor alone, in request
    /// order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doctor_token_logprobs: Option<Vec<DoctorTokenLogprobs>>,
}

/// One doctor's log-probabilities of a completion's tokens.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct DoctorTokenLogprobs {
    /// The doctor.
    pub name: String,
    /// One per generated token, as `token_logprobs`.
    pub token_logprobs: Vec<f32>,
}

/// An assistant message in a response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The reply.
    pub message: ResponseMessage,
    /// Present when the request set `logprobs`.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `abort` (the server shut down).
    pub finish_reason: String,
    /// Extension: present on steered requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringBody>,
}

/// `POST /v1/chat/completions` response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct ChatCompletion {
    /// Request id.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix time in seconds.
    pub created: u64,
    /// The `model` of the request, or the patient's id.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageBody,
}

/// One choice of a text completion.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: usize,
    /// The generated text.
    pub text: String,
    /// Present when the request set `logprobs`.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length` or `abort`.
    pub finish_reason: String,
    /// Extension: present on steered requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringBody>,
}

/// `POST /v1/completions` response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct Completion {
    /// Request id.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix time in seconds.
    pub created: u64,
    /// The `model` of the request, or the patient's id.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: UsageBody,
}

/// The change a chunk carries for one chat choice.
#[derive(Clone, Debug, Default, Serialize, ToSchema, PartialEq)]
pub struct ChatDelta {
    /// `assistant` on the first chunk of each choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice in a chat chunk.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: usize,
    /// The change.
    pub delta: ChatDelta,
    /// Log-probabilities of the tokens this chunk releases.
    pub logprobs: Option<ChatLogprobs>,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<String>,
    /// Extension: on the last chunk of a steered choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringBody>,
}

/// One choice in a text-completion chunk.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct CompletionChunkChoice {
    /// Choice index.
    pub index: usize,
    /// New text.
    pub text: String,
    /// Log-probabilities of the tokens this chunk releases.
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<String>,
    /// Extension: on the last chunk of a steered choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringBody>,
}

/// A streamed chunk: `chat.completion.chunk` or `text_completion`.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct Chunk<C> {
    /// Request id, the same on every chunk.
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    /// Unix time in seconds.
    pub created: u64,
    /// The `model` of the request, or the patient's id.
    pub model: String,
    /// Choices; empty on the usage chunk.
    pub choices: Vec<C>,
    /// With `include_usage`: `null` on every chunk but the last, which has the counts.
    /// Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ModelCard {
    /// The id to put in `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix time in seconds when it was loaded.
    pub created: u64,
    /// Always `llmdoctor`.
    pub owned_by: String,
    /// For a doctor: the patient's id. Absent for the patient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a doctor: its description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `GET /v1/models` response.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The patient first, then every loaded doctor.
    pub data: Vec<ModelCard>,
}

/// A loaded doctor in `GET /v1/doctors`.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct DoctorCard {
    /// Name.
    pub name: String,
    /// Description from its manifest.
    pub description: String,
    /// β when a request sets none.
    pub default_beta: f32,
    /// `patient`, or the path of its own base model.
    pub base: String,
    /// Increases with every load or replacement since the server started.
    pub version: u64,
}

/// `GET /v1/doctors` response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct DoctorList {
    /// Always `list`.
    pub object: &'static str,
    /// The loaded doctors, by name.
    pub data: Vec<DoctorCard>,
}

/// `POST /v1/doctors` request body.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadDoctorRequest {
    /// The doctor's folder name under the doctors directory; loaded, or replaced if loaded.
    pub name: String,
}

/// `POST /tokenize` request body: `prompt` or `messages`.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// The model; only checked when given.
    pub model: Option<String>,
    /// Text to tokenize as is.
    pub prompt: Option<String>,
    /// Messages to render with the chat template and tokenize.
    pub messages: Option<Vec<RequestMessage>>,
    /// Parse special tokens written in `prompt` (default true).
    pub add_special_tokens: Option<bool>,
}

/// `POST /tokenize` response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct TokenizeResponse {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Their number.
    pub count: usize,
    /// The smallest context among the patient and the loaded doctors' own bases.
    pub max_model_len: usize,
}

/// `POST /detokenize` request body.
#[derive(Clone, Debug, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    /// The model; only checked when given.
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct DetokenizeResponse {
    /// The decoded text.
    pub prompt: String,
}

/// `GET /health` response.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct HealthBody {
    /// `ok`, `loading`, `stalled` or `stopped`.
    pub status: &'static str,
}
