//! The attention mask: causal plus left padding, as an additive float mask.
//!
//! Query `t` of a step sits in cache slot `past + t`; it sees key slot `s` iff
//! `s <= past + t` (causal) and slot `s` holds a real token (padding hidden). A visible
//! entry is `0`, a hidden one the fill `torch.finfo(dtype).min`, as HF's eager path
//! builds it (`masking_utils.create_causal_mask` → `eager_mask`: `torch.where(mask, 0,
//! min_dtype)`), shape `[batch, 1, T, S]`.
//!
//! A padding query's row is fully hidden: every score plus the fill rounds to the fill,
//! so its softmax is uniform over all `S` keys (HF's behaviour; such rows are left out
//! of the metrics, but their keys and values reach the cache). In float16 a fill of
//! `-65504` plus a score at or below `-16` overflows to `-inf`
//! ([`add_fill_in`]); this is the `mask.fp16_overflow` hazard.
//!
//! The visibility rule is a fault seam ([`MaskRule`]).

use ndarray::Array4;

use dump::Precision;

use super::plan::MaskRule;

/// Whether query slot `q` sees key slot `k` under `rule`, given key validity.
pub fn visible(rule: MaskRule, q: usize, k: usize, key_valid: bool) -> bool {
    match rule {
        MaskRule::CausalPadded => k <= q && key_valid,
        MaskRule::NoCausal => key_valid,
        MaskRule::Inverted => k >= q && key_valid,
        MaskRule::PaddingIgnored => k <= q,
    }
}

/// The additive mask `[batch, 1, T, S]` for a step whose `T` queries occupy cache slots
/// `past..past + T`, with `key_valid` `[batch][S]` (true for a real token).
pub fn additive(
    key_valid: &[Vec<bool>],
    past: usize,
    t: usize,
    rule: MaskRule,
    fill: f64,
) -> Array4<f64> {
    let b = key_valid.len();
    let s = key_valid.first().map_or(0, Vec::len);
    let mut m = Array4::zeros((b, 1, t, s));
    for (bi, row) in key_valid.iter().enumerate() {
        for ti in 0..t {
            for (k, &valid) in row.iter().enumerate() {
                if !visible(rule, past + ti, k, valid) {
                    m[[bi, 0, ti, k]] = fill;
                }
            }
        }
    }
    m
}

/// `score + fill` as stored in `precision` (round to nearest even): in float16 the sum
/// overflows to `-inf` once `score <= -16`.
pub fn add_fill_in(precision: Precision, score: f64, fill: f64) -> f64 {
    precision.round(precision.round(score) + precision.round(fill))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padded_prefill_by_hand() {
        let m = additive(&[vec![false, true, true]], 0, 3, MaskRule::CausalPadded, -1.0);
        let rows: Vec<Vec<f64>> =
            (0..3).map(|t| (0..3).map(|k| m[[0, 0, t, k]]).collect()).collect();
        assert_eq!(rows, vec![vec![-1.0, -1.0, -1.0], vec![-1.0, 0.0, -1.0], vec![-1.0, 0.0, 0.0]]);
    }
}
