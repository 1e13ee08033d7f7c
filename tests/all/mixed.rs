//! Mixed-precision training (`--precision f16|bf16`): the 16-bit step against the exact one, f16's loss scaling
//! (overflow, skip, resume) and the command line.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use lfm::backend::Wgpu;
use lfm::checkpoint::read_weights;
use lfm::models::{ModelConfig, Precision, VelocityModel};
use lfm::train::mixed::{LossScaler, INITIAL_LOSS_SCALE};
use lfm::train::{lfm_adamw, Batch, Step, Trainer};

use crate::common::*;
use crate::train::{float64_gradients, max_diff, setup};

/// The golden batch of `fm_loss` on `device`.
fn golden_batch<B: AutodiffBackend>(device: &B::Device) -> Batch<B> {
    let io = io("fm_loss");
    let input = |name| tensor::<B, 4>(get(&io, name), device);
    Batch::new(input("train.z0"), input("train.z1"), tensor(get(&io, "train.t"), device), None)
}

/// `dit_tiny` with its golden weights, for training.
fn golden_model<B: AutodiffBackend>(device: &B::Device) -> VelocityModel<B> {
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny"));
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    VelocityModel::<B>::load(&config, &weights, device).unwrap()
}

/// One mixed-precision step (f16 with loss scaling, or bf16) on the golden batch: the loss and every gradient within
/// the format's rounding of the exact step and measurably different from the f32 step (the passes did run in 16
/// bits), the weights still f32 and updated as the f32 step updates them (AdamW's first step is ±lr per element),
/// and f16's loss scale counting the good step.
pub(crate) fn mixed_precision_step<B: AutodiffBackend>(device: &B::Device, precision: Precision) {
    let rel = if precision == Precision::Bf16 { BF16_REL } else { F16_REL };
    let mut full = Trainer::new(golden_model::<B>(device), lfm_adamw());
    let full_report = full.step(Step::new(golden_batch(device), 1e-4).keeping_grads()).unwrap();
    let mut trainer = Trainer::new(golden_model::<B>(device), lfm_adamw()).with_precision(precision);
    let report = trainer.step(Step::new(golden_batch(device), 1e-4).keeping_grads()).unwrap();
    assert!(!report.skipped, "the first step's gradients are finite");
    let want_loss = get(&io("fm_loss"), "train.loss").to_f32()[0] as f64;
    assert!((report.loss - want_loss).abs() <= rel * want_loss, "loss {} vs {want_loss}", report.loss);

    let (grads, full_grads, exact) = (report.grads.unwrap(), full_report.grads.unwrap(), float64_gradients());
    let mut moved: f64 = 0.0;
    for (key, exact) in &exact {
        let (exact, got, f32_step) = (exact.to_f64(), grads[key].to_f64(), full_grads[key].to_f64());
        let scale = exact.iter().fold(0f64, |m, g| m.max(g.abs()));
        let error = max_diff(&got, &exact);
        assert!(error <= rel * scale, "grad {key}: {error:e} from the exact gradient (largest {scale:e})");
        moved = moved.max(max_diff(&got, &f32_step) / scale);
    }
    eprintln!(
        "{}: gradients differ from the f32 step's by up to {moved:e} of their tensor's largest",
        precision.name()
    );
    assert!(moved > 1e-4, "the {} gradients equal the f32 ones to {moved:e}: the passes ran in f32", precision.name());

    assert_eq!(trainer.model().compute_dtype(), burn::tensor::DType::F32, "the weights stay f32");
    let (after, f32_after) = (trainer.model().state_dict(), full.model().state_dict());
    for (key, want) in &f32_after {
        let step = max_diff(&after[key].to_f64(), &want.to_f64());
        // Elements whose gradient is within 16-bit rounding of zero may step the other way.
        assert!(step <= 2.0001e-4, "{key}: {step:e} from the f32 step's weights (lr 1e-4)");
    }
    let expected = (precision == Precision::F16).then_some(LossScaler { scale: INITIAL_LOSS_SCALE, good_steps: 1 });
    assert_eq!(trainer.loss_scaler(), expected.as_ref());
}

#[test]
fn mixed_precision_f16_training_step_on_wgpu() {
    let Some(device) = wgpu_with_f16() else { return };
    mixed_precision_step::<Autodiff<Wgpu>>(&device, Precision::F16);
}

