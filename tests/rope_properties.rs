//! Properties of RoPE: frequencies, tables and the rotation (`harness/model/src/rope.rs`).

use crate::helpers as common;

use llama_parity::contract::site::Site;
use llama_parity::dump::Precision;
use llama_parity::model::llama::Session;
use llama_parity::model::numerics::Exact;
use llama_parity::model::plan::{AnglePrecision, Plan, RopeFrequencies, RopeLayout};
use llama_parity::model::rope::{apply, Rope, RopeConfig, RopeType};
use ndarray::{Array2, Array4};
use proptest::prelude::*;

fn rope_types() -> impl Strategy<Value = RopeType> {
    prop_oneof![
        Just(RopeType::Default),
        (1.0f64..8.0).prop_map(|factor| RopeType::Linear { factor }),
        (1.0f64..8.0).prop_map(|factor| RopeType::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0
        }),
    ]
}

fn rope(kind: RopeType, theta: f64, dim: usize) -> Rope {
    Rope::new(
        RopeConfig { theta, dim, max_position_embeddings: 4096, kind },
        RopeFrequencies::Configured,
        AnglePrecision::Numerics,
    )
}

fn vec4(v: &[f64], heads: usize, d: usize) -> Array4<f64> {
    Array4::from_shape_vec((1, heads, 1, d), v[..heads * d].to_vec()).expect("len")
}

