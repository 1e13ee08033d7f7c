//! The networks' `Linear` and `Conv2d` layers: Burn's fields and records (checkpoints, saved training states and
//! parameter paths are unchanged), with a `forward` that takes lfm's fast paths by itself, so that no call site
//! can lose them by calling the "wrong" function:
//! - on the CPU backend at inference, lfm's CPU kernels ([`cpu::linear`], [`cpu::conv2d`]: one GEMM per core with
//!   the bias and the activation fused into its output blocks), and under its autodiff in `f32` the same kernels
//!   with backward passes of lfm's (`super::cpu_grad`);
//! - convolutions as im2col + one product where that beats Burn's kernels (ndarray under autodiff in 16 bits,
//!   full-f32 CUDA, a software wgpu adapter: [`super::conv2d_padded`]);
//! - products through [`lfm_kernels::matmul`] where it applies (full f32 on CUDA, one small kernel on a software
//!   wgpu adapter);
//! - Burn's own ops everywhere else.

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::tensor::{backend::Backend, Tensor};

use super::{conv2d_padded, cpu, Activation};

/// A fully connected layer `y = x·W + b` over the last dimension (`W` `[in, out]`, Burn's layout; PyTorch's
/// `[out, in]` is transposed when a checkpoint is applied).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// `x·W + b`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_activated(x, Activation::None)
    }

    /// `activation(x·W + b)`, with the activation fused into the product's output on the CPU backend.
    pub fn forward_activated<const D: usize>(&self, x: Tensor<B, D>, activation: Activation) -> Tensor<B, D> {
        let weight = self.weight.val();
        let bias = || self.bias.as_ref().map(|b| b.val());
        if D >= 2 && cpu::applies(&x) && cpu::applies(&weight) {
            return cpu::linear(x, weight, bias(), activation);
        }
        if let Some(y) = super::cpu_grad::linear(&x, &weight, bias().as_ref(), activation) {
            return y;
        }
        if D >= 2 && lfm_kernels::matmul::own_route_applies::<B>() {
            // Burn's `linear`: x·W with W broadcast over the batch dimensions, then the bias.
            let y = lfm_kernels::matmul::matmul(x, weight.unsqueeze());
            let y = match bias() {
                Some(b) => y + b.unsqueeze(),
                None => y,
            };
            return activation.apply(y);
        }
        activation.apply(burn::tensor::module::linear(x, weight, bias()))
    }
}

/// A 2-D convolution (`weight` `[out, in / groups, kh, kw]`), with Burn's `Conv2d` fields.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[c_out, c_in / groups, kh, kw]`.
    pub weight: Param<Tensor<B, 4>>,
    /// `[c_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Stride `[y, x]`.
    pub stride: [usize; 2],
    /// Kernel size `[kh, kw]`.
    pub kernel_size: [usize; 2],
    /// Spacing between kernel elements.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
    /// The padding.
    pub padding: PaddingConfig2d,
}

impl<B: Backend> Conv2d<B> {
    /// The convolution.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_activated(x, Activation::None)
    }

    /// `activation(conv(x))`. Square strides with the same zero padding on every side, no dilation and one group
    /// (every convolution of lfm's networks) take [`conv2d_padded`]'s routes; anything else Burn's kernel.
    pub fn forward_activated(&self, x: Tensor<B, 4>, activation: Activation) -> Tensor<B, 4> {
        let padding = match self.padding {
            PaddingConfig2d::Explicit(a, b, c, d) if [b, c, d] == [a; 3] => Some(a),
            PaddingConfig2d::Valid => Some(0),
            _ => None,
        };
        let [sy, sx] = self.stride;
        match padding {
            Some(p) if sy == sx && self.dilation == [1, 1] && self.groups == 1 => {
                let bias = self.bias.as_ref().map(|b| b.val());
                conv2d_padded(x, self.weight.val(), bias, sy, [p, p], activation)
            }
            _ => {
                // Burn's layer on the same parameters (clones of a parameter share its tensor).
                let burn_layer = burn::nn::conv::Conv2d {
                    weight: self.weight.clone(),
                    bias: self.bias.clone(),
                    stride: self.stride,
                    kernel_size: self.kernel_size,
                    dilation: self.dilation,
                    groups: self.groups,
                    padding: self.padding.clone(),
                };
                activation.apply(burn_layer.forward(x))
            }
        }
    }
}
