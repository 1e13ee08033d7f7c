//! The autoencoders whose latent space LFM works in: SD's KL VAE and its tiny twin TAESD, behind one trait whose
//! latents are LFM's `z` (already multiplied by the scale factor) and whose images are in [-1, 1].

pub mod kl;
pub mod taesd;

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};

pub use kl::{AutoencoderKL, AutoencoderKLConfig, Posterior};
pub use taesd::Taesd;

use crate::checkpoint::{read_weights, CheckpointError, TensorMap};

/// An image autoencoder seen from LFM: images in [-1, 1] ↔ scaled latents.
pub trait Autoencoder<B: Backend> {
    /// Latent channels.
    fn latent_channels(&self) -> usize;

    /// Spatial downsampling factor.
    fn factor(&self) -> usize;

    /// Images `[N, 3, H, W]` in [-1, 1] → scaled latents. A stochastic encoder samples with `eps` (standard normal,
    /// latent-shaped) or returns its mean when `eps` is `None`.
    fn encode(&self, images: Tensor<B, 4>, eps: Option<Tensor<B, 4>>) -> Tensor<B, 4>;

    /// Scaled latents → images in about [-1, 1] (not clamped).
    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4>;

    /// Checks that this autoencoder's latents are the ones a velocity network with `model_channels` output channels
    /// works in.
    fn check_fits(&self, model_channels: usize) -> Result<(), String> {
        let c = self.latent_channels();
        if c == model_channels {
            Ok(())
        } else {
            Err(format!(
                "the autoencoder has {c} latent channels but the model produces {model_channels}: they do not belong together"
            ))
        }
    }

    /// [`Autoencoder::decode`] `slice` samples at a time, so that memory stays bounded for large batches.
    fn decode_sliced(&self, latents: Tensor<B, 4>, slice: usize) -> Tensor<B, 4> {
        let n = latents.dims()[0];
        let slice = slice.max(1);
        if n <= slice {
            return self.decode(latents);
        }
        let parts =
            (0..n).step_by(slice).map(|i| self.decode(latents.clone().narrow(0, i, slice.min(n - i)))).collect();
        Tensor::cat(parts, 0)
    }
}

impl<B: Backend> Autoencoder<B> for AutoencoderKL<B> {
    fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    fn factor(&self) -> usize {
        self.config.factor()
    }

    fn encode(&self, images: Tensor<B, 4>, eps: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        self.encode_with_posterior(images, eps).0
    }

    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        // The scale factor on the way out (on the way in: `encode_with_posterior`).
        self.decode_unscaled(latents.div_scalar(self.config.scaling_factor))
    }
}

impl<B: Backend> Autoencoder<B> for Taesd<B> {
    fn latent_channels(&self) -> usize {
        taesd::LATENT_CHANNELS
    }

    fn factor(&self) -> usize {
        taesd::FACTOR
    }

    fn encode(&self, images: Tensor<B, 4>, _eps: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        // TAESD's latents are already on the scaled SD scale; its images are in [0, 1].
        Taesd::encode(self, images.add_scalar(1.0).div_scalar(2.0))
    }

    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        Taesd::decode(self, latents).mul_scalar(2.0).sub_scalar(1.0)
    }
}

/// Which autoencoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AutoencoderKind {
    /// SD's KL VAE (diffusers `AutoencoderKL`, e.g. sd-vae-ft-mse).
    Kl,
    /// TAESD, the tiny distilled decoder/encoder.
    Taesd,
}

/// Either autoencoder, loaded.
#[derive(Debug)]
// Built once per run; the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnyAutoencoder<B: Backend> {
    /// The KL VAE.
    Kl(AutoencoderKL<B>),
    /// TAESD.
    Taesd(Taesd<B>),
}

impl<B: Backend> Autoencoder<B> for AnyAutoencoder<B> {
    fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(m) => m.latent_channels(),
            Self::Taesd(m) => Autoencoder::<B>::latent_channels(m),
        }
    }

    fn factor(&self) -> usize {
        match self {
            Self::Kl(m) => Autoencoder::<B>::factor(m),
            Self::Taesd(m) => Autoencoder::<B>::factor(m),
        }
    }

    fn encode(&self, images: Tensor<B, 4>, eps: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        match self {
            Self::Kl(m) => Autoencoder::encode(m, images, eps),
            Self::Taesd(m) => Autoencoder::encode(m, images, eps),
        }
    }

    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Kl(m) => Autoencoder::decode(m, latents),
            Self::Taesd(m) => Autoencoder::decode(m, latents),
        }
    }
}

