//! `lfm bench forward`: seconds per forward pass of DiT sizes (random weights, every layer non-zero) on 4×32×32
//! latents, per batch size and precision: the median of several passes, each timed to the device's completion.

use std::time::Instant;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::export::{named, Export};
use super::SEED;
use crate::checkpoint::HostTensor;
use crate::models::{ModelConfig, Precision, VelocityModel};
use crate::sample::noise;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct ForwardBenchOptions {
    /// DiT sizes such as `DiT-B/2`.
    pub models: Vec<String>,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Precisions (those the device lacks are reported as skipped).
    pub precisions: Vec<Precision>,
    /// Timed passes per case, after one untimed pass (the median is reported).
    pub reps: usize,
    /// Write the weights, inputs and outputs of each case here for PyTorch ([`super::export`]).
    pub export: Option<std::path::PathBuf>,
}

impl Default for ForwardBenchOptions {
    /// The GPU issue's grid: DiT-B/2 and DiT-XL/2 at batch 1 and 16, f32, 10 passes.
    fn default() -> Self {
        Self {
            models: vec!["DiT-B/2".into(), "DiT-XL/2".into()],
            batches: vec![1, 16],
            precisions: vec![Precision::F32],
            reps: 10,
            export: None,
        }
    }
}

/// One timed case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ForwardCase {
    /// The DiT size.
    pub model: String,
    /// `f32`, `f16` or `bf16`.
    pub precision: String,
    /// Samples per pass.
    pub batch: usize,
    /// Median seconds of one pass.
    pub seconds: f64,
    /// Images per second at that median.
    pub images_per_s: f64,
    /// Model arithmetic per second.
    pub gflops: f64,
}

/// Times `x` through `model` `reps` times after one untimed pass; returns the median and the last output.
fn time_passes<B: Backend>(
    model: &VelocityModel<B>,
    t: &Tensor<B, 1>,
    x: &Tensor<B, 4>,
    reps: usize,
    device: &B::Device,
) -> Result<(f64, Tensor<B, 4>), String> {
    let sync = || B::sync(device).map_err(|e| format!("the device failed: {e:?}"));
    let mut v = model.forward(t.clone(), x.clone(), None);
    sync()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        v = model.forward(t.clone(), x.clone(), None);
        sync()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], v))
}

/// Runs every case of `options` on `device`, calling `on_case` as each finishes (or `on_skip` with the reason for a
/// precision the device lacks).
pub fn bench_forward<B: Backend>(
    device: &B::Device,
    options: &ForwardBenchOptions,
    mut on_case: impl FnMut(&ForwardCase),
    mut on_skip: impl FnMut(Precision, String),
) -> Result<Vec<ForwardCase>, String> {
    let export = options.export.as_deref().map(Export::new).transpose()?;
    let mut cases = Vec::new();
    for name in &options.models {
        let (config, full, weights_file) = super::random_dit::<B>(name, export.as_ref(), device)?;
        let flops = ModelConfig::Dit(config).flops();
        for &precision in &options.precisions {
            if let Err(why) = precision.check_supported::<B>(device) {
                on_skip(precision, why);
                continue;
            }
            let model = full.clone().with_precision(precision);
            for &batch in &options.batches {
                let x = noise::<B>(SEED, 0, batch, [4, 32, 32], device);
                // Times spread over (0, 1), one per sample.
                let times: Vec<f32> = (0..batch).map(|i| (i as f32 + 0.5) / batch as f32).collect();
                let t = Tensor::<B, 1>::from_data(TensorData::new(times, [batch]), device);
                let (seconds, v) = time_passes(&model, &t, &x, options.reps, device)?;
                let case = ForwardCase {
                    model: name.clone(),
                    precision: precision.name().into(),
                    batch,
                    seconds,
                    images_per_s: batch as f64 / seconds,
                    gflops: flops * batch as f64 / seconds / 1e9,
                };
                if let Some(export) = &export {
                    let file =
                        Export::case_file::<B>(device, &["forward", name, &format!("b{batch}"), precision.name()]);
                    let file = export.tensors(
                        file,
                        &named([
                            ("x", HostTensor::from_tensor(x)),
                            ("t", HostTensor::from_tensor(t)),
                            ("v", HostTensor::from_tensor(v)),
                        ]),
                    )?;
                    export.record::<B, _>("forward", device, weights_file.as_deref(), Some(&file), &case)?;
                }
                on_case(&case);
                cases.push(case);
            }
        }
    }
    Ok(cases)
}
