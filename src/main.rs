//! The `lfm` binary: parse the command line, set up logging, hand over to [`lfm::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
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
