//! 2-D max and average pooling, one plane per task.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

use super::with_values;
use crate::nn::out_size;

/// What a pooling window computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The maximum (padding never wins).
    Max,
    /// The mean over the real (unpadded) pixels under the window (`count_include_pad=False`).
    MeanExcludingPadding,
}

/// `kernel×kernel` pooling of `x` `[N, C, H, W]` with `stride` and symmetric `padding`, one plane per task, for
/// `f32` tensors on the CPU backend without autodiff (see [`super::applies`]). Burn 0.21's ndarray pools index element by
/// element through ndarray's dynamic-rank indexing.
pub fn pool2d<B: Backend>(x: Tensor<B, 4>, pool: Pool, kernel: usize, stride: usize, padding: usize) -> Tensor<B, 4> {
    let device = x.device();
    let [n, c, h, w] = x.dims();
    let (ho, wo) = (out_size(h, padding, kernel, stride), out_size(w, padding, kernel, stride));
    // The input rows (or columns) under output row (column) `o`: the window clipped to the image.
    let span = |o: usize, size: usize| {
        let start = (o * stride).saturating_sub(padding);
        (start, (o * stride + kernel).saturating_sub(padding).min(size))
    };
    let mut out = vec![0.0f32; n * c * ho * wo];
    with_values(x, |x| {
        out.par_chunks_exact_mut(ho * wo).zip(x.par_chunks_exact(h * w)).for_each(|(out, plane)| {
            for (oy, out_row) in out.chunks_exact_mut(wo).enumerate() {
                let (y0, y1) = span(oy, h);
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let (x0, x1) = span(ox, w);
                    let rows = plane[y0 * w..y1 * w].chunks_exact(w).map(|row| &row[x0..x1]);
                    *o = match pool {
                        Pool::Max => rows.flatten().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
                        Pool::MeanExcludingPadding => {
                            rows.flatten().sum::<f32>() / ((y1 - y0) * (x1 - x0)).max(1) as f32
                        }
                    };
                }
            }
        })
    });
    Tensor::from_data(TensorData::new(out, [n, c, ho, wo]), &device)
}
