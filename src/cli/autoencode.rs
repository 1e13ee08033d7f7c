//! `lfm encode IMAGES… --out latents.safetensors` and `lfm decode LATENTS --out-dir DIR`.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::autoencoder::{AnyAutoencoder, Autoencoder, AutoencoderKind, AutoencoderWeights};
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::{read_safetensors, write_safetensors, HostTensor, TensorMap};
use crate::image::{read_rgb, write_rgb, RgbImage};

/// Which autoencoder and where its weights are.
#[derive(Debug, Args)]
pub struct AutoencoderArgs {
    /// The autoencoder.
    #[arg(long, value_enum, default_value = "kl")]
    pub autoencoder: AutoencoderKind,
    /// kl: a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or a weights file; taesd: the
    /// folder with taesd_encoder.* and taesd_decoder.* (or one AutoencoderTiny file).
    #[arg(long)]
    pub weights: PathBuf,
    /// kl only: a diffusers config.json (default: the folder's, else sd-vae-ft-mse's).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Images per forward pass (bounds memory).
    #[arg(long, default_value_t = 4, value_parser = super::count)]
    pub batch_size: usize,
}

impl AutoencoderArgs {
    pub(super) fn read(&self) -> anyhow::Result<AutoencoderWeights> {
        Ok(AutoencoderWeights::read(self.autoencoder, &self.weights, self.config.as_deref())?)
    }
}

pub(super) fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} images, {{elapsed}} (ETA {{eta}})"))
            .expect("valid template"),
    );
    bar
}

/// Arguments of `lfm encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// Images (PNG or JPEG) of one size, divisible by the autoencoder's factor (8 for SD's VAE and TAESD).
    #[arg(required_unless_present = "data", conflicts_with = "data")]
    pub images: Vec<PathBuf>,
    /// A whole dataset instead: a folder (searched recursively), an LMDB dataset (NVAE or LSUN layout) or an IDX
    /// file such as Fashion-MNIST's `train-images-idx3-ubyte.gz`; its labels (IDX labels file beside it, or
    /// --class-folders) are written as `y`, ready for `lfm train --latents`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// With --data: the first N images only (LFM trains LSUN on its first 120000).
    #[arg(long, requires = "data", value_parser = super::count)]
    pub max_images: Option<usize>,
    /// With --data: side of the square images (resize the short side, centre-crop).
    #[arg(long, default_value_t = 256, value_parser = super::count)]
    pub image_size: usize,
    /// With --data: label images by their top-level sub-folder.
    #[arg(long)]
    pub class_folders: bool,
    /// Where to write the latents: a `.safetensors` file (`latents` [N, 4, H/8, W/8], scaled as LFM's z; for the KL
    /// VAE also the posterior's `mean` and `std` on the same scale, which `lfm train --latents` re-samples every
    /// step), or, with --data and any other name, a sharded cache folder (`index.json` + `shard-NNNNN.safetensors`
    /// holding `mean` and `std`, or `latents`, and `y`) that is written a shard at a time, resumes where an
    /// interrupted run stopped, and trains without being loaded into memory.
    #[arg(long)]
    pub out: PathBuf,
    /// With --data and a cache folder: dataset images per shard (memory holds one shard's images while encoding).
    #[arg(long, default_value_t = 2048, value_parser = super::count)]
    pub shard_size: usize,
    /// The autoencoder.
    #[command(flatten)]
    pub autoencoder: AutoencoderArgs,
    /// Seed of the posterior sample (image i always gets the same noise); KL only.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the posterior mean instead of a sample (KL only).
    #[arg(long)]
    pub mean: bool,
    /// Overwrite an existing output file.
    #[arg(long)]
    pub force: bool,
}

struct Encode {
    weights: AutoencoderWeights,
    images: Vec<RgbImage>,
    /// The posterior-noise stream of each image: its index in the dataset (or the argument list).
    noise_keys: Vec<u64>,
    seed: u64,
    mean: bool,
    batch_size: usize,
}

impl OnBackend for Encode {
    type Output = anyhow::Result<TensorMap>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = self.weights.load::<B>(&device)?;
        let f = model.factor();
        let (w, h) = (self.images[0].width, self.images[0].height);
        anyhow::ensure!(
            w % f == 0 && h % f == 0,
            "the images are {w}×{h}; the autoencoder needs sides divisible by {f}: crop or resize them"
        );
        let bar = progress(self.images.len(), "encoding");
        let sample = (!self.mean).then_some(self.seed);
        let out = encode_images(&model, &self.images, &self.noise_keys, sample, self.batch_size, &bar, &device);
        bar.finish_and_clear();
        out
    }
}

