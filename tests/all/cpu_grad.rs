//! lfm's layers under `Autodiff<Cpu>` (`src/nn/cpu_grad/`) against Burn's autodiff of the plain expression: the
//! output and every input's gradient, on one-row and odd shapes whose widths are no multiple of a SIMD width, and
//! on empty ones.

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use lfm::backend::Cpu;

use crate::common::*;

type A = Autodiff<Cpu>;

/// A tensor of `shape` with seeded standard-normal values, offset by `offset` (LayerNorm must remove a mean).
fn random<const D: usize>(shape: [usize; D], seed: u64, offset: f32) -> Tensor<A, D> {
    let values = lfm::noise::batch(seed, 0, 1, shape.iter().product::<usize>());
    let values: Vec<f32> = values.into_iter().map(|v| v + offset).collect();
    Tensor::from_data(TensorData::new(values, shape), &cpu())
}

/// The gradient of `leaf` in `grads` as values (empty when the leaf is empty).
fn grad<const D: usize>(
    leaf: &Tensor<A, D>,
    grads: &<A as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Vec<f32> {
    leaf.grad(grads).map(|g| g.into_data().to_vec::<f32>().unwrap()).unwrap_or_default()
}

/// Runs `lfm_route` and `plain` on fresh leaves holding the same values `inputs` (as `[1, ·, ·]` for rank-2 inputs,
/// which the closures squeeze), backpropagates `Σ out·u` for one random `u`, and compares the outputs and every
/// input's gradient. Empty inputs run lfm's route alone and must give an empty output and zero gradients.
fn compare(
    case: &str,
    inputs: &[Tensor<A, 3>],
    lfm_route: impl Fn(&[Tensor<A, 3>]) -> Tensor<A, 3>,
    plain: impl Fn(&[Tensor<A, 3>]) -> Tensor<A, 3>,
    [rel, abs]: [f64; 2],
) {
    let leaves =
        || inputs.iter().map(|t| Tensor::<A, 3>::from_inner(t.clone().inner()).require_grad()).collect::<Vec<_>>();
    let run = |f: &dyn Fn(&[Tensor<A, 3>]) -> Tensor<A, 3>| {
        let leaves = leaves();
        let out = f(&leaves);
        let u = random(out.dims(), 99, 0.0);
        let grads = (out.clone() * u).sum().backward();
        (values(out), leaves.iter().map(|leaf| grad(leaf, &grads)).collect::<Vec<_>>())
    };
    let (out, grads) = run(&lfm_route);
    if inputs.iter().any(|t| t.dims().contains(&0)) {
        assert!(out.is_empty(), "{case}: output {out:?}");
        for (i, g) in grads.iter().enumerate() {
            assert!(g.iter().all(|&v| v == 0.0), "{case}: gradient {i} {g:?}");
        }
        return;
    }
    let (want_out, want_grads) = run(&plain);
    assert_close(&format!("{case}: output"), &out, &want_out, rel, abs);
    for (i, (got, want)) in grads.iter().zip(&want_grads).enumerate() {
        assert_eq!(got.len(), want.len(), "{case}: gradient {i}");
        assert_close(&format!("{case}: gradient {i}"), got, want, rel, abs);
    }
}

/// `[1, n, c]` → `[n, c]`.
fn squeeze(t: &Tensor<A, 3>) -> Tensor<A, 2> {
    t.clone().squeeze_dim(0)
}

/// A `Linear` layer runs lfm's GEMM forward and backward: its output and the gradients of the input, weight and bias
/// equal Burn's autodiff of the plain expression (`x·W + b`, then the activation as Burn ops), with and without GELU,
/// through a 3-d input; an empty batch (on which Burn's own matmul divides by zero) gives zero gradients.
#[test]
fn linear_backward_on_the_cpu_matches_burns_autodiff() {
    use lfm::nn::{init, Activation, Linear};
    let device = cpu();
    let random = |shape: [usize; 3], seed: u64| random(shape, seed, 0.0);
    for (rows, k, n, activation) in [
        (0, 5, 7, Activation::None),
        (1, 5, 7, Activation::GeluTanh),
        (2 * 3, 19, 33, Activation::GeluTanh),
        (2 * 9, 17, 5, Activation::None),
        // More rows than one task takes (64): dX in several parts, the last one shorter.
        (2 * 75, 19, 33, Activation::GeluTanh),
    ] {
        let layer: Linear<A> = init::linear(k, n, init::Init::TorchDefault, &device);
        let outer = 2.min(rows.max(1));
        let x = random([outer, rows / outer, k], 1).require_grad();
        let upstream = random([outer, rows / outer, n], 2);
        // lfm's path.
        let y = layer.forward_activated(x.clone(), activation);
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let got = [
            x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            layer.weight.val().grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            layer.bias.as_ref().unwrap().val().grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
        ];
        if rows == 0 {
            // Burn's own ndarray matmul divides by zero on an empty batch; lfm's gives the empty output and zero
            // gradients for the parameters.
            assert_eq!(y.dims(), [1, 0, n]);
            assert!(got[0].is_empty() && got[1] == vec![0.0; k * n] && got[2] == vec![0.0; n], "{got:?}");
            continue;
        }
        // Burn's autodiff of the same expression, on fresh leaves with the same values.
        let weight = Tensor::<A, 2>::from_inner(layer.weight.val().inner()).require_grad();
        let bias = Tensor::<A, 1>::from_inner(layer.bias.as_ref().unwrap().val().inner()).require_grad();
        let x_ref = Tensor::<A, 3>::from_inner(x.clone().inner()).require_grad();
        let plain = activation.apply(burn::tensor::module::linear(x_ref.clone(), weight.clone(), Some(bias.clone())));
        let want_grads = (plain.clone() * upstream).sum().backward();
        let want = [
            x_ref.grad(&want_grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            weight.grad(&want_grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            bias.grad(&want_grads).unwrap().into_data().to_vec::<f32>().unwrap(),
        ];
        let case = format!("{rows}×{k} → {n}, {activation:?}");
        assert_close(&format!("{case}: output"), &values(y), &values(plain), 1e-5, 1e-6);
        for (name, (got, want)) in ["dx", "dW", "db"].iter().zip(got.iter().zip(&want)) {
            assert_eq!(got.len(), want.len(), "{case}: {name}");
            assert_close(&format!("{case}: {name}"), got, want, 1e-5, 1e-6);
        }
    }
}

/// adaLN's `LayerNorm(x)·(1 + scale) + shift` and the gated residual `x + gate·y` run lfm's one-pass forward and
/// backward: the same output and gradients (of `x`, `shift`, `scale`; of `x`, `gate`, `y`) as Burn's autodiff of
/// `modulate(layer_norm(x))` and of `x + gate·y`.
#[test]
fn layer_norm_modulation_and_gated_residual_backward_on_the_cpu_match_burns_autodiff() {
    for [n, t, c] in [[1, 1, 5], [2, 3, 7], [3, 17, 33], [2, 0, 5]] {
        let x = random([n, t, c], 1, 3.0);
        let [a, b] = [2, 3].map(|seed| random([1, n, c], seed, 0.0));
        compare(
            &format!("layer_norm_modulate [{n}, {t}, {c}]"),
            &[x.clone(), a.clone(), b.clone()],
            |v| lfm::nn::layer_norm_modulate(v[0].clone(), squeeze(&v[1]), squeeze(&v[2]), 1e-6),
            |v| lfm::nn::modulate(lfm::nn::layer_norm(v[0].clone(), 1e-6), squeeze(&v[1]), squeeze(&v[2])),
            [1e-4, 1e-5],
        );
        compare(
            &format!("add_gated [{n}, {t}, {c}]"),
            &[x.clone(), a, random([n, t, c], 5, 0.0)],
            |v| lfm::nn::add_gated(v[0].clone(), squeeze(&v[1]), v[2].clone()),
            |v| v[0].clone() + squeeze(&v[1]).unsqueeze_dim::<3>(1) * v[2].clone(),
            [1e-6, 1e-6],
        );
    }
}

/// Multi-head attention from a fused `qkv` runs lfm's kernel forward and its backward (which recomputes the
/// probabilities): the same output and `qkv` gradient as Burn's autodiff of the split heads' softmax attention.
#[test]
fn packed_attention_backward_on_the_cpu_matches_burns_autodiff() {
    for (n, t, heads, head_dim) in [(1, 1, 1, 5), (2, 7, 3, 5), (2, 17, 2, 8), (2, 0, 2, 3)] {
        let c = heads * head_dim;
        compare(
            &format!("packed_attention {n}×{t}, {heads} heads of {head_dim}"),
            &[random([n, t, 3 * c], 1, 0.0)],
            |v| lfm::nn::attention::packed_attention(v[0].clone(), heads),
            |v| {
                let qkv = v[0].clone().reshape([n, t, 3, heads, head_dim]).permute([2, 0, 3, 1, 4]);
                let part = |i: usize| qkv.clone().narrow(0, i, 1).squeeze_dim::<4>(0);
                let out = lfm_kernels::attention::attention_reference(part(0), part(1), part(2));
                out.swap_dims(1, 2).reshape([n, t, c])
            },
            [1e-4, 1e-6],
        );
    }
}

/// A convolution runs lfm's im2col GEMMs forward and backward (`dX` as col2im of `Wᵀ·dY`, `dW` from the columns
/// rebuilt from the input): the same output and gradients of the input, weight and bias as Burn's own `conv2d`
/// under autodiff, for 3×3, 4×4, 5×5 and 7×7 kernels with strides 1 and 2, a 1×1 (pointwise) kernel, padding wider than
/// the kernel needs, one pixel, no bias, an image in two blocks of output rows, and an empty batch.
#[test]
fn convolution_backward_on_the_cpu_matches_burns_autodiff() {
    use burn::tensor::ops::ConvOptions;
    for (n, c, [h, w], out, k, stride, pad, with_bias) in [
        (1, 1, [1, 1], 1, 1, 1, 0, true),
        (2, 3, [5, 7], 5, 3, 1, 1, true),
        (3, 5, [9, 6], 4, 3, 2, 1, false),
        (2, 7, [4, 3], 3, 1, 1, 0, true),
        (1, 2, [6, 5], 3, 4, 2, 0, true),
        (3, 2, [5, 5], 2, 3, 1, 2, true),
        (0, 3, [5, 5], 4, 3, 1, 1, true),
        // Two blocks of output rows (the column buffer holds 2^21 floats: 56 rows of 64 × 576 here).
        (1, 64, [120, 64], 2, 3, 1, 1, true),
        (2, 2, [6, 7], 3, 5, 1, 2, false),
        // A "same" kernel larger than the image: whole rows of each window over the padding.
        (1, 2, [2, 3], 2, 7, 1, 3, true),
    ] {
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        // x as [n, c, h·w], the weight as [out, c, k·k], the bias as [1, 1, out].
        let inputs = [random([n, c, h * w], 1, 0.5), random([out, c, k * k], 2, 0.0), random([1, 1, out], 3, 0.0)];
        let parts = move |v: &[Tensor<A, 3>]| {
            let bias = with_bias.then(|| v[2].clone().reshape([out]));
            (v[0].clone().reshape([n, c, h, w]), v[1].clone().reshape([out, c, k, k]), bias)
        };
        compare(
            &format!("conv {n}×{c}×{h}×{w} → {out}, {k}×{k} / {stride}, pad {pad}, bias {with_bias}"),
            &inputs[..if with_bias { 3 } else { 2 }],
            |v| {
                let (x, weight, bias) = parts(v);
                let y = lfm::nn::conv2d_padded(x, weight, bias, stride, [pad, pad], lfm::nn::Activation::None);
                y.reshape([n, out, ho * wo])
            },
            |v| {
                let (x, weight, bias) = parts(v);
                let options = ConvOptions::new([stride, stride], [pad, pad], [1, 1], 1);
                burn::tensor::module::conv2d(x, weight, bias, options).reshape([n, out, ho * wo])
            },
            [1e-5, 1e-5],
        );
    }
}

/// GroupNorm runs lfm's one-pass forward and backward: the same output and gradients of the input, γ, β and the
/// modulation's scale and shift as Burn's autodiff of [`lfm::nn::group_norm_reference`], with and without SiLU,
/// without a modulation, with a per-sample one and with one `[1, C]` row broadcast over the batch; one group per
/// channel, one channel, one pixel, and no pixels.
#[test]
fn group_norm_backward_on_the_cpu_matches_burns_autodiff() {
    use lfm::nn::{group_norm, group_norm_reference, Activation};
    for (n, c, groups, len) in [(1, 1, 1, 1), (2, 6, 3, 7), (3, 8, 2, 33), (2, 5, 5, 1), (2, 4, 2, 0)] {
        for activation in [Activation::None, Activation::Silu] {
            for modulation_rows in [None, Some(n), Some(1)] {
                let rows = modulation_rows.unwrap_or(1);
                let mut inputs =
                    vec![random([n, c, len], 1, 3.0), random([1, 1, c], 2, 1.0), random([1, 1, c], 3, 0.0)];
                if modulation_rows.is_some() {
                    inputs.extend([random([1, rows, c], 4, 0.0), random([1, rows, c], 5, 0.0)]);
                }
                let parts = |v: &[Tensor<A, 3>]| {
                    let affine = [&v[1], &v[2]].map(|t| t.clone().reshape([c]));
                    let modulation = modulation_rows.map(|_| [squeeze(&v[3]), squeeze(&v[4])]);
                    (v[0].clone(), affine, modulation)
                };
                compare(
                    &format!(
                        "group_norm {n}×{c}×{len}, {groups} groups, {activation:?}, modulation {modulation_rows:?}"
                    ),
                    &inputs,
                    |v| {
                        let (x, affine, modulation) = parts(v);
                        group_norm(x, affine, modulation, groups, 1e-5, activation)
                    },
                    |v| {
                        let (x, affine, modulation) = parts(v);
                        group_norm_reference(x, affine, modulation, groups, 1e-5, activation)
                    },
                    [1e-4, 1e-5],
                );
            }
        }
    }
}

/// Attention over separate `q`, `k`, `v` `[N, heads, T, head_dim]` (the UNets' and the KL autoencoder's) runs the
/// packed kernel on the three side by side: the same output and gradients of `q`, `k` and `v` as Burn's autodiff of
/// the plain softmax attention.
#[test]
fn attention_over_separate_heads_on_the_cpu_matches_burns_autodiff() {
    // (No empty case: Burn 0.21's reshape reads a 0 in the target shape as "keep this dimension", so the split below
    // cannot build one; the packed kernel's own test has it.)
    for (n, heads, t, head_dim) in [(1, 1, 1, 5), (2, 3, 7, 5), (2, 1, 17, 8)] {
        let inputs = [1, 2, 3].map(|seed| random([n * heads, t, head_dim], seed, 0.0));
        let split = |v: &[Tensor<A, 3>]| [0, 1, 2].map(|i| v[i].clone().reshape([n, heads, t, head_dim]));
        compare(
            &format!("attention {n}×{heads} heads×{t}×{head_dim}"),
            &inputs,
            |v| {
                let [q, k, w] = split(v);
                lfm::nn::attention::attention(q, k, w).reshape([n * heads, t, head_dim])
            },
            |v| {
                let [q, k, w] = split(v);
                lfm_kernels::attention::attention_reference(q, k, w).reshape([n * heads, t, head_dim])
            },
            [1e-4, 1e-6],
        );
    }
}

/// The ×2 resamplings (nearest upsampling and 2×2 average pooling, each the other's backward pass) run lfm's passes
/// each way under autodiff, and one pass at inference: outputs and gradients equal Burn's autodiff of the plain
/// expressions, on one-pixel, odd-width and empty planes.
#[test]
fn resampling_on_the_cpu_matches_burns_expressions() {
    use lfm::nn::{avg_pool_2x, upsample_nearest_2x};
    // The planes `[P, H, W]` as one image of `P` channels, and back.
    let image = |t: &Tensor<A, 3>| t.clone().unsqueeze_dim::<4>(0);
    let planes = |t: Tensor<A, 4>| t.squeeze_dim::<3>(0);
    let plain_up = |t: Tensor<A, 3>| {
        let [p, h, w] = t.dims();
        t.reshape([p, h, 1, w, 1]).expand([p, h, 2, w, 2]).reshape([p, 2 * h, 2 * w])
    };
    let plain_pool = |t: Tensor<A, 3>| {
        let [p, h, w] = t.dims();
        t.reshape([p, h / 2, 2, w / 2, 2]).sum_dim(4).sum_dim(2).mul_scalar(0.25).reshape([p, h / 2, w / 2])
    };
    for [p, h, w] in [[1, 1, 1], [3, 5, 7], [6, 2, 17]] {
        let x = random([p, h, w], 3, 0.0);
        let case = format!("upsampling {p}×{h}×{w}");
        let tolerance = [1e-6, 1e-7];
        compare(&case, &[x], |t| planes(upsample_nearest_2x(image(&t[0]))), |t| plain_up(t[0].clone()), tolerance);
        let x = random([p, 2 * h, 2 * w], 4, 0.0);
        let case = format!("pooling {p}×{}×{}", 2 * h, 2 * w);
        compare(
            &case,
            std::slice::from_ref(&x),
            |t| planes(avg_pool_2x(image(&t[0]))),
            |t| plain_pool(t[0].clone()),
            tolerance,
        );
        // At inference: the same values as Burn's ops, bit for bit (copies, and sums in Burn's order).
        let x = x.inner();
        let up = upsample_nearest_2x(x.clone().unsqueeze_dim::<4>(0));
        let x_ad = Tensor::<A, 3>::from_inner(x.clone());
        assert_eq!(values(up), values(plain_up(x_ad.clone())), "{case} at inference (upsampling)");
        let pooled = avg_pool_2x(x.unsqueeze_dim::<4>(0));
        assert_eq!(values(pooled), values(plain_pool(x_ad)), "{case} at inference");
    }
    // No channels (built directly: Burn's `reshape` reads a 0 as "keep this dimension").
    type Resample = fn(Tensor<A, 4>) -> Tensor<A, 4>;
    for (resample, want) in [(upsample_nearest_2x as Resample, [2, 0, 4, 8]), (avg_pool_2x, [2, 0, 1, 2])] {
        let x = Tensor::<A, 4>::from_data(TensorData::new(Vec::<f32>::new(), [2, 0, 2, 4]), &cpu()).require_grad();
        let out = resample(x.clone());
        assert_eq!(out.dims(), want);
        let grads = out.sum().backward();
        assert!(grad(&x, &grads).is_empty());
    }
}
