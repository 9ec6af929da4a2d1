//! The engine on tiny random models and on the real patient: steering, determinism,
//! cancellation, preemption, hot swap and text handling.

mod common;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use llmdoctor::doctor::{DoctorBaseSpec, DoctorManifest, DoctorRegistry};
use llmdoctor::engine::core::{start, EngineConfig};
use llmdoctor::engine::handle::EngineHandle;
use llmdoctor::engine::request::{
    DoctorWeight, EosPolicy, Event, FinishReason, GenerationRequest, Steering,
};
use llmdoctor::engine::sampling::{RawSamplingParams, SamplingParams};
use llmdoctor::engine::scheduler::SchedulerConfig;
use llmdoctor::engine::steering::{argmax, combine, SteeringInput, Term};
use llmdoctor::loader::{load_model, LoadedModel};
use llmdoctor::model::lora::{AdapterConfig, Projection};
use llmdoctor::model::tiny::{uniform, TinySpec, TinyWeights};
use llmdoctor::model::{KvCache, LoadOptions, LogitsSelection, LoraAdapter, Row};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::Ordering;

/// The token the marker adapter pushes up: byte `#`.
const MARKER: u32 = b'#' as u32;

struct Reply {
    ids: Vec<u32>,
    text: String,
    reason: FinishReason,
    changed_tokens: Option<usize>,
    measured_tokens: Option<usize>,
    mean_kl: Option<f32>,
}

fn tiny_patient(dir: &Path) -> LoadedModel {
    let weights = TinyWeights::random(TinySpec::default()).unwrap();
    let path = dir.join("tiny.gguf");
    weights.write_gguf(&path, GgmlDType::Q8_0).unwrap();
    load_model(&path, &LoadOptions::default(), &Device::Cpu).unwrap()
}

fn sampling(temperature: f32, seed: Option<u64>) -> SamplingParams {
    SamplingParams::validate(
        RawSamplingParams {
            temperature: Some(temperature),
            seed,
            ..RawSamplingParams::default()
        },
        1 << 20,
    )
    .unwrap()
}

fn request(
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
    steering: Steering,
) -> GenerationRequest {
    GenerationRequest {
        prompt_ids: prompt.to_vec(),
        sampling,
        max_tokens,
        stop_strings: Vec::new(),
        stop_token_ids: Vec::new(),
        eos: EosPolicy::Ignore,
        n: 1,
        steering,
    }
}

fn collect(mut events: llmdoctor::engine::handle::EventReceiver) -> Reply {
    let mut reply = Reply {
        ids: Vec::new(),
        text: String::new(),
        reason: FinishReason::Abort,
        changed_tokens: None,
        measured_tokens: None,
        mean_kl: None,
    };
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(token) => {
                reply.ids.push(token.id);
                reply.text.push_str(&token.text);
            }
            Event::Finished(end) => {
                reply.ids.extend(end.stop_token);
                reply.text.push_str(&end.text);
                reply.reason = end.reason;
                reply.changed_tokens = end.steering.as_ref().map(|s| s.changed_tokens);
                reply.measured_tokens = end.steering.as_ref().map(|s| s.measured_tokens);
                reply.mean_kl = end.steering.map(|s| s.mean_kl);
            }
            Event::Done(_) => break,
            Event::Error(message) => panic!("engine error: {message}"),
        }
    }
    reply
}

fn run(engine: &EngineHandle, request: GenerationRequest) -> Reply {
    collect(engine.submit(request).unwrap())
}

