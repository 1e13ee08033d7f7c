//! Decoding a batch of 8 LFM latents (4×32×32, i.e. 256-px images) with the KL decoder (sd-vae-ft-mse's
//! configuration, random weights) and with TAESD, on cpu, wgpu and (with the `cuda` feature) cuda, in images/s.
//!
//! A plain harness (a KL decode of 8 images takes many seconds on a CPU): one warm-up, then `LFM_BENCH_REPS`
//! (default 3) timed runs, median reported. `LFM_BENCH_BACKENDS` (default `cpu,wgpu`) and `LFM_BENCH_AUTOENCODERS`
//! (default `kl,taesd`) pick the cases. Run: `cargo bench --features cuda --profile dev --bench autoencoders`.

mod common;

use std::time::Duration;

use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
use common::BackendBench;
use lfm::autoencoder::{Autoencoder, AutoencoderKLConfig, Taesd};

const BATCH: usize = 8;

fn time<B: Backend>(model: &dyn Autoencoder<B>, z: &Tensor<B, 4>, reps: usize) -> Duration {
    let run = || {
        let images = model.decode_sliced(z.clone(), BATCH);
        let _: f32 = images.slice([0..1, 0..1, 0..1, 0..1]).into_scalar().elem();
    };
    common::median_time(reps, run)
}

/// Both decoders, median of `reps` runs.
struct Decoders {
    reps: usize,
}

impl BackendBench for Decoders {
    fn run<B: Backend>(&self, backend: &str, device: &B::Device) {
        let Self { reps } = *self;
        let z = Tensor::<B, 4>::random([BATCH, 4, 32, 32], Distribution::Normal(0.0, 1.0), device);
        let kl = AutoencoderKLConfig::sd_vae_ft_mse().init::<B>(device);
        let taesd = Taesd::<B>::init(device);
        let kl_time = time::<B>(&kl, &z, reps);
        let taesd_time = time::<B>(&taesd, &z, reps);
        for (name, t) in [("KL (sd-vae-ft-mse)", kl_time), ("TAESD", taesd_time)] {
            println!(
                "{backend:5} decode {BATCH}×4×32×32 {name:18}: {:9.1} ms  {:8.2} images/s",
                t.as_secs_f64() * 1e3,
                BATCH as f64 / t.as_secs_f64()
            );
        }
        println!(
            "{backend:5} TAESD is {:.1}× faster than the KL decoder",
            kl_time.as_secs_f64() / taesd_time.as_secs_f64()
        );
    }
}

fn main() {
    common::for_each_backend(&Decoders { reps: common::env_number("LFM_BENCH_REPS", 3) });
}
