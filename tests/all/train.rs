//! One training step against `golden/fm_loss`: the loss, every gradient and the parameters after AdamW.

use burn::backend::Autodiff;
use burn::tensor::{backend::AutodiffBackend, Tensor};
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::{read_safetensors, read_weights};
use lfm::models::{ModelConfig, VelocityModel};
use lfm::train::{lfm_adamw, Batch, Step, Trainer};

use crate::common::*;

/// One step of our own trainer in float64 on the CPU: the exact step, to float32's eye. It is checked against PyTorch's
/// float32 gradients (whose own rounding is then all that differs) and it judges each float32 backend by the same
/// rule: no further from the exact gradient than a few times PyTorch's float32 rounding.
pub(crate) fn float64_gradients() -> lfm::checkpoint::TensorMap {
    use burn::tensor::DType::F64;
    type A = Autodiff<burn::backend::NdArray<f64>>;
    // The ndarray device's default float dtype is f32 (set by whichever backend touched it first, and shared by
    // both element types), so the weights and inputs are cast explicitly.
    let (io, device) = (io("fm_loss"), Default::default());
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny"));
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    let model = lfm::models::precision::cast_module(VelocityModel::<A>::load(&config, &weights, &device).unwrap(), F64);
    let input = |name| tensor::<A, 4>(get(&io, name), &device).cast(F64);
    let batch = Batch::new(input("train.z0"), input("train.z1"), tensor(get(&io, "train.t"), &device).cast(F64), None);
    Trainer::new(model, lfm_adamw()).step(Step::new(batch, 1e-4).keeping_grads()).unwrap().grads.unwrap()
}

/// The largest |a − b| over two equally long slices.
pub(crate) fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

pub(crate) fn training_step<B: AutodiffBackend>(device: &B::Device, param_abs: f64) {
    let io = io("fm_loss");
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny"));
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    let model = VelocityModel::<B>::load(&config, &weights, device).unwrap();
    // The forward pass in train mode (no label dropout for this model) is the reference's.
    let v = model.forward(tensor(get(&io, "train.t"), device), tensor(get(&io, "train.x_t"), device), None);
    assert_close("train.v", &values(v), &get(&io, "train.v").to_f32(), 1e-5, 1e-6);

    let mut trainer = Trainer::new(model, lfm_adamw());
    let batch = Batch::new(
        tensor(get(&io, "train.z0"), device),
        tensor(get(&io, "train.z1"), device),
        tensor(get(&io, "train.t"), device),
        None,
    );
    let report = trainer.step(Step::new(batch, 1e-4).keeping_grads()).unwrap();
    let want_loss = get(&io, "train.loss").to_f32()[0] as f64;
    assert!((report.loss - want_loss).abs() <= 1e-5 * want_loss, "loss {} vs {want_loss}", report.loss);

    let grads = report.grads.unwrap();
    let (golden_grads, _) = read_safetensors(&fixture("fm_loss/grads.safetensors")).unwrap();
    assert_eq!(grads.keys().collect::<Vec<_>>(), golden_grads.keys().collect::<Vec<_>>(), "parameters with a gradient");
    let exact = float64_gradients();
    for (key, want) in &golden_grads {
        assert_eq!(grads[key].shape, want.shape, "{key}");
        let (exact, reference, got) = (exact[key].to_f64(), want.to_f64(), grads[key].to_f64());
        let scale = exact.iter().fold(0f64, |m, g| m.max(g.abs()));
        // Our float64 step is PyTorch's: they differ by PyTorch's float32 rounding alone (≤ 6e-7 of the scale seen).
        let reference_error = max_diff(&reference, &exact);
        assert!(reference_error <= 1e-5 * scale, "grad {key}: float64 vs PyTorch differ by {reference_error:e}");
        // Float32 here rounds in another order than PyTorch's but no worse (at most 3× its error, 7e-7 seen).
        let error = max_diff(&got, &exact);
        assert!(
            error <= 2.0 * reference_error + 1e-6 * scale,
            "grad {key}: {error:e} from the exact gradient, PyTorch's float32 is {reference_error:e} from it"
        );
    }

    // Below this |g| the gradients' float32 rounding (up to 1e-6 of their tensor's largest value) is a sizeable part.
    const SENSITIVE: f32 = 1e-6;
    // AdamW's first step moves each element by lr·g/(|g| + eps): ±lr where |g| ≫ eps = 1e-8, but where |g| is
    // within a few orders of eps the step depends on the last bits of g, which float32 backprop does not fix. Those
    // elements are only held to the step bound |Δ| ≤ lr.
    let (after, _) = read_safetensors(&fixture("fm_loss/after_step.safetensors")).unwrap();
    let params = trainer.model().state_dict();
    let mut sensitive = 0;
    for (key, want) in &after {
        let (got, want, before) = (params[key].to_f32(), want.to_f32(), weights[key].to_f32());
        let grad = golden_grads.get(key).map(|g| g.to_f32());
        for i in 0..want.len() {
            let g = grad.as_ref().map_or(0.0, |g| g[i].abs());
            if g >= SENSITIVE || grad.is_none() {
                let diff = (got[i] - want[i]).abs() as f64;
                assert!(diff <= param_abs, "{key}[{i}] after the step: got {}, ref {} (|g| = {g:e})", got[i], want[i]);
            } else {
                sensitive += 1;
                assert!((got[i] - before[i]).abs() <= 1.0001e-4, "{key}[{i}] moved by more than lr");
            }
        }
    }
    eprintln!(
        "{sensitive} of {} parameters have |g| < {SENSITIVE:e} and are held only to the step bound",
        params.values().map(|t| t.numel()).sum::<usize>()
    );
}

