//! LFM's inpainting layout, shared by training (`lfm train --task inpaint`), sampling (`lfm sample --image --mask`)
//! and evaluation (`lfm eval inpaint`): the masked image, the mask on the latent grid, and the final composite.

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::image::RgbImage;

/// Reads a mask image as holes (1 = region to generate, 0 = kept) from its grey level: LFM's `1 − png/255`
/// (black = hole), or `png/255` with `white_is_hole`. Returns `(width, height, holes)`.
pub fn read_hole(path: &Path, white_is_hole: bool) -> Result<(usize, usize, Vec<f32>), String> {
    let grey = image::open(path).map_err(|e| format!("{}: {e}", path.display()))?.to_luma8();
    let (w, h) = (grey.width() as usize, grey.height() as usize);
    let hole = grey
        .into_raw()
        .into_iter()
        .map(|v| {
            let white = v as f32 / 255.0;
            if white_is_hole {
                white
            } else {
                1.0 - white
            }
        })
        .collect();
    Ok((w, h, hole))
}

/// Holes of `count` images `height × width` as a `[count, 1, H, W]` tensor.
pub fn hole_tensor<B: Backend>(
    holes: Vec<f32>,
    count: usize,
    size: (usize, usize),
    device: &B::Device,
) -> Tensor<B, 4> {
    let (w, h) = size;
    Tensor::from_data(TensorData::new(holes, [count, 1, h, w]).convert::<B::FloatElem>(), device)
}

/// LFM's masked image: `(1 − hole)·image` in [0, 1], returned in [−1, 1] (images in [−1, 1], holes `[N, 1, H, W]`).
pub fn masked_images<B: Backend>(images: Tensor<B, 4>, holes: Tensor<B, 4>) -> Tensor<B, 4> {
    (images.add_scalar(1.0).div_scalar(2.0) * holes.neg().add_scalar(1.0)).mul_scalar(2.0).sub_scalar(1.0)
}

/// The mask channel: ±1 (+1 = hole), nearest-resized by `factor` to the latent grid as `F.interpolate` does
/// (output cell `i` reads input pixel `i·factor`).
pub fn latent_mask<B: Backend>(holes: Tensor<B, 4>, factor: usize) -> Tensor<B, 4> {
    let [n, _, h, w] = holes.dims();
    let (lh, lw) = (h / factor, w / factor);
    holes
        .mul_scalar(2.0)
        .sub_scalar(1.0)
        .reshape([n, 1, lh, factor, lw, factor])
        .narrow(3, 0, 1)
        .narrow(5, 0, 1)
        .reshape([n, 1, lh, lw])
}

/// The inpainting condition concatenated to `x_t`: the masked image's latent, then the ±1 mask on its grid
/// ([`latent_mask`]); `[N, C + 1, H/f, W/f]`.
pub fn condition<B: Backend>(masked_latent: Tensor<B, 4>, holes: Tensor<B, 4>, factor: usize) -> Tensor<B, 4> {
    Tensor::cat(vec![masked_latent, latent_mask(holes, factor)], 1)
}

/// LFM's composite: generated pixels in the hole, the original elsewhere (`fake·hole + original·(1 − hole)`).
pub fn composite(generated: &mut RgbImage, original: &RgbImage, hole: &[f32]) {
    for (p, &m) in hole.iter().enumerate() {
        for c in 0..3 {
            let (g, o) = (generated.pixels[3 * p + c] as f32, original.pixels[3 * p + c] as f32);
            generated.pixels[3 * p + c] = (g * m + o * (1.0 - m)).round() as u8;
        }
    }
}
