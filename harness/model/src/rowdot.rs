//! Stored weight rows dotted with a few input rows at memory speed: how a decode step
//! multiplies, where every weight is read once and used once or a few times.
//!
//! Each weight row is decoded from its stored bytes and rounded to the weight precision
//! eight values at a time, and multiplied into eight partial sums that add up in the
//! order of `ndarray`'s `dot` on contiguous rows ([`dot`]: lane `k % 8`, then
//! `(p0 + p4) + (p1 + p5) + (p2 + p6) + (p3 + p7)`, then the tail in index order). The
//! vectorised kernel ([`x86`], AVX2 with F16C) therefore gives the bits [`dot`] gives on
//! the rows as [`Tensor::read_f64_rounded_into`] / [`Tensor::read_f32_rounded_into`]
//! read them; four weight rows are carried at once so that the sums' latency does not
//! bound the read. Anything the kernel does not decode (another dtype pair, a
//! subnormal, infinite or NaN float32 weight rounded to bfloat16, a CPU without AVX2)
//! goes through those reads and [`dot`].

use dump::{DType, Precision, Tensor};

/// Weight rows carried through one pass of the kernel.
const GROUP: usize = 4;

/// `Σ x[k]·w[k]` summed as `ndarray`'s `dot` sums two contiguous slices of the same
/// length (`numeric_util::unrolled_dot`): eight partial sums, lane `k % 8`, combined as
/// `(p0 + p4) + (p1 + p5) + (p2 + p6) + (p3 + p7)`, then the tail in index order.
pub fn dot<T>(x: &[T], w: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    debug_assert_eq!(x.len(), w.len());
    let mut p = [T::default(); 8];
    let main = x.len() - x.len() % 8;
    for (xs, ws) in x[..main].chunks_exact(8).zip(w[..main].chunks_exact(8)) {
        for l in 0..8 {
            p[l] = p[l] + xs[l] * ws[l];
        }
    }
    let mut sum = T::default();
    for l in 0..4 {
        sum = sum + (p[l] + p[l + 4]);
    }
    for (&a, &b) in x[main..].iter().zip(&w[main..]) {
        sum = sum + a * b;
    }
    sum
}

/// How the kernel decodes a stored row into the values the products see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// float32, as stored.
    F32,
    /// float32 rounded to bfloat16 (to nearest even), as `Precision::Bf16` rounds it.
    F32ToBf16,
    /// bfloat16, widened.
    Bf16,
    /// float16, widened.
    F16,
}

impl Code {
    fn of(dtype: DType, at: Option<Precision>) -> Option<Code> {
        use Precision::{Bf16, F16, F32};
        match (dtype, at) {
            (DType::F32, None | Some(F32)) => Some(Code::F32),
            (DType::F32, Some(Bf16)) => Some(Code::F32ToBf16),
            (DType::BF16, None | Some(Bf16 | F32)) => Some(Code::Bf16),
            (DType::F16, None | Some(F16 | F32)) => Some(Code::F16),
            _ => None,
        }
    }
}

/// What the products are summed in: `f32` for a numerics that multiplies in float32,
/// else `f64`.
pub trait Value:
    Copy + Default + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + x86::Sums
{
    /// Elements `start..start + out.len()` of `t`, each stored at `at`: the tensor's own
    /// read at this width.
    fn read(t: &Tensor, start: usize, out: &mut [Self], at: Option<Precision>);
    fn wide(self) -> f64;
}

impl Value for f32 {
    fn read(t: &Tensor, start: usize, out: &mut [f32], at: Option<Precision>) {
        t.read_f32_rounded_into(start, out, at);
    }
    fn wide(self) -> f64 {
        f64::from(self)
    }
}

impl Value for f64 {
    fn read(t: &Tensor, start: usize, out: &mut [f64], at: Option<Precision>) {
        t.read_f64_rounded_into(start, out, at);
    }
    fn wide(self) -> f64 {
        self
    }
}

