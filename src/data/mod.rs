//! Datasets: an image folder (recursive; PNG/JPEG/WebP; optional class sub-folders), an LMDB dataset (NVAE's
//! raw RGB or LSUN's encoded images, see [`lmdb`]) or an IDX file (MNIST, Fashion-MNIST; gzip or not, labels
//! from its `labels-idx1` twin) encoded on the fly, or a latent file written by `lfm encode` (LFM's posterior is
//! re-sampled every step when it holds `mean` and `std`). Training, FID references and the latent cache all read
//! them through [`Source`] and [`ImageItem`]; [`loader`] prepares training batches from them ahead of the device.

pub mod latents;
pub mod lmdb;
pub mod loader;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use latents::LatentStore;
use lmdb::{is_lmdb, LmdbImages};

use crate::image::RgbImage;

/// Where training examples come from.
#[derive(Debug)]
pub enum Source {
    /// Images to encode every step.
    Images {
        /// The images.
        items: Vec<ImageItem>,
        /// Class index of each image (sorted sub-folder names, or the IDX labels), when labelled.
        labels: Option<Vec<i64>>,
        /// Side of the square crops.
        size: usize,
    },
    /// Pre-encoded latents (a file or a sharded cache).
    Latents(LatentStore),
}

/// One image example: a file or an LMDB entry decoded when needed, or pixels already in memory.
#[derive(Debug, Clone)]
pub enum ImageItem {
    /// A PNG/JPEG/WebP file.
    File(PathBuf),
    /// An entry of an LMDB dataset.
    Lmdb {
        /// The open dataset (shared by its entries).
        db: Arc<LmdbImages>,
        /// The entry's key.
        key: Box<[u8]>,
    },
    /// An 8-bit grey image (IDX datasets).
    Gray {
        /// Width.
        width: usize,
        /// Height.
        height: usize,
        /// Row-major pixels.
        pixels: Vec<u8>,
    },
}

impl Source {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Self::Images { items, .. } => items.len(),
            Self::Latents(store) => store.len(),
        }
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The labels, if the data has any.
    pub fn labels(&self) -> Option<&[i64]> {
        match self {
            Self::Images { labels, .. } => labels.as_deref(),
            Self::Latents(store) => store.labels(),
        }
    }
}

fn is_image(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "png" | "jpg" | "jpeg" | "webp")
}

/// Every image file under `dir`, recursively, in sorted order.
pub fn walk_images(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk_images(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Every image under `dir` (sorted, recursive); with `class_folders`, labelled by their top-level sub-folder.
pub fn image_folder(dir: &Path, size: usize, class_folders: bool) -> Result<Source, String> {
    let mut files = Vec::new();
    walk_images(dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    if files.is_empty() {
        return Err(format!("{}: no .png/.jpg/.jpeg/.webp images found (searched recursively)", dir.display()));
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
    Ok(Source::Images { items: files.into_iter().map(ImageItem::File).collect(), labels, size })
}

/// An LMDB dataset (NVAE or LSUN layout), unlabelled as in LFM; `max` keeps the first examples only.
pub fn lmdb_images(path: &Path, size: usize, max: Option<usize>) -> Result<Source, String> {
    let db = LmdbImages::open(path)?;
    let keys = db.keys(max)?;
    if keys.is_empty() {
        return Err(format!("{}: the LMDB dataset has no entries", path.display()));
    }
    let items = keys.into_iter().map(|key| ImageItem::Lmdb { db: db.clone(), key }).collect();
    Ok(Source::Images { items, labels: None, size })
}

/// The images of a dataset, whatever its kind: an IDX file, an LMDB environment, or a folder (with
/// `class_folders`, labelled by sub-folder); `max` keeps the first `max` examples (LFM trains LSUN on its first
/// 120,000).
pub fn open_images(path: &Path, size: usize, class_folders: bool, max: Option<usize>) -> Result<Source, String> {
    if !path.exists() {
        return Err(format!("{}: no such file or folder", path.display()));
    }
    let (lmdb, idx) = (is_lmdb(path), is_idx(path));
    if class_folders && (lmdb || idx) {
        return Err(format!("{}: --class-folders applies to image folders only", path.display()));
    }
    let mut source = if idx {
        idx_images(path, size)?
    } else if lmdb {
        return lmdb_images(path, size, max);
    } else {
        image_folder(path, size, class_folders)?
    };
    if let (Some(max), Source::Images { items, labels, .. }) = (max, &mut source) {
        items.truncate(max);
        if let Some(labels) = labels {
            labels.truncate(max);
        }
    }
    Ok(source)
}

/// Reads an IDX file of unsigned bytes (`0 0 0x08 ndim`, big-endian sizes), gzip-compressed or not: its shape and
/// values.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: not a readable gzip file ({e}); it may be truncated", path.display()))?;
        out
    } else {
        raw
    };
    let bad = |why: &str| format!("{}: not an IDX file of bytes ({why})", path.display());
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("no IDX magic number"));
    }
    if bytes[2] != 0x08 {
        return Err(bad(&format!("element type 0x{:02x}; only unsigned bytes (0x08) are supported", bytes[2])));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    let dims: Vec<usize> = bytes
        .get(4..header)
        .ok_or_else(|| bad("truncated header"))?
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let count: usize = dims.iter().product();
    let data = bytes.get(header..header + count).ok_or_else(|| bad("truncated data"))?.to_vec();
    Ok((dims, data))
}

/// An IDX image file (`[N, H, W]` grey bytes, e.g. Fashion-MNIST's `train-images-idx3-ubyte.gz`), labelled by the
/// `…labels-idx1-ubyte…` file beside it when there is one.
pub fn idx_images(path: &Path, size: usize) -> Result<Source, String> {
    let (dims, data) = read_idx(path)?;
    let [n, h, w] = dims[..] else {
        return Err(format!("{}: IDX images must be [N, H, W], got {dims:?}", path.display()));
    };
    let items = data
        .chunks_exact(h * w)
        .map(|pixels| ImageItem::Gray { width: w, height: h, pixels: pixels.to_vec() })
        .collect::<Vec<_>>();
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
    let label_path = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
    let labels = if label_path != path && label_path.exists() {
        let (label_dims, values) = read_idx(&label_path)?;
        if label_dims != [n] {
            return Err(format!("{}: {label_dims:?} labels for {n} images", label_path.display()));
        }
        Some(values.into_iter().map(i64::from).collect())
    } else {
        None
    };
    Ok(Source::Images { items, labels, size })
}

/// Whether `path` is an IDX file (by its name, as the MNIST family names them).
pub fn is_idx(path: &Path) -> bool {
    path.is_file() && path.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.contains("-idx"))
}

