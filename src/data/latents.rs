//! Pre-encoded training latents: one safetensors file from `lfm encode --out FILE.safetensors` (held in memory), or
//! a sharded cache folder from `lfm encode --data DATASET --out DIR` (an `index.json` and `shard-NNNNN.safetensors`
//! files), read one batch at a time so that datasets larger than memory train (ImageNet's 1.28 M posteriors at
//! 4×32×32 are 42 GB in f32).
//!
//! Each example holds the posterior `mean` and `std` (KL autoencoders: training re-samples `mean + std·ε` every
//! step, as LFM encodes on the fly) or only a `latents` sample (TAESD, or `--mean`), plus its label `y` when the
//! dataset has labels.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_safetensors, HostTensor};

/// Name of a cache folder's index.
pub const INDEX_FILE: &str = "index.json";
/// The `format` field of a cache index.
pub const CACHE_FORMAT: &str = "lfm-latent-cache";

/// What a sharded cache was (or is being) made from; a resumed `lfm encode` must match it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachePlan {
    /// The dataset (path as given).
    pub source: String,
    /// Examples in the dataset (after `--max-images`).
    pub examples_in_source: usize,
    /// Side of the square images that were encoded.
    pub image_size: usize,
    /// Dataset examples per shard (the last shard may hold fewer; skipped images make any shard smaller).
    pub shard_size: usize,
    /// The autoencoder (kind and weights file).
    pub autoencoder: String,
    /// How `latents` was drawn: `mean`, or `seed N` of the posterior sample.
    pub sample: String,
    /// Shape of one latent, `[C, h, w]`.
    pub latent_shape: Vec<usize>,
}

/// One finished shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the cache folder.
    pub file: String,
    /// Examples it holds.
    pub examples: usize,
    /// Dataset images of its range that could not be read (and are not in it).
    pub skipped: usize,
}

/// `index.json` of a sharded cache: the plan, the shards finished so far (in dataset order), and whether all are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheIndex {
    /// Always [`CACHE_FORMAT`].
    pub format: String,
    /// Layout version (1).
    pub version: u32,
    /// What the cache holds.
    pub plan: CachePlan,
    /// Finished shards, in dataset order.
    pub shards: Vec<ShardEntry>,
    /// Whether every shard of the plan is written.
    pub complete: bool,
}

impl CacheIndex {
    /// A new, empty index for `plan`.
    pub fn new(plan: CachePlan) -> Self {
        Self { format: CACHE_FORMAT.into(), version: 1, plan, shards: Vec::new(), complete: false }
    }

    /// Number of shards the plan needs.
    pub fn shard_count(&self) -> usize {
        self.plan.examples_in_source.div_ceil(self.plan.shard_size.max(1))
    }

    /// File name of shard `k`.
    pub fn shard_file(k: usize) -> String {
        format!("shard-{k:05}.safetensors")
    }

    /// Reads `dir/index.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(INDEX_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let index: Self = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not an lfm latent-cache index ({e})", path.display()))?;
        if index.format != CACHE_FORMAT || index.version != 1 {
            return Err(format!("{}: not a version-1 {CACHE_FORMAT} index", path.display()));
        }
        Ok(Some(index))
    }

    /// Writes `dir/index.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(self).expect("the index serialises");
        crate::io::write_atomic(&path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Where a tensor's rows lie in a shard file.
#[derive(Debug)]
struct RowsAt {
    /// Byte offset of row 0.
    offset: u64,
    /// Bytes per row.
    row_bytes: usize,
}

/// One shard file of a cache, opened for reads of single examples.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    file: Mutex<File>,
    examples: usize,
    mean: RowsAt,
    std: Option<RowsAt>,
}

impl Shard {
    /// Reads `row` of `at` into `out` (little-endian f32).
    fn read_row(&self, at: &RowsAt, row: usize, out: &mut Vec<f32>) -> Result<(), String> {
        let mut bytes = vec![0u8; at.row_bytes];
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::Start(at.offset + (row * at.row_bytes) as u64))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        Ok(())
    }
}

