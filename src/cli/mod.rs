//! The `lfm` command line: argument structs and calls into the library, no maths.

mod autoencode;
mod bench;
mod devices;
mod eval;
mod fid;
mod inspect;
mod latent_cache;
mod sample;
mod train;
mod train_autoencoder;
mod velocity;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::autoencoder::{AutoencoderKind, AutoencoderWeights};
use crate::backend::BackendChoice;
use crate::models::ConfigChoice;
use crate::solver::{Grid, Method, SolveOptions};

/// The ODE solver of a sampling command.
#[derive(Debug, Args)]
pub struct SolverArgs {
    /// ODE solver: dopri5, euler, midpoint, heun or rk4 [default: dopri5].
    #[arg(long, value_parser = parse_method)]
    pub solver: Option<Method>,
    /// Relative tolerance of dopri5 [default: 1e-5].
    #[arg(long)]
    pub rtol: Option<f64>,
    /// Absolute tolerance of dopri5 [default: 1e-5].
    #[arg(long)]
    pub atol: Option<f64>,
    /// Fixed-step solvers: number of steps.
    #[arg(long, conflicts_with = "step_size", value_parser = count)]
    pub steps: Option<usize>,
    /// Fixed-step solvers: step size on torchdiffeq's grid (LFM's --step_size, default 0.01).
    #[arg(long)]
    pub step_size: Option<f64>,
    /// Give up after this many velocity evaluations per batch.
    #[arg(long, default_value_t = 100_000, value_parser = count)]
    pub max_nfe: usize,
}

impl SolverArgs {
    /// The solver's options (dopri5 unless --solver says otherwise). Refuses flags the chosen solver would ignore:
    /// a grid for the adaptive solver, tolerances for a fixed-step one.
    pub fn options(&self) -> anyhow::Result<SolveOptions> {
        let method = self.solver.unwrap_or(Method::Dopri5);
        let grid_flag = if self.steps.is_some() { Some("--steps") } else { self.step_size.map(|_| "--step-size") };
        let tolerance_flag = if self.rtol.is_some() { Some("--rtol") } else { self.atol.map(|_| "--atol") };
        if method == Method::Dopri5 {
            if let Some(flag) = grid_flag {
                anyhow::bail!(
                    "{flag} sets the grid of the fixed-step solvers (euler, midpoint, heun, rk4), but the solver is \
                     dopri5, which picks its own steps from --rtol/--atol: pass --solver euler (or another) to use it"
                );
            }
        } else if let Some(flag) = tolerance_flag {
            anyhow::bail!(
                "{flag} is a tolerance of the adaptive solver, but the solver is {method}, which takes --steps or \
                 --step-size: pass --solver dopri5 to use it"
            );
        }
        // LFM's tolerances (1e-5) unless given.
        let defaults = SolveOptions::default();
        Ok(SolveOptions {
            method,
            rtol: self.rtol.unwrap_or(defaults.rtol),
            atol: self.atol.unwrap_or(defaults.atol),
            grid: match (self.steps, self.step_size) {
                (Some(steps), _) => Grid::Steps(steps),
                (None, Some(h)) => Grid::StepSize(h),
                (None, None) => Grid::StepSize(0.01),
            },
            max_nfe: Some(self.max_nfe),
            ..defaults
        })
    }
}

/// Creates an output folder (and its parents), naming it in the error.
pub(crate) fn create_folder(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the output folder {}: {e}", dir.display()))
}

/// Refuses to overwrite an existing output unless `--force` was passed.
pub(crate) fn refuse_existing(path: &std::path::Path, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        anyhow::bail!("{} exists; pass --force to overwrite it", path.display());
    }
    Ok(())
}

fn parse_method(s: &str) -> Result<Method, String> {
    s.parse().map_err(|e: crate::solver::SolverError| e.to_string())
}

