//! Matrix products in full f32 on CUDA (TF32 as an explicit opt-in), and with one small kernel on software adapters.
//!
//! Burn 0.21 autotunes every CubeCL matmul over a set that includes tensor-core kernels, and cubek-matmul runs
//! those in TF32 whenever both inputs are f32 (`adjust_dtypes`: 10-bit mantissas, about 1e-3 relative error), with
//! no switch to turn that off. On an NVIDIA GPU this made f32 results differ from the CPU's by more than the tests'
//! 1e-4 and changed dopri5's step sizes (44 evaluations where the CPU takes 26). [`matmul`] is the product lfm's
//! layers call: on CUDA with f32 inputs it autotunes over cubek's kernels that compute in f32 — the unit-tiled,
//! vector-matrix and naive kernels, the same candidates as Burn's set minus the tensor-core ones — unless TF32 is
//! allowed ([`set_tf32`], `lfm --tf32`, or `LFM_TF32=1`), in which case Burn's own matmul runs. Under `Autodiff`
//! both gradients are computed the same way.
//!
//! On a software wgpu adapter (lavapipe, SwiftShader, WARP: see [`set_software_adapter`]) every product, in any float
//! dtype, runs cubek's naive kernel (~270 lines of WGSL), without autotuning. There Burn's autotune times noise, and
//! for every layout and dtype it compiles cubek's unit-tiled candidates (1,500 lines at the smallest tile size, 9,000
//! at the largest), which cost lavapipe about 4 s each in every process even with Mesa's shader cache warm.
//! Everywhere else lfm's products are Burn's matmul.

use std::any::TypeId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    NodeId,
};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, ops::FloatTensor, DType, Tensor, TensorPrimitive};
use burn_cubecl::{kernel::matmul::init_matmul_output, tensor::CubeTensor, CubeRuntime, CubeTuneId};
use cubecl::tune::{local_tuner, LocalTuner, Tunable, TunableSet, TuneGroup};
use cubek::matmul::{
    definition::{MatmulElems, MatmulGlobalElems, MatmulKind},
    launch::{MatmulAutotuneKey, Strategy},
    routines::{
        double_unit::DoubleUnitSelectionArgs, simple_unit::SimpleUnitSelectionArgs, BlueprintStrategy,
        TileSizeSelection,
    },
};
use cubek::std::InputBinding;

use crate::dispatch::{downcast, from_cube, is_runtime, to_cube};

/// The variable that allows TF32 from the start of a process (`1`), as `--tf32` does.
pub const TF32_VAR: &str = "LFM_TF32";

fn tf32_flag() -> &'static AtomicBool {
    static FLAG: OnceLock<AtomicBool> = OnceLock::new();
    FLAG.get_or_init(|| AtomicBool::new(std::env::var(TF32_VAR).is_ok_and(|v| v == "1")))
}

/// Allows (`true`) or forbids (`false`, the default) TF32 tensor-core matmuls for f32 tensors on CUDA, for the whole
/// process. TF32 is faster on GPUs that have it and about 1e-3 relative less accurate.
pub fn set_tf32(allowed: bool) {
    tf32_flag().store(allowed, Ordering::Relaxed);
}

/// Whether f32 matmuls on CUDA may use TF32 (see [`set_tf32`]).
pub fn tf32_allowed() -> bool {
    tf32_flag().load(Ordering::Relaxed)
}

fn software_flag() -> &'static AtomicBool {
    static FLAG: AtomicBool = AtomicBool::new(false);
    &FLAG
}

/// Tells lfm's products that the process's wgpu device is a software adapter (`true`): from then on [`matmul`] on
/// wgpu runs one small fixed kernel instead of Burn's autotuned matmul (see the module documentation). lfm's backend
/// selection calls it when wgpu has no hardware adapter; it changes which kernel computes a product, not its value
/// beyond rounding.
pub fn set_software_adapter(software: bool) {
    software_flag().store(software, Ordering::Relaxed);
}

/// Whether [`set_software_adapter`] declared the wgpu device a software adapter.
pub fn software_adapter() -> bool {
    software_flag().load(Ordering::Relaxed)
}

/// Whether [`matmul`] takes the full-f32 route for backend `B` (CUDA, directly or under `Autodiff`, with TF32 not
/// allowed).
pub fn full_f32_applies<B: Backend>() -> bool {
    is_cuda_backend::<B>() && !tf32_allowed()
}

/// Whether [`matmul`] runs lfm's own CubeCL route for backend `B`: CUDA in full f32 ([`full_f32_applies`]), or wgpu
/// (directly or under `Autodiff`) on a software adapter ([`set_software_adapter`]).
pub fn own_route_applies<B: Backend>() -> bool {
    full_f32_applies::<B>() || (software_adapter() && crate::capabilities::<B>().kind == crate::BackendKind::Wgpu)
}

