//! The KL VAE against `golden/vae_tiny` (diffusers), TAESD's real weights on a real photograph, the CPU im2col
//! convolution against Burn's, and `lfm encode` / `lfm decode`.

use burn::tensor::{backend::Backend, Distribution, Tensor};
use lfm::autoencoder::{Autoencoder, AutoencoderKL, AutoencoderKLConfig, AutoencoderKind, AutoencoderWeights};
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::{read_weights, CheckpointError};
use lfm::nn::Activation;

use crate::common::*;

fn vae_config() -> AutoencoderKLConfig {
    AutoencoderKLConfig::from_json(&constructor_kwargs("vae_tiny").to_string()).unwrap()
}

/// The golden tiny KL VAE (16 px ↔ 4×8×8).
pub(crate) fn vae<B: Backend>(device: &B::Device) -> AutoencoderKL<B> {
    let weights = read_weights(&fixture("vae_tiny/model.safetensors")).unwrap().tensors;
    AutoencoderKL::load(&vae_config(), &weights, device).unwrap()
}

fn vae_parity<B: Backend>(device: &B::Device, rel: f64) {
    let io = io("vae_tiny");
    let model = vae::<B>(device);
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let close = |what: &str, got: Tensor<B, 4>, want: &str| {
        assert_close(what, &values(got), &get(&io, want).to_f32(), rel, 1e-6)
    };
    close("moments", model.moments(x.clone()), "moments");
    let posterior = model.posterior(x.clone());
    close("mean", posterior.mean.clone(), "mean");
    close("logvar", posterior.logvar.clone(), "logvar");
    let eps = tensor::<B, 4>(get(&io, "eps"), device);
    close("latent_sample", posterior.sample_with(eps.clone()), "latent_sample");
    // Through the trait: LFM's scaled z, and back.
    close("latent_scaled", Autoencoder::encode(&model, x, Some(eps)), "latent_scaled");
    close("decoded", model.decode_unscaled(tensor(get(&io, "z"), device)), "decoded");
    let scaled = tensor::<B, 4>(get(&io, "latent_scaled"), device);
    close("decoded_from_sample", Autoencoder::decode(&model, scaled.clone()), "debug.decoded_from_sample");
    close("sliced", model.decode_sliced(scaled, 1), "debug.decoded_from_sample");
}

#[test]
fn kl_vae_matches_diffusers_on_cpu() {
    vae_parity::<Cpu>(&cpu(), 1e-5);
}

#[test]
fn kl_vae_matches_diffusers_on_wgpu() {
    let Some(device) = wgpu() else { return };
    vae_parity::<Wgpu>(&device, 1e-4);
}

