//! Inference kernels for the CPU backend on raw `f32` slices: a 2-D convolution (im2col into a bounded buffer and
//! one GEMM per block of output rows), 2-D max / average pooling, and the DiT's and UNets' layers between the
//! matrix products (linear with fused bias and activation, LayerNorm and GroupNorm with their modulations,
//! attention), each parallel over the cores.
//!
//! Burn 0.21's ndarray `conv2d` is a direct loop (≈2 GFLOP/s here), and the im2col built from Burn tensor ops
//! ([`super::conv2d_im2col`], kept for autodiff) copies every window twice through ndarray's strided iterators,
//! which costs more than its matmul. Without a gradient to track, the columns can be written once, straight from
//! the input rows, and multiplied by the `gemm` crate's kernels; the bias is the GEMM's initial output.

use std::any::Any;
use std::ops::Range;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use gemm::Parallelism;

use super::{out_size, Activation};
use rayon::prelude::*;

/// Upper bound on one column block (`in·kh·kw` × a few output rows), in `f32`s: 8 MiB, so a block stays in the
/// last-level cache on most CPUs and memory does not grow with the image (a 256² decoder layer would need 300 MB).
const BLOCK_FLOATS: usize = 1 << 21;

/// Whether this module's kernels (and other CPU-inference shortcuts) can run on this tensor: `f32` data on the CPU
/// backend without autodiff.
pub fn applies<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    super::is_ndarray::<B>() && x.dtype() == DType::F32 && !B::ad_enabled(&x.device())
}

/// The shape of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: [usize; 2],
    out_height: usize,
    out_width: usize,
}

impl Geometry {
    /// Rows of the weight matrix's inner dimension (`in·kh·kw`).
    fn depth(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// A 1×1, stride-1, unpadded convolution reads the input image as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == 1 && self.padding == [0, 0]
    }

    /// Convolves one image `[in, H, W]` into `out` `[out, Ho, Wo]` (which holds the bias on entry), then applies
    /// `activation` while the output is still in cache.
    fn image(&self, x: &[f32], weight: &[f32], out: &mut [f32], parallelism: Parallelism, activation: Activation) {
        self.convolve(x, weight, out, parallelism);
        activation.apply_in_place(out);
    }

    fn convolve(&self, x: &[f32], weight: &[f32], out: &mut [f32], parallelism: Parallelism) {
        let (depth, plane) = (self.depth(), self.out_height * self.out_width);
        if self.is_pointwise() {
            // SAFETY: `weight` is [out, depth], `x` is [depth, plane], `out` is [out, plane], all row-major.
            unsafe {
                gemm_rows(
                    self.out_channels,
                    plane,
                    depth,
                    out.as_mut_ptr(),
                    plane,
                    (weight, [depth, 1]),
                    (x, [plane, 1]),
                    parallelism,
                )
            };
            return;
        }
        let rows_per_block = (BLOCK_FLOATS / (depth * self.out_width).max(1)).clamp(1, self.out_height);
        let mut columns = vec![0.0f32; depth * rows_per_block * self.out_width];
        for first_row in (0..self.out_height).step_by(rows_per_block) {
            let rows = rows_per_block.min(self.out_height - first_row);
            let width = rows * self.out_width;
            self.fill_columns(x, first_row, rows, &mut columns[..depth * width]);
            let out = out[first_row * self.out_width..].as_mut_ptr();
            // SAFETY: `columns` is [depth, width]; the block of `out` starts at row `first_row` of each output plane
            // and spans `width` ≤ `plane − first_row·Wo` entries of each of the `out` planes (row stride `plane`).
            unsafe {
                gemm_rows(
                    self.out_channels,
                    width,
                    depth,
                    out,
                    plane,
                    (weight, [depth, 1]),
                    (&columns, [width, 1]),
                    parallelism,
                )
            };
        }
    }