/// `lhs · rhs` over the last two dimensions (batch dimensions broadcast as in Burn): in full f32 on CUDA unless TF32
/// is allowed, with one small kernel on a software wgpu adapter, Burn's matmul elsewhere.
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    let own = own_route_applies::<B>();
    matmul_on(lhs, rhs, own)
}

/// [`matmul`] with the route chosen by the caller: `own` runs [`own_matmul`] on any CubeCL backend (on CUDA only for
/// f32 inputs, the ones TF32 would touch; elsewhere for every float dtype: how the tests check the CUDA route's
/// plumbing and gradients without an NVIDIA GPU); otherwise, or on other backends, Burn's matmul.
pub fn matmul_on<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>, own: bool) -> Tensor<B, D> {
    let f32_only = is_cuda_backend::<B>();
    if !own || (f32_only && (lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32)) || lhs.dtype() != rhs.dtype() {
        return lhs.matmul(rhs);
    }
    #[cfg(feature = "cuda")]
    if is_runtime::<B, crate::CudaRuntime>() {
        return cube_matmul::<B, crate::CudaRuntime, D>(lhs, rhs);
    }
    if is_runtime::<B, crate::WgpuRuntime>() {
        return cube_matmul::<B, crate::WgpuRuntime, D>(lhs, rhs);
    }
    if let Some(out) = autodiff_matmul::<B, crate::WgpuCube, D>(&lhs, &rhs) {
        return out;
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = autodiff_matmul::<B, crate::CudaCube, D>(&lhs, &rhs) {
        return out;
    }
    lhs.matmul(rhs)
}

fn cube_matmul<B: Backend, R: CubeRuntime, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    from_cube::<B, R, D>(own_matmul::<R>(to_cube::<B, R, D>(lhs), to_cube::<B, R, D>(rhs)))
}

/// Whether `B` is CubeCL's CUDA backend, directly or under `Autodiff`.
fn is_cuda_backend<B: Backend>() -> bool {
    crate::capabilities::<B>().kind == crate::BackendKind::Cuda
}

/// The product on CubeCL tensors with Burn's output allocation and broadcasting rules and cubek's launch: on CUDA
/// autotuned over the kernels that keep f32; on other runtimes cubek's naive kernel, with no autotuning: see the
/// module documentation.
pub fn own_matmul<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
    let out = init_matmul_output(&lhs, &rhs, lhs.dtype);
    if !is_cuda::<R>() {
        launch::<R>(&Strategy::Naive, lhs, rhs, out.clone()).expect("the naive matmul launches for any shape");
        return out;
    }
    static TUNER: LocalTuner<MatmulAutotuneKey, CubeTuneId> = local_tuner!("full-f32-matmul");
    let tunables = TUNER.init(candidates::<R>);
    let client = lhs.client.clone();
    TUNER.execute(&CubeTuneId::new(&lhs.client, &lhs.device), &client, tunables, (lhs, rhs, out.clone()));
    out
}

type Inputs<R> = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>);

/// Whether `R` is CubeCL's CUDA runtime.
fn is_cuda<R: 'static>() -> bool {
    #[cfg(feature = "cuda")]
    if TypeId::of::<R>() == TypeId::of::<crate::CudaRuntime>() {
        return true;
    }
    false
}

/// The autotune key of a product: its sizes, layouts and dtypes.
fn key<R: CubeRuntime>((lhs, rhs, out): &Inputs<R>) -> MatmulAutotuneKey {
    MatmulAutotuneKey::generate(
        &lhs.client,
        lhs.meta.shape(),
        rhs.meta.shape(),
        lhs.meta.strides(),
        rhs.meta.strides(),
        lhs.dtype.into(),
        rhs.dtype.into(),
        out.dtype.into(),
        None,
        None,
    )
}

/// cubek's f32 kernels: naive (the fallback that always launches), the vector-matrix kernels for products with one
/// row or column, and the unit-tiled kernels at both tile-size choices. Tensor-core strategies are left out on
/// purpose: cubek would run them in TF32.
fn candidates<R: CubeRuntime>() -> TunableSet<MatmulAutotuneKey, Inputs<R>, ()> {
    // Benchmark runs write into a copy of the output.
    let inputs = |_: &MatmulAutotuneKey, (lhs, rhs, out): &Inputs<R>| (lhs.clone(), rhs.clone(), out.copy());
    let vector = TuneGroup::<MatmulAutotuneKey>::new("vector", |key| {
        if matches!(key.analysis.kind, MatmulKind::MatVec | MatmulKind::VecMat) {
            2
        } else {
            -1
        }
    });
    let tiled = TuneGroup::<MatmulAutotuneKey>::new("unit", |_| 1);
    let mut set = TunableSet::new(key::<R>, inputs)
        .with(Tunable::new("naive", |(lhs, rhs, out)| launch::<R>(&Strategy::Naive, lhs, rhs, out)));
    for strategy in [
        Strategy::DoubleVecMat(BlueprintStrategy::Inferred(().into())),
        Strategy::SimpleVecMat(BlueprintStrategy::Inferred(().into())),
        Strategy::GemvPlaneParallel(BlueprintStrategy::Inferred(Default::default())),
        Strategy::GemvUnitPerpendicular(BlueprintStrategy::Inferred(Default::default())),
    ] {
        let name = strategy.to_string();
        set = set.with(
            Tunable::new(&name, move |(lhs, rhs, out)| launch::<R>(&strategy, lhs, rhs, out)).group(&vector, |_| 1),
        );
    }
    for tile_size in [TileSizeSelection::MaxTileSize, TileSizeSelection::MinTileSize] {
        for strategy in [
            Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs { tile_size })),
            Strategy::DoubleUnit(BlueprintStrategy::Inferred(DoubleUnitSelectionArgs { tile_size })),
        ] {
            let name = strategy.to_string();
            set = set.with(
                Tunable::new(&name, move |(lhs, rhs, out)| launch::<R>(&strategy, lhs, rhs, out)).group(&tiled, |_| 1),
            );
        }
    }
    set
}

