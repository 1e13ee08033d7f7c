//! `lfm sample`: checkpoint → noise → ODE → latents → images.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::ModelSource;
use crate::autoencoder::AutoencoderWeights;
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::{read_safetensors, write_safetensors, HostTensor, TensorMap};
use crate::data::ImageItem;
use crate::image::write_rgb;
use crate::metrics::features::{FeatureExtractor, FidInput};
use crate::metrics::fid::{frechet_distance, Statistics};
use crate::metrics::inception::FEATURE_DIM;
use crate::metrics::stats_file::read_statistics;
use crate::models::{weights_and_config, ConfigChoice, ModelConfig, Precision, Preset, VelocityModel};
use crate::sample::pipeline::{FidScore, ImageFiles, ImageGrid, Latents};
use crate::sample::{ClassChoice, Conditions, GivenNoise, Guidance, Plan, Progress, Sink, Summary};
use crate::solver::SolveOptions;
use crate::tasks::condition::{read_inpaint, ConditionBuilder, InpaintInput, SegmentationMap};

/// Samples drawn when `-n` is not given (for a checkpoint).
const DEFAULT_SAMPLES: usize = 16;
/// Samples per ODE solve when `--batch-size` is not given (for a checkpoint).
const DEFAULT_BATCH: usize = 8;

/// Arguments of `lfm sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// The velocity network's checkpoint (LFM's model_<E>.pth, content.pth, or lfm's .safetensors). Without it,
    /// the built-in Fashion-MNIST model and its autoencoder (trained by lfm, embedded in the binary).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Where the architecture comes from (a preset also sets LFM's CFG scale).
    #[command(flatten)]
    pub model: ModelSource,
    /// Number of samples [default: 16; the built-in model: one grid row per class].
    #[arg(short = 'n', long, value_parser = super::count)]
    pub num_samples: Option<usize>,
    /// Samples per ODE solve (the adaptive error norm runs over the whole batch, as in LFM) [default: 8; the
    /// built-in model: all samples at once].
    #[arg(long, value_parser = super::count)]
    pub batch_size: Option<usize>,
    /// Seed: sample i gets the same noise and label for a seed, whatever the batch size.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A safetensors file with the initial noise `x1` [N, C, h, w] and optionally labels `y` [N].
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// The ODE solver [default: dopri5; the built-in model: its sampling.json's].
    #[command(flatten)]
    pub solve: super::SolverArgs,
    /// Class-conditional models: a class index, `random` (LFM's choice), `uniform` (i mod classes) or `rows`
    /// (one class per grid row of --nrow samples) [default: random; the built-in model: rows].
    #[arg(long)]
    pub class: Option<ClassChoice>,
    /// Classifier-free guidance scale (DiT, EDM UNet; applied when > 1 as in LFM). Default: the preset's.
    #[arg(long, value_parser = super::non_negative)]
    pub cfg_scale: Option<f64>,
    /// Guide only at times t in [FROM, TO] (1 = noise, 0 = data; e.g. `0,0.7`), where guidance sharpens without
    /// narrowing the samples' variety; elsewhere one unguided evaluation. Default: every time, as LFM (`0,1`); the
    /// built-in model: `0,0.7`.
    #[arg(long, value_name = "FROM,TO", value_parser = super::time_interval)]
    pub cfg_interval: Option<(f64, f64)>,
    /// Inpainting: the image (its size must be 8× the latent's).
    #[arg(long, requires = "mask")]
    pub image: Option<PathBuf>,
    /// Inpainting: the mask as in LFM's evaluation set, black = region to generate, white = kept.
    #[arg(long, requires = "image")]
    pub mask: Option<PathBuf>,
    /// Inpainting: read the mask as white = region to generate.
    #[arg(long)]
    pub mask_white_is_hole: bool,
    /// Semantic synthesis: a segmentation map (PNG whose first channel holds class indices, e.g. CelebAMask-HQ's
    /// 19 classes), the size of the decoded images.
    #[arg(long, requires = "cond_checkpoint", conflicts_with = "image")]
    pub segmentation: Option<PathBuf>,
    /// Semantic synthesis: the SpatialRescaler weights (LFM's `cond_stage_model_<E>.pth`).
    #[arg(long, requires = "segmentation")]
    pub cond_checkpoint: Option<PathBuf>,
    /// The autoencoder that decodes the latents (`--weights` required unless --latents-only).
    #[command(flatten)]
    pub decoder: super::AutoencoderSource,
    /// Images per decoder pass.
    #[arg(long, default_value_t = 4, value_parser = super::count)]
    pub decode_batch: usize,
    /// Do not decode: only write the latents (needs --save-latents).
    #[arg(long)]
    pub latents_only: bool,
    /// Write the final latents `x0` (and labels `y`) with the run's statistics in the metadata.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Write all samples as one PNG grid.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Images per grid row [default: ⌈√n⌉; the built-in model: its samples per class].
    #[arg(long, value_parser = super::count)]
    pub nrow: Option<usize>,
    /// Write one image per sample into this folder (00000.png, …).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Image format of --out-dir.
    #[arg(long, default_value = "png", value_parser = ["png", "jpg"])]
    pub format: String,
    /// Precision of the network's weights and activations: f16 on GPUs with 16-bit floats (wgpu with
    /// shader-f16, CUDA), bf16 on CUDA. The solver's state, the time embedding, norm statistics and attention
    /// sums stay in f32; the autoencoder runs in f32.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub force: bool,
    /// Use the plain Burn expressions instead of lfm's fused GPU kernels (attention, RK step) on wgpu (on CUDA
    /// they only run with LFM_CUDA_KERNELS=1, until verified there).
    #[arg(long)]
    pub no_fused_kernels: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Score the samples with FID against this reference (a statistics file, an image folder or a dataset: IDX
    /// file, LMDB folder), streaming the Inception features of each decoded batch (no image is kept). The 8-bit
    /// images are scored as a PNG would store them (LFM scores JPEGs).
    #[arg(long)]
    pub fid: Option<PathBuf>,
    /// The FID Inception network (with --fid).
    #[command(flatten)]
    pub inception: super::fid::InceptionSource,
}

