//! One optimiser step of flow matching: LFM's loss on a batch, its gradients over micro-batches, devices and nodes,
//! and the update LFM takes (AdamW with default betas and no weight decay), in f32 or mixed precision, with an
//! optional moving average of the weights. [`Trainer::step`] is the one step function, whatever the split.

use burn::module::{AutodiffModule, Module};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};

use super::ema::Ema;
use super::mixed::{self, LossScaler};
use super::step::{DeviceShards, Step};
use super::{grads, TrainError};
use crate::checkpoint::TensorMap;
use crate::flow;
use crate::models::{Precision, VelocityModel};
use crate::tasks::semantic::SpatialRescaler;

/// One batch of latents for the flow-matching loss.
#[derive(Debug, Clone)]
pub struct Batch<B: AutodiffBackend> {
    /// Data latents (t = 0).
    pub z0: Tensor<B, 4>,
    /// Noise (t = 1).
    pub z1: Tensor<B, 4>,
    /// Per-sample times in [0, 1).
    pub t: Tensor<B, 1>,
    /// Labels of class-conditional models (after label dropout).
    pub y: Option<Tensor<B, 1, Int>>,
    /// Channels concatenated to `x_t` as they are (inpainting: the masked image's latent and the ±1 mask).
    pub condition: Option<Tensor<B, 4>>,
    /// Class shares per latent cell `[n, classes, h, w]` (semantic synthesis), projected by the trained
    /// network's [`SpatialRescaler`] and concatenated to `x_t`.
    pub segmentation: Option<Tensor<B, 4>>,
}

impl<B: AutodiffBackend> Batch<B> {
    /// A batch without task inputs.
    pub fn new(z0: Tensor<B, 4>, z1: Tensor<B, 4>, t: Tensor<B, 1>, y: Option<Tensor<B, 1, Int>>) -> Self {
        Self { z0, z1, t, y, condition: None, segmentation: None }
    }
}

/// LFM's loss: `mean((model(t, [x_t, condition], y) − u)²)` with `x_t` and `u` from [`crate::flow`].
pub fn flow_matching_loss<B: AutodiffBackend>(model: &VelocityModel<B>, batch: Batch<B>) -> Tensor<B, 1> {
    assert!(batch.segmentation.is_none(), "segmentation maps need a network with a SpatialRescaler (TrainNet)");
    network_loss(model, None, batch, false)
}

/// What a run optimises: the velocity network and, for semantic synthesis, the projection of the segmentation
/// maps (saved apart, as LFM's `cond_stage_model`).
#[derive(Module, Debug)]
pub struct TrainNet<B: Backend> {
    /// The velocity network.
    pub velocity: VelocityModel<B>,
    /// The segmentation projection of semantic synthesis.
    pub rescaler: Option<SpatialRescaler<B>>,
}

impl<B: AutodiffBackend> Batch<B> {
    /// The batch moved to `device`.
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            z0: self.z0.to_device(device),
            z1: self.z1.to_device(device),
            t: self.t.to_device(device),
            y: self.y.map(|y| y.to_device(device)),
            condition: self.condition.map(|c| c.to_device(device)),
            segmentation: self.segmentation.map(|s| s.to_device(device)),
        }
    }
}

/// The loss of a velocity network (and, for semantic synthesis, its segmentation projection) on a batch; with
/// `train_rescaler` false the projection is held fixed (LFM's `no_grad`).
fn network_loss<B: AutodiffBackend>(
    velocity: &VelocityModel<B>,
    rescaler: Option<&SpatialRescaler<B>>,
    batch: Batch<B>,
    train_rescaler: bool,
) -> Tensor<B, 1> {
    let flow::PathSample { x_t, u } = flow::path_sample(batch.z0, batch.z1, batch.t.clone());
    let mut input = vec![x_t];
    input.extend(batch.condition);
    if let Some(shares) = batch.segmentation {
        let rescaler = rescaler.expect("segmentation maps come with a SpatialRescaler");
        let projected = rescaler.project(shares);
        input.push(if train_rescaler { projected } else { projected.detach() });
    }
    let x = if input.len() == 1 { input.pop().expect("one input") } else { Tensor::cat(input, 1) };
    flow::loss(velocity.forward(batch.t, x, batch.y), u)
}

