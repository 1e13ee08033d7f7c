//! The DiT block's element-wise layers under autodiff: adaLN's `LayerNorm(x)·(1 + scale) + shift` and the gated
//! residual `x + gate·y`, each one parallel pass forward and one backward, with per-sample `[N, C]` parameters
//! broadcast over the tokens of `[N, T, C]`.

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use super::{applies, lift, lower, record, register, tensor, values, Inner};
use crate::nn::cpu::{add_gated_into, layer_norm_modulate_into};

/// `LayerNorm(x, eps)·(1 + scale) + shift` over tokens `x` `[N, T, C]` with `shift`, `scale` `[N, C]` when `B` is
/// `Autodiff<NdArray<f32>>` and the tensors are `f32`; `None` otherwise. Keeps `x`, `scale` and each row's mean
/// and standard deviation for the backward pass (Burn's autodiff keeps five `[N, T, C]` intermediates).
pub(crate) fn layer_norm_modulate<B: Backend>(
    x: &Tensor<B, 3>,
    shift: &Tensor<B, 2>,
    scale: &Tensor<B, 2>,
    eps: f64,
) -> Option<Tensor<B, 3>> {
    if !applies::<B>(&[x.dtype(), shift.dtype(), scale.dtype()]) {
        return None;
    }
    let dims = x.dims();
    let [n, t, c] = dims;
    let (x, shift, scale) = (lift(x), lift(shift), lift(scale));
    let out = record(LayerNormModulateBackward { dims }, [&x, &shift, &scale], || {
        let mut out = vec![0.0f32; n * t * c];
        let [xs, shifts, scales] = [&x, &shift, &scale].map(|t| values(t.primitive.clone()));
        let stats = layer_norm_modulate_into(&xs, &shifts, &scales, [t, c], eps, &mut out);
        let state = LayerNormState { x: x.primitive.clone(), scale: scale.primitive.clone(), stats };
        (tensor(out, dims), state)
    });
    Some(lower(out))
}

#[derive(Debug, Clone)]
struct LayerNormState {
    x: FloatTensor<Inner>,
    scale: FloatTensor<Inner>,
    /// Each row's mean and `√(var + eps)`, as the forward pass used them.
    stats: Vec<[f32; 2]>,
}

#[derive(Debug)]
struct LayerNormModulateBackward {
    dims: [usize; 3],
}

impl Backward<Inner, 3> for LayerNormModulateBackward {
    type State = LayerNormState;

    /// With `x̂ = (x − μ)/σ` and `g = dy·(1 + scale)`: `dx = (g − mean(g) − x̂·mean(g·x̂))/σ` per row,
    /// `dscale = Σ_tokens dy·x̂`, `dshift = Σ_tokens dy`.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_shift, node_scale] = ops.parents.map(|p| p.map(|p| p.id));
        let LayerNormState { x, scale, stats } = ops.state;
        let [n, t, c] = self.dims;
        let dy = values(grads.consume::<Inner>(&ops.node));
        let (x, scale) = (values(x), values(scale));
        let mut dx = vec![0.0f32; n * t * c];
        let (mut dscale, mut dshift) = (vec![0.0f32; n * c], vec![0.0f32; n * c]);
        if t * c > 0 {
            let per_sample = dx.par_chunks_mut(t * c).zip(dscale.par_chunks_mut(c).zip(dshift.par_chunks_mut(c)));
            per_sample.enumerate().for_each(|(i, (dx, (dscale, dshift)))| {
                let rows = i * t..(i + 1) * t;
                let scale = &scale[i * c..(i + 1) * c];
                let (mut sum_xhat, mut sum_dy) = (vec![0.0f64; c], vec![0.0f64; c]);
                let (mut xhat, mut g) = (vec![0.0f32; c], vec![0.0f32; c]);
                for (row, dx) in rows.zip(dx.chunks_exact_mut(c)) {
                    let ([mean, std], x, dy) = (stats[row], &x[row * c..(row + 1) * c], &dy[row * c..(row + 1) * c]);
                    let (mut mean_g, mut mean_gx) = (0.0f64, 0.0f64);
                    for j in 0..c {
                        xhat[j] = (x[j] - mean) / std;
                        g[j] = dy[j] * (scale[j] + 1.0);
                        sum_xhat[j] += (dy[j] * xhat[j]) as f64;
                        sum_dy[j] += dy[j] as f64;
                        mean_g += g[j] as f64;
                        mean_gx += (g[j] * xhat[j]) as f64;
                    }
                    let (mean_g, mean_gx) = ((mean_g / c as f64) as f32, (mean_gx / c as f64) as f32);
                    for ((dx, &g), &xhat) in dx.iter_mut().zip(&g).zip(&xhat) {
                        *dx = (g - mean_g - xhat * mean_gx) / std;
                    }
                }
                dscale.iter_mut().zip(&sum_xhat).for_each(|(d, &s)| *d = s as f32);
                dshift.iter_mut().zip(&sum_dy).for_each(|(d, &s)| *d = s as f32);
            });
        }
        register(grads, node_x, &self.dims, || dx);
        register(grads, node_shift, &[n, c], || dshift);
        register(grads, node_scale, &[n, c], || dscale);
    }
}

