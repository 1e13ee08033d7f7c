//! The condition channels of LFM's conditional networks, built one way for every caller that samples them
//! (`lfm sample --image/--segmentation`, `lfm eval`, the library's [`crate::sample::pipeline`]):
//! - inpainting (9 channels for 4-channel latents): the masked image's latent, a posterior sample drawn from the
//!   masked-image noise stream, and the ±1 mask on the latent grid ([`super::inpaint::condition`]);
//! - semantic synthesis (8 channels): the one-hot map's class shares per latent cell projected by LFM's
//!   SpatialRescaler ([`super::semantic`]).
//!
//! Training builds the same tensors from the same pieces ([`super::inpaint::condition`], [`class_shares`]), but
//! encodes the image and its masked copy in one pass and trains the projection, so it calls those pieces directly.

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};

use super::inpaint::{hole_tensor, masked_images, read_hole};
use super::semantic::{class_shares, SpatialRescaler};
use super::TaskInputError;
use crate::autoencoder::{AnyAutoencoder, Autoencoder};
use crate::checkpoint::TensorMap;
use crate::image::{read_rgb, RgbImage};
use crate::models::ModelConfig;

/// The noise stream (xor-ed into the run's seed) of the masked image's posterior sample.
pub const MASKED_IMAGE_NOISE: u64 = 0xC0DE;

/// An image and its mask, on the host.
#[derive(Debug, Clone)]
pub struct InpaintInput {
    /// The original image.
    pub image: RgbImage,
    /// 1 = generate, 0 = keep, per pixel.
    pub hole: Vec<f32>,
}

/// Reads an image and its mask (LFM: `1 − png/255`, black = hole; grey levels are kept as they are, as in the
/// reference); they must have one size.
pub fn read_inpaint(image: &Path, mask: &Path, white_is_hole: bool) -> Result<InpaintInput, TaskInputError> {
    let image = read_rgb(image).map_err(|e| TaskInputError::Unreadable(e.to_string()))?;
    let (w, h, hole) = read_hole(mask, white_is_hole).map_err(TaskInputError::Unreadable)?;
    if (w, h) != (image.width, image.height) {
        return Err(TaskInputError::Invalid(format!(
            "the mask {} is {w}×{h} but the image is {}×{}: they must have one size",
            mask.display(),
            image.width,
            image.height
        )));
    }
    Ok(InpaintInput { image, hole })
}

/// A square segmentation map on the host: a class index per pixel.
#[derive(Debug, Clone)]
pub struct SegmentationMap {
    /// Class index per pixel, row-major.
    pub classes: Vec<u8>,
    /// Its side in pixels.
    pub side: usize,
}

impl SegmentationMap {
    /// Reads a map at its own size from the first channel of an image (e.g. CelebAMask-HQ's grey PNGs).
    pub fn read(path: &Path) -> Result<Self, TaskInputError> {
        let image = read_rgb(path).map_err(|e| TaskInputError::Unreadable(e.to_string()))?;
        if image.width != image.height {
            return Err(TaskInputError::Invalid(format!(
                "the segmentation map {} is {}×{}: maps are square, the size of the decoded images",
                path.display(),
                image.width,
                image.height
            )));
        }
        Ok(Self { classes: image.pixels.chunks(3).map(|p| p[0]).collect(), side: image.width })
    }
}

/// Builds the condition tensors of one network: its latent side and channels, the autoencoder that encodes masked
/// images, and the projection of segmentation maps.
pub struct ConditionBuilder<'a, B: Backend> {
    side: usize,
    channels: (usize, usize),
    autoencoder: Option<&'a AnyAutoencoder<B>>,
    rescaler: Option<SpatialRescaler<B>>,
    device: B::Device,
}

impl<'a, B: Backend> ConditionBuilder<'a, B> {
    /// A builder for `config`'s network; inpainting needs `autoencoder`.
    pub fn new(config: &ModelConfig, autoencoder: Option<&'a AnyAutoencoder<B>>, device: &B::Device) -> Self {
        Self {
            side: config.latent_size(),
            channels: config.channels(),
            autoencoder,
            rescaler: None,
            device: device.clone(),
        }
    }

    /// Semantic synthesis: the SpatialRescaler's weights (LFM's `cond_stage_model_<E>.pth`) for maps `factor`× the
    /// latent (the autoencoder's factor when there is one).
    pub fn with_rescaler(mut self, weights: &TensorMap, factor: usize) -> Result<Self, TaskInputError> {
        if !factor.is_power_of_two() || self.autoencoder.is_some_and(|ae| ae.factor() != factor) {
            return Err(TaskInputError::Invalid(format!(
                "segmentation maps {factor}× the latent do not fit: the autoencoder scales by {}",
                self.autoencoder.map_or(8, |ae| ae.factor())
            )));
        }
        let rescaler = SpatialRescaler::<B>::load(weights, factor.trailing_zeros() as usize, &self.device)
            .map_err(|e| TaskInputError::Invalid(format!("the projection's weights: {e}")))?;
        let made = rescaler.channel_mapper.weight.dims()[0];
        if made != self.channels.1 {
            return Err(TaskInputError::Invalid(format!(
                "the projection makes {made} channels; the model takes {}",
                self.channels.1
            )));
        }
        self.rescaler = Some(rescaler);
        Ok(self)
    }

