//! lfm's CPU kernels under Burn's autodiff (issue 38). On `Autodiff<NdArray<f32>>` the DiT's, the UNets' and the
//! autoencoders' layers run as single tracked operations with hand-written backward passes over raw `f32` slices,
//! where Burn's ndarray autodiff runs matrixmultiply's AVX2 kernel and one single-threaded, broadcasting
//! element-wise pass per operation, and keeps each intermediate for its backward:
//! - [`linear`]: `activation(x·W + b)` (none or GELU), one GEMM forward with the bias fused, two GEMMs and a column
//!   sum backward;
//! - [`layer_norm_modulate`]: adaLN's `LayerNorm(x)·(1 + scale) + shift`, keeping only each row's statistics;
//! - [`add_gated`]: the gated residual `x + gate·y`;
//! - [`conv2d`]: a 2-D convolution, im2col blocks and GEMMs each way, the columns rebuilt from the saved input in
//!   the backward pass;
//! - [`group_norm`]: GroupNorm with its affine transform, an optional scale-shift modulation and SiLU, keeping only
//!   each group's statistics;
//! - [`upsample_nearest_2x`], [`avg_pool_2x`]: the ×2 resamplings, each the other's backward pass;
//! - [`packed_attention`]: multi-head self-attention from the fused `qkv` projection, recomputing each head's
//!   probabilities in the backward pass (flash attention's trade: one more `q·kᵀ` for no `[t, t]` per head kept).
//!
//! Each returns `None` where it does not apply (another backend, a 16-bit dtype), and the caller takes Burn's ops.
//! The gradients are those of the same expression; they differ from Burn's only in rounding (statistics and sums in
//! f64 here).

mod attention;
mod conv;
mod group_norm;
mod linear;
mod norm;
mod resample;

pub(crate) use attention::packed_attention;
pub(crate) use conv::conv2d;
pub(crate) use group_norm::group_norm;
pub(crate) use linear::linear;
pub(crate) use norm::{add_gated, layer_norm_modulate};
pub(crate) use resample::{avg_pool_2x, upsample_nearest_2x};

use std::any::{Any, TypeId};

use burn::backend::autodiff::{
    checkpoint::strategy::NoCheckpointing,
    grads::Gradients,
    ops::{Backward, OpsKind},
    NodeId,
};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorData, TensorPrimitive};

use super::cpu::Values;

/// The CPU backend lfm trains on.
type Inner = NdArray<f32>;

/// Its autodiff backend, where these operations apply.
type Ad = Autodiff<Inner>;

/// `value` as `U`, which the caller has checked by `TypeId` to be `T`.
fn downcast<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().expect("types checked by TypeId")
}

/// Whether `B` is `Autodiff<NdArray<f32>>`, where these operations apply to `f32` tensors.
pub(crate) fn backend_applies<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Ad>()
}

/// Whether `B` is `Autodiff<NdArray<f32>>` and every tensor is `f32`.
fn applies<B: Backend>(dtypes: &[DType]) -> bool {
    backend_applies::<B>() && dtypes.iter().all(|dtype| *dtype == DType::F32)
}

/// The autodiff tensor behind `tensor` (`B` checked by [`applies`]).
fn lift<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> FloatTensor<Ad> {
    downcast(tensor.clone().into_primitive().tensor())
}

/// An autodiff tensor as a `Tensor<B, D>` (`B` checked by [`applies`]).
fn lower<B: Backend, const D: usize>(tensor: FloatTensor<Ad>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(downcast(tensor)))
}

/// A CPU primitive as a tensor of rank `D`.
fn inner<const D: usize>(primitive: FloatTensor<Inner>) -> Tensor<Inner, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The row-major values of a CPU tensor: its buffer when contiguous, else one copy.
fn values(tensor: FloatTensor<Inner>) -> Values<Inner> {
    Values::of_primitive(tensor).unwrap_or_else(|_| unreachable!("NdArray<f32> float tensors are ndarray storage"))
}

/// A CPU tensor of `values` with `shape`.
fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FloatTensor<Inner> {
    use burn::tensor::ops::FloatTensorOps;
    Inner::float_from_data(TensorData::new(values, shape.into()), &Default::default())
}

/// Runs `forward` (output and the state the backward pass reads) as one operation of the autodiff graph with
/// `parents`, keeping the state only when a parent is tracked.
fn record<const N: usize, Op: Backward<Inner, N>>(
    op: Op,
    parents: [&FloatTensor<Ad>; N],
    forward: impl FnOnce() -> (FloatTensor<Inner>, Op::State),
) -> FloatTensor<Ad> {
    match op.prepare::<NoCheckpointing>(parents.map(|p| p.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward();
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward().0),
    }
}

/// Registers the gradient of a tracked parent (`values` is computed only then).
fn register(grads: &mut Gradients, parent: Option<NodeId>, shape: &[usize], values: impl FnOnce() -> Vec<f32>) {
    if let Some(node) = parent {
        grads.register::<Inner>(node, tensor(values(), shape.to_vec()));
    }
}
