//! LFM's downstream tasks: what each concatenates to the noisy latent, reading its masks and segmentation maps,
//! building the condition tensor (one builder for sampling, evaluation and training: [`condition`]), and the
//! inpainting metrics ([`ids`]).
//!
//! - **Inpainting** (9 channels for a 4-channel latent): the latent of the masked image (a posterior sample) and the
//!   mask nearest-resized to the latent grid, +1 = hole, −1 = kept.
//! - **Semantic synthesis** (8 channels): the one-hot map averaged over each latent cell (LDM's `SpatialRescaler`
//!   halves it bilinearly log₂ f times, which is the mean over f×f blocks) and projected by a bias-free 1×1
//!   convolution to the latent's channels.

pub mod condition;
pub mod ids;
pub mod inpaint;
pub mod masks;
pub mod semantic;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{ImageItem, Source};

/// What a run trains the network to do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Task {
    /// Unconditional or class-conditional generation.
    #[default]
    Generate,
    /// Inpainting: masks drawn on the fly as LFM does, or picked from a folder.
    Inpaint {
        /// A folder of mask images (each the size of the training images), instead of generated masks.
        masks: Option<PathBuf>,
        /// Read folder masks as white = hole (default: black = hole, as LFM's evaluation masks).
        mask_white_is_hole: bool,
    },
    /// Semantic synthesis from segmentation maps.
    Semantic {
        /// The folder of segmentation maps, laid out as the image folder (`CelebAMask-HQ/mask/{i}.png` for
        /// `CelebA-HQ-img/{i}.jpg`).
        segmentations: PathBuf,
        /// Number of classes (19 for CelebAMask-HQ).
        classes: usize,
        /// Train the 1×1 projection with the network (LFM never does: it runs under `no_grad`, so the reference's
        /// projection stays at its random initialisation).
        train_rescaler: bool,
    },
}

impl Task {
    /// Channels the task concatenates to a latent of `latent_channels`.
    pub fn extra_channels(&self, latent_channels: usize) -> usize {
        match self {
            Self::Generate => 0,
            Self::Inpaint { .. } => latent_channels + 1,
            Self::Semantic { .. } => latent_channels,
        }
    }

    /// The task's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Inpaint { .. } => "inpaint",
            Self::Semantic { .. } => "semantic",
        }
    }
}

/// The files a task reads besides the images.
#[derive(Debug, Clone, Default)]
pub struct TaskFiles {
    /// Mask images to pick from (inpainting with a mask folder).
    pub masks: Vec<PathBuf>,
    /// The segmentation map of each image, in the images' order (semantic synthesis).
    pub segmentations: Vec<PathBuf>,
}

impl TaskFiles {
    /// Finds the files of `task` for the images of `source`, which were read from `data`.
    pub fn find(task: &Task, source: &Source, data: Option<&Path>) -> Result<Self, String> {
        let items = match source {
            Source::Images { items, .. } => items,
            Source::Latents(_) if *task == Task::Generate => return Ok(Self::default()),
            Source::Latents(_) => {
                return Err(format!(
                    "--task {} builds its condition from the images: train from --data, not --latents",
                    task.name()
                ))
            }
        };
        match task {
            Task::Generate => Ok(Self::default()),
            Task::Inpaint { masks: None, .. } => Ok(Self::default()),
            Task::Inpaint { masks: Some(dir), .. } => {
                let mut masks = Vec::new();
                crate::data::walk_images(dir, &mut masks).map_err(|e| format!("{}: {e}", dir.display()))?;
                if masks.is_empty() {
                    return Err(format!("{}: no .png/.jpg/.jpeg/.webp masks found", dir.display()));
                }
                Ok(Self { masks, segmentations: Vec::new() })
            }
            Task::Semantic { segmentations: dir, .. } => {
                let data = data.ok_or("semantic synthesis needs an image folder (--data DIR)")?;
                let segmentations = items
                    .iter()
                    .map(|item| match item {
                        ImageItem::File(path) => {
                            let relative = path.strip_prefix(data).unwrap_or(path);
                            let map = dir.join(relative).with_extension("png");
                            if map.exists() {
                                Ok(map)
                            } else {
                                Err(format!(
                                    "{} has no segmentation map: expected {} (maps mirror the image folder, as \
                                     CelebAMask-HQ's mask/{{i}}.png for CelebA-HQ-img/{{i}}.jpg)",
                                    path.display(),
                                    map.display()
                                ))
                            }
                        }
                        ImageItem::Gray { .. } => Err("semantic synthesis needs an image folder, not IDX data".into()),
                        ImageItem::Lmdb { .. } => {
                            Err("semantic synthesis needs an image folder (its maps mirror the image files), not LMDB"
                                .into())
                        }
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Self { masks: Vec::new(), segmentations })
            }
        }
    }
}

/// Reads a mask image as 1 = hole, 0 = kept (see [`crate::tasks::inpaint::read_hole`]); it must be `size × size`.
pub fn read_mask(path: &Path, size: usize, white_is_hole: bool) -> Result<Vec<f32>, TaskInputError> {
    let (w, h, hole) = crate::tasks::inpaint::read_hole(path, white_is_hole).map_err(TaskInputError::Unreadable)?;
    if (w, h) != (size, size) {
        return Err(TaskInputError::Invalid(format!(
            "the mask {} is {w}×{h}, the training images are {size}×{size}: masks must have the images' size",
            path.display()
        )));
    }
    Ok(hole)
}

/// Why a task input could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TaskInputError {
    /// The file cannot be decoded (skipped with a warning, like an unreadable image).
    #[error("{0}")]
    Unreadable(String),
    /// The file does not fit the run (stops it with this message).
    #[error("{0}")]
    Invalid(String),
}

/// Reads a segmentation map (class index per pixel in its first channel, e.g. CelebAMask-HQ's grey PNGs), resized
/// as its image is (short side to `size` by nearest neighbour, centre crop, optional flip), and checks every class
/// is below `classes`.
pub fn read_segmentation(path: &Path, size: usize, flip: bool, classes: usize) -> Result<Vec<u8>, TaskInputError> {
    let image = image::open(path).map_err(|e| TaskInputError::Unreadable(format!("{}: {e}", path.display())))?;
    let grey = image::GrayImage::from_fn(image.width(), image.height(), |x, y| {
        use image::GenericImageView;
        image::Luma([image.get_pixel(x, y).0[0]])
    });
    let values = crate::data::fit_square(grey, size, flip, image::imageops::FilterType::Nearest).into_raw();
    if let Some(&bad) = values.iter().find(|&&c| c as usize >= classes) {
        return Err(TaskInputError::Invalid(format!(
            "{} holds class {bad}, but the run has {classes} classes (0..{}): check --seg-classes",
            path.display(),
            classes - 1
        )));
    }
    Ok(values)
}