/// Writes a doctor folder whose adapter is `tensors`.
fn write_doctor(
    doctors: &Path,
    name: &str,
    tensors: &HashMap<String, Tensor>,
    base: DoctorBaseSpec,
) {
    let dir = doctors.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    candle_core::safetensors::save(tensors, dir.join("adapter.safetensors")).unwrap();
    let config = AdapterConfig {
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
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    DoctorManifest {
        name: name.into(),
        description: "test doctor".into(),
        base,
        adapter: "adapter.safetensors".into(),
        adapter_config: "adapter_config.json".into(),
        default_beta: 1.0,
        training: toml::Table::new(),
    }
    .write(&dir)
    .unwrap();
}

/// A rank-1 adapter on the last layer's `down_proj`: `B` is `scale` times the embedding row of
/// `token` (the output head is tied), `A` is random, so at positions where `A·x > 0` the
/// residual stream moves toward `token`.
fn marker_adapter(
    model: &LoadedModel,
    token: u32,
    scale: f32,
    seed: u64,
) -> HashMap<String, Tensor> {
    let config = model.model.config();
    let layer = config.num_layers - 1;
    let prefix = Projection::Down.peft_prefix(layer);
    let embedding = TinyWeights::random(TinySpec::default()).unwrap().tensors
        ["model.embed_tokens.weight"]
        .narrow(0, token as usize, 1)
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let a = uniform(&mut rng, (1, config.intermediate_size), 1.0).unwrap();
    let mut tensors = HashMap::new();
    tensors.insert(format!("{prefix}.lora_A.weight"), a);
    tensors.insert(
        format!("{prefix}.lora_B.weight"),
        (embedding * scale as f64).unwrap(),
    );
    tensors
}

fn zero_adapter(model: &LoadedModel) -> HashMap<String, Tensor> {
    let mut tensors = marker_adapter(model, MARKER, 1.0, 1);
    for tensor in tensors.values_mut() {
        if tensor.dims()[1] == 1 {
            *tensor = tensor.zeros_like().unwrap();
        }
    }
    tensors
}

struct Tiny {
    _dir: tempfile::TempDir,
    engine: EngineHandle,
    registry: Arc<DoctorRegistry>,
    patient: LoadedModel,
}

fn tiny_engine(scheduler: SchedulerConfig) -> Tiny {
    tiny_engine_with(EngineConfig {
        scheduler,
        seed: Some(1),
        ..EngineConfig::default()
    })
}

fn tiny_engine_with(config: EngineConfig) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let patient = tiny_patient(dir.path());
    let doctors = dir.path().join("doctors");
    std::fs::create_dir_all(&doctors).unwrap();
    write_doctor(
        &doctors,
        "marker",
        &marker_adapter(&patient, MARKER, 40.0, 3),
        DoctorBaseSpec::Patient,
    );
    write_doctor(
        &doctors,
        "zero",
        &zero_adapter(&patient),
        DoctorBaseSpec::Patient,
    );
    let registry = Arc::new(DoctorRegistry::new(
        doctors,
        patient.clone(),
        LoadOptions::default(),
    ));
    assert!(registry.load_all().is_empty());
    let engine = start(patient.clone(), config).unwrap();
    Tiny {
        _dir: dir,
        engine,
        registry,
        patient,
    }
}

fn steer(registry: &DoctorRegistry, doctors: &[(&str, f32)]) -> Steering {
    Steering {
        alpha: 1.0,
        doctors: doctors
            .iter()
            .map(|(name, beta)| DoctorWeight {
                doctor: registry.get(name).unwrap(),
                beta: *beta,
            })
            .collect(),
    }
}

const PROMPT: &[u32] = &[257, 72, 105, 32, 116, 104, 101, 114, 101, 10];

#[test]
fn zero_beta_is_byte_identical_to_unsteered() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let plain = run(
        &tiny.engine,
        request(PROMPT, 24, sampling(0.0, None), Steering::default()),
    );
    for doctors in [vec![("marker", 0.0)], vec![("marker", 0.0), ("zero", 0.0)]] {
        let steered = run(
            &tiny.engine,
            request(
                PROMPT,
                24,
                sampling(0.0, None),
                steer(&tiny.registry, &doctors),
            ),
        );
        assert_eq!(steered.ids, plain.ids, "{doctors:?}");
        assert_eq!(steered.text, plain.text, "{doctors:?}");
    }
}

#[test]
fn zero_adapter_leaves_greedy_output_unchanged() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let plain = run(
        &tiny.engine,
        request(PROMPT, 24, sampling(0.0, None), Steering::default()),
    );
    for beta in [0.5, 1.0, 4.0] {
        let steered = run(
            &tiny.engine,
            request(
                PROMPT,
                24,
                sampling(0.0, None),
                steer(&tiny.registry, &[("zero", beta)]),
            ),
        );
        assert_eq!(steered.ids, plain.ids, "β = {beta}");
        assert_eq!(steered.changed_tokens, Some(0), "β = {beta}");
    }
}

