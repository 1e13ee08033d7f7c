//! The processes of a run on several GPUs or machines, and the sum of their gradients every step.
//!
//! How a run is launched decides how its processes meet ([`Launch::detect`]):
//! - by MPI (`mpirun -np N lfm train …`, `srun --mpi=pmix lfm train …`; lfm built with the `mpi` feature): rank and
//!   world size from MPI; the gradients are summed by `MPI_Allreduce` on the cpu and wgpu backends and by NCCL on
//!   CUDA (MPI then only hands out NCCL's id);
//! - by `torchrun`-style variables (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, or `--nodes`
//!   and its flags): CUDA only, the gradients summed by NCCL, its id handed out over one TCP rendezvous that then
//!   watches for lost processes ([`rendezvous`]);
//! - otherwise one process, summing nothing.
//!
//! Every process takes its share of each step's batch ([`ProcessGroup::rows`], the micro-batches `--grad-accum N`
//! would make in one process), so a run on N processes takes the updates of one process with `--grad-accum N`, up
//! to the order of the sums.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;

use std::ops::Range;
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;

pub use rendezvous::NodeSpec;

/// Why the processes of a run could not start or go on together.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The settings do not describe a valid group.
    #[error("{0}")]
    Invalid(String),
    /// A library or build feature the launch needs is missing.
    #[error("{0}")]
    Unavailable(String),
    /// A network operation failed.
    #[error("{what}: {source}")]
    Network {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process belongs to a different run, or broke the protocol.
    #[error("{0}")]
    Mismatch(String),
    /// NCCL failed.
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// Variables an MPI launcher sets in every process it starts (Open MPI, MPICH/Intel MPI's Hydra, PMIx launchers such
/// as `srun --mpi=pmix`).
const MPI_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];
/// Variables that give a process's rank among those of its machine, by launcher.
const LOCAL_RANK_VARIABLES: [&str; 4] =
    ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"];

/// How this process was launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Alone.
    Single,
    /// By an MPI launcher (the variable that says so).
    Mpi(&'static str),
    /// With `torchrun`-style variables or flags.
    Torchrun(NodeSpec),
}

impl Launch {
    /// How this process was launched: by MPI when a launcher's variables are set, else as `spec` says (a world of
    /// one is a single process).
    pub fn detect(spec: NodeSpec) -> Result<Self, GroupError> {
        if let Some(variable) = MPI_VARIABLES.into_iter().find(|v| std::env::var_os(v).is_some()) {
            return Ok(Self::Mpi(variable));
        }
        if spec.world <= 1 && spec.rank > 0 {
            return Err(GroupError::Invalid(format!(
                "--node-rank (RANK) {} needs --nodes (WORLD_SIZE) above it",
                spec.rank
            )));
        }
        if spec.world == 0 || spec.rank >= spec.world {
            return Err(GroupError::Invalid(format!(
                "rank {} is not below the world size {} (RANK counts from 0 to WORLD_SIZE − 1)",
                spec.rank, spec.world
            )));
        }
        Ok(if spec.world == 1 { Self::Single } else { Self::Torchrun(spec) })
    }

    /// After `error` on this process before it joined its group (a device that this rank lacks, a file that it
    /// cannot read): under MPI, prints it and ends every rank with `MPI_Abort`, since the others would wait for this
    /// one in their first collective call (`srun` without `--kill-on-bad-exit` never ends them). Does nothing
    /// otherwise: the caller reports the error as usual (without MPI, the others' rendezvous times out).
    pub fn end_after(&self, error: &dyn std::fmt::Display) {
        #[cfg(feature = "mpi")]
        if let Self::Mpi(_) = self {
            if let Ok(group) = mpi::MpiGroup::init() {
                report_error(group.rank(), &error);
                group.abort(1);
            }
        }
        let _ = error;
    }

    /// This process's rank among those of its machine, from the launcher's variables (0 when none is set).
    pub fn local_rank() -> usize {
        LOCAL_RANK_VARIABLES.into_iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(0)
    }
}

/// How the gradients travel.
enum Transport {
    /// One process: nothing to sum.
    Local,
    /// `MPI_Allreduce` over host buffers.
    #[cfg(feature = "mpi")]
    Mpi,
    /// NCCL over device buffers.
    #[cfg(feature = "cuda")]
    Nccl(nccl::NcclGroup),
}

