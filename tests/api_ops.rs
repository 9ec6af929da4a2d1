//! Models, doctors and their admin routes, health, metrics, the OpenAPI document, the
//! tokenizer routes and CORS.

mod api_support;

use std::collections::BTreeSet;
use std::time::Duration;

use api_support::{chat, write_doctor, Options, Patient, TestServer, DOCTOR, PATIENT};
use llmdoctor::config::Cors;
use serde_json::{json, Value};

async fn tiny(
    configure: impl FnOnce(&mut llmdoctor::config::ServeConfig) + Send + 'static,
) -> TestServer {
    TestServer::start(Options {
        patient: Patient::Tiny,
        configure: Box::new(configure),
        ..Options::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn models_list_patient_and_doctors_with_parent() {
    let server = tiny(|_| {}).await;
    let (status, text) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], PATIENT);
    assert_eq!(data[0]["object"], "model");
    assert!(data[0].get("parent").is_none());
    assert_eq!(data[1]["id"], DOCTOR);
    assert_eq!(data[1]["parent"], PATIENT);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_loads_replaces_and_unloads_doctors() {
    let server = tiny(|c| c.admin_key = Some("admin".into())).await;
    let doctors_dir = server.state.config.doctors_dir.clone();
    let patient = {
        let dir = tempfile::tempdir().unwrap();
        let weights = llmdoctor::model::tiny::TinyWeights::random(Default::default()).unwrap();
        let path = dir.path().join("tiny.gguf");
        weights
            .write_gguf(&path, candle_core::quantized::GgmlDType::Q8_0)
            .unwrap();
        llmdoctor::loader::load_model(&path, &Default::default(), &candle_core::Device::Cpu)
            .unwrap()
    };
    write_doctor(&doctors_dir, "second", &patient, 5, 10.0);
    let post = |body: Value| {
        server
            .client
            .post(format!("{}/v1/doctors", server.url))
            .bearer_auth("admin")
            .json(&body)
            .send()
    };
    let response = post(json!({"name": "second"})).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let card: Value = response.json().await.unwrap();
    assert_eq!(card["name"], "second");
    let first_version = card["version"].as_u64().unwrap();
    let (_, text) = server.get("/v1/doctors").await;
    let list: Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"second"), "{names:?}");

    let replaced: Value = post(json!({"name": "second"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(replaced["version"].as_u64().unwrap() > first_version);

    for (name, status) in [("../second", 400), ("/etc", 400), ("missing", 404)] {
        let response = post(json!({"name": name})).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
    }

    let delete = |name: &str| {
        server
            .client
            .delete(format!("{}/v1/doctors/{name}", server.url))
            .bearer_auth("admin")
            .send()
    };
    assert_eq!(delete("second").await.unwrap().status().as_u16(), 200);
    assert_eq!(delete("second").await.unwrap().status().as_u16(), 404);
    let (status, _) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"doctor": "second"})),
        )
        .await;
    assert_eq!(status, 404, "an unloaded doctor must not steer silently");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_503_while_engine_loop_stalls() {
    let server = tiny(|c| c.health_stall_timeout = Duration::from_millis(300)).await;
    assert_eq!(server.get("/health").await.0, 200);
    server.engine().stall(Duration::from_millis(2000));
    let pending = {
        let client = server.client.clone();
        let url = format!("{}/v1/chat/completions", server.url);
        tokio::spawn(async move {
            client
                .post(url)
                .json(&chat("hi", json!({"max_tokens": 2})))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, body) = server.get("/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stalled"), "{body}");
    assert_eq!(pending.await.unwrap(), 200);
    assert_eq!(server.get("/health").await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_and_tokens() {
    let server = tiny(|_| {}).await;
    let (status, _) = server
        .post(
            "/v1/chat/completions",
            &chat(
                "hi",
                json!({"max_tokens": 16, "ignore_eos": true, "doctor": DOCTOR}),
            ),
        )
        .await;
    assert_eq!(status, 200);
    // The engine publishes its gauges after the step that finished the request, which can
    // be just after the response arrives.
    let mut text = String::new();
    for _ in 0..100 {
        let (status, body) = server.get("/metrics").await;
        assert_eq!(status, 200);
        text = body;
        if text.lines().any(|l| l == "llmdoctor_requests_running 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("{line_start} missing:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("llmdoctor_generation_tokens_total"), 16.0);
    assert!(value("llmdoctor_prompt_tokens_total") > 0.0);
    assert_eq!(
        value("llmdoctor_request_success_total{finish_reason=\"length\"}"),
        1.0
    );
    assert_eq!(
        value(&format!(
            "llmdoctor_doctor_requests_total{{doctor=\"{DOCTOR}\"}}"
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "llmdoctor_doctor_tokens_total{{doctor=\"{DOCTOR}\"}}"
        )),
        16.0
    );
    // One token in every 8 is measured by default, whatever the phase.
    assert_eq!(
        value(&format!(
            "llmdoctor_steering_measured_tokens_total{{doctor=\"{DOCTOR}\"}}"
        )),
        2.0
    );
    assert_eq!(value("llmdoctor_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(value("llmdoctor_inter_token_latency_seconds_count"), 15.0);
    // The last step's duration is recorded after its tokens are sent, so it may be missing.
    assert!(value("llmdoctor_step_duration_seconds_count") >= 15.0);
    assert!(value("llmdoctor_doctor_forward_seconds_count") >= 16.0);
    assert_eq!(value("llmdoctor_requests_running"), 0.0);
    assert_eq!(value("llmdoctor_kv_cache_usage_ratio"), 0.0);
    server.stop().await;
}

/// Every route of the server, as `(method, OpenAPI path)`.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("get", "/v1/models"),
    ("get", "/v1/doctors"),
    ("post", "/v1/doctors"),
    ("delete", "/v1/doctors/{name}"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("post", "/tokenize"),
    ("post", "/detokenize"),
];

#[tokio::test(flavor = "multi_thread")]
async fn openapi_documents_every_route() {
    let server = tiny(|_| {}).await;
    let (status, text) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);
    // Each documented operation is routed: only the fallbacks return "no route" or "method"
    // messages.
    for (method, path) in &documented {
        let url = format!("{}{}", server.url, path.replace("{name}", "nobody"));
        let request = match method.as_str() {
            "get" => server.client.get(&url),
            "post" => server.client.post(&url).json(&json!({})),
            "delete" => server.client.delete(&url),
            other => panic!("unexpected method {other}"),
        };
        let response = request.send().await.unwrap();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.starts_with("no route") && !message.starts_with("method"),
            "{method} {path}: {message}"
        );
    }
    let (status, text) = server.get("/v2/nothing").await;
    assert_eq!(status, 404);
    assert!(text.contains("no route"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_and_detokenize_round_trip() {
    let server = tiny(|_| {}).await;
    let (status, body) = server
        .post("/tokenize", &json!({"prompt": "hello world"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], body["tokens"].as_array().unwrap().len());
    let (status, text) = server
        .post("/detokenize", &json!({"tokens": body["tokens"]}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(text["prompt"], "hello world");
    let (status, _) = server
        .post("/detokenize", &json!({"tokens": [999999]}))
        .await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_is_off_by_default_and_configurable() {
    let server = tiny(|_| {}).await;
    let response = server
        .client
        .get(format!("{}/v1/models", server.url))
        .header("origin", "http://example.test")
        .send()
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    server.stop().await;

    let server = tiny(|c| c.cors = Cors::Origins(vec!["http://example.test".into()])).await;
    let response = server
        .client
        .get(format!("{}/v1/models", server.url))
        .header("origin", "http://example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://example.test"
    );
    server.stop().await;
}