#[test]
fn marker_doctor_makes_marker_appear() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let plain = run(
        &tiny.engine,
        request(PROMPT, 32, sampling(0.0, None), Steering::default()),
    );
    let plain_count = plain.ids.iter().filter(|&&t| t == MARKER).count();
    let steered = run(
        &tiny.engine,
        request(
            PROMPT,
            32,
            sampling(0.0, None),
            steer(&tiny.registry, &[("marker", 1.0)]),
        ),
    );
    let steered_count = steered.ids.iter().filter(|&&t| t == MARKER).count();
    assert!(
        steered_count >= plain_count + 4,
        "marker appears {steered_count} times steered, {plain_count} unsteered"
    );
    assert!(steered.changed_tokens.unwrap() > 0);
}

#[test]
fn stop_string_across_tokens_never_leaks() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let plain = run(
        &tiny.engine,
        request(PROMPT, 40, sampling(0.0, None), Steering::default()),
    );
    // Byte tokens: any 3-character window spans 3 tokens.
    let chars: Vec<char> = plain.text.chars().collect();
    assert!(chars.len() > 12, "reply too short: {:?}", plain.text);
    let stop: String = chars[6..9].iter().collect();
    let cut = plain.text.find(&stop).unwrap();
    let mut stopped_request = request(PROMPT, 40, sampling(0.0, None), Steering::default());
    stopped_request.stop_strings = vec![stop.clone()];
    let stopped = run(&tiny.engine, stopped_request);
    assert_eq!(stopped.reason, FinishReason::Stop);
    assert_eq!(stopped.text, plain.text[..cut], "stop string {stop:?}");
}

#[test]
fn max_tokens_finishes_with_length() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let reply = run(
        &tiny.engine,
        request(PROMPT, 7, sampling(0.0, None), Steering::default()),
    );
    assert_eq!(reply.reason, FinishReason::Length);
    assert_eq!(reply.ids.len(), 7);
}

#[test]
fn preemption_completes_everything_with_same_outputs() {
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..10 + 7 * i).map(|j| (i * 13 + j * 5) % 256).collect())
        .collect();
    let unconstrained = tiny_engine(SchedulerConfig::default());
    let bytes_per_token = unconstrained.patient.model.config().kv_bytes_per_token();
    let tight = tiny_engine(SchedulerConfig {
        kv_budget_bytes: 160 * bytes_per_token,
        ..SchedulerConfig::default()
    });
    // The marker doctor forks from the patient row at the last layer, so the steered case
    // also checks that recomputation rebuilds forked caches.
    for doctors in [vec![], vec![("marker", 0.7)]] {
        let expected: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let steering = steer(&unconstrained.registry, &doctors);
                run(
                    &unconstrained.engine,
                    request(p, 40, sampling(0.0, None), steering),
                )
                .ids
            })
            .collect();

        let before = tight.engine.state().prefill_tokens.load(Ordering::Relaxed);
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| {
                let steering = steer(&tight.registry, &doctors);
                tight
                    .engine
                    .submit(request(p, 40, sampling(0.0, None), steering))
                    .unwrap()
            })
            .collect();
        for (index, receiver) in receivers.into_iter().enumerate() {
            let reply = collect(receiver);
            assert_eq!(reply.ids, expected[index], "{doctors:?}, request {index}");
        }
        let after = tight.engine.state().prefill_tokens.load(Ordering::Relaxed);
        let prompt_total: usize = prompts.iter().map(Vec::len).sum();
        assert!(
            after - before > prompt_total as u64,
            "{doctors:?}: no request was preempted ({} prefill tokens for {prompt_total} prompt \
             tokens)",
            after - before
        );
    }
}

