//! Invalid requests, limits and keys: every error has OpenAI's shape, the right status and the
//! field at fault, and arrives before any stream starts.

mod api_support;

use api_support::{chat, keys, Options, Patient, TestServer, DOCTOR};
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

fn assert_error(status: u16, body: &Value, expected_status: u16, param: Option<&str>) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(keys(body), ["error"], "{body}");
    assert_eq!(
        keys(&body["error"]),
        ["code", "message", "param", "type"],
        "{body}"
    );
    assert_eq!(body["error"]["param"].as_str(), param, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_are_400_naming_the_field() {
    let server = tiny(|_| {}).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(Value, Option<&str>)> = vec![
        (json!({"messages": []}), Some("messages")),
        (json!({"messages": user, "n": 0}), Some("n")),
        (
            json!({"messages": user, "max_tokens": -1}),
            Some("max_tokens"),
        ),
        (
            json!({"messages": user, "max_completion_tokens": 0}),
            Some("max_completion_tokens"),
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            Some("messages[0].role"),
        ),
        (
            json!({"messages": user, "temperature": 3.0}),
            Some("temperature"),
        ),
        (
            json!({"messages": user, "top_logprobs": 2}),
            Some("top_logprobs"),
        ),
        (
            json!({"messages": user, "logit_bias": {"x": 1}}),
            Some("logit_bias"),
        ),
        (json!({"messages": user, "docter": DOCTOR}), Some("docter")),
        (
            json!({"messages": user, "stream": true, "docter": DOCTOR}),
            Some("docter"),
        ),
        (
            json!({"messages": user, "tools": [{"type": "function"}]}),
            Some("tools"),
        ),
        (
            json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {}}}),
            Some("response_format"),
        ),
        (
            json!({"messages": user, "max_tokens": "ten"}),
            Some("max_tokens"),
        ),
    ];
    for (body, param) in cases {
        let (status, reply) = server.post("/v1/chat/completions", &body).await;
        assert_error(status, &reply, 400, param);
    }
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": user, "docter": DOCTOR}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        reply["error"]["message"],
        "unknown field `docter`; did you mean `doctor`?"
    );
    // A β that is not a number names the accepted forms of `doctor`.
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": user, "doctor": {"name": DOCTOR, "beta": "x"}}),
        )
        .await;
    assert_error(status, &reply, 400, Some("doctor"));
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("expected a doctor name, {\"name\": string, \"beta\": number}"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_stream_request_fails_before_sse_headers() {
    let server = tiny(|_| {}).await;
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&json!({"messages": [], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(content_type, "application/json");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_doctor_is_404_listing_loaded_doctors() {
    let server = tiny(|_| {}).await;
    for body in [
        chat("hi", json!({"doctor": "nobody"})),
        chat("hi", json!({"doctor": [{"name": "nobody", "beta": 1.0}]})),
        chat("hi", json!({"stream": true, "doctor": "nobody"})),
    ] {
        let (status, reply) = server.post("/v1/chat/completions", &body).await;
        assert_error(status, &reply, 404, Some("doctor"));
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("nobody") && message.contains(DOCTOR),
            "{message}"
        );
    }
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"model": "gpt-4"})),
        )
        .await;
    assert_error(status, &reply, 404, Some("model"));
    assert_eq!(reply["error"]["code"], "model_not_found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn context_overflow_is_400_and_server_keeps_serving() {
    let server = TestServer::default().await;
    let context = server.engine().patient_context();
    let long = "word ".repeat(context + 10);
    let (status, reply) = server
        .post("/v1/chat/completions", &chat(&long, json!({})))
        .await;
    assert_error(status, &reply, 400, Some("messages"));
    assert_eq!(reply["error"]["code"], "context_length_exceeded");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains(&context.to_string()), "{message}");

    // Fits alone, but not with `max_tokens`.
    let (_, tokens) = server
        .post(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
    let prompt_tokens = tokens["count"].as_u64().unwrap() as usize;
    let max_tokens = context - prompt_tokens + 1;
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            &chat("hello", json!({"max_tokens": max_tokens})),
        )
        .await;
    assert_error(status, &reply, 400, Some("messages"));
    let message = reply["error"]["message"].as_str().unwrap();
    for number in [prompt_tokens, max_tokens, context] {
        assert!(
            message.contains(&number.to_string()),
            "{number} missing: {message}"
        );
    }

    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            &chat("hello", json!({"max_tokens": 3})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_template_exception_is_400() {
    let server = TestServer::start(Options {
        patient: Patient::Tiny,
        template: Some(
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}{% endif %}{{ m['content'] }}{% endfor %}".into(),
        ),
        ..Options::default()
    })
    .await
    .unwrap();
    let body =
        json!({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]});
    let (status, reply) = server.post("/v1/chat/completions", &body).await;
    assert_error(status, &reply, 400, None);
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("system messages are not supported"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_is_413() {
    let server = tiny(|c| c.max_body_bytes = 1000).await;
    let (status, reply) = server
        .post("/v1/chat/completions", &chat(&"x".repeat(2000), json!({})))
        .await;
    assert_error(status, &reply, 413, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_is_429_with_retry_after() {
    let server = tiny(|c| c.max_waiting = 0).await;
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat("hi", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_is_required_when_configured() {
    let server = tiny(|c| c.api_keys = vec!["k1".into()]).await;
    let url = format!("{}/v1/chat/completions", server.url);
    let body = chat("hi", json!({"max_tokens": 2}));
    for (key, expected) in [(None, 401), (Some("wrong"), 401), (Some("k1"), 200)] {
        let mut request = server.client.post(&url).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "key {key:?}");
    }
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200, "health needs no key");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_routes_need_the_admin_key() {
    let server = tiny(|_| {}).await;
    let response = server
        .client
        .delete(format!("{}/v1/doctors/{DOCTOR}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403, "no admin key configured");
    server.stop().await;

    let server = tiny(|c| c.admin_key = Some("admin".into())).await;
    let url = format!("{}/v1/doctors", server.url);
    for (key, expected) in [(None, 401), (Some("wrong"), 401)] {
        let mut request = server.client.post(&url).json(&json!({"name": DOCTOR}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        assert_eq!(request.send().await.unwrap().status().as_u16(), expected);
    }
    let response = server
        .client
        .post(&url)
        .bearer_auth("admin")
        .json(&json!({"name": "no-such-doctor"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404, "missing folder");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "doctor_not_found");
    assert_eq!(body["error"]["param"], "name");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no-such-doctor"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_scheduler_queue_is_429_not_stream_error() {
    let server = TestServer::start(Options {
        patient: Patient::Tiny,
        tiny: llmdoctor::model::tiny::TinySpec {
            context_length: 4096,
            ..Default::default()
        },
        configure: Box::new(|c| {
            c.max_num_seqs = 1;
            c.max_waiting = 1;
        }),
        ..Options::default()
    })
    .await
    .unwrap();
    let long = chat(
        "go",
        json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}),
    );
    let url = format!("{}/v1/chat/completions", server.url);
    let running = server.client.post(&url).json(&long).send().await.unwrap();
    let mut running_body = running.bytes_stream();
    // The first event is the role chunk, sent before the engine runs anything; wait for
    // generated text, then for the end of that loop iteration.
    let mut data_events = 0;
    while data_events < 3 {
        let piece = futures_util::StreamExt::next(&mut running_body).await;
        let bytes = piece.unwrap().unwrap();
        data_events += bytes.windows(6).filter(|w| w == b"data: ").count();
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let waiting = server.client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(waiting.status().as_u16(), 200);
    // Give the engine time to move the second request into its waiting queue.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("\nllmdoctor_requests_waiting 1\n"),
        "{metrics}"
    );

    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_error(status, &reply, 429, None);
    drop(running_body);
    drop(waiting);
    assert!(server.wait_idle(std::time::Duration::from_secs(10)).await);
    server.stop().await;
}
