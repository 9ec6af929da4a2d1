//! Chat and text completions through the real HTTP server: exact shapes, streaming contracts,
//! stop strings, finish reasons, UTF-8 and steering.

mod api_support;

use api_support::{chat, completion, keys, Options, Patient, SseEvent, TestServer, DOCTOR};
use serde_json::{json, Value};

fn content(body: &Value, index: usize) -> String {
    body["choices"][index]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_non_stream_has_exact_shape() {
    let server = TestServer::default().await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("Say hello.", json!({"max_tokens": 8, "seed": 3})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        keys(&body),
        ["choices", "created", "id", "model", "object", "usage"]
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "patient");
    let choice = &body["choices"][0];
    assert_eq!(
        keys(choice),
        ["finish_reason", "index", "logprobs", "message"]
    );
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(keys(&choice["message"]), ["content", "role"]);
    assert_eq!(choice["message"]["role"], "assistant");
    let usage = &body["usage"];
    assert_eq!(
        keys(usage),
        ["completion_tokens", "prompt_tokens", "total_tokens"]
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_stream_follows_include_usage_contract() {
    let server = TestServer::default().await;
    let request = chat(
        "Write a short poem about the sea.",
        json!({"max_tokens": 24, "seed": 9, "temperature": 0.8}),
    );
    let (_, whole) = server.post("/v1/chat/completions", &request).await;
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let reply = server.stream("/v1/chat/completions", &streamed).await;

    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type, "text/event-stream");
    assert_eq!(reply.cache_control, "no-cache");
    assert_eq!(reply.events.last(), Some(&SseEvent::Done));
    let chunks = reply.chunks();
    let first = chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // Every chunk but the usage chunk has one choice with a `finish_reason` key, null until
    // the last content chunk. Every chunk has `usage`, null until the usage chunk.
    let (usage_chunk, content_chunks) = chunks.split_last().unwrap();
    for (i, chunk) in content_chunks.iter().enumerate() {
        assert_eq!(chunk["id"], first["id"]);
        assert_eq!(chunk["usage"], Value::Null, "chunk {i}: {chunk}");
        let choice = &chunk["choices"][0];
        assert!(choice.as_object().unwrap().contains_key("finish_reason"));
        let is_last = i + 1 == content_chunks.len();
        assert_eq!(
            choice["finish_reason"].is_null(),
            !is_last,
            "chunk {i}: {chunk}"
        );
    }
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    assert_eq!(
        content_chunks.last().unwrap()["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(reply.text(0), content(&whole, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_without_include_usage_has_no_usage() {
    let server = TestServer::default().await;
    let reply = server
        .stream(
            "/v1/chat/completions",
            &chat("Hi", json!({"max_tokens": 4, "stream": true})),
        )
        .await;
    for chunk in reply.chunks() {
        assert!(!chunk.as_object().unwrap().contains_key("usage"), "{chunk}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(reply.events.last(), Some(&SseEvent::Done));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_stream_equals_non_stream() {
    let server = TestServer::default().await;
    let request = completion(
        "The capital of France is",
        json!({"max_tokens": 12, "seed": 5, "temperature": 0.7}),
    );
    let (status, whole) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(
        keys(&whole["choices"][0]),
        ["finish_reason", "index", "logprobs", "text"]
    );
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let reply = server.stream("/v1/completions", &streamed).await;
    for chunk in reply.chunks() {
        assert_eq!(chunk["object"], "text_completion");
    }
    assert_eq!(reply.text(0), whole["choices"][0]["text"].as_str().unwrap());
    server.stop().await;
}

/// Greedy text with per-token texts, from chat logprobs.
async fn greedy_tokens(
    server: &TestServer,
    prompt: &str,
    max_tokens: u64,
) -> (String, Vec<String>) {
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat(
                prompt,
                json!({"max_tokens": max_tokens, "temperature": 0, "logprobs": true, "ignore_eos": true}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    (content(&body, 0), tokens)
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_string_inside_and_across_tokens_never_leaks() {
    let server = TestServer::default().await;
    let prompt = "Tell me about the history of Rome.";
    let (text, tokens) = greedy_tokens(&server, prompt, 40).await;
    assert_eq!(tokens.concat(), text, "token texts must add up to the text");
    // A stop string that starts inside a multi-character token (at a token start on a
    // byte-level vocabulary, where every token is one byte) and ends inside the next token.
    let starts: Vec<usize> = tokens
        .iter()
        .scan(0, |offset, t| {
            let start = *offset;
            *offset += t.len();
            Some(start)
        })
        .collect();
    let mut stop = None;
    for i in 3..tokens.len() - 1 {
        let first_char = |t: &str| t.chars().next().map_or(0, char::len_utf8);
        let skip = if tokens[i].chars().count() >= 2 {
            first_char(&tokens[i])
        } else {
            0
        };
        let begin = starts[i] + skip;
        let end = starts[i + 1] + first_char(&tokens[i + 1]);
        if begin >= starts[i + 1] || end <= starts[i + 1] {
            continue;
        }
        let candidate = &text[begin..end];
        if text.find(candidate) == Some(begin) && !candidate.trim().is_empty() {
            stop = Some((begin, candidate.to_string()));
            break;
        }
    }
    let (begin, stop) = stop.expect("no usable stop string in the greedy text");
    let body = chat(
        prompt,
        json!({"max_tokens": 40, "temperature": 0, "ignore_eos": true, "stop": [stop]}),
    );
    let (_, whole) = server.post("/v1/chat/completions", &body).await;
    assert_eq!(content(&whole, 0), &text[..begin], "stop `{stop}`");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let reply = server.stream("/v1/chat/completions", &streamed).await;
    assert_eq!(reply.text(0), &text[..begin], "stream leaked past `{stop}`");
    let last = reply.chunks().last().unwrap()["choices"][0].clone();
    assert_eq!(last["finish_reason"], "stop");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_reason_length_only_at_max_tokens() {
    let server = TestServer::default().await;
    let prompt = "List some fruits.";
    let (text, tokens) = greedy_tokens(&server, prompt, 30).await;
    // Stop at the token that completes a short string in the middle: the reply then ends
    // naturally after `k` tokens.
    let k = tokens.len() / 2;
    let end: usize = tokens[..k].iter().map(String::len).sum();
    let stop = text[..end]
        .char_indices()
        .rev()
        .nth(1)
        .map(|(i, _)| &text[i..end])
        .unwrap()
        .to_string();
    let natural = chat(
        prompt,
        json!({"max_tokens": 30, "temperature": 0, "ignore_eos": true, "stop": stop}),
    );
    let (_, body) = server.post("/v1/chat/completions", &natural).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let natural_tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    for (max_tokens, expected) in [
        (natural_tokens - 1, "length"),
        (natural_tokens, "stop"),
        (natural_tokens + 1, "stop"),
    ] {
        let mut request = natural.clone();
        request["max_tokens"] = json!(max_tokens);
        let (_, body) = server.post("/v1/chat/completions", &request).await;
        assert_eq!(
            body["choices"][0]["finish_reason"], expected,
            "max_tokens {max_tokens}: {body}"
        );
        request["stream"] = json!(true);
        let reply = server.stream("/v1/chat/completions", &request).await;
        let last = reply.chunks().last().unwrap()["choices"][0]["finish_reason"].clone();
        assert_eq!(last, expected, "stream, max_tokens {max_tokens}");
    }
    let (_, body) = server
        .post(
            "/v1/chat/completions",
            &chat(prompt, json!({"max_tokens": 3, "ignore_eos": true})),
        )
        .await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cjk_emoji_stream_matches_non_stream() {
    let server = TestServer::default().await;
    let prompts = [
        "日本語: こんにちは世界 🌏🎉\n中文: 你好世界 😀\n日本語: ありがとう 🙏\n中文:",
        "絵文字だけで答えて: 🍣🍜🍙",
    ];
    let mut saw_multibyte = false;
    for prompt in prompts {
        let request = completion(
            prompt,
            json!({"max_tokens": 24, "temperature": 0.9, "seed": 21}),
        );
        let (_, whole) = server.post("/v1/completions", &request).await;
        let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        // `stream` panics on any payload that is not valid UTF-8 JSON.
        let reply = server.stream("/v1/completions", &streamed).await;
        assert_eq!(reply.text(0), text, "prompt {prompt:?}");
        if server.is_real {
            assert!(
                !text.contains('\u{FFFD}'),
                "replacement character in {text:?}"
            );
        }
        saw_multibyte |= text.chars().any(|c| c.len_utf8() > 1);
    }
    if server.is_real {
        assert!(
            saw_multibyte,
            "the real model wrote no multi-byte character"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_are_indexed_and_counted() {
    let server = TestServer::default().await;
    let request = chat(
        "Name a color.",
        json!({"max_tokens": 6, "n": 3, "seed": 2, "ignore_eos": true}),
    );
    let (_, body) = server.post("/v1/chat/completions", &request).await;
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
    }
    assert_eq!(body["usage"]["completion_tokens"], 18);
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let reply = server.stream("/v1/chat/completions", &streamed).await;
    for i in 0..3 {
        assert_eq!(reply.text(i), content(&body, i as usize), "choice {i}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn steered_request_reports_steering_and_logprobs() {
    let server = TestServer::default().await;
    let request = chat(
        "Describe a cat.",
        json!({
            "max_tokens": 12, "temperature": 0, "ignore_eos": true,
            "doctor": {"name": DOCTOR, "beta": 1.0},
            "logprobs": true, "top_logprobs": 2,
        }),
    );
    let (status, body) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let steering = &choice["steering"];
    assert_eq!(
        keys(steering),
        [
            "changed_tokens",
            "doctors",
            "mean_kl",
            "measured_tokens",
            "patient_alpha"
        ]
    );
    assert_eq!(steering["doctors"], json!([{"name": DOCTOR, "beta": 1.0}]));
    // With logprobs, every token is measured.
    assert_eq!(steering["measured_tokens"], 12);
    assert!(steering["mean_kl"].as_f64().unwrap() > 0.0);
    let entries = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(entries.len(), 12);
    for entry in entries {
        assert_eq!(
            keys(entry),
            [
                "bytes",
                "doctor_logprobs",
                "logprob",
                "patient_logprob",
                "token",
                "top_logprobs"
            ]
        );
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(entry["doctor_logprobs"][0]["name"], DOCTOR);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn steered_completion_reports_row_logprobs() {
    let server = TestServer::default().await;
    let request = completion(
        "The capital of France is",
        json!({
            "max_tokens": 6, "temperature": 0, "ignore_eos": true,
            "doctor": DOCTOR, "logprobs": 2,
        }),
    );
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    let patient = logprobs["patient_token_logprobs"].as_array().unwrap();
    assert_eq!(patient.len(), 6);
    let doctors = logprobs["doctor_token_logprobs"].as_array().unwrap();
    assert_eq!(doctors.len(), 1);
    assert_eq!(doctors[0]["name"], DOCTOR);
    let values = doctors[0]["token_logprobs"].as_array().unwrap();
    assert_eq!(values.len(), 6);
    for value in values {
        let value = value.as_f64().expect("a number, not null");
        assert!(value <= 0.0, "{value}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_through_model_equals_doctor_field() {
    let server = TestServer::default().await;
    let base = json!({"max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let mut by_field = chat("Hello", base.clone());
    by_field["doctor"] = json!(DOCTOR);
    let mut by_model = chat("Hello", base.clone());
    by_model["model"] = json!(DOCTOR);
    let (_, a) = server.post("/v1/chat/completions", &by_field).await;
    let (_, b) = server.post("/v1/chat/completions", &by_model).await;
    assert_eq!(content(&a, 0), content(&b, 0));
    assert_eq!(b["model"], DOCTOR);
    assert_eq!(b["choices"][0]["steering"]["doctors"][0]["name"], DOCTOR);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_beta_reproduces_unsteered_output() {
    let server = TestServer::start(Options {
        patient: Patient::Tiny,
        ..Options::default()
    })
    .await
    .unwrap();
    let base = json!({"max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let (_, plain) = server
        .post("/v1/chat/completions", &chat("abc", base.clone()))
        .await;
    let mut zero = chat("abc", base.clone());
    zero["doctor"] = json!([{"name": DOCTOR, "beta": 0.0}]);
    let (_, steered) = server.post("/v1/chat/completions", &zero).await;
    assert_eq!(content(&plain, 0), content(&steered, 0));
    let mut full = chat("abc", base);
    full["doctor"] = json!([{"name": DOCTOR, "beta": 1.0}]);
    let (_, strong) = server.post("/v1/chat/completions", &full).await;
    assert_ne!(
        content(&plain, 0),
        content(&strong, 0),
        "the test doctor must change the output"
    );
    server.stop().await;
}
