//! `activation(x·W + b)`: one GEMM per core with the bias as its initial output and the activation fused.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{gemm_rows, with_matrix, with_values, Values};
use crate::nn::Activation;

/// Fewest rows of a [`linear`] output computed per task: each task packs the whole weight for its GEMM, so the
/// rows are split evenly over the cores rather than in small blocks (a DiT-B/2 qkv weight is 7 MB).
const LINEAR_MIN_ROWS_PER_TASK: usize = 64;

/// `activation(x·weight + bias)` over the last dimension of `x` (Burn's `Linear`: `x` `[…, in]`, `weight`
/// `[in, out]` in either memory order — checkpoints load it as a transposed view of PyTorch's `[out, in]` — and
/// `bias` `[out]`), for `f32` tensors on the CPU backend without autodiff (see [`super::applies`]).
///
/// The rows are split evenly over the cores, one GEMM per part (gemm's AVX-512 kernels where the CPU has them)
/// with the bias as its initial output, then the activation in one pass over the part: Burn's ndarray linear adds
/// the bias in a broadcast pass through ndarray's dynamic-rank iterators, which cost the built-in model's sampling
/// more than a fifth of its time. A row's result does not depend on how many rows are computed with it.
///
/// # Panics
/// If `weight`'s first dimension is not `x`'s last (a caller bug; `Linear` guarantees it).
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    activation: Activation,
) -> Tensor<B, D> {
    let device = x.device();
    let dims = x.dims();
    let k = dims[D - 1];
    let [k_weight, n] = weight.dims();
    assert_eq!(k, k_weight, "linear: input features {k} but a weight of {k_weight} rows");
    let m = dims[..D - 1].iter().product::<usize>();
    let bias = bias.map(Values::of);
    let mut out = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        with_matrix(weight, |weight, strides| {
            with_values(x, |x| {
                let rows = m.div_ceil(rayon::current_num_threads()).max(LINEAR_MIN_ROWS_PER_TASK);
                let parts = out.spare_capacity_mut()[..m * n].par_chunks_mut(rows * n);
                parts.enumerate().for_each(|(i, part)| {
                    let first = i * rows;
                    let x = &x[first * k..(first + part.len() / n) * k];
                    // Each row starts as the bias (or zero), written once into the uninitialised buffer.
                    for row in part.chunks_exact_mut(n) {
                        match &bias {
                            Some(bias) => row.iter_mut().zip(bias.iter()).for_each(|(o, &b)| {
                                o.write(b);
                            }),
                            None => row.iter_mut().for_each(|o| {
                                o.write(0.0);
                            }),
                        }
                    }
                    // SAFETY: every element of `part` was written above.
                    let part = unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                    if k > 0 {
                        // SAFETY: `part` holds whole rows of `n`, `x` the same rows of `k`, and `weight` is
                        // `[k, n]` with the strides `with_matrix` reports.
                        unsafe {
                            gemm_rows(
                                part.len() / n,
                                n,
                                k,
                                part.as_mut_ptr(),
                                n,
                                (x, [k, 1]),
                                (weight, strides),
                                Parallelism::None,
                            )
                        };
                    }
                    activation.apply_in_place(part);
                })
            })
        });
    }
    // SAFETY: the tasks above wrote all `m·n` elements (none when the output is empty).
    unsafe { out.set_len(m * n) };
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    Tensor::from_data(TensorData::new(out, out_dims), &device)
}
