//! Sampling: noise → ODE solve from t = 1 to t = 0 → latents, with class labels, classifier-free guidance and the
//! inpainting condition. Decoding and writing images are the caller's (see `cli/sample.rs`).
//!
//! Noise is deterministic per sample: sample `i` of a seed gets the same `x1` (and label) whatever the batch it is
//! drawn in. The adaptive solver's error norm runs over the whole batch, as torchdiffeq's does, so with dopri5 a
//! sample's trajectory depends (within the tolerance) on its batch; fixed-step solvers do not couple samples.

use std::ops::Range;
use std::time::Instant;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::models::VelocityModel;
use crate::solver::{solve, SolveOptions, SolveStats, SolverError};

/// How class labels are chosen for a class-conditional model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassChoice {
    /// Every sample gets this class.
    Fixed(usize),
    /// Each sample gets a seeded uniformly random class (LFM's `randint(0, num_classes)`).
    Random,
    /// Balanced: sample `i` gets class `i mod num_classes`.
    Uniform,
    /// One class per grid row of this many samples: sample `i` gets class `⌊i / per_row⌋ mod num_classes`
    /// (`--class rows` takes `--nrow`).
    Rows(usize),
}

impl std::str::FromStr for ClassChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Self::Random),
            "uniform" => Ok(Self::Uniform),
            // The row length is the grid's, filled in by the caller.
            "rows" => Ok(Self::Rows(0)),
            n => n
                .parse()
                .map(Self::Fixed)
                .map_err(|_| format!("--class takes a class index, random, uniform or rows, not `{n}`")),
        }
    }
}

/// The labels of samples `first..first + count`.
pub fn labels(choice: ClassChoice, num_classes: usize, seed: u64, first: usize, count: usize) -> Vec<i64> {
    (first..first + count)
        .map(|i| match choice {
            ClassChoice::Fixed(c) => c as i64,
            ClassChoice::Uniform => (i % num_classes) as i64,
            ClassChoice::Rows(per_row) => ((i / per_row.max(1)) % num_classes) as i64,
            ClassChoice::Random => crate::noise::uniform_index(seed, i as u64, num_classes) as i64,
        })
        .collect()
}

/// What conditions a batch besides its labels.
#[derive(Debug, Clone)]
pub struct Guidance {
    /// Classifier-free guidance scale (LFM applies it only when > 1).
    pub cfg_scale: Option<f64>,
    /// The null label of the CFG batch's second half (DiT: the null row; EDM: any, its one-hot is zeroed).
    pub null_label: i64,
}

/// One batch: its noise, labels and extra input channels (inpainting: masked-image latent and mask).
#[derive(Debug, Clone)]
pub struct BatchInput<B: Backend> {
    /// `x1`, the state at t = 1.
    pub noise: Tensor<B, 4>,
    /// Labels, for class-conditional models.
    pub labels: Option<Vec<i64>>,
    /// Channels concatenated to the state before every evaluation (`[n, k, h, w]`).
    pub condition: Option<Tensor<B, 4>>,
}

/// A solved batch.
#[derive(Debug, Clone)]
pub struct BatchOutput<B: Backend> {
    /// `x0`, the latents at t = 0.
    pub latents: Tensor<B, 4>,
    /// What the solve cost.
    pub stats: SolveStats,
    /// Wall-clock seconds of the solve.
    pub seconds: f64,
}

