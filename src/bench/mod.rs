//! `lfm bench`: lfm's fused CubeCL kernels against the plain Burn expressions they replace, timed and measured in
//! the same run, with the device's roofline from hand-written WGSL probes ([`roofline`]); the DiT forward pass
//! ([`forward`]), end-to-end sampling ([`sampling`]) and training throughput ([`training`]), each able to
//! [`export`] its cases for the same run in PyTorch (`benches/torch/compare.py`).

pub mod export;
pub mod forward;
pub mod roofline;
pub mod sampling;
pub mod training;

use std::time::Instant;

use burn::tensor::{backend::Backend, Distribution, Tensor};
use lfm_kernels::{
    attention::{attention_on, has_fused_attention},
    rk::{error_ratio_on, linear_combination_on},
    tableau::{BETA, C_ERROR},
};

pub use forward::{bench_forward, ForwardBenchOptions, ForwardCase};

use crate::models::{DiT, DiTConfig, VelocityModel};
use export::Export;
use sampling::random_dit_weights;

/// The seed of the benchmarks' random weights and noise.
const SEED: u64 = 0;

/// A DiT size by name (`DiT-B/2`) on 4×32×32 latents (256² images through SD's VAE), unconditional.
fn named_dit(name: &str) -> Result<DiTConfig, String> {
    DiTConfig::named(name, 32, 4, 1, 0.0).ok_or_else(|| format!("unknown DiT size '{name}': use DiT-S/2 … DiT-XL/8"))
}

/// The DiT `name` with the random weights of [`random_dit_weights`] on `device`, and the file `export` holds them
/// in when given.
fn random_dit<B: Backend>(
    name: &str,
    export: Option<&Export>,
    device: &B::Device,
) -> Result<(DiTConfig, VelocityModel<B>, Option<String>), String> {
    let config = named_dit(name)?;
    let weights = random_dit_weights(&config, SEED);
    let model = VelocityModel::Dit(DiT::load(&config, &weights, device).map_err(|e| e.to_string())?);
    let file = export.map(|export| export.weights(name, SEED, || weights)).transpose()?;
    Ok((config, model, file))
}
pub use roofline::Roofline;
pub use sampling::{bench_sampling, SamplingBenchOptions, SamplingCase};
pub use training::{bench_training, TrainingBenchOptions, TrainingCase};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct KernelBenchOptions {
    /// Timed repetitions per case (the median is reported).
    pub reps: usize,
    /// Attention: (batch × heads) of each case.
    pub heads: usize,
    /// Attention: token counts.
    pub tokens: Vec<usize>,
    /// Attention: head dimensions.
    pub head_dims: Vec<usize>,
    /// RK step: latent shapes (channels, height, width).
    pub latents: Vec<[usize; 3]>,
    /// RK step: batch sizes.
    pub batches: Vec<usize>,
}

impl Default for KernelBenchOptions {
    /// The grid: attention at {256, 1024, 4096} tokens × head_dim {64, 72}; the RK step at latents
    /// {4×32×32, 4×64×64} × batch {1, 16}.
    fn default() -> Self {
        Self {
            reps: 5,
            heads: 1,
            tokens: vec![256, 1024, 4096],
            head_dims: vec![64, 72],
            latents: vec![[4, 32, 32], [4, 64, 64]],
            batches: vec![1, 16],
        }
    }
}

/// One fused-vs-unfused comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelCase {
    /// `attention`, `dopri5 error ratio` or `dopri5 step arithmetic`.
    pub kernel: String,
    /// The problem size, in words.
    pub shape: String,
    /// Median seconds, fused kernel.
    pub fused_s: f64,
    /// Median seconds, plain Burn expression.
    pub unfused_s: f64,
    /// `unfused_s / fused_s`.
    pub speedup: f64,
    /// Median seconds of Burn's own fused op where it has one (`burn::tensor::module::attention`).
    pub burn_op_s: Option<f64>,
    /// Growth of the device memory pools over one fused call (bytes; CubeCL backends only).
    pub fused_peak_bytes: Option<u64>,
    /// The same for the unfused expression.
    pub unfused_peak_bytes: Option<u64>,
    /// Tensor bytes the fused kernel must read and write at least.
    pub fused_bytes: f64,
    /// Floating-point operations of the case.
    pub flops: f64,
    /// Fraction of the roofline the fused kernel reaches: achieved / min(bandwidth·bytes, FMA rate) bound.
    pub roofline_fraction: Option<f64>,
}

/// The whole benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelReport {
    /// The device the kernels ran on.
    pub device: String,
    /// Whether this backend has the fused kernels (otherwise both columns time the fallback).
    pub fused_kernels: bool,
    /// The WGSL probes' measurement, when they could run.
    pub roofline: Option<Roofline>,
    /// Why the probes could not run.
    pub roofline_error: Option<String>,
    /// Every case.
    pub cases: Vec<KernelCase>,
}

