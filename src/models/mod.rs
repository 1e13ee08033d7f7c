//! The velocity networks LFM trains: DiT, the guided-diffusion UNet and EDM's DhariwalUNet.

pub mod config;
pub mod dit;
pub mod edm;
mod flops;
mod infer;
pub mod precision;
pub mod presets;
pub mod unet;

use burn::tensor::{backend::Backend, DType, Int, Tensor};

use crate::nn::dtype::to_dtype;

pub use config::{LfmFlags, ModelConfig};
pub use dit::{DiT, DiTConfig};
pub use edm::{EdmConfig, EdmUNet};
pub use precision::Precision;
pub use presets::{Preset, PRESETS};
pub use unet::{UNetConfig, UNetModel};

use crate::checkpoint::{CheckpointError, TensorMap};

/// A loaded velocity network of any supported architecture.
// Built once per run; the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug)]
pub enum VelocityModel<B: Backend> {
    /// A DiT.
    Dit(DiT<B>),
    /// The guided-diffusion UNet.
    GuidedUnet(UNetModel<B>),
    /// EDM's DhariwalUNet.
    EdmUnet(EdmUNet<B>),
}

impl<B: Backend> VelocityModel<B> {
    /// Builds the network of `config` from a state_dict.
    pub fn load(config: &ModelConfig, weights: &TensorMap, device: &B::Device) -> Result<Self, CheckpointError> {
        match config {
            ModelConfig::Dit(c) => DiT::load(c, weights, device).map(Self::Dit),
            ModelConfig::GuidedUnet(c) => UNetModel::load(c, weights, device).map(Self::GuidedUnet),
            ModelConfig::EdmUnet(c) => EdmUNet::load(c, weights, device).map(Self::EdmUnet),
        }
    }

    /// A freshly initialised network (the reference's initialisation), for training from scratch.
    pub fn init(config: &ModelConfig, device: &B::Device) -> Self {
        match config {
            ModelConfig::Dit(c) => Self::Dit(c.init(device)),
            ModelConfig::GuidedUnet(c) => Self::GuidedUnet(c.init(device)),
            ModelConfig::EdmUnet(c) => Self::EdmUnet(c.init(device)),
        }
    }

    /// How this network's Burn parameter paths map to its checkpoint keys.
    pub fn keys(&self) -> crate::checkpoint::KeyMap {
        match self {
            Self::Dit(_) => dit::dit_keys(),
            Self::GuidedUnet(_) => unet::unet_keys(),
            Self::EdmUnet(m) => m.config.keys(),
        }
    }

    /// Every parameter under its checkpoint key, in PyTorch layout.
    pub fn state_dict(&self) -> TensorMap {
        crate::checkpoint::collect_weights(self, &self.keys())
    }

    /// See [`ModelConfig::classes`].
    pub fn classes(&self) -> Option<usize> {
        self.config().classes()
    }

    /// See [`ModelConfig::null_label`].
    pub fn null_label(&self) -> Option<i64> {
        self.config().null_label()
    }

    /// See [`ModelConfig::supports_cfg`].
    pub fn supports_cfg(&self) -> bool {
        self.config().supports_cfg()
    }

