//! `lfm inspect CKPT` and `lfm convert CKPT --out FILE`.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;

use super::ModelSource;
use crate::checkpoint::{parameter_count, write_safetensors, CONFIG_METADATA_KEY};
use crate::models::weights_and_config;

/// Arguments of `lfm inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A checkpoint: LFM's model_<E>.pth, content.pth, or .safetensors.
    pub checkpoint: PathBuf,
    /// Where the architecture comes from.
    #[command(flatten)]
    pub model: ModelSource,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
}

pub(crate) fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let (config, weights, source) = weights_and_config(&args.checkpoint, args.model.choice())?;
    println!("{}", args.checkpoint.display());
    println!("network: {} ({source})", config.family());
    println!("config: {}", serde_json::to_string_pretty(&config)?);
    let side = config.latent_size();
    let (c_in, c_out) = config.channels();
    println!(
        "latent: {c_in}×{side}×{side} in, {c_out} channels out; forward: {:.2} GFLOP per sample",
        config.flops() / 1e9
    );
    println!(
        "parameters: {} ({:.2} M), {} tensors",
        parameter_count(&weights),
        parameter_count(&weights) as f64 / 1e6,
        weights.len()
    );
    if args.tensors {
        for (name, t) in &weights {
            println!("  {name:60} {:?} {}", t.shape, t.stored_dtype);
        }
    }
    Ok(())
}

/// Arguments of `lfm convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A checkpoint: LFM's model_<E>.pth, content.pth, or .safetensors.
    pub checkpoint: PathBuf,
    /// Where to write the safetensors file (weights in PyTorch layout, config in its metadata).
    #[arg(long)]
    pub out: PathBuf,
    /// Where the architecture comes from.
    #[command(flatten)]
    pub model: ModelSource,
    /// Overwrite an existing output file.
    #[arg(long)]
    pub force: bool,
}

pub(crate) fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    super::refuse_existing(&args.out, args.force)?;
    let (config, weights, _) = weights_and_config(&args.checkpoint, args.model.choice())?;
    // Refuse weights that do not fit the config before writing anything.
    crate::models::VelocityModel::<crate::backend::Cpu>::load(&config, &weights, &Default::default())?;
    let metadata = HashMap::from([(CONFIG_METADATA_KEY.to_string(), config.to_json())]);
    write_safetensors(&args.out, &weights, Some(metadata))?;
    println!("wrote {} ({} tensors)", args.out.display(), weights.len());
    Ok(())
}

/// Arguments of `lfm export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Weights to export: a run's `model.safetensors` or `ema.safetensors`, a semantic run's `rescaler.safetensors`
    /// (LFM's `cond_stage_model_<E>.pth`), or any checkpoint lfm reads.
    pub checkpoint: PathBuf,
    /// The `.pth` to write, named as LFM names them (`model_<E>.pth`) for its scripts' `--epoch_id`.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the keys without DDP's `module.` prefix (LFM's test scripts cut 7 characters off every key, so they
    /// need it; a plain `load_state_dict` does not).
    #[arg(long)]
    pub no_module_prefix: bool,
    /// Overwrite an existing output file.
    #[arg(long)]
    pub force: bool,
}

pub(crate) fn export(args: ExportArgs) -> anyhow::Result<()> {
    super::refuse_existing(&args.out, args.force)?;
    let loaded = crate::checkpoint::read_weights(&args.checkpoint)?;
    // lfm's own model files carry their config: refuse weights that do not fit it before writing anything.
    if let Some(json) = &loaded.config_json {
        let config = crate::models::ModelConfig::from_json(json).map_err(|e| anyhow::anyhow!(e))?;
        crate::models::VelocityModel::<crate::backend::Cpu>::load(&config, &loaded.tensors, &Default::default())?;
    }
    let prefix = if args.no_module_prefix { "" } else { "module." };
    crate::checkpoint::write_pth(&args.out, &loaded.tensors, prefix)?;
    println!("wrote {} ({} tensors, keys prefixed {prefix:?})", args.out.display(), loaded.tensors.len());
    Ok(())
}
