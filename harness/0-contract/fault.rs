//! The known porting faults of CONTRACT §3, with their stable IDs.

use std::fmt;

/// A known porting fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    RopePosReset,
    RopePosFixed,
    RopePosOffByOne,
    RopeInterleaved,
    RopeCosSinSwapped,
    RopeWrongTheta,
    RopeLowPrecisionAngles,
    MaskNone,
    MaskInverted,
    MaskPaddingIgnored,
    MaskPadTokenMasked,
    MaskFp16Overflow,
    NormLayernorm,
    NormBias,
    NormEpsOutside,
    NormNoUpcast,
    NormWeightUnmapped,
    WeightsTransposed,
    WeightsGateUpSwapped,
    KvStale,
    KvWrongSlot,
    KvUnrotatedKeys,
    KvGqaTiled,
    AttnNoScale,
    AttnSoftmaxLowPrecision,
}

impl Fault {
    /// Every fault, in the contract's order.
    pub const ALL: [Fault; 25] = [
        Fault::RopePosReset,
        Fault::RopePosFixed,
        Fault::RopePosOffByOne,
        Fault::RopeInterleaved,
        Fault::RopeCosSinSwapped,
        Fault::RopeWrongTheta,
        Fault::RopeLowPrecisionAngles,
        Fault::MaskNone,
        Fault::MaskInverted,
        Fault::MaskPaddingIgnored,
        Fault::MaskPadTokenMasked,
        Fault::MaskFp16Overflow,
        Fault::NormLayernorm,
        Fault::NormBias,
        Fault::NormEpsOutside,
        Fault::NormNoUpcast,
        Fault::NormWeightUnmapped,
        Fault::WeightsTransposed,
        Fault::WeightsGateUpSwapped,
        Fault::KvStale,
        Fault::KvWrongSlot,
        Fault::KvUnrotatedKeys,
        Fault::KvGqaTiled,
        Fault::AttnNoScale,
        Fault::AttnSoftmaxLowPrecision,
    ];

    /// The stable ID, e.g. `rope.pos_reset`.
    pub fn id(self) -> &'static str {
        match self {
            Fault::RopePosReset => "rope.pos_reset",
            Fault::RopePosFixed => "rope.pos_fixed",
            Fault::RopePosOffByOne => "rope.pos_off_by_one",
            Fault::RopeInterleaved => "rope.interleaved",
            Fault::RopeCosSinSwapped => "rope.cos_sin_swapped",
            Fault::RopeWrongTheta => "rope.wrong_theta",
            Fault::RopeLowPrecisionAngles => "rope.low_precision_angles",
            Fault::MaskNone => "mask.none",
            Fault::MaskInverted => "mask.inverted",
            Fault::MaskPaddingIgnored => "mask.padding_ignored",
            Fault::MaskPadTokenMasked => "mask.pad_token_masked",
            Fault::MaskFp16Overflow => "mask.fp16_overflow",
            Fault::NormLayernorm => "norm.layernorm",
            Fault::NormBias => "norm.bias",
            Fault::NormEpsOutside => "norm.eps_outside",
            Fault::NormNoUpcast => "norm.no_upcast",
            Fault::NormWeightUnmapped => "norm.weight_unmapped",
            Fault::WeightsTransposed => "weights.transposed",
            Fault::WeightsGateUpSwapped => "weights.gate_up_swapped",
            Fault::KvStale => "kv.stale",
            Fault::KvWrongSlot => "kv.wrong_slot",
            Fault::KvUnrotatedKeys => "kv.unrotated_keys",
            Fault::KvGqaTiled => "kv.gqa_tiled",
            Fault::AttnNoScale => "attn.no_scale",
            Fault::AttnSoftmaxLowPrecision => "attn.softmax_low_precision",
        }
    }

    /// One line saying what the fault is.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::RopePosReset => {
                "decode positions restart from 0 instead of continuing from the context length"
            }
            Fault::RopePosFixed => "every decode step uses the same position (row 0 of the table)",
            Fault::RopePosOffByOne => "decode positions are one too far",
            Fault::RopeInterleaved => {
                "pairs (2k, 2k+1) rotated instead of HF's rotate_half pairs (k, k+D/2)"
            }
            Fault::RopeCosSinSwapped => "cos and sin tables swapped",
            Fault::RopeWrongTheta => "base theta or rope scaling ignored",
            Fault::RopeLowPrecisionAngles => "position x inv_freq computed in float16",
            Fault::MaskNone => "no causal mask in prefill",
            Fault::MaskInverted => "the future visible and the past hidden",
            Fault::MaskPaddingIgnored => "causal mask only; padding keys stay visible",
            Fault::MaskPadTokenMasked => "real tokens equal to the pad id masked as padding",
            Fault::MaskFp16Overflow => "an additive fill that overflows to -inf in float16",
            Fault::NormLayernorm => "mean subtracted (LayerNorm) where RMSNorm is required",
            Fault::NormBias => "a LayerNorm beta left in and non-zero",
            Fault::NormEpsOutside => {
                "x / (sqrt(mean(x^2)) + eps) instead of x * rsqrt(mean(x^2) + eps)"
            }
            Fault::NormNoUpcast => "variance computed in float16/bfloat16 instead of float32",
            Fault::NormWeightUnmapped => "a norm weight never loaded (left at ones)",
            Fault::WeightsTransposed => "a square projection weight loaded without its transpose",
            Fault::WeightsGateUpSwapped => "w1/w3 (gate/up) swapped in the key mapping",
            Fault::KvStale => "the decode step's k/v never written to the cache",
            Fault::KvWrongSlot => "the decode write lands one slot off",
            Fault::KvUnrotatedKeys => "keys cached before RoPE",
            Fault::KvGqaTiled => "GQA heads repeated by tiling (h % nKV) instead of h // (nH/nKV)",
            Fault::AttnNoScale => "scores not scaled by 1/sqrt(D)",
            Fault::AttnSoftmaxLowPrecision => "softmax computed in float16/bfloat16",
        }
    }

    /// Parses a stable ID.
    pub fn parse(id: &str) -> Option<Fault> {
        Fault::ALL.iter().copied().find(|f| f.id() == id)
    }

    /// Parses an ID spelled with `_` for its `.`, as candidate directory names spell it
    /// (`rope_pos_reset` for `rope.pos_reset`).
    pub fn parse_underscored(s: &str) -> Option<Fault> {
        let (family, rest) = s.split_once('_')?;
        Fault::parse(&format!("{family}.{rest}"))
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_parse_back() {
        let mut ids: Vec<_> = Fault::ALL.iter().map(|f| f.id()).collect();
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.id()), Some(f));
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Fault::ALL.len());
        assert_eq!(Fault::parse("rope.nope"), None);
        assert_eq!(
            Fault::parse_underscored("weights_gate_up_swapped"),
            Some(Fault::WeightsGateUpSwapped)
        );
        assert_eq!(Fault::parse_underscored("rope"), None);
    }
}
