//! The sampling pipeline as a library API: a [`Plan`] says what to sample (the network, the solver, guidance,
//! batching, the noise and labels), [`Conditions`] what every sample is conditioned on, and [`Sink`]s receive each
//! solved batch — its latents, its decoded images (composited with the originals when inpainting) — to write image
//! files ([`ImageFiles`]), collect a grid ([`ImageGrid`]) or latents ([`Latents`]), or score FID
//! ([`FidScore`], [`Features`]). `lfm sample`, `lfm eval` and training previews are this pipeline plus their
//! arguments and reports.
//!
//! ```no_run
//! # use lfm::sample::{pipeline::ImageGrid, Conditions, Guidance, Plan};
//! # fn demo<B: burn::tensor::backend::Backend>(model: &lfm::models::VelocityModel<B>,
//! #     autoencoder: &lfm::autoencoder::AnyAutoencoder<B>) -> Result<(), lfm::sample::SampleError> {
//! let plan = Plan { autoencoder: Some(autoencoder), guidance: Some(Guidance::scale(4.0)), ..Plan::new(model, 16) };
//! let mut grid = ImageGrid::default();
//! let summary = lfm::sample::run(&plan, &Conditions::None, &mut [&mut grid], &mut |_| {})?;
//! let image = grid.grid(4);
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{labels, noise, sample_batch, BatchInput, ClassChoice, Guidance, Summary};
use crate::autoencoder::{AnyAutoencoder, Autoencoder};
use crate::checkpoint::HostTensor;
use crate::image::{write_rgb, ImageError, RgbImage};
use crate::metrics::features::{FeatureError, FeatureExtractor};
use crate::metrics::fid::{Accumulator, FidError, Statistics};
use crate::metrics::inception::FEATURE_DIM;
use crate::models::VelocityModel;
use crate::solver::{SolveOptions, SolverError};
use crate::tasks::condition::{
    check_condition_channels, read_inpaint, ConditionBuilder, InpaintInput, SegmentationMap,
};
use crate::tasks::inpaint::composite;
use crate::tasks::{read_segmentation, TaskInputError};

/// Noise (and labels) given by the caller instead of drawn from the seed.
#[derive(Debug, Clone)]
pub struct GivenNoise {
    /// `x1`, `[N, C, h, w]` for the plan's `N` samples.
    pub x1: HostTensor,
    /// One label per sample (class-conditional networks); otherwise drawn as the plan's `classes` says.
    pub labels: Option<Vec<i64>>,
}

/// What to sample.
pub struct Plan<'a, B: Backend> {
    /// The velocity network.
    pub model: &'a VelocityModel<B>,
    /// The autoencoder that decodes the latents (sinks then get images); `None` keeps latents only.
    pub autoencoder: Option<&'a AnyAutoencoder<B>>,
    /// The ODE solver and its settings.
    pub solve: SolveOptions,
    /// Classifier-free guidance (applied above scale 1, as LFM does, to samples with labels).
    pub guidance: Option<Guidance>,
    /// Number of samples.
    pub samples: usize,
    /// Samples per ODE solve (dopri5's error norm runs over the whole batch, as in LFM).
    pub batch_size: usize,
    /// Images per decoder pass.
    pub decode_batch: usize,
    /// Sample `i` of a seed gets the same noise (and random label) whatever the batch size.
    pub seed: u64,
    /// How labels are chosen for a class-conditional network; `None` gives it no labels.
    pub classes: Option<ClassChoice>,
    /// Noise to start from instead of the seed's.
    pub noise: Option<&'a GivenNoise>,
}

impl<'a, B: Backend> Plan<'a, B> {
    /// `samples` latents from `model` with dopri5 at torchdiffeq's defaults, one batch, seed 42, random classes,
    /// no guidance and no decoding: set the other fields with struct-update syntax.
    pub fn new(model: &'a VelocityModel<B>, samples: usize) -> Self {
        Self {
            model,
            autoencoder: None,
            solve: SolveOptions::default(),
            guidance: None,
            samples,
            batch_size: samples.max(1),
            decode_batch: 4,
            seed: 42,
            classes: Some(ClassChoice::Random),
            noise: None,
        }
    }
}