/// The reference of `--fid`.
enum FidReference {
    /// Precomputed statistics.
    Statistics(Statistics),
    /// Images (a folder or a dataset), scored on the sampling device first.
    Images(Vec<ImageItem>),
}

/// FID scoring of a sampling run.
struct FidJob {
    weights: PathBuf,
    reference: FidReference,
    batch_size: usize,
}

/// What `--image/--mask` or `--segmentation/--cond-checkpoint` condition every sample on, read on the host.
#[derive(Default)]
struct HostCondition {
    inpaint: Option<InpaintInput>,
    /// The map and the projection's weights.
    semantic: Option<(SegmentationMap, TensorMap)>,
}

impl HostCondition {
    fn read(args: &SampleArgs) -> anyhow::Result<Self> {
        let inpaint = match (&args.image, &args.mask) {
            (Some(image), Some(mask)) => Some(read_inpaint(image, mask, args.mask_white_is_hole)?),
            _ => None,
        };
        let semantic = match (&args.segmentation, &args.cond_checkpoint) {
            (Some(map), Some(weights)) => {
                Some((SegmentationMap::read(map)?, crate::checkpoint::read_weights(weights)?.tensors))
            }
            _ => None,
        };
        Ok(Self { inpaint, semantic })
    }

    fn is_none(&self) -> bool {
        self.inpaint.is_none() && self.semantic.is_none()
    }
}

struct Job {
    fid: Option<FidJob>,
    condition: HostCondition,
    config: ModelConfig,
    weights: TensorMap,
    autoencoder: Option<AutoencoderWeights>,
    noise: Option<GivenNoise>,
    args: SampleArgs,
    cfg_scale: Option<f64>,
    solve: SolveOptions,
}

/// What a run produced.
struct Output {
    summary: Summary,
    latents: Latents,
    grid: ImageGrid,
    fid: Option<f64>,
}

fn bar(n: usize) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("sampling {bar:30} {pos}/{len} samples {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar
}

