//! The normalisations with their modulations (adaLN's LayerNorm, GroupNorm with its affine transform and
//! scale-shift) and DiT's gated residual, one pass per sample (or group) and task.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

use super::Values;
use crate::nn::Activation;

/// adaLN's `layer_norm(x)·(1 + scale) + shift` in one pass: LayerNorm over the last dimension of `x` `[N, T, C]`
/// without affine parameters (biased variance, statistics in f64), modulated per sample by `shift` and `scale`
/// `[N, C]`, for `f32` tensors on the CPU backend without autodiff (see [`super::applies`]). The composed Burn expression
/// is seven passes over `x`, three of them broadcasts.
pub fn layer_norm_modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: Tensor<B, 2>,
    scale: Tensor<B, 2>,
    eps: f64,
) -> Tensor<B, 3> {
    let device = x.device();
    let [n, t, c] = x.dims();
    let mut out = vec![0.0f32; n * t * c];
    let (shift, scale, x) = (Values::of(shift), Values::of(scale), Values::of(x));
    layer_norm_modulate_into(&x, &shift, &scale, [t, c], eps, &mut out);
    Tensor::from_data(TensorData::new(out, [n, t, c]), &device)
}

/// [`layer_norm_modulate`] on row-major slices: `x` and `out` `[N, t, c]`, `shift` and `scale` `[N, c]`. Returns
/// each row's mean and standard deviation `√(var + eps)` as the normalisation used them (in f32), which a backward
/// pass needs to recompute the normalised row exactly.
pub(in crate::nn) fn layer_norm_modulate_into(
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    [t, c]: [usize; 2],
    eps: f64,
    out: &mut [f32],
) -> Vec<[f32; 2]> {
    let mut stats = vec![[0.0f32; 2]; x.len() / c.max(1)];
    if t * c == 0 {
        return stats;
    }
    let samples = out.par_chunks_mut(t * c).zip(x.par_chunks(t * c)).zip(stats.par_chunks_mut(t));
    samples.enumerate().for_each(|(i, ((out, x), stats))| {
        let (shift, scale) = (&shift[i * c..(i + 1) * c], &scale[i * c..(i + 1) * c]);
        for ((out, x), stat) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(stats) {
            let (mean, var) = mean_var(x);
            let (mean, std) = (mean as f32, (var + eps).sqrt() as f32);
            *stat = [mean, std];
            for (((o, &v), &sh), &sc) in out.iter_mut().zip(x).zip(shift).zip(scale) {
                // Rounded step by step as the composed expression: normalise, scale, shift.
                *o = (v - mean) / std * (sc + 1.0) + sh;
            }
        }
    });
    stats
}

/// Mean and biased variance of `values` in f64, two passes with eight partial sums each (a single running f64 sum
/// is a chain of dependent additions, several times slower than the memory it reads).
fn mean_var(values: &[f32]) -> (f64, f64) {
    let count = values.len().max(1) as f64;
    let mean = lane_sum(values, |v| v as f64) / count;
    (mean, lane_sum(values, |v| (v as f64 - mean).powi(2)) / count)
}

/// `Σ f(v)` over `values` in eight interleaved f64 partial sums.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut sums = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (sum, &v) in sums.iter_mut().zip(chunk) {
            *sum += f(v);
        }
    }
    sums.iter().sum::<f64>() + tail
}

