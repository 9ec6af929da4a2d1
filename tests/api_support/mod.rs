//! A test server on 127.0.0.1:0 with the real patient (when installed) or a tiny random model,
//! plus helpers to call it and parse server-sent events.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use llmdoctor::api::{self, AppState, Ready};
use llmdoctor::config::ServeConfig;
use llmdoctor::doctor::{DoctorBaseSpec, DoctorManifest};
use llmdoctor::engine::handle::EngineHandle;
use llmdoctor::loader::{load_model, LoadedModel};
use llmdoctor::metrics::Metrics;
use llmdoctor::model::lora::{AdapterConfig, Projection};
use llmdoctor::model::tiny::{uniform, TinySpec, TinyWeights};
use llmdoctor::model::LoadOptions;
use llmdoctor::tokenizer::ChatTemplate;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// The patient's id in every test server.
pub const PATIENT: &str = "patient";
/// A doctor written into every test server's doctors folder.
pub const DOCTOR: &str = "tester";

/// Which patient a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patient {
    /// The real default patient when installed, the tiny model otherwise.
    RealIfInstalled,
    /// The tiny random model.
    Tiny,
    /// The real patient; [`TestServer::start`] returns `None` when it is not installed.
    RealOnly,
}

/// Settings of a test server.
pub struct Options {
    /// The patient.
    pub patient: Patient,
    /// Shape of the tiny model.
    pub tiny: TinySpec,
    /// A chat template replacing the model's.
    pub template: Option<String>,
    /// Adjusts the server settings.
    pub configure: Box<dyn FnOnce(&mut ServeConfig) + Send>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            patient: Patient::RealIfInstalled,
            tiny: TinySpec::default(),
            template: None,
            configure: Box::new(|_| {}),
        }
    }
}

/// A running server.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The server's state.
    pub state: AppState,
    /// A client without a timeout.
    pub client: reqwest::Client,
    /// Whether the real patient runs.
    pub is_real: bool,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

fn tiny_patient(dir: &Path, spec: TinySpec) -> LoadedModel {
    let weights = TinyWeights::random(spec).unwrap();
    let path = dir.join("tiny.gguf");
    weights.write_gguf(&path, GgmlDType::Q8_0).unwrap();
    load_model(&path, &LoadOptions::default(), &Device::Cpu).unwrap()
}

/// Writes a doctor with a random rank-1 adapter on the last layer's `down_proj`, strong enough
/// that steering changes the most likely token at some positions.
pub fn write_doctor(doctors: &Path, name: &str, patient: &LoadedModel, seed: u64, scale: f32) {
    let config = patient.model.config();
    let prefix = Projection::Down.peft_prefix(config.num_layers - 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        format!("{prefix}.lora_A.weight"),
        uniform(&mut rng, (1, config.intermediate_size), 1.0).unwrap(),
    );
    tensors.insert(
        format!("{prefix}.lora_B.weight"),
        uniform(&mut rng, (config.hidden_size, 1), scale).unwrap(),
    );
    let dir = doctors.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("adapter.safetensors")).unwrap();
    let adapter = AdapterConfig {
        r: 1,
        lora_alpha: 1.0,
        use_rslora: false,
        target_modules: vec!["down_proj".into()],
        peft_type: "LORA".into(),
        base_model_name_or_path: None,
        layers_to_transform: None,
    };
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string(&adapter).unwrap(),
    )
    .unwrap();
    DoctorManifest {
        name: name.into(),
        description: format!("test doctor {name}"),
        base: DoctorBaseSpec::Patient,
        adapter: "adapter.safetensors".into(),
        adapter_config: "adapter_config.json".into(),
        default_beta: 1.0,
        training: toml::Table::new(),
    }
    .write(&dir)
    .unwrap();
}

impl TestServer {
    /// Starts a server; `None` when the options need the real patient and it is missing.
    pub async fn start(options: Options) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let real = match options.patient {
            Patient::Tiny => None,
            Patient::RealIfInstalled => common::real_model_path(),
            Patient::RealOnly => Some(common::real_model_path()?),
        };
        let is_real = real.is_some();
        let mut patient = match &real {
            Some(path) => load_model(path, &LoadOptions::default(), &Device::Cpu).unwrap(),
            None => tiny_patient(dir.path(), options.tiny),
        };
        if let Some(source) = &options.template {
            let template = ChatTemplate::new(source, None, None).unwrap();
            let tokenizer = (*patient.tokenizer).clone().with_chat_template(template);
            patient.tokenizer = Arc::new(tokenizer);
        }
        let doctors = dir.path().join("doctors");
        write_doctor(
            &doctors,
            DOCTOR,
            &patient,
            11,
            if is_real { 4.0 } else { 40.0 },
        );
        let mut config = ServeConfig {
            port: 0,
            doctors_dir: doctors,
            seed: Some(1),
            ..ServeConfig::default()
        };
        (options.configure)(&mut config);
        let metrics = Arc::new(Metrics::new().unwrap());
        let state = AppState::new(config.clone(), metrics.clone());
        let ready = Ready::start(patient, PATIENT.into(), &config, metrics).unwrap();
        state.set_ready(ready);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(api::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Some(Self {
            url,
            state,
            client: reqwest::Client::new(),
            is_real,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        })
    }

