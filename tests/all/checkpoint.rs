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
