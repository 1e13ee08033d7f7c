//! Reading and writing weights: LFM's `.pth` files (torch zip pickles, read by a restricted unpickler, written as
//! `torch.save` writes a state_dict),
//! `.safetensors` in PyTorch layout, and our own format (safetensors with the model config in its metadata).

mod apply;
pub mod pickle;
mod pth;
mod pth_write;
mod tensor_map;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(crate) use apply::recognise;
pub use apply::{apply_weights, collect_grads, collect_weights, KeyMap, LoadReport};
pub use pth::{dict_get, PthArchive};
pub use pth_write::write_pth;
pub use tensor_map::{parameter_count, strip_module_prefix, HostData, HostTensor, TensorMap};

use pickle::{StorageDType, Value};

/// Metadata key under which our own safetensors files keep the model configuration (JSON).
pub const CONFIG_METADATA_KEY: &str = "lfm.config";

/// Why weights could not be read, written or applied.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    // The cause is part of the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The file is not a checkpoint of a supported kind, or is damaged.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The weights do not fit the model.
    #[error("the weights do not match the model:\n{0}")]
    Mismatch(LoadReport),
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        let hint = match source.kind() {
            std::io::ErrorKind::NotFound => std::io::Error::new(source.kind(), "no such file; check the path"),
            _ => source,
        };
        Self::Io { path: path.to_path_buf(), cause: hint }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_path_buf(), reason: reason.into() }
    }
}

/// Weights read from a file, plus our own config when the file carries one.
#[derive(Debug, Clone)]
pub struct LoadedWeights {
    /// The tensors, with any `module.` prefix removed.
    pub tensors: TensorMap,
    /// The `lfm.config` metadata of our own safetensors files.
    pub config_json: Option<String>,
    /// LFM's training flags (`args`, an argparse Namespace) when the file is a `content.pth` snapshot.
    pub lfm_args: Option<serde_json::Value>,
}

/// Reads a model's weights from `.safetensors` or a PyTorch `.pth`/`.pt`/`.bin` zip checkpoint — a bare state_dict
/// (LFM's `model_<E>.pth`) or a dict holding one (`content.pth` → `model_dict`).
pub fn read_weights(path: &Path) -> Result<LoadedWeights, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    if bytes.len() >= 4 && &bytes[..4] == b"PK\x03\x04" || bytes.first() == Some(&0x80) {
        let archive = PthArchive::from_bytes(path, &bytes)?;
        let map = state_dict_of(path, &archive)?;
        let lfm_args = match &archive.root {
            Value::Dict(root) => dict_get(root, "args").and_then(namespace_to_json),
            _ => None,
        };
        return Ok(LoadedWeights { tensors: strip_module_prefix(map), config_json: None, lfm_args });
    }
    let (map, metadata) = read_safetensors_bytes(path, &bytes)?;
    Ok(LoadedWeights {
        tensors: strip_module_prefix(map),
        config_json: metadata.and_then(|m| m.get(CONFIG_METADATA_KEY).cloned()),
        lfm_args: None,
    })
}

/// The plain attributes of a pickled `argparse.Namespace` as a JSON object (other values are skipped).
fn namespace_to_json(value: &Value) -> Option<serde_json::Value> {
    fn plain(v: &Value) -> Option<serde_json::Value> {
        Some(match v {
            Value::None => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)?.into(),
            Value::Str(s) => s.clone().into(),
            Value::List(items) | Value::Tuple(items) => items.iter().map(plain).collect::<Option<Vec<_>>>()?.into(),
            _ => return None,
        })
    }
    let Value::Object { attributes, .. } = value else { return None };
    let attributes = match attributes.as_slice() {
        // BUILD with a (dict, slots) pair or a plain dict.
        [(Value::Str(_), _), ..] => attributes.clone(),
        _ => return None,
    };
    let map: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .filter_map(|(k, v)| match k {
            Value::Str(k) => plain(v).map(|v| (k.clone(), v)),
            _ => None,
        })
        .collect();
    Some(serde_json::Value::Object(map))
}

