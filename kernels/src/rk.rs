//! Fused Runge–Kutta arithmetic: the linear combinations of stage tensors (stage inputs, the dense-output
//! interpolation) and torchdiffeq's error ratio, each in one pass over the stage tensors.
//!
//! Unfused, a dopri5 stage input `y + h·Σ a_j·k_j` over six stages is eleven elementwise kernels, each reading and
//! writing a whole tensor; the error ratio is another ~15. Fused, each is one kernel that reads every input once and
//! writes one tensor (or, for the error ratio, nothing tensor-sized: per-cube partial sums, then one scalar).

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor, CubeRuntime,
};
use cubecl::prelude::*;

/// Most tensors one fused combination reads (dopri5's interpolation: y0, y1 and seven stages).
pub const MAX_TERMS: usize = 9;

/// Units per cube of the elementwise and reduction kernels.
const CUBE_SIZE: u32 = 256; // block_sum_into's tree assumes exactly 256

/// Most cubes of the first reduction pass: enough to fill a large GPU, few enough for one cube to finish.
const MAX_REDUCE_CUBES: usize = 1024;

/// `out = Σ_j w_j·x_j` for `terms` inputs (the rest are placeholders never read), `N` elements per unit: vector
/// loads and stores of up to 128 bits, as Burn's own elementwise kernels use (scalar ones reached ~30% of the
/// streaming bandwidth of the same adapter).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn linear_combination_kernel<F: Float, N: Size>(
    x0: &Tensor<Vector<F, N>>,
    x1: &Tensor<Vector<F, N>>,
    x2: &Tensor<Vector<F, N>>,
    x3: &Tensor<Vector<F, N>>,
    x4: &Tensor<Vector<F, N>>,
    x5: &Tensor<Vector<F, N>>,
    x6: &Tensor<Vector<F, N>>,
    x7: &Tensor<Vector<F, N>>,
    x8: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    weights: Sequence<f32>,
    #[comptime] terms: u32,
    #[define(F)] _dtype: StorageType,
) {
    // Every input has `out`'s length (checked on the host), so this one test keeps every access in bounds.
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    // Accumulate in f32 whatever the storage type, in the same order as the unfused expression.
    let mut acc = Vector::<f32, N>::cast_from(x0[i]) * Vector::new(*weights.index(0usize));
    if comptime!(terms > 1) {
        acc += Vector::<f32, N>::cast_from(x1[i]) * Vector::new(*weights.index(1usize));
    }
    if comptime!(terms > 2) {
        acc += Vector::<f32, N>::cast_from(x2[i]) * Vector::new(*weights.index(2usize));
    }
    if comptime!(terms > 3) {
        acc += Vector::<f32, N>::cast_from(x3[i]) * Vector::new(*weights.index(3usize));
    }
    if comptime!(terms > 4) {
        acc += Vector::<f32, N>::cast_from(x4[i]) * Vector::new(*weights.index(4usize));
    }
    if comptime!(terms > 5) {
        acc += Vector::<f32, N>::cast_from(x5[i]) * Vector::new(*weights.index(5usize));
    }
    if comptime!(terms > 6) {
        acc += Vector::<f32, N>::cast_from(x6[i]) * Vector::new(*weights.index(6usize));
    }
    if comptime!(terms > 7) {
        acc += Vector::<f32, N>::cast_from(x7[i]) * Vector::new(*weights.index(7usize));
    }
    if comptime!(terms > 8) {
        acc += Vector::<f32, N>::cast_from(x8[i]) * Vector::new(*weights.index(8usize));
    }
    out[i] = Vector::cast_from(acc);
}

