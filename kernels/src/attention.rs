//! Flash attention: `softmax(q·kᵀ/√d)·v` over `[batch, heads, tokens, head_dim]` in one kernel that never
//! materialises the `tokens × tokens` score matrix.
//!
//! One cube handles `BLOCK_Q` query rows of one (batch, head), one unit per row. The cube walks the keys in tiles
//! of `block_k` rows: its units load the K and V tile into workgroup memory together (≤ 16 KiB, WebGPU's
//! guaranteed minimum), then each unit scores its query row against the tile and folds the tile into its running
//! output with the online softmax (running max `m`, running sum `l`, output rescaled by `exp(m_old − m_new)`).
//! Scores, softmax statistics and the output accumulate in f32 whatever the storage type, so f16/bf16 inputs get
//! f32 accumulation. Memory is O(tokens·head_dim); the backward pass recomputes scores block by block (see
//! [`crate::attention_backward`]).

use burn::tensor::Shape;
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor, CubeRuntime,
};
use cubecl::prelude::*;

/// Query rows (= units) per cube.
const BLOCK_Q: u32 = 64;

/// Workgroup memory every WebGPU device guarantees, bytes.
const WORKGROUP_BYTES: usize = 16 * 1024;

/// Most head dimensions supported by one unit's registers.
pub const MAX_HEAD_DIM: usize = 256;

/// Key rows per tile: the K and V tiles (f32) fill at most [`WORKGROUP_BYTES`].
fn block_k(head_dim: usize) -> u32 {
    (WORKGROUP_BYTES / (2 * 4 * head_dim)).clamp(1, 32) as u32
}

#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn flash_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: u32,
    #[comptime] block_k: u32,
    #[define(F)] _dtype: StorageType,
) {
    let d = head_dim as usize;
    let bk = block_k as usize;
    let n_q = q.shape(2);
    let n_k = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let unit = UNIT_POS as usize;
    let row = CUBE_POS_X as usize * BLOCK_Q as usize + unit;
    let row_valid = row < n_q;
    let q_base = (bh * n_q + row) * d;
    let kv_base = bh * n_k * d;

    // The loops over head_dim stay loops: unrolling them (d up to 128, five loops) made llvmpipe spend minutes
    // compiling one shader, for no measured gain at d = 64.
    let mut q_row = Array::<f32>::new(d);
    let mut acc = Array::<f32>::new(d);
    for i in 0..d {
        let mut value = 0.0f32;
        if row_valid {
            value = f32::cast_from(q[q_base + i]) * scale;
        }
        q_row[i] = value;
        acc[i] = f32::new(0.0);
    }

    let mut k_tile = SharedMemory::<f32>::new(bk * d);
    let mut v_tile = SharedMemory::<f32>::new(bk * d);
    let mut scores = Array::<f32>::new(bk);
    // The lowest finite f32 loses every softmax comparison without producing inf − inf.
    let mut m = f32::min_value();
    let mut l = 0.0f32;
    let tiles = n_k.div_ceil(bk);
    for tile in 0..tiles {
        let start = tile * bk;
        // Cooperative, coalesced load of the tile (zeros past the last key).
        let mut e = unit;
        while e < bk * d {
            let key = start + e / d;
            let mut kv = 0.0f32;
            let mut vv = 0.0f32;
            if key < n_k {
                let at = kv_base + start * d + e;
                kv = f32::cast_from(k[at]);
                vv = f32::cast_from(v[at]);
            }
            k_tile[e] = kv;
            v_tile[e] = vv;
            e += BLOCK_Q as usize;
        }
        sync_cube();

        let mut tile_max = f32::min_value();
        for j in 0..bk {
            let mut s = 0.0f32;
            for i in 0..d {
                s += q_row[i] * k_tile[j * d + i];
            }
            if start + j >= n_k {
                s = f32::min_value();
            }
            scores[j] = s;
            tile_max = f32::max(tile_max, s);
        }
        let m_new = f32::max(m, tile_max);
        let correction = (m - m_new).exp();
        l *= correction;
        for i in 0..d {
            acc[i] *= correction;
        }
        for j in 0..bk {
            let p = (scores[j] - m_new).exp();
            l += p;
            for i in 0..d {
                acc[i] += p * v_tile[j * d + i];
            }
        }
        m = m_new;
        sync_cube();
    }

    if row_valid {
        let inv = 1.0f32 / l;
        for i in 0..d {
            out[q_base + i] = F::cast_from(acc[i] * inv);
        }
    }
}

/// Why the fused kernel does not take these inputs (the caller falls back to the unfused path).
pub(crate) fn unsupported(q: &Shape, k: &Shape, v: &Shape) -> Option<String> {
    let (qd, kd, vd) = (q.dims::<4>(), k.dims::<4>(), v.dims::<4>());
    if qd[3] == 0 || qd[3] > MAX_HEAD_DIM {
        return Some(format!("head_dim {} outside 1..={MAX_HEAD_DIM}", qd[3]));
    }
    if kd != vd || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] {
        return Some(format!("q {qd:?}, k {kd:?} and v {vd:?} do not fit one attention"));
    }
    if kd[2] == 0 {
        return Some("no keys".into());
    }
    None
}