/// What an update does with the global gradient norm.
#[derive(Debug, Clone, Copy)]
enum NormUse {
    /// Nothing (f16 runs still compute it, to detect overflow).
    Ignore,
    /// Compute and report it.
    Report,
    /// Report it, and scale the gradients down to this norm when they exceed it.
    ClipTo(f64),
}

/// How a step's forward and backward passes run: the format the network computes in (its weights cast inside the
/// graph, see [`mixed`]) and the factor the loss is multiplied by before the backward pass (f16's loss scale).
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// The compute format, when it is not the stored weights' (f32).
    cast: Option<burn::tensor::DType>,
    /// The loss scale (1: none).
    loss_scale: f64,
}

impl Pass {
    /// The network the forward pass runs: `net` itself, or a copy with its velocity network cast in the graph.
    fn net<'a, B: AutodiffBackend>(&self, net: &'a TrainNet<B>) -> std::borrow::Cow<'a, TrainNet<B>> {
        match self.cast {
            Some(dtype) => std::borrow::Cow::Owned(TrainNet {
                velocity: mixed::cast_in_graph(net.velocity.clone(), dtype),
                rescaler: net.rescaler.clone(),
            }),
            None => std::borrow::Cow::Borrowed(net),
        }
    }

    /// The loss the backward pass starts from.
    fn scaled<B: AutodiffBackend>(&self, loss: Tensor<B, 1>) -> Tensor<B, 1> {
        if self.loss_scale == 1.0 {
            loss
        } else {
            loss.mul_scalar(self.loss_scale)
        }
    }

    /// Gradients by key with the loss scale undone.
    fn unscaled(&self, mut grads: TensorMap) -> TensorMap {
        if self.loss_scale != 1.0 {
            for tensor in grads.values_mut() {
                let unscaled = tensor.to_f32().iter().map(|&g| (g as f64 / self.loss_scale) as f32).collect();
                *tensor = crate::checkpoint::HostTensor::f32(tensor.shape.clone(), unscaled);
            }
        }
        grads
    }
}

/// What a step's forward and backward passes produced: the weighted loss, the summed gradients, and (when asked for
/// and the step is one micro-batch) the gradients by checkpoint key, loss scale undone.
struct Gradients {
    loss: f64,
    params: GradientsParams,
    by_key: Option<TensorMap>,
}

/// The summed gradients of `batches` (micro-batches of a step of `total` samples), each micro-batch's mean loss
/// weighted by its share of the step, and the weighted loss: one backward pass per micro-batch.
fn micro_batch_gradients<B: AutodiffBackend>(
    net: &TrainNet<B>,
    batches: Vec<Batch<B>>,
    total: usize,
    train_rescaler: bool,
    pass: Pass,
    keep_grads: bool,
) -> Gradients {
    let keep_grads = keep_grads && batches.len() == 1;
    let mut accumulator = GradientsAccumulator::<TrainNet<B>>::new();
    let (mut loss_value, mut by_key) = (0.0, None);
    let forward = pass.net(net);
    for batch in batches {
        let share = batch.z0.dims()[0] as f64 / total.max(1) as f64;
        let loss = network_loss(&forward.velocity, forward.rescaler.as_ref(), batch, train_rescaler);
        // A step of one micro-batch weighs its loss by exactly 1: leave it as it is.
        let loss = if share == 1.0 { loss } else { loss.mul_scalar(share) };
        loss_value += loss.clone().into_scalar().elem::<f64>();
        let grads = pass.scaled(loss).backward();
        if keep_grads {
            by_key = Some(pass.unscaled(crate::checkpoint::collect_grads(&net.velocity, &grads, &net.velocity.keys())));
        }
        accumulator.accumulate(net, GradientsParams::from_grads(grads, net));
    }
    Gradients { loss: loss_value, params: accumulator.grads(), by_key }
}