/// The processes of a run.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    transport: Transport,
    /// MPI's state when MPI launched the run (for NCCL's id, and to abort every rank on an error).
    #[cfg(feature = "mpi")]
    mpi: Option<mpi::MpiGroup>,
    /// The heartbeat links of a run launched without MPI.
    watchdog: Option<rendezvous::Watchdog>,
    /// Sum the gradients in bf16 (NCCL only).
    bf16_sums: bool,
    /// The host buffer of MPI's sums, kept between steps (see [`mpi::MpiGroup`]'s own).
    #[cfg(feature = "mpi")]
    host: Vec<f32>,
    last_reduce: Option<Reduced>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup(rank {} of {}, {})", self.rank, self.world, self.transport_name())
    }
}

/// What the last gradient sum moved and how long it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduced {
    /// Wall time of the sum (packing and unpacking included, waiting for the other processes not: under MPI a
    /// barrier first measures that wait apart).
    pub seconds: f64,
    /// Wall time spent waiting for the slowest process to finish its backward pass (MPI only; 0 otherwise).
    pub waited: f64,
    /// Bytes of the buffer that was summed (every process's contribution has this size).
    pub bytes: usize,
}

impl ProcessGroup {
    /// A run of one process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            transport: Transport::Local,
            #[cfg(feature = "mpi")]
            mpi: None,
            watchdog: None,
            bf16_sums: false,
            #[cfg(feature = "mpi")]
            host: Vec::new(),
            last_reduce: None,
        }
    }

    /// Joins the run `launch` describes, training on `device`; `fingerprint` identifies the run (every process
    /// must compute the same: the model, the settings and the data).
    pub fn join(launch: &Launch, fingerprint: u64, device: &crate::backend::Device) -> Result<Self, GroupError> {
        let cuda = match device {
            #[cfg(feature = "cuda")]
            crate::backend::Device::Cuda(index) => Some(*index),
            _ => None,
        };
        match launch {
            Launch::Single => Ok(Self::single()),
            Launch::Mpi(variable) => Self::join_mpi(variable, fingerprint, cuda),
            Launch::Torchrun(spec) => Self::join_torchrun(spec, fingerprint, cuda),
        }
    }

    #[cfg(feature = "mpi")]
    fn join_mpi(_variable: &str, fingerprint: u64, cuda: Option<usize>) -> Result<Self, GroupError> {
        let group = mpi::MpiGroup::init()?;
        let (rank, world) = (group.rank(), group.world());
        tracing::info!("rank {rank} of {world} ({})", group.library());
        // From here on an error on one rank must end them all: the others would wait for it forever.
        fn abort(group: &mpi::MpiGroup, error: GroupError) -> ! {
            report_error(group.rank(), &error);
            group.abort(1)
        }
        if let Err(e) = group.check_fingerprint(fingerprint) {
            abort(&group, e);
        }
        let transport = match cuda {
            #[cfg(feature = "cuda")]
            Some(device) if world > 1 => {
                let mut id = vec![0u8; nccl::ID_BYTES];
                if rank == 0 {
                    id = nccl::unique_id().unwrap_or_else(|e| abort(&group, e));
                }
                group.broadcast(&mut id);
                Transport::Nccl(nccl::NcclGroup::join(&id, rank, world, device).unwrap_or_else(|e| abort(&group, e)))
            }
            _ if world > 1 => Transport::Mpi,
            _ => Transport::Local,
        };
        Ok(Self {
            rank,
            world,
            transport,
            mpi: Some(group),
            watchdog: None,
            bf16_sums: false,
            host: Vec::new(),
            last_reduce: None,
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn join_mpi(variable: &str, _fingerprint: u64, _cuda: Option<usize>) -> Result<Self, GroupError> {
        Err(GroupError::Unavailable(format!(
            "an MPI launcher started this process ({variable} is set), but this lfm was built without MPI: build it \
             with `cargo build --release --features mpi` (it needs an MPI library and its headers, e.g. Debian's \
             libopenmpi-dev, and libclang), or launch one process per node with WORLD_SIZE/RANK/MASTER_ADDR \
             (CUDA, NCCL)"
        )))
    }

    fn join_torchrun(spec: &NodeSpec, fingerprint: u64, cuda: Option<usize>) -> Result<Self, GroupError> {
        let Some(device) = cuda else {
            return Err(GroupError::Unavailable(format!(
                "WORLD_SIZE {} (or --nodes) without MPI is for CUDA, where NCCL sums the gradients; on the cpu and \
                 wgpu backends the processes sum them through MPI: build lfm with --features mpi and launch \
                 `mpirun -np {} lfm train …` (or srun)",
                spec.world, spec.world
            )));
        };
        Self::join_nccl(spec, fingerprint, device)
    }

    #[cfg(feature = "cuda")]
    fn join_nccl(spec: &NodeSpec, fingerprint: u64, device: usize) -> Result<Self, GroupError> {
        // Fail on this machine's own problem before keeping the others waiting.
        nccl::check_available()?;
        tracing::info!(
            "rank {} of {}: waiting for the others at {}:{}",
            spec.rank,
            spec.world,
            spec.master_addr,
            spec.master_port
        );
        let met = rendezvous::Rendezvous::join(spec, fingerprint, nccl::unique_id)?;
        let (rank, world) = (met.rank, met.world);
        let group = nccl::NcclGroup::join(&met.payload, rank, world, device)?;
        // A lost process leaves NCCL's collectives waiting forever: end this one with the reason.
        let watchdog = met.watch(move |why| {
            report_error(rank, &why);
            std::process::exit(1);
        })?;
        Ok(Self {
            rank,
            world,
            transport: Transport::Nccl(group),
            #[cfg(feature = "mpi")]
            mpi: None,
            watchdog: Some(watchdog),
            bf16_sums: false,
            #[cfg(feature = "mpi")]
            host: Vec::new(),
            last_reduce: None,
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn join_nccl(_spec: &NodeSpec, _fingerprint: u64, _device: usize) -> Result<Self, GroupError> {
        unreachable!("no CUDA device without the cuda feature")
    }

    /// Sums the gradients in bf16 (`--allreduce-dtype bf16`): half the bytes on the wire, each sum rounded to bf16
    /// (the flags and the loss stay f32). NCCL only: MPI has no bf16 sum. Without other processes it changes nothing.
    /// On an error the group comes back with it, to end the other processes ([`ProcessGroup::end_after`]).
    #[allow(clippy::result_large_err)]
    pub fn with_bf16_sums(mut self, bf16: bool) -> Result<Self, (Self, GroupError)> {
        if bf16 && self.world > 1 && self.transport_name() != "NCCL" {
            let error = GroupError::Unavailable(format!(
                "--allreduce-dtype bf16 needs NCCL (the cuda backend); {} sums f32 only",
                self.transport_name()
            ));
            return Err((self, error));
        }
        self.bf16_sums = bf16;
        Ok(self)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// What sums the gradients: "local", "MPI" or "NCCL".
    pub fn transport_name(&self) -> &'static str {
        match self.transport {
            Transport::Local => "local",
            #[cfg(feature = "mpi")]
            Transport::Mpi => "MPI",
            #[cfg(feature = "cuda")]
            Transport::Nccl(_) => "NCCL",
        }
    }

    /// This process's rows of a batch of `n`: consecutive shares of `⌈n / world⌉` (the last ones may be shorter or
    /// empty), the micro-batches `--grad-accum world` would make in one process.
    pub fn rows(&self, n: usize) -> Range<usize> {
        rows(self.rank, self.world, n)
    }

    /// What the last [`ProcessGroup::all_reduce`] moved and how long it took.
    pub fn last_reduce(&self) -> Option<Reduced> {
        self.last_reduce
    }

    /// Sums `grads` (of `model`, on the device of its first parameter) and `loss` over the processes; every
    /// process ends with the same sums. Gradients absent on every process stay absent.
    pub fn all_reduce<B: AutodiffBackend, M: Module<B>>(
        &mut self,
        model: &M,
        grads: GradientsParams,
        loss: f64,
    ) -> Result<(GradientsParams, f64), GroupError> {
        // Under MPI, waiting for the slowest rank is measured apart from the sum itself.
        let arrived = Instant::now();
        #[cfg(feature = "mpi")]
        if let (Transport::Mpi, Some(mpi)) = (&self.transport, &self.mpi) {
            mpi.barrier();
        }
        let start = Instant::now();
        let waited = (start - arrived).as_secs_f64();
        let (grads, loss, bytes) = match &self.transport {
            Transport::Local => {
                let _ = model;
                (grads, loss, 0)
            }
            #[cfg(feature = "mpi")]
            Transport::Mpi => {
                use crate::train::grads::{pack_host, unpack_host};
                let mpi = self.mpi.as_mut().expect("an MPI transport has MPI");
                let host = &mut self.host;
                pack_host::<B, M>(model, &grads, &[loss as f32], host);
                let device = model.devices().into_iter().next().expect("a network with parameters");
                let packed_at = start.elapsed().as_secs_f64();
                mpi.all_reduce_sum(host);
                let summed_at = start.elapsed().as_secs_f64();
                let (grads, extra) = unpack_host::<B, M>(model, host, 1, &device);
                tracing::debug!(
                    "MPI sum of {} values: packed in {packed_at:.3} s, summed in {:.3} s, unpacked in {:.3} s",
                    host.len(),
                    summed_at - packed_at,
                    start.elapsed().as_secs_f64() - summed_at
                );
                (grads, extra[0] as f64, host.len() * 4)
            }
            #[cfg(feature = "cuda")]
            Transport::Nccl(group) => {
                use crate::train::grads::{pack, parameter_count, unpack};
                use burn::tensor::DType;
                let device = model.devices().into_iter().next().expect("a network with parameters");
                let packed = pack::<B, M>(model, &grads, &[loss as f32], &device);
                let len = packed.dims()[0];
                let (summed, bytes) = if self.bf16_sums {
                    // The gradients in bf16; the flags and the loss after them stay f32.
                    let tail = parameter_count::<B, M>(model) + 1;
                    let values = group.all_reduce_sum(packed.clone().narrow(0, 0, len - tail).cast(DType::BF16))?;
                    let tail_sum = group.all_reduce_sum(packed.narrow(0, len - tail, tail))?;
                    let summed = burn::tensor::Tensor::cat(vec![values.cast(DType::F32), tail_sum], 0);
                    (summed, (len - tail) * 2 + tail * 4)
                } else {
                    (group.all_reduce_sum(packed)?, len * 4)
                };
                let (grads, extra) = unpack::<B, M>(model, summed, 1);
                (grads, extra[0] as f64, bytes)
            }
        };
        self.last_reduce = Some(Reduced { seconds: start.elapsed().as_secs_f64(), waited, bytes });
        Ok((grads, loss))
    }

    /// After `error` on this process: with several processes, prints it and ends every process of the run
    /// (`MPI_Abort` under MPI; without MPI the others' watchdogs see this one leave), so that none waits forever in
    /// its next sum. Does nothing in a run of one.
    pub fn end_after(&self, error: &dyn std::fmt::Display) {
        if self.world > 1 {
            report_error(self.rank, &error);
            #[cfg(feature = "mpi")]
            if let Some(mpi) = &self.mpi {
                mpi.abort(1);
            }
            std::process::exit(1);
        }
    }

    /// Tells the other processes that this one finished its run (without MPI, so that they do not take its exit
    /// for a crash).
    pub fn finish(&mut self) {
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.finish();
        }
    }
}

/// Prints `error` as rank `rank`'s, in one write: the ranks share the launcher's stderr, and a line written in
/// pieces (as `eprintln!` writes its arguments) interleaves with the other ranks' output.
fn report_error(rank: usize, error: &dyn std::fmt::Display) {
    use std::io::Write;
    let line = format!("Error: rank {rank}: {error}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Rank `rank`'s rows of a batch of `n` split over `world` processes.
fn rows(rank: usize, world: usize, n: usize) -> Range<usize> {
    let share = n.div_ceil(world);
    (rank * share).min(n)..((rank + 1) * share).min(n)
}

/// A stable 64-bit hash (FNV-1a) of `bytes`, for run fingerprints.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_are_told_apart_by_world_and_rank() {
        if MPI_VARIABLES.iter().any(|v| std::env::var_os(v).is_some()) {
            eprintln!("skipped: these tests run under an MPI launcher");
            return;
        }
        let spec = |rank, world| NodeSpec {
            rank,
            world,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            timeout: std::time::Duration::from_secs(1),
        };
        assert_eq!(Launch::detect(spec(0, 1)).unwrap(), Launch::Single);
        assert_eq!(Launch::detect(spec(1, 2)).unwrap(), Launch::Torchrun(spec(1, 2)));
        let alone = Launch::detect(spec(1, 1)).unwrap_err().to_string();
        assert!(alone.contains("needs --nodes (WORLD_SIZE) above it"), "{alone}");
        let beyond = Launch::detect(spec(2, 2)).unwrap_err().to_string();
        assert!(beyond.contains("RANK counts from 0"), "{beyond}");
    }

    #[test]
    fn rows_split_a_batch_as_gradient_accumulation_does() {
        assert_eq!((0..3).map(|r| rows(r, 3, 8)).collect::<Vec<_>>(), vec![0..3, 3..6, 6..8]);
        assert_eq!((0..3).map(|r| rows(r, 3, 2)).collect::<Vec<_>>(), vec![0..1, 1..2, 2..2]);
    }
}
