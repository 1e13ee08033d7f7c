//! End-to-end sampling cost: seconds per image and NFE for DiT-B/2 (random weights, every layer non-zero) with
//! dopri5 at rtol = atol = 1e-5 and with euler at 100 steps, at several batch sizes, on cpu and wgpu.
//!
//! A DiT-B/2 forward pass costs 46 GFLOP per image, so a full run is hours on a 2-core CPU or on lavapipe; choose the
//! cases with `LFM_BENCH_BATCHES` (default `1,16`), `LFM_BENCH_BACKENDS` (default `cpu,wgpu`) and
//! `LFM_BENCH_SOLVERS` (default `dopri5,euler`). One solve per case (a solve is many forward passes).
//! Run: `cargo bench --features cuda --profile dev --bench sampling`.

use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
use lfm::backend::{Cpu, Wgpu, WgpuDevice};
use lfm::checkpoint::{collect_weights, HostTensor};
use lfm::models::dit::dit_keys;
use lfm::models::{DiT, DiTConfig, ModelConfig, VelocityModel};
use lfm::sample::{noise, sample_batch, BatchInput, Guidance};
use lfm::solver::{Grid, Method, SolveOptions};

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().to_string()).collect()
}

/// DiT-B/2 with every parameter drawn as the golden fixtures draw them (N(0,1)·clamp(1/√fan_in, 0.02, 0.2) for
/// matrices, 0.05·N(0,1) for vectors), so that the velocity field is not the zero of DiT's initialisation.
fn random_dit<B: Backend>(config: &DiTConfig, device: &B::Device) -> VelocityModel<B> {
    let mut weights = collect_weights(&config.init::<Cpu>(&Default::default()), &dit_keys());
    for (key, tensor) in weights.iter_mut() {
        if key == "pos_embed" {
            continue;
        }
        let scale = if tensor.shape.len() >= 2 {
            let fan_in = tensor.numel() / tensor.shape[0];
            (1.0 / (fan_in as f64).sqrt()).clamp(0.02, 0.2)
        } else {
            0.05
        };
        let values = Tensor::<Cpu, 1>::random([tensor.numel()], Distribution::Normal(0.0, scale), &Default::default());
        *tensor = HostTensor::f32(tensor.shape.clone(), values.into_data().convert::<f32>().into_vec().unwrap());
    }
    VelocityModel::Dit(DiT::load(config, &weights, device).expect("weights of the config"))
}

fn bench_backend<B: Backend>(backend: &str, device: &B::Device) {
    let config = DiTConfig::named("DiT-B/2", 32, 4, 1, 0.0).expect("named size");
    let model = random_dit::<B>(&config, device);
    let flops = ModelConfig::Dit(config).flops();
    for batch in list("LFM_BENCH_BATCHES", "1,16").iter().filter_map(|b| b.parse::<usize>().ok()) {
        for solver in list("LFM_BENCH_SOLVERS", "dopri5,euler") {
            let options = match solver.as_str() {
                "euler" => SolveOptions { method: Method::Euler, grid: Grid::Steps(100), ..Default::default() },
                _ => SolveOptions::default(),
            };
            let input =
                BatchInput { noise: noise::<B>(0, 0, batch, [4, 32, 32], device), labels: None, condition: None };
            let guidance = Guidance { cfg_scale: None, null_label: 0 };
            let out = sample_batch(&model, input, &guidance, &options, &mut |_, _| {}).expect("solve");
            let _: f32 = out.latents.sum().into_scalar().elem();
            let per_image = out.seconds / batch as f64;
            println!(
                "{backend:5} DiT-B/2 {solver:6} batch {batch:2}: NFE {:4}, {:8.2} s per image, {:6.1} GFLOP/s",
                out.stats.nfe,
                per_image,
                flops * out.stats.nfe as f64 / per_image / 1e9
            );
        }
    }
}

fn main() {
    let backends = list("LFM_BENCH_BACKENDS", "cpu,wgpu");
    if backends.iter().any(|b| b == "cpu") {
        bench_backend::<Cpu>("cpu", &Default::default());
    }
    if backends.iter().any(|b| b == "wgpu") {
        if lfm::backend::wgpu_adapters().is_empty() {
            println!("wgpu: no adapter, skipped");
        } else {
            bench_backend::<Wgpu>("wgpu", &WgpuDevice::DefaultDevice);
        }
    }
}
