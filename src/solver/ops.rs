//! The tensor arithmetic of an RK step, in one place: lfm-kernels' fused CubeCL kernels where the backend has
//! them and `fused` is set, the plain Burn expressions (torchdiffeq's operation order) otherwise.

use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use lfm_kernels::rk::{error_ratio_on, linear_combination_on};

/// `y + Σ_j w_j·k_j`, skipping zero weights. The weights are already `h·a_j` rounded to the state dtype.
pub(crate) fn combine<B: Backend, const D: usize>(
    y: &Tensor<B, D>,
    terms: &[(&Tensor<B, D>, f64)],
    fused: bool,
) -> Tensor<B, D> {
    let all: Vec<(&Tensor<B, D>, f64)> = std::iter::once((y, 1.0)).chain(terms.iter().copied()).collect();
    linear_combination_on(&all, fused)
}

/// Root mean square of a tensor, reduced on the device; one scalar comes back to the host.
pub(crate) fn rms<B: Backend, const D: usize>(x: Tensor<B, D>) -> f64 {
    let n = x.shape().num_elements() as f64;
    let sum_sq: f64 = x.powi_scalar(2).sum().into_scalar().elem();
    (sum_sq / n).sqrt()
}

/// torchdiffeq's error ratio `rms((Σ_j w_j·k_j) / (atol + rtol·max(|y0|, |y1|)))`.
pub(crate) fn error_ratio<B: Backend, const D: usize>(
    stages: &[(&Tensor<B, D>, f64)],
    y0: &Tensor<B, D>,
    y1: &Tensor<B, D>,
    rtol: f64,
    atol: f64,
    fused: bool,
) -> f64 {
    error_ratio_on(y0, y1, stages, rtol, atol, fused)
}

/// Whether every element is finite (one scalar comes back to the host).
pub(crate) fn all_finite<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    let sum: f64 = x.clone().sum().into_scalar().elem();
    sum.is_finite()
}
