//! `--export DIR` of `lfm bench forward|sampling|training`: what a PyTorch script needs to run the very same case
//! (`benches/torch/compare.py`): the random weights, the inputs and lfm's outputs as safetensors, and one line per
//! case in `DIR/cases.jsonl` with lfm's measurement, the backend and the files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::checkpoint::{write_safetensors, HostTensor, TensorMap};

/// The manifest's file name inside the export folder.
pub const MANIFEST: &str = "cases.jsonl";

/// An export folder.
#[derive(Debug, Clone)]
pub struct Export {
    dir: PathBuf,
}

/// One manifest line.
#[derive(Debug, serde::Serialize)]
struct Record<'a, C: serde::Serialize> {
    /// `forward`, `sampling` or `training`.
    kind: &'a str,
    /// The backend that ran the case (`Backend::name`).
    backend: String,
    /// Whether f32 products could use TF32 (`--tf32`).
    tf32: bool,
    /// The weights file, relative to the folder.
    weights: Option<&'a str>,
    /// The inputs/outputs file, relative to the folder.
    tensors: Option<&'a str>,
    /// lfm's measurement.
    case: &'a C,
}

impl Export {
    /// Creates the folder (and its parents) when missing.
    pub fn new(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the export folder {}: {e}", dir.display()))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// A file name made of `parts`, safe on every file system (`DiT-B/2` → `DiT-B-2`).
    pub fn file_name(parts: &[&str]) -> String {
        let joined = parts.join("-").replace(['/', ' '], "-");
        format!("{joined}.safetensors")
    }

    /// The file name of one case's tensors on `B`: [`Self::file_name`] of `parts` and the backend, marked `tf32` when
    /// f32 products may use TF32 (the same case on another backend, or with `--tf32`, must not overwrite these
    /// outputs).
    pub fn case_file<B: Backend>(device: &B::Device, parts: &[&str]) -> String {
        let backend: String =
            B::name(device).chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let mut parts = parts.to_vec();
        parts.push(backend.trim_matches('-'));
        if lfm_kernels::matmul::tf32_allowed() {
            parts.push("tf32");
        }
        Self::file_name(&parts)
    }

    /// Writes `tensors` as `name` (atomically) and returns the name.
    pub fn tensors(&self, name: String, tensors: &TensorMap) -> Result<String, String> {
        write_safetensors(&self.dir.join(&name), tensors, None).map_err(|e| e.to_string())?;
        Ok(name)
    }

    /// Writes the weights of `model` drawn from `seed` unless an earlier case wrote them (the same seed always gives
    /// the same weights); returns the file name.
    pub fn weights(&self, model: &str, seed: u64, weights: impl FnOnce() -> TensorMap) -> Result<String, String> {
        let name = Self::file_name(&["weights", model, &format!("seed{seed}")]);
        if !self.dir.join(&name).exists() {
            self.tensors(name.clone(), &weights())?;
        }
        Ok(name)
    }

    /// Appends one case to the manifest.
    pub fn record<B: Backend, C: serde::Serialize>(
        &self,
        kind: &str,
        device: &B::Device,
        weights: Option<&str>,
        tensors: Option<&str>,
        case: &C,
    ) -> Result<(), String> {
        let record = Record {
            kind,
            backend: B::name(device),
            tf32: lfm_kernels::matmul::tf32_allowed(),
            weights,
            tensors,
            case,
        };
        let line = serde_json::to_string(&record).map_err(|e| e.to_string())?;
        let path = self.dir.join(MANIFEST);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"))
            .map_err(|e| format!("cannot append to {}: {e}", path.display()))
    }
}

/// A named set of host tensors.
pub fn named<const N: usize>(tensors: [(&str, HostTensor); N]) -> TensorMap {
    tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>()
}