/// f16 gradients that overflow skip the update (weights, moments and moving average untouched), halve the loss
/// scale and still count the step; the scale travels with the saved state, so a resumed run skips and scales
/// exactly as an uninterrupted one.
#[test]
fn f16_overflow_skips_the_step_and_the_loss_scale_resumes_exactly() {
    let Some(device) = wgpu_with_f16() else { return };
    type A = Autodiff<Wgpu>;
    let fresh = || Trainer::new(golden_model::<A>(&device), lfm_adamw()).with_precision(Precision::F16).with_ema(0.9);
    // 2¹⁰⁰ times the loss overflows f16's gradients (largest 65504); every step below halves the scale again.
    let huge = LossScaler { scale: 2f64.powi(100), good_steps: 0 };
    let mut trainer = fresh().with_loss_scaler(huge.clone());
    let before = trainer.model().state_dict();
    let report = trainer.step(Step::new(golden_batch(&device), 1e-4)).unwrap();
    assert!(report.skipped && report.loss.is_finite(), "{report:?}");
    assert_eq!(trainer.step, 1);
    assert_eq!(trainer.loss_scaler().unwrap().scale, 2f64.powi(99));
    for (key, tensor) in trainer.model().state_dict() {
        assert_eq!(tensor.to_f32(), before[&key].to_f32(), "{key} changed in a skipped step");
    }
    for (key, tensor) in trainer.ema().unwrap().state_dict() {
        assert_eq!(tensor.to_f32(), before[&key].to_f32(), "the moving average of {key} changed in a skipped step");
    }

    let saved = trainer.save_state().unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let report = trainer.step(Step::new(golden_batch(&device), 1e-4)).unwrap();
        outcomes.push((report.skipped, trainer.loss_scaler().unwrap().scale));
    }
    let mut resumed = fresh();
    resumed.load_state(saved, 1, &device).unwrap();
    for (i, want) in outcomes.iter().enumerate() {
        let report = resumed.step(Step::new(golden_batch(&device), 1e-4)).unwrap();
        assert_eq!(&(report.skipped, resumed.loss_scaler().unwrap().scale), want, "step {}", i + 2);
    }
    for (key, tensor) in resumed.model().state_dict() {
        assert_eq!(tensor.to_f32(), trainer.model().state_dict()[&key].to_f32(), "{key} after resuming");
    }
    // A state without a loss scale does not resume an f16 run.
    let plain = Trainer::new(golden_model::<A>(&device), lfm_adamw()).with_ema(0.9);
    let f32_state = plain.save_state().unwrap();
    let err = fresh().load_state(f32_state, 0, &device).err().unwrap();
    assert!(err.contains("no loss scale"), "{err}");
}

/// `lfm train --precision f16`: refused on the cpu backend with the fix; on wgpu (with shader-f16) it trains, logs
/// the loss scale, records the precision and the scale in the checkpoint, and refuses a resume in another precision.
/// It trains from latents encoded beforehand (on the CPU): the autoencoder on wgpu has tests of its own.
#[test]
fn f16_training_from_the_command_line() {
    let s = setup();
    let (out, latents) = (s.root.join("run"), s.root.join("latents.safetensors"));
    let mut encode = vec!["--backend", "cpu", "encode", "--data", &s.data, "--image-size", "16", "--weights", &s.vae];
    encode.extend_from_slice(&["--config", &s.vae_config, "--out", latents.to_str().unwrap()]);
    let (ok, _, stderr) = lfm(&encode);
    assert!(ok, "{stderr}");
    let train = |backend: &str, extra: &[&str]| {
        let mut args = vec!["--backend", backend, "train", "--latents", latents.to_str().unwrap(), "--config"];
        args.extend_from_slice(&[&s.config, "--out", out.to_str().unwrap(), "--batch-size", "4", "--seed", "3"]);
        args.extend_from_slice(extra);
        lfm(&args)
    };
    let (ok, _, stderr) = train("cpu", &["--max-steps", "2", "--precision", "f16"]);
    assert!(!ok && stderr.contains("--precision f16 is not supported") && stderr.contains("use --precision f32"));
    assert!(!out.join("metrics.jsonl").exists(), "nothing was trained");
    if wgpu_with_f16().is_none() {
        return;
    }
    let (ok, _, stderr) = train("wgpu", &["--max-steps", "2", "--precision", "f16"]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert!(line["loss"].as_f64().unwrap().is_finite(), "{line}");
        assert_eq!((&line["loss_scale"], &line["skipped"]), (&serde_json::json!(INITIAL_LOSS_SCALE), &false.into()));
    }
    let state = std::fs::read_to_string(lfm::train::state::StateFolder::of(&out).path().join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["settings"]["precision"], "f16", "{state}");
    assert_eq!(state["loss_scaler"], serde_json::json!({"scale": INITIAL_LOSS_SCALE, "good_steps": 2}), "{state}");
    let (ok, _, stderr) = train("wgpu", &["--max-steps", "4", "--resume"]);
    assert!(!ok && stderr.contains("precision differ"), "{stderr}");
}
