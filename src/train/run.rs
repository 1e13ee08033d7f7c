//! The training loop of `lfm train`: deterministic batches, checkpoints written atomically, exact resume.
//!
//! Every random choice of step `s` (the epoch's shuffle, flips, noise, times, posterior samples, label dropout) is
//! drawn from streams keyed by the seed and `s`, so a run resumed from a checkpoint takes exactly the steps an
//! uninterrupted run takes. A checkpoint is the model's and the optimiser's state at a step boundary plus
//! `state.json`, written last (temp file + rename): a crash at any point leaves the previous checkpoint intact.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::mixed::LossScaler;
use super::nodes::NodeGroup;
use super::schedule::Schedule;
use super::{lfm_adamw, Batch, DeviceShards, SavedState, Trainer};
use crate::autoencoder::{AnyAutoencoder, Autoencoder};
use crate::checkpoint::{write_safetensors, CONFIG_METADATA_KEY};
use crate::data::loader::{epoch_of, prefetch, HostContent};
use crate::data::Source;
use crate::io::write_atomic;
use crate::models::{ModelConfig, Precision, VelocityModel};
use crate::tasks::masks::{self, MaskParams};
use crate::tasks::semantic::{class_shares, SpatialRescaler};
use crate::tasks::{read_mask, Task, TaskFiles};

/// Settings of a run (stored in `state.json`; a resume must use the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Samples per step.
    pub batch_size: usize,
    /// Steps to reach.
    pub max_steps: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Write a checkpoint every this many steps (and at the end).
    pub save_every: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Random horizontal flips of images.
    pub flip: bool,
    /// Keep a moving average of the weights with this decay (LFM's `--use_ema` uses 0.9999).
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Ramp the learning rate linearly from `lr / warmup_steps` to `lr` over this many first steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Micro-batches per step: each step's `batch_size` samples are split into this many backward passes whose
    /// gradients are summed (same result as one pass, less memory).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value before each update (`clip_grad_norm_`).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// What the network learns: generation, inpainting or semantic synthesis.
    #[serde(default)]
    pub task: Task,
    /// Write a grid of samples to `previews/` every this many steps (0: never); see [`PREVIEW_SAMPLES`].
    #[serde(default)]
    pub preview_every: usize,
    /// Devices that share each step (single-node data parallelism): the given device and the next ones of its kind
    /// (device ids `index + 1`, …); on the CPU, that many copies sharing its cores. 1: one device.
    #[serde(default = "one")]
    pub data_parallel: usize,
    /// The format of the forward and backward passes (mixed precision: the weights, optimiser and moving average
    /// stay f32; f16 scales the loss, see [`super::mixed`]).
    #[serde(default)]
    pub precision: Precision,
}

/// Samples in a preview grid (one row per class for class-conditional models, classes cycling), drawn from the same
/// noise every time, so the grids of a run show one set of samples improving.
pub const PREVIEW_SAMPLES: usize = 16;
/// Euler steps of a preview (previews are for watching a run, not for scoring it).
pub const PREVIEW_STEPS: usize = 20;

fn one() -> usize {
    1
}

impl RunSettings {
    /// The learning rate of a step: the schedule's for that step and its epoch, times the warm-up ramp.
    pub fn lr_at(&self, step: usize, epoch: usize) -> f64 {
        let ramp = if self.warmup_steps > 0 { ((step + 1) as f64 / self.warmup_steps as f64).min(1.0) } else { 1.0 };
        self.schedule.lr(self.lr, step, epoch) * ramp
    }
}

/// How a run ended on this node.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// This node (the leader, rank 0) wrote the final checkpoint, described by its state.
    Written(Box<State>),
    /// Another node of a multi-node run: it trained every step but wrote nothing (the leader wrote the weights).
    Follower {
        /// Steps taken (the run's total).
        step: usize,
        /// Images of this node's shards that could not be read.
        unreadable_images: usize,
    },
}

