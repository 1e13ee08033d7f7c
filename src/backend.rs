//! Backends and device selection: `cpu` (Burn's ndarray backend), `wgpu` (WGSL through wgpu: Vulkan, Metal,
//! DX12, and Mesa's lavapipe) and `cuda` (cargo feature). The concrete backend is chosen here, once, and every
//! command is generic over [`burn::tensor::backend::Backend`] below that point.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;

/// The CPU backend: pure Rust, SIMD, multi-threaded.
pub type Cpu = burn::backend::NdArray<f32>;

/// The same CPU backend in float64 (for analytic ODE tests).
pub type Cpu64 = burn::backend::NdArray<f64>;

/// wgpu through CubeCL, without Burn's fusion layer (its fusion/autotune correctness bugs on repeated graphs are
/// exactly what an ODE loop exercises).
pub type Wgpu = lfm_kernels::WgpuCube;

/// NVIDIA GPUs through CubeCL's CUDA runtime, also without the fusion layer (and so with lfm's own kernels).
#[cfg(feature = "cuda")]
pub type Cuda = lfm_kernels::CudaCube;

pub use burn::backend::wgpu::WgpuDevice;

/// CubeCL's configuration files, looked for from the working folder up (CubeCL's own lookup): when one exists it
/// configures CubeCL and [`keep_kernel_caches`] leaves everything to it.
const CUBECL_CONFIG_FILES: [&str; 4] = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"];

/// Keeps compiled CUDA kernels (PTX) and autotune results between runs in `<user cache>/lfm/cubecl` (e.g.
/// `~/.cache/lfm/cubecl`), so that only the first run on a machine pays NVRTC compilation and autotuning: on an
/// H200 the built-in model's first `lfm sample` compiled over 400 kernels and took longer than a minute.
/// CubeCL's defaults compile every kernel in every process and keep autotune results in the `target/` folder of
/// whatever Cargo project the command runs in. A `cubecl.toml`/`burn.toml` (see [`CUBECL_CONFIG_FILES`]) takes
/// precedence, and CubeCL's environment variables (`CUBECL_AUTOTUNE_LEVEL`, `CUBECL_DEBUG_LOG`…) still apply.
/// Where the cache folder cannot be created, CubeCL's defaults stay. Returns the folder in use, if any.
///
/// CubeCL keys a compiled kernel by its Rust type name and compile-time settings, not by its code or the GPU: a
/// new build of lfm with a changed kernel body would load the old PTX. Compiled kernels therefore go in a
/// subfolder per executable (`ptx-<size and time of this binary>`); autotune results, which CubeCL checks
/// itself, are shared. After replacing the GPU with another model, delete the folder.
///
/// Must run before any GPU work (CubeCL reads its configuration once, and setting it twice panics): `lfm` does
/// not call it directly but through [`keep_kernel_caches_when_a_gpu_is_selected`], once, when [`select`] first
/// picks a GPU, so CPU-only commands leave the user's cache folder alone.
pub fn keep_kernel_caches() -> Option<std::path::PathBuf> {
    use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    use std::hash::{Hash, Hasher};
    let cwd = std::env::current_dir().ok()?;
    if cwd.ancestors().any(|dir| CUBECL_CONFIG_FILES.iter().any(|name| dir.join(name).is_file())) {
        return None;
    }
    let root = dirs::cache_dir()?.join("lfm").join("cubecl");
    let exe = std::fs::metadata(std::env::current_exe().ok()?).ok()?;
    let mut build = std::collections::hash_map::DefaultHasher::new();
    (exe.len(), exe.modified().ok()).hash(&mut build);
    let ptx = root.join(format!("ptx-{}-{:016x}", env!("CARGO_PKG_VERSION"), build.finish()));
    std::fs::create_dir_all(&ptx).ok()?;
    let mut config = CubeClRuntimeConfig::default().override_from_env();
    config.compilation.cache = Some(CacheConfig::File(ptx));
    config.autotune.cache = CacheConfig::File(root.clone());
    CubeClRuntimeConfig::set(config);
    Some(root)
}