impl OnBackend for Job {
    type Output = anyhow::Result<Output>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let args = &self.args;
        args.precision.check_supported::<B>(&device).map_err(anyhow::Error::msg)?;
        let model = VelocityModel::<B>::load(&self.config, &self.weights, &device)?.with_precision(args.precision);
        let autoencoder = self.autoencoder.as_ref().map(|w| w.load::<B>(&device)).transpose()?;
        let side = self.config.latent_size();
        // The condition every sample shares, built by the one condition builder.
        let builder = ConditionBuilder::new(&self.config, autoencoder.as_ref(), &device);
        let builder = match &self.condition.semantic {
            Some((map, weights)) => builder.with_rescaler(weights, (map.side / side).max(1))?,
            None => builder,
        };
        let conditions = match &self.condition {
            HostCondition { inpaint: Some(input), .. } => Conditions::Shared {
                condition: builder.inpainting(std::slice::from_ref(input), args.seed, 0)?,
                inpainted: Some(input),
            },
            HostCondition { semantic: Some((map, _)), .. } => {
                Conditions::Shared { condition: builder.semantic(std::slice::from_ref(map))?, inpainted: None }
            }
            _ => Conditions::None,
        };
        // FID: the reference statistics first (a folder is scored here), then features of every decoded batch.
        let extractor = self.fid.as_ref().map(|job| FeatureExtractor::<B>::load(&job.weights, &device)).transpose()?;
        let reference = match (&self.fid, &extractor) {
            (Some(job), Some(extractor)) => Some(match &job.reference {
                FidReference::Statistics(s) => s.clone(),
                FidReference::Images(items) => {
                    tracing::info!("FID reference: Inception features of {} images", items.len());
                    extractor.statistics_of_items(items, job.batch_size, |_| {})?
                }
            }),
            _ => None,
        };
        let n = self.noise.as_ref().map_or(args.num_samples.unwrap_or(DEFAULT_SAMPLES), |g| g.x1.shape[0]);
        let plan = Plan {
            autoencoder: autoencoder.as_ref(),
            solve: self.solve.clone(),
            guidance: self.cfg_scale.map(|scale| Guidance { scale, interval: args.cfg_interval }),
            batch_size: args.batch_size.unwrap_or(DEFAULT_BATCH),
            decode_batch: args.decode_batch,
            seed: args.seed,
            classes: Some(args.class.unwrap_or(ClassChoice::Random)),
            noise: self.noise.as_ref(),
            ..Plan::new(&model, n)
        };
        let (mut latents, mut grid) = (Latents::default(), ImageGrid::default());
        let mut files = args.out_dir.as_ref().map(|dir| ImageFiles::numbered(dir, &args.format));
        let mut fid = extractor.as_ref().map(FidScore::new);
        let mut sinks: Vec<&mut dyn Sink<B>> = Vec::new();
        // 50,000 FID samples need not keep their latents nor their images.
        if args.save_latents.is_some() {
            sinks.push(&mut latents);
        }
        if args.grid.is_some() {
            sinks.push(&mut grid);
        }
        if let Some(files) = files.as_mut() {
            sinks.push(files);
        }
        if let Some(fid) = fid.as_mut() {
            sinks.push(fid);
        }
        let progress = bar(n);
        let summary = crate::sample::run(&plan, &conditions, &mut sinks, &mut |event| match event {
            Progress::Evaluation { t, nfe } => progress.set_message(format!("t={t:.4} nfe={nfe}")),
            Progress::Batch { done } => progress.set_position(done as u64),
        })?;
        progress.finish_and_clear();
        let fid = match (fid, reference) {
            (Some(fid), Some(reference)) => Some(frechet_distance(&fid.statistics()?, &reference)?),
            _ => None,
        };
        Ok(Output { fid, summary, latents, grid })
    }
}

/// The built-in model's defaults, filled into what the user left unset: its classes in rows, its CFG scale, and a
/// grid in `samples.png` when no output is named.
fn builtin_defaults(args: &mut SampleArgs) -> anyhow::Result<(ModelConfig, TensorMap, Option<AutoencoderWeights>)> {
    let defaults = crate::builtin::sampling().map_err(|e| anyhow::anyhow!(e))?;
    let (config, weights) = crate::builtin::model().map_err(|e| anyhow::anyhow!(e))?;
    let classes = config.classes().unwrap_or(1);
    args.class.get_or_insert(ClassChoice::Rows(0));
    args.nrow.get_or_insert(defaults.per_class);
    let n = *args.num_samples.get_or_insert(classes * defaults.per_class);
    // The built-in network is small: one solve for everything.
    args.batch_size.get_or_insert(n);
    args.cfg_scale.get_or_insert(defaults.cfg_scale);
    if args.cfg_interval.is_none() {
        args.cfg_interval = defaults.cfg_interval;
    }
    if args.solve.solver.is_none() {
        args.solve.solver = Some(defaults.solver.parse().map_err(|e: crate::solver::SolverError| anyhow::anyhow!(e))?);
        if args.solve.steps.is_none() && args.solve.step_size.is_none() {
            args.solve.steps = defaults.steps;
        }
    }
    if args.grid.is_none() && args.out_dir.is_none() && args.save_latents.is_none() && args.fid.is_none() {
        args.grid = Some(PathBuf::from("samples.png"));
    }
    let autoencoder = match (&args.decoder.weights, args.latents_only) {
        (_, true) => None,
        (Some(_), false) => Some(args.decoder.read("")?),
        (None, false) => Some(crate::builtin::autoencoder().map_err(|e| anyhow::anyhow!(e))?),
    };
    Ok((config, weights, autoencoder))
}