    /// Starts a server with default options, on the real patient when installed.
    pub async fn default() -> Self {
        Self::start(Options::default()).await.unwrap()
    }

    /// The engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.state.ready().unwrap().engine
    }

    /// POSTs JSON and returns the status and the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{path} returned non-JSON ({err}): {text}"));
        (status, json)
    }

    /// GETs a path and returns the status and the body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// POSTs a streaming request and reads the whole event stream.
    pub async fn stream(&self, path: &str, body: &Value) -> SseReply {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let raw = response.bytes().await.unwrap().to_vec();
        SseReply {
            status,
            content_type: header(&headers, "content-type"),
            cache_control: header(&headers, "cache-control"),
            events: parse_sse(&raw),
        }
    }

    /// Waits until the engine has nothing running or waiting and no KV cache in use.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            let state = self.engine().state();
            let idle = state.running.load(std::sync::atomic::Ordering::Relaxed) == 0
                && state.waiting_total() == 0
                && state
                    .kv_used_bytes
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0;
            if idle {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Stops the server and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// One server-sent event.
#[derive(Clone, Debug, PartialEq)]
pub enum SseEvent {
    /// A `data:` payload that is not `[DONE]`, parsed as JSON.
    Json(Value),
    /// `data: [DONE]`.
    Done,
    /// A comment line (keep-alive).
    Comment,
}

/// A whole event stream.
#[derive(Debug)]
pub struct SseReply {
    /// HTTP status.
    pub status: u16,
    /// `content-type`.
    pub content_type: String,
    /// `cache-control`.
    pub cache_control: String,
    /// The events in order.
    pub events: Vec<SseEvent>,
}

impl SseReply {
    /// Returns the JSON payloads, in order.
    pub fn chunks(&self) -> Vec<&Value> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SseEvent::Json(v) => Some(v),
                _ => None,
            })
            .collect()
    }

    /// Concatenates the chat `delta.content` (or completion `text`) of choice `index`.
    pub fn text(&self, index: u64) -> String {
        let mut text = String::new();
        for chunk in self.chunks() {
            for choice in chunk["choices"].as_array().into_iter().flatten() {
                if choice["index"].as_u64() != Some(index) {
                    continue;
                }
                if let Some(delta) = choice["delta"]["content"].as_str() {
                    text.push_str(delta);
                }
                if let Some(piece) = choice["text"].as_str() {
                    text.push_str(piece);
                }
            }
        }
        text
    }
}

/// Parses an event stream. Panics when a `data:` payload is not valid UTF-8 or not JSON.
pub fn parse_sse(raw: &[u8]) -> Vec<SseEvent> {
    let mut events = Vec::new();
    for block in raw
        .split(|&b| b == b'\n')
        .collect::<Vec<_>>()
        .split(|line| line.is_empty())
    {
        for line in block {
            if line.starts_with(b":") {
                events.push(SseEvent::Comment);
            } else if let Some(data) = line.strip_prefix(b"data: ") {
                let text = std::str::from_utf8(data)
                    .unwrap_or_else(|err| panic!("SSE payload is not UTF-8: {err}: {data:?}"));
                if text == "[DONE]" {
                    events.push(SseEvent::Done);
                } else {
                    let value = serde_json::from_str(text)
                        .unwrap_or_else(|err| panic!("SSE payload is not JSON: {err}: {text}"));
                    events.push(SseEvent::Json(value));
                }
            }
        }
    }
    events
}

/// Returns the sorted keys of a JSON object.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// Builds a chat request body with one user message.
pub fn chat(content: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": PATIENT,
        "messages": [{"role": "user", "content": content}],
    });
    merge(&mut body, extra);
    body
}

/// Builds a completion request body.
pub fn completion(prompt: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({"model": PATIENT, "prompt": prompt});
    merge(&mut body, extra);
    body
}

fn merge(body: &mut Value, extra: Value) {
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
}
