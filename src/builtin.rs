//! The built-in model: a class-conditional DiT and its KL autoencoder, trained by lfm itself on Fashion-MNIST
//! (`scripts/train-builtin`), embedded in the binary so that `lfm sample` makes images on a fresh machine with no
//! download. Its sampling settings (`assets/fashion-mnist/sampling.json`) are the ones the README's FID table
//! was measured with.

use std::path::Path;

use serde::Deserialize;

use crate::autoencoder::{AutoencoderKLConfig, AutoencoderWeights};
use crate::checkpoint::{read_safetensors_bytes, TensorMap, CONFIG_METADATA_KEY};
use crate::models::ModelConfig;

const MODEL: &[u8] = include_bytes!("../assets/fashion-mnist/model.safetensors");
const AUTOENCODER_CONFIG: &str = include_str!("../assets/fashion-mnist/autoencoder/config.json");
const AUTOENCODER: &[u8] = include_bytes!("../assets/fashion-mnist/autoencoder/diffusion_pytorch_model.safetensors");
const SAMPLING: &str = include_str!("../assets/fashion-mnist/sampling.json");

/// Fashion-MNIST's classes, by label.
pub const CLASS_NAMES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// How the built-in model is sampled by default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SamplingDefaults {
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// The times guidance applies at (`--cfg-interval`); absent: every time.
    #[serde(default)]
    pub cfg_interval: Option<(f64, f64)>,
    /// Samples per class (one grid row each).
    pub per_class: usize,
    /// The ODE solver (`dopri5`, `euler`, …).
    pub solver: String,
    /// Steps of a fixed-step solver.
    pub steps: Option<usize>,
}

/// The velocity network's configuration and weights.
pub fn model() -> Result<(ModelConfig, TensorMap), String> {
    let path = Path::new("<built-in model.safetensors>");
    let (tensors, metadata) = read_safetensors_bytes(path, MODEL).map_err(|e| e.to_string())?;
    let json = metadata
        .as_ref()
        .and_then(|m| m.get(CONFIG_METADATA_KEY))
        .ok_or("the built-in model has no configuration in its metadata")?;
    Ok((ModelConfig::from_json(json)?, tensors))
}

/// The autoencoder's configuration and weights.
pub fn autoencoder() -> Result<AutoencoderWeights, String> {
    let config = AutoencoderKLConfig::from_json(AUTOENCODER_CONFIG)?;
    let path = Path::new("<built-in diffusion_pytorch_model.safetensors>");
    let (tensors, _) = read_safetensors_bytes(path, AUTOENCODER).map_err(|e| e.to_string())?;
    Ok(AutoencoderWeights::Kl(config, tensors))
}

/// The default sampling settings.
pub fn sampling() -> Result<SamplingDefaults, String> {
    serde_json::from_str(SAMPLING).map_err(|e| format!("the built-in sampling.json: {e}"))
}
