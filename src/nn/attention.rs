//! Scaled dot-product attention, the one entry point all three networks use.
//!
//! On lfm's wgpu and CUDA backends (and under `Autodiff` of them) this runs lfm-kernels' fused flash-attention
//! kernel; elsewhere, or when fused kernels are switched off, the plain Burn expression.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{backend::Backend, Tensor};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Switches lfm's fused attention kernel on or off for the whole process (on by default; `--no-fused-kernels`).
pub fn set_fused(enabled: bool) {
    FUSED.store(enabled, Ordering::Relaxed);
}

/// Whether attention uses the fused kernel where the backend has it.
pub fn fused() -> bool {
    FUSED.load(Ordering::Relaxed)
}

/// `softmax(q·kᵀ/√d)·v` over `[batch, heads, tokens, head_dim]` tensors.
pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    lfm_kernels::attention::attention_on(q, k, v, fused())
}
