//! Scaled dot-product attention, the one entry point all three networks use.
//!
//! On lfm's wgpu and CUDA backends (and under `Autodiff` of them) this runs lfm-kernels' fused flash-attention
//! kernel; on the CPU backend (and under its autodiff) lfm's CPU kernels; elsewhere, or on a GPU when lfm's kernels
//! are switched off (`lfm_kernels::set_kernels_enabled`), the plain Burn expression.

use burn::tensor::{backend::Backend, Tensor};

/// `softmax(q·kᵀ/√d)·v` over `[batch, heads, tokens, head_dim]` tensors.
///
/// Self-attention (`q`, `k`, `v` of one shape) in `f32` on the CPU backend, at inference and under its autodiff,
/// runs [`packed_attention`]'s kernels on the three packed side by side (one copy of each): Burn's ndarray route
/// is a single-threaded softmax of five passes around two matrixmultiply products, and under autodiff it keeps the
/// scores and their softmax for the backward pass.
pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let on_cpu_kernels = super::cpu::applies(&q) || super::cpu_grad::backend_applies::<B>();
    let all_f32 = [&q, &k, &v].iter().all(|t| t.dtype() == burn::tensor::DType::F32);
    if on_cpu_kernels && all_f32 && q.dims() == k.dims() && q.dims() == v.dims() {
        let [n, heads, t, head_dim] = q.dims();
        let pack = |x: Tensor<B, 4>| x.swap_dims(1, 2).reshape([n, t, heads * head_dim]);
        let qkv = Tensor::cat(vec![pack(q), pack(k), pack(v)], 2);
        return packed_attention(qkv, heads).reshape([n, t, heads, head_dim]).swap_dims(1, 2);
    }
    lfm_kernels::attention::attention(q, k, v)
}

/// Multi-head self-attention from a fused projection `qkv` `[N, T, 3·C]` laid out `[q | k | v] × heads × head_dim`
/// (timm's, DiT's), returned `[N, T, C]` with the heads side by side; [`super::cpu::packed_attention`] on the CPU
/// backend at inference and under its autodiff (with a backward pass of lfm's), [`attention`] on the split heads
/// elsewhere.
pub fn packed_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    if super::cpu::applies(&qkv) {
        return super::cpu::packed_attention(qkv, heads);
    }
    if let Some(out) = super::cpu_grad::packed_attention(&qkv, heads) {
        return out;
    }
    let [n, t, width] = qkv.dims();
    let c = width / 3;
    let qkv = qkv.reshape([n, t, 3, heads, c / heads]).permute([2, 0, 3, 1, 4]);
    let part = |i: usize| qkv.clone().narrow(0, i, 1).squeeze_dim::<4>(0);
    attention(part(0), part(1), part(2)).swap_dims(1, 2).reshape([n, t, c])
}