    /// Writes the im2col block for output rows `first_row..first_row + rows`: row `(c, ky, kx)` of `columns` holds
    /// input channel `c` at offset `(ky, kx)` under each output pixel, zero where the window hangs over the padding.
    fn fill_columns(&self, x: &[f32], first_row: usize, rows: usize, columns: &mut [f32]) {
        let [kh, kw] = self.kernel;
        let [ph, pw] = self.padding;
        let (s, wo) = (self.stride, self.out_width);
        let width = rows * wo;
        for (r, column_row) in columns.chunks_exact_mut(width).enumerate() {
            let (c, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &x[c * self.height * self.width..(c + 1) * self.height * self.width];
            // Output columns whose input column `ox·s + kx − pw` lies inside the image.
            let lo = pw.saturating_sub(kx).div_ceil(s).min(wo);
            let hi = (self.width + pw).saturating_sub(kx).div_ceil(s).clamp(lo, wo);
            for (oy, out_row) in column_row.chunks_exact_mut(wo).enumerate() {
                let iy = ((first_row + oy) * s + ky) as isize - ph as isize;
                if iy < 0 || iy >= self.height as isize {
                    out_row.fill(0.0);
                    continue;
                }
                let input_row = &plane[iy as usize * self.width..(iy as usize + 1) * self.width];
                out_row[..lo].fill(0.0);
                out_row[hi..].fill(0.0);
                let start = lo * s + kx - pw;
                if s == 1 {
                    out_row[lo..hi].copy_from_slice(&input_row[start..start + (hi - lo)]);
                } else {
                    for (o, i) in out_row[lo..hi].iter_mut().zip(input_row[start..].iter().step_by(s)) {
                        *o = *i;
                    }
                }
            }
        }
    }
}

/// `out[m×n] += lhs[m×k] · rhs[k×n]` for `lhs` and `rhs` given with their strides `[row, column]` (a row-major
/// `[r, c]` matrix has `[c, 1]`, its transposed view `[1, c]`), with `out` row-major and rows `out_stride` apart.
///
/// # Safety
/// `out` must be valid for reads and writes at `i·out_stride + j` for all `i < m`, `j < n`; `lhs` must hold every
/// `i·row + a·column` for `i < m`, `a < k`, and `rhs` every `a·row + j·column` for `a < k`, `j < n`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_stride: usize,
    lhs: (&[f32], [usize; 2]),
    rhs: (&[f32], [usize; 2]),
    parallelism: Parallelism,
) {
    unsafe { gemm_strided(m, n, k, (out, out_stride, true), lhs, rhs, parallelism) }
}

/// `out[m×n] = lhs[m×k] · rhs[k×n]`, as [`gemm_rows`] but overwriting `out` without reading it (so it may be
/// uninitialised memory). `k` must be at least 1.
///
/// # Safety
/// As [`gemm_rows`], with `out` valid for writes only.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_rows_set(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_stride: usize,
    lhs: (&[f32], [usize; 2]),
    rhs: (&[f32], [usize; 2]),
    parallelism: Parallelism,
) {
    debug_assert!(k > 0, "an empty product leaves the output unwritten");
    unsafe { gemm_strided(m, n, k, (out, out_stride, false), lhs, rhs, parallelism) }
}

/// The `gemm` crate's product on strided operands, accumulating into `out` or overwriting it.
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    (out, out_stride, accumulate): (*mut f32, usize, bool),
    (lhs, [lhs_row, lhs_column]): (&[f32], [usize; 2]),
    (rhs, [rhs_row, rhs_column]): (&[f32], [usize; 2]),
    parallelism: Parallelism,
) {
    let last = |rows: usize, columns: usize, [row, column]: [usize; 2]| (rows - 1) * row + (columns - 1) * column;
    debug_assert!(m == 0 || k == 0 || lhs.len() > last(m, k, [lhs_row, lhs_column]));
    debug_assert!(k == 0 || n == 0 || rhs.len() > last(k, n, [rhs_row, rhs_column]));
    // gemm computes dst = α·dst + β·lhs·rhs (dst unread when `read_dst` is false) with (column stride, row stride)
    // pairs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_column as isize,
            lhs_row as isize,
            rhs.as_ptr(),
            rhs_column as isize,
            rhs_row as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A vector of `len` floats written in parallel parts of `part` elements (the last one may be shorter):
/// `write(i, buffer, len)` gets part `i`'s uninitialised buffer and its length. Skips the zeroing pass a
/// `vec![0.0; len]` costs (a recycled heap buffer is zeroed by `calloc`), one core's memset per output.
///
/// # Safety
/// `write` must write every element of its part.
pub(super) unsafe fn par_written_vec(
    len: usize,
    part: usize,
    write: impl Fn(usize, *mut f32, usize) + Sync,
) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    let parts = values.spare_capacity_mut()[..len].par_chunks_mut(part.max(1)).enumerate();
    parts.for_each(|(i, buffer)| write(i, buffer.as_mut_ptr().cast(), buffer.len()));
    // SAFETY: the caller's `write` initialised every part, so all `len` elements.
    unsafe { values.set_len(len) };
    values
}

