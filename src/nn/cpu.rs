//! Inference kernels for the CPU backend on raw `f32` slices: a 2-D convolution (im2col into a bounded buffer and
//! one GEMM per block of output rows) and 2-D max / average pooling, each parallel over the cores.
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
        if activation == Activation::Relu {
            // `<`, not `max`: a NaN stays NaN, as with Burn's relu.
            out.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
        }
    }

    fn convolve(&self, x: &[f32], weight: &[f32], out: &mut [f32], parallelism: Parallelism) {
        let (depth, plane) = (self.depth(), self.out_height * self.out_width);
        if self.is_pointwise() {
            // SAFETY: `weight` is [out, depth], `x` is [depth, plane], `out` is [out, plane], all row-major.
            unsafe {
                gemm_rows(self.out_channels, plane, depth, out.as_mut_ptr(), plane, weight, x, plane, parallelism)
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
            unsafe { gemm_rows(self.out_channels, width, depth, out, plane, weight, &columns, width, parallelism) };
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

/// `out[m×n] += lhs[m×k] · rhs[k×n]` for row-major `lhs` (row stride `k`) and `rhs` (row stride `rhs_stride`), with
/// `out` rows `out_stride` apart.
///
/// # Safety
/// `out` must be valid for writes at `i·out_stride + j` for all `i < m`, `j < n`; `lhs` must hold `m·k` values and
/// `rhs` `(k−1)·rhs_stride + n`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_stride: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_stride: usize,
    parallelism: Parallelism,
) {
    debug_assert!(lhs.len() >= m * k && (k == 0 || rhs.len() >= (k - 1) * rhs_stride + n));
    // gemm computes dst = α·dst + β·lhs·rhs with (column stride, row stride) pairs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
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

/// Runs `f` on an `f32` tensor's values in row-major order. On the CPU backend it borrows the tensor's buffer when
/// that is contiguous: `into_data` copies element by element through ndarray's iterator whenever the buffer is
/// shared (a weight the module still holds, an input another branch still reads), which cost more than the GEMM.
fn with_values<B: Backend, const D: usize, R>(tensor: Tensor<B, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    let primitive = tensor.into_primitive().tensor();
    if let Some(burn_ndarray::NdArrayTensor::F32(storage)) = (&primitive as &dyn Any).downcast_ref() {
        let view = storage.view();
        if let Some(values) = view.as_slice() {
            return f(values);
        }
        return f(view.as_standard_layout().as_slice().expect("a standard-layout copy"));
    }
    let data = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(primitive)).into_data();
    f(&data.into_vec::<f32>().unwrap_or_else(|e| unreachable!("CPU kernels take f32 data only: {e:?}")))
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
