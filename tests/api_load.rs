//! Load on the real patient: 32 concurrent streaming clients for three rounds, a quarter of
//! them leaving at random points. Every stream that completes is well formed, nothing fails,
//! and the engine ends with no running request and no KV cache in use.

mod api_support;

use std::time::Duration;

use api_support::{chat, parse_sse, Options, Patient, SseEvent, TestServer};
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const CLIENTS: usize = 32;
const ROUNDS: usize = 3;
/// The whole test must finish within this time.
const TIME_LIMIT: Duration = Duration::from_secs(600);

/// Runs one client. `leave_after` is the number of body pieces read before disconnecting;
/// `None` reads the whole stream and checks it.
async fn client(
    server_url: String,
    prompt: String,
    leave_after: Option<usize>,
) -> Result<(), String> {
    let response = reqwest::Client::new()
        .post(format!("{server_url}/v1/chat/completions"))
        .json(&chat(
            &prompt,
            json!({"max_tokens": 16, "stream": true, "temperature": 0.7,
                   "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.bytes_stream();
    let mut raw = Vec::new();
    let mut pieces = 0;
    while let Some(piece) = body.next().await {
        raw.extend_from_slice(&piece.map_err(|e| e.to_string())?);
        pieces += 1;
        if Some(pieces) == leave_after {
            return Ok(());
        }
    }
    let events = parse_sse(&raw);
    if events.last() != Some(&SseEvent::Done) {
        return Err(format!("stream does not end with [DONE]: {events:?}"));
    }
    let chunks: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SseEvent::Json(v) => Some(v),
            _ => None,
        })
        .collect();
    if chunks.iter().any(|c| c.get("error").is_some()) {
        return Err(format!("error event: {chunks:?}"));
    }
    if chunks.first().map(|c| &c["choices"][0]["delta"]["role"]) != Some(&json!("assistant")) {
        return Err("first chunk has no role".into());
    }
    let usage = chunks.last().ok_or("no chunks")?;
    if usage["choices"] != json!([]) || usage["usage"]["completion_tokens"].as_u64().is_none() {
        return Err(format!("last chunk is not the usage chunk: {usage}"));
    }
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    if !(finish == "stop" || finish == "length") {
        return Err(format!("bad finish_reason {finish}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_streams_with_disconnects_leave_engine_idle() {
    let Some(server) = TestServer::start(Options {
        patient: Patient::RealOnly,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let run = async {
        for round in 0..ROUNDS {
            let mut tasks = Vec::new();
            for i in 0..CLIENTS {
                let leave_after = (i % 4 == 0).then(|| rng.gen_range(1..8));
                let prompt =
                    format!("Round {round}, client {i}: tell me a fact about the number {i}.");
                tasks.push(tokio::spawn(client(
                    server.url.clone(),
                    prompt,
                    leave_after,
                )));
            }
            for (i, task) in tasks.into_iter().enumerate() {
                if let Err(err) = task.await.unwrap() {
                    panic!("round {round}, client {i}: {err}");
                }
            }
        }
    };
    tokio::time::timeout(TIME_LIMIT, run)
        .await
        .expect("the load test ran past its time limit");
    assert!(
        server.wait_idle(Duration::from_secs(30)).await,
        "engine not idle"
    );
    let (_, metrics) = server.get("/metrics").await;
    for gauge in [
        "llmdoctor_requests_running ",
        "llmdoctor_kv_cache_usage_ratio ",
        "llmdoctor_requests_waiting ",
    ] {
        let line = metrics.lines().find(|l| l.starts_with(gauge)).unwrap();
        assert_eq!(line, format!("{gauge}0"), "{line}");
    }
    server.stop().await;
}