/// A vector of `len` floats filled in parallel chunks of `chunk` elements: `fill(range, values)` gets the chunk
/// covering `range`, zeroed just before in cache (not the whole buffer by one core first, as `vec![0.0; len]`).
pub(super) fn par_filled_vec(len: usize, chunk: usize, fill: impl Fn(Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let chunk = chunk.max(1);
    // SAFETY: each part is zeroed before `fill` sees it, so every element is written.
    unsafe {
        par_written_vec(len, chunk, |i, part, part_len| {
            std::ptr::write_bytes(part, 0, part_len);
            fill(i * chunk..i * chunk + part_len, std::slice::from_raw_parts_mut(part, part_len))
        })
    }
}

/// `activation(conv2d(x, weight, bias, stride, padding))` for `f32` tensors on the CPU backend without autodiff
/// (see [`applies`]): `x` `[N, in, H, W]`, `weight` `[out, in, kh, kw]`, symmetric zero padding `[ph, pw]`. The
/// activation runs on each image's output while it is still in cache, where Burn's relu would be one more pass.
///
/// Batches of at least as many images as there are threads convolve one image per thread; smaller ones split
/// each GEMM over the threads instead.
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: [usize; 2],
    activation: Activation,
) -> Tensor<B, 4> {
    let device = x.device();
    let [n, channels, height, width] = x.dims();
    let [out_channels, _, kh, kw] = weight.dims();
    let g = Geometry {
        channels,
        height,
        width,
        out_channels,
        kernel: [kh, kw],
        stride,
        padding,
        out_height: out_size(height, padding[0], kh, stride),
        out_width: out_size(width, padding[1], kw, stride),
    };
    let plane = g.out_height * g.out_width;
    let mut out = vec![0.0f32; n * out_channels * plane];
    if let Some(bias) = bias {
        with_values(bias, |bias| {
            for (channel_plane, b) in out.chunks_exact_mut(plane).zip(bias.iter().cycle()) {
                channel_plane.fill(*b);
            }
        });
    }
    let (image_in, image_out) = (channels * height * width, out_channels * plane);
    let threads = rayon::current_num_threads();
    with_values(weight, |weight| {
        with_values(x, |x| {
            if n >= threads && n > 1 {
                out.par_chunks_exact_mut(image_out)
                    .zip(x.par_chunks_exact(image_in))
                    .for_each(|(out, x)| g.image(x, weight, out, Parallelism::None, activation));
            } else {
                for (out, x) in out.chunks_exact_mut(image_out).zip(x.chunks_exact(image_in)) {
                    g.image(x, weight, out, Parallelism::Rayon(threads), activation);
                }
            }
        })
    });
    Tensor::from_data(TensorData::new(out, [n, out_channels, g.out_height, g.out_width]), &device)
}

/// Fewest rows of a [`linear`] output computed per task: each task packs the whole weight for its GEMM, so the
/// rows are split evenly over the cores rather than in small blocks (a DiT-B/2 qkv weight is 7 MB).
const LINEAR_MIN_ROWS_PER_TASK: usize = 64;

