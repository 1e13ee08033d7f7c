//! Training a KL autoencoder (`lfm train-autoencoder`): the loss is the reconstruction's mean squared error plus
//! `kl_weight` times the mean KL divergence of the posterior from N(0, I) per latent element; the decoder sees a
//! posterior sample, as in SD's VAE training. What comes out is a diffusers `AutoencoderKL` folder (`config.json` +
//! `diffusion_pytorch_model.safetensors`) that `--autoencoder kl --weights DIR` loads unchanged, with its
//! `scaling_factor` measured on the data (1 / std of the latents, as SD's 0.18215 was) so that LFM's latents have
//! about unit variance.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::lfm_adamw;
use super::state::{io_error, StateFolder};
use super::TrainError;
use crate::autoencoder::{AutoencoderKL, AutoencoderKLConfig};
use crate::checkpoint::{collect_weights, write_safetensors, KeyMap};
use crate::data::loader::EpochOrder;
use crate::data::{load_image, ImageItem};
use crate::io::write_atomic;

/// The weights file of a diffusers folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// Settings of an autoencoder run (stored with its checkpoints; a resume must use the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderRun {
    /// Images per step.
    pub batch_size: usize,
    /// Steps to reach.
    pub max_steps: usize,
    /// Peak learning rate (AdamW, betas 0.9/0.999, no weight decay).
    pub lr: f64,
    /// The rate the per-step cosine decay ends at (equal to `lr`: constant).
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Weight of the mean per-element KL term against the mean squared error.
    pub kl_weight: f64,
    /// Random horizontal flips.
    pub flip: bool,
    /// Seed of every random stream.
    pub seed: u64,
    /// Checkpoint every this many steps (and at the end).
    pub save_every: usize,
    /// Train the decoder (and `post_quant_conv`) only: the encoder and `quant_conv` keep their starting weights,
    /// so the latent space, its `scaling_factor` and any velocity network trained on it stay valid (SD's
    /// `sd-vae-ft-mse` is such a decoder fine-tune). Needs starting weights.
    #[serde(default)]
    pub decoder_only: bool,
}

impl AutoencoderRun {
    /// Warm-up, then a cosine from `lr` to `min_lr` over the remaining steps.
    pub fn lr_at(&self, step: usize) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step.saturating_sub(self.warmup_steps) as f64 / span).min(1.0);
        super::schedule::cosine_between(self.lr, self.min_lr, progress)
    }
}

/// The parts of one batch's loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderLoss {
    /// `mse + kl_weight·kl`.
    pub total: f64,
    /// Mean squared error of the reconstruction (images in [-1, 1]).
    pub mse: f64,
    /// Mean KL divergence per latent element, in nats.
    pub kl: f64,
}

/// The loss of a batch of images in [-1, 1] with standard-normal `eps` (latent-shaped) for the posterior sample:
/// the total as a tensor (for backward), and its parts as tensors.
pub fn autoencoder_loss<B: Backend>(
    ae: &AutoencoderKL<B>,
    images: Tensor<B, 4>,
    eps: Tensor<B, 4>,
    kl_weight: f64,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let posterior = ae.posterior(images.clone());
    let reconstruction = ae.decode_unscaled(posterior.sample_with(eps));
    let mse = (reconstruction - images).powi_scalar(2).mean();
    // KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), averaged over latent elements.
    let logvar = posterior.logvar;
    let kl = (posterior.mean.powi_scalar(2) + logvar.clone().exp() - logvar).sub_scalar(1.0).mean().mul_scalar(0.5);
    (mse.clone() + kl.clone().mul_scalar(kl_weight), mse, kl)
}

/// Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2) for a mean squared error.
pub fn psnr(mse: f64) -> f64 {
    10.0 * (4.0 / mse).log10()
}

/// What a finished (or checkpointed) run records in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoencoderState {
    /// Steps completed.
    pub step: usize,
    /// The architecture (its `scaling_factor` as last measured).
    pub config: AutoencoderKLConfig,
    /// The run.
    pub settings: AutoencoderRun,
    /// File of the model's state (Burn record), relative to `train-state/`.
    pub model_file: String,
    /// File of the optimiser's state.
    pub optimizer_file: String,
    /// Held-out evaluation at this checkpoint, when images were given.
    pub eval: Option<Evaluation>,
}

/// Reconstruction quality on held-out images (posterior means decoded) and the latents' spread.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Images evaluated.
    pub images: usize,
    /// Mean squared error in [-1, 1].
    pub mse: f64,
    /// PSNR in dB (peak-to-peak 2).
    pub psnr: f64,
    /// Standard deviation of the posterior means (unscaled latents).
    pub latent_std: f64,
}