/// First pass of the error ratio: each cube writes `Σ ((Σ_j w_j·k_j) / (atol + rtol·max(|y0|, |y1|)))²` over its
/// grid-strided share of the elements (`N` per load, summed lane by lane at the end).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn error_ratio_partials_kernel<F: Float, N: Size>(
    y0: &Tensor<Vector<F, N>>,
    y1: &Tensor<Vector<F, N>>,
    k0: &Tensor<Vector<F, N>>,
    k1: &Tensor<Vector<F, N>>,
    k2: &Tensor<Vector<F, N>>,
    k3: &Tensor<Vector<F, N>>,
    k4: &Tensor<Vector<F, N>>,
    k5: &Tensor<Vector<F, N>>,
    k6: &Tensor<Vector<F, N>>,
    partials: &mut Tensor<f32>,
    weights: Sequence<f32>,
    #[comptime] terms: u32,
    #[define(F)] _dtype: StorageType,
) {
    // rtol and atol travel in the weights' scalar sequence, slots 7 and 8.
    let rtol = Vector::<f32, N>::new(*weights.index(7usize));
    let atol = Vector::<f32, N>::new(*weights.index(8usize));
    // Every input has y0's length (checked on the host); the host launches exactly `partials.len()` cubes.
    let len = y0.len();
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    let mut sum = Vector::<f32, N>::new(0.0);
    while i < len {
        let mut err = Vector::<f32, N>::cast_from(k0[i]) * Vector::new(*weights.index(0usize));
        if comptime!(terms > 1) {
            err += Vector::<f32, N>::cast_from(k1[i]) * Vector::new(*weights.index(1usize));
        }
        if comptime!(terms > 2) {
            err += Vector::<f32, N>::cast_from(k2[i]) * Vector::new(*weights.index(2usize));
        }
        if comptime!(terms > 3) {
            err += Vector::<f32, N>::cast_from(k3[i]) * Vector::new(*weights.index(3usize));
        }
        if comptime!(terms > 4) {
            err += Vector::<f32, N>::cast_from(k4[i]) * Vector::new(*weights.index(4usize));
        }
        if comptime!(terms > 5) {
            err += Vector::<f32, N>::cast_from(k5[i]) * Vector::new(*weights.index(5usize));
        }
        if comptime!(terms > 6) {
            err += Vector::<f32, N>::cast_from(k6[i]) * Vector::new(*weights.index(6usize));
        }
        let a = Abs::abs(Vector::<f32, N>::cast_from(y0[i]));
        let b = Abs::abs(Vector::<f32, N>::cast_from(y1[i]));
        let ratio = err / (max(a, b) * rtol + atol);
        sum += ratio * ratio;
        i += stride;
    }
    let mut total = 0.0f32;
    #[unroll]
    for lane in 0..N::value() {
        total += sum[lane];
    }
    block_sum_into(total, partials, CUBE_POS);
}

/// Second pass: one cube sums the partials into `out[0]`.
#[cube(launch)]
fn sum_kernel(partials: &Tensor<f32>, out: &mut Tensor<f32>) {
    let mut i = UNIT_POS as usize;
    let mut sum = 0.0f32;
    while i < partials.len() {
        sum += partials[i];
        i += CUBE_DIM as usize;
    }
    block_sum_into(sum, out, 0);
}

/// Tree reduction of one value per unit through workgroup memory; unit 0 writes the cube's total to `out[at]`.
#[cube]
fn block_sum_into(value: f32, out: &mut Tensor<f32>, at: usize) {
    let mut shared = SharedMemory::<f32>::new(CUBE_SIZE as usize);
    let unit = UNIT_POS as usize;
    shared[unit] = value;
    sync_cube();
    // CUBE_SIZE = 256 = 2⁸: eight halving steps, each with a compile-time width.
    tree_step(&mut shared, unit, 128usize);
    tree_step(&mut shared, unit, 64usize);
    tree_step(&mut shared, unit, 32usize);
    tree_step(&mut shared, unit, 16usize);
    tree_step(&mut shared, unit, 8usize);
    tree_step(&mut shared, unit, 4usize);
    tree_step(&mut shared, unit, 2usize);
    tree_step(&mut shared, unit, 1usize);
    if unit == 0 {
        out[at] = shared[0];
    }
}

/// One level of the tree: the first `half` units add the value `half` slots above theirs.
#[cube]
fn tree_step(shared: &mut SharedMemory<f32>, unit: usize, #[comptime] half: usize) {
    if unit < half {
        let other = shared[unit + half];
        shared[unit] += other;
    }
    sync_cube();
}

/// The widest vector (at most 128 bits, as the runtime prefers for loads) that divides `elements`: tensors of
/// any size work, odd ones element by element.
fn vector_size<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType, elements: usize) -> usize {
    client.io_optimized_vector_sizes(dtype.size()).filter(|v| elements.is_multiple_of(*v)).max().unwrap_or(1)
}

fn weights_arg<R: CubeRuntime>(weights: &[f64]) -> SequenceArg<R, f32> {
    let mut arg = SequenceArg::new();
    for w in weights {
        arg.push(*w as f32);
    }
    arg
}

