//! Multi-head self-attention read straight from a fused `qkv` projection, one sample per task.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{gemm_rows_set, with_values};

/// Multi-head self-attention `softmax(q·kᵀ/√d)·v` read straight from a fused projection `qkv` `[N, T, 3·C]`
/// (timm's layout: `[q | k | v] × heads × head_dim` along the last axis), written as `[N, T, C]` with the heads
/// side by side — the layout the output projection reads. For `f32` tensors on the CPU backend without autodiff
/// (see [`super::applies`]); one sample per task, its scores `[T, T]` one head at a time. The tensor route splits `qkv`
/// with a 5-D permute and joins the heads with another, both strided copies, around five passes of softmax.
///
/// # Panics
/// If the last dimension is not `3·heads·head_dim` (a caller bug).
pub fn packed_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    let device = qkv.device();
    let [n, t, width] = qkv.dims();
    let heads = AttentionHeads::new(t, width, heads);
    let c = width / 3;
    let mut out = vec![0.0f32; n * t * c];
    if t > 0 && heads.head_dim > 0 {
        with_values(qkv, |qkv| {
            out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * width)).for_each(|(out, qkv)| {
                let mut probabilities = vec![0.0f32; t * t];
                for head in 0..heads.heads {
                    let v = heads.probabilities(qkv, head, &mut probabilities);
                    let out = out[head * heads.head_dim..].as_mut_ptr();
                    // SAFETY: the head's output columns start at `head·head_dim` of rows `c` apart; `v`'s rows are
                    // `width` apart and `head_dim` wide inside the sample's `t` rows.
                    unsafe {
                        gemm_rows_set(
                            t,
                            heads.head_dim,
                            t,
                            out,
                            c,
                            (&probabilities, [t, 1]),
                            (v, [width, 1]),
                            Parallelism::None,
                        )
                    };
                }
            })
        });
    }
    Tensor::from_data(TensorData::new(out, [n, t, c]), &device)
}

/// The geometry of multi-head attention over one sample's fused projection `[t, 3·heads·head_dim]`.
#[derive(Debug, Clone, Copy)]
pub(in crate::nn) struct AttentionHeads {
    /// Tokens.
    pub t: usize,
    /// Heads.
    pub heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// The scores' factor, `head_dim^(−½)`.
    pub scale: f32,
}

impl AttentionHeads {
    /// # Panics
    /// If `width` is not `3·heads·head_dim` (a caller bug).
    pub fn new(t: usize, width: usize, heads: usize) -> Self {
        assert!(
            heads > 0 && width.is_multiple_of(3 * heads),
            "packed attention: {width} features do not split into q, k, v × {heads} heads"
        );
        let head_dim = width / (3 * heads);
        Self { t, heads, head_dim, scale: (head_dim as f64).powf(-0.5) as f32 }
    }

    /// Width of a `qkv` row.
    pub fn width(&self) -> usize {
        3 * self.heads * self.head_dim
    }

    /// The columns of `q`, `k` and `v` of `head` in one sample's `qkv` rows (each starting at its first element).
    pub fn parts<'a>(&self, qkv: &'a [f32], head: usize) -> [&'a [f32]; 3] {
        let c = self.heads * self.head_dim;
        [0, 1, 2].map(|part| &qkv[part * c + head * self.head_dim..])
    }

    /// `softmax(q·kᵀ·scale)` of `head` into `probabilities` `[t, t]`; returns the head's `v` columns.
    pub fn probabilities<'a>(&self, qkv: &'a [f32], head: usize, probabilities: &mut [f32]) -> &'a [f32] {
        let (t, width) = (self.t, self.width());
        let [q, k, v] = self.parts(qkv, head);
        // SAFETY: q and k rows are `width` apart and `head_dim` wide (≥ 1, checked by the callers) inside the
        // sample's `t` rows; `probabilities` is `[t, t]`. kᵀ: element (a, j) is k[j][a].
        unsafe {
            gemm_rows_set(
                t,
                t,
                self.head_dim,
                probabilities.as_mut_ptr(),
                t,
                (q, [width, 1]),
                (k, [1, width]),
                Parallelism::None,
            )
        };
        for row in probabilities.chunks_exact_mut(t) {
            // As Burn's softmax of the scaled scores: subtract the row's maximum, exponentiate, normalise.
            row.iter_mut().for_each(|s| *s *= self.scale);
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            crate::nn::vector_math::map_in_place(row, |s| crate::nn::vector_math::exp(s - max));
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|s| *s /= sum);
        }
        v
    }
}
