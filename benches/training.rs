//! Training throughput (images/s) of DiT-S/2 and DiT-B/2 on cached 4×32×32 latents (LFM's 256² images through
//! SD's VAE): one full `Trainer` step — flow-matching loss, backward, AdamW — per batch, on cpu, wgpu and (with the
//! `cuda` feature) cuda, against the model's plain forward pass on the same batch measured in the same run. The
//! same cases as `lfm bench training` ([`lfm::bench::training`]).
//!
//! One warm-up step, then `LFM_BENCH_STEPS` (default 3) timed steps. `LFM_BENCH_BATCH` (default 8),
//! `LFM_BENCH_MODELS` (default `DiT-S/2,DiT-B/2`), `LFM_BENCH_BACKENDS` (default `cpu,wgpu`).
//! Run: `cargo bench --features cuda --profile dev --bench training` (`--release` for publishable numbers).

mod common;

use burn::tensor::backend::Backend;
use common::BackendBench;
use lfm::bench::{bench_training, TrainingBenchOptions};

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

/// The training cases set by the environment.
struct Training;

impl BackendBench for Training {
    fn run<B: Backend>(&self, backend: &str, device: &B::Device) {
        let options = TrainingBenchOptions {
            models: var("LFM_BENCH_MODELS", "DiT-S/2,DiT-B/2").split(',').map(|m| m.trim().to_string()).collect(),
            batch: common::env_number("LFM_BENCH_BATCH", 8),
            steps: common::env_number("LFM_BENCH_STEPS", 3),
            ..Default::default()
        };
        bench_training::<B>(device, &options, |c| {
            println!(
                "{backend:5} {:8} batch {:2}: {:7.2} images/s training ({:6.3} s per step), forward alone {:7.2} \
             images/s; step/forward {:4.2}",
                c.model, c.batch, c.images_per_s, c.step_s, c.forward_images_per_s, c.step_over_forward
            )
        })
        .expect("the benchmark's cases run");
    }
}

fn main() {
    common::for_each_backend(&Training);
}