/// Solves one batch from t = 1 to t = 0. `progress(t, nfe)` is called after every velocity evaluation.
pub fn sample_batch<B: Backend>(
    model: &VelocityModel<B>,
    input: BatchInput<B>,
    guidance: &Guidance,
    options: &SolveOptions,
    progress: &mut dyn FnMut(f64, usize),
) -> Result<BatchOutput<B>, SolverError> {
    if let Some(scale) = guidance.cfg_scale.filter(|s| !(s.is_finite() && *s >= 0.0)) {
        // NaN fails `> 1` below and would quietly switch guidance off.
        return Err(SolverError::InvalidOptions(format!("the CFG scale {scale} must be a finite number ≥ 0")));
    }
    let device = input.noise.device();
    let [n, _, h, w] = input.noise.dims();
    let invalid = |why: String| Err(SolverError::InvalidInput(why));
    if let Some(labels) = input.labels.as_ref().filter(|y| y.len() != n) {
        return invalid(format!("{} labels for a batch of {n}: give one label per sample", labels.len()));
    }
    if let Some([cn, _, ch, cw]) =
        input.condition.as_ref().map(|c| c.dims()).filter(|c| [c[0], c[2], c[3]] != [n, h, w])
    {
        return invalid(format!(
            "a condition of {cn}×{ch}×{cw} for a batch of {n}×{h}×{w}: one per sample, the latents' size"
        ));
    }
    model.check_labels(input.labels.as_deref()).map_err(SolverError::InvalidInput)?;
    let cfg = guidance.cfg_scale.filter(|&s| s > 1.0);
    if cfg.is_some() && input.labels.is_some() && !model.supports_cfg() {
        return invalid("this network has no classifier-free guidance (LFM defines none for the guided-diffusion UNet): sample without a CFG scale".into());
    }
    let labels =
        input.labels.as_ref().map(|y| Tensor::<B, 1, Int>::from_data(TensorData::new(y.clone(), [n]), &device));
    // The network on samples `range` of the batch (CFG doubles them with the null label); the network couples no
    // samples, so parts of the batch can be evaluated apart.
    let evaluate = |t: &Tensor<B, 1>, x: Tensor<B, 4>, range: Range<usize>| -> Tensor<B, 4> {
        let len = range.len();
        let x = match &input.condition {
            Some(c) => Tensor::cat(vec![x, c.clone().narrow(0, range.start, len)], 1),
            None => x,
        };
        let labels = labels.as_ref().map(|y| y.clone().narrow(0, range.start, len));
        match (cfg, labels) {
            (Some(scale), Some(y)) => {
                let y = Tensor::cat(vec![y, Tensor::full([len], guidance.null_label, &device)], 0);
                let doubled = Tensor::cat(vec![x.clone(), x], 0);
                let out = model.forward_with_cfg(t.clone(), doubled, y, scale).expect("CFG support is checked above");
                out.narrow(0, 0, len)
            }
            (_, labels) => model.forward(t.clone(), x, labels),
        }
    };
    // On the CPU each evaluation is split over the cores: Burn's ndarray backend threads its matrix products but
    // runs element-wise work on one core, so one pass keeps barely more than one core busy.
    let threads = if crate::nn::is_ndarray::<B>() { rayon::current_num_threads() } else { 1 };
    let mut nfe = 0;
    let mut field = |t: f64, x: Tensor<B, 4>| -> Tensor<B, 4> {
        let t_tensor =
            Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]).convert::<B::FloatElem>(), &device);
        let parts = crate::nn::cpu::in_parts(n, threads, |range| {
            let x = if range.len() == n { x.clone() } else { x.clone().narrow(0, range.start, range.len()) };
            evaluate(&t_tensor, x, range)
        });
        let v = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 0) };
        nfe += 1;
        progress(t, nfe);
        v
    };
    let start = Instant::now();
    let solution = solve(&mut field, input.noise, options)?;
    Ok(BatchOutput { latents: solution.state, stats: solution.stats, seconds: start.elapsed().as_secs_f64() })
}

/// Per-sample noise for samples `first..first + count` of `seed`, shaped `[count, c, h, w]`.
pub fn noise<B: Backend>(seed: u64, first: usize, count: usize, shape: [usize; 3], device: &B::Device) -> Tensor<B, 4> {
    let [c, h, w] = shape;
    let values = crate::noise::batch(seed, first as u64, count, c * h * w);
    Tensor::from_data(TensorData::new(values, [count, c, h, w]).convert::<B::FloatElem>(), device)
}

/// Totals over all batches.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Samples produced.
    pub samples: usize,
    /// Batches solved.
    pub batches: usize,
    /// NFE of each batch.
    pub nfe: Vec<usize>,
    /// Accepted steps, all batches.
    pub accepted: usize,
    /// Rejected steps, all batches.
    pub rejected: usize,
    /// Seconds spent solving.
    pub solve_seconds: f64,
}

impl Summary {
    /// Adds a batch.
    pub fn add(&mut self, count: usize, stats: &SolveStats, seconds: f64) {
        self.samples += count;
        self.batches += 1;
        self.nfe.push(stats.nfe);
        self.accepted += stats.accepted;
        self.rejected += stats.rejected;
        self.solve_seconds += seconds;
    }

    /// (mean, min, max) NFE per batch.
    pub fn nfe_range(&self) -> (f64, usize, usize) {
        let min = self.nfe.iter().copied().min().unwrap_or(0);
        let max = self.nfe.iter().copied().max().unwrap_or(0);
        let mean =
            if self.nfe.is_empty() { 0.0 } else { self.nfe.iter().sum::<usize>() as f64 / self.nfe.len() as f64 };
        (mean, min, max)
    }
}
