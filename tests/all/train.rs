//! One training step against `golden/fm_loss`: the loss, every gradient and the parameters after AdamW.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::{read_safetensors, read_weights};
use lfm::models::{ModelConfig, VelocityModel};
use lfm::train::{lfm_adamw, Batch, Trainer};

use crate::common::*;

fn training_step<B: AutodiffBackend>(device: &B::Device, grad_rel: f64, param_abs: f64) {
    let io = io("fm_loss");
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny"));
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    let model = VelocityModel::<B>::load(&config, &weights, device).unwrap();
    // The forward pass in train mode (no label dropout for this model) is the reference's.
    let v = model.forward(tensor(get(&io, "train.t"), device), tensor(get(&io, "train.x_t"), device), None);
    assert_close("train.v", &values(v), &get(&io, "train.v").to_f32(), 1e-5, 1e-6);

    let mut trainer = Trainer::new(model, lfm_adamw());
    let batch = Batch {
        z0: tensor(get(&io, "train.z0"), device),
        z1: tensor(get(&io, "train.z1"), device),
        t: tensor(get(&io, "train.t"), device),
        y: None,
    };
    let report = trainer.step(batch, 1e-4, true);
    let want_loss = get(&io, "train.loss").to_f32()[0] as f64;
    assert!((report.loss - want_loss).abs() <= 1e-5 * want_loss, "loss {} vs {want_loss}", report.loss);

    let grads = report.grads.unwrap();
    let (golden_grads, _) = read_safetensors(&fixture("fm_loss/grads.safetensors")).unwrap();
    assert_eq!(grads.keys().collect::<Vec<_>>(), golden_grads.keys().collect::<Vec<_>>(), "parameters with a gradient");
    for (key, want) in &golden_grads {
        assert_eq!(grads[key].shape, want.shape, "{key}");
        assert_close(&format!("grad {key}"), &grads[key].to_f32(), &want.to_f32(), grad_rel, 1e-9);
    }

    // Below this |g| the gradient's own float32 error (1e-4 of its tensor's max) can reach |g|.
    const SENSITIVE: f32 = 1e-6;
    // AdamW's first step moves each element by lr·g/(|g| + eps): ±lr where |g| ≫ eps = 1e-8, but where |g| is
    // within a few orders of eps the step depends on the last bits of g, which float32 backprop does not fix. Those
    // elements are only held to the step bound |Δ| ≤ lr.
    let (after, _) = read_safetensors(&fixture("fm_loss/after_step.safetensors")).unwrap();
    let params = trainer.model().state_dict();
    let mut sensitive = 0;
    for (key, want) in &after {
        let (got, want, before) = (params[key].to_f32(), want.to_f32(), weights[key].to_f32());
        let grad = golden_grads.get(key).map(|g| g.to_f32());
        for i in 0..want.len() {
            let g = grad.as_ref().map_or(0.0, |g| g[i].abs());
            if g >= SENSITIVE || grad.is_none() {
                let diff = (got[i] - want[i]).abs() as f64;
                assert!(diff <= param_abs, "{key}[{i}] after the step: got {}, ref {} (|g| = {g:e})", got[i], want[i]);
            } else {
                sensitive += 1;
                assert!((got[i] - before[i]).abs() <= 1.0001e-4, "{key}[{i}] moved by more than lr");
            }
        }
    }
    eprintln!(
        "{sensitive} of {} parameters have |g| < {SENSITIVE:e} and are held only to the step bound",
        params.values().map(|t| t.numel()).sum::<usize>()
    );
}

#[test]
fn one_training_step_matches_the_reference_on_cpu() {
    training_step::<Autodiff<Cpu>>(&cpu(), 1e-4, 1e-6);
}

#[test]
fn one_training_step_matches_the_reference_on_wgpu() {
    let Some(device) = wgpu() else { return };
    training_step::<Autodiff<Wgpu>>(&device, 1e-4, 1e-6);
}
