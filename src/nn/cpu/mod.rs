//! Inference kernels for the CPU backend on raw `f32` slices, each parallel over the cores, one file per kernel:
//! - [`conv2d`] (`conv.rs`): im2col into a bounded buffer and one GEMM per block of output rows, bias and
//!   activation fused;
//! - [`pool2d`] (`pool.rs`): 2-D max and average pooling;
//! - [`upsample_nearest_2x`], [`avg_pool_2x`] (`resample.rs`): the networks' ×2 resampling;
//! - [`linear`] (`linear.rs`): a GEMM per core with the bias and activation fused;
//! - [`layer_norm_modulate`], [`group_norm`], [`add_gated`] (`norm.rs`): the normalisations with their
//!   modulations, and DiT's gated residual;
//! - [`packed_attention`] (`attention.rs`): multi-head self-attention from the fused `qkv` projection;
//! - `matrix.rs`: the `gemm` crate's product on strided slices, which all of them share.
//!
//! Burn 0.21's ndarray `conv2d` is a direct loop (≈2 GFLOP/s here), and the im2col built from Burn tensor ops
//! ([`super::conv2d_im2col`]) copies every window twice through ndarray's strided iterators, which costs more than
//! its matmul. Without a gradient to track, the columns can be written once, straight from the input rows, and
//! multiplied by the `gemm` crate's kernels; the bias is the GEMM's initial output. The slice functions are shared
//! with the backward passes of `super::cpu_grad`, so training and sampling compute the same values.

mod attention;
mod conv;
mod linear;
mod matrix;
mod norm;
mod pool;
mod resample;

pub use attention::packed_attention;
pub(in crate::nn) use attention::AttentionHeads;
pub use conv::conv2d;
pub(in crate::nn) use conv::Geometry;
pub use linear::linear;
pub(in crate::nn) use matrix::{gemm_rows, gemm_rows_set};
pub use norm::{add_gated, group_norm, layer_norm_modulate};
pub(in crate::nn) use norm::{add_gated_into, group_norm_into, layer_norm_modulate_into, GroupNormParams};
pub use pool::{pool2d, Pool};
pub(in crate::nn) use resample::Resample;
pub use resample::{avg_pool_2x, upsample_nearest_2x};

use std::any::Any;
use std::ops::Range;

use burn::tensor::{backend::Backend, DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

/// Whether this module's kernels (and other CPU-inference shortcuts) can run on this tensor: `f32` data on the CPU
/// backend without autodiff.
pub fn applies<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    crate::nn::is_ndarray::<B>() && x.dtype() == DType::F32 && !B::ad_enabled(&x.device())
}

/// A vector of `len` floats written in parallel parts of `part` elements (the last one may be shorter):
/// `write(i, buffer, len)` gets part `i`'s uninitialised buffer and its length. Skips the zeroing pass a
/// `vec![0.0; len]` costs (a recycled heap buffer is zeroed by `calloc`), one core's memset per output.
///
/// # Safety
/// `write` must write every element of its part.
pub(in crate::nn) unsafe fn par_written_vec(
    len: usize,
    part: usize,
    write: impl Fn(usize, *mut f32, usize) + Sync,
) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    let parts = values.spare_capacity_mut()[..len].par_chunks_mut(part.max(1)).enumerate();
    parts.for_each(|(i, buffer)| write(i, buffer.as_mut_ptr().cast(), buffer.len()));
    // SAFETY: the caller's `write` initialised every part, so all `len` elements.
    unsafe { values.set_len(len) };
    values
}

/// A vector of `len` floats filled in parallel chunks of `chunk` elements: `fill(range, values)` gets the chunk
/// covering `range`, zeroed just before in cache (not the whole buffer by one core first, as `vec![0.0; len]`).
pub(in crate::nn) fn par_filled_vec(
    len: usize,
    chunk: usize,
    fill: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let chunk = chunk.max(1);
    // SAFETY: each part is zeroed before `fill` sees it, so every element is written.
    unsafe {
        par_written_vec(len, chunk, |i, part, part_len| {
            std::ptr::write_bytes(part, 0, part_len);
            fill(i * chunk..i * chunk + part_len, std::slice::from_raw_parts_mut(part, part_len))
        })
    }
}

