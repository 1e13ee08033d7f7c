//! Gradients summed by NCCL on the GPUs of a CUDA run, one process per GPU: NCCL (`libnccl.so`) is loaded at run
//! time like the driver, through cudarc's bindings (already in the build through CubeCL's CUDA runtime). The
//! processes learn NCCL's unique id from rank 0, through MPI when MPI launched them and through the `torchrun`-style
//! rendezvous otherwise ([`super::rendezvous`]).
//!
//! The all-reduce works in place on the device buffer that holds every gradient of the step (one bucket: Burn's
//! backward pass hands out all gradients at once, so there is no earlier point to start a bucket), in the buffer's
//! own element type (f32, or bf16/f16 where the gradients are).

use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, Tensor};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nccl, sys};

use super::GroupError;

/// This process's NCCL communicator and the stream its collectives run on.
pub struct NcclGroup {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    context: Arc<CudaContext>,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclGroup(rank {} of {})", self.rank, self.world)
    }
}

/// NCCL's unique id as bytes.
pub const ID_BYTES: usize = 128;

/// Checks that the driver and NCCL can be loaded, naming what is missing.
pub fn check_available() -> Result<(), GroupError> {
    // Probe before any call: cudarc panics when a library it needs is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GroupError::Unavailable(
            "several CUDA processes sum their gradients with NCCL, but libcuda.so (the NVIDIA driver) was not found"
                .into(),
        ));
    }
    if !unsafe { sys::is_culib_present() } {
        return Err(GroupError::Unavailable(
            "several CUDA processes sum their gradients with NCCL, but libnccl.so was not found: install NCCL \
             (e.g. the libnccl2 package, or pip's nvidia-nccl-cu12) and put its folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// A fresh unique id (on rank 0), to hand to every rank.
pub fn unique_id() -> Result<Vec<u8>, GroupError> {
    check_available()?;
    let id = nccl::get_uniqueid().map_err(|e| GroupError::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

impl NcclGroup {
    /// Joins the communicator of `world` ranks identified by `id`, on CUDA device `device`. Blocks until every rank
    /// has joined.
    pub fn join(id: &[u8], rank: usize, world: usize, device: usize) -> Result<Self, GroupError> {
        check_available()?;
        if id.len() != ID_BYTES {
            return Err(GroupError::Mismatch(format!("NCCL's id has {ID_BYTES} bytes, rank 0 sent {}", id.len())));
        }
        let cuda = |what: &str| {
            let what = what.to_string();
            move |e: cudarc::driver::DriverError| GroupError::Nccl(format!("{what}: {e:?}"))
        };
        let context = CudaContext::new(device).map_err(cuda("opening the CUDA device"))?;
        // NCCL works on the calling thread's current context: the device's primary one, as CubeCL's.
        context.bind_to_thread().map_err(cuda("making the CUDA device current"))?;
        let stream = context.new_stream().map_err(cuda("creating NCCL's stream"))?;
        let mut unique = sys::ncclUniqueId { internal: [0; ID_BYTES] };
        for (slot, &byte) in unique.internal.iter_mut().zip(id) {
            *slot = byte as _;
        }
        let mut comm = std::ptr::null_mut();
        unsafe { nccl::comm_init_rank(&mut comm, world as i32, unique, rank as i32) }
            .map_err(|e| GroupError::Nccl(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        let version = nccl::get_nccl_version().unwrap_or(0);
        tracing::info!("NCCL {version}: rank {rank} of {world} on cuda:{device}");
        Ok(Self { comm, stream, context, rank, world })
    }

    /// Replaces `values` (on this process's CUDA device) by their sum over the ranks, in place.
    pub fn all_reduce_sum<B: Backend>(&self, values: Tensor<B, 1>) -> Result<Tensor<B, 1>, GroupError> {
        let (values, result) = lfm_kernels::device_buffer::with_cuda_buffer(values, |buffer| {
            let datatype = match buffer.dtype {
                DType::F32 => sys::ncclDataType_t::ncclFloat32,
                DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
                DType::F16 => sys::ncclDataType_t::ncclFloat16,
                other => return Err(GroupError::Nccl(format!("no NCCL sum for {other:?} gradients"))),
            };
            self.context.bind_to_thread().map_err(|e| GroupError::Nccl(format!("binding the CUDA device: {e:?}")))?;
            let ptr = buffer.ptr as *mut std::ffi::c_void;
            unsafe {
                nccl::all_reduce(
                    ptr,
                    ptr,
                    buffer.len,
                    datatype,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map_err(|e| GroupError::Nccl(format!("ncclAllReduce of {} values: {e:?}", buffer.len)))?;
            self.stream.synchronize().map_err(|e| GroupError::Nccl(format!("waiting for ncclAllReduce: {e:?}")))
        })
        .ok_or_else(|| GroupError::Invalid("NCCL sums gradients of the cuda backend only".into()))?;
        result.map(|()| values)
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the NVIDIA driver (as in CI), NCCL's entry points say what is missing instead of panicking inside
    /// cudarc; so does joining a CUDA run of several processes. (With a GPU, `tests/all/cuda.rs` runs NCCL.)
    #[test]
    fn without_the_driver_nccl_names_what_is_missing() {
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("skipped: this machine has the NVIDIA driver (tests/all/cuda.rs runs NCCL there)");
            return;
        }
        let spec = super::super::NodeSpec {
            rank: 0,
            world: 2,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            timeout: std::time::Duration::from_secs(1),
        };
        let launch = super::super::Launch::Torchrun(spec);
        let joined = super::super::ProcessGroup::join(&launch, 1, &crate::backend::Device::Cuda(0));
        for e in [unique_id().unwrap_err(), NcclGroup::join(&[0; ID_BYTES], 0, 2, 0).unwrap_err(), joined.unwrap_err()]
        {
            assert!(e.to_string().contains("libcuda.so (the NVIDIA driver) was not found"), "{e}");
        }
    }
}