/// Set by [`keep_kernel_caches_when_a_gpu_is_selected`]: the process wants [`keep_kernel_caches`] on its first GPU.
static KERNEL_CACHES_WANTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The outcome of the one [`keep_kernel_caches`] call a process makes.
static KERNEL_CACHES: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Asks [`select`] to call [`keep_kernel_caches`] (once per process) the first time it picks a GPU, before the GPU
/// runtime starts (selection itself only probes the driver and wgpu, not CubeCL). For programs that own their
/// process, such as `lfm`'s `main`; a library embedding lfm keeps CubeCL's defaults unless it calls this.
pub fn keep_kernel_caches_when_a_gpu_is_selected() {
    KERNEL_CACHES_WANTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// What the user asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// CUDA if compiled in and a device exists, else a hardware wgpu adapter, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// wgpu's default adapter (a software adapter such as lavapipe if that is all there is).
    Wgpu,
    /// CUDA device 0.
    Cuda,
}

impl FromStr for BackendChoice {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" | "ndarray" => Ok(Self::Cpu),
            "wgpu" | "gpu" | "vulkan" | "metal" | "dx12" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(BackendError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}

/// Why no backend could be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// Not a backend name.
    #[error("unknown backend '{0}': use auto, cpu, wgpu or cuda")]
    Unknown(String),
    /// CUDA was asked for in a build without it.
    #[error("this lfm was built without CUDA: rebuild with `cargo build --release --features cuda`, or use --backend wgpu/cpu")]
    CudaNotCompiled,
    /// CUDA is compiled in but unusable here.
    #[error("no usable CUDA device: {0}. Install the NVIDIA driver (libcuda) and NVRTC, or use --backend wgpu/cpu")]
    NoCudaDevice(String),
    /// Data parallelism asked for more devices than there are.
    #[error("--data-parallel {wanted} needs {wanted} {what}, but {found} were found: lower --data-parallel")]
    TooFewDevices {
        /// Devices asked for.
        wanted: usize,
        /// Devices found.
        found: usize,
        /// Of what kind.
        what: String,
    },
    /// A process of a multi-process run has no device of its own (one CUDA device per process: NCCL cannot sum
    /// between two processes on one GPU).
    #[error(
        "local rank {local_rank} (with --data-parallel {count}) needs {what} {}–{}, but {found} were found: start at \
         most {} process(es) per node (e.g. `mpirun --npernode`, `torchrun --nproc-per-node`) or lower --data-parallel",
        .local_rank * .count,
        (.local_rank + 1) * .count - 1,
        (.found / .count).max(1)
    )]
    NoDeviceForRank {
        /// The process's rank on its node.
        local_rank: usize,
        /// Devices per process.
        count: usize,
        /// Devices found.
        found: usize,
        /// Of what kind.
        what: String,
    },
    /// No wgpu adapter at all.
    #[error(
        "no GPU adapter found through wgpu (Vulkan/Metal/DX12). Install a GPU driver — on Debian/Ubuntu without a GPU, \
         `apt-get install mesa-vulkan-drivers` gives the lavapipe software adapter — or use --backend cpu"
    )]
    NoWgpuAdapter,
}

/// A concrete device on one of the compiled-in backends.
#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// A wgpu adapter.
    Wgpu(WgpuDevice),
    /// A CUDA device by index.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => {
                write!(f, "cpu (ndarray, {} threads)", std::thread::available_parallelism().map_or(1, |n| n.get()))
            }
            Device::Wgpu(d) => write!(f, "wgpu {d:?}"),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// One wgpu adapter as the system reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AdapterReport {
    /// Adapter name (e.g. "NVIDIA H200", "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// Discrete, integrated, virtual, CPU or other.
    pub device_type: String,
    /// Vulkan, Metal, DX12, GL or BrowserWebGpu.
    pub api: String,
    /// Driver name and version.
    pub driver: String,
    /// Largest storage buffer binding, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Workgroup (shared) memory per workgroup, bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Whether it is real hardware (not a software rasteriser).
    pub hardware: bool,
}

