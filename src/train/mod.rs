//! Flow-matching training: the loss of one batch, its gradients, and the optimiser step LFM takes (AdamW with
//! default betas and no weight decay); the data sources and the resumable loop of `lfm train`.

pub mod autoencoder;
pub mod ema;
pub mod grads;
pub mod metrics_log;
pub mod mixed;
pub mod nodes;
pub mod run;
pub mod schedule;

use burn::module::{AutodiffModule, Module};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};

use crate::checkpoint::TensorMap;
use crate::flow;
use crate::models::{Precision, VelocityModel};
use crate::tasks::semantic::SpatialRescaler;
use ema::Ema;
use mixed::LossScaler;

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
}

/// The summed gradients of `batches` (micro-batches of a step of `total` samples), each micro-batch's mean loss
/// weighted by its share of the step, and the weighted loss: one backward pass per micro-batch.
fn micro_batch_gradients<B: AutodiffBackend>(
    net: &TrainNet<B>,
    batches: Vec<Batch<B>>,
    total: usize,
    train_rescaler: bool,
    pass: Pass,
) -> (f64, GradientsParams) {
    let mut accumulator = GradientsAccumulator::<TrainNet<B>>::new();
    let mut loss_value = 0.0;
    let forward = pass.net(net);
    for batch in batches {
        let share = batch.z0.dims()[0] as f64 / total.max(1) as f64;
        let loss = network_loss(&forward.velocity, forward.rescaler.as_ref(), batch, train_rescaler).mul_scalar(share);
        loss_value += loss.clone().into_scalar().elem::<f64>();
        accumulator.accumulate(net, GradientsParams::from_grads(pass.scaled(loss).backward(), net));
    }
    (loss_value, accumulator.grads())
}

/// Micro-batches per device: each device's own, already on it.
pub type DeviceShards<B> = Vec<(burn::tensor::ops::Device<B>, Vec<Batch<B>>)>;