/// `Σ_j w_j·x_j` over 1 to [`MAX_TERMS`] tensors of one shape and dtype, in one kernel.
///
/// # Panics
/// With no term, more than [`MAX_TERMS`], or tensors of different shapes (callers check; these are bugs).
pub fn linear_combination<R: CubeRuntime>(terms: Vec<(CubeTensor<R>, f64)>) -> CubeTensor<R> {
    assert!((1..=MAX_TERMS).contains(&terms.len()), "1 to {MAX_TERMS} terms, got {}", terms.len());
    let shape = terms[0].0.meta.shape().clone();
    assert!(terms.iter().all(|(t, _)| *t.meta.shape() == shape), "terms of different shapes");
    let weights: Vec<f64> = terms.iter().map(|(_, w)| *w).collect();
    let tensors: Vec<CubeTensor<R>> = terms.into_iter().map(|(t, _)| into_contiguous(t)).collect();
    let first = tensors[0].clone();
    let (client, device, dtype) = (first.client.clone(), first.device.clone(), first.dtype);
    // Explicitly contiguous: the kernel writes element i at offset i, and Burn's default allocation on CUDA pads
    // each row to an aligned pitch (a 259-wide f32 row takes 384 slots), which scrambled every such output.
    let out = empty_device_contiguous_dtype::<R>(client.clone(), device, shape.clone(), dtype);
    let vector = vector_size(&client, dtype, shape.num_elements());
    let units = shape.num_elements() / vector;
    let arg = |j: usize| tensors.get(j).unwrap_or(&first).clone().into_tensor_arg();
    // SAFETY: every tensor is contiguous with `out`'s shape (asserted above) and the kernel returns early for
    // units past `out.len()`, so no access leaves a buffer; placeholder terms are never read.
    unsafe {
        linear_combination_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(units.div_ceil(CUBE_SIZE as usize).max(1) as u32, 1, 1),
            CubeDim::new_1d(CUBE_SIZE),
            vector,
            arg(0),
            arg(1),
            arg(2),
            arg(3),
            arg(4),
            arg(5),
            arg(6),
            arg(7),
            arg(8),
            out.clone().into_tensor_arg(),
            weights_arg(&weights),
            tensors.len() as u32,
            dtype.into(),
        );
    }
    out
}

/// torchdiffeq's squared-error sum `Σ ((Σ_j w_j·k_j) / (atol + rtol·max(|y0|, |y1|)))²`, as a one-element f32
/// tensor on the device (the caller divides by the element count and takes the root on the host, in f64).
///
/// # Panics
/// With no stage, more than seven, or tensors of different shapes (callers check; these are bugs).
pub fn error_ratio_sum_sq<R: CubeRuntime>(
    y0: CubeTensor<R>,
    y1: CubeTensor<R>,
    stages: Vec<(CubeTensor<R>, f64)>,
    rtol: f64,
    atol: f64,
) -> CubeTensor<R> {
    assert!((1..=7).contains(&stages.len()), "1 to 7 stages, got {}", stages.len());
    let shape = y0.meta.shape().clone();
    assert!(
        *y1.meta.shape() == shape && stages.iter().all(|(t, _)| *t.meta.shape() == shape),
        "tensors of different shapes"
    );
    let mut weights: Vec<f64> = stages.iter().map(|(_, w)| *w).collect();
    weights.resize(7, 0.0);
    weights.extend([rtol, atol]);
    let (y0, y1) = (into_contiguous(y0), into_contiguous(y1));
    let stages: Vec<CubeTensor<R>> = stages.into_iter().map(|(t, _)| into_contiguous(t)).collect();
    let (client, device, dtype) = (y0.client.clone(), y0.device.clone(), y0.dtype);
    let vector = vector_size(&client, dtype, shape.num_elements());
    let units = shape.num_elements() / vector;
    let cubes = units.div_ceil(CUBE_SIZE as usize * 4).clamp(1, MAX_REDUCE_CUBES);
    let partials = empty_device_contiguous_dtype::<R>(client.clone(), device.clone(), Shape::new([cubes]), DType::F32);
    let out = empty_device_contiguous_dtype::<R>(client.clone(), device, Shape::new([1]), DType::F32);
    let arg = |j: usize| stages.get(j).unwrap_or(&stages[0]).clone().into_tensor_arg();
    // SAFETY: every tensor is contiguous with y0's shape (asserted above), the grid-strided loop stops at y0's
    // length, `partials` has one slot per cube launched, and placeholder stages are never read.
    unsafe {
        error_ratio_partials_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(CUBE_SIZE),
            vector,
            y0.into_tensor_arg(),
            y1.into_tensor_arg(),
            arg(0),
            arg(1),
            arg(2),
            arg(3),
            arg(4),
            arg(5),
            arg(6),
            partials.clone().into_tensor_arg(),
            weights_arg(&weights),
            stages.len() as u32,
            dtype.into(),
        );
    }
    sum_kernel::launch::<R>(
        &client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(CUBE_SIZE),
        partials.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    out
}

// ---- Backend-generic entry points: fused where the backend has the kernels, plain Burn otherwise. ----

use burn::tensor::{backend::Backend, ElementConversion, Tensor as BurnTensor};

use crate::dispatch::{from_cube, to_cube, with_runtime};

