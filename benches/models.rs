//! Forward-pass throughput of DiT-B/2 and of the celeb256 guided-diffusion UNet on 4×32×32 latents, batch 1 and 8,
//! on cpu, wgpu and (with the `cuda` feature) cuda, in GFLOP/s from the analytic FLOP count (`ModelConfig::flops`:
//! 2 per multiply-add of every convolution, linear layer and attention matmul).
//!
//! A full-size forward pass takes seconds on a CPU, so this is a plain harness rather than criterion: one warm-up
//! pass, then `LFM_BENCH_REPS` (default 3) timed passes; the median is reported.
//! `LFM_BENCH_BACKENDS` (default `cpu,wgpu`) picks the backends.
//! Run: `cargo bench --features cuda --profile dev --bench models` (`--release` for publishable numbers).

mod common;

use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
use common::BackendBench;
use lfm::models::{DiTConfig, ModelConfig, Preset, VelocityModel};

fn bench_model<B: Backend>(backend: &str, name: &str, config: &ModelConfig, device: &B::Device, reps: usize) {
    let model = VelocityModel::<B>::init(config, device);
    let side = config.latent_size();
    for batch in [1usize, 8] {
        let x = Tensor::<B, 4>::random([batch, 4, side, side], Distribution::Normal(0.0, 1.0), device);
        let t = Tensor::<B, 1>::from_floats([0.5], device);
        let run = || {
            let v = model.forward(t.clone(), x.clone(), None);
            // Reading one value back waits for the device.
            let _: f32 = v.slice([0..1, 0..1, 0..1, 0..1]).into_scalar().elem();
        };
        let time = common::median_time(reps, run);
        let gflop = config.flops() * batch as f64 / 1e9;
        println!(
            "{backend:5} {name:22} batch {batch}: {:9.1} ms  {:7.1} GFLOP  {:7.1} GFLOP/s",
            time.as_secs_f64() * 1e3,
            gflop,
            gflop / time.as_secs_f64()
        );
    }
}

/// DiT-B/2 and the celeb256 UNet, median of `reps` runs.
struct Models {
    reps: usize,
}

impl BackendBench for Models {
    fn run<B: Backend>(&self, backend: &str, device: &B::Device) {
        let Self { reps } = *self;
        let dit = ModelConfig::Dit(DiTConfig::named("DiT-B/2", 32, 4, 1, 0.0).expect("named size"));
        let unet = Preset::find("celeb256_adm").expect("preset").model();
        bench_model::<B>(backend, "DiT-B/2", &dit, device, reps);
        bench_model::<B>(backend, "celeb256 guided UNet", &unet, device, reps);
    }
}

fn main() {
    common::for_each_backend(&Models { reps: common::env_number("LFM_BENCH_REPS", 3) });
}
