//! Training throughput (images/s) of DiT-S/2 and DiT-B/2 on cached 4×32×32 latents (LFM's 256² images through
//! SD's VAE): one full `Trainer` step — flow-matching loss, backward, AdamW — per batch, on cpu and wgpu. The
//! baseline measured in the same run is the model's plain forward pass on the same batch, so the report gives
//! the step-to-forward time ratio (≈ 3 is the usual cost of forward + backward).
//!
//! One warm-up step, then `LFM_BENCH_STEPS` (default 3) timed steps; each step's loss is read back, which waits
//! for the previous step's update. `LFM_BENCH_BATCH` (default 8), `LFM_BENCH_MODELS` (default `DiT-S/2,DiT-B/2`),
//! `LFM_BENCH_BACKENDS` (default `cpu,wgpu`).
//! Run: `cargo bench --features cuda --profile dev --bench training` (`--release` for publishable numbers).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Tensor};
use lfm::backend::{Cpu, Wgpu, WgpuDevice};
use lfm::models::{DiTConfig, ModelConfig, VelocityModel};
use lfm::train::{lfm_adamw, Batch, Trainer};

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn batch<B: AutodiffBackend>(n: usize, device: &B::Device) -> Batch<B> {
    let latent = |seed| {
        B::seed(device, seed);
        Tensor::<B, 4>::random([n, 4, 32, 32], Distribution::Normal(0.0, 1.0), device)
    };
    let t = Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), device);
    Batch::new(latent(1), latent(2), t, None)
}

fn bench_model<B: AutodiffBackend>(backend: &str, name: &str, n: usize, steps: usize, device: &B::Device) {
    let config = ModelConfig::Dit(DiTConfig::named(name, 32, 4, 1, 0.0).expect("a DiT size such as DiT-B/2"));
    let model = VelocityModel::<B>::init(&config, device);

    // Baseline: the forward pass alone, without autodiff.
    let inner = VelocityModel::<B::InnerBackend>::init(&config, device);
    let input = batch::<B>(n, device);
    let (x, t) = (input.z0.clone().inner(), input.t.clone().inner());
    let forward = || {
        let v = inner.forward(t.clone(), x.clone(), None);
        let _: f32 = v.slice([0..1, 0..1, 0..1, 0..1]).into_scalar().elem();
    };
    forward();
    let start = Instant::now();
    for _ in 0..steps {
        forward();
    }
    let forward_s = start.elapsed().as_secs_f64() / steps as f64;

    let mut trainer = Trainer::new(model, lfm_adamw());
    trainer.step(batch::<B>(n, device), 1e-4, false);
    let start = Instant::now();
    for _ in 0..steps {
        let report = trainer.step(batch::<B>(n, device), 1e-4, false);
        assert!(report.loss.is_finite(), "loss {}", report.loss);
    }
    let step_s = start.elapsed().as_secs_f64() / steps as f64;
    println!(
        "{backend:5} {name:8} batch {n:2}: {:7.2} images/s training ({:6.2} s per step), forward alone {:7.2} \
         images/s; step/forward {:4.2}",
        n as f64 / step_s,
        step_s,
        n as f64 / forward_s,
        step_s / forward_s
    );
}

fn bench_backend<B: Backend>(backend: &str, device: &B::Device) {
    let n: usize = var("LFM_BENCH_BATCH", "8").parse().expect("LFM_BENCH_BATCH is a number");
    let steps: usize = var("LFM_BENCH_STEPS", "3").parse().expect("LFM_BENCH_STEPS is a number");
    for name in var("LFM_BENCH_MODELS", "DiT-S/2,DiT-B/2").split(',') {
        bench_model::<Autodiff<B>>(backend, name.trim(), n, steps, device);
    }
}

fn main() {
    let backends = var("LFM_BENCH_BACKENDS", "cpu,wgpu");
    if backends.contains("cpu") {
        bench_backend::<Cpu>("cpu", &Default::default());
    }
    if backends.contains("wgpu") {
        if lfm::backend::wgpu_adapters().is_empty() {
            println!("wgpu: no adapter, skipped");
        } else {
            bench_backend::<Wgpu>("wgpu", &WgpuDevice::DefaultDevice);
        }
    }
}