/// `activation(x·weight + bias)` over the last dimension of `x` (Burn's `Linear`: `x` `[…, in]`, `weight`
/// `[in, out]` in either memory order — checkpoints load it as a transposed view of PyTorch's `[out, in]` — and
/// `bias` `[out]`), for `f32` tensors on the CPU backend without autodiff (see [`applies`]).
///
/// The rows are split evenly over the cores, one GEMM per part (gemm's AVX-512 kernels where the CPU has them)
/// with the bias as its initial output, then the activation in one pass over the part: Burn's ndarray linear adds
/// the bias in a broadcast pass through ndarray's dynamic-rank iterators, which cost the built-in model's sampling
/// more than a fifth of its time. A row's result does not depend on how many rows are computed with it.
///
/// # Panics
/// If `weight`'s first dimension is not `x`'s last (a caller bug; `Linear` guarantees it).
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    activation: Activation,
) -> Tensor<B, D> {
    let device = x.device();
    let dims = x.dims();
    let k = dims[D - 1];
    let [k_weight, n] = weight.dims();
    assert_eq!(k, k_weight, "linear: input features {k} but a weight of {k_weight} rows");
    let m = dims[..D - 1].iter().product::<usize>();
    let bias = bias.map(Values::of);
    let mut out = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        with_matrix(weight, |weight, strides| {
            with_values(x, |x| {
                let rows = m.div_ceil(rayon::current_num_threads()).max(LINEAR_MIN_ROWS_PER_TASK);
                let parts = out.spare_capacity_mut()[..m * n].par_chunks_mut(rows * n);
                parts.enumerate().for_each(|(i, part)| {
                    let first = i * rows;
                    let x = &x[first * k..(first + part.len() / n) * k];
                    // Each row starts as the bias (or zero), written once into the uninitialised buffer.
                    for row in part.chunks_exact_mut(n) {
                        match &bias {
                            Some(bias) => row.iter_mut().zip(bias.iter()).for_each(|(o, &b)| {
                                o.write(b);
                            }),
                            None => row.iter_mut().for_each(|o| {
                                o.write(0.0);
                            }),
                        }
                    }
                    // SAFETY: every element of `part` was written above.
                    let part = unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                    if k > 0 {
                        // SAFETY: `part` holds whole rows of `n`, `x` the same rows of `k`, and `weight` is
                        // `[k, n]` with the strides `with_matrix` reports.
                        unsafe {
                            gemm_rows(
                                part.len() / n,
                                n,
                                k,
                                part.as_mut_ptr(),
                                n,
                                (x, [k, 1]),
                                (weight, strides),
                                Parallelism::None,
                            )
                        };
                    }
                    activation.apply_in_place(part);
                })
            })
        });
    }
    // SAFETY: the tasks above wrote all `m·n` elements (none when the output is empty).
    unsafe { out.set_len(m * n) };
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    Tensor::from_data(TensorData::new(out, out_dims), &device)
}

/// adaLN's `layer_norm(x)·(1 + scale) + shift` in one pass: LayerNorm over the last dimension of `x` `[N, T, C]`
/// without affine parameters (biased variance, statistics in f64), modulated per sample by `shift` and `scale`
/// `[N, C]`, for `f32` tensors on the CPU backend without autodiff (see [`applies`]). The composed Burn expression
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
pub(super) fn layer_norm_modulate_into(
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
/// autodiff (see [`applies`]). The composed Burn expression is eight to eleven passes, most of them broadcasts.
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
    let (per_group, group_channels) = (c / groups * len, c / groups);
    let mut out = vec![0.0f32; n * c * len];
    if per_group > 0 {
        // Without a modulation, scale 0 and shift 0 leave the affine output as it is: `y·(1 + 0) + 0 = y` exactly.
        let [scale, shift] = match modulation {
            Some(pair) => pair.map(|t| {
                assert_eq!(t.dims(), [n, c], "group norm: the modulation is not [{n}, {c}]");
                t
            }),
            None => [0, 1].map(|_| Tensor::<B, 2>::zeros([n, c], &device)),
        };
        let (gamma, beta, x) = (Values::of(gamma), Values::of(beta), Values::of(x));
        let (scale, shift) = (Values::of(scale), Values::of(shift));
        let (gamma, beta, scale, shift, x) = (&*gamma, &*beta, &*scale, &*shift, &*x);
        out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(task, (out, x))| {
            let (mean, var) = mean_var(x);
            let (mean, std) = (mean as f32, (var + eps).sqrt() as f32);
            let first = (task / groups) * c + (task % groups) * group_channels;
            for (i, (out, x)) in out.chunks_exact_mut(len).zip(x.chunks_exact(len)).enumerate() {
                let channel = (task % groups) * group_channels + i;
                let (g, b) = (gamma[channel], beta[channel]);
                let (sc, sh) = (scale[first + i] + 1.0, shift[first + i]);
                for (o, &v) in out.iter_mut().zip(x) {
                    // Rounded step by step as the composed expression.
                    *o = ((v - mean) / std * g + b) * sc + sh;
                }
                activation.apply_in_place(out);
            }
        });
    }
    Tensor::from_data(TensorData::new(out, [n, c, len]), &device)
}

