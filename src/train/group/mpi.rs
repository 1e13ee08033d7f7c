//! The processes of a run launched by MPI (`mpirun -np N lfm train …`, `srun --mpi=pmix lfm train …`): rank and
//! world size from MPI, the run's fingerprint compared over all ranks, and gradients summed by `MPI_Allreduce` (on
//! the cpu and wgpu backends; CUDA sums them with NCCL, using MPI only to hand out NCCL's id).
//!
//! A rank that dies is the launcher's business: `mpirun` (and `srun --kill-on-bad-exit`) end every other rank of
//! the job when one exits abnormally. A rank that fails with an error calls `MPI_Abort` ([`MpiGroup::abort`]) for
//! the same reason: the others would otherwise wait in their next all-reduce forever.

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::GroupError;

/// The MPI library's state for this process (finalised when dropped).
pub struct MpiGroup {
    universe: Universe,
    world: SimpleCommunicator,
    /// What one chunk's sum reads from, kept between steps: a fresh allocation of this size would be mapped (and
    /// page-faulted) anew on every step.
    sent: Vec<f32>,
}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiGroup(rank {} of {})", self.rank(), self.world())
    }
}

/// The values one `MPI_Allreduce` call sums: 16 MiB, so that the library's own temporary buffers stay below glibc's
/// mmap threshold (lfm's is 32 MiB, `src/main.rs`) and are reused instead of being mapped and faulted in anew on every
/// call; hundreds of calls per step cost microseconds each.
const CHUNK: usize = 1 << 22;

impl MpiGroup {
    /// Initialises MPI (once per process). Only the thread that calls this makes MPI calls afterwards.
    pub fn init() -> Result<Self, GroupError> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| {
            GroupError::Invalid("MPI was already initialised in this process: one run per process".into())
        })?;
        let world = universe.world();
        Ok(Self { universe, world, sent: Vec::new() })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.world.size() as usize
    }

    /// The MPI library's own description of itself.
    pub fn library(&self) -> String {
        mpi::environment::library_version().unwrap_or_else(|_| "MPI".into()).lines().next().unwrap_or("").to_string()
    }

    /// Checks that every rank computed the same run fingerprint; names the ranks that differ from rank 0.
    pub fn check_fingerprint(&self, fingerprint: u64) -> Result<(), GroupError> {
        let mut all = vec![0u64; self.world()];
        self.world.all_gather_into(&fingerprint, &mut all[..]);
        let differ: Vec<String> = (0..all.len()).filter(|&r| all[r] != all[0]).map(|r| r.to_string()).collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(GroupError::Mismatch(format!(
            "rank(s) {} train another model, settings or data than rank 0: start every rank with the same command \
             and data",
            differ.join(", ")
        )))
    }

    /// Rank 0's `bytes` on every rank (every rank passes a buffer of the same length).
    pub fn broadcast(&self, bytes: &mut [u8]) {
        self.world.process_at_rank(0).broadcast_into(bytes);
    }

    /// Replaces `values` on every rank by their sum over the ranks.
    pub fn all_reduce_sum(&mut self, values: &mut [f32]) {
        for chunk in values.chunks_mut(CHUNK) {
            self.sent.clear();
            self.sent.extend_from_slice(chunk);
            self.world.all_reduce_into(&self.sent[..], chunk, SystemOperation::sum());
        }
    }

    /// Waits until every rank has reached this call.
    pub fn barrier(&self) {
        self.world.barrier();
    }

    /// Ends every process of the job (`MPI_Abort`) with `code`.
    pub fn abort(&self, code: i32) -> ! {
        let _ = &self.universe;
        self.world.abort(code)
    }
}
