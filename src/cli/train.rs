//! `lfm train`: flow-matching training of a velocity network on images or pre-encoded latents.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Args;

use super::ModelSource;
use crate::autoencoder::AutoencoderWeights;
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::TensorMap;
use crate::data::latents::LatentStore;
use crate::data::{open_images, Source};
use crate::models::{read_config, ModelConfig, Precision, Preset};
use crate::tasks::{Task, TaskFiles};
use crate::train::group::{fingerprint, Launch, NodeSpec, ProcessGroup};
use crate::train::run::{train, RunOutcome, TrainRun};
use crate::train::schedule::Schedule;
use crate::train::settings::AutoencoderShape;
use crate::train::state::read_state;
use crate::train::{RunSettings, TimeSampling};

/// The task names of `--task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskKind {
    /// Unconditional or class-conditional generation.
    Generate,
    /// Inpainting (input channels: 2 × latent + 1).
    Inpaint,
    /// Semantic synthesis from segmentation maps (input channels: 2 × latent).
    Semantic,
}

/// The formats of `--allreduce-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SumFormat {
    /// 32-bit floats, as the gradients are.
    F32,
    /// bfloat16 (NCCL only).
    Bf16,
}

/// Arguments of `lfm train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Images encoded every step as LFM does: a folder (searched recursively; PNG, JPEG, WebP), an LMDB dataset
    /// (NVAE's `train.lmdb` of raw RGB as LFM's CelebA-HQ/FFHQ, or LSUN's `bedroom_train_lmdb`; opened read-only,
    /// so nothing may write to it meanwhile), or an IDX file such as Fashion-MNIST's `train-images-idx3-ubyte.gz`
    /// (labelled by the `…labels-idx1…` file beside it).
    #[arg(long, conflicts_with = "latents", required_unless_present = "latents")]
    pub data: Option<PathBuf>,
    /// Train on the first N images of --data only (LFM trains LSUN on its first 120000).
    #[arg(long, requires = "data", value_parser = super::count)]
    pub max_images: Option<usize>,
    /// Pre-encoded latents from `lfm encode`: a `.safetensors` file (loaded into memory) or a sharded cache folder
    /// (read a batch at a time); `mean` + `std` re-sample the posterior every step, as LFM encodes on the fly.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Label images by their top-level sub-folder (ImageNet layout).
    #[arg(long)]
    pub class_folders: bool,
    /// Side of the square training images (resize the short side, centre-crop).
    #[arg(long, default_value_t = 256, value_parser = super::count)]
    pub image_size: usize,
    /// The network: --config FILE or --preset NAME (required unless resuming).
    #[command(flatten)]
    pub model: ModelSource,
    /// Start from these weights (LFM's --model_ckpt).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output folder: model.safetensors, metrics.jsonl, train-state/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out exactly where its last checkpoint left it.
    #[arg(long)]
    pub resume: bool,
    /// The autoencoder that encodes --data.
    #[command(flatten)]
    pub encoder: super::AutoencoderSource,
    /// Samples per step.
    #[arg(long, default_value_t = 32, value_parser = super::count)]
    pub batch_size: usize,
    /// Epochs (LFM trains num_epoch + 1; give the number of epochs you want).
    #[arg(long, default_value_t = 1, value_parser = super::count)]
    pub epochs: usize,
    /// Stop after this many steps instead of --epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4, value_parser = super::positive)]
    pub lr: f64,
    /// LFM's per-epoch cosine decay to --min-lr (default: constant, LFM's --no_lr_decay).
    #[arg(long)]
    pub cosine: bool,
    /// Cosine decay to --min-lr updated at every step over the run's steps (--max-steps, or --epochs' worth), so
    /// that a run of a few epochs anneals to the floor; LFM's --cosine changes the rate only between epochs.
    #[arg(long, conflicts_with = "cosine")]
    pub cosine_per_step: bool,
    /// Floor of the cosine schedule.
    #[arg(long, default_value_t = 1e-5, value_parser = super::non_negative)]
    pub min_lr: f64,
    /// Ramp the learning rate up linearly over this many first steps (0: none, as LFM).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Keep an exponential moving average of the weights with this decay (LFM's `--use_ema`: 0.9999), written
    /// as `ema.safetensors` next to `model.safetensors`. Off by default, as in LFM's scripts.
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Split each step's batch into this many micro-batches (one backward pass each, gradients summed): the same
    /// update as one pass with a fraction of the activation memory.
    #[arg(long, default_value_t = 1, value_parser = super::count)]
    pub grad_accum: usize,
    /// Data parallelism on one node: each step's batch is split over N devices — CUDA devices 0..N-1, or N wgpu
    /// GPUs of one kind — that each run forward and backward on a copy of the network; the gradients are summed on
    /// the first, which takes the optimiser step (the same update as one device, up to summation order). With
    /// --backend cpu, N copies share the CPU (to check a run's result, not for speed). Images are encoded on the
    /// first device: for speed, train from `lfm encode` latents.
    #[arg(long, default_value_t = 1, value_parser = super::count)]
    pub data_parallel: usize,
    /// Mixed precision: forward and backward passes in f16 (with dynamic loss scaling) or bf16, on devices that
    /// support the format (CUDA: both; wgpu: f16 with shader-f16); weights, optimiser and moving average stay f32.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Several processes, one per GPU or node, launched with `torchrun`-style variables (WORLD_SIZE, RANK,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or these flags: the number of processes, each running this same command
    /// on the same data. CUDA only: NCCL sums the gradients. On any backend, launch with MPI instead (`mpirun -np N
    /// lfm train …` or `srun --mpi=pmix …`, lfm built with `--features mpi`): the world size then comes from MPI.
    /// Each process trains on its share of every batch and the gradients are summed every step, so every process
    /// holds the same weights (the updates of one process with --grad-accum N). Rank 0 writes --out; --resume reads
    /// it on every process (a shared file system, or a copy).
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1, value_parser = super::count)]
    pub nodes: usize,
    /// This process's rank among --nodes, from 0.
    #[arg(long, env = "RANK", default_value_t = 0)]
    pub node_rank: usize,
    /// Which of this machine's devices the process uses: the devices from --local-rank × --data-parallel on (one
    /// process per GPU). Default: LOCAL_RANK, or the MPI launcher's local rank (Open MPI's
    /// OMPI_COMM_WORLD_LOCAL_RANK, Hydra's MPI_LOCALRANKID, Slurm's SLURM_LOCALID), else 0.
    #[arg(long)]
    pub local_rank: Option<usize>,
    /// Address of rank 0, which every other process must reach (without MPI).
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port rank 0 listens on for the others to join (without MPI).
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// The format the gradients are summed in across processes: bf16 halves the bytes NCCL moves, rounding each
    /// sum to bf16 (the loss and bookkeeping stay f32). NCCL (cuda) only.
    #[arg(long, value_enum, default_value_t = SumFormat::F32)]
    pub allreduce_dtype: SumFormat,
    /// Seconds to wait for every process to join (without MPI).
    #[arg(long, default_value_t = 600)]
    pub node_timeout: u64,
    /// Clip the global gradient norm (over all parameters, as torch's clip_grad_norm_) to this value.
    #[arg(long, value_parser = super::positive)]
    pub max_grad_norm: Option<f64>,
    /// How each example's time on the path is drawn: `uniform` (LFM) or `logit-normal[:MEAN:STD]` (t = sigmoid(MEAN
    /// + STD·n), n standard normal; default 0 and 1): fewer examples at the ends of the path, more in its middle.
    #[arg(long, default_value = "uniform")]
    pub time_sampling: TimeSampling,
    /// Checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 500, value_parser = super::count)]
    pub save_every: usize,
    /// Write a 4×4 grid of samples to OUT/previews/step-N.png every this many steps and at the end (the moving
    /// average if kept, 20 Euler steps from the same noise every time, one row per class); needs the autoencoder.
    #[arg(long, default_value_t = 0)]
    pub preview_every: usize,
    /// Seed of every random choice (data order, noise, times, flips, label dropout).
    #[arg(long, default_value_t = 1024)]
    pub seed: u64,
    /// No random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
    /// What the network learns: generation, inpainting (LFM's 9-channel layout: latent, masked-image latent,
    /// mask) or semantic synthesis (8 channels: latent, projected segmentation map).
    #[arg(long, value_enum, default_value_t = TaskKind::Generate)]
    pub task: TaskKind,
    /// Inpainting: pick masks from this folder (each the training images' size) instead of drawing LFM's
    /// mixed stroke/box masks on the fly.
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Inpainting: folder masks are white = hole (default black = hole, as LFM's evaluation masks).
    #[arg(long)]
    pub mask_white_is_hole: bool,
    /// Semantic synthesis: the folder of segmentation maps, mirroring --data (CelebAMask-HQ: `mask/{i}.png` for
    /// `CelebA-HQ-img/{i}.jpg`); grey PNGs of class indices.
    #[arg(long)]
    pub segmentations: Option<PathBuf>,
    /// Semantic synthesis: number of segmentation classes (CelebAMask-HQ: 19).
    #[arg(long, default_value_t = 19)]
    pub seg_classes: usize,
    /// Semantic synthesis: keep the 1×1 projection of the maps at its random initialisation, as LFM's code does
    /// (it runs under no_grad); by default it is trained with the network.
    #[arg(long)]
    pub freeze_rescaler: bool,
}