/// What `state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Steps completed.
    pub step: usize,
    /// The network.
    pub model: ModelConfig,
    /// The run.
    pub settings: RunSettings,
    /// File of the model's state (Burn record), relative to the state folder.
    pub model_file: String,
    /// File of the optimiser's state.
    pub optimizer_file: String,
    /// File of the moving average's state, when kept.
    #[serde(default)]
    pub ema_file: Option<String>,
    /// Images that could not be read so far.
    pub unreadable_images: usize,
    /// The loss scale of an f16 run.
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
}

/// The segmentation projection a semantic run writes next to `model.safetensors`.
pub const RESCALER_FILE: &str = "rescaler.safetensors";
/// Its moving average, next to `ema.safetensors`.
pub const EMA_RESCALER_FILE: &str = "rescaler-ema.safetensors";

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Files could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The settings, data or checkpoint do not fit together.
    #[error("{0}")]
    Invalid(String),
    /// The loss stopped being finite.
    #[error("the loss became {loss} at step {step}; lower --lr or check the data")]
    NonFinite {
        /// The step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// A multi-node run lost or could not reach its other nodes.
    #[error(transparent)]
    Nodes(#[from] super::nodes::NodeError),
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// The folder holding the training state inside the output folder.
pub fn state_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("train-state")
}

/// Reads `state.json` of an output folder, if there is one.
pub fn read_state(out_dir: &Path) -> Result<Option<State>, TrainError> {
    let path = state_dir(out_dir).join("state.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| {
        TrainError::Invalid(format!("{}: damaged training state ({e}); delete the folder to restart", path.display()))
    })
}

/// Stream keys, so that the random choices of different kinds never share values.
pub(crate) const SHUFFLE: u64 = 0x5348_5546;
pub(crate) const FLIP: u64 = 0x464C_4950;
const NOISE: u64 = 0x4E4F_4953;
const TIME: u64 = 0x5449_4D45;
pub(crate) const POSTERIOR: u64 = 0x504F_5354;
const DROP: u64 = 0x4452_4F50;
const MASK: u64 = 0x4D41_534B;
const CONDITION: u64 = 0x434F_4E44;
const PREVIEW: u64 = 0x5052_4556;

/// `count` devices for data parallelism: `device` and the next ones of its kind (device ids `index + 1`, …).
pub fn replica_devices<B: Backend>(device: &B::Device, count: usize) -> Vec<B::Device> {
    use burn::tensor::backend::Device;
    (0..count.max(1))
        .map(|k| {
            let mut id = device.to_id();
            id.index_id += k as u16;
            B::Device::from_id(id)
        })
        .collect()
}

