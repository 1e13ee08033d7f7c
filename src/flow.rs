//! The LFM probability path, exactly as `train_flow_latent.py` codes it.
//!
//! Time runs from **t = 1 (noise) to t = 0 (data)**:
//! `x_t = (1 − t)·z0 + (σ_min + (1 − σ_min)·t)·z1` and the target velocity `u = dx_t/dt = (1 − σ_min)·z1 − z0`,
//! with `σ_min = 1e-5`. The loss is the plain mean of the squared error over every element of the batch.
//! This module is the one place these conventions live; solvers and models know nothing of them.

use burn::tensor::{backend::Backend, Tensor};

/// σ_min of the reference (hard-coded there as `1e-5`).
pub const SIGMA_MIN: f64 = 1e-5;

/// Scale factor of Stable Diffusion's `sd-vae-ft-mse` latents (`--scale_factor` in LFM).
pub const SD_VAE_SCALE_FACTOR: f64 = 0.18215;

/// Time at which sampling starts (pure noise).
pub const T_NOISE: f64 = 1.0;

/// Time at which sampling ends (data).
pub const T_DATA: f64 = 0.0;

/// Broadcasts a per-sample time `[N]` to the rank of `like` (`[N, 1, 1, …]`).
fn per_sample<B: Backend, const D: usize>(t: Tensor<B, 1>, like: &Tensor<B, D>) -> Tensor<B, D> {
    let n = t.dims()[0];
    let mut shape = [1usize; D];
    shape[0] = n;
    t.reshape(shape).expand(like.shape())
}

/// The interpolant `x_t = (1 − t)·z0 + (σ_min + (1 − σ_min)·t)·z1` for a per-sample `t` of shape `[N]`.
pub fn interpolate<B: Backend, const D: usize>(z0: Tensor<B, D>, z1: Tensor<B, D>, t: Tensor<B, 1>) -> Tensor<B, D> {
    let t = per_sample(t, &z0);
    // The constants are rounded to the state dtype, as PyTorch does with Python floats.
    let data_weight = t.clone().neg().add_scalar(1.0);
    let noise_weight = t.mul_scalar(1.0 - SIGMA_MIN).add_scalar(SIGMA_MIN);
    data_weight * z0 + noise_weight * z1
}

/// The target velocity `u = (1 − σ_min)·z1 − z0` (it points from data towards noise).
pub fn target_velocity<B: Backend, const D: usize>(z0: Tensor<B, D>, z1: Tensor<B, D>) -> Tensor<B, D> {
    z1.mul_scalar(1.0 - SIGMA_MIN) - z0
}

/// `F.mse_loss(v, u)`: the mean over every element and the batch, as a one-element tensor.
pub fn loss<B: Backend, const D: usize>(v: Tensor<B, D>, u: Tensor<B, D>) -> Tensor<B, 1> {
    (v - u).powi_scalar(2).mean()
}

/// Everything one training step needs from the path: the model input `x_t` and the regression target `u`.
#[derive(Debug, Clone)]
pub struct PathSample<B: Backend, const D: usize> {
    /// The interpolant fed to the network.
    pub x_t: Tensor<B, D>,
    /// The target velocity.
    pub u: Tensor<B, D>,
}

/// Builds `x_t` and `u` from data latents `z0`, noise `z1` and per-sample times `t`.
pub fn path_sample<B: Backend, const D: usize>(
    z0: Tensor<B, D>,
    z1: Tensor<B, D>,
    t: Tensor<B, 1>,
) -> PathSample<B, D> {
    PathSample { x_t: interpolate(z0.clone(), z1.clone(), t), u: target_velocity(z0, z1) }
}
