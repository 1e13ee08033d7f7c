//! `lfm velocity`: evaluate v = model(t, x, y) on tensors from a file, for parity checks against PyTorch.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{backend::Backend, Tensor};
use clap::Args;

use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::{read_safetensors, write_safetensors, HostTensor, TensorMap};
use crate::models::{weights_and_config, ModelConfig, VelocityModel};

/// Arguments of `lfm velocity`.
#[derive(Debug, Args)]
pub struct VelocityArgs {
    /// The model checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where the architecture comes from.
    #[command(flatten)]
    pub model: super::ModelSource,
    /// A safetensors file with `x` [N, C, H, W], `t` ([N] or [1]) and optionally integer labels `y` [N].
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `v`.
    #[arg(long)]
    pub output: PathBuf,
    /// Classifier-free guidance: the input is LFM's doubled batch `[x; x]` with `[y; y_null]`.
    #[arg(long, value_parser = super::non_negative)]
    pub cfg_scale: Option<f64>,
    /// Overwrite an existing output file.
    #[arg(long)]
    pub force: bool,
}

struct Evaluate {
    config: ModelConfig,
    weights: TensorMap,
    inputs: TensorMap,
    cfg_scale: Option<f64>,
}

impl OnBackend for Evaluate {
    type Output = anyhow::Result<HostTensor>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = VelocityModel::<B>::load(&self.config, &self.weights, &device)?;
        let get =
            |name: &str| self.inputs.get(name).ok_or_else(|| anyhow::anyhow!("the input file has no tensor `{name}`"));
        let x = get("x")?;
        let t = get("t")?;
        anyhow::ensure!(x.shape.len() == 4, "`x` must be [N, C, H, W], got {:?}", x.shape);
        let n = x.shape[0];
        anyhow::ensure!(t.numel() == 1 || t.numel() == n, "`t` must hold 1 or {n} values, got {:?}", t.shape);
        // `t` and `y` may be stored as [N], [N, 1] or a scalar: read them flat.
        let flat = |h: &HostTensor| HostTensor { shape: vec![h.numel()], ..h.clone() };
        let xt: Tensor<B, 4> = x.to_tensor(&device);
        let tt: Tensor<B, 1> = flat(t).to_tensor(&device);
        let labels = match self.inputs.get("y") {
            Some(y) => {
                anyhow::ensure!(y.numel() == n, "`y` must hold {n} labels, got {:?}", y.shape);
                Some(y.to_i64())
            }
            None => None,
        };
        model.check_labels(labels.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let y = self.inputs.get("y").map(|y| flat(y).to_int_tensor(&device));
        let v = match self.cfg_scale {
            Some(scale) => {
                model.check_guidance()?;
                anyhow::ensure!(n % 2 == 0, "with --cfg-scale the batch must be LFM's doubled [x; x] (even), got {n}");
                let y = y.ok_or_else(|| anyhow::anyhow!("--cfg-scale needs labels `y` = [y; y_null] in the input"))?;
                model.forward_with_cfg(tt, xt, y, scale)?
            }
            None => model.forward(tt, xt, y),
        };
        Ok(HostTensor::from_tensor(v))
    }
}

pub(crate) fn run(args: VelocityArgs, choice: BackendChoice) -> anyhow::Result<()> {
    super::refuse_existing(&args.output, args.force)?;
    let (config, weights, _) = weights_and_config(&args.checkpoint, args.model.choice())?;
    let (inputs, _) = read_safetensors(&args.input)?;
    let device = backend::select(choice)?;
    let v = backend::dispatch(&device, Evaluate { config, weights, inputs, cfg_scale: args.cfg_scale })?;
    let out = TensorMap::from([("v".to_string(), v)]);
    write_safetensors(&args.output, &out, Some(HashMap::from([("device".to_string(), device.to_string())])))?;
    println!("wrote {}", args.output.display());
    Ok(())
}