/// Trains `config` (from `init` weights if given, else freshly initialised) on `source` (with the task's `files`)
/// on backend `B`, resuming from `out_dir`'s checkpoint when `resume` is set. Returns the final checkpoint's state
/// (on the node that writes it).
///
/// On several `nodes`, each node trains on its share of every batch and the gradients are summed over the nodes;
/// only the leader (rank 0) writes `out_dir` (a resumed run reads it on every node: a shared file system, or a copy).
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    config: &ModelConfig,
    init: Option<&crate::checkpoint::TensorMap>,
    source: &Source,
    files: &TaskFiles,
    autoencoder: Option<&AnyAutoencoder<B>>,
    settings: &RunSettings,
    out_dir: &Path,
    resume: bool,
    nodes: &mut NodeGroup,
    device: &B::Device,
) -> Result<RunOutcome, TrainError> {
    type A<B> = Autodiff<B>;
    let leader = nodes.is_leader();
    if source.is_empty() {
        return Err(TrainError::Invalid("the training data is empty".into()));
    }
    // The command line refuses these while parsing; a library caller gets the same words, before any work.
    if !(settings.lr > 0.0 && settings.lr.is_finite()) {
        return Err(TrainError::Invalid(format!("--lr {} must be a finite number > 0", settings.lr)));
    }
    if let Some(max) = settings.max_grad_norm.filter(|m| !(*m > 0.0 && m.is_finite())) {
        return Err(TrainError::Invalid(format!("--max-grad-norm {max} must be a finite number > 0")));
    }
    if settings.preview_every > 0 && (settings.task != Task::Generate || autoencoder.is_none()) {
        return Err(TrainError::Invalid(
            "--preview-every samples unconditional or class-conditional models and decodes them: it needs --task \
             generate and the autoencoder (--weights)"
                .into(),
        ));
    }
    let (c_in, c_out) = config.channels();
    let extra = settings.task.extra_channels(c_out);
    if c_in != c_out + extra {
        return Err(TrainError::Invalid(format!(
            "--task {} feeds the network {c_out} latent + {extra} condition channels, but the model reads {c_in}: \
             set its input channels to {}",
            settings.task.name(),
            c_out + extra
        )));
    }
    if settings.task != Task::Generate && autoencoder.is_none() {
        return Err(TrainError::Invalid(format!(
            "--task {} encodes images every step: it needs --data and the autoencoder",
            settings.task.name()
        )));
    }
    // A fresh network's initialisation is drawn from the backend's generator: seed it so that runs repeat.
    <A<B> as Backend>::seed(device, settings.seed);
    let model = match init {
        Some(weights) => {
            VelocityModel::<A<B>>::load(config, weights, device).map_err(|e| TrainError::Invalid(e.to_string()))?
        }
        None => VelocityModel::<A<B>>::init(config, device),
    };
    settings.precision.check_supported::<B>(device).map_err(TrainError::Invalid)?;
    let mut trainer = Trainer::new(model, lfm_adamw()).with_precision(settings.precision);
    if let (Task::Semantic { classes, train_rescaler, .. }, Some(ae)) = (&settings.task, autoencoder) {
        let stages = ae.factor().trailing_zeros() as usize;
        trainer = trainer.with_rescaler(SpatialRescaler::new(*classes, c_out, stages, device), *train_rescaler);
    }
    if let Some(decay) = settings.ema_decay {
        if !(0.0..1.0).contains(&decay) {
            return Err(TrainError::Invalid(format!("--ema-decay {decay} must be in [0, 1), e.g. 0.9999")));
        }
        trainer = trainer.with_ema(decay);
    }
    let dir = state_dir(out_dir);
    if leader {
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    }
    let mut unreadable = 0;
    if resume {
        let state = read_state(out_dir)?
            .ok_or_else(|| TrainError::Invalid(format!("--resume: {} holds no training state", out_dir.display())))?;
        if &state.model != config
            || state.settings.seed != settings.seed
            || state.settings.batch_size != settings.batch_size
            || state.settings.ema_decay != settings.ema_decay
            || state.settings.task != settings.task
            || state.settings.precision != settings.precision
        {
            return Err(TrainError::Invalid(
                "--resume: the model, seed, batch size, EMA decay, task or precision differ from the checkpoint's; \
                 resume with the same ones"
                    .into(),
            ));
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| io_error(&path, e))
        };
        let saved = SavedState {
            model: read(&state.model_file)?,
            optimizer: read(&state.optimizer_file)?,
            ema: state.ema_file.as_deref().map(read).transpose()?,
            loss_scaler: state.loss_scaler.clone(),
        };
        trainer.load_state(saved, state.step, device).map_err(|e| {
            TrainError::Invalid(format!("{}: {e}; the checkpoint is damaged (truncated?)", dir.display()))
        })?;
        unreadable = state.unreadable_images;
        tracing::info!("resumed at step {}", state.step);
    } else if leader && read_state(out_dir)?.is_some() {
        return Err(TrainError::Invalid(format!(
            "{} already holds a training run: pass --resume to continue it, or choose another --out",
            out_dir.display()
        )));
    }

    let log_path = out_dir.join("metrics.jsonl");
    let mut log = match leader {
        true => Some(
            super::metrics_log::open(&log_path, resume.then_some(trainer.step)).map_err(|e| io_error(&log_path, e))?,
        ),
        false => None,
    };
    let progress = if leader { ProgressBar::new(settings.max_steps as u64) } else { ProgressBar::hidden() };
    progress.set_style(
        ProgressStyle::with_template("training {bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("template"),
    );
    progress.set_position(trainer.step as u64);
    let (c, side) = (config.channels().1, config.latent_size());
    let per_sample = c * side * side;
    let null_label = match config {
        ModelConfig::Dit(d) if d.label_dropout > 0.0 => Some((d.label_dropout, d.num_classes as i64)),
        _ => None,
    };
    let devices = replica_devices::<B>(device, settings.data_parallel);
    if devices.len() > 1 {
        tracing::info!("data parallel: each step's batch split over {devices:?}");
    }
    if nodes.world() > 1 {
        tracing::info!("node {} of {}: training on its share of every batch", nodes.rank(), nodes.world());
    }
    let mut state = None;
    // The host prepares batches on its own thread while the device trains (see `loader`); the receiver is dropped
    // on any early return, which stops that thread.
    std::thread::scope(|scope| -> Result<(), TrainError> {
        let batches =
            prefetch(scope, source, files, settings, per_sample, (trainer.step, settings.max_steps), unreadable);
        while trainer.step < settings.max_steps {
            let step = trainer.step;
            let start = Instant::now();
            let prepared = batches.recv().map_err(|_| TrainError::Invalid("the data loader stopped".into()))??;
            debug_assert_eq!(prepared.step, step);
            unreadable = prepared.unreadable;
            if prepared.content.is_empty() {
                trainer.step += 1;
                continue;
            }
            // This node's rows of the step's batch (all of it on a single node); every per-example random draw is
            // keyed by the example's place in the whole batch, so the nodes' shares add up to the one-node step.
            let total = prepared.content.len();
            let rows = nodes.rows(total);
            let first = step * settings.batch_size + rows.start;
            let mut rng_time = crate::noise::rng(settings.seed ^ TIME, step as u64);
            let times: Vec<f32> = (0..total).map(|_| rng_time.random::<f32>()).collect();
            let dropped = match null_label {
                Some((p, _)) => label_dropout(settings.seed, step, total, p),
                None => vec![false; total],
            };
            // A node may have no rows of a batch smaller than the number of nodes; it still takes part in the sum.
            let content = if rows.is_empty() { HostContent::Nothing } else { prepared.content.rows(rows.clone()) };
            // Data latents z0 for the node's rows, labels, and the task's inputs.
            let (z0, labels, condition, segmentation): (Tensor<B, 4>, Option<Vec<i64>>, _, _) = match content {
                HostContent::Nothing => (Tensor::empty([0, c, side, side], device), None, None, None),
                HostContent::Latents { values, n, labels } => {
                    let data = TensorData::new(values, [n, c, side, side]).convert::<B::FloatElem>();
                    (Tensor::from_data(data, device), labels, None, None)
                }
                HostContent::Images { images, maps, labels, size } => {
                    let ae =
                        autoencoder.ok_or_else(|| TrainError::Invalid("image data needs an autoencoder".into()))?;
                    let n = images.len();
                    let x = crate::image::to_tensor::<B>(&images, device)
                        .map_err(|e| TrainError::Invalid(e.to_string()))?;
                    let f = ae.factor();
                    let latent = [c, size / f, size / f];
                    let eps = crate::sample::noise::<B>(settings.seed ^ POSTERIOR, first, n, latent, device);
                    match &settings.task {
                        Task::Generate => (ae.encode(x, Some(eps)), labels, None, None),
                        Task::Inpaint { mask_white_is_hole, .. } => {
                            let holes = (0..n)
                                .map(|j| inpainting_hole(settings, files, size, first + j, *mask_white_is_hole))
                                .collect::<Result<Vec<_>, _>>()?
                                .concat();
                            let hole = crate::tasks::inpaint::hole_tensor::<B>(holes, n, (size, size), device);
                            // As LFM's dataset: the image and the masked image, both encoded with posterior samples (in
                            // one pass), then the mask on the latent grid.
                            let masked = crate::tasks::inpaint::masked_images(x.clone(), hole.clone());
                            let eps_masked =
                                crate::sample::noise::<B>(settings.seed ^ CONDITION, first, n, latent, device);
                            let z =
                                ae.encode(Tensor::cat(vec![x, masked], 0), Some(Tensor::cat(vec![eps, eps_masked], 0)));
                            let condition = crate::tasks::inpaint::condition(z.clone().narrow(0, n, n), hole, f);
                            (z.narrow(0, 0, n), labels, Some(condition), None)
                        }
                        Task::Semantic { classes, .. } => {
                            let shares =
                                class_shares::<B>(&maps, size, f, *classes, device).map_err(TrainError::Invalid)?;
                            (ae.encode(x, Some(eps)), labels, None, Some(shares))
                        }
                    }
                }
            };
            let n = z0.dims()[0];
            let epoch = epoch_of(step, source.len(), settings.batch_size);
            let lr = settings.lr_at(step, epoch);
            let mut batches = Vec::new();
            if n > 0 {
                let z1 = crate::sample::noise::<B>(settings.seed ^ NOISE, first, n, [c, side, side], device);
                let t = TensorData::new(times[rows.clone()].to_vec(), [n]).convert::<B::FloatElem>();
                let t = Tensor::<B, 1>::from_data(t, device);
                let y = labels.map(|mut y| {
                    if let Some((_, null)) = null_label {
                        for (label, &drop) in y.iter_mut().zip(&dropped[rows.clone()]) {
                            if drop {
                                *label = null;
                            }
                        }
                    }
                    Tensor::<A<B>, 1, Int>::from_data(TensorData::new(y, [n]), device)
                });
                let micro = n.div_ceil(settings.grad_accum.max(1) * devices.len());
                batches = (0..n)
                    .step_by(micro)
                    .map(|i| {
                        let len = micro.min(n - i);
                        let part = |x: &Tensor<B, 4>| Tensor::from_inner(x.clone().narrow(0, i, len));
                        Batch {
                            z0: part(&z0),
                            z1: part(&z1),
                            t: Tensor::from_inner(t.clone().narrow(0, i, len)),
                            y: y.clone().map(|y| y.narrow(0, i, len)),
                            condition: condition.as_ref().map(part),
                            segmentation: segmentation.as_ref().map(part),
                        }
                    })
                    .collect();
            }
            // Each device takes `grad_accum` consecutive micro-batches.
            let mut spread = batches.into_iter();
            let mut shards: DeviceShards<A<B>> = devices
                .iter()
                .map(|d| {
                    let mine = spread.by_ref().take(settings.grad_accum.max(1));
                    (d.clone(), if devices.len() > 1 { mine.map(|b| b.to_device(d)).collect() } else { mine.collect() })
                })
                .collect();
            let report = if nodes.world() > 1 {
                trainer.step_across_nodes(shards, total, nodes, lr, settings.max_grad_norm)?
            } else if devices.len() > 1 {
                trainer.step_data_parallel(shards, lr, settings.max_grad_norm)
            } else {
                trainer.step_accumulated(shards.remove(0).1, lr, settings.max_grad_norm)
            };
            if !report.loss.is_finite() {
                return Err(TrainError::NonFinite { step, loss: report.loss });
            }
            if report.skipped {
                tracing::debug!("step {}: f16 gradients overflowed; update skipped, loss scale halved", step + 1);
            }
            let seconds = start.elapsed().as_secs_f64();
            if let Some(log) = log.as_mut() {
                let mut line = serde_json::json!({"step": step + 1, "epoch": epoch, "loss": report.loss, "lr": lr,
                "grad_norm": report.grad_norm,
                "samples_per_s": total as f64 / seconds, "unreadable_images": unreadable});
                if let Some(scaler) = trainer.loss_scaler() {
                    line["loss_scale"] = scaler.scale.into();
                    line["skipped"] = report.skipped.into();
                }
                writeln!(log, "{line}").map_err(|e| io_error(&log_path, e))?;
            }
            progress.set_message(format!("loss {:.4}, {:.1} samples/s", report.loss, total as f64 / seconds));
            progress.set_position(trainer.step as u64);
            if !leader {
                continue;
            }
            if trainer.step % settings.save_every.max(1) == 0 || trainer.step == settings.max_steps {
                state = Some(save(&trainer, config, settings, out_dir, unreadable)?);
            }
            if let (Some(ae), true) = (autoencoder, settings.preview_every > 0) {
                if trainer.step % settings.preview_every == 0 || trainer.step == settings.max_steps {
                    write_preview(&trainer, ae, settings.seed, out_dir)?;
                }
            }
        }
        Ok(())
    })?;
    progress.finish_and_clear();
    if !leader {
        return Ok(RunOutcome::Follower { step: trainer.step, unreadable_images: unreadable });
    }
    let state = match state {
        Some(state) => state,
        None => read_state(out_dir)?.ok_or_else(|| TrainError::Invalid("no step was taken".into()))?,
    };
    Ok(RunOutcome::Written(Box::new(state)))
}