fn state_dict_of(path: &Path, archive: &PthArchive) -> Result<TensorMap, CheckpointError> {
    if let Value::Object { class, .. } = &archive.root {
        if class.starts_with("__torch__.") {
            let mut map = TensorMap::new();
            torchscript_tensors(archive, &archive.root, "", &mut map).map_err(|e| CheckpointError::invalid(path, e))?;
            if map.is_empty() {
                return Err(CheckpointError::invalid(path, "the TorchScript module holds no tensors"));
            }
            return Ok(map);
        }
    }
    let Value::Dict(root) = &archive.root else {
        return Err(CheckpointError::invalid(path, "the pickle does not hold a dict; expected a state_dict"));
    };
    let has_tensors = root.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    let dict = if has_tensors {
        root
    } else {
        // Training snapshots keep the weights one level down.
        let nested = ["model_dict", "state_dict", "model", "ema"].iter().find_map(|k| match dict_get(root, k) {
            Some(Value::Dict(d)) => Some(d),
            _ => None,
        });
        nested.ok_or_else(|| {
            CheckpointError::invalid(
                path,
                "the checkpoint holds no tensors at the top level nor under model_dict/state_dict/model/ema",
            )
        })?
    };
    let map = archive.tensors_of(dict).map_err(|e| CheckpointError::invalid(path, e))?;
    if map.is_empty() {
        return Err(CheckpointError::invalid(path, "the state_dict holds no tensors"));
    }
    Ok(map)
}

/// The parameters and buffers of a TorchScript module (`torch.jit.save`), named by their attribute paths as a
/// `state_dict` would name them (`layers.conv.weight`).
fn torchscript_tensors(archive: &PthArchive, module: &Value, prefix: &str, map: &mut TensorMap) -> Result<(), String> {
    let Value::Object { attributes, .. } = module else { return Ok(()) };
    for (key, value) in attributes {
        let Value::Str(name) = key else { continue };
        match value {
            Value::Tensor(t) => {
                let name = format!("{prefix}{name}");
                let tensor = archive.tensor(t).map_err(|e| format!("{name}: {e}"))?;
                map.insert(name, tensor);
            }
            Value::Object { class, .. } if class.starts_with("__torch__.") => {
                torchscript_tensors(archive, value, &format!("{prefix}{name}."), map)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads every tensor and the metadata of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<(TensorMap, Option<HashMap<String, String>>), CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    read_safetensors_bytes(path, &bytes)
}

/// Reads every tensor and the metadata of safetensors bytes (`path` names them in errors).
pub fn read_safetensors_bytes(
    path: &Path,
    bytes: &[u8],
) -> Result<(TensorMap, Option<HashMap<String, String>>), CheckpointError> {
    use safetensors::{tensor::Dtype, SafeTensors};
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
        CheckpointError::invalid(
            path,
            format!("not a readable .safetensors or PyTorch checkpoint ({e}); the file may be truncated"),
        )
    })?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::invalid(path, format!("corrupt safetensors file: {e}")))?;
    let mut map = TensorMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => StorageDType::F32,
            Dtype::F64 => StorageDType::F64,
            Dtype::F16 => StorageDType::F16,
            Dtype::BF16 => StorageDType::BF16,
            Dtype::I64 => StorageDType::I64,
            Dtype::I32 => StorageDType::I32,
            Dtype::I16 => StorageDType::I16,
            Dtype::I8 => StorageDType::I8,
            Dtype::U8 => StorageDType::U8,
            Dtype::BOOL => StorageDType::Bool,
            other => {
                return Err(CheckpointError::invalid(path, format!("tensor {name} has unsupported dtype {other:?}")))
            }
        };
        let data = dtype.decode(view.data());
        map.insert(
            name,
            HostTensor { shape: view.shape().to_vec(), data, stored_dtype: format!("{:?}", view.dtype()) },
        );
    }
    Ok((map, metadata.metadata().clone()))
}

/// Writes tensors as safetensors, atomically (a temporary file in the same folder, then a rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    use safetensors::tensor::{Dtype, TensorView};
    let buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match &t.data {
                HostData::F32(v) => (Dtype::F32, bytemuck::cast_slice(v).to_vec()),
                HostData::F64(v) => (Dtype::F64, bytemuck::cast_slice(v).to_vec()),
                HostData::I64(v) => (Dtype::I64, bytemuck::cast_slice(v).to_vec()),
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::invalid(path, format!("cannot serialise: {e}")))?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| CheckpointError::invalid(path, format!("cannot serialise: {e}")))?;
    crate::io::write_atomic(path, &bytes).map_err(|e| CheckpointError::io(path, e))
}