/// Launches the fused forward pass on 4-D contiguous-or-not CubeCL tensors of one dtype.
///
/// # Panics
/// On shapes [`unsupported`] refuses (callers check).
pub fn flash_attention<R: CubeRuntime>(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>) -> CubeTensor<R> {
    if let Some(why) = unsupported(q.meta.shape(), k.meta.shape(), v.meta.shape()) {
        panic!("flash_attention: {why}");
    }
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let [batch, heads, n_q, head_dim] = q.meta.shape().dims::<4>();
    let (client, device, dtype) = (q.client.clone(), q.device.clone(), q.dtype);
    // Explicitly contiguous, as the kernel indexes `out` linearly: CUDA's default allocation pads rows to an aligned
    // pitch (head_dim 72 would take 128 slots per row).
    let out = empty_device_contiguous_dtype::<R>(client.clone(), device, q.meta.shape().clone(), dtype);
    let scale = (head_dim as f64).powf(-0.5) as f32;
    flash_attention_kernel::launch::<R>(
        &client,
        CubeCount::Static(n_q.div_ceil(BLOCK_Q as usize) as u32, (batch * heads) as u32, 1),
        CubeDim::new_1d(BLOCK_Q),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        scale,
        head_dim as u32,
        block_k(head_dim),
        dtype.into(),
    );
    out
}

// ---- Backend-generic entry points. ----

use std::any::TypeId;

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    NodeId,
};
use burn::backend::Autodiff;
use burn::tensor::{activation::softmax, backend::Backend, ops::FloatTensor, Tensor as BurnTensor, TensorPrimitive};

use crate::dispatch::{downcast, from_cube, to_cube, with_runtime};
use crate::matmul::matmul as mm;

/// Most score-matrix elements one chunk of the recomputing backward pass materialises (64 MiB in f32).
const BACKWARD_CHUNK_ELEMENTS: usize = 1 << 24;

/// `softmax(q·kᵀ/√d)·v` as plain Burn tensor operations (the whole score matrix at once; products through
/// [`crate::matmul::matmul`], which keeps f32 on CUDA). The oracle of [`attention_on`], and what backends without
/// the kernel run.
pub fn attention_reference<B: Backend>(
    q: BurnTensor<B, 4>,
    k: BurnTensor<B, 4>,
    v: BurnTensor<B, 4>,
) -> BurnTensor<B, 4> {
    let scale = (q.dims()[3] as f64).powf(-0.5);
    let scores = mm(q, k.swap_dims(2, 3)).mul_scalar(scale);
    // 16-bit scores take their softmax sums in f32, as the fused kernel does; f32 and f64 run as they are.
    let dtype = scores.dtype();
    let probabilities = match dtype {
        burn::tensor::DType::F16 | burn::tensor::DType::BF16 => {
            softmax(scores.cast(burn::tensor::DType::F32), 3).cast(dtype)
        }
        _ => softmax(scores, 3),
    };
    mm(probabilities, v)
}

/// Scaled dot-product attention over `[batch, heads, tokens, head_dim]`: the fused kernel when `fused` is set and
/// the backend has it — including under `Autodiff` of lfm's wgpu/CUDA backends, with a backward pass that
/// recomputes the scores chunk by chunk — and [`attention_reference`] otherwise.
pub fn attention_on<B: Backend>(
    q: BurnTensor<B, 4>,
    k: BurnTensor<B, 4>,
    v: BurnTensor<B, 4>,
    fused: bool,
) -> BurnTensor<B, 4> {
    if !fused || unsupported(&q.shape(), &k.shape(), &v.shape()).is_some() {
        return attention_reference(q, k, v);
    }
    if crate::has_kernels::<B>() {
        let out = with_runtime!(B, |R| from_cube::<B, R, 4>(flash_attention::<R>(
            to_cube::<B, R, 4>(q.clone()),
            to_cube::<B, R, 4>(k.clone()),
            to_cube::<B, R, 4>(v.clone())
        )));
        if let Some(out) = out {
            return out;
        }
    }
    if let Some(out) = autodiff_attention::<B, crate::dispatch::WgpuCube>(&q, &k, &v) {
        return out;
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = autodiff_attention::<B, crate::dispatch::CudaCube>(&q, &k, &v) {
        return out;
    }
    attention_reference(q, k, v)
}

/// [`attention_on`] with the fused path enabled.
pub fn attention<B: Backend>(q: BurnTensor<B, 4>, k: BurnTensor<B, 4>, v: BurnTensor<B, 4>) -> BurnTensor<B, 4> {
    attention_on(q, k, v, true)
}

/// The fused forward pass with a recomputing backward, when `B` is exactly `Autodiff<IB>` (Burn's default
/// checkpointing) and `IB` one of the CubeCL backends lfm instantiates.
fn autodiff_attention<B: Backend, IB: Backend>(
    q: &BurnTensor<B, 4>,
    k: &BurnTensor<B, 4>,
    v: &BurnTensor<B, 4>,
) -> Option<BurnTensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<IB>>() || !crate::has_kernels::<IB>() {
        return None;
    }
    let prim = |t: &BurnTensor<B, 4>| -> FloatTensor<Autodiff<IB>> { downcast(t.clone().into_primitive().tensor()) };
    let (q, k, v) = (prim(q), prim(k), prim(v));
    let forward = |q: FloatTensor<IB>, k: FloatTensor<IB>, v: FloatTensor<IB>| -> FloatTensor<IB> {
        let wrap = |t| BurnTensor::<IB, 4>::from_primitive(TensorPrimitive::Float(t));
        attention_on(wrap(q), wrap(k), wrap(v), true).into_primitive().tensor()
    };
    let out = match FlashAttentionBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&q), prep.checkpoint(&k), prep.checkpoint(&v));
            prep.finish(state, forward(q.primitive, k.primitive, v.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(q.primitive, k.primitive, v.primitive)),
    };
    let out: B::FloatTensorPrimitive = downcast(out);
    Some(BurnTensor::from_primitive(TensorPrimitive::Float(out)))
}

