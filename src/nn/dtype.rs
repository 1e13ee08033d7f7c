//! Tensor formats: which are 16-bit, and casts that happen only where the format actually changes.

use burn::tensor::{backend::Backend, DType, Tensor};

/// Whether `dtype` is one of the 16-bit float formats (f16, bf16).
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// The format in which statistics of `dtype` values (means, variances) are summed: f32 for 16-bit formats, whose
/// sums lose the variance, otherwise `dtype` itself.
pub fn accumulation_dtype(dtype: DType) -> DType {
    if is_half(dtype) {
        DType::F32
    } else {
        dtype
    }
}

/// `tensor` in `dtype`, cast only when its dtype differs: a same-dtype cast is not free (backends may copy, and
/// under autodiff it adds a node), so the f32 path runs exactly the reference's operations.
pub fn to_dtype<B: Backend, const D: usize>(tensor: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if tensor.dtype() == dtype {
        tensor
    } else {
        tensor.cast(dtype)
    }
}
