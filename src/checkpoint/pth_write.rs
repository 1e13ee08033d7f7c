//! Writing a `state_dict` as `torch.save` does (PyTorch's zip format: `archive/data.pkl`, one raw little-endian
//! storage per tensor under `archive/data/`, `archive/version`, `archive/byteorder`), so that LFM's own scripts
//! `torch.load` lfm's weights. The pickle holds only what `torch.load(weights_only=True)` accepts:
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and the typed storages.

use std::io::Write;
use std::path::Path;

use super::{CheckpointError, HostData, TensorMap};

/// Pickle protocol-2 opcodes used here.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

/// A pickle stream under construction.
struct Pickler(Vec<u8>);

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(op::GLOBAL);
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn str(&mut self, s: &str) {
        self.0.push(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: usize) {
        match i32::try_from(v) {
            Ok(small) => {
                self.0.push(op::BININT);
                self.0.extend_from_slice(&small.to_le_bytes());
            }
            Err(_) => {
                // Two's-complement little-endian with a clear sign bit, as pickle's LONG1 wants.
                self.0.extend_from_slice(&[op::LONG1, 9]);
                self.0.extend_from_slice(&(v as u64).to_le_bytes());
                self.0.push(0);
            }
        }
    }

    fn int_tuple(&mut self, values: impl IntoIterator<Item = usize>) {
        self.0.push(op::MARK);
        for v in values {
            self.int(v);
        }
        self.0.push(op::TUPLE);
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
    }
}

/// Writes `tensors` as a `torch.save`d `OrderedDict` state_dict, each key prefixed by `prefix` (LFM's checkpoints
/// carry DDP's `module.`), atomically.
pub fn write_pth(path: &Path, tensors: &TensorMap, prefix: &str) -> Result<(), CheckpointError> {
    let mut pickle = Pickler(vec![op::PROTO, 2]);
    pickle.empty_ordered_dict();
    pickle.0.push(op::MARK);
    for (index, (key, tensor)) in tensors.iter().enumerate() {
        let storage = match tensor.data {
            HostData::F32(_) => "FloatStorage",
            HostData::F64(_) => "DoubleStorage",
            HostData::I64(_) => "LongStorage",
        };
        pickle.str(&format!("{prefix}{key}"));
        pickle.global("torch._utils", "_rebuild_tensor_v2");
        pickle.0.push(op::MARK);
        // The storage, as a persistent id: ('storage', type, key, location, numel).
        pickle.0.push(op::MARK);
        pickle.str("storage");
        pickle.global("torch", storage);
        pickle.str(&index.to_string());
        pickle.str("cpu");
        pickle.int(tensor.numel());
        pickle.0.extend_from_slice(&[op::TUPLE, op::BINPERSID]);
        // Offset, size, contiguous strides, requires_grad, backward hooks.
        pickle.int(0);
        pickle.int_tuple(tensor.shape.iter().copied());
        let strides: Vec<usize> =
            (0..tensor.shape.len()).map(|d| tensor.shape[d + 1..].iter().product::<usize>()).collect();
        pickle.int_tuple(strides);
        pickle.0.push(op::NEWFALSE);
        pickle.empty_ordered_dict();
        pickle.0.extend_from_slice(&[op::TUPLE, op::REDUCE]);
    }
    pickle.0.extend_from_slice(&[op::SETITEMS, op::STOP]);

    let invalid = |e: zip::result::ZipError| CheckpointError::invalid(path, format!("cannot write the zip: {e}"));
    let io = |e: std::io::Error| CheckpointError::io(path, e);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    // Stored, and each entry's data 64-byte aligned as torch writes them (so `torch.load(mmap=True)` works too).
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).with_alignment(64);
    let mut entry = |name: &str, bytes: &[u8]| -> Result<(), CheckpointError> {
        zip.start_file(format!("archive/{name}"), options).map_err(invalid)?;
        zip.write_all(bytes).map_err(io)
    };
    entry("data.pkl", &pickle.0)?;
    entry("byteorder", b"little")?;
    for (index, tensor) in tensors.values().enumerate() {
        let bytes: &[u8] = match &tensor.data {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F64(v) => bytemuck::cast_slice(v),
            HostData::I64(v) => bytemuck::cast_slice(v),
        };
        entry(&format!("data/{index}"), bytes)?;
    }
    entry("version", b"3\n")?;
    let bytes = zip.finish().map_err(invalid)?.into_inner();
    crate::io::write_atomic(path, &bytes).map_err(io)
}
