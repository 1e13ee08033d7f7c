//! Reading and writing images as tensors in [-1, 1] (LFM's data range), PNG or JPEG chosen by file extension.

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Why an image could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Decoding or encoding failed.
    #[error("{path}: {reason}")]
    Codec {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The images do not fit together or the autoencoder.
    #[error("{0}")]
    Shape(String),
}

/// An RGB image in host memory, rows of `width·3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Interleaved RGB bytes.
    pub pixels: Vec<u8>,
}

/// Reads an image file (any format the `image` crate decodes: PNG, JPEG) as RGB.
pub fn read_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let codec = |reason: String| ImageError::Codec { path: path.display().to_string(), reason };
    let image = image::open(path).map_err(|e| codec(e.to_string()))?.to_rgb8();
    let (width, height) = (image.width() as usize, image.height() as usize);
    Ok(RgbImage { width, height, pixels: image.into_raw() })
}

/// Writes an RGB image atomically; PNG or JPEG (quality 95) by extension.
pub fn write_rgb(path: &Path, image: &RgbImage) -> Result<(), ImageError> {
    let codec = |reason: String| ImageError::Codec { path: path.display().to_string(), reason };
    let buffer = image::RgbImage::from_raw(image.width as u32, image.height as u32, image.pixels.clone())
        .ok_or_else(|| codec("pixel buffer does not match the size".into()))?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut bytes = Vec::new();
    match extension.as_str() {
        "png" => buffer
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .map_err(|e| codec(e.to_string()))?,
        "jpg" | "jpeg" => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
            .encode_image(&buffer)
            .map_err(|e| codec(e.to_string()))?,
        other => return Err(codec(format!("unsupported image extension `{other}`: use .png, .jpg or .jpeg"))),
    }
    crate::io::write_atomic(path, &bytes).map_err(|e| codec(e.to_string()))
}

/// torchvision's `make_grid`: `nrow` images per row, 2-pixel black padding.
pub fn grid(images: &[RgbImage], nrow: usize) -> RgbImage {
    let (w, h) = (images[0].width, images[0].height);
    let pad = 2;
    let cols = nrow.min(images.len()).max(1);
    let rows = images.len().div_ceil(cols);
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut pixels = vec![0u8; gw * gh * 3];
    for (i, image) in images.iter().enumerate() {
        let (x0, y0) = (pad + (i % cols) * (w + pad), pad + (i / cols) * (h + pad));
        for y in 0..h {
            let src = &image.pixels[y * w * 3..(y + 1) * w * 3];
            let at = ((y0 + y) * gw + x0) * 3;
            pixels[at..at + w * 3].copy_from_slice(src);
        }
    }
    RgbImage { width: gw, height: gh, pixels }
}

/// Same-sized images → `[N, 3, H, W]` in [-1, 1] (`x / 127.5 − 1`).
pub fn to_tensor<B: Backend>(images: &[RgbImage], device: &B::Device) -> Result<Tensor<B, 4>, ImageError> {
    let first = images.first().ok_or_else(|| ImageError::Shape("no images".into()))?;
    let (w, h) = (first.width, first.height);
    if let Some(other) = images.iter().find(|i| (i.width, i.height) != (w, h)) {
        return Err(ImageError::Shape(format!(
            "images of different sizes in one batch: {w}×{h} and {}×{}; resize them to one size first",
            other.width, other.height
        )));
    }
    let mut values = Vec::with_capacity(images.len() * 3 * w * h);
    for image in images {
        for c in 0..3 {
            values.extend(image.pixels.iter().skip(c).step_by(3).map(|&p| p as f32 / 127.5 - 1.0));
        }
    }
    let data = TensorData::new(values, [images.len(), 3, h, w]).convert::<B::FloatElem>();
    Ok(Tensor::from_data(data, device))
}

/// `[N, 3, H, W]` in [-1, 1] → images, clamped and rounded as torchvision's `save_image`.
pub fn from_tensor<B: Backend>(images: Tensor<B, 4>) -> Vec<RgbImage> {
    let [n, c, h, w] = images.dims();
    assert_eq!(c, 3, "images must have 3 channels");
    let values = images.into_data().convert::<f32>().into_vec::<f32>().expect("float data");
    (0..n)
        .map(|i| {
            let plane = |ch: usize| &values[((i * 3 + ch) * h * w)..((i * 3 + ch + 1) * h * w)];
            let (r, g, b) = (plane(0), plane(1), plane(2));
            let to_u8 = |v: f32| (((v + 1.0) * 127.5) + 0.5).clamp(0.0, 255.0) as u8;
            let pixels = (0..h * w).flat_map(|p| [to_u8(r[p]), to_u8(g[p]), to_u8(b[p])]).collect();
            RgbImage { width: w, height: h, pixels }
        })
        .collect()
}