fn wait_until(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the engine"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dropped_receiver_frees_kv_cache() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let state = tiny.engine.state();
    let before = state.kv_used_bytes.load(Ordering::Relaxed);
    let mut events = tiny
        .engine
        .submit(request(
            PROMPT,
            200,
            sampling(0.0, None),
            Steering::default(),
        ))
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(events.blocking_recv(), Some(Event::Token(_))));
    }
    assert!(state.kv_used_bytes.load(Ordering::Relaxed) > before);
    drop(events);
    wait_until(|| {
        state.kv_used_bytes.load(Ordering::Relaxed) == before
            && state.running.load(Ordering::Relaxed) == 0
    });
}

#[test]
fn request_cancelled_while_waiting_is_never_prefilled() {
    let tiny = tiny_engine(SchedulerConfig {
        max_num_seqs: 1,
        ..SchedulerConfig::default()
    });
    let first = tiny
        .engine
        .submit(request(
            PROMPT,
            60,
            sampling(0.0, None),
            Steering::default(),
        ))
        .unwrap();
    let waiting = tiny
        .engine
        .submit(request(
            &[65; 30],
            10,
            sampling(0.0, None),
            Steering::default(),
        ))
        .unwrap();
    drop(waiting);
    let reply = collect(first);
    assert_eq!(reply.ids.len(), 60);
    // Let the engine run one more iteration over the cancelled request.
    std::thread::sleep(Duration::from_millis(300));
    let prefilled = tiny.engine.state().prefill_tokens.load(Ordering::Relaxed);
    assert_eq!(
        prefilled,
        PROMPT.len() as u64,
        "the cancelled request was prefilled"
    );
}

#[test]
fn hot_swap_keeps_running_requests_on_old_version() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let doctors_dir = tiny.registry.dir().to_path_buf();
    let old_adapter = marker_adapter(&tiny.patient, MARKER, 40.0, 3);
    let new_adapter = marker_adapter(&tiny.patient, b'!' as u32, 40.0, 5);
    let greedy = |steering: Steering| request(PROMPT, 30, sampling(0.0, None), steering);

    write_doctor(&doctors_dir, "swap", &old_adapter, DoctorBaseSpec::Patient);
    tiny.registry.load("swap").unwrap();
    let old_reference = run(
        &tiny.engine,
        greedy(steer(&tiny.registry, &[("swap", 1.0)])),
    );
    write_doctor(&doctors_dir, "swap", &new_adapter, DoctorBaseSpec::Patient);
    tiny.registry.load("swap").unwrap();
    let new_reference = run(
        &tiny.engine,
        greedy(steer(&tiny.registry, &[("swap", 1.0)])),
    );
    assert_ne!(
        old_reference.ids, new_reference.ids,
        "the two versions must differ"
    );

    write_doctor(&doctors_dir, "swap", &old_adapter, DoctorBaseSpec::Patient);
    tiny.registry.load("swap").unwrap();
    let mut in_flight: Vec<_> = (0..4)
        .map(|_| {
            tiny.engine
                .submit(greedy(steer(&tiny.registry, &[("swap", 1.0)])))
                .unwrap()
        })
        .collect();
    let mut first_ids = Vec::new();
    for events in &mut in_flight {
        match events.blocking_recv() {
            Some(Event::Token(token)) => first_ids.push(token.id),
            other => panic!("expected a token, got {other:?}"),
        }
    }
    write_doctor(&doctors_dir, "swap", &new_adapter, DoctorBaseSpec::Patient);
    tiny.registry.load("swap").unwrap();
    let after_swap = run(
        &tiny.engine,
        greedy(steer(&tiny.registry, &[("swap", 1.0)])),
    );
    assert_eq!(
        after_swap.ids, new_reference.ids,
        "a new request must use the new version"
    );
    for (index, events) in in_flight.into_iter().enumerate() {
        let mut reply = collect(events);
        reply.ids.insert(0, first_ids[index]);
        assert_eq!(
            reply.ids, old_reference.ids,
            "request {index} changed version mid-flight"
        );
    }

    // Unloading a doctor in use does not disturb its request.
    let events = tiny
        .engine
        .submit(greedy(steer(&tiny.registry, &[("swap", 1.0)])))
        .unwrap();
    tiny.registry.unload("swap").unwrap();
    assert_eq!(collect(events).ids, new_reference.ids);
    assert!(tiny.registry.get("swap").is_err());
}

