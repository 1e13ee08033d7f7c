//! Nearest-neighbour ×2 upsampling and 2×2 block sums of `[N, C, H, W]`, one plane per task: the UNets' and the
//! autoencoders' resampling, and each one's backward pass (the gradient of a repeat is a block sum, and of a block
//! mean a repeat). Burn 0.21 builds the upsampling from `expand`, which ndarray copies element by element through
//! its dynamic-rank iterator, and its backward from two reductions.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

use super::with_values;

/// `out` `[planes, 2h, 2w]`: each pixel of `x` `[planes, h, w]` times `scale`, repeated over a 2×2 block.
fn repeat_2x_into(x: &[f32], [h, w]: [usize; 2], scale: f32, out: &mut [f32]) {
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
fn block_sum_2x_into(x: &[f32], [h, w]: [usize; 2], scale: f32, out: &mut [f32]) {
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

/// A ×2 resampling of `[N, C, H, W]`.
#[derive(Debug, Clone, Copy)]
pub(in crate::nn) enum Resample {
    /// Nearest-neighbour ×2 upsampling.
    Up,
    /// 2×2 average pooling with stride 2 (`H`, `W` even).
    Down,
}

impl Resample {
    /// The output's shape for an input of shape `dims`.
    pub(in crate::nn) fn out_dims(self, [n, c, h, w]: [usize; 4]) -> [usize; 4] {
        match self {
            Resample::Up => [n, c, 2 * h, 2 * w],
            Resample::Down => [n, c, h / 2, w / 2],
        }
    }

    /// The resampled values of `x`, of shape `dims`.
    pub(in crate::nn) fn forward(self, x: &[f32], dims: [usize; 4]) -> Vec<f32> {
        let [_, _, h, w] = dims;
        let mut out = vec![0.0f32; self.out_dims(dims).iter().product()];
        match self {
            Resample::Up => repeat_2x_into(x, [h, w], 1.0, &mut out),
            Resample::Down => block_sum_2x_into(x, [h, w], 0.25, &mut out),
        }
        out
    }

    /// The gradient of an input of shape `dims` for the output gradient `dy`: a block sum of `dy` for the
    /// upsampling, `dy / 4` repeated over each block for the pooling.
    pub(in crate::nn) fn backward(self, dy: &[f32], dims: [usize; 4]) -> Vec<f32> {
        let [_, _, h, w] = dims;
        let mut dx = vec![0.0f32; dims.iter().product()];
        match self {
            Resample::Up => block_sum_2x_into(dy, [2 * h, 2 * w], 1.0, &mut dx),
            Resample::Down => repeat_2x_into(dy, [h / 2, w / 2], 0.25, &mut dx),
        }
        dx
    }

    /// `x` resampled, for `f32` tensors on the CPU backend without autodiff (see [`super::applies`]).
    fn tensor<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (device, dims) = (x.device(), x.dims());
        let out = with_values(x, |x| self.forward(x, dims));
        Tensor::from_data(TensorData::new(out, self.out_dims(dims)), &device)
    }
}

/// Nearest-neighbour ×2 upsampling of `x` `[N, C, H, W]` for `f32` tensors on the CPU backend without autodiff
/// (see [`super::applies`]).
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    Resample::Up.tensor(x)
}

/// 2×2 average pooling with stride 2 of `x` `[N, C, H, W]` (`H`, `W` even) for `f32` tensors on the CPU backend
/// without autodiff (see [`super::applies`]).
pub fn avg_pool_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    Resample::Down.tensor(x)
}
