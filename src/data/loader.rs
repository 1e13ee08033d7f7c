//! The host side of training batches — example indices, decoding and transforming images (in parallel),
//! segmentation maps, cached latents with their posterior samples — prepared on a background thread a few steps
//! ahead, so that the device never waits on the CPU.
//!
//! Everything here is a function of the settings and the step number alone (see [`crate::train::batches`]), so preparing
//! ahead, in parallel or after a resume gives exactly the batches a sequential run would.

use std::sync::mpsc::{sync_channel, Receiver};

use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;

use super::{load_image, Source};
use crate::image::RgbImage;
use crate::tasks::{read_segmentation, Task, TaskFiles, TaskInputError};
use crate::train::batches::{FLIP, POSTERIOR, SHUFFLE};
use crate::train::{RunSettings, TrainError};

/// How many prepared batches may wait for the device.
pub const PREFETCH_DEPTH: usize = 2;

/// The shuffled example order of the current epoch, drawn once per epoch (not once per step: O(dataset) work).
#[derive(Debug)]
pub struct EpochOrder {
    seed: u64,
    batch_size: usize,
    len: usize,
    epoch: Option<usize>,
    order: Vec<usize>,
}

impl EpochOrder {
    /// Batches of `batch_size` from `len` examples, shuffled per epoch by a stream keyed by `seed`.
    pub fn new(seed: u64, batch_size: usize, len: usize) -> Self {
        Self { seed, batch_size, len, epoch: None, order: Vec::new() }
    }

    /// The example indices of step `step` (a function of the seed and the step alone): `len / batch_size` full
    /// batches per epoch, the remainder dropped; one batch of every example when `len < batch_size`.
    pub fn indices(&mut self, step: usize) -> Vec<usize> {
        let per_epoch = steps_per_epoch(self.len, self.batch_size);
        let (epoch, k) = (step / per_epoch, step % per_epoch);
        if self.epoch != Some(epoch) {
            self.order = (0..self.len).collect();
            self.order.shuffle(&mut crate::noise::rng(self.seed, epoch as u64));
            self.epoch = Some(epoch);
        }
        let start = k * self.batch_size;
        self.order[start..(start + self.batch_size).min(self.len)].to_vec()
    }
}

/// Steps per epoch of `len` examples in batches of `batch_size`: full batches only, at least one.
fn steps_per_epoch(len: usize, batch_size: usize) -> usize {
    (len / batch_size).max(1)
}

/// The epoch that step `step` belongs to (see [`EpochOrder::indices`]).
pub fn epoch_of(step: usize, len: usize, batch_size: usize) -> usize {
    step / steps_per_epoch(len, batch_size)
}

/// One decoded example: the image and, for semantic synthesis, its class map.
type Decoded = (RgbImage, Option<Vec<u8>>);

/// What a step's batch holds before it reaches the device.
#[derive(Debug)]
pub enum HostContent {
    /// Latents with the posterior already sampled, `[n, C, h, w]` row-major.
    Latents {
        /// The values.
        values: Vec<f32>,
        /// Number of examples.
        n: usize,
        /// Their labels.
        labels: Option<Vec<i64>>,
    },
    /// Decoded, cropped (and maybe flipped) images to encode on the device.
    Images {
        /// The readable images of the batch, in batch order.
        images: Vec<RgbImage>,
        /// Their segmentation maps (semantic synthesis only).
        maps: Vec<Vec<u8>>,
        /// Their labels.
        labels: Option<Vec<i64>>,
        /// The side of the square images.
        size: usize,
    },
    /// Every image of the batch was unreadable: the step is skipped.
    Nothing,
}