/// Encodes `images` (one size) in batches of `batch_size`: `latents` (a posterior sample with noise stream
/// `noise_keys[i]` of `sample`'s seed, or the mean without a seed), and for the KL VAE also the posterior's `mean`
/// and `std` on LFM's scale, so that training can re-sample it every step.
pub(super) fn encode_images<B: Backend>(
    model: &AnyAutoencoder<B>,
    images: &[RgbImage],
    noise_keys: &[u64],
    sample: Option<u64>,
    batch_size: usize,
    bar: &ProgressBar,
    device: &B::Device,
) -> anyhow::Result<TensorMap> {
    let (f, c) = (model.factor(), model.latent_channels());
    let (w, h) = (images[0].width, images[0].height);
    let per_sample = c * (h / f) * (w / f);
    let mut values = Vec::with_capacity(images.len() * per_sample);
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    let host = |t: Tensor<B, 4>| t.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"));
    for (chunk, keys) in images.chunks(batch_size.max(1)).zip(noise_keys.chunks(batch_size.max(1))) {
        let x = crate::image::to_tensor::<B>(chunk, device)?;
        let eps = sample.map(|seed| {
            let noise: Vec<f32> = keys.iter().flat_map(|&key| crate::noise::batch(seed, key, 1, per_sample)).collect();
            Tensor::<B, 4>::from_data(
                TensorData::new(noise, [chunk.len(), c, h / f, w / f]).convert::<B::FloatElem>(),
                device,
            )
        });
        let z = match model {
            // One encoder pass gives both the sample and the posterior (on LFM's scale, for training).
            AnyAutoencoder::Kl(kl) => {
                let (z, posterior) = kl.encode_with_posterior(x, eps);
                let scale = kl.config.scaling_factor;
                means.extend(host(posterior.mean.clone().mul_scalar(scale))?);
                stds.extend(host(posterior.std().mul_scalar(scale))?);
                z
            }
            other => other.encode(x, eps),
        };
        values.extend(host(z)?);
        bar.inc(chunk.len() as u64);
    }
    let shape = vec![images.len(), c, h / f, w / f];
    let mut out = TensorMap::from([("latents".to_string(), HostTensor::f32(shape.clone(), values))]);
    if !means.is_empty() {
        out.insert("mean".into(), HostTensor::f32(shape.clone(), means));
        out.insert("std".into(), HostTensor::f32(shape, stds));
    }
    Ok(out)
}

/// The readable images of a dataset (folder, LMDB or IDX file; the first `max_images`), cut to `size` and decoded on
/// every core, with their dataset indices and labels; unreadable ones are skipped with a warning and counted.
fn dataset_images(
    path: &std::path::Path,
    size: usize,
    class_folders: bool,
    max_images: Option<usize>,
) -> anyhow::Result<DatasetImages> {
    use crate::data::{open_images, read_images, Source};
    let source = open_images(path, size, class_folders, max_images).map_err(|e| anyhow::anyhow!(e))?;
    let Source::Images { items, labels, .. } = source else { anyhow::bail!("{}: expected images", path.display()) };
    let read = read_images(&items, 0..items.len(), size);
    Ok(DatasetImages {
        labels: labels.map(|all| read.indices.iter().map(|&i| all[i]).collect()),
        keys: read.indices.iter().map(|&i| i as u64).collect(),
        images: read.images,
        skipped: read.skipped,
    })
}

/// What [`dataset_images`] read.
struct DatasetImages {
    images: Vec<RgbImage>,
    /// Dataset index of each image (its posterior-noise stream).
    keys: Vec<u64>,
    labels: Option<Vec<i64>>,
    skipped: usize,
}

