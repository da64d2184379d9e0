//! Reading the `activations/<step>/<site>.npy` tree form of a dump. Headers are parsed
//! by `npyz`; the data is taken as raw little-endian bytes after the header.

use std::path::Path;

use crate::contract::error::{Error, Result};

use super::dtype::DType;
use super::tensor::{checked_numel, Tensor};

/// Reads one `.npy` file into an owned tensor.
pub fn read(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |what: String| Error::format(path, what);
    if bytes.len() < 6 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file: bad magic (expected \\x93NUMPY)".into()));
    }
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(format!("bad .npy header: {e}")))?;
    if npy.order() == npyz::Order::Fortran {
        return Err(bad("fortran_order arrays are not supported; save with C order".into()));
    }
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
    let header_end = match bytes.get(6) {
        Some(1) if bytes.len() >= 10 => 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize,
        Some(2 | 3) if bytes.len() >= 12 => {
            12 + u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
        }
        _ => return Err(bad("bad .npy header: unknown format version".into())),
    };
    let have = bytes.len().saturating_sub(header_end);
    if have != need {
        return Err(bad(format!(
            "shape {shape:?} x {dtype} needs {need} bytes of data but the file holds {have}"
        )));
    }
    let mut data = bytes[header_end..].to_vec();
    if big_endian && dtype.size() > 1 {
        for chunk in data.chunks_mut(dtype.size()) {
            chunk.reverse();
        }
    }
    Ok(Tensor::owned(dtype, shape, data))
}
