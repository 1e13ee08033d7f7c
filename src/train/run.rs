//! The training loop of `lfm train`: deterministic batches, checkpoints written atomically, exact resume.
//!
//! Every random choice of step `s` (the epoch's shuffle, flips, noise, times, posterior samples, label dropout) is
//! drawn from streams keyed by the seed and `s`, so a run resumed from a checkpoint takes exactly the steps an
//! uninterrupted run takes. A checkpoint is the model's and the optimiser's state at a step boundary plus
//! `state.json`, written last (temp file + rename): a crash at any point leaves the previous checkpoint intact.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use super::batches::BatchMaker;
use super::group::ProcessGroup;
use super::settings::{AutoencoderShape, RunSettings};
use super::state::{io_error, State, StateFolder};
use super::{lfm_adamw, Step, TrainError, Trainer};
use crate::autoencoder::{AnyAutoencoder, Autoencoder};
use crate::data::loader::{epoch_of, prefetch, HostContent};
use crate::data::Source;
use crate::models::{ModelConfig, VelocityModel};
use crate::tasks::semantic::SpatialRescaler;
use crate::tasks::{Task, TaskFiles};

/// How a run ended in this process.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// This process (the leader, rank 0) wrote the final checkpoint, described by its state.
    Written(Box<State>),
    /// Another process of a run on several: it trained every step but wrote nothing (the leader wrote the weights).
    Follower {
        /// Steps taken (the run's total).
        step: usize,
        /// Images of this process's shards that could not be read.
        unreadable_images: usize,
    },
}

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

/// What one run trains, on what, and where it writes: the inputs of [`train`].
pub struct TrainRun<'a, B: Backend> {
    /// The network's architecture.
    pub config: &'a ModelConfig,
    /// Weights to start from (`--init`); `None` initialises the network from the seed.
    pub init: Option<&'a crate::checkpoint::TensorMap>,
    /// The training data (images or pre-encoded latents).
    pub source: &'a Source,
    /// The task's files beside the data (masks, segmentation maps).
    pub files: &'a TaskFiles,
    /// The autoencoder that encodes images (and decodes previews); `None` for a latent store without previews.
    pub autoencoder: Option<&'a AnyAutoencoder<B>>,
    /// Optimiser, schedule, batch, precision and checkpoint settings.
    pub settings: &'a RunSettings,
    /// The run's folder: checkpoints, `metrics.jsonl`, previews.
    pub out_dir: &'a Path,
    /// Continue from `out_dir`'s checkpoint instead of starting afresh.
    pub resume: bool,
}

/// Trains `run.config` (from `run.init` weights if given, else freshly initialised) on backend `B`, resuming from
/// `run.out_dir`'s checkpoint when `run.resume` is set. Returns the final checkpoint's state (on the process that
/// writes it).
///
/// On several processes (`nodes`), each trains on its share of every batch and the gradients are summed over them;
/// only the leader (rank 0) writes `out_dir` (a resumed run reads it on every process: a shared file system, or a
/// copy). An error on one process of several ends them all ([`ProcessGroup::end_after`]).
pub fn train<B: Backend>(
    run: &TrainRun<'_, B>,
    nodes: &mut ProcessGroup,
    device: &B::Device,
) -> Result<RunOutcome, TrainError> {
    let outcome = train_steps(run, nodes, device);
    match &outcome {
        Ok(_) => nodes.finish(),
        Err(e) => nodes.end_after(e),
    }
    outcome
}

