//! What the plain-harness benchmarks share.

use lfm::backend::{dispatch, select_each, OnBackend};

/// Runs a benchmark on every backend of `LFM_BENCH_BACKENDS` (default `cpu,wgpu`; `cuda` with that feature),
/// `task` making it for each backend name; backends that cannot run here are skipped with the reason.
pub fn for_each_backend<T: OnBackend>(task: impl Fn(String) -> T) {
    let names = std::env::var("LFM_BENCH_BACKENDS").unwrap_or_else(|_| "cpu,wgpu".into());
    for (name, device) in select_each(&names) {
        match device {
            Ok(device) => {
                dispatch(&device, task(name));
            }
            Err(e) => println!("{name}: skipped ({e})"),
        }
    }
}
