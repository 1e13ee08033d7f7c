//! lfm's fused CubeCL kernels against the plain Burn expressions they replace, on wgpu (criterion). The full grid,
//! peak memory and roofline fractions are in `lfm bench kernels`; this keeps two representative sizes per kernel
//! so that `cargo bench --bench kernels` stays short on a software adapter.
//!
//! `LFM_BENCH_TOKENS` (default 1024) sets the attention size.

use burn::tensor::{backend::Backend, Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use lfm::backend::{Wgpu, WgpuDevice};
use lfm_kernels::attention::attention_on;
use lfm_kernels::rk::error_ratio_on;
use lfm_kernels::tableau::C_ERROR;

fn sync<B: Backend>(device: &B::Device) {
    B::sync(device).expect("device sync");
}

fn attention(c: &mut Criterion, device: &WgpuDevice) {
    let tokens: usize = std::env::var("LFM_BENCH_TOKENS").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    for head_dim in [64, 72] {
        let shape = [1, 1, tokens, head_dim];
        let random = || Tensor::<Wgpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let (q, k, v) = (random(), random(), random());
        let mut group = c.benchmark_group(format!("attention/{tokens}x{head_dim}"));
        group.sample_size(10);
        for (name, fused) in [("fused", true), ("unfused", false)] {
            group.bench_function(name, |b| {
                b.iter(|| {
                    let _ = attention_on(q.clone(), k.clone(), v.clone(), fused);
                    sync::<Wgpu>(device);
                })
            });
        }
        group.finish();
    }
}

fn error_ratio(c: &mut Criterion, device: &WgpuDevice) {
    for batch in [1, 16] {
        let shape = [batch, 4, 32, 32];
        let random = || Tensor::<Wgpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let (y0, y1) = (random(), random());
        let k: Vec<Tensor<Wgpu, 4>> = (0..7).map(|_| random()).collect();
        let terms: Vec<(&Tensor<Wgpu, 4>, f64)> = k.iter().zip(C_ERROR.map(|e| -0.05 * e)).collect();
        let mut group = c.benchmark_group(format!("dopri5_error_ratio/{batch}x4x32x32"));
        group.sample_size(20);
        for (name, fused) in [("fused", true), ("unfused", false)] {
            group.bench_function(name, |b| b.iter(|| error_ratio_on(&y0, &y1, &terms, 1e-5, 1e-5, fused)));
        }
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    if lfm::backend::wgpu_adapters().is_empty() {
        eprintln!("no wgpu adapter: nothing to benchmark (apt-get install mesa-vulkan-drivers)");
        return;
    }
    let device = WgpuDevice::DefaultDevice;
    attention(c, &device);
    error_ratio(c, &device);
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