/// Parses a shard's safetensors header: the row layout of `mean` (or `latents`) and `std`, and the labels.
fn open_shard(path: &Path, examples: usize, per_example: usize) -> Result<(Shard, Option<Vec<i64>>), String> {
    let bad = |why: String| format!("{}: {why}; the cache is damaged: rerun `lfm encode` with --force", path.display());
    let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(bad("not a safetensors file (or truncated)".into()));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut end = data_start;
    let mut tensor = |name: &str, dtype: &str, row: usize| -> Result<Option<(u64, usize)>, String> {
        let Some(info) = header.get(name) else { return Ok(None) };
        let got_dtype = info["dtype"].as_str().unwrap_or("?");
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .map(|s| s.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).collect())
            .unwrap_or_default();
        let offsets: Vec<u64> =
            info["data_offsets"].as_array().map(|s| s.iter().filter_map(|d| d.as_u64()).collect()).unwrap_or_default();
        if got_dtype != dtype || shape.first() != Some(&examples) || shape.iter().product::<usize>() != examples * row {
            return Err(bad(format!(
                "`{name}` is {got_dtype} {shape:?}, expected {dtype} with {examples} rows of {row} values"
            )));
        }
        let [start, stop] = offsets[..] else { return Err(bad(format!("`{name}` has no data offsets"))) };
        end = end.max(data_start + stop);
        Ok(Some((data_start + start, stop as usize - start as usize)))
    };
    let rows = |found: Option<(u64, usize)>| {
        found.map(|(offset, bytes)| RowsAt { offset, row_bytes: bytes / examples.max(1) })
    };
    let std = rows(tensor("std", "F32", per_example)?);
    let mean = match (tensor("mean", "F32", per_example)?, std.is_some()) {
        (Some(mean), true) => rows(Some(mean)),
        _ => rows(tensor("latents", "F32", per_example)?),
    }
    .ok_or_else(|| bad("no `latents` or `mean` tensor".into()))?;
    let labels = tensor("y", "I64", 1)?;
    if end > file_len {
        return Err(bad(format!("the file is {file_len} bytes but its tensors end at byte {end} (truncated)")));
    }
    let labels = match labels {
        Some((offset, bytes)) => {
            let mut raw = vec![0u8; bytes];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|e| bad(e.to_string()))?;
            Some(raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
        }
        None => None,
    };
    let shard = Shard { path: path.to_path_buf(), file: Mutex::new(file), examples, mean, std };
    Ok((shard, labels))
}

/// Latents to train on, read a batch at a time.
#[derive(Debug)]
pub enum LatentStore {
    /// One file, in memory.
    InMemory {
        /// `[N, C, h, w]`.
        shape: Vec<usize>,
        /// `latents`, or the posterior mean.
        mean: Vec<f32>,
        /// The posterior's std, when stored with its mean.
        std: Option<Vec<f32>>,
        /// Labels `y`.
        labels: Option<Vec<i64>>,
    },
    /// A sharded cache folder, read from disk.
    Sharded {
        /// The folder.
        dir: PathBuf,
        /// `[N, C, h, w]`.
        shape: Vec<usize>,
        /// Shards in order.
        shards: Vec<Shard>,
        /// Index of each shard's first example.
        starts: Vec<usize>,
        /// Labels `y` of every example (8 bytes each, so kept in memory).
        labels: Option<Vec<i64>>,
    },
}

impl LatentStore {
    /// Opens `path`: a cache folder (with `index.json`) or a safetensors file from `lfm encode`.
    pub fn open(path: &Path) -> Result<Self, String> {
        if path.is_dir() {
            Self::open_cache(path)
        } else {
            Self::open_file(path)
        }
    }

    fn open_file(path: &Path) -> Result<Self, String> {
        let (tensors, _) = read_safetensors(path).map_err(|e| e.to_string())?;
        let mean = tensors.get("mean").or_else(|| tensors.get("latents")).ok_or_else(|| {
            format!("{}: no `latents` or `mean` tensor (write one with `lfm encode`)", path.display())
        })?;
        if mean.shape.len() != 4 {
            return Err(format!("{}: the latents must be [N, C, h, w], got {:?}", path.display(), mean.shape));
        }
        let std = tensors.get("std").filter(|_| tensors.contains_key("mean"));
        if let Some(std) = std.filter(|s| s.shape != mean.shape) {
            return Err(format!("{}: `std` is {:?} but `mean` is {:?}", path.display(), std.shape, mean.shape));
        }
        let labels = tensors.get("y").map(HostTensor::to_i64);
        if let Some(labels) = labels.as_ref().filter(|l| l.len() != mean.shape[0]) {
            return Err(format!("{}: {} labels for {} latents", path.display(), labels.len(), mean.shape[0]));
        }
        Ok(Self::InMemory { shape: mean.shape.clone(), mean: mean.to_f32(), std: std.map(HostTensor::to_f32), labels })
    }