/// DiT's gated residual `x + gate·y` with a per-sample `gate` `[N, C]` over tokens `x`, `y` `[N, T, C]`, in one pass,
/// for `f32` tensors on the CPU backend without autodiff (see [`applies`]).
pub fn add_gated<B: Backend>(x: Tensor<B, 3>, gate: Tensor<B, 2>, y: Tensor<B, 3>) -> Tensor<B, 3> {
    let device = x.device();
    let [n, t, c] = x.dims();
    let mut out = vec![0.0f32; n * t * c];
    let (gate, x, y) = (Values::of(gate), Values::of(x), Values::of(y));
    add_gated_into(&x, &gate, &y, [t, c], &mut out);
    Tensor::from_data(TensorData::new(out, [n, t, c]), &device)
}

/// [`add_gated`] on row-major slices: `x`, `y` and `out` `[N, t, c]`, `gate` `[N, c]`.
pub(super) fn add_gated_into(x: &[f32], gate: &[f32], y: &[f32], [t, c]: [usize; 2], out: &mut [f32]) {
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

/// Multi-head self-attention `softmax(q·kᵀ/√d)·v` read straight from a fused projection `qkv` `[N, T, 3·C]`
/// (timm's layout: `[q | k | v] × heads × head_dim` along the last axis), written as `[N, T, C]` with the heads
/// side by side — the layout the output projection reads. For `f32` tensors on the CPU backend without autodiff
/// (see [`applies`]); one sample per task, its scores `[T, T]` one head at a time. The tensor route splits `qkv`
/// with a 5-D permute and joins the heads with another, both strided copies, around five passes of softmax.
///
/// # Panics
/// If the last dimension is not `3·heads·head_dim` (a caller bug).
pub fn packed_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    let device = qkv.device();
    let [n, t, width] = qkv.dims();
    let heads = AttentionHeads::new(t, width, heads);
    let c = width / 3;
    let mut out = vec![0.0f32; n * t * c];
    if t > 0 && heads.head_dim > 0 {
        with_values(qkv, |qkv| {
            out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * width)).for_each(|(out, qkv)| {
                let mut probabilities = vec![0.0f32; t * t];
                for head in 0..heads.heads {
                    let v = heads.probabilities(qkv, head, &mut probabilities);
                    let out = out[head * heads.head_dim..].as_mut_ptr();
                    // SAFETY: the head's output columns start at `head·head_dim` of rows `c` apart; `v`'s rows are
                    // `width` apart and `head_dim` wide inside the sample's `t` rows.
                    unsafe {
                        gemm_rows_set(
                            t,
                            heads.head_dim,
                            t,
                            out,
                            c,
                            (&probabilities, [t, 1]),
                            (v, [width, 1]),
                            Parallelism::None,
                        )
                    };
                }
            })
        });
    }
    Tensor::from_data(TensorData::new(out, [n, t, c]), &device)
}

/// The geometry of multi-head attention over one sample's fused projection `[t, 3·heads·head_dim]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionHeads {
    /// Tokens.
    pub t: usize,
    /// Heads.
    pub heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// The scores' factor, `head_dim^(−½)`.
    pub scale: f32,
}