/// DiT's label dropout for step `step` of a run seeded `seed`: which of the batch's `total` examples train with the
/// null class (each with probability `p`, the reference's `token_drop`). Keyed by (seed, step) and the example's
/// place in the whole batch, so a resumed run and every node of a multi-node run draw the same choices.
pub fn label_dropout(seed: u64, step: usize, total: usize, p: f64) -> Vec<bool> {
    let mut rng = crate::noise::rng(seed ^ DROP, step as u64);
    (0..total).map(|_| rng.random_bool(p.clamp(0.0, 1.0))).collect()
}

/// Samples [`PREVIEW_SAMPLES`] images from the moving average (or the network, without one) with
/// [`PREVIEW_STEPS`] Euler steps from fixed noise, and writes them as `previews/step-<step>.png`, four per row.
fn write_preview<B: Backend>(
    trainer: &Trainer<Autodiff<B>>,
    autoencoder: &AnyAutoencoder<B>,
    seed: u64,
    out_dir: &Path,
) -> Result<(), TrainError> {
    use burn::module::AutodiffModule;
    let current;
    let model = match trainer.ema() {
        Some(ema) => ema,
        None => {
            current = trainer.model().valid();
            &current
        }
    };
    let plan = crate::sample::Plan {
        autoencoder: Some(autoencoder),
        solve: crate::solver::SolveOptions {
            method: crate::solver::Method::Euler,
            grid: crate::solver::Grid::Steps(PREVIEW_STEPS),
            ..Default::default()
        },
        seed: seed ^ PREVIEW,
        // One row of four per class, for as many classes as fit, then cycling.
        classes: Some(crate::sample::ClassChoice::Rows(4)),
        ..crate::sample::Plan::new(model, PREVIEW_SAMPLES)
    };
    let mut grid = crate::sample::pipeline::ImageGrid::default();
    crate::sample::run(&plan, &crate::sample::Conditions::None, &mut [&mut grid], &mut |_| {})
        .map_err(|e| TrainError::Invalid(format!("preview: {e}")))?;
    let dir = out_dir.join("previews");
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    let path = dir.join(format!("step-{:09}.png", trainer.step));
    crate::image::write_rgb(&path, &grid.grid(4)).map_err(|e| io_error(&path, e))
}