    /// Checks labels before a forward pass: a class-conditional UNet needs them, an unconditional one takes none,
    /// and every label must be a valid row. (The DiT falls back to its last row, as the reference does.)
    pub fn check_labels(&self, labels: Option<&[i64]>) -> Result<(), String> {
        let count = self.config().label_count();
        match (labels, count, self) {
            (None, Some(_), Self::GuidedUnet(_) | Self::EdmUnet(_)) => {
                Err("this model is class-conditional: pass labels `y`".into())
            }
            (Some(_), None, Self::GuidedUnet(_) | Self::EdmUnet(_)) => {
                Err("this model is unconditional: it takes no labels `y`".into())
            }
            (Some(ys), _, _) => {
                let rows = match self {
                    Self::Dit(m) => m.config.label_rows(),
                    _ => count.unwrap_or(0),
                };
                match ys.iter().find(|&&y| y < 0 || y as usize >= rows) {
                    Some(bad) => Err(format!("label {bad} is out of range: the model has labels 0..{}", rows - 1)),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// The network with its weights cast to `precision` (see [`precision`]): its forward passes then take and
    /// return tensors of the caller's dtype and compute in `precision` in between.
    pub fn with_precision(self, precision: Precision) -> Self {
        precision::cast_module(self, precision.dtype())
    }

    /// The dtype the network computes in: that of its weights (f32 unless cast by [`Self::with_precision`]).
    pub fn compute_dtype(&self) -> DType {
        // The time embedding's first layer: every parameter shares its dtype, and reading one costs nothing.
        match self {
            Self::Dit(m) => m.t_embedder.mlp_0.weight.val().dtype(),
            Self::GuidedUnet(m) => m.time_embed_0.weight.val().dtype(),
            Self::EdmUnet(m) => m.map_layer0.weight.val().dtype(),
        }
    }

    /// `v = model(t, x, y)`, in `x`'s dtype (computed in the weights' precision).
    pub fn forward(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        self.in_compute_dtype(x, |x| match self {
            Self::Dit(m) => m.forward(t, x, y),
            Self::GuidedUnet(m) => m.forward(t, x, y),
            Self::EdmUnet(m) => m.forward(t, x, y),
        })
    }

    /// Whether classifier-free guidance can run on this network: LFM defines it for DiT (with a null row, i.e.
    /// trained with label dropout) and class-conditional EDM UNets, not for the guided-diffusion UNet.
    pub fn check_guidance(&self) -> Result<(), ModelError> {
        self.config().check_guidance().map_err(ModelError::Config)
    }

    /// Classifier-free guidance on the batch `x` with labels `y`: `v_u + s·(v_c − v_u)`, where `v_c` is the
    /// velocity for `y` and `v_u` the unconditional one (DiT: the null row; EDM: no label term), both from one pass
    /// over `2n` samples; in `x`'s dtype. See [`Self::check_guidance`] for the networks that have it.
    pub fn guided(
        &self,
        t: Tensor<B, 1>,
        x: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        scale: f64,
    ) -> Result<Tensor<B, 4>, ModelError> {
        self.check_guidance()?;
        match self {
            Self::Dit(m) => Ok(self.in_compute_dtype(x, |x| m.guided(t, x, y, scale))),
            Self::EdmUnet(m) => Ok(self.in_compute_dtype(x, |x| m.guided(t, x, y, scale))),
            Self::GuidedUnet(_) => Err(no_guidance_for_the_guided_unet()),
        }
    }

    /// LFM's `forward_with_cfg` on a doubled batch `[x; x]` with labels `[y; y_null]` (DiT: `y_null` is the null
    /// row; EDM: any, the second half's one-hot is zeroed), kept for parity with the reference; sampling uses
    /// [`Self::guided`]. The guided UNet has no CFG in LFM.
    pub fn forward_with_cfg(
        &self,
        t: Tensor<B, 1>,
        x: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        scale: f64,
    ) -> Result<Tensor<B, 4>, ModelError> {
        match self {
            Self::Dit(m) => Ok(self.in_compute_dtype(x, |x| m.forward_with_cfg(t, x, y, scale))),
            Self::EdmUnet(m) => Ok(self.in_compute_dtype(x, |x| m.forward_with_cfg(t, x, y, scale))),
            Self::GuidedUnet(_) => Err(no_guidance_for_the_guided_unet()),
        }
    }

    /// `f` on `x` cast to the weights' precision, its result cast back to `x`'s dtype.
    fn in_compute_dtype(&self, x: Tensor<B, 4>, f: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 4>) -> Tensor<B, 4> {
        let (io, compute) = (x.dtype(), self.compute_dtype());
        to_dtype(f(to_dtype(x, compute)), io)
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> ModelConfig {
        match self {
            Self::Dit(m) => ModelConfig::Dit(m.config.clone()),
            Self::GuidedUnet(m) => ModelConfig::GuidedUnet(m.config.clone()),
            Self::EdmUnet(m) => ModelConfig::EdmUnet(m.config.clone()),
        }
    }
}

/// Why the guided-diffusion UNet cannot be sampled with classifier-free guidance.
fn no_guidance_for_the_guided_unet() -> ModelError {
    ModelError::Config(config::NO_GUIDANCE_FOR_THE_GUIDED_UNET.into())
}

/// The time of a doubled CFG batch: one time stays one, per-sample times are repeated for the second half.
fn doubled_time<B: Backend>(t: Tensor<B, 1>, n: usize) -> Tensor<B, 1> {
    match t.dims()[0] == n && n > 1 {
        true => Tensor::cat(vec![t.clone(), t], 0),
        false => t,
    }
}

/// From the outputs of a CFG pass (conditional half, then unconditional half): `v_u + s·(v_c − v_u)`, one per sample.
fn cfg_guide<B: Backend>(out: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
    let n = out.dims()[0] / 2;
    let cond = out.clone().narrow(0, 0, n);
    let uncond = out.narrow(0, n, n);
    uncond.clone() + (cond - uncond).mul_scalar(scale)
}

/// Why a model could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or applying the weights failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The configuration is missing, unreadable or inconsistent.
    #[error("{0}")]
    Config(String),
}

/// Reads a model configuration file: our JSON, LFM flags as JSON/TOML, or LFM's saved `config.yaml`.
pub fn read_config(path: &std::path::Path) -> Result<ModelConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    ModelConfig::from_text(&text, &name).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
}

/// Where a checkpoint's configuration comes from.
#[derive(Debug, Clone, Copy)]
pub enum ConfigChoice<'a> {
    /// The file's own `lfm.config` metadata, else the `args` of an LFM `content.pth`, else inferred from the
    /// tensor names and shapes.
    Detect,
    /// A configuration file (see [`read_config`]).
    File(&'a std::path::Path),
    /// One of LFM's released experiments ([`PRESETS`]).
    Preset(&'a str),
}

/// A checkpoint's weights with the configuration that describes them and a note of where it came from.
pub fn weights_and_config(
    checkpoint: &std::path::Path,
    choice: ConfigChoice<'_>,
) -> Result<(ModelConfig, TensorMap, String), ModelError> {
    let weights = crate::checkpoint::read_weights(checkpoint)?;
    let at = |what: &str, e: String| ModelError::Config(format!("{}: {what}{e}", checkpoint.display()));
    let (config, source) = match (choice, &weights.config_json, &weights.lfm_args) {
        (ConfigChoice::File(path), _, _) => (read_config(path)?, format!("from {}", path.display())),
        (ConfigChoice::Preset(name), _, _) => {
            (Preset::find(name).map_err(ModelError::Config)?.model(), format!("preset {name}"))
        }
        (ConfigChoice::Detect, Some(json), _) => {
            (ModelConfig::from_json(json).map_err(|e| at("metadata: ", e))?, "from the file's metadata".into())
        }
        (ConfigChoice::Detect, None, Some(args)) => (
            ModelConfig::from_lfm_args(args.clone()).map_err(|e| at("args: ", e))?,
            "from the LFM training flags saved in the file".into(),
        ),
        (ConfigChoice::Detect, None, None) => {
            (ModelConfig::infer(&weights.tensors).map_err(|e| at("", e))?, "inferred from the weights".into())
        }
    };
    config.validate().map_err(ModelError::Config)?;
    Ok((config, weights.tensors, source))
}
