//! The reference on random models of shapes the golden suite lacks: its own consistency
//! (batch rows, prefill + decode, cache contents), and `model::run` end to end through a
//! dump directory, with the errors a bad weights file gives.

use crate::helpers as common;

use std::collections::BTreeMap;
use std::path::Path;

use common::Spec;
use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, Verdict};
use llama_parity::contract::site::{LayerPart, Site};
use llama_parity::dump::{safetensors, DType, Dump, Tensor};
use llama_parity::model::weights::Weights;
use llama_parity::model::{self, Implementation, RunOptions};
use llama_parity::Error;
use ndarray::{s, Axis};
use serde_json::json;

/// Shapes outside the golden suite.
fn specs() -> Vec<(&'static str, Spec)> {
    vec![
        (
            "mha_3_layers_bias",
            Spec { layers: 3, heads: 2, kv_heads: 2, bias: true, ..Spec::default() },
        ),
        (
            "gqa_8_2_head_dim_6",
            Spec { hidden: 20, heads: 8, kv_heads: 2, head_dim: Some(6), ..Spec::default() },
        ),
        (
            "mqa_tied_4_layers",
            Spec { layers: 4, heads: 4, kv_heads: 1, tied: true, ..Spec::default() },
        ),
        (
            "gqa_6_3_llama3",
            Spec {
                hidden: 24,
                heads: 6,
                kv_heads: 3,
                rope: json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
                ..Spec::default()
            },
        ),
        (
            "dynamic_rope",
            Spec {
                rope: json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                ..Spec::default()
            },
        ),
    ]
}

const PADS: [usize; 3] = [0, 2, 4];
const LEN: usize = 7;
const STEPS: usize = 3;

#[test]
fn batch_rows_equal_single_row_runs_and_prefill_plus_decode_equals_one_forward() {
    for (name, spec) in specs() {
        let model = spec.model(42);
        let ids = common::tokens(3, LEN + STEPS, spec.vocab, 7);
        let prefix: Vec<Vec<i64>> = ids.iter().map(|r| r[..LEN].to_vec()).collect();
        let dec: Vec<Vec<i64>> = ids.iter().map(|r| r[LEN..].to_vec()).collect();
        let steps = common::run_steps(&model, &prefix, &common::left_padded(&PADS, LEN), &dec);
        let full = common::run_steps(&model, &ids, &common::left_padded(&PADS, LEN + STEPS), &[]);
        for (j, st) in steps.iter().enumerate().skip(1) {
            let t = LEN + j - 1;
            let want =
                full[0].logits().expect("logits").slice(s![.., t..t + 1, ..]).to_owned().into_dyn();
            let d = common::max_abs_diff(st.logits().expect("logits"), &want);
            assert!(
                d < 1e-10,
                "{name}: decode.{} logits differ from the full forward by {d:e}",
                j - 1
            );
        }
        for (b, &p) in PADS.iter().enumerate() {
            let one = common::run_steps(
                &model,
                &prefix[b..b + 1],
                &common::left_padded(&[p], LEN),
                &dec[b..b + 1],
            );
            for (sb, so) in steps.iter().zip(&one) {
                for (site, a) in &so.sites {
                    let row = sb
                        .get(site)
                        .expect("site")
                        .slice_axis(Axis(0), (b..b + 1).into())
                        .to_owned();
                    let d = common::max_abs_diff(&row, a);
                    assert!(
                        d < 1e-12,
                        "{name}: row {b} {site} differs from its single-row run by {d:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn cache_dumps_hold_the_rotated_keys_of_every_step() {
    for (name, spec) in specs() {
        let model = spec.model(3);
        let ids = common::tokens(3, LEN, spec.vocab, 1);
        let dec = common::tokens(3, STEPS, spec.vocab, 2);
        let steps = common::run_steps(&model, &ids, &common::left_padded(&PADS, LEN), &dec);
        for i in 0..spec.layers {
            let (kc, kr, vc, vp) = (
                Site::Layer(i, LayerPart::KCache),
                Site::Layer(i, LayerPart::KRope),
                Site::Layer(i, LayerPart::VCache),
                Site::Layer(i, LayerPart::VProj),
            );
            let mut start = 0;
            let mut previous: Option<ndarray::ArrayD<f64>> = None;
            for st in &steps {
                let cache = st.get(&kc).expect("k_cache");
                let rot = st.get(&kr).expect("k_rope");
                let t = rot.shape()[2];
                assert_eq!(cache.shape()[2], start + t, "{name}: layer {i} cache length");
                assert_eq!(
                    cache.slice_axis(Axis(2), (start..start + t).into()),
                    rot.view(),
                    "{name}: layer {i} new keys"
                );
                if let Some(prev) = &previous {
                    assert_eq!(
                        cache.slice_axis(Axis(2), (0..start).into()),
                        prev.view(),
                        "{name}: layer {i} old keys kept"
                    );
                }
                // v_cache's new slots are v_proj split into heads.
                let v = st.get(&vp).expect("v_proj");
                let vcache = st.get(&vc).expect("v_cache");
                let (b, tt, nkv, d) =
                    (v.shape()[0], v.shape()[1], spec.kv_heads, vcache.shape()[3]);
                for (bi, h, ti, j) in itertools_like(b, nkv, tt, d) {
                    assert_eq!(
                        vcache[[bi, h, start + ti, j]],
                        v[[bi, ti, h * d + j]],
                        "{name}: v_cache layout"
                    );
                }
                start += t;
                previous = Some(cache.clone());
            }
        }
    }
}

fn itertools_like(
    a: usize,
    b: usize,
    c: usize,
    d: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (0..a).flat_map(move |i| {
        (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l))))
    })
}

/// A dump directory for `spec`'s random model: manifest, weights and a minimal
/// activations file, then the reference's own run written over it.
fn make_golden(dir: &Path, spec: &Spec, weights: BTreeMap<String, Tensor>) {
    let cfg = spec.config();
    let manifest = json!({
        "format": "llama-parity/dump@1",
        "producer": {"framework": "test"},
        "model": cfg,
        "dtype": "float32",
        "scenario": {"name": "random", "input_ids": common::tokens(3, LEN, spec.vocab, 5),
                     "attention_mask": common::left_padded(&PADS, LEN), "decode_ids": common::tokens(3, 2, spec.vocab, 6)},
        "steps": ["prefill", "decode.0", "decode.1"],
    });
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).expect("json"))
        .expect("write");
    safetensors::write(&dir.join("weights.safetensors"), &weights, None).expect("weights");
    let mut acts = BTreeMap::new();
    for step in ["prefill", "decode.0", "decode.1"] {
        acts.insert(format!("{step}/inputs.position_ids"), Tensor::from_i64(&[1], &[0]));
    }
    safetensors::write(&dir.join("activations.safetensors"), &acts, None).expect("activations");
}