/// Gradients of attention by recomputation, a chunk of query rows at a time, so that memory stays
/// O(chunk · keys) instead of O(queries · keys).
#[derive(Debug)]
struct FlashAttentionBackward;

impl<IB: Backend> Backward<IB, 3> for FlashAttentionBackward {
    type State = (NodeId, NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<IB>(&ops.node);
        let (q_state, k_state, v_state) = ops.state;
        let wrap = |t| BurnTensor::<IB, 4>::from_primitive(TensorPrimitive::Float(t));
        let q = wrap(checkpointer.retrieve_node_output::<FloatTensor<IB>>(q_state));
        let k = wrap(checkpointer.retrieve_node_output::<FloatTensor<IB>>(k_state));
        let v = wrap(checkpointer.retrieve_node_output::<FloatTensor<IB>>(v_state));
        let (dq, dk, dv) = attention_backward(q, k, v, wrap(grad), BACKWARD_CHUNK_ELEMENTS);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<IB>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// `(dq, dk, dv)` of `softmax(q·kᵀ/√d)·v` given the output gradient, recomputing the softmax a chunk of query
/// rows at a time so that at most `max_scores` score elements (at least one query row's) live at once.
pub fn attention_backward<B: Backend>(
    q: BurnTensor<B, 4>,
    k: BurnTensor<B, 4>,
    v: BurnTensor<B, 4>,
    grad_out: BurnTensor<B, 4>,
    max_scores: usize,
) -> (BurnTensor<B, 4>, BurnTensor<B, 4>, BurnTensor<B, 4>) {
    let [batch, heads, n_q, head_dim] = q.dims();
    let n_k = k.dims()[2];
    let scale = (head_dim as f64).powf(-0.5);
    let chunk = (max_scores / (batch * heads * n_k).max(1)).clamp(1, n_q.max(1));
    let k_t = k.clone().swap_dims(2, 3);
    let v_t = v.clone().swap_dims(2, 3);
    let mut dq = Vec::new();
    let mut dk = k.zeros_like();
    let mut dv = v.zeros_like();
    for start in (0..n_q).step_by(chunk) {
        let end = (start + chunk).min(n_q);
        let q_c = q.clone().slice([0..batch, 0..heads, start..end, 0..head_dim]);
        let do_c = grad_out.clone().slice([0..batch, 0..heads, start..end, 0..head_dim]);
        let p = softmax(mm(q_c.clone(), k_t.clone()).mul_scalar(scale), 3);
        let o_c = mm(p.clone(), v.clone());
        dv = dv + mm(p.clone().swap_dims(2, 3), do_c.clone());
        let dp = mm(do_c.clone(), v_t.clone());
        let row_dot = (do_c * o_c).sum_dim(3);
        let ds = (p * (dp - row_dot)).mul_scalar(scale);
        dq.push(mm(ds.clone(), k.clone()));
        dk = dk + mm(ds.swap_dims(2, 3), q_c);
    }
    (BurnTensor::cat(dq, 2), dk, dv)
}

/// Whether `B` would run the fused kernel (directly or under `Autodiff`).
pub fn has_fused_attention<B: Backend>() -> bool {
    if crate::has_kernels::<B>() {
        return true;
    }
    #[cfg(feature = "cuda")]
    if TypeId::of::<B>() == TypeId::of::<Autodiff<crate::dispatch::CudaCube>>() {
        return crate::cuda_kernels_enabled();
    }
    TypeId::of::<B>() == TypeId::of::<Autodiff<crate::dispatch::WgpuCube>>()
}