/// `part[i·(r1 − r0) + r − r0] = x_i · w_r` for the stored rows `r0..r1` of `t`
/// (`[rows, cols]`, each value stored at `at` as it is read) and every input row `x_i`
/// of `x` (`[m, cols]`, row-major), summed in `T` as [`dot`] sums, widened into `part`.
pub fn rows_dot<T: Value>(
    t: &Tensor,
    at: Option<Precision>,
    rows: (usize, usize),
    x: &[T],
    part: &mut [f64],
) {
    rows_dot_with(t, at, rows, x, part, x86::wide());
}

/// [`rows_dot`], with the kernels that use AVX-512VL's registers where `wide` (which the
/// CPU must have), else the AVX2 ones: the same bits either way.
fn rows_dot_with<T: Value>(
    t: &Tensor,
    at: Option<Precision>,
    (r0, r1): (usize, usize),
    x: &[T],
    part: &mut [f64],
    wide: bool,
) {
    let cols = t.shape()[1];
    let nb = r1 - r0;
    let m = x.len() / cols.max(1);
    debug_assert_eq!(part.len(), m * nb);
    let code = Code::of(t.dtype(), at).filter(|_| cols > 0 && x86::available());
    let mut r = r0;
    while r < r1 {
        let g = GROUP.min(r1 - r);
        let mut put = |i: usize, j: usize, v: f64| part[i * nb + r + j - r0] = v;
        let done =
            code.is_some_and(|c| g == GROUP && x86::group(t, at, c, wide, r, x, m, &mut put));
        if !done {
            by_reads(t, at, (r, r + g), x, m, &mut put);
        }
        r += g;
    }
}

