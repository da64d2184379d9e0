//! Properties of attention, the KV cache and the composed model
//! (`harness/model/src/{attention,kv_cache,llama}.rs`), on tiny random models.

use crate::helpers as common;

use llama_parity::contract::site::{LayerPart, Site};
use llama_parity::dump::Precision;
use llama_parity::model::attention::{self, kv_head};
use llama_parity::model::kv_cache::KvCache;
use llama_parity::model::mask::additive;
use llama_parity::model::numerics::Exact;
use llama_parity::model::plan::{CacheWrite, HeadMapping, MaskRule};
use ndarray::{concatenate, s, Array4, Axis};
use proptest::prelude::*;

fn filled(shape: (usize, usize, usize, usize), vals: &[f64], salt: usize) -> Array4<f64> {
    Array4::from_shape_fn(shape, |(a, b, c, d)| {
        vals[(a * 1009 + b * 101 + c * 13 + d + salt) % vals.len()]
    })
}

proptest! {
    #![proptest_config(common::proptest_config())]

    #[test]
    fn gqa_head_mapping_for_n_rep_1_2_4_8(
        rep_i in 0usize..4, kv in 1usize..4, t in 1usize..4, d in 1usize..5,
        vals in prop::collection::vec(-2.0f64..2.0, 97),
    ) {
        let n_rep = [1, 2, 4, 8][rep_i];
        let heads = kv * n_rep;
        for h in 0..heads {
            prop_assert_eq!(kv_head(h, heads, kv, HeadMapping::Grouped), h / n_rep);
        }
        let n = Exact::new(Precision::F32);
        let q = filled((1, heads, t, d), &vals, 0);
        let k = filled((1, kv, t, d), &vals, 5);
        let v = filled((1, kv, t, d), &vals, 9);
        // HF repeat_kv: kv head j expanded to heads j*n_rep .. (j+1)*n_rep.
        let rep = |x: &Array4<f64>| Array4::from_shape_fn((1, heads, t, d), |(b, h, i, j)| x[[b, h / n_rep, i, j]]);
        let m = additive(&[vec![true; t]], 0, t, MaskRule::CausalPadded, -1e30);
        let (p1, c1) = attention::eager(&q, k.view(), v.view(), &m, 0.5, HeadMapping::Grouped, &n);
        let (p2, c2) = attention::eager(&q, rep(&k).view(), rep(&v).view(), &m, 0.5, HeadMapping::Grouped, &n);
        prop_assert_eq!(p1, p2);
        prop_assert_eq!(c1, c2);
    }

    #[test]
    fn in_place_cache_writes_equal_concatenation(
        chunks in prop::collection::vec(1usize..4, 1..6), b in 1usize..3, kv in 1usize..3, d in 1usize..4,
        vals in prop::collection::vec(-2.0f64..2.0, 61),
    ) {
        let total: usize = chunks.iter().sum();
        let mut cache = KvCache::new(b, kv, total + 2, d);
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (i, &t) in chunks.iter().enumerate() {
            let k = filled((b, kv, t, d), &vals, i * 3);
            let v = filled((b, kv, t, d), &vals, i * 3 + 1);
            cache.append(&k, &v, CacheWrite::NextSlot);
            ks.push(k);
            vs.push(v);
            let kc = concatenate(Axis(2), &ks.iter().map(|a| a.view()).collect::<Vec<_>>()).expect("cat");
            let vc = concatenate(Axis(2), &vs.iter().map(|a| a.view()).collect::<Vec<_>>()).expect("cat");
            prop_assert_eq!(cache.keys(), kc.view());
            prop_assert_eq!(cache.values(), vc.view());
        }
    }

    #[test]
    fn prefill_then_decode_equals_one_forward(
        total in 2usize..9, split_frac in 0.0f64..1.0, pads in prop::collection::vec(0usize..3, 1..3), seed in any::<u64>(),
    ) {
        let spec = common::Spec::default();
        let model = spec.model(seed);
        let l = 1 + ((total - 1) as f64 * split_frac) as usize % (total - 1).max(1);
        let (l, steps) = (l.min(total - 1), total - l.min(total - 1));
        let pads: Vec<usize> = pads.into_iter().map(|p| p.min(l - 1)).collect();
        let ids = common::tokens(pads.len(), total, spec.vocab, seed);
        let full_mask = common::left_padded(&pads, total);
        let full = common::run_steps(&model, &ids, &full_mask, &[]);
        let prefix: Vec<Vec<i64>> = ids.iter().map(|r| r[..l].to_vec()).collect();
        let rest: Vec<Vec<i64>> = ids.iter().map(|r| r[l..].to_vec()).collect();
        let split = common::run_steps(&model, &prefix, &common::left_padded(&pads, l), &rest);
        prop_assert_eq!(split.len(), steps + 1);
        let logits = full[0].logits().expect("logits");
        for (j, step) in split.iter().enumerate().skip(1) {
            let t = l + j - 1;
            let got = step.logits().expect("logits");
            let want = logits.slice(s![.., t..t + 1, ..]).to_owned().into_dyn();
            prop_assert!(common::max_abs_diff(got, &want) < 1e-10, "step {j}: {}", common::max_abs_diff(got, &want));
        }
        // Keys of real tokens agree. Padding slots do not, beyond layer 0, and should not:
        // a padding query's fully masked row is uniform over every key present, and the
        // full forward holds more keys than the prefill did (HF behaves the same way).
        let last = split.last().expect("a step");
        for i in 0..spec.layers {
            let site = Site::Layer(i, LayerPart::KCache);
            let (a, b) = (last.get(&site).expect("k"), full[0].get(&site).expect("k"));
            for (row, &p) in pads.iter().enumerate() {
                let a = a.slice(s![row, .., p.., ..]).to_owned().into_dyn();
                let b = b.slice(s![row, .., p.., ..]).to_owned().into_dyn();
                prop_assert!(common::max_abs_diff(&a, &b) < 1e-10, "layer {i} row {row}");
            }
        }
    }

    #[test]
    fn each_batch_row_equals_its_own_single_row_run(pads in prop::collection::vec(0usize..5, 2..4), steps in 0usize..3, seed in any::<u64>()) {
        let spec = common::Spec::default();
        let model = spec.model(seed);
        let len = 6;
        let ids = common::tokens(pads.len(), len, spec.vocab, seed);
        let dec = common::tokens(pads.len(), steps, spec.vocab, seed ^ 7);
        let batch = common::run_steps(&model, &ids, &common::left_padded(&pads, len), &dec);
        for (b, &p) in pads.iter().enumerate() {
            let one = common::run_steps(&model, &ids[b..b + 1], &common::left_padded(&[p], len), &dec[b..b + 1]);
            for (sb, so) in batch.iter().zip(&one) {
                for (site, a) in &so.sites {
                    let row = sb.get(site).expect("site").slice_axis(Axis(0), (b..b + 1).into()).to_owned();
                    prop_assert!(common::max_abs_diff(&row, a) < 1e-12, "row {b} site {site}: {}", common::max_abs_diff(&row, a));
                }
            }
        }
    }
}
