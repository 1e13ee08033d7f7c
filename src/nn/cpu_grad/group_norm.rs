//! The UNets' and the autoencoders' GroupNorm under autodiff: `activation((norm(x)·γ + β)·(1 + scale) + shift)`
//! (no modulation: scale and shift zero) as one tracked operation, forward the inference kernel's pass, backward
//! two passes over each (sample, group) that recompute the normalised values from the saved input and statistics
//! (Burn's autodiff keeps about eight `[N, C, L]` intermediates of the composed expression).

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use super::{applies, lift, lower, record, register, tensor, values, Ad, Inner};
use crate::nn::cpu::{group_norm_into, GroupNormParams};
use crate::nn::vector_math::{exp, zip_map};
use crate::nn::Activation;

/// GroupNorm of `x` `[N, C, L]` with `groups`, `eps`, the affine `[γ, β]` `[C]`, an optional modulation
/// `[scale, shift]` `[N, C]` and an activation (none or SiLU), when `B` is `Autodiff<NdArray<f32>>` and the tensors
/// are `f32`; `None` otherwise.
pub(crate) fn group_norm<B: Backend>(
    x: &Tensor<B, 3>,
    [gamma, beta]: [&Tensor<B, 1>; 2],
    modulation: Option<[&Tensor<B, 2>; 2]>,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Option<Tensor<B, 3>> {
    let mut dtypes = vec![x.dtype(), gamma.dtype(), beta.dtype()];
    dtypes.extend(modulation.iter().flatten().map(|t| t.dtype()));
    if !applies::<B>(&dtypes) || !matches!(activation, Activation::None | Activation::Silu) {
        return None;
    }
    let dims: [usize; 3] = x.dims();
    let [n, c, len] = dims;
    if groups == 0 || c % groups != 0 || modulation.is_some_and(|m| m.iter().any(|t| t.dims() != [n, c])) {
        return None;
    }
    let (x, gamma, beta) = (lift(x), lift(gamma), lift(beta));
    // Without a modulation: zeros that no gradient reaches.
    let [scale, shift] = match modulation {
        Some(pair) => pair.map(lift),
        None => [0, 1].map(|_| lift(&Tensor::<Ad, 2>::zeros([n, c], &Default::default()))),
    };
    let op = GroupNormBackward { dims, groups, eps, activation };
    let out = record(op, [&x, &gamma, &beta, &scale, &shift], || {
        let state = GroupNormState {
            x: x.primitive.clone(),
            parameters: [&gamma, &beta, &scale, &shift].map(|t| t.primitive.clone()),
            stats: Vec::new(),
        };
        let [xs, gammas, betas, scales, shifts] =
            [&state.x, &state.parameters[0], &state.parameters[1], &state.parameters[2], &state.parameters[3]]
                .map(|t| values(t.clone()));
        let params = GroupNormParams { gamma: &gammas, beta: &betas, scale: &scales, shift: &shifts, groups, eps };
        let mut out = vec![0.0f32; n * c * len];
        let stats = group_norm_into(&xs, &params, [c, len], activation, &mut out);
        (tensor(out, dims), GroupNormState { stats, ..state })
    });
    Some(lower(out))
}

#[derive(Debug, Clone)]
struct GroupNormState {
    x: FloatTensor<Inner>,
    /// γ, β, scale, shift.
    parameters: [FloatTensor<Inner>; 4],
    /// Each (sample, group)'s mean and `√(var + eps)`, as the forward pass used them.
    stats: Vec<[f32; 2]>,
}

#[derive(Debug)]
struct GroupNormBackward {
    dims: [usize; 3],
    groups: usize,
    eps: f64,
    activation: Activation,
}

impl Backward<Inner, 5> for GroupNormBackward {
    type State = GroupNormState;

    /// With `x̂ = (x − μ)/σ` per group, `a = x̂·γ + β`, `y = a·(1 + scale) + shift` and `dy` the upstream gradient
    /// through the activation's derivative at `y`: `dshift = Σ dy`, `dscale = Σ dy·a`, `dβ = Σ dy·(1 + scale)`,
    /// `dγ = Σ dy·(1 + scale)·x̂`, and with `g = dy·(1 + scale)·γ`: `dx = (g − mean(g) − x̂·mean(g·x̂))/σ` per group.
    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta, node_scale, node_shift] = ops.parents.map(|p| p.map(|p| p.id));
        let GroupNormState { x, parameters, stats } = ops.state;
        let [n, c, len] = self.dims;
        let groups = self.groups;
        let (group_channels, per_group) = (c / groups, c / groups * len);
        let upstream = values(grads.consume::<Inner>(&ops.node));
        let x = values(x);
        let [gamma, beta, scale, shift] = parameters.map(values);
        let params =
            GroupNormParams { gamma: &gamma, beta: &beta, scale: &scale, shift: &shift, groups, eps: self.eps };
        let mut dx = vec![0.0f32; n * c * len];
        // Per sample and channel: dscale, dshift, and the sample's share of dγ and dβ.
        let mut per_channel = vec![[0.0f32; 4]; n * c];
        if per_group > 0 {
            let tasks = dx.par_chunks_mut(per_group).zip(per_channel.par_chunks_mut(group_channels));
            tasks.enumerate().for_each(|(task, (dx, sums))| {
                let [mean, std] = stats[task];
                let (sample, first) = (task / groups, (task % groups) * group_channels);
                let x = &x[task * per_group..(task + 1) * per_group];
                let upstream = &upstream[task * per_group..(task + 1) * per_group];
                let (mut y, mut dy) = (vec![0.0f32; len], vec![0.0f32; len]);
                let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
                let rows = dx.chunks_exact_mut(len).zip(x.chunks_exact(len).zip(upstream.chunks_exact(len)));
                for (i, (dx, (x, upstream))) in rows.enumerate() {
                    let [g, b, sc, sh] = params.channel(sample, first + i, c);
                    let dy: &[f32] = match self.activation {
                        Activation::Silu => {
                            for (y, &v) in y.iter_mut().zip(x) {
                                *y = ((v - mean) / std * g + b) * sc + sh;
                            }
                            zip_map(&mut dy, upstream, &y, |u, y| u * silu_derivative(y));
                            &dy
                        }
                        _ => upstream,
                    };
                    let (mut sum_dy, mut sum_dy_a, mut sum_dy_xhat) = (0.0f64, 0.0f64, 0.0f64);
                    for ((dx, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
                        let xhat = (v - mean) / std;
                        sum_dy += d as f64;
                        sum_dy_a += (d * (xhat * g + b)) as f64;
                        sum_dy_xhat += (d * xhat) as f64;
                        // The gradient of x̂, kept in dx until the group's means are known.
                        let gx = d * sc * g;
                        *dx = gx;
                        sum_g += gx as f64;
                        sum_gx += (gx * xhat) as f64;
                    }
                    sums[i] =
                        [sum_dy_a as f32, sum_dy as f32, (sum_dy_xhat * sc as f64) as f32, (sum_dy * sc as f64) as f32];
                }
                let (mean_g, mean_gx) = ((sum_g / per_group as f64) as f32, (sum_gx / per_group as f64) as f32);
                for (dx, &v) in dx.iter_mut().zip(x) {
                    let xhat = (v - mean) / std;
                    *dx = (*dx - mean_g - xhat * mean_gx) / std;
                }
            });
        }
        register(grads, node_x, &self.dims, || dx);
        let column = |k: usize| per_channel.iter().map(move |s| s[k]);
        register(grads, node_scale, &[n, c], || column(0).collect());
        register(grads, node_shift, &[n, c], || column(1).collect());
        let over_samples = |k: usize| {
            let mut sums = vec![0.0f64; c];
            for (i, v) in column(k).enumerate() {
                sums[i % c] += v as f64;
            }
            sums.into_iter().map(|s| s as f32).collect()
        };
        register(grads, node_gamma, &[c], || over_samples(2));
        register(grads, node_beta, &[c], || over_samples(3));
    }
}

/// `d/dy` of SiLU `y·σ(y)`: `σ(y)·(1 + y·(1 − σ(y)))`.
#[inline(always)]
fn silu_derivative(y: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-y));
    s * (1.0 + y * (1.0 - s))
}
