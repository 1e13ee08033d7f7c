//! Layers shared by the velocity networks: sinusoidal embeddings, attention, normalisations, activations.

pub mod attention;
pub mod embedding;
pub mod init;

use burn::tensor::{backend::Backend, Tensor};

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`), as DiT's MLP uses.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

/// SiLU, `x·σ(x)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    burn::tensor::activation::silu(x)
}

/// LayerNorm over the last dimension without affine parameters (`elementwise_affine=False`), biased variance.
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    (x - mean).div((var.add_scalar(eps)).sqrt())
}

/// adaLN modulation `x·(1 + scale) + shift` with per-sample `shift`, `scale` of shape `[N, C]` over tokens `[N, T, C]`.
pub fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    x * scale.unsqueeze_dim::<3>(1).add_scalar(1.0) + shift.unsqueeze_dim(1)
}

/// GroupNorm with a per-channel affine transform, over `[N, C, …]` (any rank ≥ 3), biased variance, as
/// `torch.nn.functional.group_norm`.
#[derive(burn::module::Module, Debug)]
pub struct GroupNorm<B: Backend> {
    /// Per-channel scale (γ).
    pub weight: burn::module::Param<Tensor<B, 1>>,
    /// Per-channel shift (β).
    pub bias: burn::module::Param<Tensor<B, 1>>,
    /// Number of groups (divides the channel count).
    pub num_groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// A GroupNorm with γ = 1, β = 0 (PyTorch's initialisation).
    pub fn new(channels: usize, num_groups: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: burn::module::Param::from_tensor(Tensor::ones([channels], device)),
            bias: burn::module::Param::from_tensor(Tensor::zeros([channels], device)),
            num_groups,
            eps,
        }
    }

    /// Normalises each group of channels of each sample, then applies γ and β.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let (n, c) = (dims[0], dims[1]);
        let rest: usize = dims[2..].iter().product();
        let grouped = x.reshape([n, self.num_groups, (c / self.num_groups) * rest]);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed = ((grouped - mean) / var.add_scalar(self.eps).sqrt()).reshape([n, c, rest]);
        let gamma = self.weight.val().reshape([1, c, 1]);
        let beta = self.bias.val().reshape([1, c, 1]);
        (normed * gamma + beta).reshape(dims)
    }
}

/// Nearest-neighbour ×2 upsampling of `[N, C, H, W]` (`F.interpolate(scale_factor=2, mode="nearest")`; also what
/// EDM's `[1, 1]` transposed resample filter computes).
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1]).expand([n, c, h, 2, w, 2]).reshape([n, c, 2 * h, 2 * w])
}

/// 2×2 average pooling with stride 2 of `[N, C, H, W]` with even `H`, `W` (`avg_pool2d(2)`; also EDM's `[1, 1]`
/// downsampling filter).
pub fn avg_pool_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h / 2, 2, w / 2, 2]).sum_dim(5).sum_dim(3).mul_scalar(0.25).reshape([n, c, h / 2, w / 2])
}

/// Whether `B` is the ndarray CPU backend, whose `conv2d` is a direct loop (≈1.8 GFLOP/s measured on a DiT-sized
/// UNet here, against ≈24 GFLOP/s for its matmul).
fn is_ndarray<B: Backend>() -> bool {
    std::any::type_name::<B>().contains("NdArray")
}

/// A stride-1, "same"-padded `k×k` convolution (`weight` `[out, in, k, k]`) as im2col + one matmul: the `k²`
/// shifted copies of the zero-padded input are stacked into `[N, in·k², H·W]`, in the weight's `(in, ky, kx)` order.
pub fn conv2d_im2col<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let [out, _, k, _] = weight.dims();
    // Bound the column buffer (k² copies of the input) to about 256 MiB by convolving a few samples at a time.
    let per_sample = c * k * k * h * w;
    let chunk = ((1usize << 26) / per_sample.max(1)).max(1);
    if n > chunk {
        let parts = (0..n)
            .step_by(chunk)
            .map(|i| conv2d_im2col(x.clone().narrow(0, i, chunk.min(n - i)), weight.clone(), bias.clone()))
            .collect();
        return Tensor::cat(parts, 0);
    }
    let columns = if k == 1 {
        x.reshape([n, c, h * w])
    } else {
        let p = k / 2;
        let padded = x.pad((p, p, p, p), burn::tensor::ops::PadMode::Constant(0.0));
        let shifts: Vec<Tensor<B, 4>> = (0..k)
            .flat_map(|ky| (0..k).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| padded.clone().slice([0..n, 0..c, ky..ky + h, kx..kx + w]).reshape([n, c, 1, h * w]))
            .collect();
        Tensor::cat(shifts, 2).reshape([n, c * k * k, h * w])
    };
    let y = weight.reshape([1, out, c * k * k]).matmul(columns);
    let y = match bias {
        Some(b) => y + b.reshape([1, out, 1]),
        None => y,
    };
    y.reshape([n, out, h, w])
}

/// A `Conv2d` layer's forward pass; on the CPU backend, stride-1 "same" convolutions go through
/// [`conv2d_im2col`] (an order of magnitude faster there), everything else through Burn's own kernel.
pub fn conv2d<B: Backend>(layer: &burn::nn::conv::Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, k, kw] = layer.weight.dims();
    let same = match layer.padding {
        burn::nn::PaddingConfig2d::Explicit(a, b, c, d) => [a, b, c, d] == [k / 2; 4],
        _ => false,
    };
    if is_ndarray::<B>() && k == kw && k % 2 == 1 && same && layer.stride == [1, 1] && layer.groups == 1 {
        conv2d_im2col(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
    } else {
        layer.forward(x)
    }
}
