//! `lfm encode --data DATASET --out DIR`: the sharded latent cache that `lfm train --latents DIR` reads (see
//! [`crate::data::latents`] for the layout).

use std::path::PathBuf;

use burn::tensor::backend::Backend;

use super::autoencode::{encode_images, progress, EncodeArgs};
use crate::autoencoder::{AnyAutoencoder, Autoencoder, AutoencoderWeights};
use crate::backend::{self, BackendChoice, OnBackend};
use crate::checkpoint::{write_safetensors, HostTensor};
use crate::data::latents::{CacheIndex, CachePlan, ShardEntry, INDEX_FILE};
use crate::data::{read_images, ReadableImages};

/// `lfm encode --data DATASET --out DIR` (any name but `*.safetensors`): the sharded cache.
pub(super) fn encode_cache(args: EncodeArgs, data: &std::path::Path, choice: BackendChoice) -> anyhow::Result<()> {
    use crate::data::{open_images, Source};
    anyhow::ensure!(!args.out.is_file(), "{} is a file; a latent cache is a folder", args.out.display());
    let source =
        open_images(data, args.image_size, args.class_folders, args.max_images).map_err(|e| anyhow::anyhow!(e))?;
    let Source::Images { items, labels, .. } = source else { anyhow::bail!("{}: expected images", data.display()) };
    anyhow::ensure!(!items.is_empty(), "{}: no images to encode", data.display());
    let plan = CachePlan {
        // Absolute paths, so that the same run resumed from another folder matches.
        source: absolute(data),
        examples_in_source: items.len(),
        image_size: args.image_size,
        shard_size: args.shard_size,
        autoencoder: format!("{:?} {}", args.autoencoder.autoencoder, args.autoencoder.weights.display())
            .to_lowercase(),
        sample: if args.mean { "mean".into() } else { format!("seed {}", args.seed) },
        latent_shape: Vec::new(),
    };
    let job = EncodeCache {
        weights: args.autoencoder.read()?,
        items,
        labels,
        dir: args.out.clone(),
        plan,
        sample: (!args.mean).then_some(args.seed),
        batch_size: args.autoencoder.batch_size,
        force: args.force,
    };
    let device = backend::select(choice)?;
    let (index, encoded) = backend::dispatch(&device, job)?;
    let examples: usize = index.shards.iter().map(|s| s.examples).sum();
    let skipped: usize = index.shards.iter().map(|s| s.skipped).sum();
    println!(
        "{} {} ({examples} latents in {} shards, {skipped} unreadable images skipped, device {device})",
        if encoded { "wrote" } else { "nothing to do: already complete:" },
        args.out.display(),
        index.shards.len()
    );
    Ok(())
}

