//! Layers shared by the velocity networks: sinusoidal embeddings, attention, normalisations, activations.

pub mod attention;
pub mod cpu;
mod cpu_grad;
pub mod dtype;
pub mod embedding;
pub mod init;
pub mod layers;
pub mod vector_math;

pub use layers::{Conv2d, Linear};

use burn::tensor::{backend::Backend, Tensor};

/// √(2/π), GELU's tanh-approximation constant.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`), as DiT's MLP uses:
/// `½·x·(1 + tanh(u))` with `u = √(2/π)·(x + 0.044715·x³)`.
///
/// On the CPU backend at inference it is computed as `x / (1 + e^(−2u))`, the same function and as accurate, because
/// ndarray's `tanh` runs in f64 through `expm1` (with a `powf` for `x³`, a fifth of the built-in model's CPU sampling
/// time). Not under autodiff or in 16 bits: there `e^(−2u)` overflows left of 0 and its gradient is NaN.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    if cpu::applies(&x) {
        // e^(−2u) = +∞ far left of 0 gives x / ∞ = −0, GELU's limit.
        x / inner.mul_scalar(-2.0).exp().add_scalar(1.0)
    } else {
        x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
    }
}

/// SiLU, `x·σ(x)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    burn::tensor::activation::silu(x)
}

/// LayerNorm over the last dimension without affine parameters (`elementwise_affine=False`), biased variance.
/// Computed in f32 for 16-bit `x` (16-bit sums lose the variance), returned in `x`'s dtype.
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = dtype::to_dtype(x, dtype::accumulation_dtype(dtype));
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    dtype::to_dtype((x - mean).div((var.add_scalar(eps)).sqrt()), dtype)
}

/// adaLN modulation `x·(1 + scale) + shift` with per-sample `shift`, `scale` of shape `[N, C]` over tokens `[N, T, C]`.
pub fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    x * scale.unsqueeze_dim::<3>(1).add_scalar(1.0) + shift.unsqueeze_dim(1)
}

/// GroupNorm with a per-channel affine transform, over `[N, C, …]` (any rank ≥ 3), biased variance, as
/// `torch.nn.functional.group_norm`; the parameters of [`group_norm`].
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
        self.forward_activated(x, Activation::None)
    }

    /// `activation(forward(x))` ([`group_norm`] without a modulation).
    pub fn forward_activated<const D: usize>(&self, x: Tensor<B, D>, activation: Activation) -> Tensor<B, D> {
        group_norm(x, self.affine(), None, self.num_groups, self.eps, activation)
    }

    /// The scale-shift norm `activation(forward(x)·(1 + scale) + shift)` of `x` `[N, C, …]` with per-sample,
    /// per-channel `scale`, `shift` `[N, C]`, or `[1, C]` for the whole batch (guided diffusion's
    /// `use_scale_shift_norm`, EDM's `adaptive_scale`; [`group_norm`]).
    pub fn forward_modulated<const D: usize>(
        &self,
        x: Tensor<B, D>,
        scale: Tensor<B, 2>,
        shift: Tensor<B, 2>,
        activation: Activation,
    ) -> Tensor<B, D> {
        group_norm(x, self.affine(), Some([scale, shift]), self.num_groups, self.eps, activation)
    }

    fn affine(&self) -> [Tensor<B, 1>; 2] {
        [self.weight.val(), self.bias.val()]
    }
}