/// What conditions the samples besides their labels.
pub enum Conditions<'a, B: Backend> {
    /// Nothing: unconditional or class-conditional generation.
    None,
    /// One condition `[1, k, h, w]` for every sample (`lfm sample --image/--segmentation`); with inpainting, the
    /// image and mask every decoded sample is composited with.
    Shared {
        /// The condition channels.
        condition: Tensor<B, 4>,
        /// Inpainting's original and hole.
        inpainted: Option<&'a InpaintInput>,
    },
    /// Sample `i` inpaints the image and mask of `pairs[i]`, read batch by batch.
    Inpaint {
        /// (image, mask) files.
        pairs: &'a [(PathBuf, PathBuf)],
        /// Masks are white = hole.
        white_is_hole: bool,
        /// Encodes the masked images.
        builder: &'a ConditionBuilder<'a, B>,
    },
    /// Sample `i` renders the segmentation map `maps[i]` (resized to the decoded images' size).
    Semantic {
        /// Segmentation map files.
        maps: &'a [PathBuf],
        /// Projects the maps.
        builder: &'a ConditionBuilder<'a, B>,
    },
}

impl<B: Backend> Conditions<'_, B> {
    /// The condition of samples `first..first + count` and, for inpainting, their originals.
    fn batch(
        &self,
        first: usize,
        count: usize,
        seed: u64,
    ) -> Result<(Option<Tensor<B, 4>>, Vec<InpaintInput>), SampleError> {
        Ok(match self {
            Self::None => (None, Vec::new()),
            Self::Shared { condition, inpainted } => (
                Some(condition.clone().repeat_dim(0, count)),
                inpainted.map(|i| vec![i.clone(); count]).unwrap_or_default(),
            ),
            Self::Inpaint { pairs, white_is_hole, builder } => {
                let inputs = pairs[first..first + count]
                    .iter()
                    .map(|(image, mask)| read_inpaint(image, mask, *white_is_hole))
                    .collect::<Result<Vec<_>, _>>()?;
                (Some(builder.inpainting(&inputs, seed, first)?), inputs)
            }
            Self::Semantic { maps, builder } => {
                let (side, classes) = (builder.image_side(), builder.classes().unwrap_or(0));
                let maps = maps[first..first + count]
                    .iter()
                    .map(|path| {
                        read_segmentation(path, side, false, classes).map(|classes| SegmentationMap { classes, side })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (Some(builder.semantic(&maps)?), Vec::new())
            }
        })
    }
}

/// One solved batch, as the sinks see it.
pub struct SampledBatch<'s, B: Backend> {
    /// Index of its first sample.
    pub first: usize,
    /// `x0`, the latents at t = 0.
    pub latents: &'s Tensor<B, 4>,
    /// The samples' labels (class-conditional networks).
    pub labels: Option<&'s [i64]>,
    /// The decoded images (inpainting: composited with the originals); empty without an autoencoder.
    pub images: &'s [RgbImage],
    /// Inpainting: the original images; otherwise empty.
    pub originals: &'s [RgbImage],
}

/// Receives every solved batch, in order.
pub trait Sink<B: Backend> {
    /// Takes one batch.
    fn accept(&mut self, batch: &SampledBatch<'_, B>) -> Result<(), SampleError>;
}

/// What sampling reports.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// A velocity evaluation of the current batch.
    Evaluation {
        /// Its time.
        t: f64,
        /// Evaluations of the batch so far.
        nfe: usize,
    },
    /// A batch was solved, decoded and handed to the sinks.
    Batch {
        /// Samples done so far.
        done: usize,
    },
}

