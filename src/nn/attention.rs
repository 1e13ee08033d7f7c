//! Scaled dot-product attention, the one entry point all three networks use.

use burn::tensor::{activation::softmax, backend::Backend, Tensor};

/// `softmax(q·kᵀ/√d)·v` over `[batch, heads, tokens, head_dim]` tensors.
pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let head_dim = q.dims()[3];
    let scale = (head_dim as f64).powf(-0.5);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    softmax(scores, 3).matmul(v)
}