#[test]
fn doctor_with_other_vocabulary_is_rejected() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let doctors_dir = tiny.registry.dir().to_path_buf();
    // A base whose vocabulary differs in one token string.
    let spec = TinySpec {
        seed: 99,
        ..TinySpec::default()
    };
    let weights = TinyWeights::random(spec).unwrap();
    let base_dir = doctors_dir.join("alien");
    std::fs::create_dir_all(&base_dir).unwrap();
    weights.write_hf_dir(&base_dir.join("base")).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let path = base_dir.join("base").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("<|im_end|>", "<|eot_id|>")).unwrap();
    }
    write_doctor(
        &doctors_dir,
        "alien",
        &zero_adapter(&tiny.patient),
        DoctorBaseSpec::Path("base".into()),
    );

    let before: Vec<String> = tiny
        .registry
        .list()
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    let err = tiny.registry.load("alien").unwrap_err().to_string();
    assert!(err.contains("cannot steer this patient"), "{err}");
    assert!(err.contains("<|eot_id|>"), "{err}");
    let after: Vec<String> = tiny
        .registry
        .list()
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn doctor_with_separate_base_runs_its_own_forward() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let doctors_dir = tiny.registry.dir().to_path_buf();
    // Same vocabulary, other weights.
    let spec = TinySpec {
        seed: 42,
        ..TinySpec::default()
    };
    let base_dir = doctors_dir.join("other");
    std::fs::create_dir_all(&base_dir).unwrap();
    TinyWeights::random(spec)
        .unwrap()
        .write_gguf(&base_dir.join("base.gguf"), GgmlDType::Q8_0)
        .unwrap();
    write_doctor(
        &doctors_dir,
        "other",
        &zero_adapter(&tiny.patient),
        DoctorBaseSpec::Path("base.gguf".into()),
    );
    tiny.registry.load("other").unwrap();
    let plain = run(
        &tiny.engine,
        request(PROMPT, 24, sampling(0.0, None), Steering::default()),
    );
    let steered = run(
        &tiny.engine,
        request(
            PROMPT,
            24,
            sampling(0.0, None),
            steer(&tiny.registry, &[("other", 2.0)]),
        ),
    );
    assert_ne!(
        plain.ids, steered.ids,
        "a doctor with its own weights must change the output"
    );
}

/// Returns the greedy tokens of `alpha · patient + beta · doctor`, computed on the model with
/// full rows for the patient and the doctor (no fork), their final hidden states mixed, then
/// the output layer and the steering code's log-softmax.
fn reference_greedy(
    patient: &LoadedModel,
    adapter: &LoraAdapter,
    alpha: f32,
    beta: f32,
    count: usize,
) -> Vec<u32> {
    let model = &patient.model;
    let (mut patient_cache, mut doctor_cache) = (KvCache::new(), KvCache::new());
    let mut chunk = PROMPT.to_vec();
    let mut ids = Vec::new();
    for _ in 0..count {
        let mut rows = [
            Row {
                tokens: &chunk,
                cache: &mut patient_cache,
                adapter: None,
                logits: LogitsSelection::Last,
                fork_from: None,
            },
            Row {
                tokens: &chunk,
                cache: &mut doctor_cache,
                adapter: Some(adapter),
                logits: LogitsSelection::Last,
                fork_from: None,
            },
        ];
        let hidden = model.forward_hidden(&mut rows).unwrap();
        let mixed = (hidden[0].affine(f64::from(alpha), 0.0).unwrap()
            + hidden[1].affine(f64::from(beta), 0.0).unwrap())
        .unwrap();
        let logits = model.lm_head(&mixed).unwrap().flatten_all().unwrap();
        let logits = logits.to_vec1::<f32>().unwrap();
        let mut steered = Vec::new();
        let terms = [Term {
            weight: 1.0,
            logits: &logits,
        }];
        let input = SteeringInput {
            terms: &terms,
            patient: None,
        };
        combine(&input, &mut steered).unwrap();
        let next = argmax(&steered).unwrap();
        ids.push(next);
        chunk = vec![next];
    }
    ids
}

