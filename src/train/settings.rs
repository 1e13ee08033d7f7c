//! A run's settings (stored in `state.json`; a resume must use the same) and the one place they are checked
//! against the network, the data and the autoencoder.

use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use super::time_sampling::TimeSampling;
use super::TrainError;
use crate::data::Source;
use crate::models::{ModelConfig, Precision};
use crate::tasks::Task;

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
    /// Write a grid of samples to `previews/` every this many steps (0: never); see [`super::preview::PREVIEW_SAMPLES`].
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
    /// How each example's time on the path is drawn (LFM: uniform).
    #[serde(default)]
    pub time_sampling: TimeSampling,
}

fn one() -> usize {
    1
}

/// The autoencoder of a run, as far as the settings are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoencoderShape {
    /// Latent channels.
    pub latent_channels: usize,
    /// Downsampling factor.
    pub factor: usize,
}

impl RunSettings {
    /// The learning rate of a step: the schedule's for that step and its epoch, times the warm-up ramp.
    pub fn lr_at(&self, step: usize, epoch: usize) -> f64 {
        let ramp = if self.warmup_steps > 0 { ((step + 1) as f64 / self.warmup_steps as f64).min(1.0) } else { 1.0 };
        self.schedule.lr(self.lr, step, epoch) * ramp
    }

    /// Checks, before any work, that these settings, `config`'s network, the data and the autoencoder fit together:
    /// the one place a run's settings are validated (the command line and library callers get the same words).
    pub fn validate(
        &self,
        config: &ModelConfig,
        source: &Source,
        autoencoder: Option<AutoencoderShape>,
    ) -> Result<(), TrainError> {
        let invalid = |why: String| Err(TrainError::Invalid(why));
        config.validate().map_err(TrainError::Invalid)?;
        if source.is_empty() {
            return invalid("the training data is empty".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return invalid(format!("--lr {} must be a finite number > 0", self.lr));
        }
        if let Some(max) = self.max_grad_norm.filter(|m| !(*m > 0.0 && m.is_finite())) {
            return invalid(format!("--max-grad-norm {max} must be a finite number > 0"));
        }
        if let Some(decay) = self.ema_decay.filter(|d| !(0.0..1.0).contains(d)) {
            return invalid(format!("--ema-decay {decay} must be in [0, 1), e.g. 0.9999"));
        }
        if !(1..=self.batch_size).contains(&self.grad_accum) {
            return invalid(format!(
                "--grad-accum {} must be between 1 and --batch-size {}",
                self.grad_accum, self.batch_size
            ));
        }
        if self.data_parallel == 0 || self.grad_accum * self.data_parallel > self.batch_size {
            return invalid(format!(
                "--data-parallel {} × --grad-accum {} micro-batches do not fit a --batch-size of {}: every device \
                 needs at least one example",
                self.data_parallel, self.grad_accum, self.batch_size
            ));
        }
        if self.preview_every > 0 && (self.task != Task::Generate || autoencoder.is_none()) {
            return invalid(
                "--preview-every samples unconditional or class-conditional models and decodes them: it needs --task \
                 generate and the autoencoder (--weights)"
                    .into(),
            );
        }
        let (c_in, c_out) = config.channels();
        let extra = self.task.extra_channels(c_out);
        if c_in != c_out + extra {
            return invalid(format!(
                "--task {} feeds the network {c_out} latent + {extra} condition channels, but the model reads {c_in}: \
                 set its input channels to {}",
                self.task.name(),
                c_out + extra
            ));
        }
        if self.task != Task::Generate && autoencoder.is_none() {
            return invalid(format!(
                "--task {} encodes images every step: it needs --data and the autoencoder",
                self.task.name()
            ));
        }
        let side = config.latent_size();
        match (source, autoencoder) {
            (Source::Latents(store), _) if store.shape()[1..] != [c_out, side, side] => {
                return invalid(format!(
                    "the latents are {:?}; the model trains on [N, {c_out}, {side}, {side}]",
                    store.shape()
                ));
            }
            (Source::Images { .. }, None) => {
                return invalid("image data is encoded every step: it needs the autoencoder".into());
            }
            (Source::Images { size, .. }, Some(ae)) if size / ae.factor != side => {
                let latent = size / ae.factor;
                return invalid(format!(
                    "--image-size {size} gives {latent}×{latent} latents, the model is built for {side}×{side}"
                ));
            }
            _ => {}
        }
        if let Some(ae) = autoencoder.filter(|ae| ae.latent_channels != c_out) {
            return invalid(format!(
                "the autoencoder has {} latent channels but the model produces {c_out}: they do not belong together",
                ae.latent_channels
            ));
        }
        if let (Some(k), Some(labels)) = (config.classes(), source.labels()) {
            if let Some(bad) = labels.iter().find(|&&y| y < 0 || y as usize >= k) {
                return invalid(format!("the data holds label {bad} but the model has {k} classes"));
            }
        }
        Ok(())
    }
}