/// An example as 8-bit RGB at its own size (grey pixels repeated over the three channels).
pub fn decode_image(item: &ImageItem) -> Result<image::RgbImage, String> {
    Ok(match item {
        ImageItem::File(path) => image::open(path).map_err(|e| format!("{}: {e}", path.display()))?.to_rgb8(),
        ImageItem::Lmdb { db, key } => db.image(key)?,
        ImageItem::Gray { width, height, pixels } => {
            let rgb = pixels.iter().flat_map(|&p| [p, p, p]).collect();
            image::RgbImage::from_raw(*width as u32, *height as u32, rgb).expect("pixels fit the size")
        }
    })
}

/// An example, transformed as LFM does: resize the short side to `size` (bicubic), centre-crop `size × size`,
/// optional horizontal flip.
pub fn load_image(item: &ImageItem, size: usize, flip: bool) -> Result<RgbImage, String> {
    let image = decode_image(item)?;
    let crop = fit_square(image, size, flip, image::imageops::FilterType::CatmullRom);
    Ok(RgbImage { width: size, height: size, pixels: crop.into_raw() })
}

/// The readable images among `items[range]`, cut to `size` (no flip) and decoded on every core.
pub struct ReadableImages {
    /// The images, in dataset order.
    pub images: Vec<RgbImage>,
    /// The dataset index of each image (labels and per-image noise are keyed by it).
    pub indices: Vec<usize>,
    /// How many of the range could not be read (each one warned about).
    pub skipped: usize,
}

/// Decodes `items[range]` in parallel; unreadable images are skipped with a warning and counted, never fatal.
pub fn read_images(items: &[ImageItem], range: std::ops::Range<usize>, size: usize) -> ReadableImages {
    use rayon::prelude::*;
    let loaded: Vec<Result<RgbImage, String>> =
        range.clone().into_par_iter().map(|i| load_image(&items[i], size, false)).collect();
    let mut out = ReadableImages { images: Vec::new(), indices: Vec::new(), skipped: 0 };
    for (i, result) in range.zip(loaded) {
        match result {
            Ok(image) => {
                out.images.push(image);
                out.indices.push(i);
            }
            Err(e) => {
                out.skipped += 1;
                tracing::warn!("skipping an unreadable image: {e}");
            }
        }
    }
    out
}

/// Resizes the short side to `size` with `filter`, centre-crops `size × size`, optionally flips horizontally.
pub fn fit_square<P: image::Pixel + 'static>(
    image: image::ImageBuffer<P, Vec<P::Subpixel>>,
    size: usize,
    flip: bool,
    filter: image::imageops::FilterType,
) -> image::ImageBuffer<P, Vec<P::Subpixel>> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) =
        (((w as f64 * scale).round() as u32).max(size as u32), ((h as f64 * scale).round() as u32).max(size as u32));
    let resized =
        if (nw, nh) == (w as u32, h as u32) { image } else { image::imageops::resize(&image, nw, nh, filter) };
    let (x0, y0) = ((nw as usize - size) / 2, (nh as usize - size) / 2);
    let crop = image::imageops::crop_imm(&resized, x0 as u32, y0 as u32, size as u32, size as u32).to_image();
    if flip {
        image::imageops::flip_horizontal(&crop)
    } else {
        crop
    }
}
