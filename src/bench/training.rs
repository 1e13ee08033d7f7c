//! `lfm bench training`: training throughput (images/s) of DiT sizes on cached 4×32×32 latents — one full
//! [`Trainer`] step (flow-matching loss, backward, AdamW) per batch — with the same model's plain forward pass on
//! the same batch as the baseline measured in the same run (forward + backward is usually ≈ 3 forwards).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::models::{ModelConfig, Precision, VelocityModel};
use crate::train::{lfm_adamw, Batch, Step, Trainer};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct TrainingBenchOptions {
    /// DiT sizes such as `DiT-S/2`.
    pub models: Vec<String>,
    /// Images per step.
    pub batch: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Mixed precision of the training step (see [`crate::train::mixed`]); the forward baseline runs in it too.
    pub precision: Precision,
    /// Record each case in this folder's manifest for PyTorch ([`super::export`]; the step needs no files).
    pub export: Option<std::path::PathBuf>,
}

impl Default for TrainingBenchOptions {
    /// The training issue's cases: DiT-S/2 and DiT-B/2 at batch 8, 3 timed steps.
    fn default() -> Self {
        Self {
            models: vec!["DiT-S/2".into(), "DiT-B/2".into()],
            batch: 8,
            steps: 3,
            precision: Precision::F32,
            export: None,
        }
    }
}

/// One model's throughput.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainingCase {
    /// The DiT size.
    pub model: String,
    /// Images per step.
    pub batch: usize,
    /// `f32`, `f16` or `bf16`.
    pub precision: String,
    /// Training images per second (mean over the timed steps).
    pub images_per_s: f64,
    /// Seconds per training step.
    pub step_s: f64,
    /// Images per second of the forward pass alone (the baseline).
    pub forward_images_per_s: f64,
    /// Training step time over forward time.
    pub step_over_forward: f64,
}

fn batch<B: AutodiffBackend>(n: usize, device: &B::Device) -> Batch<B> {
    let latent = || Tensor::<B, 4>::random([n, 4, 32, 32], Distribution::Normal(0.0, 1.0), device);
    let t = Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), device);
    Batch::new(latent(), latent(), t, None)
}

fn bench_model<B: Backend>(
    name: &str,
    options: &TrainingBenchOptions,
    device: &B::Device,
) -> Result<TrainingCase, String> {
    let (n, steps, precision) = (options.batch, options.steps, options.precision);
    let config = ModelConfig::Dit(super::named_dit(name)?);
    B::seed(device, 0);

    // Baseline: the forward pass alone, without autodiff, read back (GPU work is asynchronous).
    let inner = VelocityModel::<B>::init(&config, device).with_precision(precision);
    let input = batch::<Autodiff<B>>(n, device);
    let (x, t) = (input.z0.inner(), input.t.inner());
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

    // Each step reads its loss back, which waits for the previous step's update.
    let model = VelocityModel::<Autodiff<B>>::init(&config, device);
    let mut trainer = Trainer::new(model, lfm_adamw()).with_precision(precision);
    trainer.step(Step::new(batch(n, device), 1e-4)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    for _ in 0..steps {
        let report = trainer.step(Step::new(batch(n, device), 1e-4)).map_err(|e| e.to_string())?;
        if !report.loss.is_finite() {
            return Err(format!("{name}: the loss became {}", report.loss));
        }
    }
    let step_s = start.elapsed().as_secs_f64() / steps as f64;
    Ok(TrainingCase {
        model: name.into(),
        batch: n,
        precision: precision.name().into(),
        images_per_s: n as f64 / step_s,
        step_s,
        forward_images_per_s: n as f64 / forward_s,
        step_over_forward: step_s / forward_s,
    })
}

/// Runs every model of `options` on `device`, calling `on_case` as each finishes.
pub fn bench_training<B: Backend>(
    device: &B::Device,
    options: &TrainingBenchOptions,
    mut on_case: impl FnMut(&TrainingCase),
) -> Result<Vec<TrainingCase>, String> {
    options.precision.check_supported::<B>(device)?;
    let export = options.export.as_deref().map(super::export::Export::new).transpose()?;
    let mut cases = Vec::new();
    for name in &options.models {
        let case = bench_model::<B>(name, options, device)?;
        if let Some(export) = &export {
            export.record::<B, _>("training", device, None, None, &case)?;
        }
        on_case(&case);
        cases.push(case);
    }
    Ok(cases)
}