/// The marker doctor changes only the last layer, so its rows take over the patient row's
/// hidden states below it, and the engine mixes its final hidden state with the patient's
/// before one output row. Computed on the model with full rows and the same mix, the greedy
/// tokens must be exactly the same.
#[test]
fn steered_tokens_match_a_mixed_full_forward() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let doctor = tiny.registry.get("marker").unwrap();
    for (alpha, beta) in [(1.0, 0.7), (0.6, 1.3)] {
        let expected = reference_greedy(&tiny.patient, &doctor.adapter, alpha, beta, 24);
        let plain = reference_greedy(&tiny.patient, &doctor.adapter, 1.0, 0.0, 24);
        assert_ne!(expected, plain, "the doctor must change the output");
        let mut steering = steer(&tiny.registry, &[("marker", beta)]);
        steering.alpha = alpha;
        let steered = run(
            &tiny.engine,
            request(PROMPT, 24, sampling(0.0, None), steering),
        );
        assert_eq!(steered.ids, expected, "α = {alpha}, β = {beta}");
    }
}

/// The measured tokens start at a phase drawn from the seed, so short replies are not always
/// measured on their first token. Four tokens at interval 8 include the phase only when it is
/// below 4.
#[test]
fn stats_phase_depends_on_the_seed() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let measured: Vec<usize> = (0..12)
        .map(|seed| {
            let steering = steer(&tiny.registry, &[("marker", 0.7)]);
            let reply = run(
                &tiny.engine,
                request(PROMPT, 4, sampling(1.0, Some(seed)), steering),
            );
            reply.measured_tokens.unwrap()
        })
        .collect();
    assert!(measured.iter().all(|&m| m <= 1), "{measured:?}");
    assert!(measured.contains(&0), "{measured:?}");
    assert!(measured.contains(&1), "{measured:?}");
}

/// α = 0 with every β = 0 leaves nothing of either distribution: the steered distribution is
/// uniform, and the request still completes.
#[test]
fn zero_alpha_and_beta_sample_uniformly() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let mut steering = steer(&tiny.registry, &[("marker", 0.0)]);
    steering.alpha = 0.0;
    let reply = run(
        &tiny.engine,
        request(PROMPT, 40, sampling(1.0, Some(3)), steering),
    );
    assert_eq!(reply.ids.len(), 40);
    assert_eq!(reply.reason, FinishReason::Length);
    // KL(uniform ‖ patient) is positive for any patient that is not uniform.
    assert!(reply.mean_kl.unwrap() > 0.0);
    let distinct: std::collections::HashSet<u32> = reply.ids.iter().copied().collect();
    assert!(distinct.len() > 20, "{} distinct tokens", distinct.len());
}

/// Measuring steering statistics adds the patient's own output row but must not change what
/// is sampled: every interval, and a request with logprobs, gives the same tokens.
#[test]
fn stats_interval_changes_only_the_measured_tokens() {
    let sampled = |interval: usize, top_logprobs: Option<i64>| {
        let tiny = tiny_engine_with(EngineConfig {
            seed: Some(1),
            steering_stats_interval: NonZeroUsize::new(interval).unwrap(),
            ..EngineConfig::default()
        });
        let params = SamplingParams::validate(
            RawSamplingParams {
                temperature: Some(1.0),
                seed: Some(5),
                top_logprobs,
                ..RawSamplingParams::default()
            },
            1 << 20,
        )
        .unwrap();
        let steering = steer(&tiny.registry, &[("marker", 0.7)]);
        run(&tiny.engine, request(PROMPT, 20, params, steering))
    };
    let every = sampled(1, None);
    let sparse = sampled(8, None);
    let with_logprobs = sampled(8, Some(2));
    assert_eq!(every.ids.len(), 20);
    assert_eq!(sparse.ids, every.ids);
    assert_eq!(with_logprobs.ids, every.ids);
    assert_eq!(every.measured_tokens, Some(20));
    // Tokens p, p + 8 and p + 16 for a phase p below 8: three when p < 4, else two.
    let sparse_measured = sparse.measured_tokens.unwrap();
    assert!((2..=3).contains(&sparse_measured), "{sparse_measured}");
    assert_eq!(with_logprobs.measured_tokens, Some(20));
    assert!(every.changed_tokens.unwrap() > 0);
    assert!(every.mean_kl.unwrap() > 0.0);
    assert!(sparse.mean_kl.unwrap() > 0.0);
    assert_eq!(with_logprobs.mean_kl, every.mean_kl);
}