/// Rows `r0..r1` read with the tensor's own reads and dotted with [`dot`].
fn by_reads<T: Value>(
    t: &Tensor,
    at: Option<Precision>,
    (r0, r1): (usize, usize),
    x: &[T],
    m: usize,
    mut put: impl FnMut(usize, usize, f64),
) {
    let cols = t.shape()[1];
    let mut w = vec![T::default(); cols];
    for r in r0..r1 {
        T::read(t, r * cols, &mut w, at);
        for i in 0..m {
            put(i, r - r0, dot(&x[i * cols..(i + 1) * cols], &w).wide());
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Code, Value, GROUP};
    use dump::{Precision, Tensor};

    /// True when the CPU has what the kernel uses (detected once, then cached by std).
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
    }

    /// True when the kernels may also use AVX-512VL's sixteen more vector registers
    /// (the same instructions on 256-bit vectors, the same bits): enough to carry four
    /// input rows' float32 sums, or two rows' float64 ones, without spilling them.
    pub(super) fn wide() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
    }

    /// [`dot`]'s eight lanes of each row combined, for the summing type.
    pub trait Sums: Sized {
        /// How many input rows one pass carries at most: what fits the vector registers
        /// with `wide` ones.
        fn rows_at_once(wide: bool) -> usize;

        /// Over the first `main` values (a multiple of 8) of each of `rows`, decoded as
        /// `code` once and dotted with each of the `M` input rows `xs`; false when a
        /// value is off the fast path.
        ///
        /// # Safety
        /// [`available`] holds, and [`wide`] where `wide` is true; every row holds at
        /// least `main` values of its dtype and each of `xs` at least `main` values.
        unsafe fn sums<const M: usize>(
            code: Code,
            wide: bool,
            rows: &[&[u8]; GROUP],
            xs: [&[Self]; M],
            main: usize,
            out: &mut [[Self; GROUP]; M],
        ) -> bool;
    }

    /// `Sums` for type `$t` by kernel `$k` (and `$w` with the wide registers), carrying
    /// at most `$narrow` (`$wide`) input rows, monomorphised per code.
    macro_rules! sums_by {
        ($t:ty, $k:ident, $w:ident, $narrow:expr, $wide:expr) => {
            impl Sums for $t {
                fn rows_at_once(wide: bool) -> usize {
                    if wide {
                        $wide
                    } else {
                        $narrow
                    }
                }

                unsafe fn sums<const M: usize>(
                    c: Code,
                    wide: bool,
                    rows: &[&[u8]; GROUP],
                    xs: [&[$t]; M],
                    main: usize,
                    out: &mut [[$t; GROUP]; M],
                ) -> bool {
                    // SAFETY: passed on from the caller.
                    unsafe {
                        match (c, wide) {
                            (Code::F32, false) => $k::<0, M>(rows, xs, main, out),
                            (Code::F32ToBf16, false) => $k::<1, M>(rows, xs, main, out),
                            (Code::Bf16, false) => $k::<2, M>(rows, xs, main, out),
                            (Code::F16, false) => $k::<3, M>(rows, xs, main, out),
                            (Code::F32, true) => $w::<0, M>(rows, xs, main, out),
                            (Code::F32ToBf16, true) => $w::<1, M>(rows, xs, main, out),
                            (Code::Bf16, true) => $w::<2, M>(rows, xs, main, out),
                            (Code::F16, true) => $w::<3, M>(rows, xs, main, out),
                        }
                    }
                }
            }
        };
    }
    sums_by!(f32, f32_sums, f32_sums_wide, 2, 4);
    sums_by!(f64, f64_sums, f64_sums_wide, 2, 2);

    /// Rows `r..r + GROUP` of `t` (stored at `at`, which `code` decodes) dotted with
    /// the `m` rows of `x`, each result handed to `put(i, j, value)`; false when a
    /// weight is off the fast path (nothing is handed then: the weights decide it, and
    /// the first input row finds it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn group<T: Value>(
        t: &Tensor,
        at: Option<Precision>,
        code: Code,
        wide: bool,
        r: usize,
        x: &[T],
        m: usize,
        put: &mut impl FnMut(usize, usize, f64),
    ) -> bool {
        let cols = t.shape()[1];
        let size = t.dtype().size();
        let bytes = &t.bytes()[r * cols * size..(r + GROUP) * cols * size];
        let rows: [&[u8]; GROUP] =
            std::array::from_fn(|j| &bytes[j * cols * size..(j + 1) * cols * size]);
        let main = cols - cols % 8;
        let tail = cols - main;
        let xi = |i: usize| &x[i * cols..(i + 1) * cols];
        let mut w = [T::default(); 8];
        let mut finish = |i: usize, o: [T; GROUP], put: &mut dyn FnMut(usize, usize, f64)| {
            for (j, o) in o.into_iter().enumerate() {
                T::read(t, (r + j) * cols + main, &mut w[..tail], at);
                put(i, j, finish_tail(o, &xi(i)[main..], &w[..tail]).wide());
            }
        };
        // Input rows go through a pass together (four or two, then one), sharing each
        // decoded weight; each sum is its own.
        let most = T::rows_at_once(wide);
        let mut i = 0;
        while i < m {
            let left = m - i;
            let ok = if most >= 4 && left >= 4 {
                pass::<T, 4>(code, wide, &rows, xi, i, main, &mut finish, put)
            } else if left >= 2 {
                pass::<T, 2>(code, wide, &rows, xi, i, main, &mut finish, put)
            } else {
                pass::<T, 1>(code, wide, &rows, xi, i, main, &mut finish, put)
            };
            if !ok {
                return false;
            }
            i += if most >= 4 && left >= 4 { 4 } else { left.min(2) };
        }
        true
    }

    /// One pass of the kernel over input rows `i..i + M`, each result finished by
    /// `finish`; false when a weight is off the fast path (nothing finished then).
    #[allow(clippy::too_many_arguments)]
    fn pass<'x, T: Value + 'x, const M: usize>(
        code: Code,
        wide: bool,
        rows: &[&[u8]; GROUP],
        xi: impl Fn(usize) -> &'x [T],
        i: usize,
        main: usize,
        finish: &mut impl FnMut(usize, [T; GROUP], &mut dyn FnMut(usize, usize, f64)),
        put: &mut dyn FnMut(usize, usize, f64),
    ) -> bool {
        let mut o = [[T::default(); GROUP]; M];
        // SAFETY: `available()` holds (the caller checks it) and `wide()` where `wide`;
        // every row holds `cols` values of the dtype's size and each input row `cols`
        // values, of which the kernel reads the first `main`.
        if !unsafe { T::sums(code, wide, rows, std::array::from_fn(|d| xi(i + d)), main, &mut o) } {
            return false;
        }
        for (d, o) in o.into_iter().enumerate() {
            finish(i + d, o, put);
        }
        true
    }

    /// [`dot`]'s tail (fewer than eight values) after its lanes are combined in `sum`.
    fn finish_tail<T>(mut sum: T, x: &[T], w: &[T]) -> T
    where
        T: Copy + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
    {
        for (&a, &b) in x.iter().zip(w) {
            sum = sum + a * b;
        }
        sum
    }

    /// Eight stored values of `p` from element `k`, decoded as code `C` (0 float32,
    /// 1 float32 rounded to bfloat16, 2 bfloat16, 3 float16); `bad` gathers the lanes
    /// off the fast path.
    #[inline(always)]
    unsafe fn load8<const C: u8>(p: *const u8, k: usize, bad: &mut __m256i) -> __m256 {
        match C {
            0 => _mm256_loadu_ps(p.add(4 * k).cast()),
            1 => {
                // `tensor::bf16_bits`, eight lanes wide.
                let b = _mm256_loadu_si256(p.add(4 * k).cast());
                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                let r = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_and_si256(b, _mm256_set1_epi32(!7)), odd),
                    _mm256_set1_epi32(0x7fff),
                );
                let r = _mm256_and_si256(r, _mm256_set1_epi32(0xffff_0000u32 as i32));
                let e = _mm256_and_si256(b, _mm256_set1_epi32(0x7f80_0000));
                let zero_exp = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
                let max_exp = _mm256_cmpeq_epi32(e, _mm256_set1_epi32(0x7f80_0000));
                let zero = _mm256_cmpeq_epi32(
                    _mm256_and_si256(b, _mm256_set1_epi32(0x7fff_ffff)),
                    _mm256_setzero_si256(),
                );
                *bad = _mm256_or_si256(*bad, _mm256_andnot_si256(zero, zero_exp));
                *bad = _mm256_or_si256(*bad, max_exp);
                _mm256_castsi256_ps(r)
            }
            2 => {
                let h = _mm_loadu_si128(p.add(2 * k).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * k).cast())),
        }
    }

    /// The kernels, compiled for the target features `$features`.
    macro_rules! kernels {
        ($f32:ident, $f64:ident, $features:literal) => {
            /// [`dot`]'s eight lanes over the first `main` values (a multiple of 8) of each of
            /// the rows dotted with each input row, combined; false when a value is off the
            /// fast path.
            #[target_feature(enable = $features)]
            unsafe fn $f32<const C: u8, const M: usize>(
                rows: &[&[u8]; GROUP],
                xs: [&[f32]; M],
                main: usize,
                out: &mut [[f32; GROUP]; M],
            ) -> bool {
                let mut acc = [[_mm256_setzero_ps(); GROUP]; M];
                let mut bad = _mm256_setzero_si256();
                let mut k = 0;
                while k < main {
                    let mut xv = [_mm256_setzero_ps(); M];
                    for i in 0..M {
                        xv[i] = _mm256_loadu_ps(xs[i].as_ptr().add(k));
                    }
                    for j in 0..GROUP {
                        let w = load8::<C>(rows[j].as_ptr(), k, &mut bad);
                        for i in 0..M {
                            acc[i][j] = _mm256_add_ps(acc[i][j], _mm256_mul_ps(xv[i], w));
                        }
                    }
                    k += 8;
                }
                if _mm256_testz_si256(bad, bad) == 0 {
                    return false;
                }
                for (out, acc) in out.iter_mut().zip(acc) {
                    for (o, a) in out.iter_mut().zip(acc) {
                        let mut p = [0.0f32; 8];
                        _mm256_storeu_ps(p.as_mut_ptr(), a);
                        let mut sum = 0.0f32;
                        for l in 0..4 {
                            sum += p[l] + p[l + 4];
                        }
                        *o = sum;
                    }
                }
                true
            }

            /// The float32 kernel in float64: each decoded value widened, lanes 0–3 and 4–7 in two
            /// registers.
            #[target_feature(enable = $features)]
            unsafe fn $f64<const C: u8, const M: usize>(
                rows: &[&[u8]; GROUP],
                xs: [&[f64]; M],
                main: usize,
                out: &mut [[f64; GROUP]; M],
            ) -> bool {
                let mut lo = [[_mm256_setzero_pd(); GROUP]; M];
                let mut hi = [[_mm256_setzero_pd(); GROUP]; M];
                let mut bad = _mm256_setzero_si256();
                let mut k = 0;
                while k < main {
                    for j in 0..GROUP {
                        let w = load8::<C>(rows[j].as_ptr(), k, &mut bad);
                        let wl = _mm256_cvtps_pd(_mm256_castps256_ps128(w));
                        let wh = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(w));
                        for i in 0..M {
                            let xl = _mm256_loadu_pd(xs[i].as_ptr().add(k));
                            let xh = _mm256_loadu_pd(xs[i].as_ptr().add(k + 4));
                            lo[i][j] = _mm256_add_pd(lo[i][j], _mm256_mul_pd(xl, wl));
                            hi[i][j] = _mm256_add_pd(hi[i][j], _mm256_mul_pd(xh, wh));
                        }
                    }
                    k += 8;
                }
                if _mm256_testz_si256(bad, bad) == 0 {
                    return false;
                }
                for i in 0..M {
                    for j in 0..GROUP {
                        let mut p = [0.0f64; 8];
                        _mm256_storeu_pd(p.as_mut_ptr(), lo[i][j]);
                        _mm256_storeu_pd(p.as_mut_ptr().add(4), hi[i][j]);
                        let mut sum = 0.0f64;
                        for l in 0..4 {
                            sum += p[l] + p[l + 4];
                        }
                        out[i][j] = sum;
                    }
                }
                true
            }
        };
    }
    kernels!(f32_sums, f64_sums, "avx2,f16c");
    kernels!(f32_sums_wide, f64_sums_wide, "avx2,f16c,avx512f,avx512vl");
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{Code, Value};
    use dump::{Precision, Tensor};

    /// No kernel here: every type sums through the reads.
    pub trait Sums {}
    impl<T> Sums for T {}

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn wide() -> bool {
        false
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn group<T: Value>(
        _: &Tensor,
        _: Option<Precision>,
        _: Code,
        _: bool,
        _: usize,
        _: &[T],
        _: usize,
        _: &mut impl FnMut(usize, usize, f64),
    ) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of every magnitude and sign, fixed by the index.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let h = (i as u64 + seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
                let v = (h as f64 / (1u64 << 24) as f64 - 0.5) * 3.0;
                v * 2f64.powi((h % 13) as i32 - 6)
            })
            .collect()
    }

    fn by_reads_part<T: Value>(t: &Tensor, at: Option<Precision>, x: &[T], m: usize) -> Vec<f64> {
        let rows = t.shape()[0];
        let mut part = vec![0.0; m * rows];
        by_reads(t, at, (0, rows), x, m, |i, j, v| part[i * rows + j] = v);
        part
    }

    /// [`rows_dot`] and [`by_reads`] over every row of `t`.
    fn both<T: Value>(
        t: &Tensor,
        at: Option<Precision>,
        x: &[T],
        m: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut part = vec![0.0; m * t.shape()[0]];
        rows_dot_with(t, at, (0, t.shape()[0]), x, &mut part, false);
        let reads = by_reads_part(t, at, x, m);
        if x86::wide() {
            // The wide kernels, where the CPU has them, give the narrow ones' bits.
            let mut wide = vec![0.0; part.len()];
            rows_dot_with(t, at, (0, t.shape()[0]), x, &mut wide, true);
            assert!(wide.iter().zip(&part).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        (part, reads)
    }

    #[test]
    fn dot_sums_as_ndarray_dot_sums() {
        for n in [0, 5, 8, 37, 4096] {
            let (x, w) = (values(n, 1), values(n, 2));
            let nd = ndarray::ArrayView1::from(&x).dot(&ndarray::ArrayView1::from(&w));
            assert_eq!(dot(&x, &w).to_bits(), nd.to_bits(), "{n}");
            let (x, w): (Vec<f32>, Vec<f32>) =
                (x.iter().map(|&v| v as f32).collect(), w.iter().map(|&v| v as f32).collect());
            let nd = ndarray::ArrayView1::from(&x).dot(&ndarray::ArrayView1::from(&w));
            assert_eq!(dot(&x, &w).to_bits(), nd.to_bits(), "{n}");
        }
    }

    #[test]
    fn the_kernel_gives_the_bits_of_the_reads_and_dot_for_every_stored_dtype() {
        // 11 rows (two groups of four and three rows by the reads), 45 columns (five
        // lanes of eight and a tail of five), one to five input rows (in pairs and one
        // alone).
        let (rows, cols) = (11, 45);
        let mut w = values(rows * cols, 3);
        // Every third weight halfway between two bfloat16 values, on odd and even ones.
        for (i, v) in w.iter_mut().enumerate().step_by(3) {
            let bits = (*v as f32).to_bits() & 0xffff_0000 | 0x8000;
            *v = f64::from(f32::from_bits(bits ^ ((i as u32 & 2) << 15)));
        }
        let cases = [
            (DType::F32, None),
            (DType::F32, Some(Precision::F32)),
            (DType::F32, Some(Precision::Bf16)),
            (DType::BF16, Some(Precision::Bf16)),
            (DType::BF16, None),
            (DType::F16, Some(Precision::F16)),
            (DType::F32, Some(Precision::F16)),
        ];
        for (dtype, at) in cases {
            let t = Tensor::from_f64(&[rows, cols], &w, dtype);
            for m in 1..=5 {
                let x64: Vec<f64> =
                    values(m * cols, 4).iter().map(|&v| Precision::Bf16.round(v)).collect();
                let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
                let in_f32_and_f64 = [both(&t, at, &x32, m), both(&t, at, &x64, m)];
                for (part, reads) in in_f32_and_f64 {
                    let same = part.iter().zip(&reads).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype:?} at {at:?}, {m} rows: {part:?} vs {reads:?}");
                }
            }
        }
    }

    #[test]
    fn float32_weights_off_the_bfloat16_fast_path_are_rounded_as_the_reads_round_them() {
        let (rows, cols) = (8, 16);
        let mut w = values(rows * cols, 5);
        w[3] = f64::from(f32::from_bits(1)); // subnormal
        w[cols + 9] = f64::INFINITY;
        w[5 * cols + 2] = -f64::from(f32::MAX); // rounds past bfloat16's largest
        let t = Tensor::from_f64(&[rows, cols], &w, DType::F32);
        let x: Vec<f32> = values(cols, 6).iter().map(|&v| v as f32).collect();
        let mut part = vec![0.0; rows];
        rows_dot(&t, Some(Precision::Bf16), (0, rows), &x, &mut part);
        let reads = by_reads_part(&t, Some(Precision::Bf16), &x, 1);
        assert!(part.iter().zip(&reads).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(part[1].is_infinite() && part[5].is_infinite(), "{part:?}");
    }
}
