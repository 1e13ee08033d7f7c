//! The `lfm` binary end to end: help, devices, and one-line errors for bad backends.

use crate::common::lfm;

#[test]
fn help_lists_the_commands() {
    let (ok, stdout, _) = lfm(&["--help"]);
    assert!(ok);
    assert!(stdout.contains("devices") && stdout.contains("--backend"), "{stdout}");
}

#[test]
fn devices_reports_what_auto_picks() {
    let (ok, stdout, stderr) = lfm(&["devices"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("--backend auto picks:"), "{stdout}");
    let (ok, stdout, stderr) = lfm(&["devices", "--json"]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(json["auto"].is_string() && json["wgpu_adapters"].is_array());
}

#[test]
fn an_unknown_backend_is_one_clear_line() {
    let (ok, _, stderr) = lfm(&["--backend", "tpu", "devices"]);
    assert!(!ok);
    assert!(stderr.contains("unknown backend 'tpu': use auto, cpu, wgpu or cuda"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cuda_without_a_driver_or_build_is_one_clear_error() {
    let (ok, _, stderr) = lfm(&["--backend", "cuda", "devices"]);
    if ok {
        return; // a machine with a working NVIDIA driver
    }
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("CUDA"), "{stderr}");
    assert!(stderr.contains("--backend wgpu/cpu"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `lfm bench kernels --json` on a tiny grid: every case reported with both timings; bad sizes refused.
#[test]
fn bench_kernels_reports_every_case_as_json() {
    let args = [
        "--backend",
        "cpu",
        "bench",
        "kernels",
        "--json",
        "--no-roofline",
        "--reps",
        "1",
        "--tokens",
        "8,5",
        "--head-dims",
        "4",
        "--latents",
        "1x2x3",
        "--batches",
        "1,2",
    ];
    let (ok, stdout, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let cases = report["cases"].as_array().unwrap();
    // 2 attention cases + 2 batches × (error ratio, step arithmetic).
    assert_eq!(cases.len(), 6, "{stdout}");
    assert_eq!(report["fused_kernels"], false, "the CPU has no fused kernels");
    for case in cases {
        assert!(case["fused_s"].as_f64().unwrap() > 0.0 && case["unfused_s"].as_f64().unwrap() > 0.0, "{case}");
    }
    let (ok, _, stderr) = lfm(&["--backend", "cpu", "bench", "kernels", "--head-dims", "512"]);
    assert!(!ok && stderr.contains("--head-dims"), "{stderr}");
    let (ok, _, stderr) = lfm(&["--backend", "cpu", "bench", "kernels", "--latents", "4x32"]);
    assert!(!ok && stderr.contains("CxHxW"), "{stderr}");
}
