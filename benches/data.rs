//! Host-side data throughput of `lfm train` (examples/s), what the prefetching loader must sustain so the device
//! never waits:
//! - image batches (PNG decode, bicubic resize of the short side to 256, centre crop, flip) through the loader's
//!   `prepare`, on one thread (the baseline, measured in the same run) and on every core;
//! - latent batches (4×32×32 posteriors, mean + std, with the posterior sample) from a sharded cache on disk,
//!   against the same latents held in memory (the baseline).
//!
//! (The gradient sum of several processes is timed by `lfm train` itself: `allreduce_s` in `metrics.jsonl`.)
//!
//! `LFM_BENCH_IMAGES` (default 64) synthetic 320×288 PNGs, batches of `LFM_BENCH_BATCH` (default 32).
//! Run: `cargo bench --features cuda --profile dev --bench data` (`--release` for publishable numbers).

mod common;

use std::time::Instant;

use lfm::checkpoint::{write_safetensors, HostTensor, TensorMap};
use lfm::data::latents::{CacheIndex, CachePlan, LatentStore, ShardEntry};
use lfm::data::loader::{prepare, EpochOrder};
use lfm::data::{open_images, Source};
use lfm::image::{write_rgb, RgbImage};
use lfm::tasks::{Task, TaskFiles};
use lfm::train::schedule::Schedule;
use lfm::train::RunSettings;

fn settings(batch_size: usize) -> RunSettings {
    RunSettings {
        batch_size,
        max_steps: 1000,
        lr: 1e-4,
        schedule: Schedule::Constant,
        save_every: 1000,
        seed: 0,
        flip: true,
        ema_decay: None,
        warmup_steps: 0,
        grad_accum: 1,
        max_grad_norm: None,
        task: Task::Generate,
        preview_every: 0,
        data_parallel: 1,
        precision: Default::default(),
        time_sampling: Default::default(),
    }
}

/// Examples per second of `steps` batches of `source` prepared on `threads` threads.
fn loader_rate(source: &Source, settings: &RunSettings, per_sample: usize, threads: usize, steps: usize) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
    let files = TaskFiles::default();
    pool.install(|| {
        let mut unreadable = 0;
        let mut order = EpochOrder::new(settings.seed, settings.batch_size, source.len());
        let start = Instant::now();
        for step in 0..steps {
            prepare(source, &files, settings, per_sample, step, &mut order, &mut unreadable).expect("a batch");
        }
        (steps * settings.batch_size) as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let (images, batch) = (common::env_number("LFM_BENCH_IMAGES", 64), common::env_number("LFM_BENCH_BATCH", 32));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let folder = dir.path().join("images");
    std::fs::create_dir_all(&folder).expect("a folder");
    for i in 0..images {
        let (w, h) = (320, 288);
        let pixels =
            (0..w * h).flat_map(|p| [((p % w) * 255 / w) as u8, ((p / w) * 255 / h) as u8, (i * 37 % 256) as u8]);
        let image = RgbImage { width: w, height: h, pixels: pixels.collect() };
        write_rgb(&folder.join(format!("{i:05}.png")), &image).expect("a PNG");
    }
    let settings = settings(batch);
    let steps = images.div_ceil(batch).max(2);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    let source = open_images(&folder, 256, false, None).expect("the images");
    let one = loader_rate(&source, &settings, 0, 1, steps);
    let all = loader_rate(&source, &settings, 0, cores, steps);
    println!(
        "images 320×288 PNG → 256²: 1 thread {one:.1} img/s (baseline), {cores} threads {all:.1} img/s ({:.2}×)",
        all / one
    );

    // 1024 posteriors of 4×32×32, as one file in memory and as a cache of 4 shards on disk.
    let (n, per_sample) = (1024, 4 * 32 * 32);
    let values: Vec<f32> = (0..n * per_sample).map(|i| (i % 977) as f32 * 1e-3).collect();
    let shape = vec![n, 4, 32, 32];
    let file = dir.path().join("latents.safetensors");
    let tensors = TensorMap::from([
        ("mean".to_string(), HostTensor::f32(shape.clone(), values.clone())),
        ("std".to_string(), HostTensor::f32(shape.clone(), values.clone())),
    ]);
    write_safetensors(&file, &tensors, None).expect("the latents");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).expect("a folder");
    let shard_size = n / 4;
    let mut index = CacheIndex::new(CachePlan {
        source: "bench".into(),
        examples_in_source: n,
        image_size: 256,
        shard_size,
        autoencoder: "bench".into(),
        sample: "seed 0".into(),
        latent_shape: vec![4, 32, 32],
    });
    for k in 0..4 {
        let part = values[k * shard_size * per_sample..(k + 1) * shard_size * per_sample].to_vec();
        let shape = vec![shard_size, 4, 32, 32];
        let tensors = TensorMap::from([
            ("mean".to_string(), HostTensor::f32(shape.clone(), part.clone())),
            ("std".to_string(), HostTensor::f32(shape, part)),
        ]);
        let name = CacheIndex::shard_file(k);
        write_safetensors(&cache.join(&name), &tensors, None).expect("a shard");
        index.shards.push(ShardEntry { file: name, examples: shard_size, skipped: 0 });
    }
    index.complete = true;
    index.write(&cache).expect("the index");
    let settings = self::settings(256);
    let steps = 16;
    let memory = Source::Latents(LatentStore::open(&file).expect("the file"));
    let sharded = Source::Latents(LatentStore::open(&cache).expect("the cache"));
    let in_memory = loader_rate(&memory, &settings, per_sample, cores, steps);
    let on_disk = loader_rate(&sharded, &settings, per_sample, cores, steps);
    println!(
        "latents 4×32×32 (mean+std, sampled), batch 256: in memory {in_memory:.0} ex/s (baseline), sharded cache \
         {on_disk:.0} ex/s ({:.2}×)",
        on_disk / in_memory
    );
}