/// `activation((GroupNorm(x)·γ + β)·(1 + scale) + shift)` of `x` `[N, C, …]` (any rank ≥ 3: `[N, C, L]` with the
/// rest flattened) with `groups` groups, biased variance plus `eps`, the affine `[γ, β]` `[C]` and an optional
/// modulation `[scale, shift]` `[N, C]` or `[1, C]` (without one, `activation(GroupNorm(x)·γ + β)`).
///
/// One kernel on the CPU backend at inference ([`cpu::group_norm`]), one tracked operation each way under its
/// autodiff (none or SiLU), [`group_norm_reference`]'s tensor ops elsewhere (GPU backends, 16-bit tensors).
pub fn group_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    [gamma, beta]: [Tensor<B, 1>; 2],
    modulation: Option<[Tensor<B, 2>; 2]>,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Tensor<B, D> {
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    let flat = x.reshape([n, c, dims[2..].iter().product()]);
    let params_on_cpu = cpu::applies(&gamma) && cpu::applies(&beta);
    let modulation_on_cpu = modulation.as_ref().is_none_or(|m| m.iter().all(cpu::applies));
    if cpu::applies(&flat) && params_on_cpu && modulation_on_cpu {
        let modulation = modulation.map(|m| m.map(|t| t.expand([n, c])));
        return cpu::group_norm(flat, [gamma, beta], modulation, groups, eps, activation).reshape(dims);
    }
    if cpu_grad::backend_applies::<B>() {
        let modulation = modulation.clone().map(|m| m.map(|t| t.expand([n, c])));
        let modulation = modulation.as_ref().map(|[scale, shift]| [scale, shift]);
        if let Some(y) = cpu_grad::group_norm(&flat, [&gamma, &beta], modulation, groups, eps, activation) {
            return y.reshape(dims);
        }
    }
    group_norm_reference(flat, [gamma, beta], modulation, groups, eps, activation).reshape(dims)
}

/// [`group_norm`] of `x` `[N, C, L]` as Burn tensor ops: statistics in f32 for 16-bit `x` (16-bit sums lose the
/// variance), γ, β and the modulation in `x`'s dtype. The route of GPU backends and 16-bit tensors, and the plain
/// expression the kernels are tested against.
pub fn group_norm_reference<B: Backend>(
    x: Tensor<B, 3>,
    [gamma, beta]: [Tensor<B, 1>; 2],
    modulation: Option<[Tensor<B, 2>; 2]>,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Tensor<B, 3> {
    let [n, c, len] = x.dims();
    let dtype = x.dtype();
    let grouped = x.reshape([n, groups, (c / groups) * len]);
    let grouped = dtype::to_dtype(grouped, dtype::accumulation_dtype(dtype));
    let (var, mean) = grouped.clone().var_mean_bias(2);
    let normed = ((grouped - mean) / var.add_scalar(eps).sqrt()).reshape([n, c, len]);
    let normed = dtype::to_dtype(normed, dtype);
    let y = normed * gamma.reshape([1, c, 1]) + beta.reshape([1, c, 1]);
    let y = match modulation {
        Some([scale, shift]) => {
            let rows = scale.dims()[0];
            y * scale.reshape([rows, c, 1]).add_scalar(1.0) + shift.reshape([rows, c, 1])
        }
        None => y,
    };
    activation.apply(y)
}

/// Nearest-neighbour ×2 upsampling of `[N, C, H, W]` (`F.interpolate(scale_factor=2, mode="nearest")`; also what
/// EDM's `[1, 1]` transposed resample filter computes). One pass ([`cpu::upsample_nearest_2x`]) on the CPU backend
/// at inference, one pass each way under its autodiff.
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    if cpu::applies(&x) {
        return cpu::upsample_nearest_2x(x);
    }
    if let Some(y) = cpu_grad::upsample_nearest_2x(&x) {
        return y;
    }
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1]).expand([n, c, h, 2, w, 2]).reshape([n, c, 2 * h, 2 * w])
}

/// 2×2 average pooling with stride 2 of `[N, C, H, W]` with even `H`, `W` (`avg_pool2d(2)`; also EDM's `[1, 1]`
/// downsampling filter). One pass ([`cpu::avg_pool_2x`]) on the CPU backend at inference, one pass each way under
/// its autodiff.
pub fn avg_pool_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    if h % 2 == 0 && w % 2 == 0 {
        if cpu::applies(&x) {
            return cpu::avg_pool_2x(x);
        }
        if let Some(y) = cpu_grad::avg_pool_2x(&x) {
            return y;
        }
    }
    x.reshape([n, c, h / 2, 2, w / 2, 2]).sum_dim(5).sum_dim(3).mul_scalar(0.25).reshape([n, c, h / 2, w / 2])
}

