//! 2-D convolution as im2col into a bounded column buffer and one GEMM per block of output rows.

use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{gemm_rows, gemm_rows_set, with_values};
use crate::nn::{out_size, Activation};

/// Upper bound on one column block (`in·kh·kw` × a few output rows), in `f32`s: 8 MiB, so a block stays in the
/// last-level cache on most CPUs and memory does not grow with the image (a 256² decoder layer would need 300 MB).
const BLOCK_FLOATS: usize = 1 << 21;

/// The shape of one convolution: `[in, H, W]` images, an `[out, in, kh, kw]` weight, a square stride and symmetric
/// zero padding `[ph, pw]`.
#[derive(Clone, Copy, Debug)]
pub(in crate::nn) struct Geometry {
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
    /// The geometry of convolving `[N, in, H, W]` images with an `[out, in, kh, kw]` weight.
    pub(in crate::nn) fn new(input: [usize; 4], weight: [usize; 4], stride: usize, padding: [usize; 2]) -> Self {
        let [_, channels, height, width] = input;
        let [out_channels, _, kh, kw] = weight;
        Self {
            channels,
            height,
            width,
            out_channels,
            kernel: [kh, kw],
            stride,
            padding,
            out_height: out_size(height, padding[0], kh, stride),
            out_width: out_size(width, padding[1], kw, stride),
        }
    }

    /// Values of one input image, `in·H·W`.
    pub(in crate::nn) fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Values of one output image, `out·Ho·Wo`.
    pub(in crate::nn) fn out_image_len(&self) -> usize {
        self.out_channels * self.out_height * self.out_width
    }

