//! Sampling: noise → ODE solve from t = 1 to t = 0 → latents → images, with class labels, classifier-free
//! guidance and the conditions of LFM's tasks.
//!
//! - [`sample_batch`] solves one batch (noise, labels, condition) with a velocity network;
//! - [`pipeline`] is the whole run as a library API: a [`Plan`] (network, solver, guidance, batching, noise), the
//!   samples' [`Conditions`], and [`Sink`]s that receive every solved batch (image files, a grid, latents, FID
//!   features). `lfm sample`, `lfm eval` and training previews all run it.
//!
//! Noise is deterministic per sample: sample `i` of a seed gets the same `x1` (and label) whatever the batch it is
//! drawn in. The adaptive solver's error norm runs over the whole batch, as torchdiffeq's does, so with dopri5 a
//! sample's trajectory depends (within the tolerance) on its batch; fixed-step solvers do not couple samples.

mod batch;
pub mod pipeline;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::solver::SolveStats;

pub use batch::{sample_batch, BatchInput, BatchOutput, Guidance};
pub use pipeline::{run, Conditions, GivenNoise, Plan, Progress, SampleError, SampledBatch, Sink};

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