/// Whether `B` is the ndarray CPU backend (directly or under `Autodiff`), whose `conv2d` is a direct loop
/// (≈1.8 GFLOP/s measured on a DiT-sized UNet here, against ≈24 GFLOP/s for its matmul).
pub(crate) fn is_ndarray<B: Backend>() -> bool {
    lfm_kernels::capabilities::<B>().kind == lfm_kernels::BackendKind::NdArray
}

/// Whether lfm convolves by [`conv2d_im2col`] on `B` rather than with Burn's kernels: on ndarray (its backward is
/// two matmuls, where Burn's is a direct loop), on CUDA in full f32 (its product keeps f32, where Burn's
/// convolution kernels would run TF32 on tensor cores) and on a software wgpu adapter (slices and one small product
/// kernel, where Burn's autotune compiles tiled and implicit-GEMM candidates per convolution: see
/// [`lfm_kernels::matmul`]).
fn convolves_by_im2col<B: Backend>() -> bool {
    is_ndarray::<B>() || lfm_kernels::matmul::own_route_applies::<B>()
}

/// `x` `[N, C, H, W]` with `[left, right, top, bottom]` zeros around each image, in `x`'s dtype. Burn 0.21's
/// `Tensor::pad` builds the padded tensor in the default float dtype and copies `x` into it, which on wgpu turns an
/// f16 input into garbage (read back as f32 bits).
pub fn pad_zeros<B: Backend>(x: Tensor<B, 4>, [left, right, top, bottom]: [usize; 4]) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let padded = Tensor::zeros([n, c, top + h + bottom, left + w + right], (&x.device(), x.dtype()));
    padded.slice_assign([0..n, 0..c, top..top + h, left..left + w], x)
}

/// The `kh·kw` windows of a (padded) `[N, C, H, W]` input that a `kh×kw` kernel with `stride` reads for an
/// `ho×wo` output, each `[N, C, ho, wo]`, in `(ky, kx)` order. A stride `s > 1` is taken by splitting each axis
/// into `(H/s, s)` and picking one phase, so every window is a plain slice (no strided indexing).
pub fn windows<B: Backend>(x: Tensor<B, 4>, kernel: [usize; 2], stride: usize, out: [usize; 2]) -> Vec<Tensor<B, 4>> {
    let [n, c, h, w] = x.dims();
    let ([kh, kw], [ho, wo], s) = (kernel, out, stride.max(1));
    let pairs = (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx)));
    if s == 1 {
        return pairs.map(|(ky, kx)| x.clone().slice([0..n, 0..c, ky..ky + ho, kx..kx + wo])).collect();
    }
    // Pad (bottom/right, never read) to whole multiples of the stride that hold every window.
    let th = h.max(s * ((kh - 1) / s + ho)).div_ceil(s) * s;
    let tw = w.max(s * ((kw - 1) / s + wo)).div_ceil(s) * s;
    let x = if (th, tw) != (h, w) { pad_zeros(x, [0, tw - w, 0, th - h]) } else { x };
    let phases = x.reshape([n, c, th / s, s, tw / s, s]);
    pairs
        .map(|(ky, kx)| {
            let (oy, py, ox, px) = (ky / s, ky % s, kx / s, kx % s);
            // One slice of the 6-d view, so that only the window itself is copied.
            phases.clone().slice([0..n, 0..c, oy..oy + ho, py..py + 1, ox..ox + wo, px..px + 1]).reshape([n, c, ho, wo])
        })
        .collect()
}

/// Output size of a convolution or pool along one axis.
fn out_size(size: usize, pad: usize, kernel: usize, stride: usize) -> usize {
    (size + 2 * pad - kernel) / stride + 1
}

