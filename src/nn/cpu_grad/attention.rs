//! Multi-head self-attention from a fused `qkv` projection under autodiff. The forward pass is the inference
//! kernel's ([`crate::nn::cpu::packed_attention`]); the backward pass recomputes each head's probabilities from the
//! saved `qkv` rather than keeping `[T, T]` per head and sample (Burn's autodiff keeps the scores, their softmax and
//! split copies of q, k and v), then runs four GEMMs per head.

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{applies, inner, lift, lower, record, register, values, Inner};
use crate::nn::cpu::{self, gemm_rows_set, AttentionHeads};

/// `softmax(q·kᵀ/√d)·v` per head from `qkv` `[N, T, 3·C]` (timm's layout), returned `[N, T, C]`, when `B` is
/// `Autodiff<NdArray<f32>>` and `qkv` is `f32`; `None` otherwise.
///
/// # Panics
/// If the last dimension is not `3·heads·head_dim` (a caller bug).
pub(crate) fn packed_attention<B: Backend>(qkv: &Tensor<B, 3>, heads: usize) -> Option<Tensor<B, 3>> {
    if !applies::<B>(&[qkv.dtype()]) {
        return None;
    }
    let [n, t, width] = qkv.dims();
    let geometry = AttentionHeads::new(t, width, heads);
    let qkv = lift(qkv);
    let out = record(AttentionBackward { n, geometry }, [&qkv], || {
        (
            cpu::packed_attention(inner::<3>(qkv.primitive.clone()), heads).into_primitive().tensor(),
            qkv.primitive.clone(),
        )
    });
    Some(lower(out))
}

#[derive(Debug)]
struct AttentionBackward {
    n: usize,
    geometry: AttentionHeads,
}

impl Backward<Inner, 1> for AttentionBackward {
    /// The input `qkv`.
    type State = FloatTensor<Inner>;

    /// Per sample and head, with `P = softmax(s·q·kᵀ)` and the output gradient `dO`: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`,
    /// `dS = s·P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K`, `dK = dSᵀ·Q`, written into `dqkv`'s columns.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents.map(|p| p.map(|p| p.id));
        let heads = self.geometry;
        let (t, width, head_dim) = (heads.t, heads.width(), heads.head_dim);
        let c = width / 3;
        let d_out = values(grads.consume::<Inner>(&ops.node));
        let qkv = values(ops.state);
        register(grads, node, &[self.n, t, width], || {
            let mut dqkv = vec![0.0f32; self.n * t * width];
            if t == 0 || head_dim == 0 {
                return dqkv;
            }
            let samples = dqkv.par_chunks_mut(t * width).zip(qkv.par_chunks(t * width).zip(d_out.par_chunks(t * c)));
            samples.for_each(|(dqkv, (qkv, d_out))| {
                let (mut p, mut dp) = (vec![0.0f32; t * t], vec![0.0f32; t * t]);
                let none = Parallelism::None;
                for head in 0..heads.heads {
                    let v = heads.probabilities(qkv, head, &mut p);
                    let [q, k, _] = heads.parts(qkv, head);
                    let d_o = &d_out[head * head_dim..];
                    let [dq, dk, dv] = [0, 1, 2].map(|part| dqkv[part * c + head * head_dim..].as_mut_ptr());
                    // SAFETY: p and dp are [t, t]; q, k, v and their gradients' columns are `head_dim` wide in rows
                    // `width` apart; dO's in rows `c` apart; each head writes its own columns of dqkv.
                    unsafe {
                        // dV = Pᵀ·dO.
                        gemm_rows_set(t, head_dim, t, dv, width, (&p, [1, t]), (d_o, [c, 1]), none);
                        // dP = dO·Vᵀ.
                        gemm_rows_set(t, t, head_dim, dp.as_mut_ptr(), t, (d_o, [c, 1]), (v, [1, width]), none);
                    }
                    for (dp, p) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                        let dot = dp.iter().zip(p.iter()).map(|(&d, &p)| (d * p) as f64).sum::<f64>() as f32;
                        dp.iter_mut().zip(p).for_each(|(d, &p)| *d = heads.scale * p * (*d - dot));
                    }
                    unsafe {
                        // dQ = dS·K, dK = dSᵀ·Q.
                        gemm_rows_set(t, head_dim, t, dq, width, (&dp, [t, 1]), (k, [width, 1]), none);
                        gemm_rows_set(t, head_dim, t, dk, width, (&dp, [1, t]), (q, [width, 1]), none);
                    }
                }
            });
            dqkv
        });
    }
}
