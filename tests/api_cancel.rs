//! Clients that leave: a stream dropped mid-way, a non-streaming request abandoned while it
//! runs, and a request abandoned while it waits all cancel generation and free the KV cache.

mod api_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use api_support::{chat, Options, Patient, TestServer};
use futures_util::StreamExt;
use llmdoctor::model::tiny::TinySpec;
use serde_json::json;

/// `max_tokens` of a request that runs for thousands of steps unless cancelled.
const LONG: u64 = 4000;

async fn server() -> TestServer {
    TestServer::start(Options {
        patient: Patient::Tiny,
        tiny: TinySpec {
            context_length: 4096,
            ..TinySpec::default()
        },
        ..Options::default()
    })
    .await
    .unwrap()
}

fn generated(server: &TestServer) -> u64 {
    server
        .engine()
        .state()
        .generated_tokens
        .load(Ordering::Relaxed)
}

fn cancelled_count(text: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with("llmdoctor_request_success_total{finish_reason=\"cancelled\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_stream_cancels_generation() {
    let server = server().await;
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat(
            "go",
            json!({"max_tokens": LONG, "ignore_eos": true, "stream": true}),
        ))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut received = 0;
    while received < 3 {
        let bytes = body.next().await.unwrap().unwrap();
        received += bytes.windows(6).filter(|w| w == b"data: ").count();
    }
    // Hold the engine while the connection closes, so it cannot finish the request first.
    server.engine().stall(Duration::from_millis(300));
    drop(body);
    assert!(
        server.wait_idle(Duration::from_secs(10)).await,
        "the request still runs"
    );
    assert!(
        generated(&server) < LONG / 2,
        "generated {}",
        generated(&server)
    );
    let (_, metrics) = server.get("/metrics").await;
    assert_eq!(cancelled_count(&metrics), 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_non_stream_request_cancels_generation() {
    let server = server().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", server.url);
    let request = tokio::spawn(async move {
        client
            .post(url)
            .json(&chat("go", json!({"max_tokens": LONG, "ignore_eos": true})))
            .send()
            .await
    });
    let state = server.engine().state();
    while state.running.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.engine().stall(Duration::from_millis(800));
    assert!(request.await.unwrap().is_err(), "the client must time out");
    assert!(
        server.wait_idle(Duration::from_secs(10)).await,
        "the request still runs"
    );
    assert!(
        generated(&server) < LONG / 2,
        "generated {}",
        generated(&server)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_abandoned_while_queued_never_runs() {
    let server = server().await;
    let prefill_before = server
        .engine()
        .state()
        .prefill_tokens
        .load(Ordering::Relaxed);
    server.engine().stall(Duration::from_millis(1000));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let result = client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat("go", json!({"max_tokens": 8})))
        .send()
        .await;
    assert!(
        result.is_err(),
        "the client must time out while the request waits"
    );
    assert!(server.wait_idle(Duration::from_secs(10)).await);
    // The engine accepts the request after the stall and must drop it in that same step.
    // The wait gives a wrong engine time to run steps it should not run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state = server.engine().state();
    assert_eq!(state.prefill_tokens.load(Ordering::Relaxed), prefill_before);
    assert_eq!(state.generated_tokens.load(Ordering::Relaxed), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_streams_with_abort() {
    let server = server().await;
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat(
            "go",
            json!({"max_tokens": LONG, "ignore_eos": true, "stream": true}),
        ))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut raw = body.next().await.unwrap().unwrap().to_vec();
    let stopping = tokio::spawn(server.stop());
    while let Some(piece) = body.next().await {
        raw.extend_from_slice(&piece.unwrap());
    }
    stopping.await.unwrap();

    let events = api_support::parse_sse(&raw);
    assert_eq!(events.last(), Some(&api_support::SseEvent::Done));
    let last = events
        .iter()
        .rev()
        .find_map(|e| match e {
            api_support::SseEvent::Json(v) => Some(v.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "abort");
}
