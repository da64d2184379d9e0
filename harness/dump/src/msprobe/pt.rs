//! Reading one tensor saved by `torch.save` (what msprobe writes for PyTorch runs).
//!
//! A `.pt` file is a zip archive holding `<archive>/data.pkl` (a pickle whose object is
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, the storage
//! being a persistent ID `('storage', <dtype>Storage, key, location, numel)`) and the raw
//! little-endian storages `<archive>/data/<key>`. The zip is read with `zip`, the pickle
//! with candle's pickle reader (it resolves persistent IDs and torch's rebuild calls);
//! the strided view is gathered here into a row-major tensor (a whole contiguous
//! storage is taken as it is; otherwise the innermost contiguous axes are copied a run
//! at a time).

use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};

use crate::{DType, Tensor};
use contract::error::{Error, Result};

/// Reads the tensor saved in the `.pt` file `path`, as a row-major tensor.
pub fn read(path: &Path) -> Result<Tensor> {
    let bad = |what: String| Error::format(path, what);
    let file = crate::read::open_regular(path)?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("not a torch.save file (not a zip archive: {e})")))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| bad("no data.pkl in the zip archive: not a torch.save file".into()))?;
    let dir = pkl.strip_suffix(".pkl").unwrap_or(&pkl).to_string();
    let obj = {
        let entry = zip.by_name(&pkl).map_err(|e| bad(format!("{pkl}: {e}")))?;
        let mut reader = BufReader::new(entry);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| bad(format!("{pkl}: bad pickle: {}", message(e))))?;
        stack.finalize().map_err(|e| bad(format!("{pkl}: bad pickle: {}", message(e))))?
    };
    let info = obj
        .into_tensor_info(Object::Unicode("tensor".into()), Path::new(&dir))
        .map_err(|e| bad(format!("{pkl}: not a saved tensor: {}", message(e))))?
        .ok_or_else(|| bad(format!("{pkl}: the pickled object is not a torch tensor")))?;
    let dtype = match info.dtype {
        candle_core::DType::F64 => DType::F64,
        candle_core::DType::F32 => DType::F32,
        candle_core::DType::F16 => DType::F16,
        candle_core::DType::BF16 => DType::BF16,
        candle_core::DType::I64 => DType::I64,
        candle_core::DType::U8 => DType::U8,
        other => return Err(bad(format!("unsupported tensor dtype {other:?}"))),
    };
    let mut storage = Vec::new();
    zip.by_name(&info.path)
        .map_err(|e| bad(format!("storage {}: {e}", info.path)))?
        .read_to_end(&mut storage)
        .map_err(|e| Error::io(path, e))?;
    let size = dtype.size();
    if info.storage_size.checked_mul(size) != Some(storage.len()) {
        return Err(bad(format!(
            "storage {} holds {} bytes, the pickle says {} elements of {} bytes",
            info.path,
            storage.len(),
            info.storage_size,
            size
        )));
    }
    let shape = info.layout.dims().to_vec();
    let stride = info.layout.stride().to_vec();
    let start = info.layout.start_offset() / size;
    // Checked: a shape whose element count wraps (e.g. [2^30, 2^30, 16] to 0) would
    // pass as an empty tensor.
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("view shape {shape:?}: the element count overflows")))?;
    // The largest element index the view touches must lie inside the storage.
    let last = shape
        .iter()
        .zip(&stride)
        .try_fold(start, |acc, (d, s)| d.saturating_sub(1).checked_mul(*s)?.checked_add(acc))
        .ok_or_else(|| {
            bad(format!("view shape {shape:?} stride {stride:?}: the extent overflows"))
        })?;
    if numel.checked_mul(size).is_none_or(|b| b > isize::MAX as usize) {
        return Err(bad(format!("view shape {shape:?}: too many bytes")));
    }
    if numel > 0 && last >= info.storage_size {
        return Err(bad(format!(
            "view shape {shape:?} stride {stride:?} offset {start} reaches past the storage of {} elements",
            info.storage_size
        )));
    }
    let bytes = if numel == 0 {
        Vec::new()
    } else if start == 0 && numel == info.storage_size && is_row_major(&shape, &stride) {
        storage
    } else {
        gather_runs(&storage, size, &shape, &stride, start)
    };
    Ok(Tensor::owned(dtype, shape, bytes))
}

/// True when `stride` is the row-major stride of `shape` (axes of extent 1 excepted).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut want = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != want {
            return false;
        }
        want *= d;
    }
    true
}

/// The strided view `shape`/`stride` from element `start` of `storage` (elements of
/// `size` bytes), row-major: the innermost axes that are contiguous are copied as one
/// run each.
fn gather_runs(
    storage: &[u8],
    size: usize,
    shape: &[usize],
    stride: &[usize],
    start: usize,
) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    // Axes `k..` are contiguous: one run of `run` elements per index of axes `..k`.
    let mut k = shape.len();
    let mut run = 1;
    while k > 0 && (shape[k - 1] == 1 || stride[k - 1] == run) {
        run *= shape[k - 1];
        k -= 1;
    }
    let outer = &shape[..k];
    let mut bytes = Vec::with_capacity(numel * size);
    let mut idx = vec![0usize; k];
    for _ in 0..numel / run.max(1) {
        let e = start + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        bytes.extend_from_slice(&storage[e * size..(e + run) * size]);
        for ax in (0..k).rev() {
            idx[ax] += 1;
            if idx[ax] < outer[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    bytes
}

/// candle's error message on one line: without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set.
fn message(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => message(*inner),
        other => other.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run copy equals the element-by-element gather of the same view.
    #[test]
    fn strided_views_gather_like_elementwise() {
        let storage: Vec<u8> = (0..48u8).collect(); // 48 one-byte elements
        for (shape, stride, start) in [
            (vec![2, 3, 4], vec![12, 4, 1], 0),  // contiguous
            (vec![2, 3, 2], vec![12, 4, 1], 1),  // rows cut: runs of 2
            (vec![3, 2, 4], vec![4, 12, 1], 0),  // axes 0 and 1 swapped
            (vec![4, 3], vec![1, 4], 0),         // transposed: runs of 1
            (vec![2, 1, 4], vec![12, 99, 1], 4), // an axis of extent 1, any stride
        ] {
            let numel: usize = shape.iter().product();
            let mut want = Vec::new();
            let mut idx = vec![0usize; shape.len()];
            for _ in 0..numel {
                let e = start + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
                want.push(storage[e]);
                for ax in (0..shape.len()).rev() {
                    idx[ax] += 1;
                    if idx[ax] < shape[ax] {
                        break;
                    }
                    idx[ax] = 0;
                }
            }
            assert_eq!(
                gather_runs(&storage, 1, &shape, &stride, start),
                want,
                "{shape:?} {stride:?}"
            );
        }
        assert!(is_row_major(&[2, 1, 4], &[4, 7, 1]));
        assert!(!is_row_major(&[4, 3], &[1, 4]));
    }
}
