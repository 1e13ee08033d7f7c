//! What the plain-harness benchmarks share.

// Each bench uses the part it needs.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use lfm::backend::{dispatch, select_each, OnBackend};

/// A benchmark's body for one backend: `backend` names it in the printed lines.
pub trait BackendBench {
    /// Runs the cases on backend `B`.
    fn run<B: Backend>(&self, backend: &str, device: &B::Device);
}

/// A bench bound to one backend's name, as [`dispatch`] wants it.
struct OnNamed<'a, T> {
    name: String,
    bench: &'a T,
}

impl<T: BackendBench> OnBackend for OnNamed<'_, T> {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) {
        self.bench.run::<B>(&self.name, &device);
    }
}

/// Runs `bench` on every backend of `LFM_BENCH_BACKENDS` (default `cpu,wgpu`; `cuda` with that feature); backends
/// that cannot run here are skipped with the reason.
pub fn for_each_backend(bench: &impl BackendBench) {
    let names = std::env::var("LFM_BENCH_BACKENDS").unwrap_or_else(|_| "cpu,wgpu".into());
    for (name, device) in select_each(&names) {
        match device {
            Ok(device) => dispatch(&device, OnNamed { name, bench }),
            Err(e) => println!("{name}: skipped ({e})"),
        }
    }
}

/// A numeric setting from the environment, `default` when unset; a value that is not a number stops the bench
/// with a message naming the variable (a silent fallback would time the wrong case).
pub fn env_number(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{var}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// The median wall time of `reps` (at least 1) runs of `run`, after one untimed warm-up run.
pub fn median_time(reps: usize, mut run: impl FnMut()) -> Duration {
    run();
    let mut times: Vec<Duration> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
