//! The `lfm` command line: argument structs and calls into the library, no maths.

mod devices;
mod inspect;
mod velocity;

use clap::{Parser, Subcommand};

use crate::backend::BackendChoice;

/// Latent flow matching: sample, train and evaluate LFM models on any GPU or the CPU.
#[derive(Debug, Parser)]
#[command(name = "lfm", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Compute backend: auto (CUDA, else a hardware GPU through wgpu, else the CPU), cpu, wgpu or cuda.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_backend)]
    pub backend: BackendChoice,
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

/// `lfm` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the GPUs and CPU lfm can use, and which one `--backend auto` picks.
    Devices(devices::DevicesArgs),
    /// Show a checkpoint's architecture (given or inferred), parameter count and tensors.
    Inspect(inspect::InspectArgs),
    /// Convert a checkpoint to lfm's format: safetensors with the model config in its metadata.
    Convert(inspect::ConvertArgs),
    /// Evaluate v = model(t, x, y) on tensors from a safetensors file (parity checks against PyTorch).
    Velocity(velocity::VelocityArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Devices(args) => devices::run(args, cli.backend),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Convert(args) => inspect::convert(args),
        Command::Velocity(args) => velocity::run(args, cli.backend),
    }
}
