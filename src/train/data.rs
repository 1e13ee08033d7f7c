//! Training data: an image folder (recursive; PNG/JPEG; optional class sub-folders) encoded on the fly, or a
//! latent file written by `lfm encode` (LFM's posterior is re-sampled every step when it holds `mean` and `std`).

use std::path::{Path, PathBuf};

use crate::checkpoint::{read_safetensors, HostTensor};
use crate::image::RgbImage;

/// Where training examples come from.
#[derive(Debug)]
pub enum Source {
    /// Images to encode every step.
    Images {
        /// The files.
        files: Vec<PathBuf>,
        /// Class index of each file (sorted sub-folder names), when labelled.
        labels: Option<Vec<i64>>,
        /// Side of the square crops.
        size: usize,
    },
    /// Pre-encoded latents.
    Latents {
        /// `latents` (or the posterior `mean`) `[N, C, h, w]`.
        mean: HostTensor,
        /// The posterior's `std`, if stored: then each step samples `mean + std·ε`.
        std: Option<HostTensor>,
        /// Labels `y`, if stored.
        labels: Option<Vec<i64>>,
    },
}

impl Source {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Self::Images { files, .. } => files.len(),
            Self::Latents { mean, .. } => mean.shape[0],
        }
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The labels, if the data has any.
    pub fn labels(&self) -> Option<&[i64]> {
        match self {
            Self::Images { labels, .. } | Self::Latents { labels, .. } => labels.as_deref(),
        }
    }
}

fn is_image(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "png" | "jpg" | "jpeg")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Every image under `dir` (sorted, recursive); with `class_folders`, labelled by their top-level sub-folder.
pub fn image_folder(dir: &Path, size: usize, class_folders: bool) -> Result<Source, String> {
    let mut files = Vec::new();
    walk(dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    if files.is_empty() {
        return Err(format!("{}: no .png/.jpg/.jpeg images found (searched recursively)", dir.display()));
    }
    let labels = if class_folders {
        let class_of = |p: &PathBuf| {
            p.strip_prefix(dir).ok().and_then(|r| r.components().next()).map(|c| c.as_os_str().to_owned())
        };
        let mut classes: Vec<_> = files.iter().filter_map(class_of).collect();
        classes.sort();
        classes.dedup();
        let labels = files
            .iter()
            .map(|f| class_of(f).and_then(|c| classes.iter().position(|k| *k == c)).map(|i| i as i64))
            .collect::<Option<Vec<_>>>()
            .ok_or("with --class-folders every image must sit in a class sub-folder")?;
        Some(labels)
    } else {
        None
    };
    Ok(Source::Images { files, labels, size })
}

/// Latents written by `lfm encode` (`latents`, or `mean` + `std`, and optional `y`).
pub fn latent_file(path: &Path) -> Result<Source, String> {
    let (tensors, _) = read_safetensors(path).map_err(|e| e.to_string())?;
    let mean = tensors
        .get("mean")
        .or_else(|| tensors.get("latents"))
        .ok_or_else(|| format!("{}: no `latents` or `mean` tensor (write one with `lfm encode`)", path.display()))?
        .clone();
    if mean.shape.len() != 4 {
        return Err(format!("{}: the latents must be [N, C, h, w], got {:?}", path.display(), mean.shape));
    }
    let std = tensors.get("std").filter(|_| tensors.contains_key("mean")).cloned();
    Ok(Source::Latents { mean, std, labels: tensors.get("y").map(HostTensor::to_i64) })
}

/// LFM's image transform: resize the short side to `size` (bicubic), centre-crop `size × size`, optional
/// horizontal flip.
pub fn load_image(path: &Path, size: usize, flip: bool) -> Result<RgbImage, String> {
    let image = image::open(path).map_err(|e| format!("{}: {e}", path.display()))?.to_rgb8();
    let (w, h) = (image.width() as usize, image.height() as usize);
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) =
        (((w as f64 * scale).round() as u32).max(size as u32), ((h as f64 * scale).round() as u32).max(size as u32));
    let resized = if (nw, nh) == (w as u32, h as u32) {
        image
    } else {
        image::imageops::resize(&image, nw, nh, image::imageops::FilterType::CatmullRom)
    };
    let (x0, y0) = ((nw as usize - size) / 2, (nh as usize - size) / 2);
    let mut crop = image::imageops::crop_imm(&resized, x0 as u32, y0 as u32, size as u32, size as u32).to_image();
    if flip {
        crop = image::imageops::flip_horizontal(&crop);
    }
    Ok(RgbImage { width: size, height: size, pixels: crop.into_raw() })
}
