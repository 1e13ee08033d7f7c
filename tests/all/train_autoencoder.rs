//! `lfm train-autoencoder`: the loss against its definition, a run that learns, exact resume, the diffusers folder it
//! writes loading as `--autoencoder kl`, and `lfm encode --data` over an IDX dataset with labels.

use burn::tensor::{Distribution, Tensor};
use lfm::autoencoder::{AnyAutoencoder, AutoencoderKLConfig, AutoencoderKind, AutoencoderWeights};
use lfm::backend::Cpu;
use lfm::checkpoint::{read_safetensors, read_weights};
use lfm::train::autoencoder::{autoencoder_loss, read_autoencoder_state};

use crate::common::*;

fn tiny_config() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 4,
        scaling_factor: 1.0,
        mid_block_add_attention: true,
        act_fn: "silu".into(),
    }
}

/// The KL term is ½·mean(μ² + σ² − 1 − log σ²) of the posterior, the reconstruction term the MSE of the decoded
/// sample; both recomputed here on the host from the network's own posterior and decoder.
#[test]
fn the_loss_is_mse_plus_weighted_kl() {
    let device = Default::default();
    let ae = tiny_config().init::<Cpu>(&device);
    let x = Tensor::<Cpu, 4>::random([2, 3, 8, 8], Distribution::Uniform(-1.0, 1.0), &device);
    let eps = Tensor::<Cpu, 4>::random([2, 4, 4, 4], Distribution::Normal(0.0, 1.0), &device);
    let (total, mse, kl) = autoencoder_loss(&ae, x.clone(), eps.clone(), 0.25);
    let posterior = ae.posterior(x.clone());
    let (mean, logvar) = (host(posterior.mean.clone()), host(posterior.logvar.clone()));
    let want_kl =
        mean.iter().zip(&logvar).map(|(m, l)| 0.5 * (m * m + l.exp() - 1.0 - l)).sum::<f32>() / mean.len() as f32;
    let recon = host(ae.decode_unscaled(posterior.sample_with(eps)));
    let want_mse = recon.iter().zip(host(x)).map(|(r, x)| (r - x) * (r - x)).sum::<f32>() / recon.len() as f32;
    let (kl, mse, total) = (host(kl)[0], host(mse)[0], host(total)[0]);
    assert!((kl - want_kl).abs() <= 1e-5 * want_kl.abs().max(1.0), "kl {kl} vs {want_kl}");
    assert!((mse - want_mse).abs() <= 1e-5 * want_mse, "mse {mse} vs {want_mse}");
    assert!((total - (want_mse + 0.25 * want_kl)).abs() <= 1e-5 * total.abs(), "total {total}");
}

fn host<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

struct Data {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    images: String,
    config: String,
}

/// 24 labelled 16×16 IDX images of stripes and blocks (gzip, as Debian ships Fashion-MNIST).
fn data() -> Data {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (n, side) = (24usize, 16usize);
    let pixels: Vec<u8> = (0..n * side * side)
        .map(|i| {
            let (k, p) = (i / (side * side), i % (side * side));
            let (x, y) = (p % side, p / side);
            if (x / (2 + k % 3) + y / (2 + k % 4)) % 2 == 0 {
                230
            } else {
                20
            }
        })
        .collect();
    let images = root.join("train-images-idx3-ubyte.gz");
    crate::train::write_idx(&images, &[n as u32, side as u32, side as u32], &pixels, true);
    let labels: Vec<u8> = (0..n as u8).map(|i| i % 3).collect();
    crate::train::write_idx(&root.join("train-labels-idx1-ubyte.gz"), &[n as u32], &labels, true);
    let config = root.join("ae.json");
    std::fs::write(&config, tiny_config().to_diffusers_json()).unwrap();
    Data { images: images.to_str().unwrap().into(), config: config.to_str().unwrap().into(), root, _dir: dir }
}

fn args<'a>(d: &'a Data, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "--backend",
        "cpu",
        "train-autoencoder",
        "--data",
        &d.images,
        "--image-size",
        "16",
        "--config",
        &d.config,
        "--out",
        out,
        "--batch-size",
        "6",
        "--max-steps",
        steps,
        "--save-every",
        "10",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--eval-images",
        "12",
        "--seed",
        "5",
    ]
}

