//! Element types a dump may hold (CONTRACT §1: F64, F32, F16, BF16, I64, I32, U8, BOOL)
//! and the compute precision of a run (`float32`, `bfloat16`, `float16`).

use std::fmt;

/// The element type of a stored tensor. Bytes are always little-endian.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
    #[serde(rename = "BOOL")]
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// The name safetensors uses (`"F32"`, `"BOOL"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Parses a safetensors dtype name; `None` for a dtype the contract does not accept.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        Some(match name {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// Machine epsilon of a float type (distance from 1.0 to the next value); 0 for integers.
    pub fn eps(self) -> f64 {
        match self {
            DType::F64 => f64::EPSILON,
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 9.765625e-4,
            DType::BF16 => 7.8125e-3,
            _ => 0.0,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// The compute precision of a run, as `manifest.json`'s `dtype` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// All precisions, widest first.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

    /// The manifest spelling: `float32`, `bfloat16`, `float16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::Bf16 => "bfloat16",
            Precision::F16 => "float16",
        }
    }

    /// Parses the manifest spelling (also accepts `fp32`, `bf16`, `fp16`).
    pub fn parse(s: &str) -> Option<Precision> {
        Some(match s {
            "float32" | "fp32" | "f32" => Precision::F32,
            "bfloat16" | "bf16" => Precision::Bf16,
            "float16" | "fp16" | "f16" | "half" => Precision::F16,
            _ => return None,
        })
    }

    /// The unit roundoff of this precision: half the distance from 1 to the next
    /// representable number (2⁻²⁴, 2⁻⁸, 2⁻¹¹).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Precision::F32 => 2f64.powi(-24),
            Precision::Bf16 => 2f64.powi(-8),
            Precision::F16 => 2f64.powi(-11),
        }
    }

    /// The storage dtype of this precision.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Relative resolution: the spacing of values near 1.
    pub fn eps(self) -> f64 {
        self.dtype().eps()
    }

    /// The coarser of two precisions (bfloat16 is coarser than float16, which is
    /// coarser than float32).
    pub fn coarser(self, other: Precision) -> Precision {
        if other.eps() > self.eps() {
            other
        } else {
            self
        }
    }

    /// Rounds `x` to this precision and widens it back, as the `half` crate's
    /// conversions from `f64` do: bfloat16 rounds to nearest even from the top 20
    /// mantissa bits (the lower 32 cannot matter but for a tie), float16 goes through
    /// float32 (round to nearest even at each step, as x86's F16C path does). Values in
    /// the normal range take a branch-light path of integer operations; zeros,
    /// subnormals, overflow and non-finite values go through `half` itself.
    #[inline]
    pub fn round(self, x: f64) -> f64 {
        match self {
            Precision::F32 => x as f32 as f64,
            Precision::Bf16 => round_bf16(x),
            Precision::F16 => round_f16(x),
        }
    }
}

impl Precision {
    /// [`Precision::round`] of every value of `xs`, in place. The normal range (and
    /// zeros) is rounded by a loop without calls or branches that the compiler can
    /// vectorise; a slice holding anything else is then passed through the scalar path,
    /// which leaves the values already rounded as they are.
    pub fn round_slice(self, xs: &mut [f64]) {
        let fits = match self {
            Precision::F32 => {
                xs.iter_mut().for_each(|x| *x = *x as f32 as f64);
                return;
            }
            Precision::Bf16 => xs.iter_mut().fold(true, |all, x| {
                let bits = x.to_bits();
                let exp = (bits >> 52) & 0x7ff;
                let hi = (bits >> 32) as u32;
                let r = (hi + 0x0fff + ((hi >> 13) & 1)) & !0x1fff;
                let normal = exp.wrapping_sub(1023 - 126) <= 253 && (r >> 20) & 0x7ff <= 1023 + 127;
                let fits = normal || bits << 1 == 0;
                *x = if fits { f64::from_bits(u64::from(r) << 32) } else { *x };
                all & fits
            }),
            Precision::F16 => xs.iter_mut().fold(true, |all, x| {
                let y = *x as f32;
                let bits = y.to_bits();
                let exp = (bits >> 23) & 0xff;
                let r = (bits + 0x0fff + ((bits >> 13) & 1)) & !0x1fff;
                let normal = exp.wrapping_sub(127 - 14) <= 29 && (r >> 23) & 0xff <= 127 + 15;
                let fits = normal || bits << 1 == 0;
                *x = if fits { f64::from(f32::from_bits(r)) } else { *x };
                all & fits
            }),
        };
        if !fits {
            xs.iter_mut().for_each(|x| *x = self.round(*x));
        }
    }
}

