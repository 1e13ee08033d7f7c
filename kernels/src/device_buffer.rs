//! The device memory behind a Burn tensor, for libraries that work on raw device pointers (NCCL's collectives).
//!
//! Only for the CUDA runtime: the tensor is made contiguous, the device's queue is drained so that every kernel
//! writing it has finished, and the caller gets its pointer, length and element type for the duration of a closure
//! that may read and write it in place (and must have finished with it, its own stream synchronised, on return).

use burn::tensor::{backend::Backend, DType, Tensor};

/// A contiguous device buffer lent to a closure.
#[derive(Debug, Clone, Copy)]
pub struct CudaBuffer {
    /// The device address of the first element.
    pub ptr: u64,
    /// Elements in the buffer.
    pub len: usize,
    /// Their type.
    pub dtype: DType,
}

/// Lends the device memory of `tensor` to `f`, which may modify it in place, and returns the tensor with whatever
/// `f` wrote, with `f`'s result; `None` when `B`'s tensors are not CUDA tensors of lfm's CUDA backend.
#[cfg(feature = "cuda")]
pub fn with_cuda_buffer<B: Backend, T>(
    tensor: Tensor<B, 1>,
    f: impl FnOnce(CudaBuffer) -> T,
) -> Option<(Tensor<B, 1>, T)> {
    use crate::dispatch::{from_cube, is_runtime, to_cube, CudaRuntime};
    if !is_runtime::<B, CudaRuntime>() {
        return None;
    }
    let device = tensor.device();
    let cube = burn_cubecl::kernel::into_contiguous(to_cube::<B, CudaRuntime, 1>(tensor));
    // Every kernel that writes the buffer runs on CubeCL's stream: wait for them before another stream touches it.
    B::sync(&device).expect("the CUDA device synchronises");
    let len = cube.meta.shape().num_elements();
    let resource = cube.client.get_resource(cube.handle.clone()).expect("a live buffer has a resource");
    let result = f(CudaBuffer { ptr: resource.resource().ptr, len, dtype: cube.dtype });
    drop(resource);
    Some((from_cube::<B, CudaRuntime, 1>(cube), result))
}

/// Without the `cuda` feature no backend has CUDA buffers.
#[cfg(not(feature = "cuda"))]
pub fn with_cuda_buffer<B: Backend, T>(
    _tensor: Tensor<B, 1>,
    _f: impl FnOnce(CudaBuffer) -> T,
) -> Option<(Tensor<B, 1>, T)> {
    None
}