impl TrainArgs {
    /// The task the flags describe.
    fn task(&self) -> anyhow::Result<Task> {
        if self.task != TaskKind::Inpaint {
            anyhow::ensure!(self.masks.is_none(), "--masks is for --task inpaint");
        }
        if self.task != TaskKind::Semantic {
            anyhow::ensure!(self.segmentations.is_none(), "--segmentations is for --task semantic");
        }
        Ok(match self.task {
            TaskKind::Generate => Task::Generate,
            TaskKind::Inpaint => {
                Task::Inpaint { masks: self.masks.clone(), mask_white_is_hole: self.mask_white_is_hole }
            }
            TaskKind::Semantic => {
                let Some(dir) = &self.segmentations else {
                    anyhow::bail!("--task semantic needs --segmentations DIR (the maps, laid out as --data)")
                };
                anyhow::ensure!((1..=256).contains(&self.seg_classes), "--seg-classes must be between 1 and 256");
                Task::Semantic {
                    segmentations: dir.clone(),
                    classes: self.seg_classes,
                    train_rescaler: !self.freeze_rescaler,
                }
            }
        })
    }
}

struct Job {
    config: ModelConfig,
    init: Option<TensorMap>,
    source: Source,
    files: TaskFiles,
    autoencoder: Option<AutoencoderWeights>,
    settings: RunSettings,
    out: PathBuf,
    resume: bool,
    nodes: ProcessGroup,
}

