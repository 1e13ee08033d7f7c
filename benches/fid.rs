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
use lfm::backend::OnBackend;
use lfm::image::RgbImage;
use lfm::metrics::features::FeatureExtractor;
use lfm::metrics::fid::{frechet_distance, Accumulator};
use lfm::metrics::inception::FidInception;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn bench_backend<B: Backend>(backend: &str, device: &B::Device, batch: usize, reps: usize) {
    // Through the extractor, as `lfm fid` runs it (8-bit images in; GPU backends go 4 images per pass).
    let extractor = FeatureExtractor::new(FidInception::<B>::init(device), device);
    let images: Vec<RgbImage> = (0..batch)
        .map(|i| RgbImage {
            width: 256,
            height: 256,
            pixels: (0..256 * 256 * 3).map(|p| ((p * 31 + i * 7) % 256) as u8).collect(),
        })
        .collect();
    let run = || {
        let f = extractor.features(&images).expect("RGB input");
        assert_eq!(f.len(), batch * 2048);
    };
    run();
    let t = median(
        (0..reps)
            .map(|_| {
                let start = Instant::now();
                run();
                start.elapsed()
            })
            .collect(),
    );
    println!(
        "{backend:5} Inception features, batch {batch} of 256² images: {:8.2} s  {:7.2} images/s",
        t.as_secs_f64(),
        batch as f64 / t.as_secs_f64()
    );
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

/// One backend's case.
struct Bench {
    name: String,
    batch: usize,
    reps: usize,
}

impl OnBackend for Bench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) {
        bench_backend::<B>(&self.name, &device, self.batch, self.reps);
    }
}

fn main() {
    let reps = std::env::var("LFM_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let batch = std::env::var("LFM_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    bench_frechet();
    common::for_each_backend(|name| Bench { name, batch, reps });
}
