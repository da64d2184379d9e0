//! Stored bytes to lanes: a block of float32, bfloat16 or float16 pairs decoded into two
//! float32 arrays with the units in the last place and the NaN/Inf check taken on the
//! way as integer arithmetic on the bits ([`Lane`], [`decode_pair`]), or a block with
//! float64 on either side read into two float64 arrays ([`Pair::decode_wide`]).

use super::plan::{Pair, Scratch};
use super::HUGE;
use crate::metrics::{ulp_distance, ulp_distance_f64};
use dump::DType;

impl Pair<'_> {
    /// Decodes the block of `len` pairs at `start` into the scratch arrays (measuring
    /// the units in the last place when `ULPS`).
    #[inline(always)]
    pub(super) fn decode<const ULPS: bool>(
        &self,
        start: usize,
        len: usize,
        s: &mut Scratch,
    ) -> Decoded {
        let (g, c) = (&mut s.g[..len], &mut s.c[..len]);
        macro_rules! pairs {
            ($(($gd:ident, $gl:ty, $cd:ident, $cl:ty)),*) => {
                match (self.gd, self.cd) {
                    $((DType::$gd, DType::$cd) => {
                        decode_pair::<$gl, $cl, ULPS>(self.gb, self.cb, start, g, c)
                    })*
                    (gd, cd) => unreachable!("decode: {gd}/{cd} is not a lane pair (is_lane)"),
                }
            };
        }
        pairs!(
            (F32, F32Lane, F32, F32Lane),
            (F32, F32Lane, BF16, Bf16Lane),
            (F32, F32Lane, F16, F16Lane),
            (BF16, Bf16Lane, F32, F32Lane),
            (BF16, Bf16Lane, BF16, Bf16Lane),
            (BF16, Bf16Lane, F16, F16Lane),
            (F16, F16Lane, F32, F32Lane),
            (F16, F16Lane, BF16, Bf16Lane),
            (F16, F16Lane, F16, F16Lane)
        )
    }

    /// Reads the block of `len` pairs at `start` into the float64 scratch arrays (either
    /// side float64), measuring the units in the last place of the finite pairs.
    pub(super) fn decode_wide(&self, start: usize, len: usize, s: &mut Scratch) -> Decoded {
        let (g, c) = (&mut s.g64[..len], &mut s.c64[..len]);
        self.gt.read_f64_into(start, g);
        self.ct.read_f64_into(start, c);
        let (mut finite, mut ulp, mut top) = (true, 0.0f64, 0.0f64);
        let wide = self.cd == DType::F64;
        for (&x, &y) in g.iter().zip(c.iter()) {
            // Without branches where the candidate is float64, so that the loop
            // vectorises: a non-finite pair's distance and magnitude are discarded.
            let both = x.is_finite() & y.is_finite();
            finite &= both;
            let u = if wide { ulp_distance_f64(x, y) } else { ulp_distance(self.cd, x, y) };
            ulp = if both && u > ulp { u } else { ulp };
            let m = x.abs().max(y.abs());
            top = if both && m > top { m } else { top };
        }
        Decoded { finite, max_ulp: ulp, huge: top >= HUGE }
    }
}

/// A dtype the fast path reads: how an element is decoded, and where values lie on the
/// line on which neighbouring values of the dtype differ by one (units in the last
/// place).
pub(super) trait Lane {
    const DTYPE: DType;
    /// Bytes per element: 4 or 2.
    const SIZE: usize;
    /// A value from its bits, widened (exactly).
    fn widen(bits: u32) -> f32;
    /// The position of a finite `x` rounded to this dtype (to nearest, ties to even).
    fn key_of(x: f32) -> i64;

    /// The element stored little-endian in `e` (`SIZE` bytes), as its bits.
    #[inline(always)]
    fn bits(e: &[u8]) -> u32 {
        // `try_into` on an exact chunk cannot fail; written so, a read is one load.
        if Self::SIZE == 4 {
            u32::from_le_bytes(e.try_into().unwrap_or_default())
        } else {
            u32::from(u16::from_le_bytes(e.try_into().unwrap_or_default()))
        }
    }

    /// The position of the value with these bits.
    #[inline(always)]
    fn key(bits: u32) -> i64 {
        i64::from(if Self::SIZE == 4 { line32(bits) } else { line16(bits) })
    }
}

pub(super) struct F32Lane;
pub(super) struct Bf16Lane;
pub(super) struct F16Lane;

