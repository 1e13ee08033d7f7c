//! `lfm eval`: LFM's downstream evaluations (dopri5 at 1e-5 by default, as LFM's test scripts).
//! - `inpaint`: every test image is inpainted under its mask, composited as `fake·mask + gt·(1 − mask)`, written,
//!   and scored against the originals with FID, P-IDS and U-IDS (LFM's `cal_inpainting.py`);
//! - `semantic`: one image per segmentation map, written, and scored with FID against the real images (LFM runs
//!   pytorch-fid's `fid_score.py` on the two folders).
//!
//! LFM scores with StyleGAN2-ADA's TorchScript Inception (`inception-2015-12-05.pt`, on the image at its own
//! size); lfm uses the same 2015 Inception weights through pytorch-fid's network (299² bilinear resize) and
//! pytorch-fid's FID (covariances with N − 1), so its numbers are comparable but not digit-identical.

use std::ffi::OsString;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::ModelSource;
use crate::autoencoder::{Autoencoder, AutoencoderWeights};
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::TensorMap;
use crate::image::read_rgb;
use crate::metrics::features::{image_files, FeatureExtractor};
use crate::metrics::fid::{frechet_distance, Accumulator};
use crate::metrics::inception::FEATURE_DIM;
use crate::models::{weights_and_config, ModelConfig, VelocityModel};
use crate::sample::pipeline::{Features, ImageFiles};
use crate::sample::{Conditions, Plan, Progress, Summary};
use crate::solver::SolveOptions;
use crate::tasks::condition::ConditionBuilder;
use crate::tasks::ids::{inpainting_ids, Ids};

/// Arguments of `lfm eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The task to evaluate.
    #[command(subcommand)]
    pub task: EvalTask,
}

/// The evaluations.
#[derive(Debug, Subcommand)]
pub enum EvalTask {
    /// Inpaint every test image under its mask; report FID, P-IDS and U-IDS against the originals.
    #[command(allow_negative_numbers = true)]
    Inpaint(Box<EvalInpaintArgs>),
    /// Generate one image per segmentation map; report FID against the real images.
    #[command(allow_negative_numbers = true)]
    Semantic(Box<EvalSemanticArgs>),
}

/// Arguments of `lfm eval semantic`.
#[derive(Debug, Args)]
pub struct EvalSemanticArgs {
    /// The semantic-synthesis model (8 input channels for 4-channel latents).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where the architecture comes from.
    #[command(flatten)]
    pub model: ModelSource,
    /// The projection of the maps (`rescaler.safetensors` from `lfm train --task semantic`, or LFM's
    /// `cond_stage_model_<E>.pth`).
    #[arg(long)]
    pub cond_checkpoint: PathBuf,
    /// The segmentation maps (grey PNGs of class indices, e.g. CelebAMask-HQ's validation masks): one sample each,
    /// written under the map's name.
    #[arg(long)]
    pub segmentations: PathBuf,
    /// The real images FID compares with (e.g. CelebAMask-HQ's validation images).
    #[arg(long)]
    pub images: PathBuf,
    /// Use the first N maps.
    #[arg(long, value_parser = super::count)]
    pub max_images: Option<usize>,
    /// Everything else as `lfm eval inpaint`.
    #[command(flatten)]
    pub common: CommonEvalArgs,
}

/// What every evaluation takes besides its inputs.
#[derive(Debug, Args)]
pub struct CommonEvalArgs {
    /// The autoencoder (LFM: sd-vae-ft-mse).
    #[command(flatten)]
    pub decoder: super::AutoencoderSource,
    /// Output folder: the generated images (named as their inputs, .png) and metrics.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite an existing evaluation in --out.
    #[arg(long)]
    pub force: bool,
    /// Images per ODE solve.
    #[arg(long, default_value_t = 8, value_parser = super::count)]
    pub batch_size: usize,
    /// Seed of the noise (image i gets the same noise whatever the batch size).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The ODE solver (LFM: dopri5 at atol = rtol = 1e-5).
    #[command(flatten)]
    pub solve: super::SolverArgs,
    /// The FID Inception network.
    #[command(flatten)]
    pub inception: super::fid::InceptionSource,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `lfm eval inpaint`.
#[derive(Debug, Args)]
pub struct EvalInpaintArgs {
    /// The inpainting model (9 input channels for 4-channel latents).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where the architecture comes from.
    #[command(flatten)]
    pub model: ModelSource,
    /// The ground-truth images (LFM: ./gt_celeb), paired with --masks in sorted file-name order.
    #[arg(long)]
    pub images: PathBuf,
    /// The masks (LFM: masks_val_256_small_eval; black = hole unless --mask-white-is-hole).
    #[arg(long)]
    pub masks: PathBuf,
    /// Masks are white = hole.
    #[arg(long)]
    pub mask_white_is_hole: bool,
    /// Use the first N images and masks (LFM's script scores 2,950).
    #[arg(long, value_parser = super::count)]
    pub max_images: Option<usize>,
    /// Output, solver, Inception.
    #[command(flatten)]
    pub common: CommonEvalArgs,
}

/// What the evaluation measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Report {
    task: &'static str,
    images: usize,
    fid: f64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    ids: Option<Ids>,
    nfe_mean: f64,
    seconds_per_image: f64,
    device: String,
}