/// GroupNorm with its per-channel affine transform, an optional per-sample modulation and an activation, in two
/// passes over each group: `activation(norm(x)·γ + β)`, or `activation((norm(x)·γ + β)·(1 + scale) + shift)` with
/// `scale`, `shift` `[N, C]` (guided diffusion's and EDM's scale-shift norm). `x` is `[N, C, L]` (any spatial size
/// flattened), statistics per sample and group in f64, biased variance; `f32` tensors on the CPU backend without
/// autodiff (see [`super::applies`]). The composed Burn expression is eight to eleven passes, most of them broadcasts.
///
/// # Panics
/// If `groups` does not divide `C`, or the parameters' shapes do not fit `x` (a caller bug).
pub fn group_norm<B: Backend>(
    x: Tensor<B, 3>,
    [gamma, beta]: [Tensor<B, 1>; 2],
    modulation: Option<[Tensor<B, 2>; 2]>,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Tensor<B, 3> {
    let device = x.device();
    let [n, c, len] = x.dims();
    assert!(groups > 0 && c % groups == 0, "group norm: {groups} groups do not divide {c} channels");
    assert_eq!([gamma.dims()[0], beta.dims()[0]], [c, c], "group norm: γ, β do not have {c} channels");
    let mut out = vec![0.0f32; n * c * len];
    // Without a modulation, scale 0 and shift 0 leave the affine output as it is: `y·(1 + 0) + 0 = y` exactly.
    let [scale, shift] = match modulation {
        Some(pair) => pair.map(|t| {
            assert_eq!(t.dims(), [n, c], "group norm: the modulation is not [{n}, {c}]");
            t
        }),
        None => [0, 1].map(|_| Tensor::<B, 2>::zeros([n, c], &device)),
    };
    let (gamma, beta, scale, shift) = (Values::of(gamma), Values::of(beta), Values::of(scale), Values::of(shift));
    let params = GroupNormParams { gamma: &gamma, beta: &beta, scale: &scale, shift: &shift, groups, eps };
    group_norm_into(&Values::of(x), &params, [c, len], activation, &mut out);
    Tensor::from_data(TensorData::new(out, [n, c, len]), &device)
}

/// GroupNorm's parameters on slices: `gamma`, `beta` `[C]`, the modulation's `scale`, `shift` `[N, C]` (zeros for
/// none), the group count and epsilon.
pub(in crate::nn) struct GroupNormParams<'a> {
    /// Per-channel scale (γ).
    pub gamma: &'a [f32],
    /// Per-channel shift (β).
    pub beta: &'a [f32],
    /// Per-sample, per-channel scale (the output is multiplied by `1 + scale`).
    pub scale: &'a [f32],
    /// Per-sample, per-channel shift.
    pub shift: &'a [f32],
    /// Groups of channels normalised together.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

impl GroupNormParams<'_> {
    /// The affine and modulated value of a normalised `xhat` in channel `channel` of sample `sample`, rounded step
    /// by step as the composed expression: `(xhat·γ + β)·(1 + scale) + shift`.
    #[inline(always)]
    pub(in crate::nn) fn channel(&self, sample: usize, channel: usize, c: usize) -> [f32; 4] {
        let at = sample * c + channel;
        [self.gamma[channel], self.beta[channel], self.scale[at] + 1.0, self.shift[at]]
    }
}

/// [`group_norm`] on row-major slices: `x` and `out` `[N, c, len]`. Returns each (sample, group)'s mean and
/// standard deviation `√(var + eps)` as the normalisation used them (in f32), which a backward pass reads.
pub(in crate::nn) fn group_norm_into(
    x: &[f32],
    params: &GroupNormParams,
    [c, len]: [usize; 2],
    activation: Activation,
    out: &mut [f32],
) -> Vec<[f32; 2]> {
    let groups = params.groups;
    let (per_group, group_channels) = (c / groups * len, c / groups);
    let mut stats = vec![[0.0f32; 2]; x.len() / per_group.max(1)];
    if per_group == 0 {
        return stats;
    }
    let tasks = out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).zip(stats.par_iter_mut());
    tasks.enumerate().for_each(|(task, ((out, x), stat))| {
        let (mean, var) = mean_var(x);
        let (mean, std) = (mean as f32, (var + params.eps).sqrt() as f32);
        *stat = [mean, std];
        let (sample, first) = (task / groups, (task % groups) * group_channels);
        for (i, (out, x)) in out.chunks_exact_mut(len).zip(x.chunks_exact(len)).enumerate() {
            let [g, b, sc, sh] = params.channel(sample, first + i, c);
            for (o, &v) in out.iter_mut().zip(x) {
                // Rounded step by step as the composed expression.
                *o = ((v - mean) / std * g + b) * sc + sh;
            }
            activation.apply_in_place(out);
        }
    });
    stats
}

/// DiT's gated residual `x + gate·y` with a per-sample `gate` `[N, C]` over tokens `x`, `y` `[N, T, C]`, in one pass,
/// for `f32` tensors on the CPU backend without autodiff (see [`super::applies`]).
pub fn add_gated<B: Backend>(x: Tensor<B, 3>, gate: Tensor<B, 2>, y: Tensor<B, 3>) -> Tensor<B, 3> {
    let device = x.device();
    let [n, t, c] = x.dims();
    let mut out = vec![0.0f32; n * t * c];
    let (gate, x, y) = (Values::of(gate), Values::of(x), Values::of(y));
    add_gated_into(&x, &gate, &y, [t, c], &mut out);
    Tensor::from_data(TensorData::new(out, [n, t, c]), &device)
}

/// [`add_gated`] on row-major slices: `x`, `y` and `out` `[N, t, c]`, `gate` `[N, c]`.
pub(in crate::nn) fn add_gated_into(x: &[f32], gate: &[f32], y: &[f32], [t, c]: [usize; 2], out: &mut [f32]) {
    if t * c == 0 {
        return;
    }
    let samples = out.par_chunks_mut(t * c).zip(x.par_chunks(t * c).zip(y.par_chunks(t * c))).enumerate();
    samples.for_each(|(i, (out, (x, y)))| {
        let gate = &gate[i * c..(i + 1) * c];
        for (out, (x, y)) in out.chunks_exact_mut(c).zip(x.chunks_exact(c).zip(y.chunks_exact(c))) {
            for (((o, &x), &y), &g) in out.iter_mut().zip(x).zip(y).zip(gate) {
                *o = x + g * y;
            }
        }
    });
}
