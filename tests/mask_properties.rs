//! Properties of the attention mask and the softmax over it (`harness/model/src/mask.rs`).

use crate::helpers as common;

use llama_parity::dump::Precision;
use llama_parity::model::attention;
use llama_parity::model::mask::{add_fill_in, additive};
use llama_parity::model::numerics::{dtype_min, Exact, Numerics};
use llama_parity::model::plan::{HeadMapping, MaskRule};
use ndarray::Array4;
use proptest::prelude::*;

/// Rows of `len` slots with `pads[b]` left padding slots.
fn valid_rows(pads: &[usize], len: usize) -> Vec<Vec<bool>> {
    pads.iter().map(|&p| (0..len).map(|s| s >= p).collect()).collect()
}

proptest! {
    #![proptest_config(common::proptest_config())]

    #[test]
    fn prefill_mask_row_sees_exactly_valid_keys_up_to_t(len in 1usize..12, pads in prop::collection::vec(0usize..12, 1..4)) {
        let pads: Vec<usize> = pads.into_iter().map(|p| p.min(len)).collect();
        let valid = valid_rows(&pads, len);
        let m = additive(&valid, 0, len, MaskRule::CausalPadded, -1e30);
        for (b, &p) in pads.iter().enumerate() {
            for t in p..len {
                let seen: Vec<usize> = (0..len).filter(|&s| m[[b, 0, t, s]] == 0.0).collect();
                let want: Vec<usize> = (p..=t).collect();
                prop_assert_eq!(seen, want);
                prop_assert!((0..len).all(|s| m[[b, 0, t, s]] == 0.0 || m[[b, 0, t, s]] == -1e30));
            }
        }
    }

    #[test]
    fn decode_mask_row_sees_every_valid_key(prefill in 1usize..10, steps in 1usize..5, pads in prop::collection::vec(0usize..10, 1..4)) {
        let pads: Vec<usize> = pads.into_iter().map(|p| p.min(prefill)).collect();
        let mut valid = valid_rows(&pads, prefill);
        for j in 0..steps {
            for row in &mut valid {
                row.push(true);
            }
            let m = additive(&valid, prefill + j, 1, MaskRule::CausalPadded, -1e30);
            prop_assert_eq!(m.dim(), (pads.len(), 1, 1, prefill + j + 1));
            for (b, row) in valid.iter().enumerate() {
                for (s, &v) in row.iter().enumerate() {
                    prop_assert_eq!(m[[b, 0, 0, s]] == 0.0, v);
                }
            }
        }
    }

    #[test]
    fn fully_padded_rows_give_no_nan(
        t in 1usize..6, heads in 1usize..4, d in 1usize..5, big in 0.0f64..1e3,
        vals in prop::collection::vec(-1.0f64..1.0, 200), which in 0usize..3,
    ) {
        // Float16 scores stay above -16, as they do in HF runs; below that is mask.fp16_overflow.
        let (p, scale) = [(Precision::F32, big), (Precision::Bf16, big), (Precision::F16, 8.0)][which];
        let n = Exact::new(p);
        let at = |i: usize| vals[i % vals.len()];
        let q = Array4::from_shape_fn((1, heads, t, d), |(_, h, i, j)| scale * at(h * 31 + i * 7 + j));
        let k = Array4::from_shape_fn((1, heads, t, d), |(_, h, i, j)| at(h * 17 + i * 5 + j + 3));
        let v = Array4::from_shape_fn((1, heads, t, d), |(_, h, i, j)| at(h * 13 + i * 3 + j + 11));
        let m = additive(&[vec![false; t]], 0, t, MaskRule::CausalPadded, n.mask_fill());
        let (probs, ctx) = attention::eager(&q, k.view(), v.view(), &m, 1.0 / (d as f64).sqrt(), HeadMapping::Grouped, &n);
        prop_assert!(probs.iter().chain(ctx.iter()).all(|x| x.is_finite()));
        // HF's uniform softmax over all keys.
        prop_assert!(probs.iter().all(|&x| (x - 1.0 / t as f64).abs() < 1e-15));
    }

    #[test]
    fn float16_dtype_min_fill_overflows_to_neg_inf(overflowing in -1e4f64..=-16.0, safe in -15.99f64..1e3) {
        let fill = dtype_min(Precision::F16);
        prop_assert_eq!(add_fill_in(Precision::F16, overflowing, fill), f64::NEG_INFINITY);
        prop_assert!(add_fill_in(Precision::F16, safe.max(-15.0), fill).is_finite());
        // Float32 and bfloat16 minima never overflow for scores of any realistic size.
        for p in [Precision::F32, Precision::Bf16] {
            prop_assert!(add_fill_in(p, overflowing, dtype_min(p)).is_finite());
        }
    }
}
