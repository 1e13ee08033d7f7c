//! A step's batch on the device: the host's prepared examples ([`crate::data::loader`]) encoded by the autoencoder
//! when they are images, with the task's condition, noise, times and label dropout, split into micro-batches per
//! device for [`super::Trainer::step`].
//!
//! Every random choice is drawn from a stream keyed by the seed, the step and the example's place in the whole
//! batch, so a resumed run, a run on several devices and every node of a multi-node run make the same choices.

use std::ops::Range;

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::Rng;

use super::settings::RunSettings;
use super::{Batch, DeviceShards, TrainError};
use crate::autoencoder::{AnyAutoencoder, Autoencoder};
use crate::data::loader::HostContent;
use crate::models::ModelConfig;
use crate::tasks::masks::{self, MaskParams};
use crate::tasks::semantic::class_shares;
use crate::tasks::{read_mask, Task, TaskFiles};

/// Stream keys, so that the random choices of different kinds never share values.
pub(crate) const SHUFFLE: u64 = 0x5348_5546;
pub(crate) const FLIP: u64 = 0x464C_4950;
const NOISE: u64 = 0x4E4F_4953;
const TIME: u64 = 0x5449_4D45;
pub(crate) const POSTERIOR: u64 = 0x504F_5354;
const DROP: u64 = 0x4452_4F50;
const MASK: u64 = 0x4D41_534B;
const CONDITION: u64 = 0x434F_4E44;
pub(crate) const PREVIEW: u64 = 0x5052_4556;

/// DiT's label dropout for step `step` of a run seeded `seed`: which of the batch's `total` examples train with the
/// null class (each with probability `p`, the reference's `token_drop`). Keyed by (seed, step) and the example's
/// place in the whole batch, so a resumed run and every node of a multi-node run draw the same choices.
pub fn label_dropout(seed: u64, step: usize, total: usize, p: f64) -> Vec<bool> {
    let mut rng = crate::noise::rng(seed ^ DROP, step as u64);
    (0..total).map(|_| rng.random_bool(p.clamp(0.0, 1.0))).collect()
}

/// Builds each step's device batches for one run.
pub struct BatchMaker<'a, B: Backend> {
    settings: &'a RunSettings,
    files: &'a TaskFiles,
    autoencoder: Option<&'a AnyAutoencoder<B>>,
    /// Latent channels and side.
    latent: (usize, usize),
    /// DiT's label dropout: its probability and the null class.
    null_label: Option<(f64, i64)>,
    /// The devices that share each step (the first is the network's).
    devices: Vec<B::Device>,
}

impl<'a, B: Backend> BatchMaker<'a, B> {
    /// For `config`'s network trained with `settings` on `devices`.
    pub fn new(
        config: &ModelConfig,
        settings: &'a RunSettings,
        files: &'a TaskFiles,
        autoencoder: Option<&'a AnyAutoencoder<B>>,
        devices: Vec<B::Device>,
    ) -> Self {
        let null_label = match config {
            ModelConfig::Dit(d) if d.label_dropout > 0.0 => Some((d.label_dropout, d.num_classes as i64)),
            _ => None,
        };
        Self { settings, files, autoencoder, latent: (config.channels().1, config.latent_size()), null_label, devices }
    }

    /// Step `step`'s micro-batches for this node, which holds rows `rows` (`content`) of the step's `total`
    /// examples: each device takes `grad_accum` consecutive micro-batches, already on it.
    pub fn shards(
        &self,
        step: usize,
        content: HostContent,
        total: usize,
        rows: Range<usize>,
    ) -> Result<DeviceShards<Autodiff<B>>, TrainError> {
        let settings = self.settings;
        let device = &self.devices[0];
        let (c, side) = self.latent;
        let first = step * settings.batch_size + rows.start;
        let mut rng_time = crate::noise::rng(settings.seed ^ TIME, step as u64);
        let times: Vec<f32> = (0..total).map(|_| settings.time_sampling.draw(&mut rng_time)).collect();
        let dropped = match self.null_label {
            Some((p, _)) => label_dropout(settings.seed, step, total, p),
            None => vec![false; total],
        };
        let (z0, labels, condition, segmentation) = self.encode(content, first)?;
        let n = z0.dims()[0];
        let mut batches = Vec::new();
        if n > 0 {
            let z1 = crate::sample::noise::<B>(settings.seed ^ NOISE, first, n, [c, side, side], device);
            let t = TensorData::new(times[rows.clone()].to_vec(), [n]).convert::<B::FloatElem>();
            let t = Tensor::<B, 1>::from_data(t, device);
            let y = labels.map(|mut y| {
                if let Some((_, null)) = self.null_label {
                    for (label, &drop) in y.iter_mut().zip(&dropped[rows.clone()]) {
                        if drop {
                            *label = null;
                        }
                    }
                }
                Tensor::<Autodiff<B>, 1, Int>::from_data(TensorData::new(y, [n]), device)
            });
            let micro = n.div_ceil(settings.grad_accum.max(1) * self.devices.len());
            batches = (0..n)
                .step_by(micro)
                .map(|i| {
                    let len = micro.min(n - i);
                    let part = |x: &Tensor<B, 4>| Tensor::from_inner(x.clone().narrow(0, i, len));
                    Batch {
                        z0: part(&z0),
                        z1: part(&z1),
                        t: Tensor::from_inner(t.clone().narrow(0, i, len)),
                        y: y.clone().map(|y| y.narrow(0, i, len)),
                        condition: condition.as_ref().map(part),
                        segmentation: segmentation.as_ref().map(part),
                    }
                })
                .collect();
        }
        let mut spread = batches.into_iter();
        let several = self.devices.len() > 1;
        Ok(self
            .devices
            .iter()
            .map(|d| {
                let mine = spread.by_ref().take(settings.grad_accum.max(1));
                (d.clone(), if several { mine.map(|b| b.to_device(d)).collect() } else { mine.collect() })
            })
            .collect())
    }

