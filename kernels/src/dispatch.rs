//! Which backends run lfm's CubeCL kernels, decided at run time from the backend's tensor type.
//!
//! Burn 0.21 has no backend-extension macro, and a `FusedOps` bound on every model and solver signature would
//! leak into all of lfm's generic code. Instead, the public functions of this crate take any `Backend` and check
//! whether its float tensors are CubeCL tensors of a runtime compiled in here (wgpu always, CUDA with the `cuda`
//! feature). Burn's `Backend` is `'static`, so the check is an exact `TypeId` comparison and the conversion a
//! checked downcast: no unsafe code, and any other backend (ndarray, fusion, autodiff) takes the plain-Burn path.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};

/// The wgpu runtime (WGSL, or SPIR-V/MSL with lfm's `vulkan`/`metal` features).
pub type WgpuRuntime = burn::backend::wgpu::WgpuRuntime;

/// CubeCL's CUDA runtime.
#[cfg(feature = "cuda")]
pub type CudaRuntime = cubecl::cuda::CudaRuntime;

/// lfm's wgpu backend type (CubeCL without fusion; f32, i32 indices, u32 booleans).
pub type WgpuCube = burn_cubecl::CubeBackend<WgpuRuntime, f32, i32, u32>;

/// lfm's CUDA backend type (CubeCL without fusion; f32, i32 indices, u8 booleans).
#[cfg(feature = "cuda")]
pub type CudaCube = burn_cubecl::CubeBackend<CudaRuntime, f32, i32, u8>;

/// The backend families lfm tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's ndarray CPU backend.
    NdArray,
    /// CubeCL's wgpu runtime ([`WgpuCube`]).
    Wgpu,
    /// CubeCL's CUDA runtime (`CudaCube`, with the `cuda` feature).
    Cuda,
    /// Anything else (fusion, other runtimes): Burn's own ops throughout.
    Other,
}

/// What a backend type is, decided once, here, from the type alone (exact `TypeId` comparisons: no name matching,
/// no run-time probing): its family, and whether it is Burn's `Autodiff` over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The family.
    pub kind: BackendKind,
    /// Whether `B` is `Autodiff` over the family's backend.
    pub autodiff: bool,
}

/// The [`Capabilities`] of backend `B`.
pub fn capabilities<B: Backend>() -> Capabilities {
    use burn::backend::ndarray::{NdArray, NdArrayTensor};
    use burn::backend::Autodiff;
    fn primitive_of<X: Backend>() -> TypeId {
        TypeId::of::<X::FloatTensorPrimitive>()
    }
    let (primitive, backend) = (primitive_of::<B>(), TypeId::of::<B>());
    let found = |kind, autodiff| Capabilities { kind, autodiff };
    // Every ndarray element type shares one tensor type; under autodiff, lfm's f32 and the tests' f64.
    if primitive == TypeId::of::<NdArrayTensor>() {
        return found(BackendKind::NdArray, false);
    }
    if primitive == primitive_of::<Autodiff<NdArray<f32>>>() || primitive == primitive_of::<Autodiff<NdArray<f64>>>() {
        return found(BackendKind::NdArray, true);
    }
    if is_runtime::<B, WgpuRuntime>() {
        return found(BackendKind::Wgpu, false);
    }
    if backend == TypeId::of::<Autodiff<WgpuCube>>() {
        return found(BackendKind::Wgpu, true);
    }
    #[cfg(feature = "cuda")]
    if is_runtime::<B, CudaRuntime>() {
        return found(BackendKind::Cuda, false);
    }
    #[cfg(feature = "cuda")]
    if backend == TypeId::of::<Autodiff<CudaCube>>() {
        return found(BackendKind::Cuda, true);
    }
    found(BackendKind::Other, false)
}

/// Whether `B`'s float tensors are `CubeTensor<R>`.
pub(crate) fn is_runtime<B: Backend, R: CubeRuntime>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<CubeTensor<R>>()
}

/// The variable that switches lfm's kernels on for the CUDA backend ([`cuda_kernels_enabled`]).
pub const CUDA_KERNELS_VAR: &str = "LFM_CUDA_KERNELS";

