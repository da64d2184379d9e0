//! A stored tensor: dtype, shape and little-endian bytes, either memory-mapped from a
//! safetensors file or owned. Values are read element by element as `f64` so that
//! metrics can stream over a tensor without a whole-tensor `f64` copy.

use std::ops::Range;
use std::sync::Arc;

use super::dtype::DType;

#[derive(Clone)]
enum Bytes {
    Mapped { map: Arc<memmap2::Mmap>, range: Range<usize> },
    Owned(Arc<Vec<u8>>),
}

/// A tensor of any contract dtype, row-major.
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Bytes,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    /// A tensor over `range` of a mapped file. The caller has checked that the range
    /// holds exactly `numel(shape) * dtype.size()` bytes.
    pub(crate) fn mapped(
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
    ) -> Tensor {
        Tensor { dtype, shape, bytes: Bytes::Mapped { map, range } }
    }

    /// A tensor over owned little-endian bytes. The caller has checked the length.
    pub(crate) fn owned(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Tensor {
        debug_assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size());
        Tensor { dtype, shape, bytes: Bytes::Owned(Arc::new(bytes)) }
    }

    /// Stores `values` (row-major, `shape`) as `dtype`, rounding to nearest.
    /// Integer dtypes truncate toward zero; `Bool` stores `v != 0`.
    pub fn from_f64(shape: &[usize], values: &[f64], dtype: DType) -> Tensor {
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "from_f64: {} values for shape {:?}",
            values.len(),
            shape
        );
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        for &v in values {
            match dtype {
                DType::F64 => bytes.extend_from_slice(&v.to_le_bytes()),
                DType::F32 => bytes.extend_from_slice(&(v as f32).to_le_bytes()),
                DType::F16 => bytes.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
                DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
                DType::I64 => bytes.extend_from_slice(&(v as i64).to_le_bytes()),
                DType::I32 => bytes.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::U8 => bytes.push(v as u8),
                DType::Bool => bytes.push((v != 0.0) as u8),
            }
        }
        Tensor::owned(dtype, shape.to_vec(), bytes)
    }

    /// Stores integer `values` as `I64`.
    pub fn from_i64(shape: &[usize], values: &[i64]) -> Tensor {
        assert_eq!(values.len(), shape.iter().product::<usize>());
        let mut bytes = Vec::with_capacity(values.len() * 8);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Tensor::owned(DType::I64, shape.to_vec(), bytes)
    }

    /// Stores an `ndarray` array as `dtype`.
    pub fn from_array<D: ndarray::Dimension>(
        array: &ndarray::Array<f64, D>,
        dtype: DType,
    ) -> Tensor {
        let values: Vec<f64> = array.iter().copied().collect();
        Tensor::from_f64(array.shape(), &values, dtype)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped { map, range } => &map[range.clone()],
            Bytes::Owned(v) => v,
        }
    }

    /// Hands the pages of a memory-mapped tensor back to the kernel once it has been read
    /// (`madvise(MADV_DONTNEED)` on its range): they are read again from the file if the
    /// tensor is touched later, so this only bounds memory. Nothing for owned bytes.
    pub fn release(&self) {
        #[cfg(unix)]
        if let Bytes::Mapped { map, range } = &self.bytes {
            // SAFETY: the map is a read-only mapping of a file; after MADV_DONTNEED its
            // pages read back the file's contents, so no reference sees other bytes. A
            // failure only leaves the pages resident.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.end - range.start,
                )
            };
        }
    }

    /// [`release`](Self::release) for the pages of elements `range` only (row-major flat
    /// indices), once they have been read: how a very large tensor is read without
    /// holding all of it. The pages at either end may hold neighbouring elements; those
    /// are read again from the file when touched.
    pub fn release_elements(&self, range: Range<usize>) {
        #[cfg(unix)]
        if let Bytes::Mapped { map, range: bytes } = &self.bytes {
            let s = self.dtype.size();
            let (start, end) = (bytes.start + range.start * s, bytes.start + range.end * s);
            if start < end && end <= bytes.end {
                // SAFETY: as in `release`: a read-only file mapping reads back the file.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// Element `i` (row-major flat index) widened to `f64`. Panics if `i` is out of range.
    #[inline]
    pub fn get_f64(&self, i: usize) -> f64 {
        decode(self.dtype, self.bytes(), i)
    }

    /// All elements widened to `f64`, streamed in row-major order.
    pub fn iter_f64(&self) -> impl Iterator<Item = f64> + '_ {
        let bytes = self.bytes();
        let dtype = self.dtype;
        (0..self.numel()).map(move |i| decode(dtype, bytes, i))
    }

    /// Elements `start .. start + out.len()` (row-major flat indices) widened to `f64`
    /// into `out`: how a large stored tensor is read a block of rows at a time. Panics
    /// if the range runs past the end.
    pub fn read_f64_into(&self, start: usize, out: &mut [f64]) {
        let s = self.dtype.size();
        let b = &self.bytes()[start * s..(start + out.len()) * s];
        match self.dtype {
            DType::F32 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([e[0], e[1], e[2], e[3]]) as f64;
                }
            }
            DType::BF16 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([e[0], e[1]])) << 16) as f64;
                }
            }
            DType::F16 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([e[0], e[1]]).to_f64();
                }
            }
            dtype => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = decode(dtype, b, i);
                }
            }
        }
    }

    /// A copy of all elements as `f64` (for small tensors: ids, masks, weights).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.iter_f64().collect()
    }

    /// A copy as an `ndarray` array of `f64` with this tensor's shape.
    pub fn to_array(&self) -> ndarray::ArrayD<f64> {
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.shape), self.to_f64_vec())
            .expect("numel matches shape by construction")
    }
}