/// A `kh×kw` convolution (`weight` `[out, in, kh, kw]`, zero padding `[ph, pw]`, any stride) as im2col + one
/// matmul: the [`windows`] of the padded input are stacked into `[N, in·kh·kw, Ho·Wo]`, in the weight's
/// `(in, ky, kx)` order.
pub fn conv2d_im2col<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: [usize; 2],
) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let [out, _, kh, kw] = weight.dims();
    let [ph, pw] = padding;
    let (ho, wo) = (out_size(h, ph, kh, stride), out_size(w, pw, kw, stride));
    // Bound the column buffer (kh·kw copies of the input) to about 256 MiB by convolving a few samples at a time.
    let per_sample = c * kh * kw * ho * wo;
    let chunk = ((1usize << 26) / per_sample.max(1)).max(1);
    if n > chunk {
        let parts = (0..n)
            .step_by(chunk)
            .map(|i| {
                let part = x.clone().narrow(0, i, chunk.min(n - i));
                conv2d_im2col(part, weight.clone(), bias.clone(), stride, padding)
            })
            .collect();
        return Tensor::cat(parts, 0);
    }
    let columns = if kh == 1 && kw == 1 && ph == 0 && pw == 0 && stride == 1 {
        x.reshape([n, c, h * w])
    } else {
        let padded = if ph + pw > 0 { pad_zeros(x, [pw, pw, ph, ph]) } else { x };
        let shifts: Vec<Tensor<B, 4>> = windows(padded, [kh, kw], stride, [ho, wo])
            .into_iter()
            .map(|win| win.reshape([n, c, 1, ho * wo]))
            .collect();
        Tensor::cat(shifts, 2).reshape([n, c * kh * kw, ho * wo])
    };
    let y = lfm_kernels::matmul::matmul(weight.reshape([1, out, c * kh * kw]), columns);
    let y = match bias {
        Some(b) => y + b.reshape([1, out, 1]),
        None => y,
    };
    y.reshape([n, out, ho, wo])
}

/// A convolution with explicit stride and symmetric zero padding `[ph, pw]`. On the CPU backend it goes through
/// [`cpu::conv2d`] at inference (7–86× Burn 0.21's direct loop on Inception's and the KL decoder's layers,
/// `benches/cpu_conv.rs`), under its autodiff in `f32` through the same kernel with a backward pass of lfm's
/// (`cpu_grad::conv2d`), and through [`conv2d_im2col`] under autodiff in 16 bits (its backward is two matmuls).
/// `activation` follows.
pub fn conv2d_padded<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: [usize; 2],
    activation: Activation,
) -> Tensor<B, 4> {
    if cpu::applies(&x) && cpu::applies(&weight) {
        return cpu::conv2d(x, weight, bias, stride, padding, activation);
    }
    if let Some(y) = cpu_grad::conv2d(&x, &weight, bias.as_ref(), stride, padding) {
        return activation.apply(y);
    }
    let y = if convolves_by_im2col::<B>() {
        conv2d_im2col(x, weight, bias, stride, padding)
    } else {
        let options = burn::tensor::ops::ConvOptions::new([stride, stride], padding, [1, 1], 1);
        burn::tensor::module::conv2d(x, weight, bias, options)
    };
    activation.apply(y)
}

/// What follows a convolution in [`conv2d_padded`] or a layer in [`linear`]; on the CPU backend at inference it is
/// fused into [`cpu::conv2d`] and [`cpu::linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Nothing.
    None,
    /// `max(x, 0)`, NaN kept (Burn's relu).
    Relu,
    /// [`gelu_tanh`].
    GeluTanh,
    /// [`silu`].
    Silu,
}

