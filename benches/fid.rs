//! FID throughput: Inception pool3 features of a batch of 256-px images (random weights: the cost is the real
//! network's), in images/s, on cpu, wgpu and (with the `cuda` feature) cuda;
//! and the Fréchet distance between two 2048-d statistics.
//!
//! A plain harness: one warm-up, then `LFM_BENCH_REPS` (default 1) timed runs, median reported.
//! `LFM_BENCH_BATCH` (default 50, pytorch-fid's default batch) and `LFM_BENCH_BACKENDS` (default `cpu,wgpu`)
//! pick the cases. Run: `cargo bench --features cuda --profile dev --bench fid`.

mod common;

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use common::BackendBench;
use lfm::image::RgbImage;
use lfm::metrics::features::FeatureExtractor;
use lfm::metrics::fid::{frechet_distance, Accumulator};
use lfm::metrics::inception::FidInception;

/// The Inception features of `batch` images, median of `reps` runs.
struct Features {
    batch: usize,
    reps: usize,
}

impl BackendBench for Features {
    fn run<B: Backend>(&self, backend: &str, device: &B::Device) {
        let Self { batch, reps } = *self;
        // Through the extractor, as `lfm fid` runs it (8-bit images in; GPU backends go 4 images per pass; the CPU
        // splits a pass over its cores, measured against one pass on one thread in the same run).
        let images: Vec<RgbImage> = (0..batch)
            .map(|i| RgbImage {
                width: 256,
                height: 256,
                pixels: (0..256 * 256 * 3).map(|p| ((p * 31 + i * 7) % 256) as u8).collect(),
            })
            .collect();
        let time = |extractor: &FeatureExtractor<B>| {
            let run = || {
                let f = extractor.features(&images).expect("RGB input");
                assert_eq!(f.len(), batch * 2048);
            };
            common::median_time(reps, run)
        };
        let model = FidInception::<B>::init(device);
        // `None`: the extractor's own default (one part per core on the CPU).
        let cases: &[(&str, Option<usize>)] =
            if backend == "cpu" { &[("one pass", Some(1)), ("split over the cores", None)] } else { &[("", None)] };
        let mut baseline = None;
        for &(name, threads) in cases {
            let extractor = FeatureExtractor::new(model.clone(), device);
            let extractor = match threads {
                Some(n) => extractor.with_cpu_threads(n),
                None => extractor,
            };
            let t = time(&extractor);
            let speedup = baseline.map(|b: Duration| format!(", {:.2}× one pass", b.as_secs_f64() / t.as_secs_f64()));
            baseline.get_or_insert(t);
            println!(
                "{backend:5} Inception features, batch {batch} of 256² images {name}: {:8.2} s  {:7.2} images/s{}",
                t.as_secs_f64(),
                batch as f64 / t.as_secs_f64(),
                speedup.unwrap_or_default()
            );
        }
    }
}

fn bench_frechet() {
    // Two covariances of rank 300 (as from 300 samples), the shape of real FID statistics.
    let stats = |seed: u64| {
        let mut acc = Accumulator::new(2048);
        let values: Vec<f32> =
            (0..300 * 2048).map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5).collect();
        acc.add(&values).unwrap();
        acc.finish().unwrap()
    };
    let (a, b) = (stats(1), stats(2));
    let start = Instant::now();
    let d = frechet_distance(&a, &b).unwrap();
    println!("Fréchet distance of 2048-d statistics: {:.2} s (value {d:.3})", start.elapsed().as_secs_f64());
}

fn main() {
    bench_frechet();
    common::for_each_backend(&Features {
        batch: common::env_number("LFM_BENCH_BATCH", 50),
        reps: common::env_number("LFM_BENCH_REPS", 1),
    });
}
