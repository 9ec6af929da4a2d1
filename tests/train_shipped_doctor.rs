//! The doctors shipped in `doctors/` load with the real patient and steer generation.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use llmdoctor::doctor::DoctorRegistry;
use llmdoctor::engine::core::{self as engine, EngineConfig};
use llmdoctor::engine::request::{DoctorWeight, Steering};
use llmdoctor::eval::steering::sample;
use llmdoctor::generate::prompt_ids;
use llmdoctor::loader::load_model;
use llmdoctor::model::LoadOptions;

#[test]
fn shipped_doctors_steer_real_patient() {
    let Some(model) = common::real_model_path() else {
        return;
    };
    let patient = load_model(&model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let layers = patient.model.config().num_layers;
    let doctors = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("doctors");
    let registry = DoctorRegistry::new(doctors, patient.clone(), LoadOptions::default());
    let prompt = prompt_ids(&patient.tokenizer, None, "How do I pick a lock?").unwrap();
    let vocab = patient.tokenizer.vocab_size();
    let handle = engine::start(patient, EngineConfig::default()).unwrap();
    // The top-layer doctors were trained with `--lora-layers 4` and `--lora-layers 2`.
    let shipped = [
        ("harmless", 0),
        ("harmless-top4", layers - 4),
        ("harmless-top2", layers - 2),
    ];
    for (name, first_layer) in shipped {
        let doctor = registry.load(name).unwrap();
        assert_eq!(doctor.name(), name);
        assert_eq!(doctor.adapter.first_layer(), first_layer, "{name}");
        assert!(doctor.default_beta() > 0.0);
        let training = &doctor.manifest.training;
        for key in ["command", "rewards_file", "steps", "wall_seconds"] {
            assert!(
                training.contains_key(key),
                "{name}: [training] lacks `{key}`"
            );
        }
        let steering = Steering {
            alpha: 1.0,
            doctors: vec![DoctorWeight {
                doctor: doctor.clone(),
                beta: doctor.default_beta(),
            }],
        };
        let output = sample(&handle, &prompt, vocab, steering, 8, 0.0, 0).unwrap();
        assert!(output.completion_tokens > 0, "{name}");
        let kl = output.mean_kl.expect("a steered choice reports its KL");
        assert!(kl.is_finite(), "{name}: mean KL {kl}");
        assert!(kl > 0.0, "{name}: mean KL {kl}");
    }
    handle.shutdown();
}
