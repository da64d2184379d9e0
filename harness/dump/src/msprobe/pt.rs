//! Reading one tensor saved by `torch.save` (what msprobe writes for PyTorch runs).
//!
//! A `.pt` file is a zip archive holding `<archive>/data.pkl` (a pickle whose object is
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, the storage
//! being a persistent ID `('storage', <dtype>Storage, key, location, numel)`) and the raw
//! little-endian storages `<archive>/data/<key>`. The zip is read with `zip`, the pickle
//! with [`crate::pickle`] (a bounded reader of only what that pickle holds); the
//! storage's size is checked against the archive before it is read, and the strided
//! view is gathered here into a row-major tensor (a whole contiguous storage is taken as
//! it is; otherwise the innermost contiguous axes are copied a run at a time). A view
//! with more elements than its storage (a stride of 0) is refused before its gather.

use std::io::{BufReader, Read};
use std::path::Path;

use crate::pickle::{self, MAX_PICKLE_BYTES};
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
    let mut pickled = Vec::new();
    zip.by_name(&pkl)
        .map_err(|e| bad(format!("{pkl}: {e}")))?
        .take(MAX_PICKLE_BYTES as u64 + 1)
        .read_to_end(&mut pickled)
        .map_err(|e| bad(format!("{pkl}: {e}")))?;
    let info = pickle::tensor_info(&pickled).map_err(|e| bad(format!("{pkl}: bad pickle: {e}")))?;
    let dtype = match info.storage_class {
        "DoubleStorage" => DType::F64,
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(bad(format!("{pkl}: unsupported storage {other}"))),
    };
    let size = dtype.size();
    let key = format!("{dir}/{}", info.key);
    let want = info.storage_numel.checked_mul(size).filter(|&b| b <= isize::MAX as usize);
    let want = want.ok_or_else(|| {
        bad(format!("storage {key}: {} elements of {size} bytes overflow", info.storage_numel))
    })?;
    let mut entry = zip.by_name(&key).map_err(|e| bad(format!("storage {key}: {e}")))?;
    // The archive's own size is checked first; the read then grows with the bytes that
    // are there (stored entries only), so a size the archive lies about allocates nothing.
    if entry.size() != want as u64 {
        return Err(bad(format!(
            "storage {key} holds {} bytes, the pickle says {} elements of {size} bytes",
            entry.size(),
            info.storage_numel
        )));
    }
    let mut storage = Vec::new();
    (&mut entry)
        .take(want as u64 + 1)
        .read_to_end(&mut storage)
        .map_err(|e| bad(format!("storage {key}: {e}")))?;
    drop(entry);
    if storage.len() != want {
        return Err(bad(format!(
            "storage {key} holds {} bytes, the pickle says {} elements of {size} bytes",
            storage.len(),
            info.storage_numel
        )));
    }
    let info_storage_size = info.storage_numel;
    let (shape, stride, start) = (info.shape, info.stride, info.offset);
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
    // A view with more elements than its storage repeats elements (a stride of 0, as
    // `expand` makes): refused before its gather would allocate the repeats.
    if numel > info_storage_size {
        return Err(bad(format!(
            "view shape {shape:?} stride {stride:?} has {numel} elements, more than its storage's {info_storage_size}: a view that repeats elements is not read"
        )));
    }
    if numel > 0 && last >= info_storage_size {
        return Err(bad(format!(
            "view shape {shape:?} stride {stride:?} offset {start} reaches past the storage of {} elements",
            info_storage_size
        )));
    }
    let bytes = if numel == 0 {
        Vec::new()
    } else if start == 0 && numel == info_storage_size && is_row_major(&shape, &stride) {
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
