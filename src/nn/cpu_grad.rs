//! lfm's CPU kernels under Burn's autodiff (issue 38): a `Linear` layer (with its GELU) on `Autodiff<NdArray<f32>>`
//! runs its forward pass as one GEMM per core of the `gemm` crate (AVX-512 where the CPU has it) with the bias fused,
//! and its backward pass as two more GEMMs and a column sum, where Burn's ndarray autodiff runs matrixmultiply's
//! AVX2 kernel and one element-wise pass per operation. The gradients are those of the same expression; the
//! products differ from Burn's only in rounding.

use std::any::{Any, TypeId};

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu::{self, gemm_rows, with_matrix, with_values};
use super::Activation;

/// The CPU backend lfm trains on.
type Inner = NdArray<f32>;

/// `value` as `U`, which the caller has checked by `TypeId` to be `T`.
fn downcast<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().expect("types checked by TypeId")
}

/// `activation(x·W + b)` over the last dimension of `x` with lfm's GEMM forward and backward, when `B` is
/// `Autodiff<NdArray<f32>>`, the tensors are `f32`, the layer has a bias and the activation is none or GELU; `None`
/// otherwise (the caller takes Burn's ops).
pub(crate) fn linear<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    activation: Activation,
) -> Option<Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<Inner>>()
        || D < 2
        || x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || !matches!(activation, Activation::None | Activation::GeluTanh)
    {
        return None;
    }
    let bias = bias?;
    let primitive = |t: TensorPrimitive<B>| -> FloatTensor<Autodiff<Inner>> { downcast(t.tensor()) };
    let x = primitive(x.clone().into_primitive());
    let (w, b) = (primitive(weight.clone().into_primitive()), primitive(bias.clone().into_primitive()));
    let dims: [usize; D] = x.primitive.shape().dims();
    let x_dims = dims.to_vec();
    let wrap2 = |t: FloatTensor<Inner>| Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(t));
    let [k, n] = wrap2(w.primitive.clone()).dims();
    let m = dims[..D - 1].iter().product::<usize>();
    // An empty batch is built, not reshaped: Burn's reshape reads a 0 as "keep this dimension" (and Burn's own
    // ndarray matmul divides by zero on it).
    let x2 = match m {
        0 => Tensor::from_data(TensorData::new(Vec::<f32>::new(), [0, k]), &Default::default()),
        _ => Tensor::<Inner, D>::from_primitive(TensorPrimitive::Float(x.primitive.clone())).reshape([m, k]),
    };
    let forward = |x2: Tensor<Inner, 2>, w: FloatTensor<Inner>, b: FloatTensor<Inner>| {
        let bias = Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(b));
        let z = cpu::linear(x2, wrap2(w), Some(bias), Activation::None);
        let y = match activation {
            Activation::GeluTanh => {
                let mut values = z.clone().into_data().into_vec::<f32>().expect("f32 values");
                values.par_chunks_mut(1 << 14).for_each(|chunk| activation.apply_in_place(chunk));
                Tensor::from_data(TensorData::new(values, [m, n]), &Default::default())
            }
            _ => z.clone(),
        };
        let mut out_dims = dims;
        out_dims[D - 1] = n;
        let y: Tensor<Inner, D> = match m {
            0 => Tensor::from_data(TensorData::new(Vec::<f32>::new(), out_dims.to_vec()), &Default::default()),
            _ => y.reshape(out_dims),
        };
        (z, y.into_primitive().tensor())
    };
    let backward = LinearBackward { activation };
    let prepared = backward
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful();
    let out = match prepared {
        OpsKind::Tracked(prep) => {
            let (z, y) = forward(x2.clone(), w.primitive.clone(), b.primitive.clone());
            let pre_activation = (activation != Activation::None).then(|| z.into_primitive().tensor());
            let state =
                LinearState { x: x2.into_primitive().tensor(), w: w.primitive, z: pre_activation, x_dims, m, k, n };
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x2, w.primitive, b.primitive).1),
    };
    let out: B::FloatTensorPrimitive = downcast(out);
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// What the backward pass of [`linear`] keeps: the input as `[m, k]`, the weight `[k, n]` and, with an activation,
/// the pre-activation `[m, n]`.
#[derive(Debug, Clone)]
struct LinearState {
    x: FloatTensor<Inner>,
    w: FloatTensor<Inner>,
    z: Option<FloatTensor<Inner>>,
    /// The input's own shape, which its gradient takes.
    x_dims: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
}

#[derive(Debug)]
struct LinearBackward {
    activation: Activation,
}

impl Backward<Inner, 3> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let LinearState { x, w, z, x_dims, m, k, n } = ops.state;
        let grad = Inner::float_reshape(grads.consume::<Inner>(&ops.node), Shape::new([m * n]));
        let grad = Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(grad));
        let mut g = grad.into_data().into_vec::<f32>().expect("f32 gradient");
        if let (Activation::GeluTanh, Some(z)) = (self.activation, z) {
            let z = Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(z));
            with_values(z, |z| {
                g.par_chunks_mut(1 << 14)
                    .zip(z.par_chunks(1 << 14))
                    .for_each(|(g, z)| g.iter_mut().zip(z).for_each(|(g, &z)| *g *= gelu_tanh_derivative(z)))
            });
        }
        let device = Default::default();
        let register =
            |grads: &mut Gradients, node: burn::backend::autodiff::NodeId, values: Vec<f32>, shape: Vec<usize>| {
                grads.register::<Inner>(node, Inner::float_from_data(TensorData::new(values, shape), &device));
            };
        let x = Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(x));
        let w = Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(w));
        let threads = Parallelism::Rayon(0);
        if let Some(node) = node_x {
            // dX = dZ·Wᵀ: Wᵀ is W read with its strides swapped.
            let mut dx = vec![0.0f32; m * k];
            if m > 0 && k > 0 && n > 0 {
                with_matrix(w.clone(), |w, [row, column]| {
                    // SAFETY: dx is [m, k]; g is [m, n] row-major; W is [k, n] with these strides, so Wᵀ is [n, k].
                    unsafe { gemm_rows(m, k, n, dx.as_mut_ptr(), k, (&g, [n, 1]), (w, [column, row]), threads) }
                });
            }
            register(grads, node.id, dx, x_dims);
        }
        if let Some(node) = node_w {
            // dW = Xᵀ·dZ: Xᵀ is the row-major X read with strides [1, k].
            let mut dw = vec![0.0f32; k * n];
            if m > 0 && k > 0 && n > 0 {
                with_values(x, |x| {
                    // SAFETY: dw is [k, n]; X is [m, k] row-major, so Xᵀ is [k, m] with strides [1, k]; g is [m, n].
                    unsafe { gemm_rows(k, n, m, dw.as_mut_ptr(), n, (x, [1, k]), (&g, [n, 1]), threads) }
                });
            }
            register(grads, node.id, dw, vec![k, n]);
        }
        if let Some(node) = node_b {
            register(grads, node.id, column_sums(&g, n), vec![n]);
        }
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

/// `d/dx` of [`super::gelu_tanh`], `x·σ(2u)` with `u = √(2/π)·(x + 0.044715·x³)`: `σ(2u) + x·σ(2u)·(1 − σ(2u))·2u′`.
fn gelu_tanh_derivative(x: f32) -> f32 {
    let c = super::SQRT_2_OVER_PI as f32;
    let u = c * (x + 0.044715 * x * x * x);
    let s = 1.0 / (1.0 + (-2.0 * u).exp());
    s + x * s * (1.0 - s) * 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x)
}