impl OnBackend for Job {
    type Output = anyhow::Result<RunOutcome>;

    fn run<B: Backend>(mut self, device: B::Device) -> Self::Output {
        let autoencoder = self.autoencoder.as_ref().map(|w| w.load::<B>(&device)).transpose()?;
        let run = TrainRun {
            config: &self.config,
            init: self.init.as_ref(),
            source: &self.source,
            files: &self.files,
            autoencoder: autoencoder.as_ref(),
            settings: &self.settings,
            out_dir: &self.out,
            resume: self.resume,
        };
        Ok(train::<B>(&run, &mut self.nodes, &device)?)
    }
}

pub(crate) fn run(args: TrainArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let previous = read_state(&args.out)?;
    let config = match (&args.model.config, &args.model.preset, &previous) {
        (Some(path), _, _) => read_config(path)?,
        (None, Some(name), _) => Preset::find(name).map_err(|e| anyhow::anyhow!(e))?.model(),
        (None, None, Some(state)) if args.resume => state.model.clone(),
        _ => anyhow::bail!("give the network with --config FILE or --preset NAME"),
    };
    let source = match (&args.data, &args.latents) {
        (Some(data), _) => {
            open_images(data, args.image_size, args.class_folders, args.max_images).map_err(|e| anyhow::anyhow!(e))?
        }
        (None, Some(path)) => Source::Latents(LatentStore::open(path).map_err(|e| anyhow::anyhow!(e))?),
        (None, None) => anyhow::bail!("give the training data with --data DIR or --latents FILE"),
    };
    let autoencoder = match &source {
        Source::Images { .. } => {
            Some(args.encoder.read("--data needs the autoencoder's --weights to encode the images")?)
        }
        Source::Latents(_) if args.preview_every > 0 => {
            Some(args.encoder.read("--preview-every decodes its samples: give the autoencoder's --weights")?)
        }
        Source::Latents(_) => None,
    };
    let init = args.init.as_ref().map(|p| crate::checkpoint::read_weights(p).map(|w| w.tensors)).transpose()?;
    let per_epoch = (source.len() / args.batch_size.max(1)).max(1);
    let max_steps = args.max_steps.unwrap_or(per_epoch * args.epochs);
    let settings = RunSettings {
        batch_size: args.batch_size.max(1),
        max_steps,
        lr: args.lr,
        schedule: if args.cosine {
            Schedule::Cosine { min_lr: args.min_lr, epochs: args.epochs }
        } else if args.cosine_per_step {
            Schedule::CosinePerStep { min_lr: args.min_lr, steps: max_steps }
        } else {
            Schedule::Constant
        },
        save_every: args.save_every,
        seed: args.seed,
        flip: !args.no_flip,
        ema_decay: args.ema_decay,
        warmup_steps: args.warmup_steps,
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        task: args.task()?,
        preview_every: args.preview_every,
        data_parallel: args.data_parallel,
        precision: args.precision,
        time_sampling: args.time_sampling,
    };
    // Every check of the settings against the network, the data and the autoencoder, before any folder or device.
    let shape =
        autoencoder.as_ref().map(|w| AutoencoderShape { latent_channels: w.latent_channels(), factor: w.factor() });
    settings.validate(&config, &source, shape)?;
    super::create_folder(&args.out)?;
    let launch = launch(&args)?;
    // What differs between ranks (their devices, their files) can fail on one of them: that ends them all.
    let ended = |error: anyhow::Error| {
        launch.end_after(&error);
        error
    };
    let local_rank = args.local_rank.unwrap_or_else(Launch::local_rank);
    let device = backend::select(choice)
        .and_then(|device| backend::data_parallel_device(device, local_rank, settings.data_parallel))
        .map_err(|e| ended(e.into()))?;
    let n = source.len();
    let files =
        TaskFiles::find(&settings.task, &source, args.data.as_deref()).map_err(|e| ended(anyhow::anyhow!(e)))?;
    let nodes = join(&launch, &args, &config, &settings, n, &device)?;
    let (rank, world) = (nodes.rank(), nodes.world());
    let job =
        Job { config, init, source, files, autoencoder, settings, out: args.out.clone(), resume: args.resume, nodes };
    let state = match backend::dispatch(&device, job)? {
        RunOutcome::Written(state) => state,
        RunOutcome::Follower { step, unreadable_images } => {
            println!(
                "rank {rank} of {world}: trained {step} steps on {device} ({unreadable_images} unreadable images \
                 skipped); rank 0 wrote the weights"
            );
            return Ok(());
        }
    };
    println!(
        "trained {} steps on {n} examples on {device}; weights in {} ({} unreadable images skipped)",
        state.step,
        args.out.join("model.safetensors").display(),
        state.unreadable_images
    );
    Ok(())
}

