//! `lfm bench kernels|sampling|training`.

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::backend::{self, BackendChoice, Device, OnBackend};
use crate::bench::{
    bench_forward, bench_kernels, bench_sampling, bench_training, roofline, ForwardBenchOptions, ForwardCase,
    KernelBenchOptions, KernelCase, KernelReport, SamplingBenchOptions, SamplingCase, TrainingBenchOptions,
    TrainingCase,
};
use crate::models::Precision;
use crate::solver::Method;

/// Arguments of `lfm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to benchmark.
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// lfm's fused CubeCL kernels (attention, dopri5 step) against the plain Burn expressions, with the device's
    /// roofline from WGSL bandwidth/FMA probes.
    Kernels(KernelsArgs),
    /// Seconds per forward pass of DiT sizes (random weights) per batch size and precision.
    Forward(ForwardArgs),
    /// Seconds per image and NFE of a DiT (random weights) solved from noise to data, per solver, batch size and
    /// precision.
    Sampling(SamplingArgs),
    /// Training throughput (images/s) of DiT sizes on 4×32×32 latents, against the forward pass alone.
    Training(TrainingArgs),
}

/// Arguments of `lfm bench sampling`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// A DiT size (on 4×32×32 latents).
    #[arg(long, default_value = "DiT-B/2")]
    pub model: String,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batches: Vec<usize>,
    /// Solvers (dopri5 at rtol = atol = 1e-5; fixed-step methods at --steps steps).
    #[arg(long, value_delimiter = ',', default_value = "dopri5,euler")]
    pub solvers: Vec<Method>,
    /// Steps of the fixed-step solvers.
    #[arg(long, default_value_t = 100, value_parser = super::count)]
    pub steps: usize,
    /// Weight precisions.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub precisions: Vec<Precision>,
    /// One untimed solve per case first (GPU backends compile and autotune kernels on first use).
    #[arg(long)]
    pub warmup: bool,
    /// Print the cases as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write each case's weights, noise and result, and a line in DIR/cases.jsonl, for
    /// benches/torch/compare.py to run the same solve in PyTorch.
    #[arg(long, value_name = "DIR")]
    pub export: Option<std::path::PathBuf>,
}

/// Arguments of `lfm bench forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// DiT sizes (on 4×32×32 latents).
    #[arg(long, value_delimiter = ',', default_value = "DiT-B/2,DiT-XL/2")]
    pub models: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = super::count)]
    pub batches: Vec<usize>,
    /// Precisions.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub precisions: Vec<Precision>,
    /// Timed passes per case after one untimed pass (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = super::count)]
    pub reps: usize,
    /// Print the cases as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write each case's weights, inputs and output, and a line in DIR/cases.jsonl, for
    /// benches/torch/compare.py to run the same pass in PyTorch.
    #[arg(long, value_name = "DIR")]
    pub export: Option<std::path::PathBuf>,
}

/// Arguments of `lfm bench training`.
#[derive(Debug, Args)]
pub struct TrainingArgs {
    /// DiT sizes (on 4×32×32 latents).
    #[arg(long, value_delimiter = ',', default_value = "DiT-S/2,DiT-B/2")]
    pub models: Vec<String>,
    /// Images per step.
    #[arg(long, default_value_t = 8, value_parser = super::count)]
    pub batch: usize,
    /// Timed steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 3, value_parser = super::count)]
    pub steps: usize,
    /// Mixed precision of the passes (the weights and optimiser stay f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Print the cases as JSON.
    #[arg(long)]
    pub json: bool,
    /// Add a line per case to DIR/cases.jsonl, for benches/torch/compare.py to time the same step in PyTorch.
    #[arg(long, value_name = "DIR")]
    pub export: Option<std::path::PathBuf>,
}

