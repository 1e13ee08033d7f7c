//! A restricted unpickler for PyTorch checkpoints: it understands the opcodes and the handful of globals that a
//! `state_dict` (or LFM's `content.pth`) needs, and refuses everything else. Nothing from the file is executed:
//! "calling" an allowed global only builds one of the [`Value`]s below.

use std::collections::HashMap;

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer (pickle ints beyond 64 bits are refused).
    Int(i64),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict or `OrderedDict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A reference to one of the allowed globals (`module.name`).
    Global(String),
    /// A storage named by a persistent id: `('storage', <dtype>Storage, key, location, numel)`.
    Storage(StorageRef),
    /// A tensor view of a storage (`torch._utils._rebuild_tensor_v2`).
    Tensor(TensorRef),
    /// A NumPy array (`numpy.core.multiarray._reconstruct` + `__setstate__`), as `np.save` pickles object arrays
    /// (LFM's `{mu, sigma}` statistics files).
    NdArray(NdArray),
    /// An object of an allowed plain class (`argparse.Namespace`, a TorchScript module `__torch__.*`, a NumPy
    /// dtype) with its attributes.
    Object {
        /// `module.name` of the class.
        class: String,
        /// Its attributes (the `BUILD` state).
        attributes: Vec<(Value, Value)>,
    },
}

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.int64`.
    I64,
    /// `torch.int32`.
    I32,
    /// `torch.int16`.
    I16,
    /// `torch.int8`.
    I8,
    /// `torch.uint8`.
    U8,
    /// `torch.bool`.
    Bool,
}

impl StorageDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Decodes contiguous little-endian elements of this type; floats widen to `f32`/`f64`, integers to `i64`.
    pub fn decode(self, bytes: &[u8]) -> crate::checkpoint::HostData {
        use crate::checkpoint::HostData;
        fn each<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
        }
        match self {
            Self::F32 => HostData::F32(each(bytes, f32::from_le_bytes)),
            Self::F64 => HostData::F64(each(bytes, f64::from_le_bytes)),
            Self::F16 => HostData::F32(each(bytes, |b| half::f16::from_le_bytes(b).to_f32())),
            Self::BF16 => HostData::F32(each(bytes, |b| half::bf16::from_le_bytes(b).to_f32())),
            Self::I64 => HostData::I64(each(bytes, i64::from_le_bytes)),
            Self::I32 => HostData::I64(each(bytes, |b| i32::from_le_bytes(b) as i64)),
            Self::I16 => HostData::I64(each(bytes, |b| i16::from_le_bytes(b) as i64)),
            Self::I8 => HostData::I64(each(bytes, |b: [u8; 1]| b[0] as i8 as i64)),
            Self::U8 | Self::Bool => HostData::I64(each(bytes, |b: [u8; 1]| b[0] as i64)),
        }
    }

    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "torch.FloatStorage" => Self::F32,
            "torch.DoubleStorage" => Self::F64,
            "torch.HalfStorage" => Self::F16,
            "torch.BFloat16Storage" => Self::BF16,
            "torch.LongStorage" => Self::I64,
            "torch.IntStorage" => Self::I32,
            "torch.ShortStorage" => Self::I16,
            "torch.CharStorage" => Self::I8,
            "torch.ByteStorage" => Self::U8,
            "torch.BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// A storage referenced by the pickle; its bytes live in `<archive>/data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The record name inside the archive's `data/` folder.
    pub key: String,
    /// Element type.
    pub dtype: StorageDType,
}

/// A strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage.
    pub storage: StorageRef,
    /// Offset into the storage, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// A pickled NumPy array.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NdArray {
    /// NumPy's type string without the byte order, e.g. `f8`, `f4`, `O`.
    pub dtype: String,
    /// Byte order: `<`, `>`, `|` (not applicable) or `=` (native).
    pub byte_order: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Column-major storage.
    pub fortran_order: bool,
    /// Raw element bytes (numeric arrays).
    pub bytes: Vec<u8>,
    /// The elements of an object array.
    pub objects: Vec<Value>,
}

/// Why a pickle was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PickleError {
    /// The stream ended in the middle of an opcode.
    #[error("the pickle stream ends early (truncated file?)")]
    Truncated,
    /// An opcode outside what a state_dict needs.
    #[error("unsupported pickle opcode 0x{0:02x} at byte {1}; this does not look like a PyTorch state_dict")]
    Opcode(u8, usize),
    /// A global outside the allow-list.
    #[error(
        "the pickle references the global `{0}`, which a checkpoint never needs; refusing it (lfm never executes \
         code from checkpoint files). Re-save the weights as a plain state_dict or as .safetensors"
    )]
    ForbiddenGlobal(String),
    /// Structurally invalid.
    #[error("malformed pickle: {0}")]
    Malformed(String),
}

/// Globals a state_dict or LFM's `content.pth` may reference. Calling any of them only builds data.
const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "argparse.Namespace",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "torch.jit._pickle.build_intlist",
    "torch.jit._pickle.build_doublelist",
    "torch.jit._pickle.build_boollist",
];

