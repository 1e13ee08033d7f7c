//! PyTorch's checkpoint formats, decoded by the restricted [`super::pickle`] reader:
//! - the zip format (`torch.save` since 1.6, and TorchScript's `torch.jit.save`): `<stem>/data.pkl` plus one record
//!   per storage in `<stem>/data/<key>`;
//! - the legacy format (before 1.6, e.g. pytorch-fid's Inception weights): consecutive pickles (magic number,
//!   protocol version, system info, the object, the storage keys), then each storage as an element count and its
//!   raw little-endian bytes.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::pickle::{unpickle, unpickle_prefix, StorageDType, TensorRef, Value};
use super::tensor_map::{HostTensor, TensorMap};
use super::CheckpointError;

/// The decoded top-level object of a `.pth` file and the storages it references.
pub struct PthArchive {
    /// The unpickled object.
    pub root: Value,
    storages: HashMap<String, Vec<u8>>,
}

impl PthArchive {
    /// Opens and decodes a `.pth` file.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Decodes a `.pth` file already in memory (`path` is only used in messages).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let invalid = |reason: String| CheckpointError::Invalid { path: path.to_path_buf(), reason };
        if bytes.first() == Some(&0x80) {
            return Self::from_legacy_bytes(bytes).map_err(|e| invalid(format!("legacy PyTorch checkpoint: {e}")));
        }
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
            invalid(format!("not a PyTorch zip checkpoint ({e}); the file may be truncated or of another format"))
        })?;
        let names: Vec<String> = zip.file_names().map(str::to_string).collect();
        let pkl = names
            .iter()
            .find(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
            .ok_or_else(|| invalid("the archive has no data.pkl; it is not a torch.save checkpoint".into()))?
            .clone();
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        if let Some(order) = names.iter().find(|n| **n == format!("{prefix}byteorder")) {
            let mut text = String::new();
            zip.by_name(order)
                .map_err(|e| invalid(e.to_string()))?
                .read_to_string(&mut text)
                .map_err(|e| invalid(e.to_string()))?;
            if text.trim() != "little" {
                return Err(invalid(format!("byte order '{}' is not supported (only little-endian)", text.trim())));
            }
        }
        let mut read = |name: &str| -> Result<Vec<u8>, CheckpointError> {
            let mut file = zip.by_name(name).map_err(|e| invalid(format!("record {name}: {e}")))?;
            let mut buf = Vec::with_capacity(file.size() as usize);
            file.read_to_end(&mut buf)
                .map_err(|e| invalid(format!("record {name} is unreadable ({e}); the file may be truncated")))?;
            Ok(buf)
        };
        let root = unpickle(&read(&pkl)?).map_err(|e| invalid(e.to_string()))?;
        let data_prefix = format!("{prefix}data/");
        let mut storages = HashMap::new();
        for name in names.iter().filter(|n| n.starts_with(&data_prefix)) {
            let key = name[data_prefix.len()..].to_string();
            if !key.is_empty() && !key.contains('/') {
                storages.insert(key, read(name)?);
            }
        }
        Ok(Self { root, storages })
    }

    fn from_legacy_bytes(bytes: &[u8]) -> Result<Self, String> {
        // protocol 2, LONG1 of 10 bytes: 0x1950a86a20f9469cfc6c, STOP.
        const MAGIC: [u8; 15] = [0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.'];
        if !bytes.starts_with(&MAGIC) {
            return Err("the file starts with a pickle but not with torch.save's magic number; it is not a PyTorch \
                        checkpoint"
                .into());
        }
        let truncated = |what: &str| format!("{what} is truncated or corrupt; download the file again");
        let mut pos = MAGIC.len();
        let mut next = |what: &str| -> Result<Value, String> {
            let (value, used) = unpickle_prefix(&bytes[pos..]).map_err(|e| format!("{}: {e}", truncated(what)))?;
            pos += used;
            Ok(value)
        };
        let _protocol = next("the protocol version")?;
        if let Value::Dict(info) = next("the system info")? {
            if matches!(dict_get(&info, "little_endian"), Some(Value::Bool(false))) {
                return Err("big-endian checkpoints are not supported".into());
            }
        }
        let root = next("the pickled object")?;
        let Value::List(keys) = next("the storage list")? else {
            return Err("the storage list is not a list".into());
        };
        let mut dtypes = HashMap::new();
        collect_storages(&root, &mut dtypes);
        let mut storages = HashMap::new();
        for key in keys {
            let Value::Str(key) = key else { return Err("a storage key is not a string".into()) };
            let dtype = *dtypes.get(&key).ok_or_else(|| format!("storage {key} is listed but never used"))?;
            let count = bytes.get(pos..pos + 8).ok_or_else(|| truncated(&format!("storage {key}")))?;
            let count = u64::from_le_bytes(count.try_into().unwrap()) as usize;
            let len = count.checked_mul(dtype.size()).ok_or_else(|| truncated(&format!("storage {key}")))?;
            let data = bytes.get(pos + 8..pos + 8 + len).ok_or_else(|| truncated(&format!("storage {key}")))?;
            storages.insert(key, data.to_vec());
            pos += 8 + len;
        }
        Ok(Self { root, storages })
    }

    /// Materialises a tensor view as a contiguous host tensor.
    pub fn tensor(&self, t: &TensorRef) -> Result<HostTensor, String> {
        let bytes = self
            .storages
            .get(&t.storage.key)
            .ok_or_else(|| format!("storage record data/{} is missing from the archive", t.storage.key))?;
        let size = t.storage.dtype.size();
        let available = bytes.len() / size;
        let numel: usize = t.shape.iter().product();
        // Walk the strided view in row-major order.
        let mut offsets = Vec::with_capacity(numel);
        if numel > 0 {
            let mut index = vec![0usize; t.shape.len()];
            loop {
                let off = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
                if off >= available {
                    return Err(format!(
                        "tensor reads element {off} of a storage with {available} elements; the file is truncated \
                         or corrupt"
                    ));
                }
                offsets.push(off);
                let mut d = t.shape.len();
                loop {
                    if d == 0 {
                        break;
                    }
                    d -= 1;
                    index[d] += 1;
                    if index[d] < t.shape[d] {
                        break;
                    }
                    index[d] = 0;
                }
                if index.iter().all(|&i| i == 0) {
                    break;
                }
            }
        }
        let gathered: Vec<u8> = offsets.iter().flat_map(|&o| &bytes[o * size..(o + 1) * size]).copied().collect();
        let data = t.storage.dtype.decode(&gathered);
        Ok(HostTensor { shape: t.shape.clone(), data, stored_dtype: format!("{:?}", t.storage.dtype) })
    }

    /// Every tensor of a `{name: tensor}` dict, e.g. a state_dict.
    pub fn tensors_of(&self, dict: &[(Value, Value)]) -> Result<TensorMap, String> {
        let mut map = TensorMap::new();
        for (k, v) in dict {
            let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
                continue;
            };
            map.insert(name.clone(), self.tensor(t).map_err(|e| format!("{name}: {e}"))?);
        }
        Ok(map)
    }
}

/// The element type of every storage a value references.
fn collect_storages(value: &Value, out: &mut HashMap<String, StorageDType>) {
    match value {
        Value::Storage(s) => {
            out.insert(s.key.clone(), s.dtype);
        }
        Value::Tensor(t) => {
            out.insert(t.storage.key.clone(), t.storage.dtype);
        }
        Value::Tuple(items) | Value::List(items) => items.iter().for_each(|v| collect_storages(v, out)),
        Value::Dict(pairs) | Value::Object { attributes: pairs, .. } => pairs.iter().for_each(|(k, v)| {
            collect_storages(k, out);
            collect_storages(v, out)
        }),
        _ => {}
    }
}

/// Looks a key up in a pickled dict.
pub fn dict_get<'a>(dict: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    dict.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v)
}