    /// The data latents `z0` of the node's rows, their labels, and the task's inputs (inpainting's condition,
    /// semantic synthesis's class shares); images are encoded with posterior samples keyed by their place.
    #[allow(clippy::type_complexity)]
    fn encode(
        &self,
        content: HostContent,
        first: usize,
    ) -> Result<(Tensor<B, 4>, Option<Vec<i64>>, Option<Tensor<B, 4>>, Option<Tensor<B, 4>>), TrainError> {
        let settings = self.settings;
        let device = &self.devices[0];
        let (c, side) = self.latent;
        Ok(match content {
            HostContent::Nothing => (Tensor::empty([0, c, side, side], device), None, None, None),
            HostContent::Latents { values, n, labels } => {
                let data = TensorData::new(values, [n, c, side, side]).convert::<B::FloatElem>();
                (Tensor::from_data(data, device), labels, None, None)
            }
            HostContent::Images { images, maps, labels, size } => {
                let ae =
                    self.autoencoder.ok_or_else(|| TrainError::Invalid("image data needs an autoencoder".into()))?;
                let n = images.len();
                let x =
                    crate::image::to_tensor::<B>(&images, device).map_err(|e| TrainError::Invalid(e.to_string()))?;
                let f = ae.factor();
                let latent = [c, size / f, size / f];
                let eps = crate::sample::noise::<B>(settings.seed ^ POSTERIOR, first, n, latent, device);
                match &settings.task {
                    Task::Generate => (ae.encode(x, Some(eps)), labels, None, None),
                    Task::Inpaint { mask_white_is_hole, .. } => {
                        let holes = (0..n)
                            .map(|j| self.inpainting_hole(size, first + j, *mask_white_is_hole))
                            .collect::<Result<Vec<_>, _>>()?
                            .concat();
                        let hole = crate::tasks::inpaint::hole_tensor::<B>(holes, n, (size, size), device);
                        // As LFM's dataset: the image and the masked image, both encoded with posterior samples (in
                        // one pass), then the mask on the latent grid.
                        let masked = crate::tasks::inpaint::masked_images(x.clone(), hole.clone());
                        let eps_masked = crate::sample::noise::<B>(settings.seed ^ CONDITION, first, n, latent, device);
                        let z = ae.encode(Tensor::cat(vec![x, masked], 0), Some(Tensor::cat(vec![eps, eps_masked], 0)));
                        let condition = crate::tasks::inpaint::condition(z.clone().narrow(0, n, n), hole, f);
                        (z.narrow(0, 0, n), labels, Some(condition), None)
                    }
                    Task::Semantic { classes, .. } => {
                        let shares =
                            class_shares::<B>(&maps, size, f, *classes, device).map_err(TrainError::Invalid)?;
                        (ae.encode(x, Some(eps)), labels, None, Some(shares))
                    }
                }
            }
        })
    }

    /// The hole (1 = generate) of inpainting example `index`: a mask drawn as LFM's training draws them, or one
    /// picked from the mask folder.
    fn inpainting_hole(&self, size: usize, index: usize, white_is_hole: bool) -> Result<Vec<f32>, TrainError> {
        let (seed, folder) = (self.settings.seed, &self.files.masks);
        if folder.is_empty() {
            let mut rng = crate::noise::rng(seed ^ MASK, index as u64);
            return Ok(masks::generate(&mut rng, &MaskParams::default(), size, size).hole);
        }
        let pick = crate::noise::uniform_index(seed ^ MASK, index as u64, folder.len());
        read_mask(&folder[pick], size, white_is_hole).map_err(|e| TrainError::Invalid(e.to_string()))
    }
}