fn metric(out: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

#[test]
fn training_learns_resumes_exactly_and_writes_a_diffusers_folder() {
    let d = data();
    let straight = d.root.join("straight");
    let (ok, stdout, stderr) = lfm(&args(&d, straight.to_str().unwrap(), "40"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained 40 steps on 24 images") && stdout.contains("PSNR"), "{stdout}");
    let mse = metric(&straight, "mse");
    assert_eq!(mse.len(), 40);
    let (first, last) = (mse[..5].iter().sum::<f64>() / 5.0, mse[35..].iter().sum::<f64>() / 5.0);
    assert!(last < 0.6 * first, "the reconstruction error went from {first:.4} to {last:.4}");
    assert_eq!(metric(&straight, "eval_psnr").len(), 4, "evaluated at every checkpoint");

    // The folder loads as a KL autoencoder, with the measured latent scale.
    let state = read_autoencoder_state(&straight).unwrap().unwrap();
    let eval = state.eval.unwrap();
    assert!((state.config.scaling_factor - 1.0 / eval.latent_std).abs() < 1e-9);
    let weights = AutoencoderWeights::read(AutoencoderKind::Kl, &straight, None).unwrap();
    let AutoencoderWeights::Kl(config, _) = &weights else { panic!("a KL autoencoder") };
    assert_eq!(config, &state.config);
    let AnyAutoencoder::Kl(_) = weights.load::<Cpu>(&Default::default()).unwrap() else { panic!("KL") };

    // 20 steps, then 20 more with --resume, end with the same weights as 40 in one go.
    let split = d.root.join("split");
    let (ok, _, stderr) = lfm(&args(&d, split.to_str().unwrap(), "20"));
    assert!(ok, "{stderr}");
    // A line of a step past the checkpoint (a run killed between checkpoints) is dropped when the run resumes.
    let log = split.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"step\":21,\"loss\":1.0}\n");
    std::fs::write(&log, text).unwrap();
    let mut resumed = args(&d, split.to_str().unwrap(), "40");
    resumed.push("--resume");
    let (ok, _, stderr) = lfm(&resumed);
    assert!(ok, "{stderr}");
    assert_eq!(metric(&split, "mse").len(), 40, "each step logged once");
    assert_eq!(metric(&split, "loss"), metric(&straight, "loss"), "the resumed log is the uninterrupted run's");
    let file = "diffusion_pytorch_model.safetensors";
    let (a, b) =
        (read_weights(&straight.join(file)).unwrap().tensors, read_weights(&split.join(file)).unwrap().tensors);
    for (key, tensor) in &a {
        assert_eq!(tensor.to_f32(), b[key].to_f32(), "{key} differs after a resume");
    }
    // Without --resume, an existing run is not overwritten.
    let (ok, _, stderr) = lfm(&args(&d, split.to_str().unwrap(), "40"));
    assert!(!ok && stderr.contains("pass --resume"), "{stderr}");

    // `lfm encode --data` writes every image's latents with the IDX labels, ready for `lfm train --latents`.
    let latents = d.root.join("latents.safetensors");
    let (ok, _, stderr) = lfm(&[
        "--backend",
        "cpu",
        "encode",
        "--data",
        &d.images,
        "--image-size",
        "16",
        "--weights",
        straight.to_str().unwrap(),
        "--out",
        latents.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (tensors, _) = read_safetensors(&latents).unwrap();
    assert_eq!(tensors["mean"].shape, [24, 4, 8, 8]);
    assert_eq!(tensors["std"].shape, [24, 4, 8, 8]);
    assert_eq!(tensors["y"].to_i64(), (0..24).map(|i| i % 3).collect::<Vec<i64>>());
}

#[test]
fn bad_autoencoder_settings_are_refused_clearly() {
    let d = data();
    let out = d.root.join("bad");
    let out = out.to_str().unwrap();
    let mut no_config = args(&d, out, "5");
    let at = no_config.iter().position(|a| *a == "--config").unwrap();
    no_config.drain(at..at + 2);
    let (ok, _, stderr) = lfm(&no_config);
    assert!(!ok && stderr.contains("--config"), "{stderr}");
    let mut odd = args(&d, out, "5");
    let at = odd.iter().position(|a| *a == "16").unwrap();
    odd[at] = "15";
    let (ok, _, stderr) = lfm(&odd);
    assert!(!ok && stderr.contains("not divisible"), "{stderr}");
    let mut missing = args(&d, out, "5");
    let at = missing.iter().position(|a| *a == d.images).unwrap();
    missing[at] = "/nonexistent/train-images-idx3-ubyte";
    let (ok, _, stderr) = lfm(&missing);
    assert!(!ok && stderr.contains("/nonexistent"), "{stderr}");
}

/// `--init DIR --decoder-only` fine-tunes the decoder of a trained autoencoder: the encoder half and the latent
/// scale are bit-identical to the starting folder's (latents and velocity networks made with it stay valid), the
/// decoder moves and reconstructs better; without --init the flag is refused.
#[test]
fn decoder_only_fine_tuning_keeps_the_latent_space() {
    let d = data();
    let base = d.root.join("base");
    let (ok, _, stderr) = lfm(&args(&d, base.to_str().unwrap(), "20"));
    assert!(ok, "{stderr}");
    let tuned = d.root.join("tuned");
    let mut fine_tune = args(&d, tuned.to_str().unwrap(), "30");
    let at = fine_tune.iter().position(|a| *a == "--config").unwrap();
    fine_tune.splice(at..at + 2, ["--init", base.to_str().unwrap(), "--decoder-only"]);
    let (ok, _, stderr) = lfm(&fine_tune);
    assert!(ok, "{stderr}");

    let file = "diffusion_pytorch_model.safetensors";
    let (before, after) =
        (read_weights(&base.join(file)).unwrap().tensors, read_weights(&tuned.join(file)).unwrap().tensors);
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    let mut decoder_moved = false;
    for (key, tensor) in &before {
        let same = tensor.to_f32() == after[key].to_f32();
        if key.starts_with("encoder.") || key.starts_with("quant_conv.") {
            assert!(same, "{key} changed in a decoder-only run");
        } else if key.starts_with("decoder.") {
            decoder_moved |= !same;
        }
    }
    assert!(decoder_moved, "the decoder did not train");
    let (base_state, tuned_state) =
        (read_autoencoder_state(&base).unwrap().unwrap(), read_autoencoder_state(&tuned).unwrap().unwrap());
    assert_eq!(tuned_state.config, base_state.config, "the architecture and latent scale are the starting folder's");
    let (base_eval, tuned_eval) = (base_state.eval.unwrap(), tuned_state.eval.unwrap());
    assert_eq!(tuned_eval.latent_std, base_eval.latent_std, "the same encoder gives the same latents");
    assert!(tuned_eval.mse < base_eval.mse, "held-out mse {} → {}", base_eval.mse, tuned_eval.mse);

    let no_init_out = d.root.join("no-init");
    // 15 steps, then 15 more with --resume, end with the weights of the 30-step run (the encoder stays frozen).
    let split = d.root.join("tuned-split");
    let mut first = fine_tune.clone();
    let (out_at, steps_at) =
        (first.iter().position(|a| *a == "--out").unwrap() + 1, first.iter().position(|a| *a == "30").unwrap());
    first[out_at] = split.to_str().unwrap();
    first[steps_at] = "15";
    let (ok, _, stderr) = lfm(&first);
    assert!(ok, "{stderr}");
    let mut second = first.clone();
    second[steps_at] = "30";
    second.push("--resume");
    let (ok, _, stderr) = lfm(&second);
    assert!(ok, "{stderr}");
    for (key, tensor) in read_weights(&split.join(file)).unwrap().tensors {
        assert_eq!(tensor.to_f32(), after[&key].to_f32(), "{key} differs after a resume");
    }

    let mut no_init = args(&d, no_init_out.to_str().unwrap(), "5");
    no_init.push("--decoder-only");
    let (ok, _, stderr) = lfm(&no_init);
    assert!(!ok && stderr.contains("--init"), "{stderr}");
}
