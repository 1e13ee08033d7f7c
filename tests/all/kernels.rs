//! lfm-kernels: every fused kernel against its plain-Burn oracle, on wgpu (the CubeCL kernels) and on the CPU
//! (where the same entry points take the fallback). Shapes include odd sizes that are not a multiple of any
//! cube size.

use burn::backend::Autodiff;
use std::cell::RefCell;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use lfm::backend::{Cpu, Wgpu};
use lfm_kernels::attention::{attention_backward, attention_on, attention_reference, has_fused_attention};
use lfm_kernels::rk::{error_ratio_on, error_ratio_reference, linear_combination_on, linear_combination_reference};

use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::common::{assert_close, cpu, values, wgpu, wgpu_with_f16};

/// Odd and even shapes, flattened to what the kernels see (they are shape-agnostic but for the element count).
const SHAPES: [[usize; 4]; 4] = [[1, 4, 32, 32], [3, 5, 7, 1], [1, 1, 1, 1], [2, 3, 17, 259]];

thread_local! {
    /// One generator per test thread (libtest runs each test on its own thread), seeded the same way every run:
    /// inputs are reproducible, so a tolerance failure can be rerun and the tolerances below are measured on
    /// fixed data rather than on whatever a shared, unseeded generator handed out under parallel tests.
    static INPUTS: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0x1f_3a));
}