fn opts() -> RunOptions {
    RunOptions::new(Implementation::Reference).with_teacher_force(true)
}

#[test]
fn run_through_a_dump_directory_reproduces_itself() {
    for (name, spec) in specs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let w = Weights::random(&spec.config(), 11);
        make_golden(tmp.path(), &spec, common::weight_tensors(&w, spec.tied, DType::F32));
        let first = model::run(&Dump::open(tmp.path()).expect("open"), &opts())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        first.dump.write(tmp.path()).expect("write");
        let golden = Dump::open(tmp.path()).expect("reopen");
        let again = model::run(&golden, &opts()).expect("run");
        let cmp = compare(&golden, &again.dump, &Policy::default()).expect("compare");
        assert_eq!(cmp.verdict(), Verdict::Pass, "{name}");
        assert_eq!(
            cmp.sites.len(),
            3 * (7 + 14 * spec.layers),
            "{name}: every contract site at every step"
        );
        let local = compare(
            &golden,
            again.teacher_forced.as_ref().expect("teacher-forced"),
            &Policy::default(),
        )
        .expect("compare");
        assert_eq!(local.verdict(), Verdict::Pass, "{name} teacher-forced");
    }
}

#[test]
fn a_missing_weight_is_named() {
    let spec = Spec::default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut t = common::weight_tensors(&Weights::random(&spec.config(), 1), false, DType::F32);
    t.remove("model.layers.1.mlp.up_proj.weight");
    make_golden(tmp.path(), &spec, t);
    match model::run(&Dump::open(tmp.path()).expect("open"), &opts()) {
        Err(Error::MissingTensor { key, file }) => {
            assert_eq!(key, "model.layers.1.mlp.up_proj.weight");
            assert!(file.ends_with("weights.safetensors"));
        }
        other => panic!("expected MissingTensor, got {:?}", other.err()),
    }
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let spec = Spec::default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut t = common::weight_tensors(&Weights::random(&spec.config(), 1), false, DType::F32);
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::from_f64(&[16, 16], &[0.0; 256], DType::F32),
    );
    make_golden(tmp.path(), &spec, t);
    match model::run(&Dump::open(tmp.path()).expect("open"), &opts()) {
        Err(Error::Shape { key, expected, got, .. }) => {
            assert_eq!(key, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!((expected, got), (vec![8, 16], vec![16, 16]));
        }
        other => panic!("expected Shape, got {:?}", other.err()),
    }
}

#[test]
fn tied_embeddings_need_no_lm_head_and_untied_ones_do() {
    let tied = Spec { tied: true, ..Spec::default() };
    let tmp = tempfile::tempdir().expect("tempdir");
    make_golden(
        tmp.path(),
        &tied,
        common::weight_tensors(&Weights::random(&tied.config(), 1), true, DType::F32),
    );
    assert!(model::run(&Dump::open(tmp.path()).expect("open"), &opts()).is_ok());
    let untied = Spec::default();
    let tmp = tempfile::tempdir().expect("tempdir");
    make_golden(
        tmp.path(),
        &untied,
        common::weight_tensors(&Weights::random(&untied.config(), 1), true, DType::F32),
    );
    assert!(
        matches!(model::run(&Dump::open(tmp.path()).expect("open"), &opts()), Err(Error::MissingTensor { key, .. }) if key == "lm_head.weight")
    );
}
