//! `lfm inspect`, `lfm convert` and `lfm velocity` end to end, and architecture inference from weights.

use lfm::backend::Cpu;
use lfm::checkpoint::{collect_weights, read_safetensors, read_weights, write_safetensors, TensorMap};
use lfm::models::dit::dit_keys;
use lfm::models::{DiTConfig, ModelConfig};

use crate::common::*;

fn config_file(dir: &std::path::Path, case: &str) -> String {
    let path = dir.join(format!("{case}.json"));
    std::fs::write(&path, ModelConfig::Dit(crate::dit::config(case)).to_json()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn dit_architecture_is_inferred_from_names_and_shapes() {
    let config = DiTConfig::named("DiT-S/4", 16, 4, 10, 0.1).unwrap();
    let weights = collect_weights(&config.init::<Cpu>(&cpu()), &dit_keys());
    assert_eq!(ModelConfig::infer(&weights).unwrap(), ModelConfig::Dit(config));
    let unconditional = DiTConfig::named("DiT-S/2", 8, 4, 1, 0.0).unwrap();
    let weights = collect_weights(&unconditional.init::<Cpu>(&cpu()), &dit_keys());
    assert_eq!(ModelConfig::infer(&weights).unwrap(), ModelConfig::Dit(unconditional));
}

#[test]
fn inspect_explains_what_cannot_be_inferred_and_reads_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture("dit_tiny/model.pth");
    let ckpt = ckpt.to_str().unwrap();
    let (ok, _, stderr) = lfm(&["inspect", ckpt]);
    assert!(!ok);
    assert!(stderr.contains("number of heads is unknown; pass --config"), "{stderr}");
    let (ok, stdout, stderr) = lfm(&["inspect", ckpt, "--config", &config_file(dir.path(), "dit_tiny"), "--tensors"]);
    assert!(ok, "{stderr}");
    // golden/README: 32 tensors, 181520 values.
    assert!(stdout.contains("parameters: 181520") && stdout.contains("32 tensors"), "{stdout}");
    assert!(stdout.contains("blocks.1.attn.qkv.weight") && stdout.contains("[192, 64]"), "{stdout}");
}

#[test]
fn convert_then_velocity_reproduces_the_reference_with_and_without_cfg() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // Unconditional: convert the .pth, then evaluate the golden inputs with no flags at all.
    let cfg = config_file(dir.path(), "dit_tiny");
    let (ok, _, stderr) = lfm(&[
        "convert",
        fixture("dit_tiny/model.pth").to_str().unwrap(),
        "--config",
        &cfg,
        "--out",
        &p("tiny.safetensors"),
    ]);
    assert!(ok, "{stderr}");
    assert!(read_weights(dir.path().join("tiny.safetensors").as_path()).unwrap().config_json.is_some());
    let input = fixture("dit_tiny/io.safetensors");
    let (checkpoint, output) = (p("tiny.safetensors"), p("v.safetensors"));
    let evaluate = || {
        lfm(&[
            "--backend",
            "cpu",
            "velocity",
            "--checkpoint",
            &checkpoint,
            "--input",
            input.to_str().unwrap(),
            "--output",
            &output,
        ])
    };
    let (ok, _, stderr) = evaluate();
    assert!(ok, "{stderr}");
    let v = read_safetensors(&dir.path().join("v.safetensors")).unwrap().0;
    assert_close("v", &v["v"].to_f32(), &get(&io("dit_tiny"), "v").to_f32(), 1e-5, 1e-6);

    // An existing output is never overwritten without --force.
    let (ok, _, stderr) = evaluate();
    assert!(!ok && stderr.contains("exists; pass --force"), "{stderr}");

    // CFG: LFM's doubled batch in, forward_with_cfg out.
    let golden = io("dit_tiny_cond_cfg");
    let inputs: TensorMap = [("x", "cfg.x"), ("t", "cfg.t"), ("y", "cfg.y")]
        .into_iter()
        .map(|(k, g)| (k.to_string(), get(&golden, g).clone()))
        .collect();
    write_safetensors(&dir.path().join("cfg_in.safetensors"), &inputs, None).unwrap();
    let (ok, _, stderr) = lfm(&[
        "--backend",
        "cpu",
        "velocity",
        "--checkpoint",
        fixture("dit_tiny_cond_cfg/model.pth").to_str().unwrap(),
        "--config",
        &config_file(dir.path(), "dit_tiny_cond_cfg"),
        "--input",
        &p("cfg_in.safetensors"),
        "--output",
        &p("cfg_v.safetensors"),
        "--cfg-scale",
        "1.5",
    ]);
    assert!(ok, "{stderr}");
    let v = read_safetensors(&dir.path().join("cfg_v.safetensors")).unwrap().0;
    assert_close("cfg.v", &v["v"].to_f32(), &get(&golden, "cfg.v").to_f32(), 1e-5, 1e-6);
}

#[test]
fn a_missing_checkpoint_is_one_clear_line() {
    let (ok, _, stderr) = lfm(&["inspect", "/no/such/model_475.pth"]);
    assert!(!ok);
    assert!(stderr.starts_with("error: /no/such/model_475.pth: no such file"), "{stderr}");
}

/// Both UNets need no flags at all: their architecture is inferred from the `.pth`, and `lfm velocity` reproduces
/// the reference; labels are refused for an unconditional UNet and CFG for the guided one.
#[test]
fn unet_checkpoints_evaluate_with_no_flags() {
    let dir = tempfile::tempdir().unwrap();
    for (case, family) in [("adm_origin_tiny", "guided-diffusion UNet"), ("adm_edm_tiny", "EDM DhariwalUNet")] {
        let ckpt = fixture(&format!("{case}/model.pth"));
        let (ok, stdout, stderr) = lfm(&["inspect", ckpt.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains(&format!("network: {family} (inferred from the weights)")), "{stdout}");
        let output = dir.path().join(format!("{case}.safetensors"));
        let input = fixture(&format!("{case}/io.safetensors"));
        let velocity = |extra: &[&str]| {
            let mut args = vec![
                "--backend",
                "cpu",
                "velocity",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
                "--force",
            ];
            args.extend_from_slice(extra);
            lfm(&args)
        };
        let (ok, _, stderr) = velocity(&[]);
        assert!(ok, "{stderr}");
        let v = read_safetensors(&output).unwrap().0;
        assert_close(case, &v["v"].to_f32(), &get(&io(case), "v").to_f32(), 1e-5, 1e-6);
        if case == "adm_origin_tiny" {
            let (ok, _, stderr) = velocity(&["--cfg-scale", "2"]);
            assert!(!ok && stderr.contains("not defined for the guided-diffusion UNet"), "{stderr}");
        }
    }
    // Labels for an unconditional UNet.
    let mut inputs = io("adm_edm_tiny");
    inputs.insert("y".into(), lfm::checkpoint::HostTensor::i64(vec![2], vec![0, 1]));
    let labelled = dir.path().join("labelled.safetensors");
    write_safetensors(&labelled, &inputs, None).unwrap();
    let (ok, _, stderr) = lfm(&[
        "--backend",
        "cpu",
        "velocity",
        "--checkpoint",
        fixture("adm_edm_tiny/model.pth").to_str().unwrap(),
        "--input",
        labelled.to_str().unwrap(),
        "--output",
        dir.path().join("never.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("unconditional: it takes no labels"), "{stderr}");
}