#[test]
fn cpu_convolutions_equal_burns_convolution() {
    // Square "same" kernels, Inception's 1×7 / 7×1 / 1×3 kernels, unpadded ("valid") ones and strided ones
    // (odd and even sizes, with and without padding); the last one is large enough to take several column blocks.
    let cases = [
        (3, 5, [3, 3], 1, [1, 1], 7, 9),
        (8, 4, [1, 1], 1, [0, 0], 5, 3),
        (4, 6, [3, 3], 1, [1, 1], 1, 1),
        (3, 4, [1, 7], 1, [0, 3], 9, 8),
        (3, 4, [7, 1], 1, [3, 0], 9, 8),
        (5, 2, [3, 1], 1, [1, 0], 4, 6),
        (2, 3, [3, 3], 1, [0, 0], 6, 5),
        (3, 4, [3, 3], 2, [0, 0], 11, 8),
        (2, 3, [3, 3], 2, [1, 1], 8, 7),
        (2, 2, [4, 4], 3, [1, 2], 10, 9),
        (2, 2, [1, 1], 2, [0, 0], 5, 6),
        (2, 3, [5, 5], 1, [2, 2], 3, 4),
        (64, 3, [3, 3], 1, [1, 1], 130, 64),
    ];
    for (c_in, c_out, [kh, kw], stride, padding, h, w) in cases {
        // Batches of 1 (each GEMM split over the threads) and 3 (one image per thread), with and without bias.
        for (batch, with_bias) in [(1, true), (3, true), (3, false)] {
            // Batch 1 reads a transposed view: a strided input the kernel copies to standard layout first.
            let x = if batch == 1 {
                Tensor::<Cpu, 4>::random([batch, c_in, w, h], Distribution::Normal(0.0, 1.0), &cpu()).swap_dims(2, 3)
            } else {
                Tensor::<Cpu, 4>::random([batch, c_in, h, w], Distribution::Normal(0.0, 1.0), &cpu())
            };
            let weight = Tensor::<Cpu, 4>::random([c_out, c_in, kh, kw], Distribution::Normal(0.0, 1.0), &cpu());
            let bias = with_bias.then(|| Tensor::<Cpu, 1>::random([c_out], Distribution::Normal(0.0, 1.0), &cpu()));
            let options = burn::tensor::ops::ConvOptions::new([stride, stride], padding, [1, 1], 1);
            let want = values(burn::tensor::module::conv2d(x.clone(), weight.clone(), bias.clone(), options));
            let case =
                format!("{c_in}→{c_out} k{kh}×{kw} s{stride} p{padding:?} {h}×{w} batch {batch} bias {with_bias}");
            let tolerance = 1e-5 * ((c_in * kh * kw) as f64).sqrt();
            let im2col = lfm::nn::conv2d_im2col(x.clone(), weight.clone(), bias.clone(), stride, padding);
            assert_close(&format!("im2col {case}"), &values(im2col), &want, tolerance, 1e-5);
            let kernel =
                lfm::nn::cpu::conv2d(x.clone(), weight.clone(), bias.clone(), stride, padding, Activation::None);
            let [ho, wo] = [(h + 2 * padding[0] - kh) / stride + 1, (w + 2 * padding[1] - kw) / stride + 1];
            assert_eq!(kernel.dims(), [batch, c_out, ho, wo], "{case}");
            let kernel = values(kernel);
            assert_close(&format!("cpu kernel {case}"), &kernel, &want, tolerance, 1e-5);
            // The fused ReLU (Inception's layers) is exactly the ReLU of the same convolution.
            let fused = values(lfm::nn::conv2d_padded(x, weight, bias, stride, padding, Activation::Relu));
            let relu: Vec<f32> = kernel.iter().map(|v| v.max(0.0)).collect();
            assert_eq!(fused, relu, "fused ReLU {case}");
        }
    }
}

#[test]
fn cpu_pools_equal_burns_pools() {
    // Inception's pools: 3×3 stride 2 max, 3×3 stride 1 padding 1 max, and the average that excludes padding.
    for (k, stride, pad, h, w) in [(3, 2, 0, 9, 8), (3, 2, 0, 8, 11), (3, 1, 1, 5, 7), (2, 2, 1, 6, 5), (3, 3, 1, 7, 7)]
    {
        let x = Tensor::<Cpu, 4>::random([2, 3, h, w], Distribution::Normal(0.0, 1.0), &cpu());
        let [kk, ss, pp] = [[k; 2], [stride; 2], [pad; 2]];
        let want = burn::tensor::module::max_pool2d(x.clone(), kk, ss, pp, [1, 1], false);
        let got = lfm::nn::max_pool2d(x.clone(), k, stride, pad);
        assert_eq!(got.dims(), want.dims());
        assert_close(&format!("max k{k} s{stride} p{pad} {h}×{w}"), &values(got), &values(want), 0.0, 0.0);
        let want = burn::tensor::module::avg_pool2d(x.clone(), kk, ss, pp, false, false);
        let got = lfm::nn::avg_pool2d_exclude_pad(x, k, stride, pad);
        assert_close(&format!("avg k{k} s{stride} p{pad} {h}×{w}"), &values(got), &values(want), 1e-6, 1e-6);
    }
}

fn taesd_weights() -> Option<AutoencoderWeights> {
    let dir = shared("assets/taesd")?;
    Some(AutoencoderWeights::read(AutoencoderKind::Taesd, &dir, None).unwrap())
}

