//! End-to-end sampling cost: seconds per image and NFE for DiT-B/2 (random weights, every layer non-zero) with
//! dopri5 at rtol = atol = 1e-5 and with euler at 100 steps, at several batch sizes, on cpu, wgpu and (with the
//! `cuda` feature) cuda. The same cases as `lfm bench sampling` ([`lfm::bench::sampling`]).
//!
//! A DiT-B/2 forward pass costs 46 GFLOP per image, so a full run is hours on a 2-core CPU or on lavapipe; choose the
//! cases with `LFM_BENCH_BATCHES` (default `1,16`), `LFM_BENCH_BACKENDS` (default `cpu,wgpu`), `LFM_BENCH_SOLVERS`
//! (default `dopri5,euler`) and `LFM_BENCH_PRECISIONS` (default `f32`; `f16`, `bf16` where the device has them);
//! `LFM_BENCH_WARMUP=1` runs each case once untimed first (GPU backends compile and autotune kernels on first use).
//! Run: `cargo bench --features cuda --profile dev --bench sampling`.

mod common;

use burn::tensor::backend::Backend;
use common::BackendBench;
use lfm::bench::{bench_sampling, SamplingBenchOptions};
use lfm::models::Precision;

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().to_string()).collect()
}

fn options() -> SamplingBenchOptions {
    let precision = |p: &str| match p {
        "f16" => Precision::F16,
        "bf16" => Precision::Bf16,
        _ => Precision::F32,
    };
    SamplingBenchOptions {
        batches: list("LFM_BENCH_BATCHES", "1,16").iter().filter_map(|b| b.parse().ok()).collect(),
        solvers: list("LFM_BENCH_SOLVERS", "dopri5,euler").iter().filter_map(|s| s.parse().ok()).collect(),
        precisions: list("LFM_BENCH_PRECISIONS", "f32").iter().map(|p| precision(p)).collect(),
        warmup: std::env::var("LFM_BENCH_WARMUP").is_ok_and(|v| v == "1"),
        ..Default::default()
    }
}

/// The sampling cases of [`options`].
struct Sampling;

impl BackendBench for Sampling {
    fn run<B: Backend>(&self, backend: &str, device: &B::Device) {
        let print = |c: &lfm::bench::SamplingCase| {
            println!(
                "{backend:5} {} {:4} {:6} batch {:2}: NFE {:4}, {:8.3} s per image, {:8.1} GFLOP/s",
                c.model, c.precision, c.solver, c.batch, c.nfe, c.seconds_per_image, c.gflops
            )
        };
        let skip = |p: Precision, why: String| println!("{backend:5} {}: skipped ({why})", p.name());
        bench_sampling::<B>(device, &options(), print, skip).expect("the benchmark's cases run");
    }
}

fn main() {
    common::for_each_backend(&Sampling);
}