pub(crate) fn run(mut args: SampleArgs, choice: BackendChoice) -> anyhow::Result<()> {
    // Before the built-in model's defaults fill it in.
    let interval_given = args.cfg_interval.is_some();
    let builtin = match &args.checkpoint {
        Some(_) => None,
        None => {
            anyhow::ensure!(
                args.model.config.is_none() && args.model.preset.is_none(),
                "--config/--preset describe a checkpoint: pass it with --checkpoint FILE (without any of them, lfm \
                 samples its built-in Fashion-MNIST model)"
            );
            Some(builtin_defaults(&mut args)?)
        }
    };
    if let Some(ClassChoice::Rows(0)) = args.class {
        let n = args.num_samples.unwrap_or(DEFAULT_SAMPLES);
        args.class = Some(ClassChoice::Rows(args.nrow.unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)));
    }
    // One switch for every kernel of lfm's (attention, the RK arithmetic).
    lfm_kernels::set_kernels_enabled(!args.no_fused_kernels);
    // Solver flags the solver would ignore are refused here, before any weights are read.
    let solve = args.solve.options()?;
    if args.latents_only {
        anyhow::ensure!(args.save_latents.is_some(), "--latents-only writes nothing without --save-latents FILE");
        anyhow::ensure!(
            args.grid.is_none() && args.out_dir.is_none(),
            "--latents-only does not decode: drop --grid/--out-dir or --latents-only"
        );
        anyhow::ensure!(args.image.is_none(), "inpainting composites decoded images: drop --latents-only");
        anyhow::ensure!(args.fid.is_none(), "--fid scores decoded images: drop --latents-only");
    } else {
        anyhow::ensure!(
            args.grid.is_some() || args.out_dir.is_some() || args.save_latents.is_some() || args.fid.is_some(),
            "nothing to do: pass --grid FILE, --out-dir DIR, --save-latents FILE and/or --fid REF"
        );
    }
    // Read the FID reference and find the Inception weights before any sampling.
    let fid = match &args.fid {
        Some(reference) => {
            let weights = args.inception.weights()?;
            let reference = match FidInput::open(reference, None)? {
                FidInput::Images(items) => FidReference::Images(items),
                FidInput::Statistics(path) => FidReference::Statistics(read_statistics(&path)?),
            };
            if let FidReference::Statistics(s) = &reference {
                anyhow::ensure!(
                    s.dim() == FEATURE_DIM,
                    "{}: {}-d statistics; FID Inception features are {FEATURE_DIM}-d",
                    args.fid.as_ref().unwrap().display(),
                    s.dim()
                );
            }
            Some(FidJob { weights, reference, batch_size: args.inception.fid_batch_size })
        }
        None => None,
    };
    for path in [&args.grid, &args.save_latents].into_iter().flatten() {
        super::refuse_existing(path, args.force)?;
    }
    if let Some(dir) = &args.out_dir {
        let first = dir.join(format!("00000.{}", args.format));
        if first.exists() && !args.force {
            anyhow::bail!("{} already holds samples; pass --force to overwrite them", dir.display());
        }
    }

    let (config, weights, builtin_autoencoder) = match builtin {
        Some(parts) => parts,
        None => {
            let Some(checkpoint) = &args.checkpoint else { anyhow::bail!("give the model with --checkpoint FILE") };
            let (config, weights, source) = weights_and_config(checkpoint, args.model.choice())?;
            tracing::info!("model: {} ({source})", config.family());
            (config, weights, None)
        }
    };
    let is_builtin = args.checkpoint.is_none();
    let preset_cfg = match args.model.choice() {
        ConfigChoice::Preset(name) => Preset::find(name).map_err(|e| anyhow::anyhow!(e))?.cfg_scale,
        _ => None,
    };
    let cfg_scale = args.cfg_scale.or(preset_cfg);
    anyhow::ensure!(
        !interval_given || cfg_scale.is_some_and(|s| s > 1.0),
        "--cfg-interval limits classifier-free guidance, which is off here: give --cfg-scale above 1 as well"
    );

    let side = config.latent_size();
    let (c_in, c_out) = config.channels();
    let noise = match &args.noise {
        Some(path) => {
            let (tensors, _) = read_safetensors(path)?;
            let x1 = tensors
                .get("x1")
                .ok_or_else(|| anyhow::anyhow!("{}: no `x1` tensor (the noise at t = 1)", path.display()))?
                .clone();
            anyhow::ensure!(
                x1.shape.len() == 4 && x1.shape[1..] == [c_out, side, side],
                "{}: x1 is {:?}, the model samples [N, {c_out}, {side}, {side}]",
                path.display(),
                x1.shape
            );
            Some(GivenNoise { x1, labels: tensors.get("y").map(|y| y.to_i64()) })
        }
        None => None,
    };
    let autoencoder = if args.latents_only {
        None
    } else if is_builtin {
        builtin_autoencoder
    } else {
        Some(
            args.decoder
                .read("decoding needs --weights PATH of the autoencoder (or --latents-only --save-latents FILE)")?,
        )
    };
    let condition = HostCondition::read(&args)?;
    if c_in > c_out && condition.is_none() {
        anyhow::bail!(
            "the model reads {c_in} channels for {c_out} output channels: it is a conditional model; inpainting models \
             need --image and --mask, semantic ones --segmentation and --cond-checkpoint"
        );
    }
    if let Some(dir) = &args.out_dir {
        super::create_folder(dir)?;
    }

    let device = backend::select(choice)?;
    let job = Job { fid, condition, config, weights, autoencoder, noise, args, cfg_scale, solve };
    // The job owns the arguments; keep what the summary needs.
    let (grid_path, nrow, save_latents, json, out_dir, precision) = (
        job.args.grid.clone(),
        job.args.nrow,
        job.args.save_latents.clone(),
        job.args.json,
        job.args.out_dir.clone(),
        job.args.precision,
    );
    let class_model = cfg_scale.filter(|&s| s > 1.0);
    {
        // Refuse what the network cannot do before any work.
        let probe = &job.config;
        if class_model.is_some() {
            probe.check_guidance().map_err(|e| anyhow::anyhow!("--cfg-scale: {e}"))?;
        }
        if let (Some(ClassChoice::Fixed(c)), Some(k)) = (job.args.class, probe.classes()) {
            anyhow::ensure!(c < k, "--class {c} is out of range: the model has classes 0..{}", k - 1);
        }
    }
    let start = std::time::Instant::now();
    let output = backend::dispatch(&device, job)?;
    let seconds = start.elapsed().as_secs_f64();

    if let Some(path) = &grid_path {
        let cols = nrow.unwrap_or_else(|| (output.grid.images.len() as f64).sqrt().ceil() as usize);
        write_rgb(path, &output.grid.grid(cols))?;
    }
    let summary = &output.summary;
    let (mean, min, max) = summary.nfe_range();
    let report = serde_json::json!({
        "samples": summary.samples,
        "batches": summary.batches,
        "nfe_mean": mean,
        "nfe_min": min,
        "nfe_max": max,
        "nfe_per_batch": summary.nfe,
        "accepted_steps": summary.accepted,
        "rejected_steps": summary.rejected,
        "solve_seconds": summary.solve_seconds,
        "seconds": seconds,
        "seconds_per_sample": seconds / summary.samples as f64,
        "device": device.to_string(),
        "precision": precision.name(),
        "grid": grid_path.as_ref().map(|p| p.display().to_string()),
        "out_dir": out_dir.as_ref().map(|p| p.display().to_string()),
        "latents": save_latents.as_ref().map(|p| p.display().to_string()),
        "fid": output.fid,
    });
    if let Some(path) = &save_latents {
        let (x0, labels) = output.latents.into_host();
        let mut tensors = TensorMap::from([("x0".to_string(), x0)]);
        if let Some(y) = &labels {
            tensors.insert("y".into(), HostTensor::i64(vec![y.len()], y.clone()));
        }
        let metadata = HashMap::from([("lfm.sample".to_string(), report.to_string())]);
        write_safetensors(path, &tensors, Some(metadata))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let written = match (&grid_path, &out_dir) {
            (Some(g), Some(d)) => format!("{} and {}", g.display(), d.display()),
            (Some(g), None) => g.display().to_string(),
            (None, Some(d)) => d.display().to_string(),
            (None, None) => "no images".into(),
        };
        println!(
            "{} samples → {written}{}\nNFE per batch: mean {mean:.1}, min {min}, max {max}; steps: {} accepted, {} rejected\n\
             {:.3} s per sample ({seconds:.1} s in all) on {device}, network in {}",
            summary.samples,
            save_latents.as_ref().map_or(String::new(), |p| format!(", latents in {}", p.display())),
            summary.accepted,
            summary.rejected,
            seconds / summary.samples as f64,
            precision.name(),
        );
        if let Some(fid) = output.fid {
            println!("FID: {fid:.6} ({} samples)", summary.samples);
        }
    }
    Ok(())
}