    /// The side of the decoded images the inputs must have (the latent's × the autoencoder's factor, 8 without one).
    pub fn image_side(&self) -> usize {
        self.side * self.autoencoder.map_or(8, |ae| ae.factor())
    }

    /// The classes the projection knows (`None` without one).
    pub fn classes(&self) -> Option<usize> {
        self.rescaler.as_ref().map(|r| r.classes())
    }

    /// Inpainting's condition for samples `first..first + inputs.len()`: each masked image encoded with its
    /// posterior noise (sample `first + i` of `seed`'s masked-image stream), then the mask on the latent grid.
    pub fn inpainting(&self, inputs: &[InpaintInput], seed: u64, first: usize) -> Result<Tensor<B, 4>, TaskInputError> {
        let Some(ae) = self.autoencoder else {
            return Err(TaskInputError::Invalid(
                "inpainting encodes the masked image: it needs the autoencoder".into(),
            ));
        };
        let (f, size) = (ae.factor(), self.image_side());
        if let Some(bad) = inputs.iter().find(|i| (i.image.width, i.image.height) != (size, size)) {
            return Err(TaskInputError::Invalid(format!(
                "the image is {}×{} but the model's {s}×{s} latent decodes to {size}×{size} (the autoencoder scales \
                 by {f})",
                bad.image.width,
                bad.image.height,
                s = self.side
            )));
        }
        let n = inputs.len();
        let images: Vec<RgbImage> = inputs.iter().map(|i| i.image.clone()).collect();
        let x =
            crate::image::to_tensor::<B>(&images, &self.device).map_err(|e| TaskInputError::Invalid(e.to_string()))?;
        let hole = hole_tensor::<B>(
            inputs.iter().flat_map(|i| i.hole.iter().copied()).collect(),
            n,
            (size, size),
            &self.device,
        );
        let shape = [self.channels.1, self.side, self.side];
        let eps = crate::sample::noise::<B>(seed ^ MASKED_IMAGE_NOISE, first, n, shape, &self.device);
        let latent = ae.encode(masked_images(x, hole.clone()), Some(eps));
        Ok(super::inpaint::condition(latent, hole, f))
    }

    /// Semantic synthesis's condition: the maps' class shares per latent cell, projected.
    pub fn semantic(&self, maps: &[SegmentationMap]) -> Result<Tensor<B, 4>, TaskInputError> {
        let Some(rescaler) = &self.rescaler else {
            return Err(TaskInputError::Invalid(
                "semantic synthesis projects the maps: it needs the projection's weights (--cond-checkpoint)".into(),
            ));
        };
        let f = 1usize << rescaler.n_stages;
        let size = self.side * f;
        if let Some(bad) = maps.iter().find(|m| m.side != size) {
            return Err(TaskInputError::Invalid(format!(
                "the segmentation map is {s}×{s}; the model's {side}×{side} latent needs {size}×{size} (the \
                 projection halves it {} times)",
                rescaler.n_stages,
                s = bad.side,
                side = self.side
            )));
        }
        let classes: Vec<Vec<u8>> = maps.iter().map(|m| m.classes.clone()).collect();
        let shares =
            class_shares::<B>(&classes, size, f, rescaler.classes(), &self.device).map_err(TaskInputError::Invalid)?;
        Ok(rescaler.project(shares))
    }
}

/// Checks that `condition` supplies exactly the channels a network reading `(c_in, c_out)` channels takes beyond
/// its latent (none for an unconditional network).
pub fn check_condition_channels<B: Backend>(
    (c_in, c_out): (usize, usize),
    condition: Option<&Tensor<B, 4>>,
) -> Result<(), TaskInputError> {
    let extra = c_in - c_out;
    match condition.map(|c| c.dims()[1]) {
        Some(given) if given != extra => Err(TaskInputError::Invalid(format!(
            "the model reads {c_in} channels: {c_out} latent + {extra} conditioning, but the condition supplies {given}"
        ))),
        None if extra > 0 => Err(TaskInputError::Invalid(format!(
            "the model reads {c_in} channels ({extra} beyond its {c_out} output): it is a conditional model; \
             inpainting models (9 channels) need an image and its mask, semantic ones (8) a segmentation map"
        ))),
        _ => Ok(()),
    }
}