#[inline]
fn decode(dtype: DType, b: &[u8], i: usize) -> f64 {
    let s = dtype.size();
    let e = &b[i * s..i * s + s];
    match dtype {
        DType::F64 => f64::from_le_bytes(e.try_into().expect("8 bytes")),
        DType::F32 => f32::from_le_bytes(e.try_into().expect("4 bytes")) as f64,
        DType::F16 => half::f16::from_le_bytes([e[0], e[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([e[0], e[1]]).to_f64(),
        DType::I64 => i64::from_le_bytes(e.try_into().expect("8 bytes")) as f64,
        DType::I32 => i32::from_le_bytes(e.try_into().expect("4 bytes")) as f64,
        DType::U8 => e[0] as f64,
        DType::Bool => (e[0] != 0) as u8 as f64,
    }
}

/// Number of elements of `shape`, or `None` if it overflows `usize`.
///
/// The product of the non-zero dimensions must fit too: `[0, 2^62, 2^62]` is refused,
/// not taken as empty.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    let nonzero =
        shape.iter().filter(|&&d| d != 0).try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_every_dtype() {
        let v = [0.0, 1.0, -2.0, 3.5];
        let ints = [0.0, 1.0, -2.0, 3.0];
        for d in [DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32] {
            let t = Tensor::from_f64(&[2, 2], &v, d);
            let want = if d.is_float() { v } else { ints };
            assert_eq!(t.to_f64_vec(), want.to_vec(), "{d}");
        }
        let t = Tensor::from_f64(&[4], &v, DType::Bool);
        assert_eq!(t.to_f64_vec(), vec![0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_range_read_equals_the_element_reads() {
        let v: Vec<f64> = (0..10).map(|i| f64::from(i) * 0.37 - 1.5).collect();
        for d in [DType::F64, DType::F32, DType::F16, DType::BF16, DType::I32] {
            let t = Tensor::from_f64(&[2, 5], &v, d);
            let mut out = vec![0.0; 4];
            t.read_f64_into(3, &mut out);
            let want: Vec<f64> = (3..7).map(|i| t.get_f64(i)).collect();
            assert_eq!(out, want, "{d}");
        }
    }

    #[test]
    fn numel_overflow_is_detected() {
        assert_eq!(checked_numel(&[usize::MAX, 2]), None);
        assert_eq!(checked_numel(&[3, 4]), Some(12));
        assert_eq!(checked_numel(&[]), Some(1));
    }
}
