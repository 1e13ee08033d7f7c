//! The velocity networks LFM trains: DiT, the guided-diffusion UNet and EDM's DhariwalUNet.

pub mod config;
pub mod dit;

use burn::tensor::{backend::Backend, Int, Tensor};

pub use config::ModelConfig;
pub use dit::{DiT, DiTConfig};

use crate::checkpoint::{CheckpointError, TensorMap};

/// A loaded velocity network of any supported architecture.
#[derive(Debug)]
pub enum VelocityModel<B: Backend> {
    /// A DiT.
    Dit(DiT<B>),
}

impl<B: Backend> VelocityModel<B> {
    /// Builds the network of `config` from a state_dict.
    pub fn load(config: &ModelConfig, weights: &TensorMap, device: &B::Device) -> Result<Self, CheckpointError> {
        match config {
            ModelConfig::Dit(c) => DiT::load(c, weights, device).map(Self::Dit),
        }
    }

    /// `v = model(t, x, y)`.
    pub fn forward(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        match self {
            Self::Dit(m) => m.forward(t, x, y),
        }
    }

    /// LFM's `forward_with_cfg` on a doubled batch `[x; x]` with labels `[y; y_null]`.
    pub fn forward_with_cfg(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Tensor<B, 1, Int>, scale: f64) -> Tensor<B, 4> {
        match self {
            Self::Dit(m) => m.forward_with_cfg(t, x, y, scale),
        }
    }
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

/// A checkpoint's weights with the configuration that describes them: from `--config` if given, else from the
/// file's own `lfm.config` metadata, else inferred from names and shapes.
pub fn weights_and_config(
    checkpoint: &std::path::Path,
    config_file: Option<&std::path::Path>,
) -> Result<(ModelConfig, TensorMap), ModelError> {
    let weights = crate::checkpoint::read_weights(checkpoint)?;
    let config = match (config_file, &weights.config_json) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
            ModelConfig::from_json(&text).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?
        }
        (None, Some(json)) => ModelConfig::from_json(json)
            .map_err(|e| ModelError::Config(format!("{}: metadata: {e}", checkpoint.display())))?,
        (None, None) => ModelConfig::infer(&weights.tensors)
            .map_err(|e| ModelError::Config(format!("{}: {e}", checkpoint.display())))?,
    };
    config.validate().map_err(ModelError::Config)?;
    Ok((config, weights.tensors))
}
