//! From images (a folder's files, a dataset's examples, or images in memory) to FID statistics: pytorch-fid's file
//! listing, its [0, 1] scaling, the Inception features batch by batch, and the f64 accumulation — images are never
//! all kept in memory, and they are decoded on a second thread while the network runs.

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::fid::{Accumulator, FidError, Statistics};
use super::inception::{FidInception, InceptionError, FEATURE_DIM};
use crate::data::lmdb::is_lmdb;
use crate::data::{decode_image, is_idx, open_images, ImageItem, Source};
use crate::image::{ImageError, RgbImage};

/// pytorch-fid's `IMAGE_EXTENSIONS` that this build can decode.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Why features could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The path names no file or folder.
    #[error("{0}: no such file or folder")]
    Missing(PathBuf),
    /// The folder could not be listed or holds no images.
    #[error("{path}: {reason}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image could not be decoded.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A dataset could not be read, or one of its images decoded.
    #[error("{0}")]
    Dataset(String),
    /// The network failed.
    #[error(transparent)]
    Inception(#[from] InceptionError),
    /// The statistics failed.
    #[error(transparent)]
    Statistics(#[from] FidError),
}

/// The images directly inside `dir` (not in subfolders, as pytorch-fid lists them), sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, FeatureError> {
    let folder = |reason: String| FeatureError::Folder { path: dir.to_path_buf(), reason };
    let entries = std::fs::read_dir(dir).map_err(|e| folder(format!("cannot list the folder ({e})")))?;
    let mut files = Vec::new();
    let mut subfolders = 0usize;
    for entry in entries {
        let path = entry.map_err(|e| folder(e.to_string()))?.path();
        if path.is_dir() {
            subfolders += 1;
        }
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if path.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        let hint = if subfolders > 0 { "; images in subfolders are not read (as pytorch-fid)" } else { "" };
        return Err(folder(format!("no .png/.jpg/.jpeg images in the folder{hint}")));
    }
    Ok(files)
}

/// What an FID input names: images to score, or statistics computed before.
#[derive(Debug)]
pub enum FidInput {
    /// Images, in order: a folder's files (as pytorch-fid lists them, see [`image_files`]) or a dataset's examples
    /// (an IDX file such as Fashion-MNIST's `t10k-images-idx3-ubyte.gz`, an LMDB dataset), each at its own size.
    Images(Vec<ImageItem>),
    /// A statistics file (pytorch-fid's `.npz`, LFM's `.npy`).
    Statistics(PathBuf),
}

impl FidInput {
    /// Classifies `path`: an LMDB dataset or an IDX file, a folder of images, else a statistics file. `max` keeps
    /// the first images only.
    pub fn open(path: &Path, max: Option<usize>) -> Result<Self, FeatureError> {
        if !path.exists() {
            return Err(FeatureError::Missing(path.to_path_buf()));
        }
        let mut items = if is_lmdb(path) || is_idx(path) {
            match open_images(path, 0, false, max).map_err(FeatureError::Dataset)? {
                Source::Images { items, .. } => items,
                Source::Latents(_) => unreachable!("open_images reads images"),
            }
        } else if path.is_dir() {
            image_files(path)?.into_iter().map(ImageItem::File).collect()
        } else {
            return Ok(Self::Statistics(path.to_path_buf()));
        };
        if let Some(max) = max {
            items.truncate(max);
        }
        Ok(Self::Images(items))
    }
}

/// One image to score, 8-bit RGB at its own size.
fn read_item(item: &ImageItem) -> Result<RgbImage, FeatureError> {
    let image = decode_image(item).map_err(FeatureError::Dataset)?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    Ok(RgbImage { width, height, pixels: image.into_raw() })
}

/// 8-bit images of one size → `[N, 3, H, W]` with values `x / 255` (torchvision's `ToTensor`).
pub fn unit_tensor<B: Backend>(images: &[RgbImage], device: &B::Device) -> Tensor<B, 4> {
    let (w, h) = (images[0].width, images[0].height);
    let mut values = Vec::with_capacity(images.len() * 3 * w * h);
    for image in images {
        for c in 0..3 {
            values.extend(image.pixels.iter().skip(c).step_by(3).map(|&p| p as f32 / 255.0));
        }
    }
    Tensor::from_data(TensorData::new(values, [images.len(), 3, h, w]).convert::<B::FloatElem>(), device)
}