proptest! {
    #![proptest_config(common::proptest_config())]

    #[test]
    fn rope_at_position_zero_is_identity(kind in rope_types(), half in 1usize..9, x in prop::collection::vec(-10.0f64..10.0, 32)) {
        let d = 2 * half;
        let n = Exact::new(Precision::F32);
        let mut r = rope(kind, 10000.0, d);
        let (cos, sin) = r.tables(&Array2::zeros((1, 1)), &n);
        let xs = vec4(&x, 2, d);
        for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
            prop_assert_eq!(&apply(&xs, cos.view(), sin.view(), layout, &n), &xs);
        }
    }

    #[test]
    fn rope_preserves_pair_norms(kind in rope_types(), half in 1usize..9, pos in 0i64..4096, x in prop::collection::vec(-10.0f64..10.0, 16)) {
        let d = 2 * half;
        let n = Exact::new(Precision::F32);
        let mut r = rope(kind, 500000.0, d);
        let (cos, sin) = r.tables(&Array2::from_elem((1, 1), pos), &n);
        let xs = vec4(&x, 1, d);
        let y = apply(&xs, cos.view(), sin.view(), RopeLayout::HalfSplit, &n);
        for k in 0..half {
            let a = xs[[0, 0, 0, k]].hypot(xs[[0, 0, 0, k + half]]);
            let b = y[[0, 0, 0, k]].hypot(y[[0, 0, 0, k + half]]);
            prop_assert!((a - b).abs() <= 1e-12 * (1.0 + a), "pair {k}: {a} vs {b}");
        }
    }

    #[test]
    fn rope_dot_product_depends_only_on_relative_position(
        kind in rope_types(), half in 1usize..9, m in 0i64..2048, nn in 0i64..2048, shift in 0i64..2048,
        q in prop::collection::vec(-1.0f64..1.0, 16), k in prop::collection::vec(-1.0f64..1.0, 16),
    ) {
        let d = 2 * half;
        let n = Exact::new(Precision::F32);
        let mut r = rope(kind, 10000.0, d);
        let dot_at = |r: &mut Rope, pm: i64, pn: i64| {
            let (c, s) = r.tables(&Array2::from_shape_vec((1, 2), vec![pm, pn]).expect("2"), &n);
            let both = Array4::from_shape_fn((1, 1, 2, d), |(_, _, t, j)| if t == 0 { q[j] } else { k[j] });
            let y = apply(&both, c.view(), s.view(), RopeLayout::HalfSplit, &n);
            (0..d).map(|j| y[[0, 0, 0, j]] * y[[0, 0, 1, j]]).sum::<f64>()
        };
        let a = dot_at(&mut r, m, nn);
        let b = dot_at(&mut r, m + shift, nn + shift);
        // Angles of size p·inv_freq lose about p·eps each in float64.
        let tol = 1e-14 * (4.0 + (m.max(nn) + shift) as f64) * d as f64;
        prop_assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
    }

    #[test]
    fn interleaved_layout_equals_half_split_after_permutation(half in 1usize..9, pos in 0i64..512, x in prop::collection::vec(-10.0f64..10.0, 16)) {
        let d = 2 * half;
        let n = Exact::new(Precision::F32);
        let mut r = rope(RopeType::Default, 10000.0, d);
        let (cos, sin) = r.tables(&Array2::from_elem((1, 1), pos), &n);
        let xs = vec4(&x, 1, d);
        // P: interleaved index 2k -> k, 2k+1 -> k + D/2.
        let to_half = |v: &Array4<f64>| Array4::from_shape_fn((1, 1, 1, d), |(_, _, _, j)| {
            if j < half { v[[0, 0, 0, 2 * j]] } else { v[[0, 0, 0, 2 * (j - half) + 1]] }
        });
        let inter = apply(&xs, cos.view(), sin.view(), RopeLayout::Interleaved, &n);
        let split = apply(&to_half(&xs), cos.view(), sin.view(), RopeLayout::HalfSplit, &n);
        prop_assert_eq!(to_half(&inter), split);
    }

    #[test]
    fn rope_with_offset_equals_rope_of_shifted_positions(pad in 0usize..4, first in 1usize..6, second in 1usize..5, seed in any::<u64>()) {
        let spec = common::Spec { layers: 1, ..common::Spec::default() };
        let model = spec.model(seed);
        let n = common::exact();
        let plan = Plan::default();
        let len = pad + first;
        let mut s = Session::new(&model, 1, len + second + 1, &n, &plan);
        s.prefill(&common::tokens(1, len, spec.vocab, seed), &common::left_padded(&[pad], len), None).expect("prefill");
        let chunk = s.prefill(&common::tokens(1, second, spec.vocab, seed ^ 1), &[vec![1; second]], None).expect("chunk");
        let dec = s.decode(&[3], None).expect("decode");
        let offset = first as i64;
        let shifted = Array2::from_shape_fn((1, second), |(_, t)| offset + t as i64);
        let mut r = Rope::new(model.rope.clone(), RopeFrequencies::Configured, AnglePrecision::Numerics);
        let (cos, sin) = r.tables(&shifted, &n);
        prop_assert_eq!(chunk.get(&Site::PositionIds).expect("pos"), &shifted.mapv(|p| p as f64).into_dyn());
        prop_assert_eq!(chunk.get(&Site::RotaryCos).expect("cos"), &cos.into_dyn());
        prop_assert_eq!(chunk.get(&Site::RotarySin).expect("sin"), &sin.into_dyn());
        prop_assert_eq!(dec.get(&Site::PositionIds).expect("pos")[[0, 0]], (first + second) as f64);
    }
}

/// The yarn attention factor scales the tables (the README's 1.1386 for factor 4).
#[test]
fn yarn_attention_factor_scales_cos_and_sin() {
    let kind = RopeType::Yarn {
        factor: 4.0,
        attention_factor: None,
        mscale: None,
        mscale_all_dim: None,
        beta_fast: 32.0,
        beta_slow: 1.0,
        original_max_position_embeddings: 32.0,
        truncate: true,
    };
    let n = Exact::new(Precision::F32);
    let mut r = rope(kind, 10000.0, 16);
    let (cos, _) = r.tables(&Array2::zeros((1, 1)), &n);
    assert!((cos[[0, 0, 0]] - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
    assert!((cos[[0, 0, 0]] - 1.1386).abs() < 1e-4);
}
