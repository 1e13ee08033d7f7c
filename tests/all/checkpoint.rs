//! Checkpoint reading: LFM's `.pth` layout, safetensors, and clear errors for bad files and wrong architectures.

use std::io::Write;

use lfm::backend::Cpu;
use lfm::checkpoint::{read_weights, CheckpointError};
use lfm::models::{DiT, DiTConfig};

use crate::common::*;
use crate::dit::config;

#[test]
fn pth_and_safetensors_hold_the_same_tensors() {
    let pth = read_weights(&fixture("dit_tiny/model.pth")).unwrap().tensors;
    let st = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap().tensors;
    // The .pth keys carry `module.`; it is stripped.
    assert_eq!(pth.keys().collect::<Vec<_>>(), st.keys().collect::<Vec<_>>());
    assert_eq!(
        pth,
        st.into_iter()
            .map(|(k, mut v)| {
                v.stored_dtype = pth[&k].stored_dtype.clone();
                (k, v)
            })
            .collect()
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

#[test]
fn a_truncated_pth_is_refused_clearly() {
    let bytes = std::fs::read(fixture("dit_tiny/model.pth")).unwrap();
    let (_dir, path) = temp_file("model_475.pth", &bytes[..bytes.len() / 2]);
    let err = read_weights(&path).unwrap_err().to_string();
    assert!(err.contains("model_475.pth") && err.contains("truncated"), "{err}");
}

#[test]
fn a_truncated_safetensors_is_refused_clearly() {
    let bytes = std::fs::read(fixture("dit_tiny/model.safetensors")).unwrap();
    let (_dir, path) = temp_file("model.safetensors", &bytes[..bytes.len() - 100]);
    let err = read_weights(&path).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_refused_clearly() {
    let (_dir, path) = temp_file("notes.txt", b"these are not weights");
    let err = read_weights(&path).unwrap_err().to_string();
    assert!(err.contains("notes.txt") && err.contains("not a readable"), "{err}");
    let missing = read_weights(std::path::Path::new("/nonexistent/model.pth")).unwrap_err();
    assert!(matches!(missing, CheckpointError::Io { .. }));
    assert!(missing.to_string().contains("/nonexistent/model.pth"), "{missing}");
}

#[test]
fn a_pickle_with_a_forbidden_global_is_refused_without_running_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.pth");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("evil/data.pkl", options).unwrap();
    // protocol 2: os.system('touch <marker>')
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    let mut pickle = vec![0x80, 2];
    pickle.extend_from_slice(b"cposix\nsystem\nq\x00X");
    pickle.extend_from_slice(&(command.len() as u32).to_le_bytes());
    pickle.extend_from_slice(command.as_bytes());
    pickle.extend_from_slice(b"\x85R.");
    zip.write_all(&pickle).unwrap();
    zip.finish().unwrap();
    let err = read_weights(&path).unwrap_err().to_string();
    assert!(err.contains("posix.system") && err.contains("refusing"), "{err}");
    assert!(!marker.exists());
}

#[test]
fn wrong_architecture_flags_are_explained_key_by_key() {
    let weights = read_weights(&fixture("dit_tiny/model.pth")).unwrap().tensors;
    // hidden_size 128 instead of 64: every width disagrees.
    let wrong = DiTConfig { hidden_size: 128, ..config("dit_tiny") };
    let err = DiT::<Cpu>::load(&wrong, &weights, &cpu()).unwrap_err();
    let CheckpointError::Mismatch(report) = &err else { panic!("{err}") };
    assert!(report.missing.is_empty() && report.unexpected.is_empty());
    let (key, file, model) = report.shape_mismatches.iter().find(|m| m.0 == "blocks.0.attn.qkv.weight").unwrap();
    assert_eq!(
        (key.as_str(), file.as_slice(), model.as_slice()),
        ("blocks.0.attn.qkv.weight", &[192, 64][..], &[384, 128][..])
    );
    assert!(err.to_string().contains("file [192, 64], model [384, 128]"), "{err}");

    // depth 3 instead of 2: block 2 is missing. A missing and an unexpected key are both named.
    let deeper = DiTConfig { depth: 3, ..config("dit_tiny") };
    let mut extra = weights.clone();
    extra.insert("blocks.0.attn.extra".into(), extra["pos_embed"].clone());
    let CheckpointError::Mismatch(report) = DiT::<Cpu>::load(&deeper, &extra, &cpu()).unwrap_err() else { panic!() };
    assert!(report.missing.contains(&"blocks.2.attn.qkv.weight".to_string()), "{report}");
    assert_eq!(report.unexpected, vec!["blocks.0.attn.extra".to_string()]);
}

/// The raw (unstripped) keys and tensors of a `.pth` state_dict.
fn raw_state_dict(path: &std::path::Path) -> lfm::checkpoint::TensorMap {
    let archive = lfm::checkpoint::PthArchive::open(path).unwrap();
    let lfm::checkpoint::pickle::Value::Dict(dict) = &archive.root else { panic!("{}: not a dict", path.display()) };
    archive.tensors_of(dict).unwrap()
}

/// `lfm export` writes LFM's layout: the same `module.`-prefixed keys and values as LFM's own `model_<E>.pth`
/// (the golden file was written by `torch.save` from LFM's code).
#[test]
fn export_writes_the_layout_of_lfm_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let golden = fixture("dit_tiny/model.pth");
    let weights = read_weights(&golden).unwrap().tensors;
    let config = lfm::models::ModelConfig::Dit(config("dit_tiny")).to_json();
    let metadata =
        std::collections::HashMap::from([(lfm::checkpoint::CONFIG_METADATA_KEY.to_string(), config.clone())]);
    let model = dir.path().join("model.safetensors");
    lfm::checkpoint::write_safetensors(&model, &weights, Some(metadata)).unwrap();

    let out = dir.path().join("model_5.pth");
    let (ok, stdout, stderr) = lfm(&["export", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("keys prefixed \"module.\""), "{stdout}");
    let (ours, theirs) = (raw_state_dict(&out), raw_state_dict(&golden));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (key, want) in &theirs {
        assert_eq!((&ours[key].shape, ours[key].to_f32()), (&want.shape, want.to_f32()), "{key}");
    }
    // Never overwritten without --force; without the prefix on request.
    let (ok, _, stderr) = lfm(&["export", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("pass --force"), "{stderr}");
    let plain = dir.path().join("plain.pth");
    let (ok, _, stderr) =
        lfm(&["export", model.to_str().unwrap(), "--out", plain.to_str().unwrap(), "--no-module-prefix"]);
    assert!(ok, "{stderr}");
    assert_eq!(raw_state_dict(&plain).keys().collect::<Vec<_>>(), weights.keys().collect::<Vec<_>>());

    // Integer and double tensors keep their type.
    let mixed = lfm::checkpoint::TensorMap::from([
        ("y".to_string(), lfm::checkpoint::HostTensor::i64(vec![3], vec![1, -2, 1 << 40])),
        ("scale".to_string(), lfm::checkpoint::HostTensor::f32(vec![], vec![0.18215])),
    ]);
    let path = dir.path().join("mixed.pth");
    lfm::checkpoint::write_pth(&path, &mixed, "").unwrap();
    assert_eq!(raw_state_dict(&path)["y"].to_i64(), vec![1, -2, 1 << 40]);
    assert_eq!(raw_state_dict(&path)["scale"].shape, Vec::<usize>::new());

    // Weights that do not fit their own config are refused before anything is written.
    let mut broken = weights.clone();
    broken.remove("final_layer.linear.weight");
    let metadata = std::collections::HashMap::from([(lfm::checkpoint::CONFIG_METADATA_KEY.to_string(), config)]);
    lfm::checkpoint::write_safetensors(&model, &broken, Some(metadata)).unwrap();
    let refused = dir.path().join("refused.pth");
    let (ok, _, stderr) = lfm(&["export", model.to_str().unwrap(), "--out", refused.to_str().unwrap()]);
    assert!(!ok && stderr.contains("final_layer.linear.weight") && !refused.exists(), "{stderr}");
}
