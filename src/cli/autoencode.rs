//! `lfm encode IMAGES… --out latents.safetensors` and `lfm decode LATENTS --out-dir DIR`.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::autoencoder::{Autoencoder, AutoencoderKind, AutoencoderWeights};
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
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
}

impl AutoencoderArgs {
    fn read(&self) -> anyhow::Result<AutoencoderWeights> {
        Ok(AutoencoderWeights::read(self.autoencoder, &self.weights, self.config.as_deref())?)
    }
}

fn progress(len: usize, what: &str) -> ProgressBar {
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
    #[arg(long, requires = "data")]
    pub max_images: Option<usize>,
    /// With --data: side of the square images (resize the short side, centre-crop).
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// With --data: label images by their top-level sub-folder.
    #[arg(long)]
    pub class_folders: bool,
    /// Where to write the latents (`latents` [N, 4, H/8, W/8], scaled as LFM's z; for the KL VAE also the
    /// posterior's `mean` and `std` on the same scale, which `lfm train --latents` re-samples every step).
    #[arg(long)]
    pub out: PathBuf,
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
        let c = model.latent_channels();
        let per_sample = c * (h / f) * (w / f);
        let bar = progress(self.images.len(), "encoding");
        let mut values = Vec::with_capacity(self.images.len() * per_sample);
        // The KL posterior on LFM's scale, so that training can re-sample it every step.
        let (mut means, mut stds) = (Vec::new(), Vec::new());
        for (chunk_index, chunk) in self.images.chunks(self.batch_size.max(1)).enumerate() {
            let first = (chunk_index * self.batch_size.max(1)) as u64;
            let x = crate::image::to_tensor::<B>(chunk, &device)?;
            let eps = (!self.mean).then(|| {
                let noise = crate::noise::batch(self.seed, first, chunk.len(), per_sample);
                Tensor::<B, 4>::from_data(
                    TensorData::new(noise, [chunk.len(), c, h / f, w / f]).convert::<B::FloatElem>(),
                    &device,
                )
            });
            let z = match &model {
                // One encoder pass gives both the sample and the posterior (on LFM's scale, for training).
                crate::autoencoder::AnyAutoencoder::Kl(kl) => {
                    let (z, posterior) = kl.encode_with_posterior(x, eps);
                    let scale = kl.config.scaling_factor;
                    let flat = |t: Tensor<B, 4>| t.mul_scalar(scale).into_data().convert::<f32>().into_vec::<f32>();
                    means.extend(flat(posterior.mean.clone()).map_err(|e| anyhow::anyhow!("{e:?}"))?);
                    stds.extend(flat(posterior.std()).map_err(|e| anyhow::anyhow!("{e:?}"))?);
                    z
                }
                other => other.encode(x, eps),
            };
            values.extend(z.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let shape = vec![self.images.len(), c, h / f, w / f];
        let mut out = TensorMap::from([("latents".to_string(), HostTensor::f32(shape.clone(), values))]);
        if !means.is_empty() {
            out.insert("mean".into(), HostTensor::f32(shape.clone(), means));
            out.insert("std".into(), HostTensor::f32(shape, stds));
        }
        Ok(out)
    }
}

/// Every image of a dataset (folder, LMDB or IDX file; the first `max_images`), cut to `size`, with its labels
/// when it has any.
fn dataset_images(
    path: &std::path::Path,
    size: usize,
    class_folders: bool,
    max_images: Option<usize>,
) -> anyhow::Result<(Vec<RgbImage>, Option<Vec<i64>>)> {
    use crate::train::data::{load_image, open_images, Source};
    let source = open_images(path, size, class_folders, max_images).map_err(|e| anyhow::anyhow!(e))?;
    let Source::Images { items, labels, .. } = source else { anyhow::bail!("{}: expected images", path.display()) };
    let images = items.iter().map(|item| load_image(item, size, false)).collect::<Result<Vec<_>, _>>();
    Ok((images.map_err(|e| anyhow::anyhow!(e))?, labels))
}

pub(crate) fn encode(args: EncodeArgs, choice: BackendChoice) -> anyhow::Result<()> {
    if args.out.exists() && !args.force {
        anyhow::bail!("{} exists; pass --force to overwrite it", args.out.display());
    }
    let (images, labels) = match &args.data {
        Some(path) => dataset_images(path, args.image_size, args.class_folders, args.max_images)?,
        None => (args.images.iter().map(|p| read_rgb(p)).collect::<Result<Vec<_>, _>>()?, None),
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
    let job = Encode { weights, images, seed: args.seed, mean: args.mean, batch_size: args.autoencoder.batch_size };
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
    println!("wrote {} ({n} latents, device {device})", args.out.display());
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
    std::fs::create_dir_all(&args.out_dir)?;
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
