//! The CPU backend's 2-D convolutions at inference: Burn 0.21's own ndarray `conv2d` (a direct loop, the baseline
//! measured in the same run), lfm's im2col from Burn tensor ops (`nn::conv2d_im2col`, what autodiff uses) and
//! lfm's kernel (`nn::cpu`: im2col on raw slices + the `gemm` crate, what inference uses), on the layer shapes
//! that dominate FID (Inception) and decoding (the KL decoder).
//!
//! A plain harness: one warm-up, then `LFM_BENCH_REPS` (default 3) timed runs, median reported; batches of
//! `LFM_BENCH_BATCH` (default 4). Run: `cargo bench --features cuda --profile dev --bench cpu_conv`.

mod common;

use burn::backend::ndarray::NdArrayDevice;
use burn::tensor::{Distribution, Tensor};
use lfm::backend::Cpu;
use lfm::nn::Activation;

/// One layer: name, input `[C, H, W]`, output channels, kernel, stride, padding.
type Layer = (&'static str, [usize; 3], usize, [usize; 2], usize, [usize; 2]);

const LAYERS: [Layer; 5] = [
    ("Inception Conv2d_2b 3×3", [32, 147, 147], 64, [3, 3], 1, [1, 1]),
    ("Inception Conv2d_1a 3×3/2", [3, 299, 299], 32, [3, 3], 2, [0, 0]),
    ("Inception Mixed_6 7×1", [160, 17, 17], 160, [7, 1], 1, [3, 0]),
    ("Inception Mixed_7 1×1", [1280, 8, 8], 320, [1, 1], 1, [0, 0]),
    ("KL decoder 3×3 at 64²", [128, 64, 64], 128, [3, 3], 1, [1, 1]),
];

fn main() {
    let batch = common::env_number("LFM_BENCH_BATCH", 4);
    let reps = common::env_number("LFM_BENCH_REPS", 3);
    let device = NdArrayDevice::Cpu;
    for (name, [c, h, w], out, kernel, stride, padding) in LAYERS {
        let x = Tensor::<Cpu, 4>::random([batch, c, h, w], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<Cpu, 4>::random([out, c, kernel[0], kernel[1]], Distribution::Normal(0.0, 0.1), &device);
        let bias = Tensor::<Cpu, 1>::random([out], Distribution::Normal(0.0, 0.1), &device);
        let options = burn::tensor::ops::ConvOptions::new([stride, stride], padding, [1, 1], 1);
        let burn_direct = common::median_time(reps, || {
            burn::tensor::module::conv2d(x.clone(), weight.clone(), Some(bias.clone()), options.clone());
        });
        let im2col = common::median_time(reps, || {
            lfm::nn::conv2d_im2col(x.clone(), weight.clone(), Some(bias.clone()), stride, padding);
        });
        let kernel_time = common::median_time(reps, || {
            lfm::nn::cpu::conv2d(x.clone(), weight.clone(), Some(bias.clone()), stride, padding, Activation::None);
        });
        let [ho, wo] = [(h + 2 * padding[0] - kernel[0]) / stride + 1, (w + 2 * padding[1] - kernel[1]) / stride + 1];
        let flops = 2.0 * (batch * out * ho * wo * c * kernel[0] * kernel[1]) as f64;
        for (method, t) in
            [("Burn conv2d (baseline)", burn_direct), ("im2col, Burn ops", im2col), ("lfm kernel", kernel_time)]
        {
            println!(
                "cpu   {name:26} batch {batch}: {method:22} {:9.1} ms {:6.1} GFLOP/s  {:5.2}× baseline",
                t.as_secs_f64() * 1e3,
                flops / t.as_secs_f64() / 1e9,
                burn_direct.as_secs_f64() / t.as_secs_f64()
            );
        }
    }
}