/// The inputs of one evaluation.
enum Inputs {
    /// Originals paired with masks.
    Inpaint { pairs: Vec<(PathBuf, PathBuf)>, mask_white_is_hole: bool },
    /// Segmentation maps, the projection's weights, and the real images.
    Semantic { maps: Vec<PathBuf>, rescaler: TensorMap, real: Vec<PathBuf> },
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Self::Inpaint { pairs, .. } => pairs.len(),
            Self::Semantic { maps, .. } => maps.len(),
        }
    }

    /// The names the samples are written under: their inputs' file stems.
    fn names(&self) -> Vec<OsString> {
        let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
        match self {
            Self::Inpaint { pairs, .. } => pairs.iter().map(|(image, _)| stem(image)).collect(),
            Self::Semantic { maps, .. } => maps.iter().map(stem).collect(),
        }
    }
}

struct Job {
    config: ModelConfig,
    weights: TensorMap,
    autoencoder: AutoencoderWeights,
    inputs: Inputs,
    inception: PathBuf,
    args: CommonEvalArgs,
    solve: SolveOptions,
}

/// Inception features of the real images and of the outputs (inpainting: in pair order).
struct Measured {
    real: Vec<f32>,
    fake: Vec<f32>,
    summary: Summary,
}

impl OnBackend for Job {
    type Output = anyhow::Result<Measured>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let args = &self.args;
        let model = VelocityModel::<B>::load(&self.config, &self.weights, &device)?;
        let ae = self.autoencoder.load::<B>(&device)?;
        let extractor = FeatureExtractor::<B>::load(&self.inception, &device)?;
        let (c_in, c_out) = self.config.channels();
        ae.check_fits(c_out).map_err(|e| anyhow::anyhow!(e))?;
        let (task, extra) = match &self.inputs {
            Inputs::Inpaint { .. } => ("an inpainting model", c_out + 1),
            Inputs::Semantic { .. } => ("a semantic-synthesis model", c_out),
        };
        anyhow::ensure!(
            c_in == c_out + extra,
            "the model reads {c_in} channels; {task} reads {} ({c_out} latent + {extra} condition)",
            c_out + extra
        );
        let builder = ConditionBuilder::new(&self.config, Some(&ae), &device);
        let builder = match &self.inputs {
            Inputs::Semantic { rescaler, .. } => {
                builder.with_rescaler(rescaler, ae.factor()).map_err(|e| anyhow::anyhow!("--cond-checkpoint: {e}"))?
            }
            Inputs::Inpaint { .. } => builder,
        };
        let conditions = match &self.inputs {
            Inputs::Inpaint { pairs, mask_white_is_hole } => {
                Conditions::Inpaint { pairs, white_is_hole: *mask_white_is_hole, builder: &builder }
            }
            Inputs::Semantic { maps, .. } => Conditions::Semantic { maps, builder: &builder },
        };
        let n = self.inputs.len();
        let plan = Plan {
            autoencoder: Some(&ae),
            solve: self.solve.clone(),
            batch_size: args.batch_size,
            seed: args.seed,
            classes: None,
            ..Plan::new(&model, n)
        };
        let progress = ProgressBar::new(n as u64);
        progress.set_style(
            ProgressStyle::with_template("evaluating {bar:30} {pos}/{len} images {msg} [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        let mut files = ImageFiles::named(&args.out, self.inputs.names());
        let mut features = Features::new(&extractor);
        let summary =
            crate::sample::run(&plan, &conditions, &mut [&mut files, &mut features], &mut |event| match event {
                Progress::Evaluation { t, nfe } => progress.set_message(format!("t={t:.4} nfe={nfe}")),
                Progress::Batch { done } => progress.set_position(done as u64),
            })?;
        progress.finish_and_clear();
        let (mut real, fake) = (features.originals, features.generated);
        if let Inputs::Semantic { real: files, .. } = &self.inputs {
            for chunk in files.chunks(args.batch_size.max(1)) {
                let images = chunk.iter().map(|p| read_rgb(p)).collect::<Result<Vec<_>, _>>()?;
                real.extend(extractor.features(&images)?);
            }
        }
        Ok(Measured { real, fake, summary })
    }
}

pub(crate) fn run(args: EvalArgs, choice: BackendChoice) -> anyhow::Result<()> {
    match args.task {
        EvalTask::Inpaint(args) => {
            let args = *args;
            let mut images = image_files(&args.images)?;
            let mut masks = image_files(&args.masks)?;
            match args.max_images {
                Some(n) => {
                    anyhow::ensure!(
                        n > 0 && n <= images.len().min(masks.len()),
                        "--max-images {n}: there are {} images and {} masks",
                        images.len(),
                        masks.len()
                    );
                    images.truncate(n);
                    masks.truncate(n);
                }
                None => anyhow::ensure!(
                    images.len() == masks.len(),
                    "{} images but {} masks: they pair in sorted order; pass --max-images N to use the first N of \
                     each",
                    images.len(),
                    masks.len()
                ),
            }
            let inputs = Inputs::Inpaint {
                pairs: images.into_iter().zip(masks).collect(),
                mask_white_is_hole: args.mask_white_is_hole,
            };
            evaluate(&args.checkpoint, &args.model, inputs, args.common, choice)
        }
        EvalTask::Semantic(args) => {
            let args = *args;
            let mut maps = image_files(&args.segmentations)?;
            if let Some(n) = args.max_images {
                anyhow::ensure!(n > 0 && n <= maps.len(), "--max-images {n}: there are {} maps", maps.len());
                maps.truncate(n);
            }
            let real = image_files(&args.images)?;
            let rescaler = crate::checkpoint::read_weights(&args.cond_checkpoint)?.tensors;
            evaluate(&args.checkpoint, &args.model, Inputs::Semantic { maps, rescaler, real }, args.common, choice)
        }
    }
}

fn evaluate(
    checkpoint: &std::path::Path,
    model: &ModelSource,
    inputs: Inputs,
    args: CommonEvalArgs,
    choice: BackendChoice,
) -> anyhow::Result<()> {
    let inception = args.inception.weights()?;
    // Solver flags the solver would ignore are refused before any weights are read.
    let solve = args.solve.options()?;
    let n = inputs.len();
    anyhow::ensure!(n >= 2, "FID needs at least 2 images");
    let metrics_path = args.out.join("metrics.json");
    anyhow::ensure!(
        !metrics_path.exists() || args.force,
        "{} already holds an evaluation; pass --force to overwrite it",
        args.out.display()
    );
    super::create_folder(&args.out)?;
    let (config, weights, source) = weights_and_config(checkpoint, model.choice())?;
    tracing::info!("model: {} ({source})", config.family());
    let autoencoder = args.decoder.read("the evaluation decodes its samples: pass the autoencoder's --weights")?;
    let device = backend::select(choice)?;
    let task = match inputs {
        Inputs::Inpaint { .. } => "inpaint",
        Inputs::Semantic { .. } => "semantic",
    };
    let (json, out) = (args.json, args.out.clone());
    let job = Job { config, weights, autoencoder, inputs, inception, args, solve };
    let measured = backend::dispatch(&device, job)?;
    let stats = |features: &[f32]| -> anyhow::Result<_> {
        let mut acc = Accumulator::new(FEATURE_DIM);
        acc.add(features)?;
        Ok(acc.finish()?)
    };
    let fid = frechet_distance(&stats(&measured.fake)?, &stats(&measured.real)?)?;
    let ids = match task {
        "inpaint" => Some(inpainting_ids(&measured.real, &measured.fake, FEATURE_DIM)?),
        _ => None,
    };
    let report = Report {
        task,
        images: n,
        fid,
        ids,
        nfe_mean: measured.summary.nfe_range().0,
        seconds_per_image: measured.summary.solve_seconds / n as f64,
        device: device.to_string(),
    };
    let text = serde_json::to_string_pretty(&report)?;
    crate::io::write_atomic(&metrics_path, text.as_bytes())?;
    if json {
        println!("{text}");
    } else {
        let ids = ids.map(|i| format!(", P-IDS {:.4}, U-IDS {:.4}", i.p_ids, i.u_ids)).unwrap_or_default();
        println!(
            "{task}: {n} images into {} on {}: FID {fid:.4}{ids} (NFE {:.1} per batch, {:.2} s per image)",
            out.display(),
            report.device,
            report.nfe_mean,
            report.seconds_per_image
        );
    }
    Ok(())
}
