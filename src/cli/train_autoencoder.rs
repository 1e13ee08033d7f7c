//! `lfm train-autoencoder`: a KL autoencoder (diffusers `AutoencoderKL` layout) trained on images, written as a
//! diffusers folder that `--autoencoder kl --weights DIR` loads.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Args;

use crate::autoencoder::{AutoencoderKLConfig, AutoencoderKind, AutoencoderWeights};
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::TensorMap;
use crate::data::{open_images, ImageItem, Source};
use crate::train::autoencoder::{train_autoencoder, AutoencoderData, AutoencoderRun, AutoencoderState};

/// Arguments of `lfm train-autoencoder`.
#[derive(Debug, Args)]
pub struct TrainAutoencoderArgs {
    /// Training images: a folder (searched recursively) or an IDX file such as Fashion-MNIST's
    /// `train-images-idx3-ubyte.gz`.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out images for the reconstruction PSNR and the latent scale (same kinds as --data; default: the first
    /// training images).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Images evaluated at each checkpoint.
    #[arg(long, default_value_t = 2000, value_parser = super::count)]
    pub eval_images: usize,
    /// Side of the square images (resize the short side, centre-crop).
    #[arg(long, default_value_t = 256, value_parser = super::count)]
    pub image_size: usize,
    /// The architecture: a diffusers AutoencoderKL config.json (block_out_channels, layers_per_block,
    /// latent_channels, norm_num_groups, …). Not needed with --resume or --init.
    #[arg(long, conflicts_with = "init")]
    pub config: Option<PathBuf>,
    /// Start from a trained autoencoder: a diffusers folder (`config.json` + weights, e.g. an earlier
    /// `lfm train-autoencoder --out`), whose architecture and weights the run takes.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Fine-tune the decoder only (with --init): the encoder and its latent scale stay as they are, so latents
    /// encoded before and velocity networks trained on them stay valid (how SD's sd-vae-ft-mse was made).
    #[arg(long)]
    pub decoder_only: bool,
    /// Output folder: config.json + diffusion_pytorch_model.safetensors (a diffusers folder), metrics.jsonl,
    /// train-state/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out where its last checkpoint left it.
    #[arg(long)]
    pub resume: bool,
    /// Images per step.
    #[arg(long, default_value_t = 64, value_parser = super::count)]
    pub batch_size: usize,
    /// Steps.
    #[arg(long, default_value_t = 5000, value_parser = super::count)]
    pub max_steps: usize,
    /// Peak learning rate (AdamW, no weight decay).
    #[arg(long, default_value_t = 1e-3, value_parser = super::positive)]
    pub lr: f64,
    /// The learning rate a per-step cosine decays to (default: --lr, i.e. constant).
    #[arg(long, value_parser = super::non_negative)]
    pub min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// Weight of the mean KL divergence per latent element against the mean squared error.
    #[arg(long, default_value_t = 1e-4, value_parser = super::non_negative)]
    pub kl_weight: f64,
    /// Checkpoint (and evaluate) every this many steps, and at the end.
    #[arg(long, default_value_t = 500, value_parser = super::count)]
    pub save_every: usize,
    /// Seed of every random choice (data order, flips, posterior samples, initialisation).
    #[arg(long, default_value_t = 1024)]
    pub seed: u64,
    /// No random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
}

fn images(path: &Path, size: usize) -> anyhow::Result<Vec<ImageItem>> {
    let source = open_images(path, size, false, None).map_err(|e| anyhow::anyhow!(e))?;
    match source {
        Source::Images { items, .. } => Ok(items),
        Source::Latents(_) => anyhow::bail!("{}: expected images", path.display()),
    }
}

struct Job {
    config: AutoencoderKLConfig,
    init: Option<TensorMap>,
    train: Vec<ImageItem>,
    eval: Option<Vec<ImageItem>>,
    size: usize,
    eval_images: usize,
    settings: AutoencoderRun,
    out: PathBuf,
    resume: bool,
}

impl OnBackend for Job {
    type Output = anyhow::Result<AutoencoderState>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let data = AutoencoderData {
            train: &self.train,
            eval: self.eval.as_deref(),
            size: self.size,
            eval_images: self.eval_images,
        };
        let init = self.init.as_ref();
        Ok(train_autoencoder::<B>(&self.config, init, data, &self.settings, &self.out, self.resume, &device)?)
    }
}

pub(crate) fn run(args: TrainAutoencoderArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let previous = crate::train::autoencoder::read_autoencoder_state(&args.out)?;
    let init = match &args.init {
        Some(dir) => match AutoencoderWeights::read(AutoencoderKind::Kl, dir, None)? {
            AutoencoderWeights::Kl(config, weights) => Some((config, weights)),
            AutoencoderWeights::Taesd(..) => unreachable!("read as a KL autoencoder"),
        },
        None => None,
    };
    let config = match (&args.config, &init, &previous) {
        (Some(path), _, _) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            AutoencoderKLConfig::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        (None, Some((config, _)), _) => config.clone(),
        (None, None, Some(state)) if args.resume => state.config.clone(),
        _ => anyhow::bail!(
            "give the architecture with --config config.json (a diffusers AutoencoderKL config), or a trained \
             autoencoder to start from with --init DIR"
        ),
    };
    let train = images(&args.data, args.image_size)?;
    let eval = args.eval_data.as_ref().map(|p| images(p, args.image_size)).transpose()?;
    let settings = AutoencoderRun {
        batch_size: args.batch_size,
        max_steps: args.max_steps,
        lr: args.lr,
        min_lr: args.min_lr.unwrap_or(args.lr),
        warmup_steps: args.warmup_steps,
        kl_weight: args.kl_weight,
        flip: !args.no_flip,
        seed: args.seed,
        save_every: args.save_every,
        decoder_only: args.decoder_only,
    };
    super::create_folder(&args.out)?;
    let device = backend::select(choice)?;
    let n = train.len();
    let job = Job {
        config,
        init: init.map(|(_, weights)| weights),
        train,
        eval,
        size: args.image_size,
        eval_images: args.eval_images,
        settings,
        out: args.out.clone(),
        resume: args.resume,
    };
    let state = backend::dispatch(&device, job)?;
    match state.eval {
        Some(eval) => println!(
            "trained {} steps on {n} images on {device}: held-out PSNR {:.2} dB (mse {:.5}, {} images), \
             scaling_factor {:.5}; autoencoder in {} (use --autoencoder kl --weights {})",
            state.step,
            eval.psnr,
            eval.mse,
            eval.images,
            state.config.scaling_factor,
            args.out.display(),
            args.out.display()
        ),
        None => println!("trained {} steps on {n} images on {device}", state.step),
    }
    Ok(())
}
