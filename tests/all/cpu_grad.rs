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
