//! A stored tensor: dtype, shape and little-endian bytes, either memory-mapped from a
//! safetensors file or owned. Values are read element by element as `f64` so that
//! metrics can stream over a tensor without a whole-tensor `f64` copy.

use std::ops::Range;
use std::sync::Arc;

use super::dtype::{DType, Precision};

#[derive(Clone)]
enum Bytes {
    /// `populated`: whether [`Tensor::populate`] has mapped the range's pages (shared by
    /// clones).
    Mapped {
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
        populated: Arc<std::sync::Once>,
    },
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
    pub fn mapped(
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
    ) -> Tensor {
        let populated = Arc::new(std::sync::Once::new());
        Tensor { dtype, shape, bytes: Bytes::Mapped { map, range, populated } }
    }

    /// A tensor over owned little-endian bytes. The caller has checked the length.
    pub fn owned(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Tensor {
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
        // One loop per dtype, each writing fixed-size chunks (a copy for float64).
        fn put<const N: usize>(values: &[f64], f: impl Fn(f64) -> [u8; N]) -> Vec<u8> {
            let mut bytes = vec![0u8; values.len() * N];
            for (b, &v) in bytes.chunks_exact_mut(N).zip(values) {
                b.copy_from_slice(&f(v));
            }
            bytes
        }
        let bytes = match dtype {
            DType::F64 => put(values, f64::to_le_bytes),
            DType::F32 => put(values, |v| (v as f32).to_le_bytes()),
            DType::F16 => put(values, |v| half::f16::from_f64(v).to_le_bytes()),
            DType::BF16 => put(values, |v| half::bf16::from_f64(v).to_le_bytes()),
            DType::I64 => put(values, |v| (v as i64).to_le_bytes()),
            DType::I32 => put(values, |v| (v as i32).to_le_bytes()),
            DType::U8 => put(values, |v| [v as u8]),
            DType::Bool => put(values, |v| [u8::from(v != 0.0)]),
        };
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
        match array.as_slice() {
            Some(values) => Tensor::from_f64(array.shape(), values, dtype),
            None => {
                let values: Vec<f64> = array.iter().copied().collect();
                Tensor::from_f64(array.shape(), &values, dtype)
            }
        }
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
            Bytes::Mapped { map, range, .. } => &map[range.clone()],
            Bytes::Owned(v) => v,
        }
    }

