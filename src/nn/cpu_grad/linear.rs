//! `activation(x·W + b)` under autodiff: one GEMM per core of the `gemm` crate (AVX-512 where the CPU has it) with
//! the bias fused forward; `dX = dZ·Wᵀ`, `dW = Xᵀ·dZ` (transposes read through strides) and a column sum backward.

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor, TensorMetadata};
use gemm::Parallelism;

use super::{applies, inner, lift, lower, record, register, tensor, values, Inner};
use crate::nn::cpu::{self, gemm_rows_set, par_filled_vec, par_written_vec, with_matrix};
use crate::nn::vector_math::{exp, zip_map};
use crate::nn::Activation;

/// Elements per parallel task of the element-wise passes.
const CHUNK: usize = 1 << 14;

/// `activation(x·W + b)` over the last dimension of `x` when `B` is `Autodiff<NdArray<f32>>`, the tensors are `f32`,
/// the layer has a bias and the activation is none or GELU; `None` otherwise (the caller takes Burn's ops).
pub(crate) fn linear<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    activation: Activation,
) -> Option<Tensor<B, D>> {
    let bias = bias?;
    if D < 2
        || !applies::<B>(&[x.dtype(), weight.dtype(), bias.dtype()])
        || !matches!(activation, Activation::None | Activation::GeluTanh)
    {
        return None;
    }
    let (x, w, b) = (lift(x), lift(weight), lift(bias));
    let dims: [usize; D] = x.primitive.shape().dims();
    let [k, n] = w.primitive.shape().dims();
    let m = dims[..D - 1].iter().product::<usize>();
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    let op = LinearBackward { activation, x_dims: dims.to_vec(), m, k, n };
    let out = record(op, [&x, &w, &b], || {
        // The input as `[m, k]` (built, not reshaped, when empty: Burn's reshape reads a 0 as "keep this dimension").
        let x2 = match m {
            0 => tensor(Vec::new(), [0, k]),
            _ => inner::<D>(x.primitive.clone()).reshape([m, k]).into_primitive().tensor(),
        };
        let (weight, bias) = (inner(w.primitive.clone()), Some(inner(b.primitive.clone())));
        let z = cpu::linear(inner::<2>(x2.clone()), weight, bias, Activation::None).into_primitive().tensor();
        let y = match activation {
            Activation::GeluTanh => {
                let z = values(z.clone());
                let y = par_filled_vec(z.len(), CHUNK, |range, y| {
                    y.copy_from_slice(&z[range]);
                    activation.apply_in_place(y);
                });
                tensor(y, out_dims.to_vec())
            }
            _ => match m {
                0 => tensor(Vec::new(), out_dims.to_vec()),
                _ => inner::<2>(z.clone()).reshape(out_dims).into_primitive().tensor(),
            },
        };
        let pre_activation = (activation != Activation::None).then_some(z);
        (y, LinearState { x: x2, w: w.primitive.clone(), z: pre_activation })
    });
    Some(lower(out))
}

/// What the backward pass of [`linear`] keeps: the input as `[m, k]`, the weight `[k, n]` and, with an activation,
/// the pre-activation `[m, n]`.
#[derive(Debug, Clone)]
struct LinearState {
    x: FloatTensor<Inner>,
    w: FloatTensor<Inner>,
    z: Option<FloatTensor<Inner>>,
}

#[derive(Debug)]
struct LinearBackward {
    activation: Activation,
    /// The input's own shape, which its gradient takes.
    x_dims: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
}

impl Backward<Inner, 3> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents.map(|p| p.map(|p| p.id));
        let LinearState { x, w, z } = ops.state;
        let Self { m, k, n, .. } = self;
        let upstream = values(grads.consume::<Inner>(&ops.node));
        // dZ: the upstream gradient through the activation's derivative at the saved pre-activation.
        let through_activation = match (self.activation, z) {
            (Activation::GeluTanh, Some(z)) => {
                let z = values(z);
                Some(par_filled_vec(upstream.len(), CHUNK, |range, g| {
                    zip_map(g, &upstream[range.clone()], &z[range], |u, z| u * gelu_tanh_derivative(z))
                }))
            }
            _ => None,
        };
        let g: &[f32] = through_activation.as_deref().unwrap_or(&upstream);
        let products = m > 0 && k > 0 && n > 0;
        // Each product is one GEMM split over the cores by the `gemm` crate, written straight into an uninitialised
        // buffer. (Splitting dX by rows and dW by input features, one GEMM per core each, packs dZ once per core:
        // DiT-B/2 training 1.14x slower, measured.)
        let threads = Parallelism::Rayon(0);
        register(grads, node_x, &self.x_dims, || {
            if !products {
                return vec![0.0f32; m * k];
            }
            // dX = dZ·Wᵀ: Wᵀ is W read with its strides swapped.
            with_matrix(inner(w), |w, [row, column]| {
                // SAFETY: dX is [m, k], written whole (n ≥ 1); g is [m, n] row-major; W is [k, n] with these
                // strides, so Wᵀ is [n, k].
                unsafe {
                    par_written_vec(m * k, m * k, |_, dx, _| {
                        gemm_rows_set(m, k, n, dx, k, (g, [n, 1]), (w, [column, row]), threads)
                    })
                }
            })
        });
        register(grads, node_w, &[k, n], || {
            if !products {
                return vec![0.0f32; k * n];
            }
            // dW = Xᵀ·dZ: Xᵀ is the row-major X read with strides [1, k].
            let x = values(x);
            // SAFETY: dW is [k, n], written whole (m ≥ 1); X is [m, k] row-major, so Xᵀ is [k, m] with strides
            // [1, k]; g is [m, n].
            unsafe {
                par_written_vec(k * n, k * n, |_, dw, _| {
                    gemm_rows_set(k, n, m, dw, n, (&x, [1, k]), (g, [n, 1]), threads)
                })
            }
        });
        register(grads, node_b, &[n], || column_sums(g, n));
    }
}

/// The column sums of a row-major `[rows, n]` matrix, in f32 as Burn's `sum_dim` adds them (rows in order).
fn column_sums(values: &[f32], n: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; n];
    for row in values.chunks_exact(n.max(1)) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    sums
}

/// `d/dx` of [`crate::nn::gelu_tanh`], `x·σ(2u)` with `u = √(2/π)·(x + 0.044715·x³)`:
/// `σ(2u) + x·σ(2u)·(1 − σ(2u))·2u′`.
#[inline(always)]
fn gelu_tanh_derivative(x: f32) -> f32 {
    let c = crate::nn::SQRT_2_OVER_PI as f32;
    let u = c * (x + 0.044715 * x * x * x);
    let s = 1.0 / (1.0 + exp(-2.0 * u));
    s + x * s * (1.0 - s) * 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x)
}