/// Arguments of `lfm bench kernels`.
#[derive(Debug, Args)]
pub struct KernelsArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = super::count)]
    pub reps: usize,
    /// Attention: batch × heads per case.
    #[arg(long, default_value_t = 1, value_parser = super::count)]
    pub heads: usize,
    /// Attention: token counts.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub tokens: Vec<usize>,
    /// Attention: head dimensions.
    #[arg(long, value_delimiter = ',', default_value = "64,72")]
    pub head_dims: Vec<usize>,
    /// RK step: latent shapes as CxHxW.
    #[arg(long, value_delimiter = ',', default_value = "4x32x32,4x64x64", value_parser = parse_latent)]
    pub latents: Vec<[usize; 3]>,
    /// RK step: batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batches: Vec<usize>,
    /// Skip the WGSL roofline probes.
    #[arg(long)]
    pub no_roofline: bool,
}

fn parse_latent(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<usize> =
        s.split('x').map(|p| p.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    match parts[..] {
        [c, h, w] if c * h * w > 0 => Ok([c, h, w]),
        _ => Err(format!("'{s}' is not a latent shape CxHxW such as 4x32x32")),
    }
}

struct Kernels {
    options: KernelBenchOptions,
    device_name: String,
    roofline: Result<roofline::Roofline, String>,
    json: bool,
}

impl OnBackend for Kernels {
    type Output = Result<KernelReport, String>;

    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output {
        let json = self.json;
        Ok(bench_kernels::<B>(&device, self.device_name, &self.options, self.roofline, |case| {
            if !json {
                print_case(case);
            }
        }))
    }
}

fn print_case(c: &KernelCase) {
    let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64));
    let roof = c.roofline_fraction.map_or("?".to_string(), |f| format!("{:.1}%", 100.0 * f));
    let burn = c.burn_op_s.map_or(String::new(), |s| format!("  (Burn's op {:.3} ms)", s * 1e3));
    println!(
        "{:<24} {:<40} fused {:>9.3} ms  unfused {:>9.3} ms  ×{:>6.2}  peak MiB {:>7} vs {:>7}  roofline {:>6}{burn}",
        c.kernel,
        c.shape,
        c.fused_s * 1e3,
        c.unfused_s * 1e3,
        c.speedup,
        mib(c.fused_peak_bytes),
        mib(c.unfused_peak_bytes),
        roof
    );
}

struct Sampling {
    options: SamplingBenchOptions,
    json: bool,
}

impl OnBackend for Sampling {
    type Output = Result<Vec<SamplingCase>, String>;

    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output {
        let json = self.json;
        let on_case = |c: &SamplingCase| {
            if !json {
                println!(
                    "{} {:4} {:6} batch {:3}: NFE {:4}  {:9.4} s per image  {:9.1} GFLOP/s",
                    c.model, c.precision, c.solver, c.batch, c.nfe, c.seconds_per_image, c.gflops
                );
            }
        };
        let on_skip = |p: Precision, why: String| eprintln!("{}: skipped ({why})", p.name());
        bench_sampling::<B>(&device, &self.options, on_case, on_skip)
    }
}

struct Forward {
    options: ForwardBenchOptions,
    json: bool,
}

impl OnBackend for Forward {
    type Output = Result<Vec<ForwardCase>, String>;

    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output {
        let json = self.json;
        let on_case = |c: &ForwardCase| {
            if !json {
                println!(
                    "{} {:4} batch {:3}: {:9.3} ms per pass  {:9.1} images/s  {:9.1} GFLOP/s",
                    c.model,
                    c.precision,
                    c.batch,
                    c.seconds * 1e3,
                    c.images_per_s,
                    c.gflops
                );
            }
        };
        let on_skip = |p: Precision, why: String| eprintln!("{}: skipped ({why})", p.name());
        bench_forward::<B>(&device, &self.options, on_case, on_skip)
    }
}

struct Training {
    options: TrainingBenchOptions,
    json: bool,
}

impl OnBackend for Training {
    type Output = Result<Vec<TrainingCase>, String>;

    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output {
        let json = self.json;
        bench_training::<B>(&device, &self.options, |c| {
            if !json {
                println!(
                    "{} {} batch {}: {:.2} images/s training ({:.4} s per step); forward alone {:.2} images/s; \
                     step/forward {:.2}",
                    c.model,
                    c.precision,
                    c.batch,
                    c.images_per_s,
                    c.step_s,
                    c.forward_images_per_s,
                    c.step_over_forward
                );
            }
        })
    }
}