    /// Hands the pages of a memory-mapped tensor back to the kernel once it has been read
    /// (`madvise(MADV_DONTNEED)` on its range): they are read again from the file if the
    /// tensor is touched later, so this only bounds memory. Nothing for owned bytes.
    pub fn release(&self) {
        #[cfg(unix)]
        if let Bytes::Mapped { map, range, .. } = &self.bytes {
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

    /// Maps every page of a memory-mapped tensor at once (`madvise(MADV_POPULATE_READ)`,
    /// Linux 5.14 and later), for a tensor about to be read whole: one call instead of a
    /// page fault per few pages on first touch. Pages not yet cached are read from the
    /// file here. Once per mapping (later calls do nothing); nothing for owned bytes, or
    /// where the kernel does not offer it.
    pub fn populate(&self) {
        #[cfg(target_os = "linux")]
        if let Bytes::Mapped { map, range, populated } = &self.bytes {
            // A failure (an older kernel) only leaves the pages to be faulted in on use.
            populated.call_once(|| {
                let _ = map.advise_range(
                    memmap2::Advice::PopulateRead,
                    range.start,
                    range.end - range.start,
                );
            });
        }
    }

    /// [`release`](Self::release) for the pages of elements `range` only (row-major flat
    /// indices), once they have been read: how a very large tensor is read without
    /// holding all of it. The pages at either end may hold neighbouring elements; those
    /// are read again from the file when touched.
    pub fn release_elements(&self, range: Range<usize>) {
        #[cfg(unix)]
        if let Bytes::Mapped { map, range: bytes, .. } = &self.bytes {
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
            DType::F64 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(8)) {
                    *o = f64::from_le_bytes(e.try_into().expect("chunks of 8"));
                }
            }
            DType::F32 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes(word(e)) as f64;
                }
            }
            DType::BF16 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes(half_word(e))) << 16) as f64;
                }
            }
            DType::F16 => {
                for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes(half_word(e)).to_f64();
                }
            }
            dtype => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = decode(dtype, b, i);
                }
            }
        }
    }

    /// Elements `start..start + out.len()` as `f64`, each stored at `at` first
    /// ([`Precision::round`]; as they are for `None`). A float32 tensor rounded to
    /// bfloat16 or float16 is rounded on its float32 bits as it is read, in one pass;
    /// values the target holds exactly are only read.
    pub fn read_f64_rounded_into(&self, start: usize, out: &mut [f64], at: Option<Precision>) {
        use Precision::{Bf16, F16, F32};
        let Some(p) = at else { return self.read_f64_into(start, out) };
        match (self.dtype, p) {
            (DType::F32, F32) | (DType::BF16, Bf16 | F32) | (DType::F16, F16 | F32) => {
                self.read_f64_into(start, out)
            }
            (DType::F32, Bf16 | F16) => {
                let b = &self.bytes()[start * 4..(start + out.len()) * 4];
                let words = out.iter_mut().zip(b.chunks_exact(4));
                let fits = if p == Bf16 {
                    words.fold(true, |all, (o, e)| {
                        let (v, fits) = f32_bits_to_bf16(u32::from_le_bytes(word(e)));
                        *o = v;
                        all & fits
                    })
                } else {
                    words.fold(true, |all, (o, e)| {
                        let (v, fits) = f32_bits_to_f16(u32::from_le_bytes(word(e)));
                        *o = v;
                        all & fits
                    })
                };
                if !fits {
                    for (o, e) in out.iter_mut().zip(b.chunks_exact(4)) {
                        *o = p.round(f32::from_le_bytes(word(e)) as f64);
                    }
                }
            }
            _ => {
                self.read_f64_into(start, out);
                p.round_slice(out);
            }
        }
    }

    /// [`Tensor::read_f64_rounded_into`] into `f32` for a caller that multiplies in
    /// float32: the same values, which `at` (a float32, bfloat16 or float16) makes
    /// float32 values. Reads float32 rounded to bfloat16, and bfloat16 or float32 kept
    /// as they are, in one vectorisable pass; anything else through `f64`.
    pub fn read_f32_rounded_into(&self, start: usize, out: &mut [f32], at: Option<Precision>) {
        use Precision::{Bf16, F32};
        let n = out.len();
        match (self.dtype, at) {
            (DType::F32, None | Some(F32)) => {
                let b = &self.bytes()[start * 4..(start + n) * 4];
                for (o, e) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes(word(e));
                }
            }
            (DType::BF16, None | Some(Bf16 | F32)) => {
                let b = &self.bytes()[start * 2..(start + n) * 2];
                for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes(half_word(e))) << 16);
                }
            }
            // Off the fast path (a subnormal, infinite or NaN value): the f64 read's.
            (DType::F32, Some(Bf16)) => {
                let b = &self.bytes()[start * 4..(start + n) * 4];
                if f32_to_bf16_rounded(b, out) {
                    self.read_f32_through_f64(start, out, at);
                }
            }
            _ => self.read_f32_through_f64(start, out, at),
        }
    }

    /// [`Tensor::read_f64_rounded_into`] a chunk at a time, narrowed to `f32`.
    fn read_f32_through_f64(&self, start: usize, out: &mut [f32], at: Option<Precision>) {
        let mut buf = [0.0f64; 1024];
        for (i, o) in out.chunks_mut(buf.len()).enumerate() {
            let buf = &mut buf[..o.len()];
            self.read_f64_rounded_into(start + i * 1024, buf, at);
            o.iter_mut().zip(buf.iter()).for_each(|(o, &v)| *o = v as f32);
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

/// Little-endian float32 values rounded to bfloat16 as [`f32_bits_to_bf16`] rounds them,
/// into `out`; true when a value was off the fast path (subnormal, infinite or NaN) and
/// `out` must be redone. With AVX2 where the CPU has it (the same integer operations,
/// eight lanes wide: bit-identical).
fn f32_to_bf16_rounded(b: &[u8], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { f32_to_bf16_rounded_avx2(b, out) };
    }
    f32_to_bf16_rounded_body(b, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f32_to_bf16_rounded_avx2(b: &[u8], out: &mut [f32]) -> bool {
    f32_to_bf16_rounded_body(b, out)
}

#[inline(always)]
fn f32_to_bf16_rounded_body(b: &[u8], out: &mut [f32]) -> bool {
    // One flag for the slice, folded without branches so that the loop vectorises.
    let mut odd = 0u32;
    for (o, e) in out.iter_mut().zip(b.chunks_exact(4)) {
        let (r, fits) = bf16_bits(u32::from_le_bytes(word(e)));
        odd |= u32::from(!fits);
        *o = f32::from_bits(r);
    }
    odd != 0
}

/// A 4-byte chunk as an array, in one unaligned load.
#[inline(always)]
fn word(e: &[u8]) -> [u8; 4] {
    e.try_into().expect("chunks of 4")
}

/// A 2-byte chunk as an array.
#[inline(always)]
fn half_word(e: &[u8]) -> [u8; 2] {
    e.try_into().expect("chunks of 2")
}

/// The float32 value with these bits rounded to bfloat16 as `half::bf16::from_f64` rounds
/// it (to nearest even from the top 20 mantissa bits), and whether it took the fast path
/// (normal values and zeros; otherwise the value is not meaningful).
#[inline(always)]
fn f32_bits_to_bf16(bits: u32) -> (f64, bool) {
    let (r, fits) = bf16_bits(bits);
    (f64::from(f32::from_bits(r)), fits)
}

/// [`f32_bits_to_bf16`] as float32 bits.
#[inline(always)]
fn bf16_bits(bits: u32) -> (u32, bool) {
    let exp = (bits >> 23) & 0xff;
    let fits = exp.wrapping_sub(1) < 254 || bits << 1 == 0;
    // Overflow carries into the exponent and gives infinity, as `half` does.
    (((bits & !7) + 0x7fff + ((bits >> 16) & 1)) & 0xffff_0000, fits)
}

/// The float32 value with these bits rounded to float16 (to nearest even), and whether
/// it took the fast path (normal float16 values and zeros).
#[inline(always)]
fn f32_bits_to_f16(bits: u32) -> (f64, bool) {
    let r = (bits + 0x0fff + ((bits >> 13) & 1)) & !0x1fff;
    let fits = ((bits >> 23) & 0xff).wrapping_sub(127 - 14) <= 29 && (r >> 23) & 0xff <= 127 + 15
        || bits << 1 == 0;
    (f64::from(f32::from_bits(r)), fits)
}

#[inline]
fn decode(dtype: DType, b: &[u8], i: usize) -> f64 {
    let s = dtype.size();
    let e = &b[i * s..i * s + s];
    match dtype {
        DType::F64 => f64::from_le_bytes(e.try_into().expect("8 bytes")),
        DType::F32 => f32::from_le_bytes(e.try_into().expect("4 bytes")) as f64,
        DType::F16 => half::f16::from_le_bytes(half_word(e)).to_f64(),
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
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    let nonzero =
        shape.iter().filter(|&&d| d != 0).try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_rounded_equals_rounding_each_value_read() {
        // Float32 bit patterns around both half formats' ranges (ties, carries,
        // subnormals, overflow, zeros, non-finite), from a fixed seed.
        let mut v: Vec<f64> = vec![0.0, -0.0, 65504.0, 65520.0, f32::MAX as f64, 1e-40];
        v.extend([f64::INFINITY, f64::NAN, 1.0 + 2f64.powi(-8) + 2f64.powi(-22)]);
        let mut s: u64 = 0x5eed;
        for _ in 0..100_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let bits = (s >> 32) as u32;
            let exp = 127 - 30 + (s >> 20) as u32 % 60;
            v.push(f64::from(f32::from_bits(bits & 0x807f_ffff | exp << 23)));
            v.push(f64::from(f32::from_bits(bits)));
        }
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let t = Tensor::from_f64(&[v.len()], &v, dtype);
            let read = t.to_f64_vec();
            for p in [None, Some(Precision::Bf16), Some(Precision::F16), Some(Precision::F32)] {
                let mut out = vec![0.0; v.len() - 3];
                t.read_f64_rounded_into(3, &mut out, p);
                for (r, x) in out.iter().zip(&read[3..]) {
                    let want = p.map_or(*x, |p| p.round(*x));
                    assert!(r.to_bits() == want.to_bits() || want.is_nan(), "{dtype} {p:?} {x:e}");
                }
            }
        }
    }

    #[test]
    fn reading_into_f32_equals_reading_into_f64() {
        // Normal values, zeros, ties, subnormals, the largest finite values and
        // infinities: each read of each dtype at each precision gives the f64 read's values.
        let mut v: Vec<f64> = (0..3000).map(|i| (f64::from(i) * 0.7311).sin() * 3.0).collect();
        v.extend([0.0, -0.0, 1.0 + 2f64.powi(-8), 1e-40, -3e-42, 3.4e38, -3.4e38, f64::INFINITY]);
        v.push(f64::from(f32::from_bits(0x3f80_8000)));
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let t = Tensor::from_f64(&[v.len()], &v, dtype);
            for p in [None, Some(Precision::Bf16), Some(Precision::F16), Some(Precision::F32)] {
                let mut wide = vec![0.0; v.len() - 2];
                t.read_f64_rounded_into(2, &mut wide, p);
                let mut narrow = vec![0.0f32; v.len() - 2];
                t.read_f32_rounded_into(2, &mut narrow, p);
                for (w, n) in wide.iter().zip(&narrow) {
                    assert!((*w as f32).to_bits() == n.to_bits(), "{dtype} {p:?} {w:e} {n:e}");
                }
            }
        }
    }

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