/// The summed gradients (on the network's device) and weighted loss of micro-batches spread over devices:
/// `shards[d]` holds device `d`'s micro-batches (already on it), each device runs its forward and backward passes on
/// its own copy of the network in its own thread; `total` is the number of examples the losses are averaged over.
fn device_gradients<B: AutodiffBackend>(
    model: &TrainNet<B>,
    shards: DeviceShards<B>,
    total: usize,
    train_rescaler: bool,
    pass: Pass,
    keep_grads: bool,
) -> Gradients {
    // One device is the network's own: no copy, no thread.
    if shards.len() == 1 {
        let (_, batches) = shards.into_iter().next().expect("one shard");
        return micro_batch_gradients(model, batches, total, train_rescaler, pass, keep_grads);
    }
    let main = model.devices().into_iter().next().expect("a network with parameters");
    let results: Vec<Gradients> = std::thread::scope(|scope| {
        let workers: Vec<_> = shards
            .into_iter()
            .filter(|(_, batches)| !batches.is_empty())
            .map(|(device, batches)| {
                let replica = model.clone().fork(&device);
                scope.spawn(move || micro_batch_gradients(&replica, batches, total, train_rescaler, pass, false))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    let mut accumulator = GradientsAccumulator::<TrainNet<B>>::new();
    let mut loss_value = 0.0;
    for result in results {
        loss_value += result.loss;
        accumulator.accumulate(model, result.params.to_device(&main, model));
    }
    Gradients { loss: loss_value, params: accumulator.grads(), by_key: None }
}

/// A model with its optimiser state.
pub struct Trainer<B: AutodiffBackend> {
    /// The network being trained (only absent in the middle of a step).
    model: Option<TrainNet<B>>,
    optimizer: OptimizerAdaptor<AdamW, TrainNet<B>, B>,
    /// The moving average of the weights, when kept.
    ema: Option<Ema<TrainNet<B::InnerBackend>>>,
    /// Whether the segmentation projection learns (see [`TrainNet`]).
    train_rescaler: bool,
    /// The format of the forward and backward passes (the weights stay f32).
    precision: Precision,
    /// f16's dynamic loss scale.
    scaler: Option<LossScaler>,
    /// Optimiser steps taken (skipped f16 steps included).
    pub step: usize,
}

/// A trainer's state as bytes (Burn's record format).
pub struct SavedState {
    /// The model.
    pub model: Vec<u8>,
    /// The optimiser's moments.
    pub optimizer: Vec<u8>,
    /// The moving average, when kept.
    pub ema: Option<Vec<u8>>,
    /// The loss scale of an f16 run.
    pub loss_scaler: Option<LossScaler>,
}

/// The outcome of one training step.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The batch's loss before the update.
    pub loss: f64,
    /// Gradients by checkpoint key (only when asked for).
    pub grads: Option<TensorMap>,
    /// The global gradient norm before any clipping (when the step reports or clips it, and in f16; unscaled).
    pub grad_norm: Option<f64>,
    /// Whether the update was skipped because f16 gradients overflowed (the loss scale was halved).
    pub skipped: bool,
}

impl<B: AutodiffBackend> Trainer<B>
where
    TrainNet<B>: AutodiffModule<B, InnerModule = TrainNet<B::InnerBackend>>,
{
    /// Starts training `model` with `optimizer`.
    pub fn new(model: VelocityModel<B>, optimizer: AdamWConfig) -> Self {
        let net = TrainNet { velocity: model, rescaler: None };
        Self {
            model: Some(net),
            optimizer: optimizer.init(),
            ema: None,
            train_rescaler: false,
            precision: Precision::F32,
            scaler: None,
            step: 0,
        }
    }

    /// Trains in mixed precision: forward and backward passes in `precision` (f16 with dynamic loss scaling, or
    /// bf16), the weights, optimiser and moving average in f32 (see [`mixed`]). The device must support the
    /// format ([`Precision::check_supported`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self.scaler = (precision == Precision::F16).then(LossScaler::default);
        self
    }

    /// Starts f16 loss scaling from `scaler` instead of [`LossScaler::default`] (no effect on other precisions).
    pub fn with_loss_scaler(mut self, scaler: LossScaler) -> Self {
        if self.scaler.is_some() {
            self.scaler = Some(scaler);
        }
        self
    }

    /// The format of the forward and backward passes.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The loss scale of an f16 run.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    fn pass(&self) -> Pass {
        Pass {
            cast: (self.precision != Precision::F32).then(|| self.precision.dtype()),
            loss_scale: self.scaler.as_ref().map_or(1.0, |s| s.scale),
        }
    }

    /// Adds the segmentation projection of semantic synthesis, learned with the network or held fixed (call
    /// before [`Trainer::with_ema`]).
    pub fn with_rescaler(mut self, rescaler: SpatialRescaler<B>, trainable: bool) -> Self {
        let net = self.model.take().expect("a model between steps");
        self.model = Some(TrainNet { velocity: net.velocity, rescaler: Some(rescaler) });
        self.train_rescaler = trainable;
        self
    }

    /// Also keeps a moving average of the weights with this decay, starting from the current weights.
    pub fn with_ema(mut self, decay: f64) -> Self {
        self.ema = Some(Ema::new(self.net().valid(), decay));
        self
    }

    /// The moving average of the weights, when kept.
    pub fn ema(&self) -> Option<&VelocityModel<B::InnerBackend>> {
        self.ema.as_ref().map(|e| &e.model.velocity)
    }

    /// The moving average of the segmentation projection, when both are kept.
    pub fn ema_rescaler(&self) -> Option<&SpatialRescaler<B::InnerBackend>> {
        self.ema.as_ref().and_then(|e| e.model.rescaler.as_ref())
    }

    /// The network being trained.
    pub fn model(&self) -> &VelocityModel<B> {
        &self.net().velocity
    }

    /// The segmentation projection, for semantic synthesis.
    pub fn rescaler(&self) -> Option<&SpatialRescaler<B>> {
        self.net().rescaler.as_ref()
    }

    fn net(&self) -> &TrainNet<B> {
        self.model.as_ref().expect("a model between steps")
    }

    /// The model's and the optimiser's state as bytes (Burn's record format, parameter ids included, so that the
    /// optimiser's moments find their parameters again on resume).
    pub fn save_state(&self) -> Result<SavedState, String> {
        use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let model =
            Recorder::<B>::record(&recorder, self.net().clone().into_record(), ()).map_err(|e| e.to_string())?;
        let optimizer = Recorder::<B>::record(&recorder, self.optimizer.to_record(), ()).map_err(|e| e.to_string())?;
        let ema = match &self.ema {
            Some(ema) => Some(
                Recorder::<B::InnerBackend>::record(&recorder, ema.model.clone().into_record(), ())
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(SavedState { model, optimizer, ema, loss_scaler: self.scaler.clone() })
    }

    /// Restores what [`Trainer::save_state`] wrote (after `steps` optimiser steps).
    pub fn load_state(&mut self, saved: SavedState, steps: usize, device: &B::Device) -> Result<(), String> {
        use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let model_record =
            Recorder::<B>::load(&recorder, saved.model, device).map_err(|e| format!("model state: {e}"))?;
        let optimizer_record =
            Recorder::<B>::load(&recorder, saved.optimizer, device).map_err(|e| format!("optimizer state: {e}"))?;
        match (&mut self.ema, saved.ema) {
            (Some(ema), Some(bytes)) => {
                let record = Recorder::<B::InnerBackend>::load(&recorder, bytes, device)
                    .map_err(|e| format!("moving-average state: {e}"))?;
                ema.model = ema.model.clone().load_record(record);
            }
            (None, None) => {}
            (Some(_), None) => return Err("the checkpoint holds no moving average of the weights".into()),
            (None, Some(_)) => return Err("the checkpoint holds a moving average but none is kept now".into()),
        }
        match (&self.scaler, saved.loss_scaler) {
            (Some(_), Some(scaler)) => self.scaler = Some(scaler),
            (None, None) => {}
            (Some(_), None) => return Err("the checkpoint holds no loss scale, which f16 training needs".into()),
            (None, Some(_)) => return Err("the checkpoint holds an f16 loss scale but this run is not f16".into()),
        }
        let model = self.model.take().expect("a model between steps");
        self.model = Some(model.load_record(model_record));
        let optimizer = std::mem::replace(&mut self.optimizer, super::lfm_adamw().init());
        self.optimizer = optimizer.load_record(optimizer_record);
        self.step = steps;
        Ok(())
    }

    /// One optimiser step: the forward and backward passes of every micro-batch of `work` (on its device, in its
    /// own thread when there are several devices), the gradients summed on the network's device and over the nodes
    /// (one all-reduce), f16's loss scale undone (an overflow skips the update and halves the scale), the global
    /// norm computed and clipped as `work` asks, then the AdamW update and the moving average. Every node applies
    /// the same update to the same weights. The loss reported is the mean over every example of the step.
    pub fn step(&mut self, work: Step<'_, B>) -> Result<StepReport, TrainError> {
        let model = self.model.take().expect("a model between steps");
        let pass = self.pass();
        let keep = work.keep_grads && work.nodes.is_none();
        let mut gradients = device_gradients(&model, work.shards, work.total, self.train_rescaler, pass, keep);
        if let Some(nodes) = work.nodes {
            let params = std::mem::take(&mut gradients.params);
            match nodes.all_reduce::<B, _>(&model, params, gradients.loss) {
                Ok((params, loss)) => (gradients.params, gradients.loss) = (params, loss),
                Err(e) => {
                    self.model = Some(model);
                    return Err(e.into());
                }
            }
        }
        if work.keep_grads && gradients.by_key.is_none() {
            self.model = Some(model);
            return Err(TrainError::Invalid(
                "gradients by key are kept for a step of one micro-batch on one device and one node".into(),
            ));
        }
        let norm = match (work.max_grad_norm, work.report_grad_norm) {
            (Some(max), _) => NormUse::ClipTo(max),
            (None, true) => NormUse::Report,
            (None, false) => NormUse::Ignore,
        };
        let (grad_norm, skipped) = self.update(model, gradients.params, work.lr, norm);
        Ok(StepReport { loss: gradients.loss, grads: gradients.by_key, grad_norm, skipped })
    }

    /// Undoes f16's loss scale, skips the update if the gradients overflowed, handles the global norm as `norm`
    /// says (f16 always computes it, to detect the overflow), applies. Returns the norm when computed and whether
    /// the update was skipped.
    fn update(
        &mut self,
        model: TrainNet<B>,
        mut params: GradientsParams,
        lr: f64,
        norm: NormUse,
    ) -> (Option<f64>, bool) {
        if let Some(scaler) = &self.scaler {
            grads::scale::<B, _>(&model, &mut params, 1.0 / scaler.scale);
        }
        let wanted = !matches!(norm, NormUse::Ignore) || self.scaler.is_some();
        let global = wanted.then(|| grads::global_norm::<B, _>(&model, &params));
        if let Some(scaler) = &mut self.scaler {
            if !scaler.update(global.is_some_and(f64::is_finite)) {
                self.model = Some(model);
                self.step += 1;
                return (global, true);
            }
        }
        if let (NormUse::ClipTo(max), Some(global)) = (norm, global) {
            grads::clip_to_norm::<B, _>(&model, &mut params, global, max);
        }
        self.apply(model, params, lr);
        (global, false)
    }

    /// The AdamW update, the moving average, the step count.
    fn apply(&mut self, model: TrainNet<B>, params: GradientsParams, lr: f64) {
        let model = self.optimizer.step(lr, model, params);
        if let Some(ema) = &mut self.ema {
            ema.update(&model.valid());
        }
        self.model = Some(model);
        self.step += 1;
    }
}