/// PSNR in dB between two 8-bit images.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

/// The PSNR of TAESD's round trip of the 256-px photograph; `None` (skipped, see [`shared`]) without the weights.
fn taesd_round_trip<B: Backend>(device: &B::Device) -> Option<f64> {
    let weights = taesd_weights()?;
    let model = weights.load::<B>(device).unwrap();
    let photo = lfm::image::read_rgb(&fixture("astronaut_256.png")).unwrap();
    let x = lfm::image::to_tensor::<B>(std::slice::from_ref(&photo), device).unwrap();
    let z = model.encode(x, None);
    assert_eq!(z.dims(), [1, 4, 32, 32]);
    let back = lfm::image::from_tensor(model.decode(z));
    let db = psnr(&back[0].pixels, &photo.pixels);
    eprintln!("TAESD round trip of the 256-px astronaut: {db:.2} dB PSNR");
    Some(db)
}

#[test]
fn taesd_reconstructs_a_photograph_on_cpu() {
    let Some(db) = taesd_round_trip::<Cpu>(&cpu()) else { return };
    assert!(db >= 22.0, "TAESD round trip PSNR {db:.2} dB < 22 dB");
}

/// TAESD's latents and decoded pixels of a 64-px crop of the photograph, as floats.
fn taesd_of_a_crop<B: Backend>(weights: &AutoencoderWeights, device: &B::Device) -> (Vec<f32>, Vec<f32>) {
    let photo = lfm::image::read_rgb(&fixture("astronaut_256.png")).unwrap();
    let (side, left, top) = (64, 96, 64);
    let pixels = (top..top + side)
        .flat_map(|y| photo.pixels[3 * (y * photo.width + left)..3 * (y * photo.width + left + side)].to_vec())
        .collect();
    let crop = lfm::image::RgbImage { width: side, height: side, pixels };
    let model = weights.load::<B>(device).unwrap();
    let z = model.encode(lfm::image::to_tensor::<B>(&[crop], device).unwrap(), None);
    (values(z.clone()), values(model.decode(z)))
}

/// TAESD computes on wgpu what it computes on the CPU. A 64-px crop takes every layer, at a sixteenth of the
/// photograph's arithmetic (the CPU test above checks the reconstruction of the whole photograph).
#[test]
fn taesd_matches_the_cpu_on_wgpu() {
    let Some(device) = wgpu() else { return };
    let Some(weights) = taesd_weights() else { return };
    let (z_cpu, images_cpu) = taesd_of_a_crop::<Cpu>(&weights, &cpu());
    let (z_gpu, images_gpu) = taesd_of_a_crop::<Wgpu>(&weights, &device);
    assert_close("TAESD latents, wgpu vs cpu", &z_gpu, &z_cpu, 1e-4, 1e-5);
    assert_close("TAESD decoded crop, wgpu vs cpu", &images_gpu, &images_cpu, 1e-4, 1e-5);
}

/// A velocity network's checkpoint passed as the autoencoder is named for what it is.
#[test]
fn a_velocity_checkpoint_given_as_the_autoencoder_is_recognised() {
    let dit = read_weights(&fixture("dit_tiny/model.pth")).unwrap().tensors;
    let err = AutoencoderKL::<Cpu>::load(&vae_config(), &dit, &cpu()).unwrap_err().to_string();
    assert!(err.contains("The file holds a DiT velocity network, not the network being loaded"), "{err}");
    // A real mismatch of the same family keeps the advice about the architecture.
    let vae = read_weights(&fixture("vae_tiny/model.safetensors")).unwrap().tensors;
    let wider = AutoencoderKLConfig { latent_channels: 8, ..vae_config() };
    let err = AutoencoderKL::<Cpu>::load(&wider, &vae, &cpu()).unwrap_err().to_string();
    assert!(err.contains("shape mismatches") && err.contains("--vae-config"), "{err}");
}

