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

    /// Rounds `x` to this precision (round to nearest even) and widens it back.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Precision::F32 => x as f32 as f64,
            Precision::Bf16 => half::bf16::from_f64(x).to_f64(),
            Precision::F16 => half::f16::from_f64(x).to_f64(),
        }
    }
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