/// Host-side weights of an autoencoder, read and checked before any device work.
#[derive(Debug, Clone)]
pub enum AutoencoderWeights {
    /// KL VAE weights with their config.
    Kl(AutoencoderKLConfig, TensorMap),
    /// TAESD encoder and decoder state_dicts.
    Taesd(TensorMap, TensorMap),
}

/// Why an autoencoder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AutoencoderError {
    /// Reading or applying the weights failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The files are missing, misnamed or inconsistent.
    #[error("{0}")]
    Files(String),
}

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

impl AutoencoderWeights {
    /// Latent channels of the autoencoder these weights build.
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(config, _) => config.latent_channels,
            Self::Taesd(..) => taesd::LATENT_CHANNELS,
        }
    }

    /// Its downsampling factor.
    pub fn factor(&self) -> usize {
        match self {
            Self::Kl(config, _) => config.factor(),
            Self::Taesd(..) => taesd::FACTOR,
        }
    }

    /// Reads weights from `path`: for `kl`, a diffusers folder (its `config.json` and
    /// `diffusion_pytorch_model.safetensors`/`.bin`, also under `vae/`) or a weights file (config from `config` or
    /// sd-vae-ft-mse's); for `taesd`, a folder with `taesd_encoder.*` and `taesd_decoder.*`
    /// (`.safetensors` or `.pth`), or one diffusers `AutoencoderTiny` file.
    pub fn read(kind: AutoencoderKind, path: &Path, config: Option<&Path>) -> Result<Self, AutoencoderError> {
        let missing = |what: &str| {
            AutoencoderError::Files(format!(
                "{}: {what}. Download the weights first (see the README: sd-vae-ft-mse from huggingface.co/stabilityai/\
                 sd-vae-ft-mse, TAESD from github.com/madebyollin/taesd)",
                path.display()
            ))
        };
        if !path.exists() {
            return Err(missing("no such file or folder"));
        }
        match kind {
            AutoencoderKind::Kl => {
                let dir = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
                let (file, config_file) = if dir.is_dir() {
                    let file =
                        first_existing(&dir, &["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
                            .ok_or_else(|| missing("no diffusion_pytorch_model.safetensors or .bin in this folder"))?;
                    (file, config.map(Path::to_path_buf).or_else(|| first_existing(&dir, &["config.json"])))
                } else {
                    (dir.clone(), config.map(Path::to_path_buf))
                };
                let config = match config_file {
                    Some(c) => {
                        let text = std::fs::read_to_string(&c)
                            .map_err(|e| AutoencoderError::Files(format!("{}: {e}", c.display())))?;
                        AutoencoderKLConfig::from_json(&text)
                            .map_err(|e| AutoencoderError::Files(format!("{}: {e}", c.display())))?
                    }
                    None => AutoencoderKLConfig::sd_vae_ft_mse(),
                };
                Ok(Self::Kl(config, read_weights(&file)?.tensors))
            }
            AutoencoderKind::Taesd => {
                if path.is_file() {
                    let all = read_weights(path)?.tensors;
                    let half = |prefix: &str| -> TensorMap {
                        all.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
                    };
                    let (encoder, decoder) = (half("encoder."), half("decoder."));
                    if encoder.is_empty() || decoder.is_empty() {
                        return Err(AutoencoderError::Files(format!(
                            "{}: not a diffusers AutoencoderTiny file (no encoder./decoder. tensors); pass the folder \
                             holding taesd_encoder.* and taesd_decoder.*",
                            path.display()
                        )));
                    }
                    return Ok(Self::Taesd(encoder, decoder));
                }
                let half = |name: &str| {
                    first_existing(path, &[&format!("{name}.safetensors"), &format!("{name}.pth")])
                        .ok_or_else(|| missing(&format!("no {name}.safetensors or {name}.pth in this folder")))
                };
                let encoder = read_weights(&half("taesd_encoder")?)?.tensors;
                let decoder = read_weights(&half("taesd_decoder")?)?.tensors;
                Ok(Self::Taesd(encoder, decoder))
            }
        }
    }

    /// Builds the autoencoder on a device; fails with a precise report when the weights belong to another model.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<AnyAutoencoder<B>, AutoencoderError> {
        Ok(match self {
            Self::Kl(config, weights) => AnyAutoencoder::Kl(AutoencoderKL::load(config, weights, device)?),
            Self::Taesd(encoder, decoder) => AnyAutoencoder::Taesd(Taesd::load(encoder, decoder, device)?),
        })
    }
}