/// Why sampling stopped.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The plan or its inputs do not fit the network.
    #[error("{0}")]
    Input(String),
    /// The solve failed or refused its inputs.
    #[error(transparent)]
    Solver(#[from] SolverError),
    /// A task input (image, mask, segmentation map) could not be used.
    #[error(transparent)]
    Task(#[from] TaskInputError),
    /// An image could not be written.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Inception features could not be computed.
    #[error(transparent)]
    Features(#[from] FeatureError),
    /// FID statistics could not be formed.
    #[error(transparent)]
    Statistics(#[from] FidError),
}

/// Samples `plan` under `conditions`, handing every batch to each of `sinks`; returns what the solves cost.
pub fn run<B: Backend>(
    plan: &Plan<'_, B>,
    conditions: &Conditions<'_, B>,
    sinks: &mut [&mut dyn Sink<B>],
    progress: &mut dyn FnMut(Progress),
) -> Result<Summary, SampleError> {
    let model = plan.model;
    let config = model.config();
    let (side, channels) = (config.latent_size(), config.channels());
    let c_out = channels.1;
    let device = burn::module::Module::devices(model)
        .into_iter()
        .next()
        .ok_or_else(|| SampleError::Input("the network has no device".into()))?;
    if let Some(ae) = plan.autoencoder {
        ae.check_fits(c_out).map_err(SampleError::Input)?;
    }
    let n = plan.samples;
    if let Some(given) = plan.noise {
        if given.x1.shape != [n, c_out, side, side] {
            return Err(SampleError::Input(format!(
                "the noise x1 is {:?}; {n} samples of this model are [{n}, {c_out}, {side}, {side}]",
                given.x1.shape
            )));
        }
        if let Some(y) = given.labels.as_ref().filter(|y| y.len() != n) {
            return Err(SampleError::Input(format!("{} labels for {n} samples: give one per sample", y.len())));
        }
    }
    let x1_values = plan.noise.map(|g| g.x1.to_f32());
    let classes = model.classes().zip(plan.classes);
    let batch = plan.batch_size.max(1);
    let mut summary = Summary::default();
    for first in (0..n).step_by(batch) {
        let count = batch.min(n - first);
        let x1 = match &x1_values {
            Some(values) => {
                let per = c_out * side * side;
                let part = values[first * per..(first + count) * per].to_vec();
                Tensor::from_data(TensorData::new(part, [count, c_out, side, side]).convert::<B::FloatElem>(), &device)
            }
            None => noise::<B>(plan.seed, first, count, [c_out, side, side], &device),
        };
        let batch_labels = match (plan.noise.and_then(|g| g.labels.as_ref()), classes) {
            (Some(y), Some(_)) => Some(y[first..first + count].to_vec()),
            (_, Some((k, choice))) => Some(labels(choice, k, plan.seed, first, count)),
            (_, None) => None,
        };
        let (condition, inpainted) = conditions.batch(first, count, plan.seed)?;
        check_condition_channels(channels, condition.as_ref())?;
        let input = BatchInput { noise: x1, labels: batch_labels.clone(), condition };
        let mut on_eval = |t: f64, nfe: usize| progress(Progress::Evaluation { t, nfe });
        let out = sample_batch(model, input, plan.guidance, &plan.solve, &mut on_eval)?;
        summary.add(count, &out.stats, out.seconds);
        let images = match plan.autoencoder {
            Some(ae) => {
                let mut images = crate::image::from_tensor(ae.decode_sliced(out.latents.clone(), plan.decode_batch));
                for (image, original) in images.iter_mut().zip(&inpainted) {
                    composite(image, &original.image, &original.hole);
                }
                images
            }
            None => Vec::new(),
        };
        let originals: Vec<RgbImage> = inpainted.into_iter().map(|i| i.image).collect();
        let solved = SampledBatch {
            first,
            latents: &out.latents,
            labels: batch_labels.as_deref(),
            images: &images,
            originals: &originals,
        };
        for sink in sinks.iter_mut() {
            sink.accept(&solved)?;
        }
        progress(Progress::Batch { done: first + count });
    }
    Ok(summary)
}

/// Writes each decoded sample to a folder: `00000.png`, … or under given names.
pub struct ImageFiles {
    dir: PathBuf,
    names: Option<Vec<OsString>>,
    extension: String,
}

impl ImageFiles {
    /// Sample `i` as `dir/{i:05}.{extension}` (png or jpg).
    pub fn numbered(dir: &Path, extension: &str) -> Self {
        Self { dir: dir.to_path_buf(), names: None, extension: extension.into() }
    }

    /// Sample `i` as `dir/{names[i]}.png`.
    pub fn named(dir: &Path, names: Vec<OsString>) -> Self {
        Self { dir: dir.to_path_buf(), names: Some(names), extension: "png".into() }
    }
}

impl<B: Backend> Sink<B> for ImageFiles {
    fn accept(&mut self, batch: &SampledBatch<'_, B>) -> Result<(), SampleError> {
        for (k, image) in batch.images.iter().enumerate() {
            let i = batch.first + k;
            let name = match &self.names {
                Some(names) => PathBuf::from(&names[i]),
                None => PathBuf::from(format!("{i:05}")),
            };
            write_rgb(&self.dir.join(name).with_extension(&self.extension), image)?;
        }
        Ok(())
    }
}

/// Keeps every decoded image, for a grid.
#[derive(Debug, Default)]
pub struct ImageGrid {
    /// The images, in sample order.
    pub images: Vec<RgbImage>,
}

impl ImageGrid {
    /// The images as one grid of `per_row` columns.
    pub fn grid(&self, per_row: usize) -> RgbImage {
        crate::image::grid(&self.images, per_row)
    }
}

impl<B: Backend> Sink<B> for ImageGrid {
    fn accept(&mut self, batch: &SampledBatch<'_, B>) -> Result<(), SampleError> {
        self.images.extend_from_slice(batch.images);
        Ok(())
    }
}

/// Keeps the latents `x0` (f32, host) and labels of every sample.
#[derive(Debug, Default)]
pub struct Latents {
    values: Vec<f32>,
    shape: Option<[usize; 3]>,
    samples: usize,
    labels: Vec<i64>,
}

impl Latents {
    /// The latents `[N, C, h, w]` and, for a class-conditional network, the labels.
    pub fn into_host(self) -> (HostTensor, Option<Vec<i64>>) {
        let [c, h, w] = self.shape.unwrap_or([0, 0, 0]);
        let labels = (!self.labels.is_empty()).then_some(self.labels);
        (HostTensor::f32(vec![self.samples, c, h, w], self.values), labels)
    }
}

impl<B: Backend> Sink<B> for Latents {
    fn accept(&mut self, batch: &SampledBatch<'_, B>) -> Result<(), SampleError> {
        let [n, c, h, w] = batch.latents.dims();
        self.shape = Some([c, h, w]);
        self.samples += n;
        self.values.extend(HostTensor::from_tensor(batch.latents.clone()).to_f32());
        self.labels.extend_from_slice(batch.labels.unwrap_or_default());
        Ok(())
    }
}

/// Streams the decoded images' Inception features into FID statistics (no image is kept).
pub struct FidScore<'a, B: Backend> {
    extractor: &'a FeatureExtractor<B>,
    accumulator: Accumulator,
}

impl<'a, B: Backend> FidScore<'a, B> {
    /// Scores with `extractor`.
    pub fn new(extractor: &'a FeatureExtractor<B>) -> Self {
        Self { extractor, accumulator: Accumulator::new(FEATURE_DIM) }
    }

    /// The statistics of every image seen.
    pub fn statistics(&self) -> Result<Statistics, FidError> {
        self.accumulator.finish()
    }
}

impl<B: Backend> Sink<B> for FidScore<'_, B> {
    fn accept(&mut self, batch: &SampledBatch<'_, B>) -> Result<(), SampleError> {
        Ok(self.extractor.accumulate(batch.images, &mut self.accumulator)?)
    }
}

/// Keeps the Inception features of the decoded images and of their originals (inpainting's P-/U-IDS need them).
pub struct Features<'a, B: Backend> {
    extractor: &'a FeatureExtractor<B>,
    /// Features of the decoded images, `FEATURE_DIM` per image, in sample order.
    pub generated: Vec<f32>,
    /// Features of the originals (inpainting), in sample order.
    pub originals: Vec<f32>,
}

impl<'a, B: Backend> Features<'a, B> {
    /// Features from `extractor`.
    pub fn new(extractor: &'a FeatureExtractor<B>) -> Self {
        Self { extractor, generated: Vec::new(), originals: Vec::new() }
    }
}

impl<B: Backend> Sink<B> for Features<'_, B> {
    fn accept(&mut self, batch: &SampledBatch<'_, B>) -> Result<(), SampleError> {
        if !batch.originals.is_empty() {
            self.originals.extend(self.extractor.features(batch.originals).map_err(FeatureError::from)?);
        }
        self.generated.extend(self.extractor.features(batch.images).map_err(FeatureError::from)?);
        Ok(())
    }
}