#[test]
fn one_training_step_matches_the_reference_on_cpu() {
    training_step::<Autodiff<Cpu>>(&cpu(), 1e-6);
}

#[test]
fn one_training_step_matches_the_reference_on_wgpu() {
    let Some(device) = wgpu() else { return };
    training_step::<Autodiff<Wgpu>>(&device, 1e-6);
}

/// The CPU backend divides exactly: Burn's autodiff takes the gradient of every division and log through `recip`,
/// which burn-ndarray's `simd` feature computes with the CPU's approximate reciprocal (x86 `rcpps`, 12 bits, and
/// different on AMD and Intel). With it, CPU training gradients were 2e-4 off (and host-dependent); lfm builds
/// burn-ndarray without that feature.
#[test]
fn the_cpu_backend_divides_to_float32_precision() {
    type A = Autodiff<Cpu>;
    let device = cpu();
    let (a, b): (Vec<f32>, Vec<f32>) =
        (0..4096).map(|i| ((i as f32 * 0.731).sin() * 3.0, 0.5 + (i as f32 * 0.37).cos().abs())).unzip();
    let from = |v: &[f32]| Tensor::<A, 1>::from_floats(v, &device).require_grad();
    let (ta, tb) = (from(&a), from(&b));
    let recip: Vec<f32> = tb.clone().inner().recip().into_data().to_vec().unwrap();
    let loss = (ta.clone() / tb.clone()).sum() + tb.clone().log().sum();
    let grads = loss.backward();
    let (ga, gb): (Vec<f32>, Vec<f32>) = (
        ta.grad(&grads).unwrap().into_data().to_vec().unwrap(),
        tb.grad(&grads).unwrap().into_data().to_vec().unwrap(),
    );
    for i in 0..a.len() {
        let (x, y) = (a[i] as f64, b[i] as f64);
        // d(x/y)/dx = 1/y; d(x/y + ln y)/dy = −x/y² + 1/y; each within a few float32 roundings.
        for (what, got, want) in
            [("recip", recip[i], 1.0 / y), ("d/da", ga[i], 1.0 / y), ("d/db", gb[i], 1.0 / y - x / (y * y))]
        {
            let bound = 4.0 * f32::EPSILON as f64 * (1.0 / y + (x / (y * y)).abs());
            assert!((got as f64 - want).abs() <= bound, "{what} of element {i}: {got} vs {want}");
        }
    }
}