/// The summed gradients (on the network's device) and weighted loss of micro-batches spread over devices:
/// `shards[d]` holds device `d`'s micro-batches (already on it), each device runs its forward and backward passes on
/// its own copy of the network in its own thread; `total` is the number of examples the losses are averaged over.
fn device_gradients<B: AutodiffBackend>(
    model: &TrainNet<B>,
    shards: DeviceShards<B>,
    total: usize,
    train_rescaler: bool,
    pass: Pass,
) -> (f64, GradientsParams) {
    let main = model.devices().into_iter().next().expect("a network with parameters");
    if let [(device, _)] = shards.as_slice() {
        if *device == main {
            let (_, batches) = shards.into_iter().next().expect("one shard");
            return micro_batch_gradients(model, batches, total, train_rescaler, pass);
        }
    }
    let results: Vec<(f64, GradientsParams)> = std::thread::scope(|scope| {
        let workers: Vec<_> = shards
            .into_iter()
            .filter(|(_, batches)| !batches.is_empty())
            .map(|(device, batches)| {
                let replica = model.clone().fork(&device);
                scope.spawn(move || micro_batch_gradients(&replica, batches, total, train_rescaler, pass))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    let mut accumulator = GradientsAccumulator::<TrainNet<B>>::new();
    let mut loss_value = 0.0;
    for (loss, grads) in results {
        loss_value += loss;
        accumulator.accumulate(model, grads.to_device(&main, model));
    }
    (loss_value, accumulator.grads())
}

/// AdamW as LFM configures it: betas (0.9, 0.999), eps 1e-8, weight decay 0 (LFM's `--beta1/--beta2` are ignored).
pub fn lfm_adamw() -> AdamWConfig {
    AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(0.0)
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
    /// The global gradient norm before any clipping (from [`Trainer::step_accumulated`]; unscaled).
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
        let optimizer = std::mem::replace(&mut self.optimizer, lfm_adamw().init());
        self.optimizer = optimizer.load_record(optimizer_record);
        self.step = steps;
        Ok(())
    }

    /// Loss, backward, one AdamW step at learning rate `lr`. With `keep_grads`, the gradients are returned by
    /// checkpoint key (for checks against the reference).
    pub fn step(&mut self, batch: Batch<B>, lr: f64, keep_grads: bool) -> StepReport {
        let model = self.model.take().expect("a model between steps");
        let pass = self.pass();
        let loss = {
            let forward = pass.net(&model);
            network_loss(&forward.velocity, forward.rescaler.as_ref(), batch, self.train_rescaler)
        };
        let loss_value: f64 = loss.clone().into_scalar().elem();
        let grads = pass.scaled(loss).backward();
        let kept = keep_grads.then(|| {
            let mut kept = crate::checkpoint::collect_grads(&model.velocity, &grads, &model.velocity.keys());
            if pass.loss_scale != 1.0 {
                for tensor in kept.values_mut() {
                    let unscaled = tensor.to_f32().iter().map(|&g| (g as f64 / pass.loss_scale) as f32).collect();
                    *tensor = crate::checkpoint::HostTensor::f32(tensor.shape.clone(), unscaled);
                }
            }
            kept
        });
        let params = GradientsParams::from_grads(grads, &model);
        let (grad_norm, skipped) = self.update(model, params, lr, NormUse::Ignore);
        StepReport { loss: loss_value, grads: kept, grad_norm, skipped }
    }

    /// One optimiser step on the gradient of the mean loss over several micro-batches (gradient accumulation:
    /// each backward pass holds one micro-batch's activations), optionally clipped to a global norm of
    /// `max_grad_norm` first. The loss reported is the mean over every sample of the micro-batches.
    pub fn step_accumulated(&mut self, batches: Vec<Batch<B>>, lr: f64, max_grad_norm: Option<f64>) -> StepReport {
        let model = self.model.take().expect("a model between steps");
        let total: usize = batches.iter().map(|b| b.z0.dims()[0]).sum();
        let (loss, params) = micro_batch_gradients(&model, batches, total, self.train_rescaler, self.pass());
        self.clip_and_apply(model, params, loss, lr, max_grad_norm)
    }

    /// Single-node data parallelism: one optimiser step on the mean loss over micro-batches spread over devices.
    /// `shards[d]` holds device `d`'s micro-batches (already on it); each device runs forward and backward passes on
    /// its own copy of the network in its own thread; the gradients are summed on the network's device, optionally
    /// clipped to a global norm, and the update is applied there (the copies are refreshed every step). The result
    /// is [`Self::step_accumulated`]'s on the same micro-batches, up to the order of the sums.
    pub fn step_data_parallel(&mut self, shards: DeviceShards<B>, lr: f64, max_grad_norm: Option<f64>) -> StepReport {
        let model = self.model.take().expect("a model between steps");
        let total: usize = shards.iter().flat_map(|(_, b)| b).map(|b| b.z0.dims()[0]).sum();
        let (loss, grads) = device_gradients(&model, shards, total, self.train_rescaler, self.pass());
        self.clip_and_apply(model, grads, loss, lr, max_grad_norm)
    }

    /// Data parallelism across nodes: this node's micro-batches (spread over its devices as in
    /// [`Self::step_data_parallel`]) out of a step of `total` examples over all nodes; the gradients and the loss
    /// are summed over the nodes (one all-reduce), then every node clips and applies the same update to the same
    /// weights. The result is [`Self::step_accumulated`]'s on all the nodes' micro-batches, up to the order of the sums.
    pub fn step_across_nodes(
        &mut self,
        shards: DeviceShards<B>,
        total: usize,
        nodes: &mut nodes::NodeGroup,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<StepReport, nodes::NodeError> {
        let model = self.model.take().expect("a model between steps");
        let main = model.devices().into_iter().next().expect("a network with parameters");
        let (loss, grads) = device_gradients(&model, shards, total, self.train_rescaler, self.pass());
        let mut packed = grads::pack::<B, _>(&model, &grads);
        packed.push(loss as f32);
        if let Err(e) = nodes.all_reduce_sum(&mut packed) {
            self.model = Some(model);
            return Err(e);
        }
        let loss = packed.pop().expect("the loss") as f64;
        let grads = grads::unpack::<B, _>(&model, &packed, &main);
        Ok(self.clip_and_apply(model, grads, loss, lr, max_grad_norm))
    }

    /// Clips the gradients to a global norm of `max_grad_norm` (if given), applies them, reports the step.
    fn clip_and_apply(
        &mut self,
        model: TrainNet<B>,
        params: GradientsParams,
        loss: f64,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> StepReport {
        let norm = max_grad_norm.map_or(NormUse::Report, NormUse::ClipTo);
        let (grad_norm, skipped) = self.update(model, params, lr, norm);
        StepReport { loss, grads: None, grad_norm, skipped }
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