pub(crate) fn run(args: BenchArgs, choice: BackendChoice) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Kernels(args) => run_kernels(args, choice),
        BenchWhat::Forward(args) => run_forward(args, choice),
        BenchWhat::Sampling(args) => run_sampling(args, choice),
        BenchWhat::Training(args) => run_training(args, choice),
    }
}

/// The selected device, named on stdout unless the output is JSON.
fn selected(choice: BackendChoice, json: bool) -> anyhow::Result<Device> {
    let device = backend::select(choice)?;
    if !json {
        println!("device: {device}");
    }
    Ok(device)
}

/// Runs a benchmark on `device` (its cases print as they finish), then prints its result as JSON when asked.
fn report<R: Serialize, T: OnBackend<Output = Result<R, String>>>(
    device: &Device,
    task: T,
    json: bool,
) -> anyhow::Result<R> {
    let result = backend::dispatch(device, task).map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(result)
}

fn run_kernels(args: KernelsArgs, choice: BackendChoice) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tokens.iter().all(|&t| t > 0) && args.batches.iter().all(|&b| b > 0),
        "--tokens and --batches must be positive"
    );
    anyhow::ensure!(
        args.head_dims.iter().all(|&d| (1..=lfm_kernels::attention::MAX_HEAD_DIM).contains(&d)),
        "--head-dims must lie in 1..={}",
        lfm_kernels::attention::MAX_HEAD_DIM
    );
    let device = selected(choice, args.json)?;
    let roofline = if args.no_roofline {
        Err("skipped (--no-roofline)".to_string())
    } else {
        roofline::measure().map_err(|e| e.to_string())
    };
    if !args.json {
        match &roofline {
            Ok(r) => println!(
                "roofline ({}): {:.1} GB/s copy bandwidth, {:.1} GFLOP/s f32 FMA",
                r.adapter, r.bandwidth_gbps, r.fma_gflops
            ),
            Err(e) => println!("roofline: {e}"),
        }
    }
    let options = KernelBenchOptions {
        reps: args.reps,
        heads: args.heads,
        tokens: args.tokens,
        head_dims: args.head_dims,
        latents: args.latents,
        batches: args.batches,
    };
    let task = Kernels { options, device_name: device.to_string(), roofline, json: args.json };
    let report = report(&device, task, args.json)?;
    if !args.json && !report.fused_kernels {
        println!(
            "note: lfm's kernels do not run on this backend (on CUDA they are off unless {}=1); both columns ran \
             the plain Burn expressions",
            lfm_kernels::CUDA_KERNELS_VAR
        );
    }
    Ok(())
}

fn run_sampling(args: SamplingArgs, choice: BackendChoice) -> anyhow::Result<()> {
    anyhow::ensure!(args.batches.iter().all(|&b| b > 0), "--batches must be positive");
    let device = selected(choice, args.json)?;
    let options = SamplingBenchOptions {
        model: args.model,
        batches: args.batches,
        solvers: args.solvers,
        steps: args.steps,
        precisions: args.precisions,
        warmup: args.warmup,
        export: args.export,
    };
    report(&device, Sampling { options, json: args.json }, args.json)?;
    Ok(())
}

fn run_forward(args: ForwardArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let device = selected(choice, args.json)?;
    let options = ForwardBenchOptions {
        models: args.models,
        batches: args.batches,
        precisions: args.precisions,
        reps: args.reps,
        export: args.export,
    };
    report(&device, Forward { options, json: args.json }, args.json)?;
    Ok(())
}

fn run_training(args: TrainingArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let device = selected(choice, args.json)?;
    let options = TrainingBenchOptions {
        models: args.models,
        batch: args.batch,
        steps: args.steps,
        precision: args.precision,
        export: args.export,
    };
    report(&device, Training { options, json: args.json }, args.json)?;
    Ok(())
}
