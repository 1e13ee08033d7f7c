//! The `lfm` binary: parse the command line, set up logging, hand over to [`lfm::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    keep_freed_memory_for_reuse();
    // Mesa's Vulkan drivers complain on stderr when no session runtime folder exists (headless machines, CI).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("lfm-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
    // Compiled kernels and autotune results kept between runs, set up when a command first selects a GPU.
    lfm::backend::keep_kernel_caches_when_a_gpu_is_selected();
    let cli = lfm::cli::Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("lfm={level},warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    // A panic inside a backend (e.g. a GPU runtime) becomes one readable line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        eprintln!("error: internal failure: {message}");
        if let Some(location) = info.location() {
            eprintln!("  at {location}; please report it, with the command line, at the lfm issue tracker");
        }
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
    }));
    match lfm::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps the CPU backend's tensor buffers in the heap once freed, instead of glibc's default of returning each buffer
/// over 128 KiB (its threshold grows only slowly) to the OS and faulting fresh zeroed pages in for the next one: the
/// ndarray backend allocates and frees every intermediate of every step. Measured on the built-in model's factor-2
/// DiT training on 2 cores: 46 against 42 samples/s; mimalloc and jemalloc (preloaded) were slower still than the
/// default. Buffers over glibc's largest mmap threshold (32 MiB: DiT-B/2's MLP activations at batch 32 are 100 MB)
/// were still mapped and unmapped every time, and the heap above 1 GiB of free memory trimmed and refaulted, so
/// neither happens any more: DiT-B/2 batch 32 (`lfm bench training`: four steps, then forward passes) took 8.0 M page
/// faults and 24–36 s of system time, now 2.1 M (the heap growing once, to the 8.3 GB peak) and 9 s, and 1.15–1.17
/// against 1.03–1.05 images/s. The process keeps its peak memory until it exits. `MALLOC_*_` environment variables,
/// when set, are left to glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_for_reuse() {
    let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if user_set {
        return;
    }
    // SAFETY: mallopt only changes the allocator's tuning parameters; it is called before any thread starts.
    unsafe {
        // No buffer is mapped on its own: all come from the heap (threads' arenas fall back to the main one for
        // buffers larger than their 64 MiB heaps), so freed ones are reused.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // Never give freed heap memory back to the OS (the next step needs it again); grow it 64 MiB at a time.
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Other platforms keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory_for_reuse() {}