/// Whether lfm's CubeCL kernels run on the CUDA backend: only when `LFM_CUDA_KERNELS=1` (read once per process).
///
/// Off by default because the first run on a real NVIDIA GPU (an H200, 2026-11-30) did not confirm them: the
/// linear-combination kernel returned wrong elements on a 26,418-element tensor (the one test shape that takes
/// 2-wide vectors), and dopri5 on CUDA took 44 evaluations where cpu and wgpu take 26. Until a GPU run of
/// `tests/all/cuda.rs` with the variable set passes, CUDA takes the plain-Burn path (the kernels' own oracle),
/// which is slower but cannot be wrong in the way an unverified kernel can. wgpu is unaffected: its kernels are
/// tested on every CI run (lavapipe) and matched on the H200's Vulkan driver.
pub fn cuda_kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(CUDA_KERNELS_VAR).is_ok_and(|v| v == "1"))
}

static KERNELS_ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches this crate's kernels (attention, the RK arithmetic) on or off for the whole process: the one setting
/// behind `lfm sample --no-fused-kernels`. Off, every backend takes the plain-Burn expressions (the kernels' own
/// oracle). On by default.
pub fn set_kernels_enabled(enabled: bool) {
    KERNELS_ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether this crate's kernels are switched on ([`set_kernels_enabled`]).
pub fn kernels_enabled() -> bool {
    KERNELS_ENABLED.load(Ordering::Relaxed)
}

/// Whether this crate runs its CubeCL kernels for backend `B`: when they are switched on ([`kernels_enabled`]), on
/// wgpu always, on CUDA when [`cuda_kernels_enabled`].
pub fn has_kernels<B: Backend>() -> bool {
    if !kernels_enabled() {
        return false;
    }
    #[cfg(feature = "cuda")]
    if is_runtime::<B, CudaRuntime>() {
        return cuda_kernels_enabled();
    }
    is_runtime::<B, WgpuRuntime>()
}

/// `value` as type `U`, which the caller has checked by `TypeId` to be `T` (a backend's primitive seen through a
/// generic parameter).
pub(crate) fn downcast<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().expect("types checked by TypeId")
}

/// The CubeCL tensor behind a Burn tensor. The caller has checked [`is_runtime`].
pub(crate) fn to_cube<B: Backend, R: CubeRuntime, const D: usize>(tensor: Tensor<B, D>) -> CubeTensor<R> {
    let primitive: Box<dyn Any> = Box::new(tensor.into_primitive().tensor());
    *primitive.downcast::<CubeTensor<R>>().expect("checked by is_runtime")
}

/// A Burn tensor around a CubeCL tensor. The caller has checked [`is_runtime`].
pub(crate) fn from_cube<B: Backend, R: CubeRuntime, const D: usize>(tensor: CubeTensor<R>) -> Tensor<B, D> {
    let primitive: Box<dyn Any> = Box::new(tensor);
    let primitive = *primitive.downcast::<B::FloatTensorPrimitive>().expect("checked by is_runtime");
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// Runs `$body` with `$R` bound to the CubeCL runtime of backend `$B` when this crate runs its kernels there
/// ([`has_kernels`]: switched on, and the runtime's); evaluates to `None` otherwise.
macro_rules! with_runtime {
    ($B:ty, |$R:ident| $body:expr) => {{
        #[allow(unused_mut, unused_assignments)]
        let mut result = None;
        let enabled = $crate::dispatch::kernels_enabled();
        #[cfg(feature = "cuda")]
        if enabled
            && $crate::dispatch::is_runtime::<$B, $crate::dispatch::CudaRuntime>()
            && $crate::dispatch::cuda_kernels_enabled()
        {
            type $R = $crate::dispatch::CudaRuntime;
            result = Some($body);
        }
        if enabled && result.is_none() && $crate::dispatch::is_runtime::<$B, $crate::dispatch::WgpuRuntime>() {
            type $R = $crate::dispatch::WgpuRuntime;
            result = Some($body);
        }
        result
    }};
}
pub(crate) use with_runtime;

/// Bytes the device's memory pools hold (in use or cached), for backends with CubeCL kernels; `None` elsewhere.
/// After `Backend::memory_cleanup`, the growth of this figure over an operation is the operation's peak
/// working memory (pools keep their pages until the next cleanup).
pub fn memory_reserved<B: Backend>(device: &B::Device) -> Option<u64> {
    fn reserved<R: CubeRuntime>(device: &dyn Any) -> Option<u64> {
        let device = device.downcast_ref::<<R as cubecl::Runtime>::Device>().expect("checked by is_runtime");
        <R as cubecl::Runtime>::client(device).memory_usage().ok().map(|usage| usage.bytes_reserved)
    }
    #[cfg(feature = "cuda")]
    if is_runtime::<B, CudaRuntime>() {
        return reserved::<CudaRuntime>(device);
    }
    if is_runtime::<B, WgpuRuntime>() {
        return reserved::<WgpuRuntime>(device);
    }
    None
}