/// Lists the wgpu adapters of the compute APIs (Vulkan, Metal, DX12) on this platform.
pub fn wgpu_adapters() -> Vec<AdapterReport> {
    // The compute APIs CubeCL targets; OpenGL/EGL is not one of them.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters
        .into_iter()
        .map(|adapter| {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let hardware = matches!(
                info.device_type,
                wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::VirtualGpu
            );
            AdapterReport {
                name: info.name,
                device_type: format!("{:?}", info.device_type),
                api: format!("{:?}", info.backend),
                driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
                max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
                max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
                hardware,
            }
        })
        .collect()
}

/// CUDA devices (name per index), or why there are none.
pub fn cuda_devices() -> Result<Vec<String>, BackendError> {
    #[cfg(feature = "cuda")]
    {
        // Probe without touching CubeCL, which panics when libcuda is absent.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(BackendError::NoCudaDevice("libcuda.so (the NVIDIA driver) was not found".into()));
        }
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| BackendError::NoCudaDevice(format!("the driver reports {e:?}")))?;
        if count <= 0 {
            return Err(BackendError::NoCudaDevice("the driver reports 0 devices".into()));
        }
        Ok((0..count as usize)
            .map(|i| {
                cudarc::driver::CudaContext::new(i)
                    .and_then(|ctx| ctx.name())
                    .unwrap_or_else(|e| format!("device {i} ({e:?})"))
            })
            .collect())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(BackendError::CudaNotCompiled)
    }
}

/// Resolves `--backend` to a device, logging the choice.
pub fn select(choice: BackendChoice) -> Result<Device, BackendError> {
    let device = match choice {
        BackendChoice::Cpu => Device::Cpu,
        BackendChoice::Wgpu => {
            let adapters = wgpu_adapters();
            if adapters.is_empty() {
                return Err(BackendError::NoWgpuAdapter);
            }
            // wgpu's default adapter is a hardware one whenever there is one; with only a software rasteriser
            // (lavapipe), lfm's products skip autotuning and its largest kernels (see lfm_kernels::matmul).
            let software = !adapters.iter().any(|a| a.hardware);
            lfm_kernels::matmul::set_software_adapter(software);
            Device::Wgpu(WgpuDevice::DefaultDevice)
        }
        BackendChoice::Cuda => cuda_device()?,
        BackendChoice::Auto => auto_device(),
    };
    tracing::info!(backend = %choice, device = %device, "selected device");
    if device != Device::Cpu && KERNEL_CACHES_WANTED.load(std::sync::atomic::Ordering::Relaxed) {
        match KERNEL_CACHES.get_or_init(keep_kernel_caches) {
            Some(dir) => tracing::debug!("GPU kernel and autotune caches in {}", dir.display()),
            None => tracing::debug!("GPU kernel caches: CubeCL's own configuration"),
        }
    }
    Ok(device)
}

/// Selects every backend of a comma-separated list such as `"cpu,wgpu,cuda"`, for tools that cover several backends
/// in one run (the benchmarks): each name with its device, or with the reason it cannot be used here.
pub fn select_each(names: &str) -> Vec<(String, Result<Device, BackendError>)> {
    names
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| (name.to_string(), name.parse().and_then(select)))
        .collect()
}

fn cuda_device() -> Result<Device, BackendError> {
    #[cfg(feature = "cuda")]
    {
        cuda_devices().map(|_| Device::Cuda(0))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(BackendError::CudaNotCompiled)
    }
}

