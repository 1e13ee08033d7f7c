//! The CUDA backend (cargo feature `cuda`) against the same references as cpu and wgpu: every path an ODE loop or a
//! training step takes — the three networks, the flow-matching loss, the solvers with and without lfm's fused
//! kernels, the kernels themselves, a full training step, `lfm sample` end to end — and 16-bit inference in f16 and
//! bf16. Each test skips with a message where no NVIDIA GPU is present (CI has none); run them on a GPU machine
//! with `LFM_REQUIRE_CUDA=1` so that they cannot pass by skipping, once as is (CUDA's default: Burn's kernels only)
//! and once with `LFM_CUDA_KERNELS=1` (lfm's kernels too, off by default on CUDA until such a run passes).

use burn::backend::Autodiff;
use burn::tensor::DType;
use lfm::backend::Cuda;
use lfm::models::{EdmUNet, Precision, UNetModel};

use crate::common::*;

#[test]
fn networks_match_their_references_on_cuda() {
    let Some(device) = cuda() else { return };
    crate::dit::unconditional::<Cuda>(&device, "model.safetensors", 1e-4);
    crate::dit::conditional::<Cuda>(&device, "model.pth", 1e-4);
    let unet = UNetModel::<Cuda>::load(&crate::unet::golden_config(), &crate::unet::golden_weights(), &device);
    crate::unet::check(&unet.unwrap(), &device, 1e-4);
    let edm = EdmUNet::<Cuda>::load(&crate::edm::golden_config(), &crate::edm::golden_weights(), &device);
    crate::edm::check(&edm.unwrap(), &device, 1e-4);
    crate::flow::check::<Cuda>(&device);
}

#[test]
fn networks_compute_in_f16_and_bf16_on_cuda() {
    let Some(device) = cuda() else { return };
    for precision in [Precision::F16, Precision::Bf16] {
        crate::dit::dit_and_cfg_in_half_precision::<Cuda>(&device, precision);
        crate::unet::guided_unet_in_half_precision::<Cuda>(&device, precision);
        crate::edm::edm_unet_in_half_precision::<Cuda>(&device, precision);
    }
}

/// lfm's kernels stay off on CUDA unless `LFM_CUDA_KERNELS=1` (they failed their first real-GPU run); wgpu keeps
/// them. Needs no GPU: it checks the dispatch, which every CUDA path consults.
#[test]
fn lfm_kernels_are_off_on_cuda_unless_asked_for() {
    use lfm_kernels::attention::has_fused_attention;
    let asked = std::env::var(lfm_kernels::CUDA_KERNELS_VAR).is_ok_and(|v| v == "1");
    assert_eq!(lfm_kernels::has_kernels::<Cuda>(), asked);
    assert_eq!(has_fused_attention::<Autodiff<Cuda>>(), asked);
    assert!(lfm_kernels::has_kernels::<lfm::backend::Wgpu>() && has_fused_attention::<Autodiff<lfm::backend::Wgpu>>());
}

/// f32 products stay f32 on CUDA by default (no TF32), values and gradients; prints how far Burn's own matmul,
/// which cubek runs in TF32 on tensor cores, lands from the same f64 reference.
#[test]
fn full_f32_matmul_matches_f64_on_cuda() {
    let Some(device) = cuda() else { return };
    assert!(
        lfm_kernels::matmul::full_f32_applies::<Cuda>() && lfm_kernels::matmul::full_f32_applies::<Autodiff<Cuda>>(),
        "run without LFM_TF32=1: this test checks the default"
    );
    crate::kernels::full_f32_matmul_matches::<Cuda>(&device);
    let burn_error = crate::kernels::burn_matmul_error::<Cuda>(&crate::kernels::PRODUCTS, &device);
    eprintln!("Burn's own matmul (TF32 where cubek picks tensor cores): largest relative error {burn_error:.2e}");
}