/// The hole (1 = generate) of inpainting sample `index`: a mask drawn as LFM's training draws them, or one picked
/// from the mask folder.
fn inpainting_hole(
    settings: &RunSettings,
    files: &TaskFiles,
    size: usize,
    index: usize,
    white_is_hole: bool,
) -> Result<Vec<f32>, TrainError> {
    if files.masks.is_empty() {
        let mut rng = crate::noise::rng(settings.seed ^ MASK, index as u64);
        return Ok(masks::generate(&mut rng, &MaskParams::default(), size, size).hole);
    }
    let pick = crate::noise::uniform_index(settings.seed ^ MASK, index as u64, files.masks.len());
    read_mask(&files.masks[pick], size, white_is_hole).map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Writes a checkpoint: the state files of this step, `model.safetensors` for `lfm sample`, then `state.json`;
/// then removes the previous step's state files.
fn save<B: Backend>(
    trainer: &Trainer<Autodiff<B>>,
    config: &ModelConfig,
    settings: &RunSettings,
    out_dir: &Path,
    unreadable: usize,
) -> Result<State, TrainError> {
    let dir = state_dir(out_dir);
    let previous = read_state(out_dir).ok().flatten();
    let saved = trainer.save_state().map_err(TrainError::Invalid)?;
    let step = trainer.step;
    let (model_file, optimizer_file) = (format!("model-{step:09}.mpk"), format!("optimizer-{step:09}.mpk"));
    write_atomic(&dir.join(&model_file), &saved.model).map_err(|e| io_error(&dir.join(&model_file), e))?;
    write_atomic(&dir.join(&optimizer_file), &saved.optimizer).map_err(|e| io_error(&dir.join(&optimizer_file), e))?;
    let ema_file = match &saved.ema {
        Some(bytes) => {
            let name = format!("ema-{step:09}.mpk");
            write_atomic(&dir.join(&name), bytes).map_err(|e| io_error(&dir.join(&name), e))?;
            Some(name)
        }
        None => None,
    };
    let metadata = std::collections::HashMap::from([
        (CONFIG_METADATA_KEY.to_string(), config.to_json()),
        ("lfm.train.step".to_string(), step.to_string()),
    ]);
    let weights_path = out_dir.join("model.safetensors");
    write_safetensors(&weights_path, &trainer.model().state_dict(), Some(metadata.clone()))
        .map_err(|e| TrainError::Io(e.to_string()))?;
    if let Some(ema) = trainer.ema() {
        write_safetensors(&out_dir.join("ema.safetensors"), &ema.state_dict(), Some(metadata.clone()))
            .map_err(|e| TrainError::Io(e.to_string()))?;
    }
    // Semantic synthesis: the projection of the maps, for `lfm sample --cond-checkpoint` (LFM's cond_stage_model).
    let rescalers = [
        (RESCALER_FILE, trainer.rescaler().map(|r| r.state_dict())),
        (EMA_RESCALER_FILE, trainer.ema_rescaler().map(|r| r.state_dict())),
    ];
    for (name, weights) in rescalers {
        if let Some(weights) = weights {
            let step_only = std::collections::HashMap::from([("lfm.train.step".to_string(), step.to_string())]);
            write_safetensors(&out_dir.join(name), &weights, Some(step_only))
                .map_err(|e| TrainError::Io(e.to_string()))?;
        }
    }
    let state = State {
        step,
        model: config.clone(),
        settings: settings.clone(),
        model_file,
        optimizer_file,
        ema_file,
        unreadable_images: unreadable,
        loss_scaler: saved.loss_scaler.clone(),
    };
    let json = serde_json::to_vec_pretty(&state).expect("state serialises");
    write_atomic(&dir.join("state.json"), &json).map_err(|e| io_error(&dir.join("state.json"), e))?;
    if let Some(old) = previous.filter(|p| p.step != step) {
        let _ = std::fs::remove_file(dir.join(old.model_file));
        let _ = std::fs::remove_file(dir.join(old.optimizer_file));
        if let Some(ema) = old.ema_file {
            let _ = std::fs::remove_file(dir.join(ema));
        }
    }
    Ok(state)
}
