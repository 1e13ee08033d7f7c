//! `lfm-kernels`: the numerical pieces shared by lfm's generic solver code and its CubeCL kernels.
//!
//! Kernels are written once in CubeCL (WGSL/SPIR-V/MSL through wgpu, CUDA C++ through NVRTC). Each public entry
//! point takes any Burn backend: backends whose tensors are CubeCL tensors run the kernel, the others (ndarray,
//! autodiff without a custom backward) run a plain-Burn fallback that is also the kernel's test oracle.
//! - [`attention`]: flash attention (online softmax, O(tokens) memory) with a recomputing backward pass;
//! - [`matmul`]: matrix products that stay in f32 on CUDA (no TF32 tensor cores) unless TF32 is allowed;
//! - [`rk`]: fused Runge–Kutta linear combinations and torchdiffeq's error ratio;
//! - [`tableau`]: the Dormand–Prince tableau, the one copy the generic solver and the kernels read.

#![warn(missing_docs)]

pub mod attention;
pub mod device_buffer;
mod dispatch;
pub mod matmul;
pub mod rk;
pub mod tableau;

pub use dispatch::{
    capabilities, cuda_kernels_enabled, has_kernels, kernels_enabled, memory_reserved, set_kernels_enabled,
    BackendKind, Capabilities, WgpuCube, WgpuRuntime, CUDA_KERNELS_VAR,
};
#[cfg(feature = "cuda")]
pub use dispatch::{CudaCube, CudaRuntime};
