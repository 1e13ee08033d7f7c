//! `lfm eval`: LFM's downstream evaluations (dopri5 at 1e-5 by default, as LFM's test scripts).
//! - `inpaint`: every test image is inpainted under its mask, composited as `fake·mask + gt·(1 − mask)`, written,
//!   and scored against the originals with FID, P-IDS and U-IDS (LFM's `cal_inpainting.py`);
//! - `semantic`: one image per segmentation map, written, and scored with FID against the real images (LFM runs
//!   pytorch-fid's `fid_score.py` on the two folders).
//!
//! LFM scores with StyleGAN2-ADA's TorchScript Inception (`inception-2015-12-05.pt`, on the image at its own
//! size); lfm uses the same 2015 Inception weights through pytorch-fid's network (299² bilinear resize) and
//! pytorch-fid's FID (covariances with N − 1), so its numbers are comparable but not digit-identical.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::conditioning::{read_inpaint, MASKED_IMAGE_NOISE};
use super::ModelSource;
use crate::autoencoder::{Autoencoder, AutoencoderWeights};
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::TensorMap;
use crate::image::{read_rgb, write_rgb};
use crate::inpaint::{self, composite, hole_tensor, masked_images};
use crate::metrics::features::{image_files, FeatureExtractor};
use crate::metrics::fid::{frechet_distance, Accumulator};
use crate::metrics::ids::{inpainting_ids, Ids};
use crate::metrics::inception::FEATURE_DIM;
use crate::models::conditioning::{class_shares, SpatialRescaler};
use crate::models::{weights_and_config, ModelConfig, VelocityModel};
use crate::sample::{noise, sample_batch, BatchInput, Guidance, Summary};
use crate::solver::SolveOptions;
use crate::train::task::read_segmentation;

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

    /// The file whose name sample `i` is written under.
    fn name_of(&self, i: usize) -> &std::path::Path {
        match self {
            Self::Inpaint { pairs, .. } => &pairs[i].0,
            Self::Semantic { maps, .. } => &maps[i],
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
        let side = self.config.latent_size();
        let (c_in, c_out) = self.config.channels();
        ae.check_fits(c_out).map_err(|e| anyhow::anyhow!(e))?;
        let f = ae.factor();
        let size = side * f;
        let (task, extra) = match &self.inputs {
            Inputs::Inpaint { .. } => ("an inpainting model", c_out + 1),
            Inputs::Semantic { .. } => ("a semantic-synthesis model", c_out),
        };
        anyhow::ensure!(
            c_in == c_out + extra,
            "the model reads {c_in} channels; {task} reads {} ({c_out} latent + {extra} condition)",
            c_out + extra
        );
        let rescaler = match &self.inputs {
            Inputs::Semantic { rescaler, .. } => {
                let r = SpatialRescaler::<B>::load(rescaler, f.trailing_zeros() as usize, &device)?;
                anyhow::ensure!(
                    r.channel_mapper.weight.dims()[0] == c_out,
                    "the projection in --cond-checkpoint makes {} channels; the model takes {c_out}",
                    r.channel_mapper.weight.dims()[0]
                );
                Some(r)
            }
            Inputs::Inpaint { .. } => None,
        };
        let guidance = Guidance { cfg_scale: None, null_label: 0 };
        let n = self.inputs.len();
        let progress = ProgressBar::new(n as u64);
        progress.set_style(
            ProgressStyle::with_template("evaluating {bar:30} {pos}/{len} images {msg} [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        let (mut real, mut fake, mut summary) = (Vec::new(), Vec::new(), Summary::default());
        let batch = args.batch_size.max(1);
        for first in (0..n).step_by(batch) {
            let count = batch.min(n - first);
            // The condition, and (inpainting) the originals with their holes for the composite.
            let (condition, originals) = match &self.inputs {
                Inputs::Inpaint { pairs, mask_white_is_hole } => {
                    let inputs = pairs[first..first + count]
                        .iter()
                        .map(|(image, mask)| {
                            let input = read_inpaint(image, mask, *mask_white_is_hole)?;
                            anyhow::ensure!(
                                (input.image.width, input.image.height) == (size, size),
                                "{} is {}×{}; the model's {side}×{side} latent decodes to {size}×{size}",
                                image.display(),
                                input.image.width,
                                input.image.height
                            );
                            Ok(input)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let images: Vec<_> = inputs.iter().map(|i| i.image.clone()).collect();
                    let holes: Vec<f32> = inputs.iter().flat_map(|i| i.hole.iter().copied()).collect();
                    let hole = hole_tensor::<B>(holes, count, (size, size), &device);
                    let x = crate::image::to_tensor::<B>(&images, &device)?;
                    let eps = noise::<B>(args.seed ^ MASKED_IMAGE_NOISE, first, count, [c_out, side, side], &device);
                    let latent = ae.encode(masked_images(x, hole.clone()), Some(eps));
                    (inpaint::condition(latent, hole, f), Some(inputs))
                }
                Inputs::Semantic { maps, .. } => {
                    let rescaler = rescaler.as_ref().expect("semantic inputs load the projection");
                    let classes = rescaler.classes();
                    let maps = maps[first..first + count]
                        .iter()
                        .map(|map| read_segmentation(map, size, false, classes))
                        .collect::<Result<Vec<_>, _>>()?;
                    let shares = class_shares::<B>(&maps, size, f, classes, &device).map_err(|e| anyhow::anyhow!(e))?;
                    (rescaler.project(shares), None)
                }
            };
            let x1 = noise::<B>(args.seed, first, count, [c_out, side, side], &device);
            let input = BatchInput { noise: x1, labels: None, condition: Some(condition) };
            let mut on_eval = |t: f64, nfe: usize| progress.set_message(format!("t={t:.4} nfe={nfe}"));
            let out = sample_batch(&model, input, &guidance, &self.solve, &mut on_eval)?;
            summary.add(count, &out.stats, out.seconds);
            let mut images = crate::image::from_tensor(ae.decode_sliced(out.latents, 4));
            if let Some(inputs) = &originals {
                for (image, input) in images.iter_mut().zip(inputs) {
                    composite(image, &input.image, &input.hole);
                }
                let originals: Vec<_> = inputs.iter().map(|i| i.image.clone()).collect();
                real.extend(extractor.features(&originals)?);
            }
            for (k, image) in images.iter().enumerate() {
                let name = self.inputs.name_of(first + k).file_stem().map(|s| s.to_os_string()).unwrap_or_default();
                write_rgb(&args.out.join(name).with_extension("png"), image)?;
            }
            fake.extend(extractor.features(&images)?);
            progress.inc(count as u64);
        }
        progress.finish_and_clear();
        if let Inputs::Semantic { real: files, .. } = &self.inputs {
            for chunk in files.chunks(batch) {
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
    let solve = args.solve.options(true)?;
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