/// The gated residual `x + gate·y` over tokens `x`, `y` `[N, T, C]` with `gate` `[N, C]` when `B` is
/// `Autodiff<NdArray<f32>>` and the tensors are `f32`; `None` otherwise. Keeps `gate` and `y` for the backward pass.
pub(crate) fn add_gated<B: Backend>(x: &Tensor<B, 3>, gate: &Tensor<B, 2>, y: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    if !applies::<B>(&[x.dtype(), gate.dtype(), y.dtype()]) || x.dims() != y.dims() {
        return None;
    }
    let dims = x.dims();
    let [n, t, c] = dims;
    let (x, gate, y) = (lift(x), lift(gate), lift(y));
    let out = record(AddGatedBackward { dims }, [&x, &gate, &y], || {
        let mut out = vec![0.0f32; n * t * c];
        let [xs, gates, ys] = [&x, &gate, &y].map(|t| values(t.primitive.clone()));
        add_gated_into(&xs, &gates, &ys, [t, c], &mut out);
        (tensor(out, dims), [gate.primitive.clone(), y.primitive.clone()])
    });
    Some(lower(out))
}

#[derive(Debug)]
struct AddGatedBackward {
    dims: [usize; 3],
}

impl Backward<Inner, 3> for AddGatedBackward {
    /// `gate` and `y`.
    type State = [FloatTensor<Inner>; 2];

    /// `dx = d`, `dy = gate·d`, `dgate = Σ_tokens d·y`.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gate, node_y] = ops.parents.map(|p| p.map(|p| p.id));
        let [n, t, c] = self.dims;
        let upstream = grads.consume::<Inner>(&ops.node);
        let [gate, y] = ops.state.map(values);
        let d = values(upstream.clone());
        register(grads, node_gate, &[n, c], || {
            let mut dgate = vec![0.0f32; n * c];
            if t * c > 0 {
                dgate.par_chunks_mut(c).zip(d.par_chunks(t * c).zip(y.par_chunks(t * c))).for_each(
                    |(dgate, (d, y))| {
                        let mut sums = vec![0.0f64; c];
                        for (d, y) in d.chunks_exact(c).zip(y.chunks_exact(c)) {
                            sums.iter_mut().zip(d.iter().zip(y)).for_each(|(s, (&d, &y))| *s += (d * y) as f64);
                        }
                        dgate.iter_mut().zip(&sums).for_each(|(g, &s)| *g = s as f32);
                    },
                );
            }
            dgate
        });
        register(grads, node_y, &self.dims, || {
            let mut dy = vec![0.0f32; n * t * c];
            if t * c > 0 {
                dy.par_chunks_mut(t * c).zip(d.par_chunks(t * c)).enumerate().for_each(|(i, (dy, d))| {
                    let gate = &gate[i * c..(i + 1) * c];
                    for (dy, d) in dy.chunks_exact_mut(c).zip(d.chunks_exact(c)) {
                        dy.iter_mut().zip(d.iter().zip(gate)).for_each(|(o, (&d, &g))| *o = g * d);
                    }
                });
            }
            dy
        });
        drop(d);
        // The residual passes the gradient through unchanged: the same buffer, no copy.
        if let Some(node) = node_x {
            grads.register::<Inner>(node, upstream);
        }
    }
}