impl Lane for F32Lane {
    const DTYPE: DType = DType::F32;
    const SIZE: usize = 4;
    #[inline(always)]
    fn widen(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
    #[inline(always)]
    fn key_of(x: f32) -> i64 {
        Self::key(x.to_bits())
    }
}

impl Lane for Bf16Lane {
    const DTYPE: DType = DType::BF16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn widen(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }
    #[inline(always)]
    fn key_of(x: f32) -> i64 {
        Self::key(bf16_bits(x))
    }
}

impl Lane for F16Lane {
    const DTYPE: DType = DType::F16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn widen(bits: u32) -> f32 {
        f16_to_f32(bits as u16)
    }
    #[inline(always)]
    fn key_of(x: f32) -> i64 {
        Self::key(f16_bits(x))
    }
}

/// The distance between two line positions of a candidate dtype `C`, as u32: at most
/// 2^32 - 2 (float32), exact in wrapping arithmetic, and 16-bit positions stay in i32.
#[inline(always)]
pub(super) fn ulps<C: Lane>(a: i64, b: i64) -> u32 {
    if C::SIZE == 2 {
        (a as i32 - b as i32).unsigned_abs()
    } else {
        let (hi, lo) = if a > b { (a, b) } else { (b, a) };
        (hi as u32).wrapping_sub(lo as u32)
    }
}

/// What [`decode_pair`] learns of a block on the way.
#[derive(Clone, Copy)]
pub(super) struct Decoded {
    /// Every value of both sides is finite.
    pub(super) finite: bool,
    /// The largest distance in the candidate's units in the last place (when finite;
    /// for float64 pairs, over the finite pairs).
    pub(super) max_ulp: f64,
    /// A finite value of [`HUGE`] or more (float64 pairs only).
    pub(super) huge: bool,
}

/// Decodes pairs `start..start + g.len()` of the little-endian `gb` (golden, dtype `G`)
/// and `cb` (candidate, `C`) into `g` and `c`, measuring the units in the last place
/// on the way when `ULPS`.
#[inline(always)]
pub(super) fn decode_pair<G: Lane, C: Lane, const ULPS: bool>(
    gb: &[u8],
    cb: &[u8],
    start: usize,
    g: &mut [f32],
    c: &mut [f32],
) -> Decoded {
    let n = g.len();
    let gb = &gb[start * G::SIZE..(start + n) * G::SIZE];
    let cb = &cb[start * C::SIZE..(start + n) * C::SIZE];
    let (mut top, mut ulp) = (0u32, 0u32);
    // Where both sides have the same dtype the golden needs no rounding.
    let same = G::DTYPE == C::DTYPE;
    for ((go, co), (ge, ce)) in
        g.iter_mut().zip(c.iter_mut()).zip(gb.chunks_exact(G::SIZE).zip(cb.chunks_exact(C::SIZE)))
    {
        let (xb, yb) = (G::bits(ge), C::bits(ce));
        let (x, y) = (G::widen(xb), C::widen(yb));
        *go = x;
        *co = y;
        top = top.max(x.to_bits() & 0x7FFF_FFFF).max(y.to_bits() & 0x7FFF_FFFF);
        if ULPS {
            let kx = if same { C::key(xb) } else { C::key_of(x) };
            ulp = ulp.max(ulps::<C>(C::key(yb), kx));
        }
    }
    Decoded { finite: top < 0x7F80_0000, max_ulp: f64::from(ulp), huge: false }
}

/// float16 bits to float32, exactly (NaN stays NaN), without branches: the exponent is
/// rebiased, infinities and NaN get the rest of float32's exponent, and subnormals are
/// renormalized by one float32 subtraction.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let o = (h & 0x7FFF) << 13;
    let exp = o & 0x0F80_0000;
    let biased = o + 0x3800_0000; // exponent + (127 - 15)
    let special = biased + 0x3800_0000; // Inf/NaN: all exponent bits set
    let small = (f32::from_bits(biased + 0x0080_0000) - f32::from_bits(0x3880_0000)).to_bits();
    let r = if exp == 0x0F80_0000 {
        special
    } else if exp == 0 {
        small
    } else {
        biased
    };
    f32::from_bits(r | ((h & 0x8000) << 16))
}

/// A finite float32 rounded to nearest-even bfloat16, as bits (as `half::bf16::from_f32`).
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16
}

/// A finite float32 rounded to nearest-even float16, as bits (as `half::f16::from_f32`):
/// subnormal results by one float32 addition that aligns the mantissa, normal ones by
/// integer rounding of the rebiased bits, infinity from 65536 up.
#[inline(always)]
fn f16_bits(x: f32) -> u32 {
    const HALF: u32 = 0x3F00_0000; // 0.5: aligns float16's subnormal mantissa at the bottom
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7FFF_FFFF;
    let sub = (f32::from_bits(a) + f32::from_bits(HALF)).to_bits().wrapping_sub(HALF);
    let norm = a.wrapping_add(0xC800_0FFF).wrapping_add((a >> 13) & 1) >> 13;
    let r = if a >= 0x4780_0000 {
        0x7C00
    } else if a < 0x3880_0000 {
        sub
    } else {
        norm
    };
    r | sign
}

/// Sign-magnitude 16-bit float bits to a line on which neighbouring values differ by
/// one (-0 and +0 both at 0).
#[inline(always)]
fn line16(r: u32) -> i32 {
    let m = (r & 0x7FFF) as i32;
    if r & 0x8000 != 0 {
        -m
    } else {
        m
    }
}

/// The same for float32 bits.
#[inline(always)]
fn line32(b: u32) -> i32 {
    let m = (b & 0x7FFF_FFFF) as i32;
    if b >> 31 != 0 {
        -m
    } else {
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanes::unit;

    /// Float32 bit patterns spread over the whole line: every exponent, both signs,
    /// mantissas at and around the rounding points.
    fn sample_bits() -> impl Iterator<Item = u32> {
        (0..=0xFFFFu32)
            .flat_map(|hi| {
                [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
                    .map(|lo| (hi << 16) | lo)
            })
            .chain((0..2_000_000u64).map(|i| (unit(i).to_bits() >> 20) as u32))
    }

    #[test]
    fn branch_free_conversions_equal_the_half_crate() {
        for bits in sample_bits() {
            let x = f32::from_bits(bits);
            if !x.is_finite() {
                continue;
            }
            assert_eq!(bf16_bits(x), u32::from(half::bf16::from_f32(x).to_bits()), "{bits:#x}");
            assert_eq!(f16_bits(x), u32::from(half::f16::from_f32(x).to_bits()), "{bits:#x}");
        }
        for h in 0..=u16::MAX {
            let (a, b) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{h:#x}");
        }
    }
}