    fn open_cache(dir: &Path) -> Result<Self, String> {
        let index = CacheIndex::read(dir)?.ok_or_else(|| {
            format!(
                "{}: a folder without {INDEX_FILE}: give a latent cache written by `lfm encode --data`",
                dir.display()
            )
        })?;
        if !index.complete {
            return Err(format!(
                "{}: the cache is incomplete ({} of {} shards): rerun the same `lfm encode` to finish it",
                dir.display(),
                index.shards.len(),
                index.shard_count()
            ));
        }
        let per_example: usize = index.plan.latent_shape.iter().product();
        let (mut shards, mut starts, mut labels, mut total) = (Vec::new(), Vec::new(), Some(Vec::new()), 0);
        for entry in &index.shards {
            let (shard, shard_labels) = open_shard(&dir.join(&entry.file), entry.examples, per_example)?;
            labels = match (labels, shard_labels) {
                (Some(mut all), Some(more)) => {
                    all.extend(more);
                    Some(all)
                }
                _ => None,
            };
            starts.push(total);
            total += shard.examples;
            shards.push(shard);
        }
        let mut shape = vec![total];
        shape.extend(&index.plan.latent_shape);
        if let Some(first) = shards.first() {
            if shards.iter().any(|s| s.std.is_some() != first.std.is_some()) {
                return Err(format!("{}: some shards hold `std` and some do not", dir.display()));
            }
        }
        Ok(Self::Sharded { dir: dir.to_path_buf(), shape, shards, starts, labels })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.shape()[0]
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[N, C, h, w]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::InMemory { shape, .. } | Self::Sharded { shape, .. } => shape,
        }
    }

    /// Labels, when stored.
    pub fn labels(&self) -> Option<&[i64]> {
        match self {
            Self::InMemory { labels, .. } | Self::Sharded { labels, .. } => labels.as_deref(),
        }
    }

    /// Whether the posterior's std is stored (then training samples `mean + std·ε`).
    pub fn has_std(&self) -> bool {
        match self {
            Self::InMemory { std, .. } => std.is_some(),
            Self::Sharded { shards, .. } => shards.first().is_some_and(|s| s.std.is_some()),
        }
    }

    /// The means (or latents) and stds of `indices`, concatenated in that order.
    pub fn gather(&self, indices: &[usize]) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        let per_example: usize = self.shape()[1..].iter().product();
        match self {
            Self::InMemory { mean, std, .. } => {
                let pick = |all: &[f32]| -> Vec<f32> {
                    indices.iter().flat_map(|&i| &all[i * per_example..(i + 1) * per_example]).copied().collect()
                };
                Ok((pick(mean), std.as_deref().map(pick)))
            }
            Self::Sharded { shards, starts, dir, .. } => {
                let mut means = Vec::with_capacity(indices.len() * per_example);
                let mut stds = self.has_std().then(|| Vec::with_capacity(indices.len() * per_example));
                for &i in indices {
                    let k = starts
                        .partition_point(|&s| s <= i)
                        .checked_sub(1)
                        .ok_or_else(|| format!("{}: example {i} is not in the cache", dir.display()))?;
                    let (shard, row) = (&shards[k], i - starts[k]);
                    if row >= shard.examples {
                        return Err(format!("{}: example {i} is not in the cache", dir.display()));
                    }
                    shard.read_row(&shard.mean, row, &mut means)?;
                    if let (Some(stds), Some(at)) = (stds.as_mut(), shard.std.as_ref()) {
                        shard.read_row(at, row, stds)?;
                    }
                }
                Ok((means, stds))
            }
        }
    }
}
