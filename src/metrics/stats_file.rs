//! Feature-statistics files: pytorch-fid's `.npz` (`np.savez(path, mu=mu, sigma=sigma)`), read and written, and
//! LFM's `.npy` (`np.save(path, {"mu": mu, "sigma": sigma})`, a pickled dict in an object array), read through the
//! restricted unpickler (nothing in the file is executed).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::pickle::{unpickle, NdArray, Value};

use super::fid::Statistics;

/// Why a statistics file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StatsFileError {
    /// The file could not be read or written.
    // The cause is part of the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The file is not a statistics file, or is damaged.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A NumPy array of numbers read from a `.npy` record.
struct Array {
    shape: Vec<usize>,
    values: Vec<f64>,
}

/// Reads statistics from a `.npz` (pytorch-fid) or `.npy` (LFM) file.
pub fn read_statistics(path: &Path) -> Result<Statistics, StatsFileError> {
    let bytes = std::fs::read(path).map_err(|cause| StatsFileError::Io { path: path.to_path_buf(), cause })?;
    let invalid = |reason: String| StatsFileError::Invalid { path: path.to_path_buf(), reason };
    let (mu, sigma) = if bytes.starts_with(b"PK\x03\x04") {
        read_npz(&bytes).map_err(invalid)?
    } else if bytes.starts_with(b"\x93NUMPY") {
        read_pickled_dict(&bytes).map_err(invalid)?
    } else {
        return Err(invalid(
            "not a statistics file: expected pytorch-fid's .npz (mu, sigma) or LFM's .npy pickled dict; the file may \
             be truncated or of another kind"
                .into(),
        ));
    };
    statistics(mu, sigma).map_err(invalid)
}

/// Writes statistics as pytorch-fid's `.npz` (`mu` and `sigma`, float64, uncompressed), atomically.
pub fn write_npz(path: &Path, stats: &Statistics) -> Result<(), StatsFileError> {
    let io = |cause: std::io::Error| StatsFileError::Io { path: path.to_path_buf(), cause };
    let d = stats.dim();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, shape, values) in [("mu.npy", vec![d], &stats.mu), ("sigma.npy", vec![d, d], &stats.sigma)] {
        zip.start_file(name, options).map_err(|e| io(std::io::Error::other(e)))?;
        zip.write_all(&npy_f64(&shape, values)).map_err(io)?;
    }
    let bytes = zip.finish().map_err(|e| io(std::io::Error::other(e)))?.into_inner();
    crate::io::write_atomic(path, &bytes).map_err(io)
}

/// A version-1.0 `.npy` record of little-endian float64 values.
fn npy_f64(shape: &[usize], values: &[f64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    // NumPy pads the header with spaces so that the data starts on a 64-byte boundary, and ends it with '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    out
}

fn read_npz(bytes: &[u8]) -> Result<(Array, Array), String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a readable .npz archive ({e}); the file may be truncated"))?;
    let mut record = |name: &str| -> Result<Array, String> {
        let mut file = zip
            .by_name(&format!("{name}.npy"))
            .map_err(|_| format!("the .npz has no '{name}' array; pytorch-fid statistics hold 'mu' and 'sigma'"))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| format!("{name}.npy is unreadable ({e}); the file may be truncated"))?;
        let (header, body) = npy_header(&data).map_err(|e| format!("{name}.npy: {e}"))?;
        numeric(&header.descr, header.fortran_order, header.shape, body).map_err(|e| format!("{name}.npy: {e}"))
    };
    Ok((record("mu")?, record("sigma")?))
}

fn read_pickled_dict(bytes: &[u8]) -> Result<(Array, Array), String> {
    let (header, body) = npy_header(bytes)?;
    if header.descr != "|O" {
        return Err(format!(
            "a .npy statistics file must hold a pickled {{'mu', 'sigma'}} dict (LFM's format), found an array of \
             '{}'",
            header.descr
        ));
    }
    let root = unpickle(body).map_err(|e| format!("the pickled dict is unreadable: {e}"))?;
    let dict = match root {
        Value::NdArray(array) if array.objects.len() == 1 => array.objects.into_iter().next(),
        Value::Dict(_) => Some(root),
        _ => None,
    };
    let Some(Value::Dict(dict)) = dict else {
        return Err("the pickled object is not a {'mu', 'sigma'} dict".into());
    };
    let get = |key: &str| -> Result<Array, String> {
        let value = dict
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("the pickled dict has no '{key}'"))?;
        let Value::NdArray(NdArray { dtype, byte_order, shape, fortran_order, bytes, .. }) = value else {
            return Err(format!("'{key}' is not a NumPy array"));
        };
        numeric(&format!("{byte_order}{dtype}"), fortran_order, shape, &bytes).map_err(|e| format!("'{key}': {e}"))
    };
    Ok((get("mu")?, get("sigma")?))
}

struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses a `.npy` header; returns it and the data that follows.
fn npy_header(bytes: &[u8]) -> Result<(NpyHeader, &[u8]), String> {
    if !bytes.starts_with(b"\x93NUMPY") || bytes.len() < 10 {
        return Err("not a .npy record".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let text = bytes.get(start..start + len).ok_or("the .npy header is truncated")?;
    let text = std::str::from_utf8(text).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = text.find(&format!("'{key}':")).ok_or_else(|| format!("the .npy header lacks '{key}'"))?;
        Ok(text[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or("malformed 'descr'")?.to_string();
    let fortran_order = field("fortran_order")?.starts_with("True");
    let shape = field("shape")?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("malformed 'shape'")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("malformed shape entry '{s}'")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((NpyHeader { descr, fortran_order, shape }, &bytes[start + len..]))
}

/// Decodes little-endian float64/float32 data (C or Fortran order) into row-major f64 values.
fn numeric(descr: &str, fortran_order: bool, shape: Vec<usize>, data: &[u8]) -> Result<Array, String> {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = match descr {
        "<f8" | "=f8" => {
            let data = data.get(..n * 8).ok_or("the array data is truncated")?;
            data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
        }
        "<f4" | "=f4" => {
            let data = data.get(..n * 4).ok_or("the array data is truncated")?;
            data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        other => return Err(format!("unsupported element type '{other}' (expected little-endian float64 or float32)")),
    };
    let values = if fortran_order && shape.len() == 2 {
        let (rows, cols) = (shape[0], shape[1]);
        (0..rows * cols).map(|i| values[(i % cols) * rows + i / cols]).collect()
    } else {
        values
    };
    Ok(Array { shape, values })
}

fn statistics(mu: Array, sigma: Array) -> Result<Statistics, String> {
    let d = match mu.shape.as_slice() {
        [d] => *d,
        other => return Err(format!("mu must be a vector, found shape {other:?}")),
    };
    if sigma.shape != [d, d] {
        return Err(format!("sigma must be {d}×{d} to match mu, found shape {:?}", sigma.shape));
    }
    Ok(Statistics { mu: mu.values, sigma: sigma.values })
}