impl Activation {
    /// The activation as Burn tensor ops.
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::None => x,
            Self::Relu => burn::tensor::activation::relu(x),
            Self::GeluTanh => gelu_tanh(x),
            Self::Silu => silu(x),
        }
    }

    /// The activation on `f32` values in place: ReLU and GELU rounded step by step as [`Activation::apply`] on the
    /// CPU backend; SiLU as `x / (1 + e^(−x))`, one exponential where Burn's `x·exp(−ln(1 + e^(−x)))` takes two and
    /// a logarithm (the two agree to a few ulps). Exponentials are [`vector_math::exp`]'s, 8 lanes at a time.
    pub fn apply_in_place(self, values: &mut [f32]) {
        match self {
            Self::None => {}
            // `<`, not `max`: a NaN stays NaN, as with Burn's relu.
            Self::Relu => values.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0),
            Self::GeluTanh => vector_math::map_in_place(values, gelu_tanh_f32),
            Self::Silu => vector_math::map_in_place(values, |v| v / (vector_math::exp(-v) + 1.0)),
        }
    }
}

/// One value of [`gelu_tanh`]'s CPU form, `x / (1 + e^(−2u))`, in the same f32 steps as its tensor expression.
#[inline(always)]
fn gelu_tanh_f32(x: f32) -> f32 {
    let inner = (x + x * x * x * 0.044715) * SQRT_2_OVER_PI as f32;
    x / (vector_math::exp(inner * -2.0) + 1.0)
}

/// adaLN's `modulate(layer_norm(x, eps), shift, scale)` over tokens `[N, T, C]` with per-sample `shift`, `scale`
/// `[N, C]`; one pass ([`cpu::layer_norm_modulate`]) on the CPU backend at inference, one pass each way under its
/// autodiff.
pub fn layer_norm_modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: Tensor<B, 2>,
    scale: Tensor<B, 2>,
    eps: f64,
) -> Tensor<B, 3> {
    if cpu::applies(&x) && cpu::applies(&shift) && cpu::applies(&scale) {
        return cpu::layer_norm_modulate(x, shift, scale, eps);
    }
    if let Some(y) = cpu_grad::layer_norm_modulate(&x, &shift, &scale, eps) {
        return y;
    }
    modulate(layer_norm(x, eps), shift, scale)
}

/// The gated residual `x + gate·y` with a per-sample `gate` `[N, C]` over tokens `[N, T, C]`; one pass
/// ([`cpu::add_gated`]) on the CPU backend at inference, one pass each way under its autodiff.
pub fn add_gated<B: Backend>(x: Tensor<B, 3>, gate: Tensor<B, 2>, y: Tensor<B, 3>) -> Tensor<B, 3> {
    if cpu::applies(&x) && cpu::applies(&gate) && cpu::applies(&y) {
        return cpu::add_gated(x, gate, y);
    }
    if let Some(out) = cpu_grad::add_gated(&x, &gate, &y) {
        return out;
    }
    x + gate.unsqueeze_dim::<3>(1) * y
}

/// `max_pool2d(x, k, stride, padding)` (padding never wins the maximum); [`cpu::pool2d`] on the CPU backend at
/// inference (Burn 0.21's ndarray pool indexes element by element).
pub fn max_pool2d<B: Backend>(x: Tensor<B, 4>, kernel: usize, stride: usize, padding: usize) -> Tensor<B, 4> {
    if cpu::applies(&x) {
        return cpu::pool2d(x, cpu::Pool::Max, kernel, stride, padding);
    }
    let [k, s, p] = [[kernel; 2], [stride; 2], [padding; 2]];
    burn::tensor::module::max_pool2d(x, k, s, p, [1, 1], false)
}

/// `avg_pool2d(x, k, stride, padding, count_include_pad=False)`: each output divides by the number of real input
/// pixels under its window; [`cpu::pool2d`] on the CPU backend at inference.
pub fn avg_pool2d_exclude_pad<B: Backend>(
    x: Tensor<B, 4>,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    if cpu::applies(&x) {
        return cpu::pool2d(x, cpu::Pool::MeanExcludingPadding, kernel, stride, padding);
    }
    let [k, s, p] = [[kernel; 2], [stride; 2], [padding; 2]];
    burn::tensor::module::avg_pool2d(x, k, s, p, false, false)
}