#[test]
fn n_choices_share_prefill_and_differ() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let mut req = request(PROMPT, 12, sampling(1.0, Some(5)), Steering::default());
    req.n = 3;
    let mut events = tiny.engine.submit(req).unwrap();
    let mut per_choice: HashMap<usize, Vec<u32>> = HashMap::new();
    let mut finished = 0;
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(token) => per_choice.entry(token.choice).or_default().push(token.id),
            Event::Finished(_) => finished += 1,
            Event::Done(usage) => {
                assert_eq!(usage.completion_tokens, 36);
                break;
            }
            Event::Error(message) => panic!("{message}"),
        }
    }
    assert_eq!(finished, 3);
    assert_eq!(per_choice.len(), 3);
    assert_ne!(per_choice[&0], per_choice[&1]);
    let prefilled = tiny.engine.state().prefill_tokens.load(Ordering::Relaxed);
    assert_eq!(
        prefilled,
        PROMPT.len() as u64,
        "the prompt must be prefilled once"
    );
}

/// Seeded sampling on the real model gives the same tokens alone and among 7 other requests
/// of different lengths, with and without a doctor.
#[test]
fn real_model_seeded_output_independent_of_batch() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let patient = load_model(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    let doctors = dir.path().join("doctors");
    // A random low-rank adapter on the real model.
    let config = patient.model.config().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let prefix = Projection::Down.peft_prefix(config.num_layers - 1);
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("{prefix}.lora_A.weight"),
        uniform(&mut rng, (1, config.intermediate_size), 0.05).unwrap(),
    );
    tensors.insert(
        format!("{prefix}.lora_B.weight"),
        uniform(&mut rng, (config.hidden_size, 1), 0.5).unwrap(),
    );
    write_doctor(&doctors, "random", &tensors, DoctorBaseSpec::Patient);
    let registry = DoctorRegistry::new(doctors, patient.clone(), LoadOptions::default());
    registry.load("random").unwrap();
    let engine = start(patient.clone(), EngineConfig::default()).unwrap();
    let tokenizer = patient.tokenizer.clone();
    let prompt_of = |text: &str| llmdoctor::generate::prompt_ids(&tokenizer, None, text).unwrap();

    let target_prompt = prompt_of("Write a short poem about the moon.");
    for steering in [Steering::default(), steer(&registry, &[("random", 0.7)])] {
        let target = || {
            request(
                &target_prompt,
                16,
                sampling(0.9, Some(1234)),
                steering.clone(),
            )
        };
        let alone = run(&engine, target());
        let others: Vec<_> = (0..7)
            .map(|i| {
                let text = format!(
                    "Question {i}: {}",
                    "tell me something interesting. ".repeat(i + 1)
                );
                engine
                    .submit(request(
                        &prompt_of(&text),
                        8 + 2 * i,
                        sampling(1.0, Some(i as u64)),
                        steering.clone(),
                    ))
                    .unwrap()
            })
            .collect();
        let together = run(&engine, target());
        for other in others {
            collect(other);
        }
        assert_eq!(
            alone.ids,
            together.ids,
            "steered: {}",
            steering.is_steered()
        );
    }
    engine.shutdown();
}