/// Images per Inception forward pass on GPU backends. wgpu caps a storage buffer at 128 MiB by default (lavapipe
/// enforces it: 50 images at once failed allocating the 142 MB output of the first convolution, inside Burn, as a
/// panic); 4 images keep every activation and convolution buffer of the network below 100 MB.
pub const GPU_IMAGES_PER_PASS: usize = 4;

/// The FID network on a device, turning images into accumulated statistics.
pub struct FeatureExtractor<B: Backend> {
    model: FidInception<B>,
    device: B::Device,
    /// Threads a CPU pass is split over (see [`FeatureExtractor::features`]).
    cpu_threads: usize,
}

impl<B: Backend> FeatureExtractor<B> {
    /// Loads the Inception weights (see [`FidInception::load`]).
    pub fn load(weights: &Path, device: &B::Device) -> Result<Self, InceptionError> {
        Ok(Self::new(FidInception::load(weights, device)?, device))
    }

    /// Wraps an already built network.
    pub fn new(model: FidInception<B>, device: &B::Device) -> Self {
        let cpu_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { model, device: device.clone(), cpu_threads }
    }

    /// Splits each CPU pass over `threads` threads instead of one per core (1: one pass on the calling thread, as
    /// the GPU backends run). No effect on GPU backends.
    pub fn with_cpu_threads(mut self, threads: usize) -> Self {
        self.cpu_threads = threads.max(1);
        self
    }

    /// pool3 features `[N · 2048]` (row-major) of 8-bit images; runs of equal size go through together, at most
    /// [`GPU_IMAGES_PER_PASS`] at a time on GPU backends. On the CPU a run is split over the cores, one part per
    /// thread: lfm's CPU convolutions and pools ([`crate::nn::cpu`]) use every core, but the rest of Burn's ndarray
    /// element-wise work (batch-norm folding, ReLU, concatenation) runs on one.
    pub fn features(&self, images: &[RgbImage]) -> Result<Vec<f32>, InceptionError> {
        let cpu = crate::nn::is_ndarray::<B>();
        let per_pass = if cpu { usize::MAX } else { GPU_IMAGES_PER_PASS };
        let threads = if cpu { self.cpu_threads } else { 1 };
        let mut out = Vec::with_capacity(images.len() * FEATURE_DIM);
        let mut start = 0;
        while start < images.len() {
            let size = (images[start].width, images[start].height);
            let run = images[start..].iter().take_while(|i| (i.width, i.height) == size).count();
            let end = start + run.min(per_pass);
            let pass = &images[start..end];
            let parts = crate::nn::cpu::in_parts(pass.len(), threads, |range| self.features_of_one_size(&pass[range]));
            for part in parts {
                out.extend(part?);
            }
            start = end;
        }
        Ok(out)
    }

    /// pool3 features of images of one size, in one forward pass.
    fn features_of_one_size(&self, images: &[RgbImage]) -> Result<Vec<f32>, InceptionError> {
        let f = self.model.features(unit_tensor::<B>(images, &self.device))?;
        Ok(f.into_data().convert::<f32>().into_vec::<f32>().expect("float features"))
    }

    /// Adds the features of 8-bit images to `acc`.
    pub fn accumulate(&self, images: &[RgbImage], acc: &mut Accumulator) -> Result<(), FeatureError> {
        let features = self.features(images)?;
        acc.add(&features)?;
        Ok(())
    }

    /// Statistics of images (files or dataset examples), `batch_size` at a time; `on_batch` is told how many images
    /// each batch held (progress). Decoding runs one batch ahead on another thread.
    pub fn statistics_of_items(
        &self,
        items: &[ImageItem],
        batch_size: usize,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Statistics, FeatureError> {
        let batch_size = batch_size.max(1);
        let mut acc = Accumulator::new(FEATURE_DIM);
        std::thread::scope(|scope| -> Result<(), FeatureError> {
            let (send, receive) = std::sync::mpsc::sync_channel::<Result<Vec<RgbImage>, FeatureError>>(1);
            scope.spawn(move || {
                for chunk in items.chunks(batch_size) {
                    let batch = chunk.iter().map(read_item).collect::<Result<Vec<_>, _>>();
                    let failed = batch.is_err();
                    if send.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            for batch in receive {
                let batch = batch?;
                self.accumulate(&batch, &mut acc)?;
                on_batch(batch.len());
            }
            Ok(())
        })?;
        Ok(acc.finish()?)
    }
}