    /// Values of one output plane, `Ho·Wo`.
    pub(in crate::nn) fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }

    /// The input's shape for a batch of `n` images.
    pub(in crate::nn) fn input_dims(&self, n: usize) -> [usize; 4] {
        [n, self.channels, self.height, self.width]
    }

    /// The weight's shape, `[out, in, kh, kw]`.
    pub(in crate::nn) fn weight_dims(&self) -> [usize; 4] {
        [self.out_channels, self.channels, self.kernel[0], self.kernel[1]]
    }

    /// Values of the weight.
    pub(in crate::nn) fn weight_len(&self) -> usize {
        self.out_channels * self.depth()
    }

    /// Rows of the weight matrix's inner dimension (`in·kh·kw`).
    pub(in crate::nn) fn depth(&self) -> usize {
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
        let rows_per_block = self.rows_per_block();
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

    /// Output rows per column block: as many as fit [`BLOCK_FLOATS`], at least one.
    fn rows_per_block(&self) -> usize {
        (BLOCK_FLOATS / (self.depth() * self.out_width).max(1)).clamp(1, self.out_height.max(1))
    }

    /// For a stride-1 convolution whose output rows are as wide as its input's (`kw = 2·pw + 1`, "same" padding),
    /// column row `(c, ky, kx)` of the block from output row `first_row` reads the input plane at one flat offset:
    /// entry `j` is pixel `j + offset`, `offset = (first_row + ky − ph)·W + kx − pw`, wherever the pixel's row and
    /// column lie inside the image. `None` for other convolutions.
    fn flat_shift(&self, first_row: usize, rows: usize, ky: usize, kx: usize) -> Option<FlatShift> {
        let [ph, pw] = self.padding;
        let w = self.width;
        if self.stride != 1 || self.out_width != w || w == 0 {
            return None;
        }
        let top = (first_row + ky) as isize - ph as isize;
        let offset = top * w as isize + kx as isize - pw as isize;
        // Output rows whose input row `top + oy` lies inside the image.
        let first = (-top).clamp(0, rows as isize) as usize;
        let last = (self.height as isize - top).clamp(first as isize, rows as isize) as usize;
        // Within them, the entries whose flat input index lies inside the plane (the others are border columns).
        let plane = (self.height * w) as isize;
        let start = (first * w).max((-offset).max(0) as usize).min(last * w);
        let end = (last * w).min((plane - offset).max(0) as usize).max(start);
        let lo = pw.saturating_sub(kx).min(w);
        let hi = (w + pw).saturating_sub(kx).clamp(lo, w);
        Some(FlatShift { offset, entries: start..end, rows: first..last, width: w, inside: lo..hi })
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
            if let Some(shift) = self.flat_shift(first_row, rows, ky, kx) {
                // One copy of the whole row block, then the border columns zeroed.
                let (start, end) = (shift.entries.start, shift.entries.end);
                column_row[..start].fill(0.0);
                column_row[end..].fill(0.0);
                if start < end {
                    let from = (start as isize + shift.offset) as usize;
                    column_row[start..end].copy_from_slice(&plane[from..from + (end - start)]);
                }
                shift.for_each_border(column_row, |border| border.fill(0.0));
                continue;
            }
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

    /// The backward pass of one image's convolution for the output gradient `dy` `[out, Ho, Wo]`: overwrites `dx`
    /// `[in, H, W]` with `col2im(Wᵀ·dy)` and adds `dy·columnsᵀ` to `dw` `[out, in·kh·kw]`, one block of output rows
    /// at a time (the columns rebuilt from `x`, as the forward pass built them). `scratch` holds the blocks between
    /// calls.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::nn) fn backward_image(
        &self,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        mut dw: Option<&mut [f32]>,
        parallelism: Parallelism,
        scratch: &mut Vec<f32>,
    ) {
        let (depth, plane, out) = (self.depth(), self.out_height * self.out_width, self.out_channels);
        if let Some(dx) = dx.as_deref_mut() {
            dx.fill(0.0);
        }
        if depth == 0 || plane == 0 || out == 0 {
            return;
        }
        // A pointwise convolution's column matrix is the image itself, and its gradient is dx: one block, no copies.
        let pointwise = self.is_pointwise();
        let rows_per_block = if pointwise { self.out_height } else { self.rows_per_block() };
        let block = if pointwise { 0 } else { depth * rows_per_block * self.out_width };
        scratch.resize(2 * block, 0.0);
        let (columns, dcolumns) = scratch.split_at_mut(block);
        for first_row in (0..self.out_height).step_by(rows_per_block) {
            let rows = rows_per_block.min(self.out_height - first_row);
            let width = rows * self.out_width;
            // The block of dy: [out, width] with row stride `plane`, from row `first_row` of each plane.
            let dy = &dy[first_row * self.out_width..];
            if let Some(dw) = dw.as_deref_mut() {
                let columns: &[f32] = if pointwise {
                    x
                } else {
                    self.fill_columns(x, first_row, rows, &mut columns[..depth * width]);
                    &columns[..depth * width]
                };
                // SAFETY: dw is [out, depth]; columnsᵀ is the [depth, width] block read with strides [1, width].
                unsafe {
                    gemm_rows(
                        out,
                        depth,
                        width,
                        dw.as_mut_ptr(),
                        depth,
                        (dy, [plane, 1]),
                        (columns, [1, width]),
                        parallelism,
                    )
                };
            }
            if let Some(dx) = dx.as_deref_mut() {
                let target = if pointwise { &mut *dx } else { &mut dcolumns[..depth * width] };
                // SAFETY: the target is [depth, width]; Wᵀ is the [out, depth] weight read with strides [1, depth];
                // out ≥ 1.
                unsafe {
                    gemm_rows_set(
                        depth,
                        width,
                        out,
                        target.as_mut_ptr(),
                        width,
                        (weight, [1, depth]),
                        (dy, [plane, 1]),
                        parallelism,
                    )
                };
                if !pointwise {
                    self.add_columns(&mut dcolumns[..depth * width], first_row, rows, dx);
                }
            }
        }
    }

    /// The adjoint of [`Geometry::fill_columns`]: adds each entry of the column block for output rows
    /// `first_row..first_row + rows` to the input pixel it was read from (entries over the padding are dropped).
    /// `columns` is scratch: its entries over the padding may be zeroed.
    fn add_columns(&self, columns: &mut [f32], first_row: usize, rows: usize, dx: &mut [f32]) {
        let [kh, kw] = self.kernel;
        let [ph, pw] = self.padding;
        let (s, wo) = (self.stride, self.out_width);
        let width = rows * wo;
        for (r, column_row) in columns.chunks_exact_mut(width).enumerate() {
            let (c, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &mut dx[c * self.height * self.width..(c + 1) * self.height * self.width];
            if let Some(shift) = self.flat_shift(first_row, rows, ky, kx) {
                // The entries over the left and right padding would wrap onto the neighbouring rows' pixels: zeroed,
                // then the whole row block added in one contiguous pass.
                shift.for_each_border(column_row, |border| border.fill(0.0));
                let (start, end) = (shift.entries.start, shift.entries.end);
                if start < end {
                    let from = (start as isize + shift.offset) as usize;
                    for (d, &v) in plane[from..from + (end - start)].iter_mut().zip(&column_row[start..end]) {
                        *d += v;
                    }
                }
                continue;
            }
            let column_row = &*column_row;
            let lo = pw.saturating_sub(kx).div_ceil(s).min(wo);
            let hi = (self.width + pw).saturating_sub(kx).div_ceil(s).clamp(lo, wo);
            for (oy, in_row) in column_row.chunks_exact(wo).enumerate() {
                let iy = ((first_row + oy) * s + ky) as isize - ph as isize;
                if iy < 0 || iy >= self.height as isize {
                    continue;
                }
                let input_row = &mut plane[iy as usize * self.width..(iy as usize + 1) * self.width];
                let start = lo * s + kx - pw;
                for (i, &v) in input_row[start..].iter_mut().step_by(s).zip(&in_row[lo..hi]) {
                    *i += v;
                }
            }
        }
    }
}

/// A column row of a "same" stride-1 convolution as one flat shift of the input plane ([`Geometry::flat_shift`]).
struct FlatShift {
    /// Input index minus column-row index.
    offset: isize,
    /// The entries read from the plane (the rest of the row block is padding).
    entries: Range<usize>,
    /// Output rows inside the image.
    rows: Range<usize>,
    /// Output (= input) row width.
    width: usize,
    /// The columns of a row whose input column lies inside the image.
    inside: Range<usize>,
}

impl FlatShift {
    /// `f` on each inside row's entries over the left and the right padding.
    fn for_each_border(&self, column_row: &mut [f32], mut f: impl FnMut(&mut [f32])) {
        for oy in self.rows.clone() {
            let row = &mut column_row[oy * self.width..(oy + 1) * self.width];
            f(&mut row[..self.inside.start]);
            f(&mut row[self.inside.end..]);
        }
    }
}

/// `activation(conv2d(x, weight, bias, stride, padding))` for `f32` tensors on the CPU backend without autodiff
/// (see [`super::applies`]): `x` `[N, in, H, W]`, `weight` `[out, in, kh, kw]`, symmetric zero padding `[ph, pw]`. The
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
    let [n, ..] = x.dims();
    let g = Geometry::new(x.dims(), weight.dims(), stride, padding);
    let plane = g.out_height * g.out_width;
    let (image_in, image_out) = (g.image_len(), g.out_image_len());
    let mut out = vec![0.0f32; n * image_out];
    if let Some(bias) = bias {
        with_values(bias, |bias| {
            for (channel_plane, b) in out.chunks_exact_mut(plane).zip(bias.iter().cycle()) {
                channel_plane.fill(*b);
            }
        });
    }
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
    Tensor::from_data(TensorData::new(out, [n, g.out_channels, g.out_height, g.out_width]), &device)
}