fn launch<R: CubeRuntime>(
    strategy: &Strategy,
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
    out: CubeTensor<R>,
) -> Result<(), String> {
    let client = out.client.clone();
    let (lhs_dtype, rhs_dtype) = (lhs.dtype, rhs.dtype);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: lhs_dtype.into(),
        rhs: rhs_dtype.into(),
        out: out.dtype.into(),
    });
    let (lhs, rhs) =
        (InputBinding::new(lhs.binding(), lhs_dtype.into()), InputBinding::new(rhs.binding(), rhs_dtype.into()));
    cubek::matmul::launch::launch_ref(strategy, &client, lhs, rhs, out.binding(), &mut dtypes)
        .map_err(|e| format!("{e:?}"))
}

/// The full-f32 product with full-f32 gradients, when `B` is exactly `Autodiff<IB>` (Burn's default checkpointing)
/// and `IB` one of the CubeCL backends lfm instantiates.
fn autodiff_matmul<B: Backend, IB: Backend, const D: usize>(
    lhs: &Tensor<B, D>,
    rhs: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<IB>>() {
        return None;
    }
    let prim = |t: &Tensor<B, D>| -> FloatTensor<Autodiff<IB>> { downcast(t.clone().into_primitive().tensor()) };
    let (lhs, rhs) = (prim(lhs), prim(rhs));
    let forward = |a: FloatTensor<IB>, b: FloatTensor<IB>| -> FloatTensor<IB> {
        let wrap = |t| Tensor::<IB, D>::from_primitive(TensorPrimitive::Float(t));
        matmul_on(wrap(a), wrap(b), true).into_primitive().tensor()
    };
    let out = match (MatmulBackward::<D>)
        .prepare::<NoCheckpointing>([lhs.node.clone(), rhs.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&lhs), prep.checkpoint(&rhs));
            prep.finish(state, forward(lhs.primitive, rhs.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(lhs.primitive, rhs.primitive)),
    };
    let out: B::FloatTensorPrimitive = downcast(out);
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// Gradients of `lhs · rhs`: `g · rhsᵀ` and `lhsᵀ · g`, each summed over the batch dimensions its input broadcast.
#[derive(Debug)]
struct MatmulBackward<const D: usize>;

impl<IB: Backend, const D: usize> Backward<IB, 2> for MatmulBackward<D> {
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_lhs, node_rhs] = ops.parents;
        let wrap = |t| Tensor::<IB, D>::from_primitive(TensorPrimitive::Float(t));
        let grad = wrap(grads.consume::<IB>(&ops.node));
        let (lhs_state, rhs_state) = ops.state;
        let lhs = wrap(checkpointer.retrieve_node_output::<FloatTensor<IB>>(lhs_state));
        let rhs = wrap(checkpointer.retrieve_node_output::<FloatTensor<IB>>(rhs_state));
        if let Some(node) = node_lhs {
            let g = matmul_on(grad.clone(), rhs.clone().swap_dims(D - 2, D - 1), true);
            grads.register::<IB>(node.id, unbroadcast(g, &lhs.dims()).into_primitive().tensor());
        }
        if let Some(node) = node_rhs {
            let g = matmul_on(lhs.clone().swap_dims(D - 2, D - 1), grad, true);
            grads.register::<IB>(node.id, unbroadcast(g, &rhs.dims()).into_primitive().tensor());
        }
    }
}

/// Sums `grad` over the batch dimensions where `shape` has size 1 and `grad` does not.
fn unbroadcast<B: Backend, const D: usize>(mut grad: Tensor<B, D>, shape: &[usize; D]) -> Tensor<B, D> {
    let dims = grad.dims();
    for axis in 0..D.saturating_sub(2) {
        if shape[axis] == 1 && dims[axis] != 1 {
            grad = grad.sum_dim(axis);
        }
    }
    grad
}