/// Streaming CJK and emoji from the real model: the deltas never split a character and add up
/// to the decoded ids.
#[test]
fn real_model_deltas_are_whole_characters() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let patient = load_model(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    let tokenizer = patient.tokenizer.clone();
    let engine = start(patient, EngineConfig::default()).unwrap();
    let prompts = [
        "Repeat exactly: 日本語のテキスト、中文字符、한국어 🙂🚀🎉",
        "Write three emoji and the Japanese word for cat.",
    ];
    for (index, text) in prompts.iter().enumerate() {
        let prompt = llmdoctor::generate::prompt_ids(&tokenizer, None, text).unwrap();
        let mut events = engine
            .submit(request(
                &prompt,
                48,
                sampling(0.8, Some(index as u64)),
                Steering::default(),
            ))
            .unwrap();
        let mut ids = Vec::new();
        let mut streamed = String::new();
        let mut replacement_chars = 0;
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Token(token) => {
                    ids.push(token.id);
                    replacement_chars += token.text.matches('\u{FFFD}').count();
                    streamed.push_str(&token.text);
                }
                Event::Finished(end) => {
                    // A generation cut off inside a character ends with its bytes flushed as
                    // U+FFFD, as the full decode shows them.
                    replacement_chars += end.text.matches('\u{FFFD}').count();
                    streamed.push_str(&end.text);
                }
                Event::Done(_) => break,
                Event::Error(message) => panic!("{message}"),
            }
        }
        let decoded = tokenizer.decode(&ids).unwrap();
        assert_eq!(streamed, decoded, "prompt {index}");
        // A U+FFFD in a delta is right only where the model itself produced invalid bytes, and
        // the full decode shows those too. A split character would add one more.
        assert_eq!(
            replacement_chars,
            decoded.matches('\u{FFFD}').count(),
            "split character in {streamed:?}"
        );
        assert!(
            !streamed.is_ascii() || index == 1,
            "expected non-ASCII output: {streamed:?}"
        );
    }
    engine.shutdown();
}

#[test]
fn full_queue_is_overloaded() {
    let tiny = tiny_engine(SchedulerConfig {
        max_num_seqs: 1,
        max_waiting: 2,
        ..SchedulerConfig::default()
    });
    let mut receivers = Vec::new();
    let mut overloaded = 0;
    for _ in 0..6 {
        match tiny.engine.submit(request(
            PROMPT,
            50,
            sampling(0.0, None),
            Steering::default(),
        )) {
            Ok(receiver) => receivers.push(receiver),
            Err(llmdoctor::engine::handle::EngineError::Overloaded { waiting }) => {
                assert!(waiting >= 2);
                overloaded += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert!(
        overloaded >= 3,
        "only {overloaded} of 6 requests were rejected"
    );
    for receiver in receivers {
        assert_eq!(collect(receiver).ids.len(), 50);
    }
}

#[test]
fn stop_token_ids_end_the_choice() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let plain = run(
        &tiny.engine,
        request(PROMPT, 20, sampling(0.0, None), Steering::default()),
    );
    let stop_id = plain.ids[5];
    let cut = plain.ids.iter().position(|&id| id == stop_id).unwrap();
    let mut stopped_request = request(PROMPT, 20, sampling(0.0, None), Steering::default());
    stopped_request.stop_token_ids = vec![stop_id];
    let stopped = run(&tiny.engine, stopped_request);
    assert_eq!(stopped.reason, FinishReason::Stop);
    // The stop token is reported among the ids but has no text.
    assert_eq!(stopped.ids, plain.ids[..=cut]);
    let expected_text = tiny.patient.tokenizer.decode(&plain.ids[..cut]).unwrap();
    assert_eq!(stopped.text, expected_text);
}

#[test]
fn logprobs_report_alternatives_and_rows() {
    let tiny = tiny_engine(SchedulerConfig::default());
    let params = SamplingParams::validate(
        RawSamplingParams {
            temperature: Some(0.0),
            top_logprobs: Some(3),
            ..RawSamplingParams::default()
        },
        1 << 20,
    )
    .unwrap();
    let steering = steer(&tiny.registry, &[("marker", 0.5)]);
    let mut events = tiny
        .engine
        .submit(request(PROMPT, 6, params, steering))
        .unwrap();
    let mut seen = 0;
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(token) => {
                let logprobs = token.logprobs.expect("logprobs were requested");
                assert_eq!(logprobs.top.len(), 3);
                assert!(logprobs.logprob <= 0.0);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(logprobs.top[0].0, token.id);
                assert!((logprobs.top[0].1 - logprobs.logprob).abs() < 1e-6);
                assert!(logprobs.patient <= 0.0);
                assert_eq!(logprobs.doctors.len(), 1);
                seen += 1;
            }
            Event::Done(_) => break,
            Event::Error(message) => panic!("{message}"),
            Event::Finished(_) => {}
        }
    }
    assert_eq!(seen, 6);
}