#[test]
fn fused_kernels_match_burn_on_cuda() {
    let Some(device) = cuda() else { return };
    if !lfm_kernels::cuda_kernels_enabled() {
        eprintln!("skipped: lfm's kernels are off on CUDA; run with LFM_CUDA_KERNELS=1 to test them");
        return;
    }
    assert!(lfm_kernels::has_kernels::<Cuda>() && lfm_kernels::attention::has_fused_attention::<Autodiff<Cuda>>());
    crate::kernels::linear_combinations_match::<Cuda>(&device);
    crate::kernels::error_ratios_match::<Cuda>(&device);
    crate::kernels::attention_matches::<Cuda>(&device);
    crate::kernels::attention_backward_matches::<Cuda>(&device);
    crate::kernels::fused_kernels_accumulate_in_f32::<Cuda>(&device, DType::F16, 5e-4);
    crate::kernels::fused_kernels_accumulate_in_f32::<Cuda>(&device, DType::BF16, 4e-3);
}

#[test]
fn solvers_with_dit_match_torchdiffeq_on_cuda_fused_and_unfused() {
    let Some(device) = cuda() else { return };
    for fused in [true, false] {
        crate::solver::dopri5_with_dit::<Cuda>(&device, 1e-4, fused);
        crate::solver::fixed_with_dit::<Cuda>(&device, 1e-4, fused);
    }
}

#[test]
fn one_training_step_matches_the_reference_on_cuda() {
    let Some(device) = cuda() else { return };
    crate::train::training_step::<Autodiff<Cuda>>(&device, 1e-6);
}

#[test]
fn sample_reproduces_the_golden_dopri5_run_on_cuda() {
    if cuda().is_some() {
        crate::sample::golden_dopri5("cuda", 1e-4);
    }
}

#[test]
fn sample_runs_in_f16_and_bf16_on_cuda() {
    if cuda().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = crate::sample::converted(dir.path(), "dit_tiny");
    let run = |precision: Precision| {
        let args = ["-n", "2", "--seed", "3", "--solver", "euler", "--steps", "4", "--precision", precision.name()];
        crate::sample::latents_on("cuda", dir.path(), &ckpt, &format!("{}.safetensors", precision.name()), &args)
    };
    let full = run(Precision::F32);
    for precision in [Precision::F16, Precision::Bf16] {
        assert_half_close("x0 after 4 euler steps", precision, &run(precision), &full, &full);
    }
}

#[test]
fn mixed_precision_training_steps_on_cuda() {
    let Some(device) = cuda() else { return };
    for precision in [Precision::F16, Precision::Bf16] {
        crate::mixed::mixed_precision_step::<Autodiff<Cuda>>(&device, precision);
    }
}

/// NCCL sums a buffer in place on the GPU: a communicator of one rank (its sum is the buffer itself) takes the path of
/// a run on several processes (NCCL's id, the communicator, the tensor's device pointer, NCCL's stream) on a view
/// that starts inside a larger allocation; then times sums of 256 MiB (one rank: the device's copy bandwidth, not a
/// network's; several GPUs run `mpirun -np N` with the `mpi` feature). Skips where libnccl.so is absent (NCCL is not
/// part of the driver), and says so.
#[test]
fn nccl_sums_in_place_on_cuda() {
    use burn::tensor::Tensor;
    use lfm::train::group::nccl;
    let Some(device) = cuda() else { return };
    if let Err(e) = nccl::check_available() {
        eprintln!("skipping NCCL: {e}");
        return;
    }
    let group = nccl::NcclGroup::join(&nccl::unique_id().unwrap(), 0, 1, device.index).unwrap();
    let host: Vec<f32> = (0..100_003).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
    let whole = Tensor::<Cuda, 1>::from_floats(host.as_slice(), &device);
    let view = whole.narrow(0, 3, 100_000);
    let summed = group.all_reduce_sum(view.clone()).unwrap();
    assert_eq!(values(summed), host[3..].to_vec());
    // In bf16 (`--allreduce-dtype bf16`): these values are exact in bf16.
    let summed = group.all_reduce_sum(view.cast(DType::BF16)).unwrap();
    assert_eq!(summed.dtype(), DType::BF16);
    assert_eq!(values(summed.cast(DType::F32)), host[3..].to_vec());
    let big = Tensor::<Cuda, 1>::ones([64 << 20], &device);
    let mut big = group.all_reduce_sum(big).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..10 {
        big = group.all_reduce_sum(big).unwrap();
    }
    let seconds = start.elapsed().as_secs_f64() / 10.0;
    eprintln!("NCCL all-reduce of 256 MiB on one rank: {:.2} ms, {:.1} GB/s", seconds * 1e3, 0.268435456 / seconds);
    assert_eq!(values(big.narrow(0, 0, 4)), vec![1.0; 4]);
}