fn train_steps<B: Backend>(
    run: &TrainRun<'_, B>,
    nodes: &mut ProcessGroup,
    device: &B::Device,
) -> Result<RunOutcome, TrainError> {
    let &TrainRun { config, init, source, files, autoencoder, settings, out_dir, resume } = run;
    let leader = nodes.is_leader();
    let shape = autoencoder.map(|ae| AutoencoderShape { latent_channels: ae.latent_channels(), factor: ae.factor() });
    settings.validate(config, source, shape)?;
    settings.precision.check_supported::<B>(device).map_err(TrainError::Invalid)?;
    let mut trainer = new_trainer(config, init, autoencoder, settings, device)?;
    let folder = StateFolder::of(out_dir);
    if leader {
        folder.create()?;
    }
    let mut unreadable = 0;
    if resume {
        let state: State = folder.start(out_dir, true)?.expect("start returns the state to resume");
        super::state::resume(&mut trainer, &state, config, settings, out_dir, device)?;
        unreadable = state.unreadable_images;
        tracing::info!("resumed at step {}", state.step);
    } else if leader {
        folder.start::<State>(out_dir, false)?;
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
    let per_sample = config.channels().1 * config.latent_size() * config.latent_size();
    let devices = replica_devices::<B>(device, settings.data_parallel);
    if devices.len() > 1 {
        tracing::info!("data parallel: each step's batch split over {devices:?}");
    }
    if nodes.world() > 1 {
        tracing::info!(
            "rank {} of {}: training on its share of every batch, gradients summed by {}",
            nodes.rank(),
            nodes.world(),
            nodes.transport_name()
        );
    }
    let maker = BatchMaker::new(config, settings, files, autoencoder, devices);
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
            // This process's rows of the step's batch (all of it in a single process); a process may have no rows of a
            // batch smaller than the number of processes, and still takes part in the sum.
            let total = prepared.content.len();
            let rows = nodes.rows(total);
            let content = if rows.is_empty() { HostContent::Nothing } else { prepared.content.rows(rows.clone()) };
            let shards = maker.shards(step, content, total, rows)?;
            let epoch = epoch_of(step, source.len(), settings.batch_size);
            let lr = settings.lr_at(step, epoch);
            let work = Step::spread(shards, lr).clipped(settings.max_grad_norm);
            let work = if nodes.world() > 1 { work.across(nodes, total) } else { work };
            let report = trainer.step(work)?;
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
                if let (Some(reduced), true) = (nodes.last_reduce(), nodes.world() > 1) {
                    line["allreduce_s"] = reduced.seconds.into();
                    line["allreduce_wait_s"] = reduced.waited.into();
                    line["allreduce_bytes"] = reduced.bytes.into();
                }
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
                state = Some(super::state::save(&trainer, config, settings, out_dir, unreadable)?);
            }
            if let (Some(ae), true) = (autoencoder, settings.preview_every > 0) {
                if trainer.step % settings.preview_every == 0 || trainer.step == settings.max_steps {
                    super::preview::write_preview(&trainer, ae, settings.seed, out_dir)?;
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
        None => folder.read()?.ok_or_else(|| TrainError::Invalid("no step was taken".into()))?,
    };
    Ok(RunOutcome::Written(Box::new(state)))
}

/// The trainer of a run: the network (from `init`'s weights or freshly initialised from the seed), AdamW, the
/// precision, a semantic run's projection and the moving average.
fn new_trainer<B: Backend>(
    config: &ModelConfig,
    init: Option<&crate::checkpoint::TensorMap>,
    autoencoder: Option<&AnyAutoencoder<B>>,
    settings: &RunSettings,
    device: &B::Device,
) -> Result<Trainer<Autodiff<B>>, TrainError> {
    // A fresh network's initialisation is drawn from the backend's generator: seed it so that runs repeat.
    <Autodiff<B> as Backend>::seed(device, settings.seed);
    let model = match init {
        Some(weights) => VelocityModel::<Autodiff<B>>::load(config, weights, device)
            .map_err(|e| TrainError::Invalid(e.to_string()))?,
        None => VelocityModel::<Autodiff<B>>::init(config, device),
    };
    let mut trainer = Trainer::new(model, lfm_adamw()).with_precision(settings.precision);
    if let (Task::Semantic { classes, train_rescaler, .. }, Some(ae)) = (&settings.task, autoencoder) {
        let stages = ae.factor().trailing_zeros() as usize;
        let rescaler = SpatialRescaler::new(*classes, config.channels().1, stages, device);
        trainer = trainer.with_rescaler(rescaler, *train_rescaler);
    }
    if let Some(decay) = settings.ema_decay {
        trainer = trainer.with_ema(decay);
    }
    Ok(trainer)
}
