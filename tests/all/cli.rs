//! The `lfm` binary end to end: help, devices, and one-line errors for bad backends.

use lfm::checkpoint::read_safetensors;

use crate::common::{cpu, lfm};

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
    let (ok, stdout, stderr) = lfm(&["--backend", "cuda", "devices"]);
    if ok {
        // A build with CUDA on a machine with a working NVIDIA driver: the devices are listed and one is selected.
        assert!(stdout.contains("CUDA devices:\n  [0] ") && stdout.contains("--backend cuda uses: "), "{stdout}");
        return;
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

/// `lfm bench sampling --json` and `lfm bench training --json` on the smallest DiT: every case reported with its
/// NFE and timings; an unsupported precision is skipped with the reason; an unknown size is refused.
#[test]
fn bench_sampling_and_training_report_their_cases_as_json() {
    let base = ["--backend", "cpu", "bench", "sampling", "--json", "--model", "DiT-S/8"];
    let args = [&base[..], &["--batches", "1,2", "--solvers", "euler,heun", "--steps", "2", "--precisions", "f32,f16"]];
    let (ok, stdout, stderr) = lfm(&args.concat());
    assert!(ok, "{stderr}");
    assert!(stderr.contains("f16: skipped") && stderr.contains("use --precision f32"), "{stderr}");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON cases");
    assert_eq!(cases.len(), 4, "2 batches × 2 solvers in f32: {stdout}");
    for case in &cases {
        let nfe = if case["solver"] == "euler" { 2 } else { 4 };
        assert_eq!(case["nfe"], nfe, "{case}");
        assert!(case["seconds_per_image"].as_f64().unwrap() > 0.0 && case["gflops"].as_f64().unwrap() > 0.0);
    }
    let (ok, _, stderr) = lfm(&[&base[..4], &["--model", "DiT-Q/3"]].concat());
    assert!(!ok && stderr.contains("unknown DiT size 'DiT-Q/3'"), "{stderr}");

    let args =
        ["--backend", "cpu", "bench", "training", "--json", "--models", "DiT-S/8", "--batch", "2", "--steps", "1"];
    let (ok, stdout, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON cases");
    assert_eq!(cases.len(), 1, "{stdout}");
    assert!(cases[0]["images_per_s"].as_f64().unwrap() > 0.0 && cases[0]["step_over_forward"].as_f64().unwrap() > 1.0);
}

/// `lfm bench forward|sampling|training --export DIR` writes what benches/torch/compare.py needs to run the same
/// cases in PyTorch: the random weights once per model (LFM's names), each case's inputs and lfm's outputs, and a
/// manifest line per case with lfm's measurement.
#[test]
fn bench_export_writes_weights_inputs_outputs_and_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("cases");
    let export = export.to_str().unwrap();
    let base = ["--backend", "cpu", "bench"];
    let forward =
        [&base[..], &["forward", "--json", "--models", "DiT-S/8", "--batches", "1,3", "--reps", "1"]].concat();
    let (ok, stdout, stderr) = lfm(&[&forward[..], &["--export", export]].concat());
    assert!(ok, "{stderr}");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON cases");
    assert_eq!(cases.len(), 2, "{stdout}");
    assert!(cases.iter().all(|c| c["seconds"].as_f64().unwrap() > 0.0 && c["precision"] == "f32"), "{stdout}");
    let sampling = ["sampling", "--model", "DiT-S/8", "--batches", "2", "--solvers", "euler", "--steps", "2"];
    let (ok, _, stderr) = lfm(&[&base[..], &sampling[..], &["--export", export]].concat());
    assert!(ok, "{stderr}");
    let training = ["training", "--models", "DiT-S/8", "--batch", "2", "--steps", "1", "--export", export];
    let (ok, _, stderr) = lfm(&[&base[..], &training[..]].concat());
    assert!(ok, "{stderr}");

    let manifest = std::fs::read_to_string(std::path::Path::new(export).join("cases.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = manifest.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["forward", "forward", "sampling", "training"], "{manifest}");
    assert!(records.iter().all(|r| r["backend"].is_string() && r["tf32"] == false), "{manifest}");
    let file = |r: &serde_json::Value, key: &str| std::path::Path::new(export).join(r[key].as_str().unwrap());
    // One weights file for the model, shared by its cases, loadable as the DiT it was drawn for.
    assert_eq!(records[0]["weights"], records[2]["weights"]);
    let weights = lfm::checkpoint::read_weights(&file(&records[0], "weights")).unwrap().tensors;
    let config = lfm::models::ModelConfig::Dit(lfm::models::DiTConfig::named("DiT-S/8", 32, 4, 1, 0.0).unwrap());
    lfm::models::VelocityModel::<lfm::backend::Cpu>::load(&config, &weights, &cpu()).unwrap();
    let tensors = |r: &serde_json::Value| read_safetensors(&file(r, "tensors")).unwrap().0;
    let io = tensors(&records[1]);
    assert_eq!((io["x"].shape.clone(), io["t"].shape.clone()), (vec![3, 4, 32, 32], vec![3]));
    assert_eq!(io["v"].shape, vec![3, 4, 32, 32]);
    let io = tensors(&records[2]);
    assert_eq!((io["x1"].shape.clone(), io["x0"].shape.clone()), (vec![2, 4, 32, 32], vec![2, 4, 32, 32]));
    assert_eq!(records[2]["case"]["nfe"], 2);
    assert!(records[3]["weights"].is_null() && records[3]["case"]["images_per_s"].as_f64().unwrap() > 0.0);
}

/// Zero counts and non-finite numbers are refused while parsing, naming the flag (a zero batch once ran as
/// batches of one, a NaN guidance scale as no guidance), and so are solver flags the solver would ignore; an output
/// folder that cannot be made is named.
#[test]
fn bad_numbers_and_folders_are_one_clear_line() {
    let refused = |args: &[&str], words: &[&str]| {
        let (ok, _, stderr) = lfm(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(words.iter().all(|w| stderr.contains(w)), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    refused(&["sample", "--batch-size", "0"], &["--batch-size", "must be at least 1"]);
    refused(&["sample", "-n", "0"], &["--num-samples", "must be at least 1"]);
    refused(&["sample", "--decode-batch", "0"], &["--decode-batch", "must be at least 1"]);
    refused(&["sample", "--nrow", "0"], &["--nrow", "must be at least 1"]);
    refused(&["sample", "--cfg-scale", "nan"], &["--cfg-scale", "must be a finite number ≥ 0"]);
    refused(&["sample", "--cfg-scale=-2"], &["--cfg-scale", "must be a finite number ≥ 0"]);
    // A negative number after a space is the flag's value, not an unknown flag.
    refused(&["sample", "--cfg-scale", "-2"], &["--cfg-scale", "must be a finite number ≥ 0"]);
    for interval in ["0.8,0.2", "0,2", "0.5", "a,b"] {
        refused(&["sample", "--cfg-interval", interval], &["--cfg-interval", "FROM,TO", "0,0.7"]);
    }
    refused(&["sample", "--cfg-scale", "1", "--cfg-interval", "0,0.5"], &["--cfg-interval", "--cfg-scale above 1"]);
    refused(&["train", "--latents", "l", "--out", "o", "--lr", "-0.0001"], &["--lr", "must be a finite number > 0"]);
    refused(&["sample", "--solver", "euler", "--steps", "0"], &["--steps", "must be at least 1"]);
    // Flags the chosen solver would ignore (the built-in model's default solver is euler).
    refused(&["sample", "--solver", "dopri5", "--steps", "5"], &["--steps", "dopri5", "--solver euler"]);
    refused(&["sample", "--solver", "euler", "--rtol", "1e-3"], &["--rtol", "euler", "--solver dopri5"]);
    refused(&["sample", "--atol", "1e-3"], &["--atol", "euler", "--solver dopri5"]);
    refused(&["fid-stats", "images", "--out", "s.npz", "--fid-batch-size", "0"], &["--fid-batch-size"]);
    refused(&["train", "--latents", "l", "--out", "o", "--lr", "0"], &["--lr", "must be a finite number > 0"]);
    refused(&["train", "--latents", "l", "--out", "o", "--lr", "inf"], &["--lr", "must be a finite number > 0"]);
    refused(&["train", "--latents", "l", "--out", "o", "--save-every", "0"], &["--save-every"]);
    refused(&["train-autoencoder", "--data", "d", "--out", "o", "--kl-weight", "nan"], &["--kl-weight"]);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let inside = file.join("samples");
    let inside = inside.to_str().unwrap();
    refused(
        &["--backend", "cpu", "sample", "-n", "1", "--out-dir", inside],
        &["cannot create the output folder", inside],
    );
}
