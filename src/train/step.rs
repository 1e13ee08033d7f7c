//! What one optimiser step works on: micro-batches per device, the processes whose gradients join this one's, the
//! learning rate and what the update does with the gradient norm. [`super::Trainer::step`] takes it.

use burn::tensor::backend::AutodiffBackend;

use super::group::ProcessGroup;
use super::trainer::Batch;

/// Micro-batches per device: each device's own, already on it.
pub type DeviceShards<B> = Vec<(burn::tensor::ops::Device<B>, Vec<Batch<B>>)>;

/// One optimiser step's work: micro-batches per device, the other processes whose gradients join this one's, and what
/// the update does with the gradient norm. One device with one micro-batch is a plain step; several micro-batches
/// accumulate gradients; several devices run data-parallel; `nodes` sums over processes. Whatever the split, the update
/// is the one of the whole batch's mean loss, up to the order of the sums.
pub struct Step<'a, B: AutodiffBackend> {
    /// Micro-batches per device, each already on its device (the first device is the network's; one shard runs on
    /// the network itself).
    pub shards: DeviceShards<B>,
    /// Examples of the whole step over every node: the mean loss's denominator.
    pub total: usize,
    /// The learning rate.
    pub lr: f64,
    /// Clip the global gradient norm to this value before the update.
    pub max_grad_norm: Option<f64>,
    /// Compute and report the global gradient norm even without clipping.
    pub report_grad_norm: bool,
    /// The processes of a run on several processes.
    pub nodes: Option<&'a mut ProcessGroup>,
    /// Return the gradients by checkpoint key (one micro-batch on one node only), for checks against the reference.
    pub keep_grads: bool,
}

impl<B: AutodiffBackend> Step<'static, B> {
    /// A step on `batch`, on its device, at learning rate `lr`.
    pub fn new(batch: Batch<B>, lr: f64) -> Self {
        Self::accumulated(vec![batch], lr)
    }

    /// A step on the mean loss over `batches` (micro-batches on one device: gradient accumulation, each backward
    /// pass holding one micro-batch's activations).
    pub fn accumulated(batches: Vec<Batch<B>>, lr: f64) -> Self {
        let device = batches.first().map(|b| b.z0.device()).unwrap_or_default();
        Self::spread(vec![(device, batches)], lr)
    }

    /// A step on micro-batches spread over devices (single-node data parallelism).
    pub fn spread(shards: DeviceShards<B>, lr: f64) -> Self {
        let total = shards.iter().flat_map(|(_, b)| b).map(|b| b.z0.dims()[0]).sum();
        Self { shards, total, lr, max_grad_norm: None, report_grad_norm: false, nodes: None, keep_grads: false }
    }
}

impl<'a, B: AutodiffBackend> Step<'a, B> {
    /// Clips the global gradient norm to `max` (when given) and reports the norm.
    pub fn clipped(self, max: Option<f64>) -> Self {
        Self { max_grad_norm: max, report_grad_norm: true, ..self }
    }

    /// Returns the gradients by checkpoint key.
    pub fn keeping_grads(self) -> Self {
        Self { keep_grads: true, ..self }
    }

    /// Sums the gradients over the processes of `nodes`; `total` is the examples of the step over all of them.
    pub fn across<'b>(self, nodes: &'b mut ProcessGroup, total: usize) -> Step<'b, B> {
        Step {
            shards: self.shards,
            total,
            lr: self.lr,
            max_grad_norm: self.max_grad_norm,
            report_grad_norm: self.report_grad_norm,
            nodes: Some(nodes),
            keep_grads: self.keep_grads,
        }
    }
}