/// A tiny image folder (16×16 colour patterns; vae_tiny encodes them to 4×8×8) plus one corrupt file.
/// The moving average after two steps with decay 0.75 is 0.75·(0.75·w0 + 0.25·w1) + 0.25·w2, from the weights
/// the trainer actually had.
#[test]
fn the_moving_average_follows_its_definition() {
    type A = Autodiff<Cpu>;
    let device = cpu();
    let io = io("fm_loss");
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny"));
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    let model = VelocityModel::<A>::load(&config, &weights, &device).unwrap();
    let mut trainer = Trainer::new(model, lfm_adamw()).with_ema(0.75);
    let batch = || {
        Batch::<A>::new(
            tensor(get(&io, "train.z0"), &device),
            tensor(get(&io, "train.z1"), &device),
            tensor(get(&io, "train.t"), &device),
            None,
        )
    };
    let mut seen = vec![trainer.model().state_dict()];
    for _ in 0..2 {
        trainer.step(Step::new(batch(), 1e-2)).unwrap();
        seen.push(trainer.model().state_dict());
    }
    let ema = trainer.ema().unwrap().state_dict();
    for (key, got) in &ema {
        let w: Vec<Vec<f32>> = seen.iter().map(|s| s[key].to_f32()).collect();
        let want: Vec<f32> =
            (0..w[0].len()).map(|i| 0.75 * (0.75 * w[0][i] + 0.25 * w[1][i]) + 0.25 * w[2][i]).collect();
        assert_close(&format!("EMA {key}"), &got.to_f32(), &want, 1e-6, 1e-7);
    }
    // The steps really moved the weights, so the check is not vacuous.
    assert_ne!(seen[0]["x_embedder.proj.weight"].to_f32(), seen[2]["x_embedder.proj.weight"].to_f32());
}

pub(crate) fn image_folder(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("images");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    for i in 0..12u8 {
        let pixels = (0..16 * 16).flat_map(|p| {
            let (x, y) = (p % 16, p / 16);
            let on = (x / 4 + y / 4 + i as usize).is_multiple_of(2);
            if on {
                [200, 40 + 15 * i, 90]
            } else {
                [20, 60, 180 - 10 * i]
            }
        });
        let image = lfm::image::RgbImage { width: 16, height: 16, pixels: pixels.collect() };
        let folder = if i % 3 == 0 { data.join("sub") } else { data.clone() };
        lfm::image::write_rgb(&folder.join(format!("{i:02}.png")), &image).unwrap();
    }
    std::fs::write(data.join("corrupt.png"), b"not a png at all").unwrap();
    data
}

pub(crate) fn train_args<'a>(
    dir: &'a str,
    data: &'a str,
    vae: &'a str,
    vae_config: &'a str,
    config: &'a str,
) -> Vec<&'a str> {
    vec![
        "--backend",
        "cpu",
        "train",
        "--data",
        data,
        "--image-size",
        "16",
        "--weights",
        vae,
        "--vae-config",
        vae_config,
        "--config",
        config,
        "--out",
        dir,
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
    ]
}

pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    pub root: std::path::PathBuf,
    pub data: String,
    pub vae: String,
    pub vae_config: String,
    pub config: String,
}

pub(crate) fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = image_folder(&root).to_str().unwrap().to_string();
    let vae_config = root.join("vae.json");
    std::fs::write(&vae_config, constructor_kwargs("vae_tiny").to_string()).unwrap();
    let config = root.join("dit.json");
    std::fs::write(&config, ModelConfig::Dit(crate::dit::config("dit_tiny")).to_json()).unwrap();
    Setup {
        _dir: dir,
        data,
        vae: fixture("vae_tiny/model.safetensors").to_str().unwrap().to_string(),
        vae_config: vae_config.to_str().unwrap().to_string(),
        config: config.to_str().unwrap().to_string(),
        root,
    }
}

/// One column of a run's `metrics.jsonl`, a value per logged step.
pub(crate) fn metric(out: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64().unwrap())
        .collect()
}

pub(crate) fn losses(out: &std::path::Path) -> Vec<f64> {
    metric(out, "loss")
}