/// Reads `train-state/state.json` of an output folder, if there is one.
pub fn read_autoencoder_state(out: &Path) -> Result<Option<AutoencoderState>, TrainError> {
    StateFolder::of(out).read()
}

const SHUFFLE: u64 = 0x4145_5348;
const FLIP: u64 = 0x4145_464C;
const POSTERIOR: u64 = 0x4145_504F;

/// Images `indices` of `items` as a `[N, 3, size, size]` tensor in [-1, 1] (unreadable ones skipped and counted).
fn load_batch<B: Backend>(
    items: &[ImageItem],
    indices: &[usize],
    size: usize,
    mut flip: impl FnMut() -> bool,
    unreadable: &mut usize,
    device: &B::Device,
) -> Result<Option<Tensor<B, 4>>, TrainError> {
    let mut images = Vec::with_capacity(indices.len());
    for &i in indices {
        match load_image(&items[i], size, flip()) {
            Ok(image) => images.push(image),
            Err(e) => {
                *unreadable += 1;
                tracing::warn!("skipping an unreadable image ({unreadable} so far): {e}");
            }
        }
    }
    if images.is_empty() {
        return Ok(None);
    }
    crate::image::to_tensor::<B>(&images, device).map(Some).map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Reconstruction error and latent spread of `ae` on (at most `limit` of) `items`, in batches of `batch`.
pub fn evaluate<B: Backend>(
    ae: &AutoencoderKL<B>,
    items: &[ImageItem],
    size: usize,
    limit: usize,
    batch: usize,
    device: &B::Device,
) -> Result<Evaluation, TrainError> {
    let n = items.len().min(limit);
    let (mut squared, mut pixels, mut count) = (0.0f64, 0usize, 0usize);
    let (mut sum, mut sum_sq, mut latents) = (0.0f64, 0.0f64, 0usize);
    let mut unreadable = 0;
    for start in (0..n).step_by(batch.max(1)) {
        let indices: Vec<usize> = (start..(start + batch).min(n)).collect();
        let Some(x) = load_batch::<B>(items, &indices, size, || false, &mut unreadable, device)? else { continue };
        let posterior = ae.posterior(x.clone());
        let mean = posterior.mean;
        let recon = ae.decode_unscaled(mean.clone());
        squared += (recon - x.clone()).powi_scalar(2).sum().into_scalar().elem::<f64>();
        pixels += x.shape().num_elements();
        count += x.dims()[0];
        sum += mean.clone().sum().into_scalar().elem::<f64>();
        sum_sq += mean.clone().powi_scalar(2).sum().into_scalar().elem::<f64>();
        latents += mean.shape().num_elements();
    }
    if count == 0 {
        return Err(TrainError::Invalid("no readable evaluation image".into()));
    }
    let mse = squared / pixels as f64;
    let mean = sum / latents as f64;
    let latent_std = (sum_sq / latents as f64 - mean * mean).max(0.0).sqrt();
    Ok(Evaluation { images: count, mse, psnr: psnr(mse), latent_std })
}

/// Where the training images are and how they are cut.
#[derive(Debug, Clone, Copy)]
pub struct AutoencoderData<'a> {
    /// Training images.
    pub train: &'a [ImageItem],
    /// Held-out images for the PSNR and the scale factor (else the first training images).
    pub eval: Option<&'a [ImageItem]>,
    /// Side of the square images.
    pub size: usize,
    /// Images used for evaluation at each checkpoint.
    pub eval_images: usize,
}

/// The encoder half (`encoder`, `quant_conv`) made constant: no gradient reaches it, so the optimiser never moves it.
fn freeze_encoder<B: AutodiffBackend>(mut model: AutoencoderKL<B>) -> AutoencoderKL<B> {
    model.encoder = model.encoder.no_grad();
    model.quant_conv = model.quant_conv.no_grad();
    model
}

