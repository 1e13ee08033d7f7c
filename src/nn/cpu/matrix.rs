//! The `gemm` crate's matrix product on strided `f32` slices, accumulating into its output or overwriting it.

use gemm::Parallelism;

/// `out[m×n] += lhs[m×k] · rhs[k×n]` for `lhs` and `rhs` given with their strides `[row, column]` (a row-major
/// `[r, c]` matrix has `[c, 1]`, its transposed view `[1, c]`), with `out` row-major and rows `out_stride` apart.
///
/// # Safety
/// `out` must be valid for reads and writes at `i·out_stride + j` for all `i < m`, `j < n`; `lhs` must hold every
/// `i·row + a·column` for `i < m`, `a < k`, and `rhs` every `a·row + j·column` for `a < k`, `j < n`.
#[allow(clippy::too_many_arguments)]
pub(in crate::nn) unsafe fn gemm_rows(
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
pub(in crate::nn) unsafe fn gemm_rows_set(
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