/// Parses a count that must be at least 1 (samples, batch sizes, steps, images, repetitions): clap names the flag
/// in the error, so a zero never reaches a loop that would quietly treat it as one or do nothing.
pub(crate) fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|e| format!("{e} (expected a whole number ≥ 1)"))? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// Parses a finite number ≥ 0 (guidance scales, learning-rate floors, loss weights): NaN would pass every later
/// comparison and silently switch a feature off.
pub(crate) fn non_negative(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e} (expected a number)"))?;
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err("must be a finite number ≥ 0".into())
    }
}

/// Parses a finite number > 0 (learning rates, clipping norms).
pub(crate) fn positive(s: &str) -> Result<f64, String> {
    let x = non_negative(s).map_err(|_| "must be a finite number > 0".to_string())?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err("must be a finite number > 0".into())
    }
}

/// Parses a time interval `FROM,TO` within [0, 1] with FROM ≤ TO (`--cfg-interval`).
pub(crate) fn time_interval(s: &str) -> Result<(f64, f64), String> {
    let usage = "expected FROM,TO: two times in [0, 1] (1 = noise, 0 = data), FROM ≤ TO, e.g. 0,0.7";
    let (from, to) = s.split_once(',').ok_or(usage)?;
    let time = |x: &str| x.trim().parse::<f64>().ok().filter(|t| (0.0..=1.0).contains(t));
    match (time(from), time(to)) {
        (Some(from), Some(to)) if from <= to => Ok((from, to)),
        _ => Err(usage.into()),
    }
}

/// How a command learns a checkpoint's architecture.
#[derive(Debug, Args)]
pub struct ModelSource {
    /// The model configuration: our JSON, LFM's flags as JSON/TOML (keys = LFM flag names), or the config.yaml LFM
    /// saves. Default: the checkpoint's own, else inferred from its tensors.
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// One of LFM's released experiments: celeb256_dit, ffhq_dit, bed_dit, church_dit, imnet_dit, celeb256_adm,
    /// celeb512_adm, ffhq_adm, bed_adm, church_adm, imnet_adm.
    #[arg(long)]
    pub preset: Option<String>,
}

impl ModelSource {
    /// The library's view of the choice.
    pub fn choice(&self) -> ConfigChoice<'_> {
        match (&self.config, &self.preset) {
            (Some(path), _) => ConfigChoice::File(path),
            (None, Some(name)) => ConfigChoice::Preset(name),
            (None, None) => ConfigChoice::Detect,
        }
    }
}

/// Latent flow matching: sample, train and evaluate LFM models on any GPU or the CPU.
#[derive(Debug, Parser)]
#[command(name = "lfm", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Compute backend: auto (CUDA, else a hardware GPU through wgpu, else the CPU), cpu, wgpu or cuda.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_backend)]
    pub backend: BackendChoice,
    /// On CUDA, let f32 matrix products and convolutions use TF32 tensor cores: faster, about 1e-3 relative error
    /// (enough to change dopri5's steps). Default: full f32, as on the CPU and wgpu. `LFM_TF32=1` does the same.
    #[arg(long, global = true)]
    pub tf32: bool,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse().map_err(|e: crate::backend::BackendError| e.to_string())
}

/// The autoencoder of a command whose `--config` names the velocity network (`sample`, `train`).
#[derive(Debug, Args)]
pub struct AutoencoderSource {
    /// The autoencoder.
    #[arg(long, value_enum, default_value = "kl")]
    pub autoencoder: AutoencoderKind,
    /// Its weights: kl: a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or a weights file;
    /// taesd: the folder with taesd_encoder.* and taesd_decoder.* (see `lfm decode --help`).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// KL only: the autoencoder's diffusers config.json.
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
}

impl AutoencoderSource {
    /// Reads the weights; without `--weights`, fails with `missing`.
    pub fn read(&self, missing: &str) -> anyhow::Result<AutoencoderWeights> {
        let weights = self.weights.as_ref().ok_or_else(|| anyhow::anyhow!("{missing}"))?;
        Ok(AutoencoderWeights::read(self.autoencoder, weights, self.vae_config.as_deref())?)
    }
}