pub(crate) fn encode(args: EncodeArgs, choice: BackendChoice) -> anyhow::Result<()> {
    if let Some(data) = args.data.clone() {
        if args.out.extension().is_none_or(|e| e != "safetensors") {
            return super::latent_cache::encode_cache(args, &data, choice);
        }
    }
    super::refuse_existing(&args.out, args.force)?;
    let DatasetImages { images, keys, labels, skipped } = match &args.data {
        Some(path) => dataset_images(path, args.image_size, args.class_folders, args.max_images)?,
        None => {
            let images = args.images.iter().map(|p| read_rgb(p)).collect::<Result<Vec<_>, _>>()?;
            DatasetImages { keys: (0..images.len() as u64).collect(), images, labels: None, skipped: 0 }
        }
    };
    anyhow::ensure!(!images.is_empty(), "no images to encode");
    if let Some(other) =
        images.iter().zip(&args.images).find(|(i, _)| (i.width, i.height) != (images[0].width, images[0].height))
    {
        anyhow::bail!(
            "{} is {}×{} but {} is {}×{}: all images must have one size",
            other.1.display(),
            other.0.width,
            other.0.height,
            args.images[0].display(),
            images[0].width,
            images[0].height
        );
    }
    let weights = args.autoencoder.read()?;
    let device = backend::select(choice)?;
    let n = images.len();
    let job = Encode {
        weights,
        images,
        noise_keys: keys,
        seed: args.seed,
        mean: args.mean,
        batch_size: args.autoencoder.batch_size,
    };
    let mut tensors = backend::dispatch(&device, job)?;
    if let Some(labels) = labels {
        tensors.insert("y".into(), HostTensor::i64(vec![labels.len()], labels));
    }
    let kind = format!("{:?}", args.autoencoder.autoencoder).to_lowercase();
    let source = match &args.data {
        Some(path) => path.display().to_string(),
        None => args.images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n"),
    };
    let metadata = HashMap::from([
        ("autoencoder".to_string(), kind),
        ("sample".to_string(), if args.mean { "mean".into() } else { format!("seed {}", args.seed) }),
        ("images".to_string(), source),
    ]);
    write_safetensors(&args.out, &tensors, Some(metadata))?;
    println!("wrote {} ({n} latents, {skipped} unreadable images skipped, device {device})", args.out.display());
    Ok(())
}

/// Arguments of `lfm decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// A safetensors file with `latents` (or `x0`, or a single tensor) [N, 4, h, w], scaled as LFM's z.
    pub latents: PathBuf,
    /// Folder for the images (`00000.png`, …); created if missing.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Image format.
    #[arg(long, default_value = "png", value_parser = ["png", "jpg"])]
    pub format: String,
    /// The autoencoder.
    #[command(flatten)]
    pub autoencoder: AutoencoderArgs,
    /// Overwrite existing images.
    #[arg(long)]
    pub force: bool,
}

struct Decode {
    weights: AutoencoderWeights,
    latents: HostTensor,
    batch_size: usize,
    paths: Vec<PathBuf>,
}

impl OnBackend for Decode {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = self.weights.load::<B>(&device)?;
        let shape = &self.latents.shape;
        anyhow::ensure!(
            shape.len() == 4 && shape[1] == model.latent_channels(),
            "the latents are {shape:?}; this autoencoder decodes [N, {}, h, w]",
            model.latent_channels()
        );
        let z: Tensor<B, 4> = self.latents.to_tensor(&device);
        let bar = progress(shape[0], "decoding");
        let step = self.batch_size.max(1);
        for start in (0..shape[0]).step_by(step) {
            let count = step.min(shape[0] - start);
            let images = crate::image::from_tensor(model.decode(z.clone().narrow(0, start, count)));
            for (image, path) in images.iter().zip(&self.paths[start..start + count]) {
                write_rgb(path, image)?;
            }
            bar.inc(count as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

pub(crate) fn decode(args: DecodeArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let (tensors, _) = read_safetensors(&args.latents)?;
    let latents = match (tensors.get("latents"), tensors.get("x0"), tensors.len()) {
        (Some(t), _, _) | (None, Some(t), _) => t.clone(),
        (None, None, 1) => tensors.values().next().cloned().expect("one tensor"),
        _ => anyhow::bail!("{}: no `latents` or `x0` tensor", args.latents.display()),
    };
    anyhow::ensure!(latents.shape.len() == 4, "the latents must be [N, C, h, w], got {:?}", latents.shape);
    super::create_folder(&args.out_dir)?;
    let paths: Vec<PathBuf> =
        (0..latents.shape[0]).map(|i| args.out_dir.join(format!("{i:05}.{}", args.format))).collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()).filter(|_| !args.force) {
        anyhow::bail!("{} exists; pass --force to overwrite images in {}", existing.display(), args.out_dir.display());
    }
    let weights = args.autoencoder.read()?;
    let device = backend::select(choice)?;
    let n = paths.len();
    backend::dispatch(&device, Decode { weights, latents, batch_size: args.autoencoder.batch_size, paths })?;
    println!("wrote {n} images to {} (device {device})", args.out_dir.display());
    Ok(())
}