/// Runs `f` on a 2-D `f32` tensor's buffer and its `[row, column]` strides when the buffer is contiguous in some
/// order with non-negative strides (a weight a checkpoint loaded as a transposed view), else on a row-major copy.
pub(in crate::nn) fn with_matrix<B: Backend, R>(tensor: Tensor<B, 2>, f: impl FnOnce(&[f32], [usize; 2]) -> R) -> R {
    let columns = tensor.dims()[1];
    let primitive = tensor.into_primitive().tensor();
    if let Some(burn_ndarray::NdArrayTensor::F32(storage)) = (&primitive as &dyn Any).downcast_ref() {
        let view = storage.view();
        if let (Some(values), &[row, column]) = (view.as_slice_memory_order(), view.strides()) {
            if row >= 0 && column >= 0 {
                return f(values, [row as usize, column as usize]);
            }
        }
    }
    let tensor = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(primitive));
    with_values(tensor, |values| f(values, [columns, 1]))
}

/// Runs `f` on an `f32` tensor's values in row-major order (see [`Values`]).
pub(crate) fn with_values<B: Backend, const D: usize, R>(tensor: Tensor<B, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    f(&Values::of(tensor))
}

/// An `f32` tensor's values in row-major order, dereferencing to a slice. On the CPU backend it keeps the tensor's
/// buffer itself when that is contiguous: `into_data` copies element by element through ndarray's iterator whenever
/// the buffer is shared (a weight the module still holds, an input another branch still reads), which cost more
/// than the GEMM. Other layouts and backends are copied once.
pub(in crate::nn) struct Values<B: Backend>(Result<B::FloatTensorPrimitive, Vec<f32>>);

impl<B: Backend> Values<B> {
    pub(in crate::nn) fn of<const D: usize>(tensor: Tensor<B, D>) -> Self {
        match Self::of_primitive(tensor.into_primitive().tensor()) {
            Ok(values) => values,
            Err(primitive) => {
                let data = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(primitive)).into_data();
                Self(Err(data
                    .into_vec::<f32>()
                    .unwrap_or_else(|e| unreachable!("CPU kernels take f32 data only: {e:?}"))))
            }
        }
    }

    /// The values of a primitive with the CPU backend's `f32` storage (its buffer when contiguous, else a copy);
    /// any other primitive back.
    pub(in crate::nn) fn of_primitive(primitive: B::FloatTensorPrimitive) -> Result<Self, B::FloatTensorPrimitive> {
        if let Some(burn_ndarray::NdArrayTensor::F32(storage)) = (&primitive as &dyn Any).downcast_ref() {
            let view = storage.view();
            if !view.is_standard_layout() {
                // One pass per row (lane of the last axis): ndarray's element iterator over a dynamic-rank view
                // steps a heap-allocated index per element, several times the copy itself.
                let mut copy = Vec::with_capacity(view.len());
                match view.ndim() {
                    0 => copy.extend(view.iter().copied()),
                    _ => view.rows().into_iter().for_each(|row| match row.as_slice() {
                        Some(row) => copy.extend_from_slice(row),
                        None => copy.extend(row.iter().copied()),
                    }),
                }
                return Ok(Self(Err(copy)));
            }
            return Ok(Self(Ok(primitive)));
        }
        Err(primitive)
    }
}

impl<B: Backend> std::ops::Deref for Values<B> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Ok(primitive) => match (primitive as &dyn Any).downcast_ref() {
                Some(burn_ndarray::NdArrayTensor::F32(storage)) => {
                    storage.view().to_slice().expect("kept only in standard layout")
                }
                _ => unreachable!("kept only for ndarray f32 storage"),
            },
            Err(copy) => copy,
        }
    }
}

/// `f` on consecutive parts of `0..n`, at most `threads` of them (as equal as possible), each on its own scoped
/// thread, results in order; one call on the calling thread when `threads` ≤ 1 or `n` ≤ 1. For passes whose
/// element-wise work Burn's ndarray backend runs on one core (it threads only its matrix products). A panic in a
/// part is re-raised as it was.
pub fn in_parts<T: Send>(n: usize, threads: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    if threads <= 1 || n <= 1 {
        return vec![f(0..n)];
    }
    let part = n.div_ceil(threads.min(n));
    std::thread::scope(|scope| {
        let f = &f;
        let parts: Vec<_> =
            (0..n).step_by(part).map(|start| scope.spawn(move || f(start..(start + part).min(n)))).collect();
        parts.into_iter().map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}