/// `half::bf16::from_f64(x).to_f64()`, with a fast path for normal bfloat16 values.
#[inline]
fn round_bf16(x: f64) -> f64 {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1023;
    if (-126..=127).contains(&exp) {
        // Sign, exponent and the top 20 mantissa bits; keep 7 of them, rounding to even.
        let hi = (bits >> 32) as u32;
        let r = (hi + 0x0fff + ((hi >> 13) & 1)) & !0x1fff;
        if ((r >> 20) & 0x7ff) as i32 - 1023 <= 127 {
            return f64::from_bits(u64::from(r) << 32);
        }
    }
    half::bf16::from_f64(x).to_f64()
}

/// `half::f16::from_f64(x).to_f64()` as on F16C hardware (through float32), with a
/// fast path for normal float16 values.
#[inline]
fn round_f16(x: f64) -> f64 {
    let y = x as f32;
    let bits = y.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127;
    if (-14..=15).contains(&exp) {
        // Keep 10 of float32's 23 mantissa bits, rounding to even.
        let r = (bits + 0x0fff + ((bits >> 13) & 1)) & !0x1fff;
        if ((r >> 23) & 0xff) as i32 - 127 <= 15 {
            return f64::from(f32::from_bits(r));
        }
    }
    half::f16::from_f32(y).to_f64()
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_rounding_equals_the_half_crates_conversions_bit_for_bit() {
        // Ties, carries into the exponent, the edges of the normal range, overflow,
        // subnormals, zeros and non-finite values, then a fixed-seed sweep of bit patterns.
        let mut xs = vec![
            0.0,
            -0.0,
            1.0 + 2f64.powi(-8),
            1.0 + 3.0 * 2f64.powi(-8),
            1.0 + 2f64.powi(-8) + 2f64.powi(-40),
            1.0 + 2f64.powi(-11),
            1.0 + 2f64.powi(-11) + 2f64.powi(-30),
            2.0 - 2f64.powi(-9),
            65504.0,
            65520.0,
            65519.99,
            f32::MAX as f64,
            3.3961e38,
            2f64.powi(-126),
            2f64.powi(-127),
            2f64.powi(-14),
            2f64.powi(-15),
            6.1e-5,
            1e-300,
            1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        let mut s: u64 = 0x5eed;
        for _ in 0..200_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Exponents around both formats' ranges, any mantissa and sign.
            let exp = 1023 - 140 + (s >> 40) % 290;
            xs.push(f64::from_bits((s & 0x800f_ffff_ffff_ffff) | (exp << 52)));
        }
        let xs: Vec<f64> = xs.iter().flat_map(|&x| [x, -x]).collect();
        for x in &xs {
            let b = half::bf16::from_f64(*x).to_f64();
            let f = half::f16::from_f32(*x as f32).to_f64();
            assert!(Precision::Bf16.round(*x).to_bits() == b.to_bits() || b.is_nan(), "bf16 {x:e}");
            assert!(Precision::F16.round(*x).to_bits() == f.to_bits() || f.is_nan(), "f16 {x:e}");
        }
        // The slice path, on the whole sweep and on a slice of normal values only.
        for p in [Precision::Bf16, Precision::F16, Precision::F32] {
            let normal: Vec<f64> = xs.iter().map(|x| 1.0 + x.abs().fract()).collect();
            for v in [&xs, &normal] {
                let mut r = v.clone();
                p.round_slice(&mut r);
                for (x, r) in v.iter().zip(&r) {
                    let want = p.round(*x);
                    assert!(r.to_bits() == want.to_bits() || want.is_nan(), "{p} slice {x:e}");
                }
            }
        }
    }

    #[test]
    fn safetensors_names_round_trip() {
        for d in [
            DType::F64,
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::I32,
            DType::U8,
            DType::Bool,
        ] {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        assert_eq!(DType::from_safetensors_name("F8_E4M3"), None);
    }

    #[test]
    fn rounding_matches_the_formats() {
        assert_eq!(Precision::F16.round(65520.0), f64::INFINITY);
        assert_eq!(Precision::F16.round(1.0 + 2f64.powi(-11)), 1.0);
        assert_eq!(Precision::Bf16.round(1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(Precision::Bf16.round(1.0 + 3.0 * 2f64.powi(-8)), 1.0 + 2f64.powi(-6));
        assert_eq!(Precision::F32.round(0.1), 0.1f32 as f64);
    }

    #[test]
    fn coarser_picks_the_lower_resolution() {
        assert_eq!(Precision::F32.coarser(Precision::Bf16), Precision::Bf16);
        assert_eq!(Precision::F16.coarser(Precision::Bf16), Precision::Bf16);
        assert_eq!(Precision::F16.coarser(Precision::F32), Precision::F16);
        assert_eq!(Precision::F32.coarser(Precision::F32), Precision::F32);
    }
}