impl AttentionHeads {
    /// # Panics
    /// If `width` is not `3·heads·head_dim` (a caller bug).
    pub fn new(t: usize, width: usize, heads: usize) -> Self {
        assert!(
            heads > 0 && width.is_multiple_of(3 * heads),
            "packed attention: {width} features do not split into q, k, v × {heads} heads"
        );
        let head_dim = width / (3 * heads);
        Self { t, heads, head_dim, scale: (head_dim as f64).powf(-0.5) as f32 }
    }

    /// Width of a `qkv` row.
    pub fn width(&self) -> usize {
        3 * self.heads * self.head_dim
    }

    /// The columns of `q`, `k` and `v` of `head` in one sample's `qkv` rows (each starting at its first element).
    pub fn parts<'a>(&self, qkv: &'a [f32], head: usize) -> [&'a [f32]; 3] {
        let c = self.heads * self.head_dim;
        [0, 1, 2].map(|part| &qkv[part * c + head * self.head_dim..])
    }

    /// `softmax(q·kᵀ·scale)` of `head` into `probabilities` `[t, t]`; returns the head's `v` columns.
    pub fn probabilities<'a>(&self, qkv: &'a [f32], head: usize, probabilities: &mut [f32]) -> &'a [f32] {
        let (t, width) = (self.t, self.width());
        let [q, k, v] = self.parts(qkv, head);
        // SAFETY: q and k rows are `width` apart and `head_dim` wide (≥ 1, checked by the callers) inside the
        // sample's `t` rows; `probabilities` is `[t, t]`. kᵀ: element (a, j) is k[j][a].
        unsafe {
            gemm_rows_set(
                t,
                t,
                self.head_dim,
                probabilities.as_mut_ptr(),
                t,
                (q, [width, 1]),
                (k, [1, width]),
                Parallelism::None,
            )
        };
        for row in probabilities.chunks_exact_mut(t) {
            // As Burn's softmax of the scaled scores: subtract the row's maximum, exponentiate, normalise.
            row.iter_mut().for_each(|s| *s *= self.scale);
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            super::vector_math::map_in_place(row, |s| super::vector_math::exp(s - max));
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|s| *s /= sum);
        }
        v
    }
}

/// Runs `f` on a 2-D `f32` tensor's buffer and its `[row, column]` strides when the buffer is contiguous in some
/// order with non-negative strides (a weight a checkpoint loaded as a transposed view), else on a row-major copy.
pub(super) fn with_matrix<B: Backend, R>(tensor: Tensor<B, 2>, f: impl FnOnce(&[f32], [usize; 2]) -> R) -> R {
    let columns = tensor.dims()[1];
    let primitive = tensor.into_primitive().tensor();
    if let Some(burn_ndarray::NdArrayTensor::F32(storage)) = (&primitive as &dyn Any).downcast_ref() {
        let view = storage.view();
        if let (Some(values), &[row, column]) = (view.as_slice_memory_order(), view.strides()) {
            if row >= 0 && column >= 0 {
                return f(values, [row as usize, column as usize]);
            }
        }
    }
    let tensor = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(primitive));
    with_values(tensor, |values| f(values, [columns, 1]))
}

/// Runs `f` on an `f32` tensor's values in row-major order (see [`Values`]).
pub(super) fn with_values<B: Backend, const D: usize, R>(tensor: Tensor<B, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    f(&Values::of(tensor))
}

/// An `f32` tensor's values in row-major order, dereferencing to a slice. On the CPU backend it keeps the tensor's
/// buffer itself when that is contiguous: `into_data` copies element by element through ndarray's iterator whenever
/// the buffer is shared (a weight the module still holds, an input another branch still reads), which cost more
/// than the GEMM. Other layouts and backends are copied once.
pub(super) struct Values<B: Backend>(Result<B::FloatTensorPrimitive, Vec<f32>>);

