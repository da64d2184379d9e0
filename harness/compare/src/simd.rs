//! Four f64 lanes, for the block kernel of [`crate::lanes`]: plain arrays
//! that compile on every target ([`Portable`]), or one AVX2 register ([`Avx2`]), used
//! when the CPU has AVX2 (checked at run time; no build flag needed).
//!
//! Every operation is the IEEE operation lane by lane (a sum of two f64 is rounded the
//! same in a register as in a scalar), so both give the same bits. The compiler does
//! not keep a kernel written over arrays of four lanes in vector registers by itself
//! (it packs unrelated sums together), hence the explicit AVX2 type.

/// Four f64 lanes.
///
/// # Safety
/// Every method may use the instructions of its implementation's CPU features: call
/// them only where those are present (the [`Portable`] lanes need none).
pub trait F64x4: Copy {
    /// Four zeros.
    unsafe fn zero() -> Self;
    /// `x` in every lane.
    unsafe fn splat(x: f64) -> Self;
    /// `s[0..4]`, widened.
    unsafe fn load(s: &[f32]) -> Self;
    /// `s[0..4]`.
    unsafe fn load_f64(s: &[f64]) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn abs(self) -> Self;
    /// `if o > self { o } else { self }`, lane by lane.
    unsafe fn max(self, o: Self) -> Self;
    /// `if o < self { o } else { self }`, lane by lane.
    unsafe fn min(self, o: Self) -> Self;
    /// `if self == 0 { a } else { b }`, lane by lane.
    unsafe fn if_zero(self, a: Self, b: Self) -> Self;
    /// `counts` with one added to each lane where `self < t`; a lane of `counts` holds
    /// an integer count in its bits (`f64::to_bits`), starting from [`zero`](Self::zero).
    unsafe fn count_below(self, t: Self, counts: Self) -> Self;
    unsafe fn to_array(self) -> [f64; 4];
}

/// Four lanes as an array: any target.
#[derive(Clone, Copy)]
pub struct Portable([f64; 4]);

impl Portable {
    #[inline(always)]
    fn each(self, o: Portable, f: impl Fn(f64, f64) -> f64) -> Portable {
        let (a, b) = (self.0, o.0);
        Portable([f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])])
    }
}

impl F64x4 for Portable {
    #[inline(always)]
    unsafe fn zero() -> Portable {
        Portable([0.0; 4])
    }
    #[inline(always)]
    unsafe fn splat(x: f64) -> Portable {
        Portable([x; 4])
    }
    #[inline(always)]
    unsafe fn load(s: &[f32]) -> Portable {
        Portable([s[0], s[1], s[2], s[3]].map(f64::from))
    }
    #[inline(always)]
    unsafe fn load_f64(s: &[f64]) -> Portable {
        Portable([s[0], s[1], s[2], s[3]])
    }
    #[inline(always)]
    unsafe fn add(self, o: Portable) -> Portable {
        self.each(o, |a, b| a + b)
    }
    #[inline(always)]
    unsafe fn sub(self, o: Portable) -> Portable {
        self.each(o, |a, b| a - b)
    }
    #[inline(always)]
    unsafe fn mul(self, o: Portable) -> Portable {
        self.each(o, |a, b| a * b)
    }
    #[inline(always)]
    unsafe fn div(self, o: Portable) -> Portable {
        self.each(o, |a, b| a / b)
    }
    #[inline(always)]
    unsafe fn abs(self) -> Portable {
        Portable(self.0.map(f64::abs))
    }
    #[inline(always)]
    unsafe fn max(self, o: Portable) -> Portable {
        self.each(o, |a, b| if b > a { b } else { a })
    }
    #[inline(always)]
    unsafe fn min(self, o: Portable) -> Portable {
        self.each(o, |a, b| if b < a { b } else { a })
    }
    #[inline(always)]
    unsafe fn if_zero(self, a: Portable, b: Portable) -> Portable {
        let s = self.0;
        Portable([0, 1, 2, 3].map(|l| if s[l] == 0.0 { a.0[l] } else { b.0[l] }))
    }
    #[inline(always)]
    unsafe fn count_below(self, t: Portable, counts: Portable) -> Portable {
        let (a, b, n) = (self.0, t.0, counts.0);
        Portable([0, 1, 2, 3].map(|l| f64::from_bits(n[l].to_bits() + u64::from(a[l] < b[l]))))
    }
    #[inline(always)]
    unsafe fn to_array(self) -> [f64; 4] {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{has_avx2, Avx2};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::F64x4;

    /// True when the CPU running this has AVX2 (detected once, then cached by std).
    #[inline]
    pub fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// Four lanes in one AVX2 register. Only for code compiled with AVX2 enabled
    /// (`#[target_feature(enable = "avx2")]`) and run where [`has_avx2`] holds.
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256d);

    impl F64x4 for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Avx2 {
            Avx2(_mm256_setzero_pd())
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> Avx2 {
            Avx2(_mm256_set1_pd(x))
        }
        #[inline(always)]
        unsafe fn load(s: &[f32]) -> Avx2 {
            assert!(s.len() >= 4);
            // SAFETY: four f32 in bounds (checked above); an unaligned load.
            Avx2(_mm256_cvtps_pd(_mm_loadu_ps(s.as_ptr())))
        }
        #[inline(always)]
        unsafe fn load_f64(s: &[f64]) -> Avx2 {
            assert!(s.len() >= 4);
            // SAFETY: four f64 in bounds (checked above); an unaligned load.
            Avx2(_mm256_loadu_pd(s.as_ptr()))
        }
        #[inline(always)]
        unsafe fn add(self, o: Avx2) -> Avx2 {
            Avx2(_mm256_add_pd(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn sub(self, o: Avx2) -> Avx2 {
            Avx2(_mm256_sub_pd(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Avx2) -> Avx2 {
            Avx2(_mm256_mul_pd(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn div(self, o: Avx2) -> Avx2 {
            Avx2(_mm256_div_pd(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn abs(self) -> Avx2 {
            Avx2(_mm256_andnot_pd(_mm256_set1_pd(-0.0), self.0))
        }
        #[inline(always)]
        unsafe fn max(self, o: Avx2) -> Avx2 {
            // maxpd(a, b) is `if a > b { a } else { b }`.
            Avx2(_mm256_max_pd(o.0, self.0))
        }
        #[inline(always)]
        unsafe fn min(self, o: Avx2) -> Avx2 {
            // minpd(a, b) is `if a < b { a } else { b }`.
            Avx2(_mm256_min_pd(o.0, self.0))
        }
        #[inline(always)]
        unsafe fn if_zero(self, a: Avx2, b: Avx2) -> Avx2 {
            let zero = _mm256_cmp_pd::<_CMP_EQ_OQ>(self.0, _mm256_setzero_pd());
            Avx2(_mm256_blendv_pd(b.0, a.0, zero))
        }
        #[inline(always)]
        unsafe fn count_below(self, t: Avx2, counts: Avx2) -> Avx2 {
            // The comparison's mask is -1 where true.
            let lt = _mm256_castpd_si256(_mm256_cmp_pd::<_CMP_LT_OQ>(self.0, t.0));
            Avx2(_mm256_castsi256_pd(_mm256_sub_epi64(_mm256_castpd_si256(counts.0), lt)))
        }
        #[inline(always)]
        unsafe fn to_array(self) -> [f64; 4] {
            let mut out = [0.0; 4];
            _mm256_storeu_pd(out.as_mut_ptr(), self.0);
            out
        }
    }
}
