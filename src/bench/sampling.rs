//! `lfm bench sampling`: seconds per image and NFE of a DiT (random weights, every layer non-zero) solved from
//! noise to data, per solver, batch size and precision, timed to the read-back of the result.

use std::time::Instant;

use burn::tensor::{backend::Backend, ElementConversion};

use super::export::{named, Export};
use super::SEED;
use crate::checkpoint::{collect_weights, HostTensor, TensorMap};
use crate::models::dit::dit_keys;
use crate::models::{DiTConfig, ModelConfig, Precision};
use crate::sample::{noise, sample_batch, BatchInput};
use crate::solver::{Grid, Method, SolveOptions};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct SamplingBenchOptions {
    /// A DiT size such as `DiT-B/2`, on 4×32×32 latents (256² images through SD's VAE).
    pub model: String,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Solvers: dopri5 at rtol = atol = 1e-5 (LFM's default) and fixed-step methods at `steps` steps.
    pub solvers: Vec<Method>,
    /// Steps of the fixed-step solvers.
    pub steps: usize,
    /// Weight precisions (those the device lacks are reported as skipped).
    pub precisions: Vec<Precision>,
    /// One untimed solve per case first: GPU backends compile and autotune kernels on first use.
    pub warmup: bool,
    /// Write the weights, the noise and the result of each case here for PyTorch ([`super::export`]).
    pub export: Option<std::path::PathBuf>,
}

impl Default for SamplingBenchOptions {
    /// The sampling issue's grid: DiT-B/2, dopri5 and euler at 100 steps, batch 1 and 16, f32.
    fn default() -> Self {
        Self {
            model: "DiT-B/2".into(),
            batches: vec![1, 16],
            solvers: vec![Method::Dopri5, Method::Euler],
            steps: 100,
            precisions: vec![Precision::F32],
            warmup: false,
            export: None,
        }
    }
}

/// One timed solve.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingCase {
    /// The DiT size.
    pub model: String,
    /// `f32`, `f16` or `bf16`.
    pub precision: String,
    /// The solver's name.
    pub solver: String,
    /// Samples solved together.
    pub batch: usize,
    /// Velocity evaluations of the solve.
    pub nfe: usize,
    /// Wall-clock seconds of the solve divided by the batch size.
    pub seconds_per_image: f64,
    /// Model arithmetic per second (forward FLOPs × NFE × batch / seconds).
    pub gflops: f64,
}

/// The weights of a DiT of `config` (by LFM's parameter names), every parameter drawn as the golden fixtures draw
/// theirs (N(0,1)·clamp(1/√fan_in, 0.02, 0.2) for matrices, 0.05·N(0,1) for vectors): DiT's own initialisation
/// zeroes the output layer, and a zero velocity field would make every adaptive solve trivially short.
pub fn random_dit_weights(config: &DiTConfig, seed: u64) -> TensorMap {
    // The shapes come from an initialised network on the CPU; the values from lfm's own seeded generator (one
    // stream per tensor), so the model depends on `seed` alone and the backends' shared generators are untouched.
    let mut weights = collect_weights(&config.init::<crate::backend::Cpu>(&Default::default()), &dit_keys());
    for (index, (key, tensor)) in weights.iter_mut().enumerate() {
        if key == "pos_embed" {
            continue;
        }
        let scale = if tensor.shape.len() >= 2 {
            let fan_in = tensor.numel() / tensor.shape[0];
            (1.0 / (fan_in as f32).sqrt()).clamp(0.02, 0.2)
        } else {
            0.05
        };
        let values = crate::noise::standard_normal(seed, index as u64, tensor.numel());
        *tensor = HostTensor::f32(tensor.shape.clone(), values.into_iter().map(|v| v * scale).collect());
    }
    weights
}

/// Runs every case of `options` on `device`, calling `on_case` as each finishes (or `on_skip` with the reason for a
/// precision the device lacks).
pub fn bench_sampling<B: Backend>(
    device: &B::Device,
    options: &SamplingBenchOptions,
    mut on_case: impl FnMut(&SamplingCase),
    mut on_skip: impl FnMut(Precision, String),
) -> Result<Vec<SamplingCase>, String> {
    let export = options.export.as_deref().map(Export::new).transpose()?;
    let (config, full, weights_file) = super::random_dit::<B>(&options.model, export.as_ref(), device)?;
    let flops = ModelConfig::Dit(config).flops();
    let mut cases = Vec::new();
    for &precision in &options.precisions {
        if let Err(why) = precision.check_supported::<B>(device) {
            on_skip(precision, why);
            continue;
        }
        let model = full.clone().with_precision(precision);
        for &batch in &options.batches {
            for &method in &options.solvers {
                let solve_options = if method.is_adaptive() {
                    SolveOptions { method, ..Default::default() }
                } else {
                    SolveOptions { method, grid: Grid::Steps(options.steps), ..Default::default() }
                };
                let solve = || -> Result<(usize, f64, _), String> {
                    let start = Instant::now();
                    let input = BatchInput {
                        noise: noise::<B>(SEED, 0, batch, [4, 32, 32], device),
                        labels: None,
                        condition: None,
                    };
                    let out =
                        sample_batch(&model, input, None, &solve_options, &mut |_, _| {}).map_err(|e| e.to_string())?;
                    // GPU backends queue work asynchronously: the clock stops at the read-back.
                    let _: f32 = out.latents.clone().sum().into_scalar().elem();
                    Ok((out.stats.nfe, start.elapsed().as_secs_f64(), out.latents))
                };
                if options.warmup {
                    solve()?;
                }
                let (nfe, seconds, x0) = solve()?;
                let case = SamplingCase {
                    model: options.model.clone(),
                    precision: precision.name().into(),
                    solver: method.name().into(),
                    batch,
                    nfe,
                    seconds_per_image: seconds / batch as f64,
                    gflops: flops * (nfe * batch) as f64 / seconds / 1e9,
                };
                if let Some(export) = &export {
                    let x1 = HostTensor::from_tensor(noise::<B>(SEED, 0, batch, [4, 32, 32], device));
                    let name = Export::case_file::<B>(
                        device,
                        &["sampling", &options.model, method.name(), &format!("b{batch}"), precision.name()],
                    );
                    let file = export.tensors(name, &named([("x1", x1), ("x0", HostTensor::from_tensor(x0))]))?;
                    export.record::<B, _>("sampling", device, weights_file.as_deref(), Some(&file), &case)?;
                }
                on_case(&case);
                cases.push(case);
            }
        }
    }
    Ok(cases)
}
