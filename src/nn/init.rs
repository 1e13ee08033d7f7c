//! Building layers with the reference's initialisation (used for training from scratch; loading overwrites it).

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, PaddingConfig2d};
use burn::tensor::{backend::Backend, Distribution, Tensor};

use super::{Conv2d, Linear};

/// How a weight is initialised, in PyTorch's terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// `xavier_uniform_` on the weight viewed as `[out, in·k·k]`.
    XavierUniform,
    /// `normal_(std)`.
    Normal(f64),
    /// PyTorch's default for `nn.Linear`/`nn.Conv2d`: kaiming-uniform, `U(±1/√fan_in)`.
    TorchDefault,
    /// `constant_(0)`.
    Zeros,
}

fn weight<B: Backend, const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    fan_out: usize,
    init: Init,
    device: &B::Device,
) -> Tensor<B, D> {
    match init {
        Init::XavierUniform => {
            let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
            Tensor::random(shape, Distribution::Uniform(-a, a), device)
        }
        Init::Normal(std) => Tensor::random(shape, Distribution::Normal(0.0, std), device),
        Init::TorchDefault => {
            let a = 1.0 / (fan_in as f64).sqrt();
            Tensor::random(shape, Distribution::Uniform(-a, a), device)
        }
        Init::Zeros => Tensor::zeros(shape, device),
    }
}

fn bias<B: Backend>(n: usize, fan_in: usize, init: Init, device: &B::Device) -> Tensor<B, 1> {
    match init {
        Init::TorchDefault => {
            let a = 1.0 / (fan_in as f64).sqrt();
            Tensor::random([n], Distribution::Uniform(-a, a), device)
        }
        _ => Tensor::zeros([n], device),
    }
}

/// A `Linear(d_in → d_out)` with bias; the bias is zero unless `init` is [`Init::TorchDefault`].
pub fn linear<B: Backend>(d_in: usize, d_out: usize, init: Init, device: &B::Device) -> Linear<B> {
    Linear {
        weight: Param::from_tensor(weight([d_in, d_out], d_in, d_out, init, device)),
        bias: Some(Param::from_tensor(bias(d_out, d_in, init, device))),
    }
}

/// A `Linear(d_in → d_out)` without bias.
pub fn linear_no_bias<B: Backend>(d_in: usize, d_out: usize, init: Init, device: &B::Device) -> Linear<B> {
    Linear { weight: Param::from_tensor(weight([d_in, d_out], d_in, d_out, init, device)), bias: None }
}

/// Geometry of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Symmetric zero padding.
    pub padding: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl ConvSpec {
    /// A `k×k` convolution with stride 1 and "same" padding `k/2`, with bias.
    pub fn same(c_in: usize, c_out: usize, kernel: usize) -> Self {
        Self { c_in, c_out, kernel, stride: 1, padding: kernel / 2, bias: true }
    }
}

/// A `Conv2d` with the given geometry and weight initialisation.
pub fn conv2d<B: Backend>(spec: ConvSpec, init: Init, device: &B::Device) -> Conv2d<B> {
    let (p, k) = (spec.padding, spec.kernel);
    let fan_in = spec.c_in * k * k;
    Conv2d {
        // xavier on the [out, in·k·k] view, as DiT initialises its patch embedding.
        weight: Param::from_tensor(weight([spec.c_out, spec.c_in, k, k], fan_in, spec.c_out, init, device)),
        bias: spec.bias.then(|| Param::from_tensor(bias(spec.c_out, fan_in, init, device))),
        stride: [spec.stride; 2],
        kernel_size: [k; 2],
        dilation: [1, 1],
        groups: 1,
        padding: PaddingConfig2d::Explicit(p, p, p, p),
    }
}

/// An embedding table `[rows, dim]`.
pub fn embedding<B: Backend>(rows: usize, dim: usize, init: Init, device: &B::Device) -> Embedding<B> {
    let mut layer = EmbeddingConfig::new(rows, dim).init(device);
    layer.weight = Param::from_tensor(weight([rows, dim], dim, rows, init, device));
    layer
}