/// Standard-normal values from the test thread's seeded generator.
fn random<B: Backend>(shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    let normal = Normal::new(0f32, 1.0).expect("a valid normal");
    let data: Vec<f32> = INPUTS.with(|rng| {
        let mut rng = rng.borrow_mut();
        (0..shape.iter().product::<usize>()).map(|_| normal.sample(&mut *rng)).collect()
    });
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// y + Σ w_j·k_j for 1..=8 stages (9 tensors with y), plus leading non-unit weights and interleaved zeros.
pub(crate) fn linear_combinations_match<B: Backend>(device: &B::Device) {
    for shape in SHAPES {
        let tensors: Vec<Tensor<B, 4>> = (0..9).map(|_| random::<B>(shape, device)).collect();
        for n in 1..=9 {
            let weights: Vec<f64> = (0..n).map(|j| if j == 0 { 1.0 } else { 0.37 * j as f64 - 1.1 }).collect();
            let terms: Vec<(&Tensor<B, 4>, f64)> = tensors.iter().zip(weights).collect();
            let fused = values(linear_combination_on(&terms, true));
            let reference = values(linear_combination_reference(&terms));
            assert_close(&format!("{shape:?}, {n} terms"), &fused, &reference, 1e-6, 1e-6);
        }
        // A zero weight in the middle and a first weight that is not 1 (the interpolation's shape).
        let terms = [(&tensors[0], -0.25), (&tensors[1], 0.0), (&tensors[2], 3.5), (&tensors[3], 1e-3)];
        let fused = values(linear_combination_on(&terms, true));
        assert_close(
            &format!("{shape:?} with a zero"),
            &fused,
            &values(linear_combination_reference(&terms)),
            1e-6,
            1e-6,
        );
    }
}

/// torchdiffeq's error ratio with dopri5's error weights (one zero) and LFM's tolerances.
pub(crate) fn error_ratios_match<B: Backend>(device: &B::Device) {
    let weights = lfm_kernels::tableau::C_ERROR.map(|c| c * -0.0625);
    for shape in SHAPES {
        let y0 = random::<B>(shape, device);
        let y1 = random::<B>(shape, device).mul_scalar(2.0);
        let k: Vec<Tensor<B, 4>> = (0..7).map(|_| random::<B>(shape, device)).collect();
        let stages: Vec<(&Tensor<B, 4>, f64)> = k.iter().zip(weights).collect();
        for (rtol, atol) in [(1e-5, 1e-5), (1e-3, 1e-6)] {
            let fused = error_ratio_on(&y0, &y1, &stages, rtol, atol, true);
            let reference = error_ratio_reference(&y0, &y1, &stages, rtol, atol);
            assert!(
                (fused / reference - 1.0).abs() < 1e-5,
                "{shape:?} rtol {rtol}: fused error ratio {fused} vs reference {reference}"
            );
        }
    }
}

#[test]
fn fused_rk_kernels_match_burn_on_wgpu() {
    if let Some(device) = wgpu() {
        assert!(lfm_kernels::has_kernels::<Wgpu>());
        linear_combinations_match::<Wgpu>(&device);
        error_ratios_match::<Wgpu>(&device);
    }
}

#[test]
fn rk_entry_points_fall_back_on_the_cpu() {
    assert!(!lfm_kernels::has_kernels::<Cpu>());
    linear_combinations_match::<Cpu>(&cpu());
    error_ratios_match::<Cpu>(&cpu());
}

/// Attention shapes: DiT-S/B heads (64, key tiles of 32 rows), DiT-XL's 72 (tiles of 28) and the UNets' 128 (tiles of
/// 16), token counts that are not a multiple of the 64-row query block or the key tile, one token, and more keys than
/// queries. (The UNets' 32 runs the same code as 64, tiles of 32 rows included: on wgpu each head_dim is one more
/// kernel to compile.)
const ATTENTION: [([usize; 4], usize); 6] = [
    ([1, 1, 16, 64], 16),
    ([2, 3, 77, 72], 77),
    ([1, 2, 130, 64], 130),
    ([1, 1, 1, 128], 1),
    ([2, 2, 33, 64], 50),
    ([1, 4, 256, 72], 256),
];

fn qkv<B: Backend>(shape: [usize; 4], keys: usize, device: &B::Device) -> [Tensor<B, 4>; 3] {
    let [b, h, _, d] = shape;
    // Scaled so that the softmax is far from uniform (scores of a few units), as in trained networks.
    [
        random::<B>(shape, device).mul_scalar(2.0),
        random::<B>([b, h, keys, d], device),
        random::<B>([b, h, keys, d], device),
    ]
}

/// The fused kernel on `B` against the plain expression on the same inputs, computed on the CPU (on a GPU backend the
/// oracle's products would be autotuned shape by shape, which lavapipe takes minutes over).
pub(crate) fn attention_matches<B: Backend>(device: &B::Device) {
    let on_cpu = |t: &Tensor<B, 4>| Tensor::<Cpu, 4>::from_data(t.to_data(), &cpu());
    for (shape, keys) in ATTENTION {
        let [q, k, v] = qkv::<B>(shape, keys, device);
        let reference = values(attention_reference(on_cpu(&q), on_cpu(&k), on_cpu(&v)));
        let fused = values(attention_on(q, k, v, true));
        assert_close(&format!("attention {shape:?} × {keys} keys"), &fused, &reference, 1e-5, 1e-6);
    }
}

/// The kernel is compiled once per head_dim (three here), each about 1.3 s of lavapipe's shader compiler with Mesa's
/// cache warm and a few seconds cold; in `scripts/test`'s list of slow tests this one's time also counts the wait for
/// the process's one device thread while the test beside it compiles.
#[test]
fn fused_attention_matches_burn_on_wgpu() {
    if let Some(device) = wgpu() {
        assert!(has_fused_attention::<Wgpu>() && has_fused_attention::<Autodiff<Wgpu>>());
        attention_matches::<Wgpu>(&device);
    }
}

#[test]
fn attention_entry_point_falls_back_on_the_cpu() {
    assert!(!has_fused_attention::<Cpu>() && !has_fused_attention::<Autodiff<Cpu>>());
    attention_matches::<Cpu>(&cpu());
}

/// Gradients of `Σ w ⊙ attention(q, k, v)` through `backward` with `inner`'s attention, for each input.
fn attention_gradients<B: burn::tensor::backend::AutodiffBackend>(
    [q, k, v]: [Tensor<B::InnerBackend, 4>; 3],
    w: Tensor<B::InnerBackend, 4>,
    fused: bool,
) -> [Vec<f32>; 3] {
    let (q, k, v) = (
        Tensor::<B, 4>::from_inner(q).require_grad(),
        Tensor::<B, 4>::from_inner(k).require_grad(),
        Tensor::<B, 4>::from_inner(v).require_grad(),
    );
    let out = attention_on(q.clone(), k.clone(), v.clone(), fused);
    let grads = (out * Tensor::from_inner(w)).sum().backward();
    [q, k, v].map(|t| values(t.grad(&grads).expect("a gradient")))
}

/// The same gradients in f64 on the CPU: the oracle for both backward passes, free of either side's f32 rounding.
/// (Against f32 autodiff of the plain expression, the comparison would measure that expression's rounding too: with
/// burn-ndarray's approximate SIMD reciprocal it was 1e-4 of the largest gradient off.)
fn exact_attention_gradients<B: Backend>(inputs: &[Tensor<B, 4>; 3], w: &Tensor<B, 4>) -> [Vec<f32>; 3] {
    let device = cpu();
    let to_f64 = |t: &Tensor<B, 4>| Tensor::<Cpu, 4>::from_data(t.to_data(), &device).cast(DType::F64);
    attention_gradients::<Autodiff<Cpu>>(inputs.each_ref().map(to_f64), to_f64(w), false)
}

/// Under `Autodiff<B>` the fused forward with the recomputing backward gives the exact gradients of the plain
/// expression.
pub(crate) fn attention_backward_matches<B: Backend>(device: &B::Device) {
    // DiT-XL's head_dim 72, token counts off the tiles, and more keys than queries, in one case.
    let (shape, keys) = ([2, 2, 33, 72], 50);
    let inputs = qkv::<B>(shape, keys, device);
    let w = random::<B>(shape, device);
    let exact = exact_attention_gradients(&inputs, &w);
    let fused = attention_gradients::<Autodiff<B>>(inputs, w, true);
    for (name, (got, want)) in ["dq", "dk", "dv"].iter().zip(fused.iter().zip(&exact)) {
        assert_close(&format!("{name} {shape:?} × {keys}"), got, want, 1e-5, 1e-6);
    }
}

#[test]
fn fused_attention_backward_matches_autodiff_on_wgpu() {
    if let Some(device) = wgpu() {
        attention_backward_matches::<Wgpu>(&device);
    }
}

/// The recomputing backward pass, one query row per chunk up to everything at once, against the exact gradients.
#[test]
fn chunked_attention_backward_matches_autodiff_on_the_cpu() {
    let device = cpu();
    let (shape, keys) = ATTENTION[4];
    let inputs = qkv::<Cpu>(shape, keys, &device);
    let w = random::<Cpu>(shape, &device);
    let exact = exact_attention_gradients(&inputs, &w);
    let [q, k, v] = inputs;
    let [b, h, n_q, _] = shape;
    for max_scores in [1, b * h * keys * 7, usize::MAX] {
        let (dq, dk, dv) = attention_backward(q.clone(), k.clone(), v.clone(), w.clone(), max_scores);
        for (name, (got, want)) in
            ["dq", "dk", "dv"].iter().zip([values(dq), values(dk), values(dv)].iter().zip(&exact))
        {
            assert_close(&format!("{name}, chunks of ≤ {max_scores} scores ({n_q} rows)"), got, want, 1e-5, 1e-6);
        }
    }
}

/// 16-bit storage (f16 or bf16) with f32 accumulation: the fused kernels against the f32 oracle on the same
/// (rounded) inputs. `rel` is the format's output rounding.
pub(crate) fn fused_kernels_accumulate_in_f32<B: Backend>(device: &B::Device, dtype: DType, rel: f64) {
    let [q, k, v] = qkv::<B>([1, 2, 77, 72], 77, device).map(|t| t.cast(dtype));
    let fused = values(attention_on(q.clone(), k.clone(), v.clone(), true));
    let reference = values(attention_reference(q.cast(DType::F32), k.cast(DType::F32), v.cast(DType::F32)));
    assert_close(&format!("{dtype:?} attention"), &fused, &reference, 4.0 * rel, 1e-3);
    let x: Vec<Tensor<B, 4>> = (0..3).map(|_| random::<B>([1, 4, 8, 9], device).cast(dtype)).collect();
    let terms: Vec<(&Tensor<B, 4>, f64)> = x.iter().zip([1.0, 0.25, -0.5]).collect();
    let fused = values(linear_combination_on(&terms, true));
    let x32: Vec<Tensor<B, 4>> = x.iter().map(|t| t.clone().cast(DType::F32)).collect();
    let terms32: Vec<(&Tensor<B, 4>, f64)> = x32.iter().zip([1.0, 0.25, -0.5]).collect();
    let want = values(linear_combination_reference(&terms32));
    assert_close(&format!("{dtype:?} linear combination"), &fused, &want, 2.0 * rel, 1e-3);
}

/// f16 storage with f32 accumulation, where the adapter has shader-f16. Two f16 kernels to compile (a few seconds
/// on lavapipe, cold); as for the test above, its time in `scripts/test`'s list includes waiting for the device thread.
#[test]
fn fused_kernels_accumulate_f16_in_f32_on_wgpu() {
    let Some(device) = wgpu_with_f16() else { return };
    fused_kernels_accumulate_in_f32::<Wgpu>(&device, DType::F16, 5e-4);
}

/// The kinds of product the networks make, as `[lhs, rhs]` shapes: per-head batches with odd sizes (DiT-XL's head_dim
/// 72), a weight broadcast over the batch, one row (vector·matrix; its gradients are a matrix·vector product and an
/// outer product).
pub(crate) const PRODUCTS: [([usize; 4], [usize; 4]); 3] =
    [([2, 3, 33, 72], [2, 3, 72, 17]), ([2, 1, 16, 64], [1, 1, 64, 48]), ([1, 2, 1, 40], [1, 2, 40, 9])];

/// `(lhs·rhs, d/dlhs, d/drhs)` of `Σ w ⊙ (lhs·rhs)` under `B`, through lfm's matmul, on its own route if `own`.
fn matmul_and_gradients<B: burn::tensor::backend::AutodiffBackend>(
    [lhs, rhs, w]: [Tensor<B::InnerBackend, 4>; 3],
    own: bool,
) -> [Vec<f32>; 3] {
    let (lhs, rhs) = (Tensor::<B, 4>::from_inner(lhs).require_grad(), Tensor::<B, 4>::from_inner(rhs).require_grad());
    let out = lfm_kernels::matmul::matmul_on(lhs.clone(), rhs.clone(), own);
    let grads = (out.clone() * Tensor::from_inner(w)).sum().backward();
    [values(out.inner()), values(lhs.grad(&grads).expect("d lhs")), values(rhs.grad(&grads).expect("d rhs"))]
}

/// Inputs of each product of `products` (shapes as in [`PRODUCTS`]): `[lhs, rhs, output weights]` from the test
/// thread's generator.
fn product_inputs<B: Backend>(products: &[([usize; 4], [usize; 4])], device: &B::Device) -> Vec<[Tensor<B, 4>; 3]> {
    products
        .iter()
        .map(|&(l, r)| {
            let out = [l[0].max(r[0]), l[1].max(r[1]), l[2], r[3]];
            [random::<B>(l, device), random::<B>(r, device), random::<B>(out, device)]
        })
        .collect()
}

/// [`matmul_and_gradients`] in f64 on the CPU: the reference, free of f32 rounding.
fn exact_product<B: Backend>(inputs: &[Tensor<B, 4>; 3]) -> [Vec<f32>; 3] {
    let to_f64 = |t: &Tensor<B, 4>| Tensor::<Cpu, 4>::from_data(t.to_data(), &cpu()).cast(DType::F64);
    matmul_and_gradients::<Autodiff<Cpu>>(inputs.each_ref().map(to_f64), false)
}

/// lfm's full-f32 matmul on `B` against the same products and gradients in f64 on the CPU, to 1e-5 of the largest
/// value: f32 arithmetic meets it by two orders of magnitude, TF32 (10-bit mantissas) misses it by one.
pub(crate) fn full_f32_matmul_matches<B: Backend>(device: &B::Device) {
    for inputs in product_inputs::<B>(&PRODUCTS, device) {
        let shapes = format!("{:?}·{:?}", inputs[0].dims(), inputs[1].dims());
        let exact = exact_product(&inputs);
        let full = matmul_and_gradients::<Autodiff<B>>(inputs, true);
        for (name, (got, want)) in ["lhs·rhs", "d lhs", "d rhs"].iter().zip(full.iter().zip(&exact)) {
            assert_close(&format!("{name} {shapes}"), got, want, 1e-5, 1e-6);
        }
    }
}

/// The largest error of Burn's own matmul on `B` over `products` (shapes as in [`PRODUCTS`]), relative to each
/// product's largest value (TF32 where cubek picks tensor cores).
pub(crate) fn burn_matmul_error<B: Backend>(products: &[([usize; 4], [usize; 4])], device: &B::Device) -> f64 {
    let mut worst = 0f64;
    for inputs in product_inputs::<B>(products, device) {
        let exact = exact_product(&inputs);
        let burn = values(inputs[0].clone().matmul(inputs[1].clone()));
        let max = exact[0].iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        let error = burn.iter().zip(&exact[0]).fold(0f64, |m, (&g, &w)| m.max((f64::from(g) - f64::from(w)).abs()));
        worst = worst.max(error / max);
    }
    worst
}

/// lfm's own product route on wgpu against f64, with its gradients. On a software adapter (lavapipe, here) the
/// networks' products take that route, so Burn's autotuned matmul, which hardware adapters run, is checked here too,
/// on the kind of product the linear layers make (one tuned shape: each costs lavapipe seconds of compiling).
#[test]
fn own_matmul_matches_f64_on_wgpu() {
    if let Some(device) = wgpu() {
        let software = !lfm::backend::wgpu_adapters().iter().any(|adapter| adapter.hardware);
        assert_eq!(lfm_kernels::matmul::own_route_applies::<Wgpu>(), software);
        assert_eq!(lfm_kernels::matmul::own_route_applies::<Autodiff<Wgpu>>(), software);
        full_f32_matmul_matches::<Wgpu>(&device);
        if lfm::backend::Wgpu::supports_dtype(&device, DType::F16) {
            // The route takes f16 too (f16 networks on a software adapter): against f64 products of the rounded
            // inputs, within f16's output rounding.
            for (l, r) in PRODUCTS.into_iter().chain([([1, 1, 8, 576], [2, 1, 576, 20])]) {
                let [a, b] = [random::<Wgpu>(l, &device), random::<Wgpu>(r, &device)].map(|t| t.cast(DType::F16));
                let exact = |t: &Tensor<Wgpu, 4>| Tensor::<Cpu, 4>::from_data(t.to_data(), &cpu()).cast(DType::F64);
                let want = values(exact(&a).matmul(exact(&b)));
                let got = values(lfm_kernels::matmul::matmul_on(a, b, true));
                assert_close(&format!("f16 {l:?}·{r:?}"), &got, &want, 2e-3, 1e-3);
            }
        }
        let burn_error = burn_matmul_error::<Wgpu>(&PRODUCTS[1..2], &device);
        assert!(burn_error <= 1e-5, "Burn's matmul on wgpu is {burn_error:e} (relative) from f64");
    }
}

/// On the CPU, and on wgpu unless asked, lfm's matmul is Burn's.
#[test]
fn full_f32_route_is_cuda_only() {
    assert!(!lfm_kernels::matmul::full_f32_applies::<Cpu>() && !lfm_kernels::matmul::full_f32_applies::<Wgpu>());
    assert!(!lfm_kernels::matmul::full_f32_applies::<Autodiff<Wgpu>>());
    let device = cpu();
    let [a, b] = [random::<Cpu>([1, 2, 5, 3], &device), random::<Cpu>([1, 2, 3, 4], &device)];
    assert_eq!(values(lfm_kernels::matmul::matmul(a.clone(), b.clone())), values(a.matmul(b)));
}

/// Which backend a type is, decided from the type alone: lfm's CPU, wgpu (and CUDA) backends with and without
/// autodiff, and ndarray at another precision, each recognised as itself; the kernels switch off for the whole
/// process with one setting.
#[test]
fn backend_capabilities_are_decided_by_type() {
    use lfm_kernels::{capabilities, BackendKind, Capabilities};
    let is = |kind, autodiff| Capabilities { kind, autodiff };
    assert_eq!(capabilities::<Cpu>(), is(BackendKind::NdArray, false));
    assert_eq!(capabilities::<Autodiff<Cpu>>(), is(BackendKind::NdArray, true));
    assert_eq!(capabilities::<burn::backend::NdArray<f64>>(), is(BackendKind::NdArray, false));
    assert_eq!(capabilities::<Autodiff<burn::backend::NdArray<f64>>>(), is(BackendKind::NdArray, true));
    assert_eq!(capabilities::<Wgpu>(), is(BackendKind::Wgpu, false));
    assert_eq!(capabilities::<Autodiff<Wgpu>>(), is(BackendKind::Wgpu, true));
    #[cfg(feature = "cuda")]
    {
        assert_eq!(capabilities::<lfm::backend::Cuda>(), is(BackendKind::Cuda, false));
        assert_eq!(capabilities::<Autodiff<lfm::backend::Cuda>>(), is(BackendKind::Cuda, true));
    }
    assert!(!lfm_kernels::has_kernels::<Cpu>(), "the CPU runs no CubeCL kernels");
}