impl<B: Backend> Values<B> {
    pub(super) fn of<const D: usize>(tensor: Tensor<B, D>) -> Self {
        match Self::of_primitive(tensor.into_primitive().tensor()) {
            Ok(values) => values,
            Err(primitive) => {
                let data = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(primitive)).into_data();
                Self(Err(data
                    .into_vec::<f32>()
                    .unwrap_or_else(|e| unreachable!("CPU kernels take f32 data only: {e:?}"))))
            }
        }
    }

    /// The values of a primitive with the CPU backend's `f32` storage (its buffer when contiguous, else a copy);
    /// any other primitive back.
    pub(super) fn of_primitive(primitive: B::FloatTensorPrimitive) -> Result<Self, B::FloatTensorPrimitive> {
        if let Some(burn_ndarray::NdArrayTensor::F32(storage)) = (&primitive as &dyn Any).downcast_ref() {
            let view = storage.view();
            if !view.is_standard_layout() {
                return Ok(Self(Err(view.iter().copied().collect())));
            }
            return Ok(Self(Ok(primitive)));
        }
        Err(primitive)
    }
}

impl<B: Backend> std::ops::Deref for Values<B> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Ok(primitive) => match (primitive as &dyn Any).downcast_ref() {
                Some(burn_ndarray::NdArrayTensor::F32(storage)) => {
                    storage.view().to_slice().expect("kept only in standard layout")
                }
                _ => unreachable!("kept only for ndarray f32 storage"),
            },
            Err(copy) => copy,
        }
    }
}

/// What a pooling window computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The maximum (padding never wins).
    Max,
    /// The mean over the real (unpadded) pixels under the window (`count_include_pad=False`).
    MeanExcludingPadding,
}

/// `kernel×kernel` pooling of `x` `[N, C, H, W]` with `stride` and symmetric `padding`, one plane per task, for
/// `f32` tensors on the CPU backend without autodiff (see [`applies`]). Burn 0.21's ndarray pools index element by
/// element through ndarray's dynamic-rank indexing.
pub fn pool2d<B: Backend>(x: Tensor<B, 4>, pool: Pool, kernel: usize, stride: usize, padding: usize) -> Tensor<B, 4> {
    let device = x.device();
    let [n, c, h, w] = x.dims();
    let (ho, wo) = (out_size(h, padding, kernel, stride), out_size(w, padding, kernel, stride));
    // The input rows (or columns) under output row (column) `o`: the window clipped to the image.
    let span = |o: usize, size: usize| {
        let start = (o * stride).saturating_sub(padding);
        (start, (o * stride + kernel).saturating_sub(padding).min(size))
    };
    let mut out = vec![0.0f32; n * c * ho * wo];
    with_values(x, |x| {
        out.par_chunks_exact_mut(ho * wo).zip(x.par_chunks_exact(h * w)).for_each(|(out, plane)| {
            for (oy, out_row) in out.chunks_exact_mut(wo).enumerate() {
                let (y0, y1) = span(oy, h);
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let (x0, x1) = span(ox, w);
                    let rows = plane[y0 * w..y1 * w].chunks_exact(w).map(|row| &row[x0..x1]);
                    *o = match pool {
                        Pool::Max => rows.flatten().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
                        Pool::MeanExcludingPadding => {
                            rows.flatten().sum::<f32>() / ((y1 - y0) * (x1 - x0)).max(1) as f32
                        }
                    };
                }
            }
        })
    });
    Tensor::from_data(TensorData::new(out, [n, c, ho, wo]), &device)
}

/// `f` on consecutive parts of `0..n`, at most `threads` of them (as equal as possible), each on its own scoped
/// thread, results in order; one call on the calling thread when `threads` ≤ 1 or `n` ≤ 1. For passes whose
/// element-wise work Burn's ndarray backend runs on one core (it threads only its matrix products). A panic in a
/// part is re-raised as it was.
pub fn in_parts<T: Send>(n: usize, threads: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    if threads <= 1 || n <= 1 {
        return vec![f(0..n)];
    }
    let part = n.div_ceil(threads.min(n));
    std::thread::scope(|scope| {
        let f = &f;
        let parts: Vec<_> =
            (0..n).step_by(part).map(|start| scope.spawn(move || f(start..(start + part).min(n)))).collect();
        parts.into_iter().map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}