/// The first of `count` devices for data parallelism (`lfm train --data-parallel`) of the process with rank
/// `local_rank` on its node (one process per GPU: its devices start `local_rank × count` after the chosen one),
/// checked to exist: the replicas are the devices with the next indices of the same kind. On wgpu the default adapter
/// becomes a hardware GPU of the most capable kind with enough of them; where there are fewer GPUs than processes
/// and each process uses one, processes share them round-robin (MPI sums on the host, so that works, slower); a
/// machine without a hardware GPU keeps its one adapter (e.g. lavapipe) for every process. The CPU takes any count
/// (the copies share it). CUDA needs a device per process (NCCL).
pub fn data_parallel_device(device: Device, local_rank: usize, count: usize) -> Result<Device, BackendError> {
    let count = count.max(1);
    let first = local_rank * count;
    if first + count <= 1 {
        return Ok(device);
    }
    let missing = |found: usize, what: &str| {
        if local_rank == 0 {
            BackendError::TooFewDevices { wanted: count, found, what: what.into() }
        } else {
            BackendError::NoDeviceForRank { local_rank, count, found, what: what.into() }
        }
    };
    match device {
        Device::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            let found = cuda_devices()?.len();
            if i + first + count > found {
                return Err(missing(found.saturating_sub(i), "CUDA devices"));
            }
            Ok(Device::Cuda(i + first))
        }
        Device::Wgpu(chosen) => {
            let adapters = wgpu_adapters();
            let count_of = |t: &str| adapters.iter().filter(|a| a.device_type == t).count();
            let (discrete, integrated) = (count_of("DiscreteGpu"), count_of("IntegratedGpu"));
            if discrete >= first + count {
                return Ok(Device::Wgpu(WgpuDevice::DiscreteGpu(first)));
            }
            if integrated >= first + count {
                return Ok(Device::Wgpu(WgpuDevice::IntegratedGpu(first)));
            }
            if count == 1 {
                // More processes than GPUs: they share them.
                let shared = if discrete > 0 {
                    WgpuDevice::DiscreteGpu(local_rank % discrete)
                } else if integrated > 0 {
                    WgpuDevice::IntegratedGpu(local_rank % integrated)
                } else {
                    chosen
                };
                tracing::warn!(local_rank, device = ?shared, "more processes than wgpu GPUs on this node: sharing");
                return Ok(Device::Wgpu(shared));
            }
            Err(missing(discrete.max(integrated), "wgpu GPUs of one kind"))
        }
    }
}

/// What `--backend auto` picks: CUDA, else a hardware wgpu adapter, else the CPU.
pub fn auto_device() -> Device {
    if let Ok(device) = cuda_device() {
        return device;
    }
    let adapters = wgpu_adapters();
    let has = |t: &str| adapters.iter().any(|a| a.device_type == t);
    if has("DiscreteGpu") {
        Device::Wgpu(WgpuDevice::DiscreteGpu(0))
    } else if has("IntegratedGpu") {
        Device::Wgpu(WgpuDevice::IntegratedGpu(0))
    } else if has("VirtualGpu") {
        Device::Wgpu(WgpuDevice::VirtualGpu(0))
    } else {
        Device::Cpu
    }
}

/// Work that runs on whichever backend was selected: the one place a concrete backend type is named.
pub trait OnBackend {
    /// What the work returns.
    type Output;
    /// Runs on backend `B` and its `device`.
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the backend of `device`.
pub fn dispatch<T: OnBackend>(device: &Device, task: T) -> T::Output {
    match device {
        Device::Cpu => task.run::<Cpu>(Default::default()),
        Device::Wgpu(d) => task.run::<Wgpu>(d.clone()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => task.run::<Cuda>(burn::backend::cuda::CudaDevice { index: *i }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_beyond_the_first_get_their_own_device_or_a_clear_error() {
        // The CPU takes any number of processes and replicas.
        assert!(matches!(data_parallel_device(Device::Cpu, 3, 2), Ok(Device::Cpu)));
        let hardware =
            wgpu_adapters().iter().any(|a| matches!(a.device_type.as_str(), "DiscreteGpu" | "IntegratedGpu"));
        if hardware {
            eprintln!("skipped the wgpu cases: this machine has a hardware GPU (they assume none)");
            return;
        }
        // Without a hardware GPU (lavapipe or no adapter), one replica per process shares the chosen adapter...
        let chosen = Device::Wgpu(WgpuDevice::DefaultDevice);
        assert!(matches!(data_parallel_device(chosen.clone(), 1, 1), Ok(Device::Wgpu(WgpuDevice::DefaultDevice))));
        // ...but replicas within a process need GPUs of their own, and the error says whose.
        let first = data_parallel_device(chosen.clone(), 0, 2).unwrap_err().to_string();
        assert!(first.contains("--data-parallel 2 needs 2 wgpu GPUs of one kind, but 0 were found"), "{first}");
        let second = data_parallel_device(chosen, 1, 2).unwrap_err().to_string();
        assert!(second.contains("local rank 1 (with --data-parallel 2) needs wgpu GPUs of one kind 2–3"), "{second}");
        assert!(second.contains("at most 1 process(es) per node"), "{second}");
    }
}