/// How this process was launched: by MPI, with `torchrun`-style variables or flags, or alone.
fn launch(args: &TrainArgs) -> anyhow::Result<Launch> {
    let spec = NodeSpec {
        rank: args.node_rank,
        world: args.nodes,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
        timeout: std::time::Duration::from_secs(args.node_timeout),
    };
    Ok(Launch::detect(spec)?)
}

/// The processes of the run, joined once every one is up (one process alone joins at once). Every process must
/// describe the same run: the model, the settings and the number of examples.
fn join(
    launch: &Launch,
    args: &TrainArgs,
    config: &ModelConfig,
    settings: &RunSettings,
    examples: usize,
    device: &backend::Device,
) -> anyhow::Result<ProcessGroup> {
    let bf16 = args.allreduce_dtype == SumFormat::Bf16;
    let run = serde_json::json!({ "model": config.to_json(), "settings": settings, "examples": examples,
        "bf16_sums": bf16 });
    let group = ProcessGroup::join(launch, fingerprint(run.to_string().as_bytes()), device)?;
    let group = match group.with_bf16_sums(bf16) {
        Ok(group) => group,
        Err((group, error)) => {
            let error = anyhow::Error::from(error);
            group.end_after(&error);
            return Err(error);
        }
    };
    if args.nodes > 1 && args.nodes != group.world() {
        let error = anyhow::anyhow!(
            "--nodes (or WORLD_SIZE) says {} processes but MPI launched {}: drop --nodes under mpirun",
            args.nodes,
            group.world()
        );
        group.end_after(&error);
        return Err(error);
    }
    Ok(group)
}