/// `Σ_j w_j·x_j` as plain Burn tensor operations, term by term in order (a leading weight of exactly 1 takes
/// the tensor as is, so `y + Σ h·a_j·k_j` rounds exactly as torchdiffeq's expression does). Zero weights are
/// skipped. The oracle of [`linear_combination_on`].
///
/// # Panics
/// If every weight is zero.
pub fn linear_combination_reference<B: Backend, const D: usize>(
    terms: &[(&BurnTensor<B, D>, f64)],
) -> BurnTensor<B, D> {
    let mut nonzero = terms.iter().filter(|(_, w)| *w != 0.0);
    let (first, w) = nonzero.next().expect("a linear combination needs a non-zero weight");
    let start = if *w == 1.0 { (*first).clone() } else { (*first).clone().mul_scalar(*w) };
    nonzero.fold(start, |acc, (x, w)| acc + (*x).clone().mul_scalar(*w))
}

/// `Σ_j w_j·x_j` in one fused kernel when `fused` is set and backend `B` has the kernels (zero weights skipped,
/// at most [`MAX_TERMS`] non-zero ones), otherwise [`linear_combination_reference`].
///
/// # Panics
/// If every weight is zero.
pub fn linear_combination_on<B: Backend, const D: usize>(
    terms: &[(&BurnTensor<B, D>, f64)],
    fused: bool,
) -> BurnTensor<B, D> {
    let nonzero: Vec<(&BurnTensor<B, D>, f64)> = terms.iter().filter(|(_, w)| *w != 0.0).copied().collect();
    if fused && (1..=MAX_TERMS).contains(&nonzero.len()) {
        let fused = with_runtime!(B, |R| {
            let cube: Vec<(CubeTensor<R>, f64)> =
                nonzero.iter().map(|(x, w)| (to_cube::<B, R, D>((*x).clone()), *w)).collect();
            from_cube::<B, R, D>(linear_combination::<R>(cube))
        });
        if let Some(out) = fused {
            return out;
        }
    }
    linear_combination_reference(terms)
}

/// torchdiffeq's error ratio `rms((Σ_j w_j·k_j) / (atol + rtol·max(|y0|, |y1|)))` as plain Burn tensor operations,
/// one scalar read back. The oracle of [`error_ratio_on`].
pub fn error_ratio_reference<B: Backend, const D: usize>(
    y0: &BurnTensor<B, D>,
    y1: &BurnTensor<B, D>,
    stages: &[(&BurnTensor<B, D>, f64)],
    rtol: f64,
    atol: f64,
) -> f64 {
    let mut nonzero = stages.iter().filter(|(_, w)| *w != 0.0);
    let error = match nonzero.next() {
        Some((first, w)) => {
            nonzero.fold((*first).clone().mul_scalar(*w), |acc, (k, w)| acc + (*k).clone().mul_scalar(*w))
        }
        None => return 0.0,
    };
    let tolerance = y0.clone().abs().max_pair(y1.clone().abs()).mul_scalar(rtol).add_scalar(atol);
    let ratio = error / tolerance;
    let n = ratio.shape().num_elements() as f64;
    let sum_sq: f64 = ratio.powi_scalar(2).sum().into_scalar().elem();
    (sum_sq / n).sqrt()
}

/// [`error_ratio_reference`] in one fused pass (plus a one-cube reduction) when `fused` is set and backend `B` has
/// the kernels: the stage tensors are read once and one f32 comes back to the host.
pub fn error_ratio_on<B: Backend, const D: usize>(
    y0: &BurnTensor<B, D>,
    y1: &BurnTensor<B, D>,
    stages: &[(&BurnTensor<B, D>, f64)],
    rtol: f64,
    atol: f64,
    fused: bool,
) -> f64 {
    let nonzero: Vec<(&BurnTensor<B, D>, f64)> = stages.iter().filter(|(_, w)| *w != 0.0).copied().collect();
    if fused && (1..=7).contains(&nonzero.len()) {
        let n = y0.shape().num_elements() as f64;
        let fused = with_runtime!(B, |R| {
            let cube: Vec<(CubeTensor<R>, f64)> =
                nonzero.iter().map(|(k, w)| (to_cube::<B, R, D>((*k).clone()), *w)).collect();
            let sum = error_ratio_sum_sq::<R>(
                to_cube::<B, R, D>(y0.clone()),
                to_cube::<B, R, D>(y1.clone()),
                cube,
                rtol,
                atol,
            );
            let sum_sq: f64 = from_cube::<B, R, 1>(sum).into_scalar().elem();
            (sum_sq / n).sqrt()
        });
        if let Some(ratio) = fused {
            return ratio;
        }
    }
    error_ratio_reference(y0, y1, stages, rtol, atol)
}