/// Trains `config` on `data` with `settings` on backend `B`, writing checkpoints to `out` (resuming from its
/// last one when `resume`), starting from `init` (diffusers-named weights of `config`'s architecture) when given.
/// Returns the final state, whose `config.scaling_factor` is 1 / the latents' std — or, with
/// [`AutoencoderRun::decoder_only`], `config`'s own (the encoder, and so the latent scale, does not change).
pub fn train_autoencoder<B: Backend>(
    config: &AutoencoderKLConfig,
    init: Option<&crate::checkpoint::TensorMap>,
    data: AutoencoderData<'_>,
    settings: &AutoencoderRun,
    out: &Path,
    resume: bool,
    device: &B::Device,
) -> Result<AutoencoderState, TrainError> {
    type A<B> = Autodiff<B>;
    config.validate().map_err(TrainError::Invalid)?;
    if settings.decoder_only && init.is_none() && !resume {
        return Err(TrainError::Invalid(
            "--decoder-only fine-tunes the decoder of a trained autoencoder: give its folder with --init DIR".into(),
        ));
    }
    if data.train.is_empty() {
        return Err(TrainError::Invalid("the training data is empty".into()));
    }
    if !data.size.is_multiple_of(config.factor()) {
        return Err(TrainError::Invalid(format!(
            "--image-size {} is not divisible by the autoencoder's downsampling factor {}",
            data.size,
            config.factor()
        )));
    }
    <A<B> as Backend>::seed(device, settings.seed);
    let folder = StateFolder::of(out);
    let previous: Option<AutoencoderState> = folder.start(out, resume)?;
    // A resumed run's weights come from its checkpoint; `init` only gave the architecture.
    let init = init.filter(|_| previous.is_none());
    let mut model: AutoencoderKL<A<B>> = match init {
        Some(weights) => {
            AutoencoderKL::load(config, weights, device).map_err(|e| TrainError::Invalid(format!("--init: {e}")))?
        }
        None => config.init(device),
    };
    let mut optimizer = lfm_adamw().init::<A<B>, AutoencoderKL<A<B>>>();
    folder.create()?;
    let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
    let mut step = 0;
    if let Some(state) = previous {
        {
            if state.settings.seed != settings.seed
                || state.settings.batch_size != settings.batch_size
                || state.settings.decoder_only != settings.decoder_only
                || (AutoencoderKLConfig { scaling_factor: config.scaling_factor, ..state.config.clone() }) != *config
            {
                return Err(TrainError::Invalid(
                    "--resume: the architecture, seed, batch size or --decoder-only differ from the checkpoint's; \
                     resume with the same ones"
                        .into(),
                ));
            }
            let damaged = |e: burn::record::RecorderError| folder.damaged(e);
            let bytes = folder.read_file(&state.model_file)?;
            model = model.load_record(Recorder::<A<B>>::load(&recorder, bytes, device).map_err(damaged)?);
            let bytes = folder.read_file(&state.optimizer_file)?;
            optimizer = optimizer.load_record(Recorder::<A<B>>::load(&recorder, bytes, device).map_err(damaged)?);
            step = state.step;
            tracing::info!("resumed at step {step}");
        }
    }
    if settings.decoder_only {
        model = freeze_encoder(model);
    }

    let log_path = out.join("metrics.jsonl");
    let mut log = super::metrics_log::open(&log_path, resume.then_some(step)).map_err(|e| io_error(&log_path, e))?;
    let progress = ProgressBar::new(settings.max_steps as u64);
    progress.set_style(
        ProgressStyle::with_template("autoencoder {bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("template"),
    );
    progress.set_position(step as u64);
    let latent_side = data.size / config.factor();
    let per_sample = config.latent_channels * latent_side * latent_side;
    let mut unreadable = 0;
    let mut state = None;
    let mut order = EpochOrder::new(settings.seed ^ SHUFFLE, settings.batch_size, data.train.len());
    while step < settings.max_steps {
        let start = Instant::now();
        let indices = order.indices(step);
        let mut rng = crate::noise::rng(settings.seed ^ FLIP, step as u64);
        let flip = || settings.flip && rng.random_bool(0.5);
        let Some(x) = load_batch::<A<B>>(data.train, &indices, data.size, flip, &mut unreadable, device)? else {
            step += 1;
            continue;
        };
        let n = x.dims()[0];
        let eps = crate::noise::batch(settings.seed ^ POSTERIOR, (step * settings.batch_size) as u64, n, per_sample);
        let eps = Tensor::<A<B>, 1>::from_floats(eps.as_slice(), device).reshape([
            n,
            config.latent_channels,
            latent_side,
            latent_side,
        ]);
        let lr = settings.lr_at(step);
        let (loss, mse, kl) = autoencoder_loss(&model, x, eps, settings.kl_weight);
        let parts = AutoencoderLoss {
            total: loss.clone().into_scalar().elem(),
            mse: mse.into_scalar().elem(),
            kl: kl.into_scalar().elem(),
        };
        if !parts.total.is_finite() {
            return Err(TrainError::NonFinite { step, loss: parts.total });
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(lr, model, grads);
        step += 1;
        let seconds = start.elapsed().as_secs_f64();
        let line = serde_json::json!({"step": step, "loss": parts.total, "mse": parts.mse, "kl": parts.kl,
            "psnr": psnr(parts.mse), "lr": lr, "images_per_s": n as f64 / seconds});
        writeln!(log, "{line}").map_err(|e| io_error(&log_path, e))?;
        progress.set_message(format!("mse {:.5} ({:.1} dB), kl {:.3}", parts.mse, psnr(parts.mse), parts.kl));
        progress.set_position(step as u64);
        if step % settings.save_every.max(1) == 0 || step == settings.max_steps {
            let eval_items = data.eval.unwrap_or(data.train);
            let eval = evaluate(&model.valid(), eval_items, data.size, data.eval_images, settings.batch_size, device)?;
            let line = serde_json::json!({"step": step, "eval_images": eval.images, "eval_mse": eval.mse,
                "eval_psnr": eval.psnr, "latent_std": eval.latent_std});
            writeln!(log, "{line}").map_err(|e| io_error(&log_path, e))?;
            progress.println(format!(
                "step {step}: held-out PSNR {:.2} dB (mse {:.5}) on {} images, latent std {:.4}",
                eval.psnr, eval.mse, eval.images, eval.latent_std
            ));
            let mut config = config.clone();
            if !settings.decoder_only {
                config.scaling_factor = 1.0 / eval.latent_std.max(1e-12);
            }
            let saved = save(&model, &optimizer, &recorder, &config, settings, out, step, eval)?;
            state = Some(saved);
        }
    }
    progress.finish_and_clear();
    match state {
        Some(state) => Ok(state),
        None => read_autoencoder_state(out)?.ok_or_else(|| TrainError::Invalid("no step was taken".into())),
    }
}

/// Writes the diffusers folder (`config.json`, weights), then the resumable state, `state.json` last; removes the
/// previous step's state files.
#[allow(clippy::too_many_arguments)]
fn save<B: AutodiffBackend, O: Optimizer<AutoencoderKL<B>, B>>(
    model: &AutoencoderKL<B>,
    optimizer: &O,
    recorder: &NamedMpkBytesRecorder<FullPrecisionSettings>,
    config: &AutoencoderKLConfig,
    settings: &AutoencoderRun,
    out: &Path,
    step: usize,
    eval: Evaluation,
) -> Result<AutoencoderState, TrainError> {
    let folder = StateFolder::of(out);
    let previous: Option<AutoencoderState> = folder.read().ok().flatten();
    let weights = out.join(WEIGHTS_FILE);
    let metadata = std::collections::HashMap::from([("lfm.train.step".to_string(), step.to_string())]);
    write_safetensors(&weights, &collect_weights(&model.valid(), &KeyMap::default()), Some(metadata))
        .map_err(|e| TrainError::Io(e.to_string()))?;
    let config_path = out.join("config.json");
    write_atomic(&config_path, config.to_diffusers_json().as_bytes()).map_err(|e| io_error(&config_path, e))?;
    let (model_file, optimizer_file) = (format!("model-{step:09}.mpk"), format!("optimizer-{step:09}.mpk"));
    let invalid = |e: burn::record::RecorderError| TrainError::Invalid(e.to_string());
    folder
        .write_file(&model_file, &Recorder::<B>::record(recorder, model.clone().into_record(), ()).map_err(invalid)?)?;
    folder
        .write_file(&optimizer_file, &Recorder::<B>::record(recorder, optimizer.to_record(), ()).map_err(invalid)?)?;
    let state = AutoencoderState {
        step,
        config: config.clone(),
        settings: settings.clone(),
        model_file,
        optimizer_file,
        eval: Some(eval),
    };
    let stale: Vec<String> =
        previous.filter(|p| p.step != step).map(|old| vec![old.model_file, old.optimizer_file]).unwrap_or_default();
    folder.commit(&state, &stale)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::AutoencoderRun;

    /// Warm-up, then the cosine over the steps after it, against values worked by hand.
    #[test]
    fn warm_up_then_cosine_to_the_floor() {
        let run = AutoencoderRun {
            batch_size: 1,
            max_steps: 6,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 2,
            kl_weight: 0.0,
            flip: false,
            seed: 0,
            save_every: 1,
            decoder_only: false,
        };
        // Steps 2..6 span the cosine over 4 steps: (1 + cos(π·k/4)) / 2 = 1, 0.853553…, 0.5, 0.146446… of 9e-4.
        let expected = [
            0.5e-3,
            1e-3,
            1e-3,
            1e-4 + 0.853_553_390_593_273_7 * 9e-4,
            0.55e-3,
            1e-4 + 0.146_446_609_406_726_24 * 9e-4,
            1e-4,
        ];
        for (step, want) in expected.iter().enumerate() {
            let got = run.lr_at(step);
            assert!((got - want).abs() < 1e-15, "step {step}: {got} vs {want}");
        }
        assert!((run.lr_at(50) - 1e-4).abs() < 1e-18, "past the end: the floor");
    }
}
