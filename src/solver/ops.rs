//! The tensor arithmetic of an RK step, in one place so that fused kernels can replace it.

use burn::tensor::{backend::Backend, ElementConversion, Tensor};

/// `y + Σ_j w_j·k_j`, skipping zero weights. The weights are already `h·a_j` rounded to the state dtype.
pub(crate) fn combine<B: Backend, const D: usize>(y: &Tensor<B, D>, terms: &[(&Tensor<B, D>, f64)]) -> Tensor<B, D> {
    terms.iter().filter(|(_, w)| *w != 0.0).fold(y.clone(), |acc, (k, w)| acc + (*k).clone().mul_scalar(*w))
}

/// `Σ_j w_j·k_j` (no base term), skipping zero weights.
pub(crate) fn weighted_sum<B: Backend, const D: usize>(terms: &[(&Tensor<B, D>, f64)]) -> Tensor<B, D> {
    let mut nonzero = terms.iter().filter(|(_, w)| *w != 0.0);
    let (first, w) = nonzero.next().expect("an RK combination has at least one non-zero weight");
    nonzero.fold((*first).clone().mul_scalar(*w), |acc, (k, w)| acc + (*k).clone().mul_scalar(*w))
}

/// Root mean square of a tensor, reduced on the device; one scalar comes back to the host.
pub(crate) fn rms<B: Backend, const D: usize>(x: Tensor<B, D>) -> f64 {
    let n = x.shape().num_elements() as f64;
    let sum_sq: f64 = x.powi_scalar(2).sum().into_scalar().elem();
    (sum_sq / n).sqrt()
}

/// torchdiffeq's error ratio: `rms(err / (atol + rtol·max(|y0|, |y1|)))`.
pub(crate) fn error_ratio<B: Backend, const D: usize>(
    error: Tensor<B, D>,
    y0: &Tensor<B, D>,
    y1: &Tensor<B, D>,
    rtol: f64,
    atol: f64,
) -> f64 {
    let tolerance = y0.clone().abs().max_pair(y1.clone().abs()).mul_scalar(rtol).add_scalar(atol);
    rms(error / tolerance)
}

/// Whether every element is finite (one scalar comes back to the host).
pub(crate) fn all_finite<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    let sum: f64 = x.clone().sum().into_scalar().elem();
    sum.is_finite()
}
