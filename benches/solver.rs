//! The solver's own cost per dopri5 step, the velocity evaluation excluded, for a batch-16 4×32×32 state,
//! next to the same step written as plain unfused tensor expressions (the baseline), on cpu and wgpu.
//!
//! The field returns a precomputed tensor, so its cost is nil; with a constant field the error estimate is zero
//! and every step is accepted with the largest growth (×10), so a solve from t = 1 to 0 with a first step of 1e-3
//! takes a handful of steps; the time of a solve is divided by its step count.

use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lfm::backend::{Cpu, Wgpu, WgpuDevice};
use lfm::solver::tableau::{ALPHA, BETA, C_ERROR};
use lfm::solver::{solve, SolveOptions};

const SHAPE: [usize; 4] = [16, 4, 32, 32];

fn solver_steps<B: Backend>(x: &Tensor<B, 4>, v: &Tensor<B, 4>) -> usize {
    let options = SolveOptions { first_step: Some(1e-3), ..Default::default() };
    let mut field = |_t: f64, _x: Tensor<B, 4>| v.clone();
    let solution = solve(&mut field, x.clone(), &options).unwrap();
    let _: f32 = solution.state.sum().into_scalar().elem();
    solution.stats.accepted
}

/// One dopri5 step as a reader would first write it: every stage input, the solution, the error estimate and
/// its norm as separate tensor expressions.
fn plain_step<B: Backend>(y: &Tensor<B, 4>, k: &[Tensor<B, 4>; 7], dt: f64) -> (Tensor<B, 4>, f64) {
    let mut y1 = y.clone();
    for (i, _) in ALPHA.iter().enumerate() {
        let mut increment = k[0].clone().mul_scalar(BETA[i][0] * dt);
        for (j, b) in BETA[i].iter().enumerate().skip(1) {
            increment = increment + k[j].clone().mul_scalar(b * dt);
        }
        y1 = y.clone() + increment;
    }
    let mut error = k[0].clone().mul_scalar(C_ERROR[0] * dt);
    for (j, c) in C_ERROR.iter().enumerate().skip(1) {
        error = error + k[j].clone().mul_scalar(c * dt);
    }
    let tolerance = y.clone().abs().max_pair(y1.clone().abs()).mul_scalar(1e-5).add_scalar(1e-5);
    let ratio: f32 = (error / tolerance).powi_scalar(2).mean().sqrt().into_scalar().elem();
    (y1, ratio as f64)
}

fn bench_backend<B: Backend>(c: &mut Criterion, name: &str, device: &B::Device) {
    let x = Tensor::<B, 4>::random(SHAPE, Distribution::Normal(0.0, 1.0), device);
    let v = Tensor::<B, 4>::random(SHAPE, Distribution::Normal(0.0, 1.0), device);
    let steps = solver_steps(&x, &v);
    let k: [Tensor<B, 4>; 7] = std::array::from_fn(|i| v.clone().mul_scalar(1.0 + i as f64 * 1e-3));
    let mut group = c.benchmark_group(format!("dopri5_step_16x4x32x32/{name}"));
    group.sample_size(10);
    group.bench_function(BenchmarkId::new("lfm_solver_per_step", steps), |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                solver_steps(&x, &v);
            }
            start.elapsed() / steps as u32
        })
    });
    group.bench_function("plain_tensor_expressions", |b| b.iter(|| plain_step(&x, &k, -0.01)));
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_backend::<Cpu>(c, "cpu", &Default::default());
    if !lfm::backend::wgpu_adapters().is_empty() {
        bench_backend::<Wgpu>(c, "wgpu", &WgpuDevice::DefaultDevice);
    }
}

criterion_group!(solver_benches, benches);
criterion_main!(solver_benches);