/// TorchScript archives pickle their modules as objects of classes named `__torch__.<module>.<Class>`; they are
/// read as plain attribute bags (their code is never run).
const TORCHSCRIPT_CLASS_PREFIX: &str = "__torch__.";

/// Decodes a pickle stream.
pub fn unpickle(data: &[u8]) -> Result<Value, PickleError> {
    unpickle_prefix(data).map(|(value, _)| value)
}

/// Decodes the pickle at the start of `data` (several may follow each other, as in PyTorch's legacy format) and
/// returns it with the number of bytes it took.
pub fn unpickle_prefix(data: &[u8]) -> Result<(Value, usize), PickleError> {
    let mut machine = Machine { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let value = machine.run()?;
    Ok((value, machine.pos))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

fn malformed(msg: &str) -> PickleError {
    PickleError::Malformed(msg.to_string())
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self.pos.checked_add(n).ok_or(PickleError::Truncated)?;
        let bytes = self.data.get(self.pos..end).ok_or(PickleError::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = self.data.get(self.pos..).ok_or(PickleError::Truncated)?;
        let end = rest.iter().position(|&b| b == b'\n').ok_or(PickleError::Truncated)?;
        let text = String::from_utf8(rest[..end].to_vec()).map_err(|_| malformed("non-UTF-8 global name"))?;
        self.pos += end + 1;
        Ok(text)
    }

    fn text(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes).map(Value::Str).map_err(|_| malformed("invalid UTF-8 string"))
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or_else(|| malformed("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| malformed("missing MARK"))?;
        if mark > self.stack.len() {
            return Err(malformed("MARK beyond the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        self.stack.last_mut().ok_or_else(|| malformed("stack underflow"))
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME (protocol 4): a length hint only
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(malformed("integer wider than 64 bits"));
                    }
                    let bytes = self.take(n)?;
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                0x8e => {
                    // BINBYTES8 (protocol 4)
                    let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap());
                    let n = usize::try_from(n).map_err(|_| malformed("BINBYTES8 length overflows"))?;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(malformed("stack underflow in TUPLEn"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b']' => self.stack.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let item = self.pop()?;
                    match self.top()? {
                        Value::List(list) => list.push(item),
                        _ => return Err(malformed("APPEND to a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(list) => list.extend(items),
                        _ => return Err(malformed("APPENDS to a non-list")),
                    }
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = pairs(items)?;
                    self.stack.push(Value::Dict(dict))
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    match self.top()? {
                        Value::Dict(dict) => dict.push((key, value)),
                        _ => return Err(malformed("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items)?;
                    match self.top()? {
                        Value::Dict(dict) => dict.extend(new),
                        _ => return Err(malformed("SETITEMS on a non-dict")),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32; // MEMOIZE
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo.get(&i).cloned().ok_or_else(|| malformed("unknown memo index"))?;
                    self.stack.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo.get(&i).cloned().ok_or_else(|| malformed("unknown memo index"))?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(global(format!("{module}.{name}"))?)
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(global(format!("{m}.{n}"))?),
                        _ => return Err(malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?)
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let _args = self.pop()?;
                    match self.pop()? {
                        Value::Global(class)
                            if class == "argparse.Namespace" || class.starts_with(TORCHSCRIPT_CLASS_PREFIX) =>
                        {
                            self.stack.push(Value::Object { class, attributes: Vec::new() })
                        }
                        Value::Global(class) => return Err(PickleError::ForbiddenGlobal(class)),
                        _ => return Err(malformed("NEWOBJ of a non-class")),
                    }
                }
                b'b' => {
                    let state = self.pop()?;
                    match (self.top()?, state) {
                        (Value::Object { attributes, .. }, Value::Dict(state)) => attributes.extend(state),
                        (Value::Object { class, attributes }, Value::Tuple(state)) if class == "numpy.dtype" => {
                            // (version, byte order, subarray, names, fields, itemsize, alignment, flags)
                            if let Some(Value::Str(order)) = state.get(1) {
                                attributes.push((Value::Str("byte_order".into()), Value::Str(order.clone())));
                            }
                        }
                        (Value::NdArray(array), Value::Tuple(state)) => set_array_state(array, state)?,
                        // An OrderedDict's instance dict (`_metadata` of a state_dict) carries nothing we need.
                        (Value::Dict(_), _) => {}
                        // `_rebuild_parameter` and tensors may get a (None) state.
                        (Value::Tensor(_), _) => {}
                        _ => return Err(malformed("BUILD on an unsupported object")),
                    }
                }
                _ => return Err(PickleError::Opcode(op, at)),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return Err(malformed("odd number of dict items"));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn global(name: String) -> Result<Value, PickleError> {
    if ALLOWED_GLOBALS.contains(&name.as_str()) || name.starts_with(TORCHSCRIPT_CLASS_PREFIX) {
        Ok(Value::Global(name))
    } else {
        Err(PickleError::ForbiddenGlobal(name))
    }
}

fn persistent_load(pid: Value) -> Result<Value, PickleError> {
    let Value::Tuple(items) = pid else {
        return Err(malformed("persistent id is not a tuple"));
    };
    match items.as_slice() {
        // The legacy (pre-1.6) format adds a view description, None unless the storage is shared by views.
        [Value::Str(kind), Value::Global(class), Value::Str(key), _location, _numel]
        | [Value::Str(kind), Value::Global(class), Value::Str(key), _location, _numel, Value::None]
            if kind == "storage" =>
        {
            let dtype = StorageDType::from_storage_class(class)
                .ok_or_else(|| malformed(&format!("unsupported storage type {class}")))?;
            Ok(Value::Storage(StorageRef { key: key.clone(), dtype }))
        }
        _ => Err(malformed("unsupported persistent id (expected a torch storage)")),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>, PickleError> {
    let Value::Tuple(items) = v else {
        return Err(malformed(&format!("{what} is not a tuple")));
    };
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(malformed(&format!("{what} holds a non-index"))),
        })
        .collect()
}

/// `ndarray.__setstate__((version, shape, dtype, is_fortran, data))`.
fn set_array_state(array: &mut NdArray, state: Vec<Value>) -> Result<(), PickleError> {
    let [_version, shape, Value::Object { class, attributes }, Value::Bool(fortran), data] = state.as_slice() else {
        return Err(malformed("unexpected numpy array state"));
    };
    if class != "numpy.dtype" {
        return Err(malformed("numpy array state without a dtype"));
    }
    let attr = |key: &str| {
        attributes.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Str(v)) if k == key => Some(v.clone()),
            _ => None,
        })
    };
    array.dtype = attr("descr").unwrap_or_default();
    array.byte_order = attr("byte_order").unwrap_or_else(|| "|".into());
    array.shape = as_usizes(shape, "array shape")?;
    array.fortran_order = *fortran;
    match data {
        Value::Bytes(bytes) => array.bytes = bytes.clone(),
        Value::List(items) => array.objects = items.clone(),
        _ => return Err(malformed("numpy array data is neither bytes nor a list")),
    }
    Ok(())
}

fn reduce(callable: Value, args: Value) -> Result<Value, PickleError> {
    let Value::Global(name) = callable else {
        return Err(malformed("REDUCE of a non-global"));
    };
    let Value::Tuple(args) = args else {
        return Err(malformed("REDUCE arguments are not a tuple"));
    };
    match name.as_str() {
        "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" => {
            let [Value::Storage(storage), Value::Int(offset), shape, stride, ..] = args.as_slice() else {
                return Err(malformed("unexpected _rebuild_tensor_v2 arguments"));
            };
            let shape = as_usizes(shape, "tensor size")?;
            let stride = as_usizes(stride, "tensor stride")?;
            if shape.len() != stride.len() || *offset < 0 {
                return Err(malformed("tensor size and stride disagree"));
            }
            Ok(Value::Tensor(TensorRef { storage: storage.clone(), offset: *offset as usize, shape, stride }))
        }
        "torch._utils._rebuild_parameter" => {
            args.into_iter().next().ok_or_else(|| malformed("_rebuild_parameter without data"))
        }
        // TorchScript wraps typed lists (e.g. a conv's padding) in these; the list itself is the value.
        "torch.jit._pickle.build_intlist"
        | "torch.jit._pickle.build_doublelist"
        | "torch.jit._pickle.build_boollist" => {
            args.into_iter().next().ok_or_else(|| malformed("typed list without items"))
        }
        "numpy.core.multiarray._reconstruct" | "numpy._core.multiarray._reconstruct" => match args.first() {
            Some(Value::Global(class)) if class == "numpy.ndarray" => Ok(Value::NdArray(NdArray::default())),
            _ => Err(malformed("_reconstruct of something other than numpy.ndarray")),
        },
        "numpy.dtype" => match args.first() {
            Some(Value::Str(descr)) => Ok(Value::Object {
                class: name,
                attributes: vec![(Value::Str("descr".into()), Value::Str(descr.clone()))],
            }),
            _ => Err(malformed("numpy.dtype without a type string")),
        },
        other => Err(PickleError::ForbiddenGlobal(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system() {
        // cos\nsystem\n(S'echo hi'\ntR.
        let evil = b"cos\nsystem\n(S'echo hi'\ntR.";
        assert_eq!(unpickle(evil), Err(PickleError::ForbiddenGlobal("os.system".into())));
    }

    #[test]
    fn reads_a_small_dict() {
        // protocol 2: {'a': 1, 'b': [2.5]}
        let bytes = [
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b'K', 1, b'X', 1, 0, 0, 0, b'b', b']', b'G', 0x40,
            0x04, 0, 0, 0, 0, 0, 0, b'a', b'u', b'.',
        ];
        let v = unpickle(&bytes).unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![
                (Value::Str("a".into()), Value::Int(1)),
                (Value::Str("b".into()), Value::List(vec![Value::Float(2.5)])),
            ])
        );
    }

    #[test]
    fn truncated_stream_is_an_error() {
        assert_eq!(unpickle(&[0x80, 2, b'}']), Err(PickleError::Truncated));
    }
}
