//! The built-in Fashion-MNIST model: `lfm sample` with no model flags makes a grid (classes in rows) whose samples
//! differ, and the embedded weights load and run.

use burn::tensor::{Int, Tensor, TensorData};
use lfm::autoencoder::Autoencoder;
use lfm::backend::Cpu;
use lfm::models::VelocityModel;

use crate::common::*;

/// One grid cell's pixels (torchvision's layout: 2-pixel padding).
fn cell(grid: &image::RgbImage, row: u32, col: u32, side: u32) -> Vec<u8> {
    let (x0, y0) = (2 + col * (side + 2), 2 + row * (side + 2));
    image::imageops::crop_imm(grid, x0, y0, side, side).to_image().into_raw()
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / a.len() as f64
}

#[test]
fn sample_with_no_flags_writes_a_grid_of_distinct_samples_with_classes_in_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::common::lfm_bin())
        .args(["--backend", "cpu", "sample"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (config, _) = lfm::builtin::model().unwrap();
    let defaults = lfm::builtin::sampling().unwrap();
    let (classes, per_class) = (config.classes().unwrap() as u32, defaults.per_class as u32);
    assert_eq!(classes as usize, lfm::builtin::CLASS_NAMES.len());
    let grid = image::open(dir.path().join("samples.png")).unwrap().to_rgb8();
    let side = 28;
    assert_eq!(grid.dimensions(), (per_class * (side + 2) + 2, classes * (side + 2) + 2));
    // Within a row (one class) the samples differ; across rows the classes differ more than noise would.
    let cells: Vec<Vec<Vec<u8>>> =
        (0..classes).map(|r| (0..per_class).map(|c| cell(&grid, r, c, side)).collect()).collect();
    for (r, row) in cells.iter().enumerate() {
        for c in 1..row.len() {
            assert!(mean_abs_diff(&row[0], &row[c]) > 1.0, "class {r}: samples 0 and {c} are the same image");
        }
        // Not blank: Fashion-MNIST items are bright on black (sandals, the sparsest, average about 20 of 255).
        let brightness = row.iter().flatten().map(|&p| p as f64).sum::<f64>() / (row.len() * row[0].len()) as f64;
        assert!(brightness > 10.0, "class {r} is blank (mean {brightness:.1})");
    }
    // Trousers (1) against bags (8): their mean images differ a lot.
    let mean_image = |r: usize| -> Vec<u8> {
        (0..cells[r][0].len())
            .map(|i| (cells[r].iter().map(|c| c[i] as u32).sum::<u32>() / cells[r].len() as u32) as u8)
            .collect()
    };
    let within = mean_abs_diff(&cells[1][0], &cells[1][1]);
    let between = mean_abs_diff(&mean_image(1), &mean_image(8));
    assert!(between > 10.0, "trousers and bags look alike (mean difference {between:.1}, within a class {within:.1})");

    // An existing grid is not overwritten.
    let again = std::process::Command::new(crate::common::lfm_bin())
        .args(["--backend", "cpu", "sample"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
}

/// The embedded weights load and give a finite velocity and decoded images of the right shape. (On wgpu the same
/// layers are checked against the golden references by the DiT and KL-autoencoder tests; running this model there
/// too cost over three minutes of lavapipe's kernel compilation and autotuning.)
#[test]
fn the_builtin_assets_load_and_run() {
    let (config, weights) = lfm::builtin::model().unwrap();
    let lfm::autoencoder::AutoencoderWeights::Kl(ae_config, _) = lfm::builtin::autoencoder().unwrap() else {
        panic!("the built-in autoencoder is a KL autoencoder")
    };
    assert_eq!(ae_config.latent_channels, config.channels().1);
    assert_eq!(ae_config.factor() * config.latent_size(), 28, "28×28 Fashion-MNIST images");
    let side = config.latent_size();
    let n = 3;
    let x: Vec<f32> = lfm::noise::batch(7, 0, n, 4 * side * side);
    fn eval<B: burn::tensor::backend::Backend>(
        config: &lfm::models::ModelConfig,
        weights: &lfm::checkpoint::TensorMap,
        x: &[f32],
        n: usize,
        side: usize,
        device: &B::Device,
    ) -> (Vec<f32>, Vec<f32>) {
        let model = VelocityModel::<B>::load(config, weights, device).unwrap();
        let ae = lfm::builtin::autoencoder().unwrap().load::<B>(device).unwrap();
        let x = Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [n, 4, side, side]), device);
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![0.9f32, 0.5, 0.1], [n]), device);
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i64, 4, 9], [n]), device);
        let v = model.forward(t, x.clone(), Some(y));
        let images = ae.decode(x);
        let host = |t: Tensor<B, 4>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        (host(v), host(images))
    }
    let (v, images) = eval::<Cpu>(&config, &weights, &x, n, side, &cpu());
    assert_eq!((v.len(), images.len()), (x.len(), n * 3 * 28 * 28));
    assert!(v.iter().chain(&images).all(|x| x.is_finite()));
}