#[test]
fn training_on_an_image_folder_lowers_the_loss_and_skips_corrupt_images() {
    let s = setup();
    let out = s.root.join("run");
    let mut args = train_args(out.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-steps", "30", "--save-every", "10", "--warmup-steps", "4", "--grad-accum", "2"]);
    args.extend_from_slice(&["--max-grad-norm", "100"]);
    let (ok, stdout, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained 30 steps on 13 examples"), "{stdout}");
    // The warm-up ramps the learning rate over the first 4 steps.
    let lrs = metric(&out, "lr");
    assert_close_f64("warm-up learning rates", &lrs[..6], &[2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], 1e-12);
    assert!(stderr.contains("skipping an unreadable image") && stderr.contains("corrupt.png"), "{stderr}");
    // Every step logs its global gradient norm.
    let norms = metric(&out, "grad_norm");
    assert!(norms.iter().all(|g| g.is_finite() && *g > 0.0), "{norms:?}");
    let loss = losses(&out);
    assert_eq!(loss.len(), 30);
    let (first, last) = (loss[..5].iter().sum::<f64>() / 5.0, loss[25..].iter().sum::<f64>() / 5.0);
    assert!(last < 0.8 * first, "loss went from {first:.4} to {last:.4}");
    let state = lfm::train::state::read_state(&out).unwrap().unwrap();
    assert!(state.unreadable_images > 0);
    // The weights load for sampling with no flags.
    let weights = read_weights(&out.join("model.safetensors")).unwrap();
    assert!(weights.config_json.is_some());
    // A second run into the same folder must not clobber it.
    let (ok, _, stderr) = lfm(&args);
    assert!(!ok && stderr.contains("pass --resume"), "{stderr}");
    // Impossible accumulation or clipping settings are refused before any work.
    let other = s.root.join("other");
    for (flag, value, complaint) in
        [("--grad-accum", "5", "between 1 and"), ("--max-grad-norm", "0", "must be a finite number > 0")]
    {
        let mut bad = train_args(other.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
        bad.extend_from_slice(&[flag, value]);
        let (ok, _, stderr) = lfm(&bad);
        assert!(!ok && stderr.contains(complaint), "{flag} {value}: {stderr}");
    }
}

/// `--data-parallel 2` (two copies of the network, here sharing the CPU, each taking half of every batch in its own
/// thread, gradients summed on the first) ends with the weights of one device taking the same two micro-batches
/// with `--grad-accum 2`; asking for more GPUs than exist, or for several processes on the cpu backend without MPI,
/// is refused. (Several processes under MPI: `tests/all/mpi.rs`.)
#[test]
fn data_parallel_training_equals_one_device_with_the_same_micro_batches() {
    let s = setup();
    let run = |name: &str, steps: &str, extra: &[&str]| {
        let out = s.root.join(name);
        let mut args = train_args(out.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
        args.extend_from_slice(&["--max-steps", steps, "--max-grad-norm", "0.5"]);
        args.extend_from_slice(extra);
        let (ok, _, stderr) = lfm(&args);
        assert!(ok, "{stderr}");
        let split = stderr.contains("data parallel: each step's batch split over [Cpu, Cpu]");
        assert_eq!(split, extra.contains(&"--data-parallel"), "{stderr}");
        (read_safetensors(&out.join("model.safetensors")).unwrap().0, losses(&out))
    };
    let (one, one_losses) = run("one-device", "3", &["--grad-accum", "2"]);
    let (two, two_losses) = run("two-devices", "3", &["--data-parallel", "2"]);
    assert_close_f64("losses", &two_losses, &one_losses, 1e-6);
    assert_eq!(one.len(), two.len());
    for (key, tensor) in &one {
        assert_close(&format!("{key} after 3 steps"), &two[key].to_f32(), &tensor.to_f32(), 1e-6, 1e-7);
    }
    // The later steps moved the weights, so the comparison covers more than one update.
    let (first, _) = run("one-step", "1", &["--grad-accum", "2"]);
    assert!(one.iter().any(|(key, t)| t.to_f32() != first[key].to_f32()));

    // Several processes without MPI are for CUDA (NCCL); on the cpu backend they need MPI.
    let refused = [
        (&["--nodes", "2", "--node-rank", "2"][..], "RANK counts from 0"),
        (&["--node-rank", "1"][..], "needs --nodes"),
        (&["--nodes", "2", "--node-timeout", "1"][..], "without MPI is for CUDA"),
    ];
    let bad_node = s.root.join("bad-node");
    for (flags, complaint) in refused {
        let mut args = train_args(bad_node.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
        args.extend_from_slice(flags);
        let (ok, _, stderr) = lfm(&args);
        assert!(!ok && stderr.contains(complaint), "{flags:?}: {stderr}");
    }

    let out = s.root.join("too-many");
    let mut args = train_args(out.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args[1] = "wgpu";
    args.extend_from_slice(&["--max-steps", "1", "--data-parallel", "2"]);
    let (ok, _, stderr) = lfm(&args);
    assert!(!ok && (stderr.contains("--data-parallel 2 needs 2") || stderr.contains("no GPU adapter")), "{stderr}");
    let mut args = train_args(out.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-steps", "1", "--data-parallel", "3", "--grad-accum", "2"]);
    let (ok, _, stderr) = lfm(&args);
    assert!(!ok && stderr.contains("every device needs at least one example"), "{stderr}");
}

#[test]
fn a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let s = setup();
    let steps = ["--max-steps", "40", "--save-every", "5", "--ema-decay", "0.9"];
    let straight = s.root.join("straight");
    let mut args = train_args(straight.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&steps);
    let (ok, _, stderr) = lfm(&args);
    assert!(ok, "{stderr}");

    let killed = s.root.join("killed");
    let mut args = train_args(killed.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&steps);
    let mut child = std::process::Command::new(crate::common::lfm_bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let killed_at = loop {
        if let Ok(Some(state)) = lfm::train::state::read_state(&killed) {
            if state.step >= 10 {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break state.step;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(killed_at < 40, "killed at step {killed_at}");
    // A step logged after the checkpoint (the kill may land before or after the next line): the resumed run
    // takes it again, and the log keeps each step once.
    let log = killed.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&format!("{{\"step\":{},\"loss\":1.0}}\n", killed_at + 1));
    std::fs::write(&log, text).unwrap();
    args.push("--resume");
    let (ok, _, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    let logged: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=40).collect::<Vec<u64>>(), "metrics.jsonl after kill -9 at step {killed_at} and --resume");
    // The weights and their moving average.
    for file in ["model.safetensors", "ema.safetensors"] {
        let a = read_weights(&straight.join(file)).unwrap().tensors;
        let b = read_weights(&killed.join(file)).unwrap().tensors;
        for (key, tensor) in &a {
            assert_eq!(tensor.to_f32(), b[key].to_f32(), "{file}: {key} differs after kill -9 at step {killed_at}");
        }
    }
    // Resuming with another EMA decay is refused.
    let mut other = args.clone();
    let at = other.iter().position(|a| *a == "0.9").unwrap();
    other[at] = "0.99";
    let (ok, _, stderr) = lfm(&other);
    assert!(!ok && stderr.contains("EMA decay"), "{stderr}");

    // A damaged checkpoint is refused clearly.
    let state = lfm::train::state::read_state(&killed).unwrap().unwrap();
    let file = lfm::train::state::StateFolder::of(&killed).path().join(&state.model_file);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, stderr) = lfm(&args);
    assert!(!ok && stderr.contains("damaged"), "{stderr}");
}

/// Writes an IDX file of bytes (optionally gzipped).
pub fn write_idx(path: &std::path::Path, dims: &[u32], data: &[u8], gzip: bool) {
    use std::io::Write;
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    let bytes = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&bytes).unwrap();
        encoder.finish().unwrap()
    } else {
        bytes
    };
    std::fs::write(path, bytes).unwrap();
}

/// MNIST-style IDX files (images plain, labels gzipped, as the Debian package ships them gzipped): read with their
/// labels, then trained on for a few steps; damaged files are refused clearly.
#[test]
fn idx_datasets_load_and_train() {
    use lfm::data::{idx_images, load_image, Source};
    let s = setup();
    let (n, side) = (6usize, 16usize);
    let pixels: Vec<u8> = (0..n * side * side).map(|i| (i * 37 % 251) as u8).collect();
    let images = s.root.join("train-images-idx3-ubyte");
    write_idx(&images, &[n as u32, side as u32, side as u32], &pixels, false);
    write_idx(&s.root.join("train-labels-idx1-ubyte"), &[n as u32], &[0; 6], true);
    let source = idx_images(&images, side).unwrap();
    assert_eq!(source.len(), n);
    assert_eq!(source.labels(), Some(&[0i64; 6][..]));
    let Source::Images { items, .. } = &source else { panic!("images") };
    let third = load_image(&items[2], side, false).unwrap();
    let want: Vec<u8> = pixels[2 * side * side..3 * side * side].iter().flat_map(|&p| [p, p, p]).collect();
    assert_eq!(third.pixels, want, "grey pixels become equal RGB channels");

    let out = s.root.join("idx-run");
    let mut args = train_args(out.to_str().unwrap(), images.to_str().unwrap(), &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-steps", "3", "--cosine-per-step", "--min-lr", "0"]);
    let (ok, stdout, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained 3 steps on 6 examples"), "{stdout}");
    // The per-step cosine over 3 steps: (1 + cos(π·k/3)) / 2 = 1, 3/4, 1/4 of --lr 1e-3 (LFM's --cosine would hold
    // 1e-3 for the whole epoch).
    let lrs = metric(&out, "lr");
    assert_close_f64("per-step cosine learning rates", &lrs, &[1e-3, 7.5e-4, 2.5e-4], 1e-12);
    // The same first two steps with logit-normal times: only the times differ (same data, noise, weights and first
    // learning rate). The zero-initialised output layer makes the first loss independent of them; the second
    // differs. The run's settings record the distribution.
    let logit = s.root.join("idx-logit-normal");
    let mut args = train_args(logit.to_str().unwrap(), images.to_str().unwrap(), &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-steps", "2", "--time-sampling", "logit-normal:0.5:0.7"]);
    let (ok, _, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    let (uniform, logit_normal) = (metric(&out, "loss"), metric(&logit, "loss"));
    assert_eq!(uniform[0], logit_normal[0], "the first loss, of a zero output, depends on no time");
    assert!((uniform[1] - logit_normal[1]).abs() > 1e-6, "second losses {} and {}", uniform[1], logit_normal[1]);
    let state = std::fs::read_to_string(logit.join("train-state/state.json")).unwrap();
    assert!(state.contains("\"logit-normal\"") && state.contains("0.7"), "{state}");

    let cut = s.root.join("cut-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    let err = idx_images(&cut, side).unwrap_err();
    assert!(err.contains("truncated"), "{err}");
}

/// Gradient accumulation: two micro-batches give the loss, gradient norm and update of the whole batch. The global
/// norm is the L2 norm of every gradient together (recomputed here on the host from the per-key gradients), and
/// clipping to a quarter of it scales them all to exactly that norm.
#[test]
fn accumulated_micro_batches_and_global_norm_clipping_match_their_definitions() {
    use burn::optim::GradientsParams;
    use lfm::train::grads::{clip_global_norm, global_norm};
    type A = Autodiff<Cpu>;
    let device = cpu();
    let io = io("fm_loss");
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny"));
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    let load = || VelocityModel::<A>::load(&config, &weights, &device).unwrap();
    let part = |start: usize, len: usize| {
        Batch::<A>::new(
            tensor::<A, 4>(get(&io, "train.z0"), &device).narrow(0, start, len),
            tensor::<A, 4>(get(&io, "train.z1"), &device).narrow(0, start, len),
            tensor::<A, 1>(get(&io, "train.t"), &device).narrow(0, start, len),
            None,
        )
    };
    let lr = 1e-3;
    let mut whole = Trainer::new(load(), lfm_adamw());
    let report = whole.step(Step::new(part(0, 4), lr).keeping_grads()).unwrap();
    let grads = report.grads.unwrap();
    let want_norm = grads.values().flat_map(|g| g.to_f32()).map(|g| (g as f64).powi(2)).sum::<f64>().sqrt();

    // Micro-batches of 1 and 3 samples: the mean is weighted by size, not by micro-batch.
    let mut split = Trainer::new(load(), lfm_adamw());
    let accumulated = split.step(Step::accumulated(vec![part(0, 1), part(1, 3)], lr).clipped(None)).unwrap();
    assert!((accumulated.loss - report.loss).abs() <= 1e-6 * report.loss, "{} vs {}", accumulated.loss, report.loss);
    let norm = accumulated.grad_norm.unwrap();
    assert!((norm - want_norm).abs() <= 1e-5 * want_norm, "global norm {norm} vs {want_norm}");
    // AdamW's first step moves an element by lr·g/(|g| + ε): summing the micro-batches in another order changes g by
    // a float32 rounding δ, which moves the step by lr·ε·δ/(|g| + ε)² — nothing where |g| ≫ ε, up to the whole
    // ±lr range where |g| is near ε. δ is taken as 1e-6 of the tensor's largest |g| (2e-8 seen), and 1e-6 is the
    // parameters' own float32 rounding.
    let eps = 1e-8;
    let (a, b) = (whole.model().state_dict(), split.model().state_dict());
    for (key, want) in &a {
        let g = grads.get(key).map(|g| g.to_f64());
        let rounding = g.as_ref().map_or(0.0, |g| 1e-6 * g.iter().fold(0f64, |m, v| m.max(v.abs())));
        for (i, (got, want)) in b[key].to_f64().iter().zip(want.to_f64()).enumerate() {
            let g = g.as_ref().map_or(0.0, |g| g[i].abs());
            let bound = 1e-6 + (lr * eps * rounding / (g + eps).powi(2)).min(2.0 * lr);
            assert!((got - want).abs() <= bound, "{key}[{i}]: accumulated {got} vs whole batch {want} (|g| = {g:e})");
        }
    }

    // Clipping to a quarter of the norm.
    let model = load();
    let loss = lfm::train::flow_matching_loss(&model, part(0, 4));
    let mut params = GradientsParams::from_grads(loss.backward(), &model);
    let before = clip_global_norm::<A, _>(&model, &mut params, want_norm / 4.0);
    assert!((before - want_norm).abs() <= 1e-5 * want_norm, "{before} vs {want_norm}");
    let after = global_norm::<A, _>(&model, &params);
    assert!((after - want_norm / 4.0).abs() <= 1e-5 * want_norm, "clipped norm {after}, want {}", want_norm / 4.0);
    // A bound above the norm leaves the gradients alone.
    let unchanged = clip_global_norm::<A, _>(&model, &mut params, want_norm);
    assert!((global_norm::<A, _>(&model, &params) - unchanged).abs() <= 1e-9 * want_norm);
}

/// `--preview-every`: a 4×4 grid of the moving average's samples at the chosen steps and at the end, from the same
/// noise each time; refused where it cannot sample (a task with inputs).
#[test]
fn previews_show_the_same_noise_improving() {
    let s = setup();
    let out = s.root.join("run");
    let mut args = train_args(out.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-steps", "5", "--preview-every", "2", "--ema-decay", "0.5"]);
    let (ok, _, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    let names: Vec<String> = std::fs::read_dir(out.join("previews"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["step-000000002.png", "step-000000004.png", "step-000000005.png"]);
    let read = |name: &str| lfm::image::read_rgb(&out.join("previews").join(name)).unwrap();
    let (early, late) = (read("step-000000002.png"), read("step-000000005.png"));
    // 16 samples of 16 px, four per row with 2-px padding.
    assert_eq!((early.width, early.height), (4 * 18 + 2, 4 * 18 + 2));
    assert_ne!(early.pixels, late.pixels, "the model moved between the previews");

    let inpaint = s.root.join("inpaint");
    let mut args = train_args(inpaint.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-steps", "1", "--preview-every", "1", "--task", "inpaint"]);
    let (ok, _, stderr) = lfm(&args);
    assert!(!ok && stderr.contains("--preview-every samples unconditional or class-conditional models"), "{stderr}");
}
