//! Layers shared by the velocity networks: sinusoidal embeddings, attention, normalisations, activations.

pub mod attention;
pub mod embedding;
pub mod init;

use burn::tensor::{backend::Backend, Tensor};

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`), as DiT's MLP uses.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

/// SiLU, `x·σ(x)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    burn::tensor::activation::silu(x)
}

/// LayerNorm over the last dimension without affine parameters (`elementwise_affine=False`), biased variance.
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    (x - mean).div((var.add_scalar(eps)).sqrt())
}

/// adaLN modulation `x·(1 + scale) + shift` with per-sample `shift`, `scale` of shape `[N, C]` over tokens `[N, T, C]`.
pub fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    x * scale.unsqueeze_dim::<3>(1).add_scalar(1.0) + shift.unsqueeze_dim(1)
}
