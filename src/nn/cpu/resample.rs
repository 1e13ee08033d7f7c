//! Nearest-neighbour ×2 upsampling and 2×2 block sums of `[N, C, H, W]`, one plane per task: the UNets' and the
//! autoencoders' resampling, and each one's backward pass (the gradient of a repeat is a block sum, and of a block
//! mean a repeat). Burn 0.21 builds the upsampling from `expand`, which ndarray copies element by element through
//! its dynamic-rank iterator, and its backward from two reductions.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

use super::with_values;

/// `out` `[planes, 2h, 2w]`: each pixel of `x` `[planes, h, w]` times `scale`, repeated over a 2×2 block.
pub(in crate::nn) fn repeat_2x_into(x: &[f32], [h, w]: [usize; 2], scale: f32, out: &mut [f32]) {
    if h * w == 0 {
        return;
    }
    out.par_chunks_exact_mut(4 * h * w).zip(x.par_chunks_exact(h * w)).for_each(|(out, plane)| {
        for (row, pair) in plane.chunks_exact(w).zip(out.chunks_exact_mut(4 * w)) {
            let (top, bottom) = pair.split_at_mut(2 * w);
            for (o, &v) in top.chunks_exact_mut(2).zip(row) {
                o.fill(v * scale);
            }
            bottom.copy_from_slice(top);
        }
    });
}

/// `out` `[planes, h/2, w/2]`: the sum of each 2×2 block of `x` `[planes, h, w]` (`h`, `w` even) times `scale`,
/// summed as Burn's reductions sum it (each row's pair, then the two rows).
pub(in crate::nn) fn block_sum_2x_into(x: &[f32], [h, w]: [usize; 2], scale: f32, out: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    if ho * wo == 0 {
        return;
    }
    out.par_chunks_exact_mut(ho * wo).zip(x.par_chunks_exact(h * w)).for_each(|(out, plane)| {
        for (out_row, rows) in out.chunks_exact_mut(wo).zip(plane.chunks_exact(2 * w)) {
            let (top, bottom) = rows.split_at(w);
            for ((o, t), b) in out_row.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                *o = ((t[0] + t[1]) + (b[0] + b[1])) * scale;
            }
        }
    });
}

/// Nearest-neighbour ×2 upsampling of `x` `[N, C, H, W]` for `f32` tensors on the CPU backend without autodiff
/// (see [`super::applies`]).
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let device = x.device();
    let [n, c, h, w] = x.dims();
    let mut out = vec![0.0f32; n * c * 4 * h * w];
    with_values(x, |x| repeat_2x_into(x, [h, w], 1.0, &mut out));
    Tensor::from_data(TensorData::new(out, [n, c, 2 * h, 2 * w]), &device)
}

/// 2×2 average pooling with stride 2 of `x` `[N, C, H, W]` (`H`, `W` even) for `f32` tensors on the CPU backend
/// without autodiff (see [`super::applies`]).
pub fn avg_pool_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let device = x.device();
    let [n, c, h, w] = x.dims();
    let mut out = vec![0.0f32; n * c * (h / 2) * (w / 2)];
    with_values(x, |x| block_sum_2x_into(x, [h, w], 0.25, &mut out));
    Tensor::from_data(TensorData::new(out, [n, c, h / 2, w / 2]), &device)
}
