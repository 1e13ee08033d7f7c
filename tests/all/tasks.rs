//! LFM's downstream tasks: inpainting and semantic synthesis trained by `lfm train --task …`, the masks drawn as the
//! reference draws them, and the trained models sampled by `lfm sample`.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use lfm::autoencoder::Autoencoder;
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::{read_safetensors, read_weights};
use lfm::models::{ModelConfig, UNetConfig, VelocityModel};
use lfm::tasks::masks::{generate, MaskParams, MaskShapes};
use lfm::train::{lfm_adamw, Batch, Step, Trainer};
use rand::SeedableRng;

use crate::common::*;

/// The tiny UNet of the golden fixtures with `in_channels` inputs (4 latent + the task's condition).
fn unet_config(dir: &std::path::Path, in_channels: usize) -> String {
    let path = dir.join(format!("unet{in_channels}.json"));
    std::fs::write(
        &path,
        ModelConfig::GuidedUnet(UNetConfig { in_channels, ..crate::unet::golden_config() }).to_json(),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// `lfm train` on the synthetic 16×16 folder with the tiny VAE (16 px → 8×8×4 latents).
fn train_args(s: &crate::train::Setup, config: &str, out: &std::path::Path, task: &str) -> Vec<String> {
    [
        "--backend",
        "cpu",
        "train",
        "--task",
        task,
        "--data",
        &s.data,
        "--image-size",
        "16",
        "--weights",
        &s.vae,
        "--vae-config",
        &s.vae_config,
        "--config",
        config,
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "5",
    ]
    .map(String::from)
    .to_vec()
}

fn run(args: &[String], extra: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    lfm(&all)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn generated_masks_follow_the_reference_distribution() {
    let params = MaskParams::default();
    let (mut irregular, mut stroke_counts, mut pieces, mut box_counts) = (0, [0usize; 12], [0usize; 6], [0usize; 4]);
    let (mut widths, mut lengths, mut sides) = (Vec::new(), Vec::new(), Vec::new());
    let masks = 2000;
    for seed in 0..masks {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mask = generate(&mut rng, &params, 256, 256);
        assert_eq!(mask.canvas, (256, 256));
        let hole = |x: i64, y: i64| mask.hole[(y.min(255) * 256 + x.min(255)) as usize];
        match &mask.shapes {
            MaskShapes::Strokes(strokes) => {
                irregular += 1;
                stroke_counts[strokes.len()] += 1;
                for stroke in strokes {
                    pieces[stroke.len()] += 1;
                    for (k, s) in stroke.iter().enumerate() {
                        widths.push(s.width);
                        lengths.push(s.length);
                        assert!((0..=256).contains(&s.to.0) && (0..=256).contains(&s.to.1), "{s:?} leaves the canvas");
                        if k > 0 {
                            assert_eq!(s.from, stroke[k - 1].to, "a stroke's segments are chained");
                        }
                        // The brush covers both ends of every segment.
                        assert_eq!(hole(s.from.0, s.from.1), 1.0, "{s:?}");
                        assert_eq!(hole(s.to.0, s.to.1), 1.0, "{s:?}");
                    }
                }
                if strokes.is_empty() {
                    assert!(mask.hole.iter().all(|&v| v == 0.0), "no stroke, no hole");
                }
                if seed < 40 {
                    // Exactly the pixels within half a brush width of a segment (round ends, as cv2.line).
                    let segments: Vec<_> = strokes.iter().flatten().collect();
                    for (p, &painted) in mask.hole.iter().enumerate() {
                        let (x, y) = ((p % 256) as f64, (p / 256) as f64);
                        let inside = segments.iter().any(|s| {
                            let (a, b) = ((s.from.0 as f64, s.from.1 as f64), (s.to.0 as f64, s.to.1 as f64));
                            let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                            let along = ((x - a.0) * dx + (y - a.1) * dy) / (dx * dx + dy * dy).max(1e-12);
                            let t = along.clamp(0.0, 1.0);
                            let d2 = (a.0 + t * dx - x).powi(2) + (a.1 + t * dy - y).powi(2);
                            d2 <= (s.width as f64 / 2.0).powi(2)
                        });
                        assert_eq!(painted == 1.0, inside, "seed {seed}: pixel ({x}, {y})");
                    }
                }
            }
            MaskShapes::Boxes(boxes) => {
                box_counts[boxes.len()] += 1;
                let mut want = vec![0f32; 256 * 256];
                for b in boxes {
                    sides.extend([b.width, b.height]);
                    assert!(b.x >= 10 && b.y >= 10 && b.x + b.width <= 246 && b.y + b.height <= 246, "{b:?}");
                    for y in b.y..b.y + b.height {
                        want[(y * 256 + b.x) as usize..(y * 256 + b.x + b.width) as usize].fill(1.0);
                    }
                }
                assert_eq!(mask.hole, want, "the hole is exactly the union of the boxes");
            }
        }
    }
    // Half strokes, half boxes (binomial sd ≈ 22 of 2000).
    assert!((900..=1100).contains(&irregular), "{irregular} stroke masks of {masks}");
    // LaMa draws 0–11 strokes (its max_times + 1), 1–5 segments each, 0–3 boxes: every count occurs.
    assert!(stroke_counts.iter().all(|&c| c > 0), "stroke counts {stroke_counts:?}");
    assert!(pieces[0] == 0 && pieces[1..].iter().all(|&c| c > 0), "segments per stroke {pieces:?}");
    assert!(box_counts.iter().all(|&c| c > 0), "box counts {box_counts:?}");
    let range = |v: &[u32]| (*v.iter().min().unwrap(), *v.iter().max().unwrap());
    assert_eq!(range(&widths), (5, 24), "brush widths");
    assert_eq!(range(&lengths), (10, 69), "segment lengths");
    assert_eq!(range(&sides), (30, 100), "box sides");
    // Roughly uniform draws: the means sit mid-range.
    let m = |v: &[u32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    assert!((m(&widths) - 14.5).abs() < 0.5 && (m(&lengths) - 39.5).abs() < 1.5 && (m(&sides) - 65.0).abs() < 2.0);

    // Another image size draws the same shapes on the 256-pixel canvas, scaled: the same share of holes.
    for seed in [3, 8, 13] {
        let big = generate(&mut rand::rngs::StdRng::seed_from_u64(seed), &params, 256, 256);
        let small = generate(&mut rand::rngs::StdRng::seed_from_u64(seed), &params, 64, 64);
        assert_eq!(big.shapes, small.shapes);
        let share = |h: &[f32]| h.iter().sum::<f32>() / h.len() as f32;
        assert!((share(&big.hole) - share(&small.hole)).abs() < 0.05, "seed {seed}");
    }
}

#[test]
fn inpainting_trains_resumes_and_keeps_the_unmasked_pixels() {
    let s = crate::train::setup();
    let config = unet_config(&s.root, 9);
    let out = s.root.join("inpaint");
    let args = train_args(&s, &config, &out, "inpaint");
    let (ok, stdout, stderr) = run(&args, &["--max-steps", "30", "--save-every", "10"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained 30 steps"), "{stdout}");
    let loss = crate::train::losses(&out);
    let (first, last) = (mean(&loss[..5]), mean(&loss[25..]));
    assert!(last < 0.8 * first, "loss went from {first:.4} to {last:.4}");

    // Resuming a run that stopped at step 6 draws the same masks and ends with the same weights.
    let (straight, split) = (s.root.join("straight"), s.root.join("split"));
    let (ok, _, stderr) = run(&train_args(&s, &config, &straight, "inpaint"), &["--max-steps", "6"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&train_args(&s, &config, &split, "inpaint"), &["--max-steps", "3"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&train_args(&s, &config, &split, "inpaint"), &["--max-steps", "6", "--resume"]);
    assert!(ok, "{stderr}");
    let (a, b) = (
        read_weights(&straight.join("model.safetensors")).unwrap(),
        read_weights(&split.join("model.safetensors")).unwrap(),
    );
    for (key, tensor) in &a.tensors {
        assert_eq!(tensor.to_f32(), b.tensors[key].to_f32(), "{key} differs after resuming");
    }

    // The trained model inpaints an image with `lfm sample`: pixels outside the hole are the original's.
    let image = std::path::Path::new(&s.data).join("01.png");
    let mut mask = vec![255u8; 16 * 16 * 3];
    for y in 4..12 {
        mask[(y * 16 + 3) * 3..(y * 16 + 11) * 3].fill(0);
    }
    let mask_path = s.root.join("mask.png");
    lfm::image::write_rgb(&mask_path, &lfm::image::RgbImage { width: 16, height: 16, pixels: mask.clone() }).unwrap();
    let samples = s.root.join("samples");
    let (ok, _, stderr) = lfm(&[
        "--backend",
        "cpu",
        "sample",
        "--checkpoint",
        out.join("model.safetensors").to_str().unwrap(),
        "-n",
        "2",
        "--solver",
        "euler",
        "--steps",
        "4",
        "--image",
        image.to_str().unwrap(),
        "--mask",
        mask_path.to_str().unwrap(),
        "--weights",
        &s.vae,
        "--vae-config",
        &s.vae_config,
        "--out-dir",
        samples.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let original = lfm::image::read_rgb(&image).unwrap();
    let result = lfm::image::read_rgb(&samples.join("00000.png")).unwrap();
    let (kept_same, hole_changed) = composite_check(&original, &result, |p| mask[3 * p] == 0);
    assert!(kept_same && hole_changed, "kept pixels unchanged: {kept_same}; hole generated: {hole_changed}");
    evaluate_inpainting(&s, &out.join("model.safetensors"));

    // Clear errors: a mask folder holding a mask of another size, and a network without the 9 input channels.
    let masks = s.root.join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    lfm::image::write_rgb(
        &masks.join("big.png"),
        &lfm::image::RgbImage { width: 32, height: 32, pixels: vec![0; 32 * 32 * 3] },
    )
    .unwrap();
    let (ok, _, stderr) = run(
        &train_args(&s, &config, &s.root.join("bad-mask"), "inpaint"),
        &["--max-steps", "1", "--masks", masks.to_str().unwrap()],
    );
    assert!(!ok && stderr.contains("is 32×32, the training images are 16×16"), "{stderr}");
    let (ok, _, stderr) = run(&train_args(&s, &s.config, &s.root.join("bad-model"), "inpaint"), &["--max-steps", "1"]);
    assert!(!ok && stderr.contains("set its input channels to 9"), "{stderr}");
}

/// A folder of segmentation maps mirroring the image folder: three classes in bands whose position follows the
/// image's index.
fn segmentations(s: &crate::train::Setup) -> std::path::PathBuf {
    let dir = s.root.join("maps");
    let data = std::path::Path::new(&s.data);
    let mut images = Vec::new();
    lfm::data::walk_images(data, &mut images).unwrap();
    for (i, image) in images.iter().enumerate() {
        let path = dir.join(image.strip_prefix(data).unwrap()).with_extension("png");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let pixels = (0..16 * 16).map(|p| (((p % 16) + i) / 6 % 3) as u8).collect();
        image::GrayImage::from_raw(16, 16, pixels).unwrap().save(&path).unwrap();
    }
    dir
}

#[test]
fn semantic_synthesis_trains_its_projection_and_the_map_steers_samples() {
    let s = crate::train::setup();
    let maps = segmentations(&s);
    let config = unet_config(&s.root, 8);
    let with_classes = |out: &std::path::Path, classes: &str| {
        let mut args = train_args(&s, &config, out, "semantic");
        args.extend(["--segmentations", maps.to_str().unwrap(), "--seg-classes", classes].map(String::from));
        args
    };
    let semantic = |out: &std::path::Path| with_classes(out, "3");
    let out = s.root.join("semantic");
    let (ok, _, stderr) = run(&semantic(&out), &["--max-steps", "30", "--save-every", "10"]);
    assert!(ok, "{stderr}");
    let loss = crate::train::losses(&out);
    let (first, last) = (mean(&loss[..5]), mean(&loss[25..]));
    assert!(last < 0.8 * first, "loss went from {first:.4} to {last:.4}");

    // The projection learns by default and stays at its initialisation with --freeze-rescaler (LFM's behaviour);
    // a resumed run ends where an uninterrupted one does, projection included.
    let projection = |dir: &std::path::Path| {
        read_weights(&dir.join("rescaler.safetensors")).unwrap().tensors["channel_mapper.weight"].to_f32()
    };
    let steps = |dir: &str, n: &str, extra: &[&str]| {
        let dir = s.root.join(dir);
        let (ok, _, stderr) = run(&semantic(&dir), &[&["--max-steps", n][..], extra].concat());
        assert!(ok, "{stderr}");
        dir
    };
    let (one, three) = (steps("one", "1", &[]), steps("three", "3", &[]));
    assert_ne!(projection(&one), projection(&three), "the projection did not learn");
    let (one, three) = (steps("frozen1", "1", &["--freeze-rescaler"]), steps("frozen3", "3", &["--freeze-rescaler"]));
    assert_eq!(projection(&one), projection(&three), "a frozen projection moved");
    let resumed = steps("three", "5", &["--resume"]);
    let straight = steps("five", "5", &[]);
    assert_eq!(projection(&resumed), projection(&straight), "the resumed projection differs");
    let (a, b) = (
        read_weights(&resumed.join("model.safetensors")).unwrap(),
        read_weights(&straight.join("model.safetensors")).unwrap(),
    );
    for (key, tensor) in &a.tensors {
        assert_eq!(tensor.to_f32(), b.tensors[key].to_f32(), "{key} differs after resuming");
    }

    // `lfm sample` with the trained projection: two maps give two different samples from the same noise.
    let map = |name: &str, class: &dyn Fn(usize, usize) -> u8| {
        let pixels = (0..16 * 16).map(|p| class(p % 16, p / 16)).collect();
        let path = s.root.join(name);
        image::GrayImage::from_raw(16, 16, pixels).unwrap().save(&path).unwrap();
        path
    };
    let sample = |seg: &std::path::Path, name: &str| {
        let latents = s.root.join(name);
        let (ok, _, stderr) = lfm(&[
            "--backend",
            "cpu",
            "sample",
            "--checkpoint",
            out.join("model.safetensors").to_str().unwrap(),
            "-n",
            "2",
            "--solver",
            "euler",
            "--steps",
            "4",
            "--segmentation",
            seg.to_str().unwrap(),
            "--cond-checkpoint",
            out.join("rescaler.safetensors").to_str().unwrap(),
            "--latents-only",
            "--save-latents",
            latents.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        read_safetensors(&latents).unwrap().0["x0"].to_f32()
    };
    let a = sample(&map("left.png", &|x, _| if x < 8 { 0 } else { 2 }), "a.safetensors");
    let b = sample(&map("bands.png", &|_, y| (y / 6) as u8), "b.safetensors");
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-2, "the segmentation map had no effect (max difference {diff})");
    evaluate_semantic(
        &s,
        &out,
        &[map("left.png", &|x, _| if x < 8 { 0 } else { 2 }), map("bands.png", &|_, y| (y / 6) as u8)],
    );

    // Clear errors: a class beyond --seg-classes, an image without a map.
    let (ok, _, stderr) = run(&with_classes(&s.root.join("two"), "2"), &["--max-steps", "1"]);
    assert!(!ok && stderr.contains("holds class 2, but the run has 2 classes"), "{stderr}");
    std::fs::remove_file(maps.join("05.png")).unwrap();
    let (ok, _, stderr) = run(&semantic(&s.root.join("missing")), &["--max-steps", "1"]);
    assert!(!ok && stderr.contains("05.png has no segmentation map"), "{stderr}");
}

/// `lfm eval inpaint` on three originals and masks: composites named as the originals that keep every unmasked
/// pixel, and FID, P-IDS and U-IDS in metrics.json.
fn evaluate_inpainting(s: &crate::train::Setup, checkpoint: &std::path::Path) {
    let Some(inception) = inception_weights() else { return };
    let (gt, masks, out) = (s.root.join("gt"), s.root.join("eval-masks"), s.root.join("eval"));
    std::fs::create_dir_all(&gt).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    let mut holes = Vec::new();
    for i in 0..3usize {
        std::fs::copy(
            std::path::Path::new(&s.data).join(format!("{:02}.png", [1, 2, 4][i])),
            gt.join(format!("{i:06}.png")),
        )
        .unwrap();
        // Black = hole: a band of rows that moves with i.
        let hole: Vec<bool> = (0..16 * 16).map(|p| (4 + i..10 + i).contains(&(p / 16))).collect();
        let pixels = hole.iter().map(|&h| if h { 0 } else { 255 }).collect();
        image::GrayImage::from_raw(16, 16, pixels).unwrap().save(masks.join(format!("{i:06}.png"))).unwrap();
        holes.push(hole);
    }
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "--backend",
            "cpu",
            "eval",
            "inpaint",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--images",
            gt.to_str().unwrap(),
            "--masks",
            masks.to_str().unwrap(),
            "--weights",
            &s.vae,
            "--vae-config",
            &s.vae_config,
            "--out",
            out.to_str().unwrap(),
            "--solver",
            "euler",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--inception",
            inception.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lfm(&args)
    };
    let (ok, stdout, stderr) = eval(&["--json"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(report, saved);
    assert_eq!(report["images"], 3);
    let fid = report["fid"].as_f64().unwrap();
    assert!(fid.is_finite() && fid >= 0.0, "FID {fid}");
    for key in ["p_ids", "u_ids"] {
        let v = report[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} {v}");
    }
    for (i, hole) in holes.iter().enumerate() {
        let original = lfm::image::read_rgb(&gt.join(format!("{i:06}.png"))).unwrap();
        let result = lfm::image::read_rgb(&out.join(format!("{i:06}.png"))).unwrap();
        let (kept_same, _) = composite_check(&original, &result, |p| hole[p]);
        assert!(kept_same, "image {i}: pixels outside the hole changed");
    }
    // An evaluation is not overwritten silently; unpaired folders are refused.
    let (ok, _, stderr) = eval(&[]);
    assert!(!ok && stderr.contains("pass --force"), "{stderr}");
    std::fs::remove_file(masks.join("000002.png")).unwrap();
    let (ok, _, stderr) = eval(&["--force"]);
    assert!(!ok && stderr.contains("3 images but 2 masks"), "{stderr}");
}

/// The SVM behind P-IDS/U-IDS against scikit-learn's `LinearSVC(dual=False)` (tests/fixtures/ids/svm.json).
#[test]
fn inpainting_scores_match_scikit_learn() {
    use lfm::tasks::ids::{fit_linear_svm, inpainting_ids};
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("ids/svm.json")).unwrap()).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        fixture[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
    };
    let (real, fake, dim) = (floats("real"), floats("fake"), fixture["dim"].as_u64().unwrap() as usize);
    let n = real.len() / dim;
    let labels: Vec<bool> = (0..2 * n).map(|i| i < n).collect();
    let svm = fit_linear_svm(&[real.clone(), fake.clone()].concat(), &labels, dim, 1.0);
    let tight = &fixture["tight"];
    let want: Vec<f64> = tight["coef"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_close_f64("SVM weights", &svm.weights, &want, 1e-7);
    assert_close_f64("SVM intercept", &[svm.bias], &[tight["intercept"].as_f64().unwrap()], 1e-7);
    let ids = inpainting_ids(&real, &fake, dim).unwrap();
    for source in ["default", "tight"] {
        assert_eq!(ids.u_ids, fixture[source]["u_ids"].as_f64().unwrap(), "U-IDS vs sklearn ({source} tolerance)");
        assert_eq!(ids.p_ids, fixture[source]["p_ids"].as_f64().unwrap(), "P-IDS vs sklearn ({source} tolerance)");
    }
    assert!(inpainting_ids(&real, &fake[..dim], dim).is_err());
}

/// `lfm eval semantic`: one image per map, named as the map, and FID against the real images in metrics.json.
fn evaluate_semantic(s: &crate::train::Setup, run: &std::path::Path, maps: &[std::path::PathBuf]) {
    let Some(inception) = inception_weights() else { return };
    let (map_dir, real, out) = (s.root.join("eval-maps"), s.root.join("eval-real"), s.root.join("eval-semantic"));
    std::fs::create_dir_all(&map_dir).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    for (i, map) in maps.iter().enumerate() {
        std::fs::copy(map, map_dir.join(format!("map{i}.png"))).unwrap();
    }
    for i in [1, 2, 4] {
        let name = format!("{i:02}.png");
        std::fs::copy(std::path::Path::new(&s.data).join(&name), real.join(&name)).unwrap();
    }
    let (ok, stdout, stderr) = lfm(&[
        "--backend",
        "cpu",
        "eval",
        "semantic",
        "--checkpoint",
        run.join("model.safetensors").to_str().unwrap(),
        "--cond-checkpoint",
        run.join("rescaler.safetensors").to_str().unwrap(),
        "--segmentations",
        map_dir.to_str().unwrap(),
        "--images",
        real.to_str().unwrap(),
        "--weights",
        &s.vae,
        "--vae-config",
        &s.vae_config,
        "--out",
        out.to_str().unwrap(),
        "--solver",
        "euler",
        "--steps",
        "3",
        "--inception",
        inception.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((report["task"].as_str(), report["images"].as_u64()), (Some("semantic"), Some(2)));
    assert!(report["fid"].as_f64().unwrap().is_finite() && report.get("p_ids").is_none(), "{report}");
    for i in 0..2 {
        let image = lfm::image::read_rgb(&out.join(format!("map{i}.png"))).unwrap();
        assert_eq!((image.width, image.height), (16, 16));
    }
}

/// What one task training step computes on a backend, read back to the host.
struct TaskStep {
    /// The condition concatenated to `x_t` (inpainting: masked latent and ±1 mask; semantic: the projected maps).
    condition: Vec<f32>,
    /// The batch's loss.
    loss: f64,
    /// The velocity network's gradients.
    grads: lfm::checkpoint::TensorMap,
    /// Every trained weight after the AdamW step (the projection's under `rescaler.`).
    after: lfm::checkpoint::TensorMap,
}

const STEP_LR: f64 = 1e-4;
/// AdamW's epsilon in [`lfm_adamw`].
const ADAM_EPS: f64 = 1e-8;

/// Smooth host values in [−1, 1], different for each `phase`.
fn wave(len: usize, phase: f32) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.731 + phase).sin()).collect()
}

fn host<B: burn::tensor::backend::Backend>(values: Vec<f32>, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(values, shape).convert::<B::FloatElem>(), device)
}

/// A 9-channel UNet, one step on two 16-px images: LFM's masks, the masked image, one encoder pass for the image and
/// the masked image with posterior samples, the mask on the latent grid — as `lfm train --task inpaint` builds them.
/// The encoder pass runs on the CPU whatever `B` (the autoencoder has its own wgpu test; on lavapipe its layers
/// would be compiled and autotuned again here).
fn inpainting_step<B: AutodiffBackend>(device: &B::Device) -> TaskStep {
    let (n, size, f) = (2, 16, 2);
    let ae = crate::autoencoder::vae::<Cpu>(&cpu());
    let to_cpu = |t: Tensor<B::InnerBackend, 4>| Tensor::<Cpu, 4>::from_data(t.into_data(), &cpu());
    let images = host::<B::InnerBackend>(wave(n * 3 * size * size, 0.0), [n, 3, size, size], device);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let holes: Vec<f32> = (0..n).flat_map(|_| generate(&mut rng, &MaskParams::default(), size, size).hole).collect();
    assert!(holes.contains(&0.0) && holes.contains(&1.0), "the masks keep some pixels and generate others");
    let hole = lfm::tasks::inpaint::hole_tensor::<B::InnerBackend>(holes, n, (size, size), device);
    let latent = [2 * n, 4, size / f, size / f];
    let eps = host::<B::InnerBackend>(wave(latent.iter().product(), 1.0), latent, device);
    let masked = lfm::tasks::inpaint::masked_images(images.clone(), hole.clone());
    let z = ae.encode(to_cpu(Tensor::cat(vec![images, masked], 0)), Some(to_cpu(eps)));
    let z = Tensor::<B::InnerBackend, 4>::from_data(z.into_data(), device);
    let condition = lfm::tasks::inpaint::condition(z.clone().narrow(0, n, n), hole, f);
    let z1 = host::<B::InnerBackend>(wave(n * 4 * 8 * 8, 2.0), [n, 4, 8, 8], device);
    let batch = Batch {
        condition: Some(Tensor::from_inner(condition.clone())),
        ..Batch::new(
            Tensor::from_inner(z.narrow(0, 0, n)),
            Tensor::from_inner(z1),
            Tensor::from_floats([0.3, 0.85], device),
            None,
        )
    };
    let config = ModelConfig::GuidedUnet(UNetConfig { in_channels: 9, ..crate::unet::golden_config() });
    let model = VelocityModel::<B>::load(&config, &crate::unet::golden_weights_with_inputs(9), device).unwrap();
    let mut trainer = Trainer::new(model, lfm_adamw());
    let report = trainer.step(Step::new(batch, STEP_LR).keeping_grads()).unwrap();
    TaskStep {
        condition: values(condition),
        loss: report.loss,
        grads: report.grads.unwrap(),
        after: trainer.model().state_dict(),
    }
}

/// An 8-channel UNet with a trained projection, one step: class maps → class shares per latent cell → the 1×1
/// projection, as `lfm train --task semantic` builds them; the shares equal LFM's halved one-hot maps on this backend.
fn semantic_step<B: AutodiffBackend>(device: &B::Device, projection: &lfm::checkpoint::TensorMap) -> TaskStep {
    use lfm::tasks::semantic::{class_shares, one_hot, SpatialRescaler};
    let (n, size, f, classes) = (2, 16, 2, 19);
    let maps: Vec<Vec<u8>> = (0..n)
        .map(|k| (0..size * size).map(|p| ((p % size / 3 + p / size / 5 + 7 * k) % classes) as u8).collect())
        .collect();
    let rescaler = SpatialRescaler::<B>::load(projection, 1, device).unwrap();
    let shares = class_shares::<B>(&maps, size, f, classes, device).unwrap();
    let one_hots = maps.iter().map(|m| one_hot::<B>(m, size, size, classes, device).unwrap()).collect();
    assert_close(
        "LFM's halved one-hot maps vs class shares",
        &values(rescaler.forward(Tensor::cat(one_hots, 0))),
        &values(rescaler.project(shares.clone())),
        1e-6,
        1e-7,
    );
    let condition = values(rescaler.project(shares.clone()));
    let z = |phase| host::<B>(wave(n * 4 * 8 * 8, phase), [n, 4, 8, 8], device);
    let batch = Batch {
        segmentation: Some(shares),
        ..Batch::new(z(0.5), z(2.5), Tensor::from_floats([0.6, 0.1], device), None)
    };
    let config = ModelConfig::GuidedUnet(UNetConfig { in_channels: 8, ..crate::unet::golden_config() });
    let model = VelocityModel::<B>::load(&config, &crate::unet::golden_weights_with_inputs(8), device).unwrap();
    let mut trainer = Trainer::new(model, lfm_adamw()).with_rescaler(rescaler, true);
    let report = trainer.step(Step::new(batch, STEP_LR).keeping_grads()).unwrap();
    let mut after = trainer.model().state_dict();
    for (key, value) in trainer.rescaler().unwrap().state_dict() {
        after.insert(format!("rescaler.{key}"), value);
    }
    TaskStep { condition, loss: report.loss, grads: report.grads.unwrap(), after }
}

/// The wgpu step against the cpu step: condition, loss, every gradient (5e-4 of its tensor's max) and every weight
/// after AdamW (1e-6, plus what the two gradients' difference allows where |g| is near AdamW's eps).
fn assert_same_step(task: &str, cpu: &TaskStep, gpu: &TaskStep) {
    assert_close(&format!("{task} condition"), &gpu.condition, &cpu.condition, 1e-5, 1e-6);
    assert!((gpu.loss - cpu.loss).abs() <= 1e-5 * cpu.loss, "{task} loss: wgpu {} vs cpu {}", gpu.loss, cpu.loss);
    assert_eq!(
        gpu.grads.keys().collect::<Vec<_>>(),
        cpu.grads.keys().collect::<Vec<_>>(),
        "{task}: parameters with a gradient"
    );
    // wgpu's autotune picks kernels by timing, so sums are ordered differently from run to run (1.2e-4 of a UNet
    // tensor's max seen under load): 5e-4. Some gradients are zero in exact arithmetic (a conv bias ahead of a one-channel-per-group GroupNorm) and only
    // float noise in practice; they are held to a floor of 1e-6 of the largest gradient instead.
    let largest = cpu.grads.values().flat_map(|g| g.to_f32()).fold(0f64, |m, g| m.max(g.abs() as f64));
    for (key, want) in &cpu.grads {
        assert_close(&format!("{task} grad {key}"), &gpu.grads[key].to_f32(), &want.to_f32(), 5e-4, 1e-6 * largest);
    }
    assert_eq!(gpu.after.keys().collect::<Vec<_>>(), cpu.after.keys().collect::<Vec<_>>(), "{task}: trained weights");
    for (key, want) in &cpu.after {
        let (got, want) = (gpu.after[key].to_f32(), want.to_f32());
        let grads = cpu.grads.get(key).map(|g| (g.to_f32(), gpu.grads[key].to_f32()));
        for i in 0..want.len() {
            // AdamW's first step moves a weight by −lr·g/(|g| + eps): near g = 0 (|g| ≲ eps) the step follows the
            // gradient's last bits, so the two steps may part by what the two gradients make of that formula.
            let parted = grads.as_ref().map_or(0.0, |(c, g)| {
                let step = |g: f32| STEP_LR * g as f64 / (g.abs() as f64 + ADAM_EPS);
                (step(c[i]) - step(g[i])).abs()
            });
            let bound = 1e-6 + 1.01 * parted;
            let diff = (got[i] - want[i]).abs() as f64;
            assert!(
                diff <= bound,
                "{task}: {key}[{i}] after the step: wgpu {}, cpu {} (bound {bound:e})",
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn task_training_steps_match_between_cpu_and_wgpu() {
    let inpaint_cpu = inpainting_step::<Autodiff<Cpu>>(&cpu());
    let projection = lfm::tasks::semantic::SpatialRescaler::<Cpu>::new(19, 4, 1, &cpu()).state_dict();
    let semantic_cpu = semantic_step::<Autodiff<Cpu>>(&cpu(), &projection);
    // The projection learned on cpu (so the comparison of its weights below is not vacuous).
    assert_ne!(
        semantic_cpu.after["rescaler.channel_mapper.weight"].to_f32(),
        projection["channel_mapper.weight"].to_f32()
    );
    let Some(device) = wgpu() else { return };
    assert_same_step("inpainting", &inpaint_cpu, &inpainting_step::<Autodiff<Wgpu>>(&device));
    assert_same_step("semantic", &semantic_cpu, &semantic_step::<Autodiff<Wgpu>>(&device, &projection));
}