/// Median seconds of `reps` runs of `f` (each followed by a device sync), after one warm-up run.
fn median_seconds<B: Backend>(device: &B::Device, reps: usize, mut f: impl FnMut()) -> f64 {
    let sync = |device: &B::Device| B::sync(device).expect("the device failed while benchmarking");
    f();
    sync(device);
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            sync(device);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Growth of the memory pools over one run of `f`, from freshly cleaned pools.
fn peak_bytes<B: Backend>(device: &B::Device, mut f: impl FnMut()) -> Option<u64> {
    B::memory_cleanup(device);
    let before = lfm_kernels::memory_reserved::<B>(device)?;
    f();
    B::sync(device).ok()?;
    let after = lfm_kernels::memory_reserved::<B>(device)?;
    Some(after.saturating_sub(before))
}

fn roofline_fraction(seconds: f64, bytes: f64, flops: f64, roofline: Option<&Roofline>) -> Option<f64> {
    let r = roofline?;
    let bound = (bytes / (r.bandwidth_gbps * 1e9)).max(flops / (r.fma_gflops * 1e9));
    Some(bound / seconds)
}

/// Times and measures `run(true)` (fused) against `run(false)` (unfused) for one case.
#[allow(clippy::too_many_arguments)]
fn compare<B: Backend>(
    device: &B::Device,
    reps: usize,
    kernel: &str,
    shape: String,
    fused_bytes: f64,
    flops: f64,
    roofline: Option<&Roofline>,
    run: impl Fn(bool),
) -> KernelCase {
    // Peak memory first, from cleaned pools, before timing runs leave pages behind.
    let fused_peak_bytes = peak_bytes::<B>(device, || run(true));
    let unfused_peak_bytes = peak_bytes::<B>(device, || run(false));
    let fused_s = median_seconds::<B>(device, reps, || run(true));
    let unfused_s = median_seconds::<B>(device, reps, || run(false));
    KernelCase {
        kernel: kernel.into(),
        shape,
        fused_s,
        unfused_s,
        speedup: unfused_s / fused_s,
        burn_op_s: None,
        fused_peak_bytes,
        unfused_peak_bytes,
        fused_bytes,
        flops,
        roofline_fraction: roofline_fraction(fused_s, fused_bytes, flops, roofline),
    }
}

/// Runs every case of `options` on `device`; `roofline` comes from [`roofline::measure`] (or `None`).
pub fn bench_kernels<B: Backend>(
    device: &B::Device,
    device_name: String,
    options: &KernelBenchOptions,
    roofline: Result<Roofline, String>,
    mut progress: impl FnMut(&KernelCase),
) -> KernelReport {
    let (roofline, roofline_error) = match roofline {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let mut cases = Vec::new();
    let mut push = |case: KernelCase| {
        progress(&case);
        cases.push(case);
    };
    for &tokens in &options.tokens {
        for &head_dim in &options.head_dims {
            let shape = [1, options.heads, tokens, head_dim];
            let random = || Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let (q, k, v) = (random(), random(), random());
            let run = |fused: bool| {
                let _ = attention_on(q.clone(), k.clone(), v.clone(), fused);
            };
            let n = (options.heads * tokens) as f64;
            let flops = 4.0 * n * tokens as f64 * head_dim as f64;
            // q, k, v read and the output written once each.
            let bytes = 4.0 * n * head_dim as f64 * 4.0;
            let shape = format!("{} head(s) × {tokens} tokens × head_dim {head_dim}", options.heads);
            let mut case = compare::<B>(device, options.reps, "attention", shape, bytes, flops, roofline.as_ref(), run);
            case.burn_op_s = Some(median_seconds::<B>(device, options.reps, || {
                let _ =
                    burn::tensor::module::attention(q.clone(), k.clone(), v.clone(), None, None, Default::default());
            }));
            push(case);
        }
    }
    for &[c, h, w] in &options.latents {
        for &batch in &options.batches {
            let shape = [batch, c, h, w];
            let random = || Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let y0 = random();
            let k: Vec<Tensor<B, 4>> = (0..7).map(|_| random()).collect();
            let dt = -0.05;
            let elements = (batch * c * h * w) as f64;
            let error_terms: Vec<(&Tensor<B, 4>, f64)> = k.iter().zip(C_ERROR.map(|e| e * dt)).collect();
            let error_ratio = |fused: bool| {
                std::hint::black_box(error_ratio_on(&y0, &k[6], &error_terms, 1e-5, 1e-5, fused));
            };
            let step = |fused: bool| {
                let mut y1 = y0.clone();
                for (i, row) in BETA.iter().enumerate() {
                    let mut terms: Vec<(&Tensor<B, 4>, f64)> = vec![(&y0, 1.0)];
                    terms.extend(k[..=i].iter().zip(row.iter().map(|b| b * dt)));
                    y1 = linear_combination_on(&terms, fused);
                }
                std::hint::black_box(error_ratio_on(&y0, &y1, &error_terms, 1e-5, 1e-5, fused));
            };
            let label = format!("batch {batch} × {c}×{h}×{w}");
            // The error-ratio pass reads y0, y1 and the six stages with a non-zero weight, and writes nothing
            // tensor-sized: stages + 1 tensor moves.
            let (bytes, flops) = (8.0 * elements * 4.0, 20.0 * elements);
            let r = roofline.as_ref();
            push(compare::<B>(device, options.reps, "dopri5 error ratio", label.clone(), bytes, flops, r, error_ratio));
            // Six stage inputs (2..7 reads + 1 write each; zero weights skipped) and the error ratio.
            let stage_moves: usize = BETA.iter().map(|row| row.iter().filter(|b| **b != 0.0).count() + 2).sum();
            let bytes = (stage_moves as f64 + 8.0) * elements * 4.0;
            let flops = (2.0 * stage_moves as f64 + 20.0) * elements;
            push(compare::<B>(device, options.reps, "dopri5 step arithmetic", label, bytes, flops, r, step));
        }
    }
    KernelReport {
        device: device_name,
        fused_kernels: lfm_kernels::has_kernels::<B>() && has_fused_attention::<B>(),
        roofline,
        roofline_error,
        cases,
    }
}