#[test]
fn weights_of_the_wrong_model_are_refused_by_name_and_shape() {
    let Some(dir) = shared("assets/taesd") else { return };
    // TAESD's decoder file given as a KL VAE.
    let file = dir.join("taesd_decoder.safetensors");
    let as_kl = AutoencoderWeights::read(AutoencoderKind::Kl, &file, None).unwrap();
    let err = as_kl.load::<Cpu>(&cpu()).unwrap_err();
    let lfm::autoencoder::AutoencoderError::Checkpoint(CheckpointError::Mismatch(report)) = &err else {
        panic!("{err}")
    };
    assert!(
        report.missing.iter().any(|k| k == "encoder.conv_in.weight")
            && report.unexpected.iter().any(|k| k == "1.weight")
    );
    // The VAE's weights in place of TAESD's halves.
    let tmp = tempfile::tempdir().unwrap();
    for half in ["taesd_encoder", "taesd_decoder"] {
        std::fs::copy(fixture("vae_tiny/model.safetensors"), tmp.path().join(format!("{half}.safetensors"))).unwrap();
    }
    let err =
        AutoencoderWeights::read(AutoencoderKind::Taesd, tmp.path(), None).unwrap().load::<Cpu>(&cpu()).unwrap_err();
    assert!(err.to_string().contains("missing from the file"), "{err}");
    assert!(err.to_string().contains("The file holds a KL autoencoder"), "{err}");
    // A folder with no weights.
    let err = AutoencoderWeights::read(AutoencoderKind::Taesd, &fixture("dit_tiny"), None).unwrap_err();
    assert!(err.to_string().contains("no taesd_encoder.safetensors or taesd_encoder.pth"), "{err}");
}

#[test]
fn encode_and_decode_commands_round_trip() {
    let Some(weights) = shared("assets/taesd") else { return };
    let dir = tempfile::tempdir().unwrap();
    let latents = dir.path().join("latents.safetensors");
    let photo = fixture("astronaut_256.png");
    let taesd = ["--autoencoder", "taesd", "--weights", weights.to_str().unwrap()];
    let mut encode = vec!["--backend", "cpu", "encode", photo.to_str().unwrap(), photo.to_str().unwrap(), "--out"];
    encode.push(latents.to_str().unwrap());
    encode.extend_from_slice(&taesd);
    let (ok, _, stderr) = lfm(&encode);
    assert!(ok, "{stderr}");
    let z = lfm::checkpoint::read_safetensors(&latents).unwrap().0;
    assert_eq!(z["latents"].shape, vec![2, 4, 32, 32]);
    let (ok, _, stderr) = lfm(&encode);
    assert!(!ok && stderr.contains("exists; pass --force"), "{stderr}");

    let out = dir.path().join("images");
    let mut decode = vec!["--backend", "cpu", "decode", latents.to_str().unwrap(), "--out-dir", out.to_str().unwrap()];
    decode.extend_from_slice(&taesd);
    let (ok, _, stderr) = lfm(&decode);
    assert!(ok, "{stderr}");
    let image = lfm::image::read_rgb(&out.join("00001.png")).unwrap();
    assert_eq!((image.width, image.height), (256, 256));
    let original = lfm::image::read_rgb(&photo).unwrap();
    assert!(psnr(&image.pixels, &original.pixels) >= 22.0);
    let (ok, _, stderr) = lfm(&decode);
    assert!(!ok && stderr.contains("pass --force"), "{stderr}");

    // An image whose sides are not multiples of 8.
    let odd = dir.path().join("odd.png");
    lfm::image::write_rgb(&odd, &lfm::image::RgbImage { width: 20, height: 12, pixels: vec![128; 20 * 12 * 3] })
        .unwrap();
    let mut encode = vec!["--backend", "cpu", "encode", odd.to_str().unwrap(), "--out"];
    let other = dir.path().join("odd.safetensors");
    encode.push(other.to_str().unwrap());
    encode.extend_from_slice(&taesd);
    let (ok, _, stderr) = lfm(&encode);
    assert!(!ok && stderr.contains("divisible by 8"), "{stderr}");
}