/// `path` made absolute (as given when that fails).
fn absolute(path: &std::path::Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// `lfm encode --data DATASET --out DIR`: a sharded latent cache, written a shard at a time (each atomically,
/// then the index), so that memory holds one shard and an interrupted run resumes at its first missing shard.
struct EncodeCache {
    weights: AutoencoderWeights,
    items: Vec<crate::data::ImageItem>,
    labels: Option<Vec<i64>>,
    dir: PathBuf,
    plan: CachePlan,
    sample: Option<u64>,
    batch_size: usize,
    force: bool,
}

impl EncodeCache {
    /// The index to continue from: the existing one when its plan matches, a new one otherwise (replacing an
    /// existing cache only with --force).
    fn start(&self) -> anyhow::Result<CacheIndex> {
        let dir = &self.dir;
        match CacheIndex::read(dir).map_err(|e| anyhow::anyhow!(e))? {
            Some(old) if old.plan == self.plan => return Ok(old),
            Some(old) if !self.force => anyhow::bail!(
                "{} holds a latent cache with other settings ({}); pass --force to replace it, or choose another --out",
                dir.display(),
                plan_difference(&old.plan, &self.plan)
            ),
            Some(old) => {
                for entry in &old.shards {
                    let path = dir.join(&entry.file);
                    std::fs::remove_file(&path)
                        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                }
            }
            None if dir.read_dir().is_ok_and(|mut entries| entries.next().is_some()) => anyhow::bail!(
                "{} is a folder that is not a latent cache (no {INDEX_FILE}); choose a new or empty folder",
                dir.display()
            ),
            None => {}
        }
        Ok(CacheIndex::new(self.plan.clone()))
    }
}

/// The first plan field that differs, for the error message.
fn plan_difference(old: &CachePlan, new: &CachePlan) -> String {
    let fields = [
        ("data", &old.source, &new.source),
        ("autoencoder", &old.autoencoder, &new.autoencoder),
        ("sample", &old.sample, &new.sample),
    ];
    let numbers = [
        ("images", old.examples_in_source, new.examples_in_source),
        ("--image-size", old.image_size, new.image_size),
        ("--shard-size", old.shard_size, new.shard_size),
    ];
    fields
        .iter()
        .find(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} {a} there, {b} now"))
        .or_else(|| numbers.iter().find(|(_, a, b)| a != b).map(|(name, a, b)| format!("{name} {a} there, {b} now")))
        .unwrap_or_else(|| format!("latent shape {:?} there, {:?} now", old.latent_shape, new.latent_shape))
}

impl OnBackend for EncodeCache {
    /// The index, and whether any shard was encoded.
    type Output = anyhow::Result<(CacheIndex, bool)>;

    fn run<B: Backend>(mut self, device: B::Device) -> Self::Output {
        let model = self.weights.load::<B>(&device)?;
        let (f, size) = (model.factor(), self.plan.image_size);
        anyhow::ensure!(size % f == 0, "--image-size {size} is not divisible by the autoencoder's factor {f}");
        self.plan.latent_shape = vec![model.latent_channels(), size / f, size / f];
        let mut index = self.start()?;
        if index.complete {
            return Ok((index, false));
        }
        super::create_folder(&self.dir)?;
        index.write(&self.dir).map_err(|e| anyhow::anyhow!(e))?;
        let (n, shard_size) = (self.plan.examples_in_source, self.plan.shard_size);
        let bar = progress(n, "encoding");
        bar.set_position((index.shards.len() * shard_size).min(n) as u64);
        if !index.shards.is_empty() {
            tracing::info!(
                "resuming {} at shard {} of {}",
                self.dir.display(),
                index.shards.len(),
                index.shard_count()
            );
        }
        for k in index.shards.len()..index.shard_count() {
            let range = k * shard_size..((k + 1) * shard_size).min(n);
            // Decoding is the CPU's share: all cores, while the device waits only once per shard.
            let ReadableImages { images, indices, skipped } = read_images(&self.items, range, size);
            bar.inc(skipped as u64);
            let keys: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
            let mut tensors = if images.is_empty() {
                // The same tensors as the other shards, with no rows.
                let mut shape = vec![0];
                shape.extend(&self.plan.latent_shape);
                let names: &[&str] =
                    if matches!(model, AnyAutoencoder::Kl(_)) { &["mean", "std"] } else { &["latents"] };
                names.iter().map(|name| (name.to_string(), HostTensor::f32(shape.clone(), Vec::new()))).collect()
            } else {
                let mut tensors = encode_images(&model, &images, &keys, self.sample, self.batch_size, &bar, &device)?;
                // Training re-samples the posterior from `mean` and `std`; the sample would only take space.
                if tensors.contains_key("std") {
                    tensors.remove("latents");
                }
                tensors
            };
            if let Some(labels) = &self.labels {
                let y: Vec<i64> = keys.iter().map(|&i| labels[i as usize]).collect();
                tensors.insert("y".into(), HostTensor::i64(vec![y.len()], y));
            }
            let file = CacheIndex::shard_file(k);
            write_safetensors(&self.dir.join(&file), &tensors, None)?;
            index.shards.push(ShardEntry { file, examples: images.len(), skipped });
            index.complete = index.shards.len() == index.shard_count();
            index.write(&self.dir).map_err(|e| anyhow::anyhow!(e))?;
        }
        bar.finish_and_clear();
        Ok((index, true))
    }
}