/// `lfm` subcommands. Those taking numbers accept a negative one as a value (`--cfg-scale -1`), so that its range
/// check, not "unexpected argument", names the problem.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the GPUs and CPU lfm can use, and which one `--backend auto` picks.
    Devices(devices::DevicesArgs),
    /// Show a checkpoint's architecture (given or inferred), parameter count and tensors.
    Inspect(inspect::InspectArgs),
    /// Convert a checkpoint to lfm's format: safetensors with the model config in its metadata.
    Convert(inspect::ConvertArgs),
    /// Write weights in LFM's layout (a `torch.save`d state_dict with DDP's `module.` prefix) for LFM's scripts.
    Export(inspect::ExportArgs),
    /// Evaluate v = model(t, x, y) on tensors from a safetensors file (parity checks against PyTorch).
    #[command(allow_negative_numbers = true)]
    Velocity(velocity::VelocityArgs),
    /// Sample images (or latents) from a checkpoint: noise → ODE (dopri5/euler/midpoint/heun/rk4) → autoencoder.
    #[command(allow_negative_numbers = true)]
    Sample(Box<sample::SampleArgs>),
    /// Train a velocity network with LFM's flow-matching loss (resumable).
    #[command(allow_negative_numbers = true)]
    Train(Box<train::TrainArgs>),
    /// Train a KL autoencoder (reconstruction + KL) and write it as a diffusers folder (resumable).
    #[command(allow_negative_numbers = true)]
    TrainAutoencoder(Box<train_autoencoder::TrainAutoencoderArgs>),
    /// Encode images into LFM latents (scaled) with the KL VAE or TAESD.
    Encode(autoencode::EncodeArgs),
    /// Decode LFM latents into images with the KL VAE or TAESD.
    Decode(autoencode::DecodeArgs),
    /// FID between two image folders or statistics files, as pytorch-fid computes it.
    Fid(fid::FidArgs),
    /// Write the FID statistics (mu, sigma) of an image folder as pytorch-fid's .npz.
    FidStats(fid::FidStatsArgs),
    /// Evaluate a downstream model: `lfm eval inpaint` inpaints a test set and reports FID, P-IDS and U-IDS.
    #[command(allow_negative_numbers = true)]
    Eval(eval::EvalArgs),
    /// Benchmarks: `lfm bench kernels` times lfm's fused GPU kernels against the unfused expressions.
    Bench(bench::BenchArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.tf32 {
        lfm_kernels::matmul::set_tf32(true);
    }
    match cli.command {
        Command::Devices(args) => devices::run(args, cli.backend),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Convert(args) => inspect::convert(args),
        Command::Export(args) => inspect::export(args),
        Command::Velocity(args) => velocity::run(args, cli.backend),
        Command::Sample(args) => sample::run(*args, cli.backend),
        Command::Train(args) => train::run(*args, cli.backend),
        Command::TrainAutoencoder(args) => train_autoencoder::run(*args, cli.backend),
        Command::Encode(args) => autoencode::encode(args, cli.backend),
        Command::Decode(args) => autoencode::decode(args, cli.backend),
        Command::Fid(args) => fid::fid(args, cli.backend),
        Command::FidStats(args) => fid::fid_stats(args, cli.backend),
        Command::Eval(args) => eval::run(args, cli.backend),
        Command::Bench(args) => bench::run(args, cli.backend),
    }
    .map_err(with_flag_hints)
}

/// The library's errors name its options; at the command line, also name the flags that set them.
fn with_flag_hints(error: anyhow::Error) -> anyhow::Error {
    let budget = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<crate::solver::SolverError>(),
            Some(crate::solver::SolverError::MaxNfeExceeded { .. })
        ) || matches!(
            cause.downcast_ref::<crate::sample::SampleError>(),
            Some(crate::sample::SampleError::Solver(crate::solver::SolverError::MaxNfeExceeded { .. }))
        )
    });
    match budget {
        true => error.context(
            "the sampling budget ran out: raise --max-nfe, loosen --rtol/--atol, or use a fixed-step --solver",
        ),
        false => error,
    }
}
