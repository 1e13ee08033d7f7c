//! The conditioning inputs of `lfm sample`: inpainting (an image and its mask, LFM's 9-channel layout) and semantic
//! synthesis (a segmentation map projected by LFM's SpatialRescaler, the 8-channel layout), read on the host and
//! turned into the condition tensor every sample of a run shares.

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};

use super::sample::SampleArgs;
use crate::autoencoder::{AnyAutoencoder, Autoencoder};
use crate::checkpoint::TensorMap;
use crate::image::{read_rgb, RgbImage};
use crate::inpaint::{self, hole_tensor, masked_images, read_hole};
use crate::models::conditioning::{class_shares, SpatialRescaler};
use crate::models::ModelConfig;
use crate::sample::noise;

/// The inpainting inputs, on the host.
pub(crate) struct Inpaint {
    /// The original image.
    pub image: RgbImage,
    /// 1 = generate, 0 = keep, per pixel.
    pub hole: Vec<f32>,
}

/// The noise stream of the masked image's posterior sample.
pub(crate) const MASKED_IMAGE_NOISE: u64 = 0xC0DE;

/// The semantic-synthesis inputs, on the host.
pub(crate) struct Semantic {
    /// Class index per pixel.
    classes: Vec<u8>,
    width: usize,
    height: usize,
    /// The SpatialRescaler's weights.
    rescaler: TensorMap,
}

/// What a sampling run is conditioned on, besides its class labels.
#[derive(Default)]
pub(crate) struct Condition {
    /// `--image` and `--mask`.
    pub inpaint: Option<Inpaint>,
    /// `--segmentation` and `--cond-checkpoint`.
    pub semantic: Option<Semantic>,
}

/// An image and its mask (LFM: `1 − png/255`, black = hole; grey levels are kept as they are, as in the reference).
pub(crate) fn read_inpaint(image: &Path, mask: &Path, white_is_hole: bool) -> anyhow::Result<Inpaint> {
    let image = read_rgb(image)?;
    let (w, h, hole) = read_hole(mask, white_is_hole).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        (w, h) == (image.width, image.height),
        "the mask {} is {w}×{h} but the image is {}×{}: they must have one size",
        mask.display(),
        image.width,
        image.height
    );
    Ok(Inpaint { image, hole })
}

impl Condition {
    /// Reads the files the arguments name.
    pub fn read(args: &SampleArgs) -> anyhow::Result<Self> {
        let inpaint = match (&args.image, &args.mask) {
            (Some(image), Some(mask)) => Some(read_inpaint(image, mask, args.mask_white_is_hole)?),
            _ => None,
        };
        let semantic = match (&args.segmentation, &args.cond_checkpoint) {
            (Some(map), Some(cond)) => {
                let image = read_rgb(map)?;
                let classes = image.pixels.chunks(3).map(|p| p[0]).collect();
                let rescaler = crate::checkpoint::read_weights(cond)?.tensors;
                Some(Semantic { classes, width: image.width, height: image.height, rescaler })
            }
            _ => None,
        };
        Ok(Self { inpaint, semantic })
    }

    /// No conditioning input was given.
    pub fn is_none(&self) -> bool {
        self.inpaint.is_none() && self.semantic.is_none()
    }

    /// The condition channels `[1, C_in − C_out, side, side]` for `config`'s network (`None` for an unconditional
    /// one), checked against the channels it reads. Inpainting encodes the masked image with the autoencoder's
    /// posterior noise drawn from `seed`.
    pub fn tensor<B: Backend>(
        &self,
        autoencoder: Option<&AnyAutoencoder<B>>,
        config: &ModelConfig,
        seed: u64,
        device: &B::Device,
    ) -> anyhow::Result<Option<Tensor<B, 4>>> {
        let side = config.latent_size();
        let (c_in, c_out) = config.channels();
        let extra = c_in - c_out;
        // Inpainting: the masked image's latent and the ±1 mask on the latent grid, the same for every sample.
        let condition = match (&self.inpaint, autoencoder) {
            (Some(inpaint), Some(ae)) => {
                let f = ae.factor();
                let (w, h) = (inpaint.image.width, inpaint.image.height);
                anyhow::ensure!(
                    (w, h) == (side * f, side * f),
                    "the image is {w}×{h} but the model's {side}×{side} latent decodes to {}×{} (the autoencoder \
                     scales by {f})",
                    side * f,
                    side * f
                );
                let image = crate::image::to_tensor::<B>(std::slice::from_ref(&inpaint.image), device)?;
                let hole = hole_tensor::<B>(inpaint.hole.clone(), 1, (w, h), device);
                let eps = noise::<B>(seed ^ MASKED_IMAGE_NOISE, 0, 1, [c_out, h / f, w / f], device);
                let latent = ae.encode(masked_images(image, hole.clone()), Some(eps));
                Some(inpaint::condition(latent, hole, f))
            }
            _ => None,
        };
        let condition = match (&self.semantic, condition) {
            (Some(semantic), None) => {
                // The map is f× the latent; the rescaler halves it log₂ f times (LFM: 256 → 32, 3 times).
                let f = semantic.width / side;
                let decoded = autoencoder.map(|ae| ae.factor());
                anyhow::ensure!(
                    semantic.width == semantic.height
                        && semantic.width == side * f
                        && f.is_power_of_two()
                        && decoded.is_none_or(|d| d == f),
                    "the segmentation map is {}×{}; the model's {side}×{side} latent needs {s}×{s} (the autoencoder \
                     scales by {})",
                    semantic.width,
                    semantic.height,
                    decoded.unwrap_or(8),
                    s = side * decoded.unwrap_or(8),
                );
                let rescaler = SpatialRescaler::<B>::load(&semantic.rescaler, f.trailing_zeros() as usize, device)?;
                let shares = class_shares::<B>(
                    std::slice::from_ref(&semantic.classes),
                    semantic.width,
                    f,
                    rescaler.classes(),
                    device,
                )
                .map_err(|e| anyhow::anyhow!(e))?;
                Some(rescaler.project(shares))
            }
            (_, condition) => condition,
        };
        if let Some(c) = &condition {
            anyhow::ensure!(
                c.dims()[1] == extra,
                "the model reads {c_in} channels: {c_out} latent + {extra} conditioning, but the condition supplies {}",
                c.dims()[1]
            );
        } else {
            anyhow::ensure!(
                extra == 0,
                "the model reads {c_in} channels ({extra} beyond its {c_out} output): it is a conditional model; \
                 inpainting models (9 channels) need --image and --mask, semantic ones (8) --segmentation"
            );
        }
        Ok(condition)
    }
}
