//! `lfm devices`.

use clap::Args;

use crate::backend::{self, BackendChoice};

/// Arguments of `lfm devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: DevicesArgs, choice: BackendChoice) -> anyhow::Result<()> {
    let adapters = backend::wgpu_adapters();
    let cuda = backend::cuda_devices();
    let auto = backend::auto_device();
    let selected = match choice {
        BackendChoice::Auto => Ok(auto.clone()),
        other => backend::select(other),
    };
    if args.json {
        let report = serde_json::json!({
            "wgpu_adapters": adapters,
            "cuda_devices": cuda.as_ref().ok(),
            "cuda_status": cuda.as_ref().err().map(|e| e.to_string()),
            "cpu_threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "auto": auto.to_string(),
            "selected": selected.as_ref().map(|d| d.to_string()).map_err(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("wgpu adapters:");
    if adapters.is_empty() {
        println!("  none (install a Vulkan/Metal/DX12 driver; without a GPU, mesa-vulkan-drivers gives lavapipe)");
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("  [{i}] {} — {} via {}{}", a.name, a.device_type, a.api, if a.hardware { "" } else { " (software)" });
        println!(
            "      driver: {}; max storage binding {} MiB, workgroup memory {} KiB, {} invocations/workgroup",
            if a.driver.is_empty() { "?" } else { &a.driver },
            a.max_storage_buffer_binding_size >> 20,
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup
        );
    }
    match &cuda {
        Ok(devices) => {
            println!("CUDA devices:");
            for (i, name) in devices.iter().enumerate() {
                println!("  [{i}] {name}");
            }
        }
        Err(e) => println!("CUDA: {e}"),
    }
    println!("CPU: {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("--backend auto picks: {auto}");
    if choice != BackendChoice::Auto {
        match selected {
            Ok(d) => println!("--backend {choice} uses: {d}"),
            Err(e) => anyhow::bail!(e),
        }
    }
    Ok(())
}
