//! Reading the `activations/<step>/<site>.npy` tree form of a dump. Headers are parsed
//! by `npyz`; the data is taken as raw little-endian bytes after the header.

use std::io::Read;
use std::path::Path;

use contract::error::{Error, Result};

use super::dtype::DType;
use super::tensor::{checked_numel, Tensor};

/// The largest `.npy` header read: 1 MiB (numpy writes a few hundred bytes).
const HEADER_CAP: usize = 1 << 20;

/// Reads one `.npy` file into an owned tensor. The header is read and checked first:
/// the data it announces must match the file's size exactly before any data is read,
/// and the data is then read once, straight into the tensor's buffer.
pub fn read(path: &Path) -> Result<Tensor> {
    let mut file = super::read::open_regular(path)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let bad = |what: String| Error::format(path, what);
    let io = |e: std::io::Error| Error::io(path, e);
    let mut head = vec![0u8; 12.min(file_len as usize)];
    file.read_exact(&mut head).map_err(io)?;
    if head.len() < 6 || &head[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file: bad magic (expected \\x93NUMPY)".into()));
    }
    let header_end = match head.get(6) {
        Some(1) if head.len() >= 10 => 10 + u16::from_le_bytes([head[8], head[9]]) as usize,
        Some(2 | 3) if head.len() >= 12 => {
            12 + u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize
        }
        _ => return Err(bad("bad .npy header: unknown format version".into())),
    };
    if header_end < head.len() {
        return Err(bad(format!("bad .npy header: {header_end} bytes long, too short")));
    }
    if header_end > HEADER_CAP || header_end as u64 > file_len {
        return Err(bad(format!(
            "bad .npy header: {header_end} bytes long, past the end of the file ({file_len} bytes) or the {HEADER_CAP}-byte limit"
        )));
    }
    let got = head.len();
    head.resize(header_end, 0);
    file.read_exact(&mut head[got..]).map_err(io)?;
    let npy = npyz::NpyFile::new(&head[..])
        .map_err(|e| bad(format!("bad .npy header: {}", one_line(&e.to_string()))))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let (dtype, big_endian) = match npy.dtype() {
        npyz::DType::Plain(ts) => {
            let s = ts.to_string();
            let (endian, code) = s.split_at(1);
            let dt = match code {
                "f8" => DType::F64,
                "f4" => DType::F32,
                "f2" => DType::F16,
                "i8" => DType::I64,
                "i4" => DType::I32,
                "u1" => DType::U8,
                "b1" => DType::Bool,
                _ => {
                    return Err(bad(format!(
                        "unsupported .npy dtype {s:?} (accepted: f8 f4 f2 i8 i4 u1 b1)"
                    )))
                }
            };
            (dt, endian == ">")
        }
        other => {
            return Err(bad(format!(
                "unsupported .npy dtype {other:?}: structured arrays are not tensors"
            )))
        }
    };
    let numel = checked_numel(&shape)
        .ok_or_else(|| bad(format!("shape {shape:?} has an element count that overflows")))?;
    let need = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| bad(format!("shape {shape:?} has a byte size that overflows")))?;
    let have = file_len - header_end as u64;
    if have != need as u64 {
        return Err(bad(format!(
            "shape {shape:?} x {dtype} needs {need} bytes of data but the file holds {have}"
        )));
    }
    let mut data = vec![0u8; need];
    file.read_exact(&mut data).map_err(io)?;
    if big_endian && dtype.size() > 1 {
        for chunk in data.chunks_mut(dtype.size()) {
            chunk.reverse();
        }
    }
    Ok(Tensor::owned(dtype, shape, data))
}

/// `text` on one line: line breaks and runs of spaces folded into one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
