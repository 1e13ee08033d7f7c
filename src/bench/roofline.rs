//! Hand-written WGSL probes (`shaders/`) that measure a GPU's memory bandwidth and FMA rate through wgpu, so that
//! kernel benchmarks can report their fraction of the roofline.

use std::time::{Duration, Instant};

use wgpu::util::DeviceExt;

/// What the probes measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Roofline {
    /// The adapter the probes ran on.
    pub adapter: String,
    /// Streaming copy bandwidth, GB/s (10⁹ bytes per second, reads + writes).
    pub bandwidth_gbps: f64,
    /// f32 FMA throughput, GFLOP/s (an FMA counts as two).
    pub fma_gflops: f64,
}

/// Why the probes could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No adapter.
    #[error("no wgpu adapter for the roofline probes: {0}")]
    NoAdapter(String),
    /// The adapter refused a device.
    #[error("the wgpu adapter refused a device for the roofline probes: {0}")]
    Device(String),
    /// A wait on the GPU failed.
    #[error("waiting for the roofline probe failed: {0}")]
    Poll(String),
}

const BANDWIDTH_WGSL: &str = include_str!("../../shaders/bandwidth.wgsl");
const FMA_WGSL: &str = include_str!("../../shaders/fma.wgsl");
/// Matches `ITERATIONS` and the four vec4 chains of `shaders/fma.wgsl`.
const FLOPS_PER_INVOCATION: f64 = 256.0 * 4.0 * 4.0 * 2.0;
const WORKGROUP: u32 = 256;

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
}

impl Gpu {
    fn pipeline(&self, source: &str) -> wgpu::ComputePipeline {
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        })
    }

    /// Runs `dispatches` copies of the dispatch in one submission and waits: seconds.
    fn time(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bind: &wgpu::BindGroup,
        groups: (u32, u32),
        dispatches: u32,
    ) -> Result<f64, ProbeError> {
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bind, &[]);
            for _ in 0..dispatches {
                pass.dispatch_workgroups(groups.0, groups.1, 1);
            }
        }
        let start = Instant::now();
        self.queue.submit([encoder.finish()]);
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| ProbeError::Poll(e.to_string()))?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// Best time per dispatch, growing the batch of dispatches until one submission takes `min_time`.
    fn best_per_dispatch(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bind: &wgpu::BindGroup,
        groups: (u32, u32),
        min_time: Duration,
    ) -> Result<f64, ProbeError> {
        self.time(pipeline, bind, groups, 1)?; // compile and warm up
        let mut dispatches = 1u32;
        loop {
            let seconds = self.time(pipeline, bind, groups, dispatches)?;
            if seconds >= min_time.as_secs_f64() || dispatches >= 1 << 12 {
                let mut best = seconds / dispatches as f64;
                for _ in 0..2 {
                    best = best.min(self.time(pipeline, bind, groups, dispatches)? / dispatches as f64);
                }
                return Ok(best);
            }
            dispatches *= 2;
        }
    }
}

/// Measures the default high-performance adapter's bandwidth and FMA rate (about a second on a software adapter).
pub fn measure() -> Result<Roofline, ProbeError> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| ProbeError::NoAdapter(e.to_string()))?;
    let name = adapter.get_info().name;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
        .map_err(|e| ProbeError::Device(e.to_string()))?;
    let gpu = Gpu { device, queue };
    let min_time = Duration::from_millis(50);

    // Bandwidth: 64 MiB in, 64 MiB out (under wgpu's default 128 MiB binding limit).
    let bytes: u64 = 64 << 20;
    let vec4s = (bytes / 16) as u32;
    let src = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &vec![0u8; bytes as usize],
        usage: wgpu::BufferUsages::STORAGE,
    });
    let dst = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let copy = gpu.pipeline(BANDWIDTH_WGSL);
    let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &copy.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: src.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: dst.as_entire_binding() },
        ],
    });
    let groups = vec4s.div_ceil(WORKGROUP);
    let (x, y) = (groups.min(32768), groups.div_ceil(32768));
    let copy_seconds = gpu.best_per_dispatch(&copy, &bind, (x, y), min_time)?;

    // FMA rate: 1024 workgroups of 256 invocations.
    let groups = 1024u32;
    let out = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (groups * WORKGROUP) as u64 * 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let fma = gpu.pipeline(FMA_WGSL);
    let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &fma.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry { binding: 0, resource: out.as_entire_binding() }],
    });
    let fma_seconds = gpu.best_per_dispatch(&fma, &bind, (groups, 1), min_time)?;

    Ok(Roofline {
        adapter: name,
        bandwidth_gbps: 2.0 * bytes as f64 / copy_seconds / 1e9,
        fma_gflops: (groups * WORKGROUP) as f64 * FLOPS_PER_INVOCATION / fma_seconds / 1e9,
    })
}