impl HostContent {
    /// The number of examples.
    pub fn len(&self) -> usize {
        match self {
            Self::Latents { n, .. } => *n,
            Self::Images { images, .. } => images.len(),
            Self::Nothing => 0,
        }
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Only the examples `rows` (a node's share of the batch); kept in place, so the whole batch (one node) costs
    /// no copy.
    pub fn rows(self, rows: std::ops::Range<usize>) -> Self {
        // Elements `rows` of `v`, `per` elements per example.
        fn keep<T>(mut v: Vec<T>, rows: &std::ops::Range<usize>, per: usize) -> Vec<T> {
            v.truncate(rows.end * per);
            v.drain(..rows.start * per);
            v
        }
        let labels = |l: Option<Vec<i64>>| l.map(|l| keep(l, &rows, 1));
        match self {
            Self::Latents { values, n, labels: l } => {
                let per = values.len().checked_div(n).unwrap_or(0);
                Self::Latents { values: keep(values, &rows, per), n: rows.len(), labels: labels(l) }
            }
            Self::Images { images, maps, labels: l, size } => Self::Images {
                maps: if maps.is_empty() { maps } else { keep(maps, &rows, 1) },
                images: keep(images, &rows, 1),
                labels: labels(l),
                size,
            },
            Self::Nothing => Self::Nothing,
        }
    }
}

/// One step's batch, prepared on the host.
#[derive(Debug)]
pub struct HostBatch {
    /// The step it belongs to.
    pub step: usize,
    /// Its content.
    pub content: HostContent,
    /// Unreadable images and maps skipped so far in the run, this batch included.
    pub unreadable: usize,
}

/// Prepares step `step`'s batch; `unreadable` counts the skipped inputs of the run so far.
pub fn prepare(
    source: &Source,
    files: &TaskFiles,
    settings: &RunSettings,
    per_sample: usize,
    step: usize,
    order: &mut EpochOrder,
    unreadable: &mut usize,
) -> Result<HostBatch, TrainError> {
    let indices = order.indices(step);
    let content = match source {
        Source::Latents(store) => {
            let (mut values, std) = store.gather(&indices).map_err(TrainError::Io)?;
            if let Some(std) = std {
                let eps = crate::noise::batch(
                    settings.seed ^ POSTERIOR,
                    (step * settings.batch_size) as u64,
                    indices.len(),
                    per_sample,
                );
                for ((v, s), e) in values.iter_mut().zip(std).zip(eps) {
                    *v += s * e;
                }
            }
            let labels = store.labels().map(|l| indices.iter().map(|&i| l[i]).collect());
            HostContent::Latents { values, n: indices.len(), labels }
        }
        Source::Images { items, labels, size } => {
            // The flips are drawn in batch order first, so decoding can run in any order.
            let mut rng_flip = crate::noise::rng(settings.seed ^ FLIP, step as u64);
            let flips: Vec<bool> = indices.iter().map(|_| settings.flip && rng_flip.random_bool(0.5)).collect();
            let classes = match &settings.task {
                Task::Semantic { classes, .. } => Some(*classes),
                _ => None,
            };
            let decoded: Vec<Result<Decoded, TaskInputError>> = indices
                .par_iter()
                .zip(flips)
                .map(|(&i, flip)| {
                    let image = load_image(&items[i], *size, flip).map_err(TaskInputError::Unreadable)?;
                    let map = classes
                        .map(|classes| read_segmentation(&files.segmentations[i], *size, flip, classes))
                        .transpose()?;
                    Ok((image, map))
                })
                .collect();
            let (mut images, mut maps, mut kept) = (Vec::new(), Vec::new(), Vec::new());
            for (&i, result) in indices.iter().zip(decoded) {
                match result {
                    Ok((image, map)) => {
                        images.push(image);
                        maps.extend(map);
                        kept.push(i);
                    }
                    Err(TaskInputError::Unreadable(e)) => {
                        *unreadable += 1;
                        tracing::warn!("skipping an unreadable image or map ({} so far): {e}", *unreadable);
                    }
                    Err(TaskInputError::Invalid(e)) => return Err(TrainError::Invalid(e)),
                }
            }
            if images.is_empty() {
                HostContent::Nothing
            } else {
                let labels = labels.as_ref().map(|l| kept.iter().map(|&i| l[i]).collect());
                HostContent::Images { images, maps, labels, size: *size }
            }
        }
    };
    Ok(HostBatch { step, content, unreadable: *unreadable })
}

/// Starts preparing the batches of steps `first..end` on a thread of `scope`, [`PREFETCH_DEPTH`] ahead of the
/// consumer. The thread stops after an error, or as soon as the receiver is dropped.
pub fn prefetch<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    source: &'env Source,
    files: &'env TaskFiles,
    settings: &'env RunSettings,
    per_sample: usize,
    (first, end): (usize, usize),
    mut unreadable: usize,
) -> Receiver<Result<HostBatch, TrainError>> {
    let (sender, receiver) = sync_channel(PREFETCH_DEPTH);
    scope.spawn(move || {
        let mut order = EpochOrder::new(settings.seed ^ SHUFFLE, settings.batch_size, source.len());
        for step in first..end {
            let batch = prepare(source, files, settings, per_sample, step, &mut order, &mut unreadable);
            let failed = batch.is_err();
            if sender.send(batch).is_err() || failed {
                break;
            }
        }
    });
    receiver
}
