//! Scoped faults (CONTRACT §4): `--fault ID@layers=…`, `@steps=…`, `@component=…`
//! planted in the float64 reference on `gqa_pad_f32` (2 layers, 8/2 heads, hidden 64).
//! Each scoped fault diverges first where its scope begins, and everything outside its
//! scope still matches the golden; the same fault unscoped diverges earlier. Scopes a
//! fault cannot take, and scopes the real ports cannot plant, exit 2 naming `--fault`.

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, Comparison, Status};
use llama_parity::contract::fault::ScopedFault;
use llama_parity::dump::Dump;
use llama_parity::model::{self, Implementation, RunOptions};

use crate::helpers::{parity, report_json, root};

fn golden() -> Dump {
    Dump::open(&root().join("golden/gqa_pad_f32")).expect("open golden")
}

fn run(g: &Dump, spec: &str) -> Comparison {
    let fault = ScopedFault::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let opts = RunOptions::new(Implementation::Reference).with_faults(vec![fault]);
    let out = model::run(g, &opts).unwrap_or_else(|e| panic!("{spec}: {e}"));
    compare(g, &out.dump, &Policy::default()).expect("compare")
}

fn first(c: &Comparison) -> String {
    c.first_divergence().map_or("none".into(), |s| format!("{} {}", s.step, s.site))
}

/// The failing sites, as `step site`.
fn failing(c: &Comparison) -> Vec<String> {
    c.sites
        .iter()
        .filter(|s| s.status == Status::Fail)
        .map(|s| format!("{} {}", s.step, s.site))
        .collect()
}

#[test]
fn a_scoped_fault_diverges_first_where_its_scope_begins_and_unscoped_earlier() {
    let g = golden();
    let cases = [
        // (scoped, its first divergence, the same fault everywhere, that first divergence)
        (
            "attn.no_scale@layers=1",
            "prefill model.layers.1.self_attn.probs",
            "attn.no_scale",
            "prefill model.layers.0.self_attn.probs",
        ),
        (
            "weights.gate_up_swapped@layers=1",
            "prefill model.layers.1.mlp",
            "weights.gate_up_swapped",
            "prefill model.layers.0.mlp",
        ),
        (
            "weights.transposed@component=o_proj",
            "prefill model.layers.0.self_attn.o_proj",
            "weights.transposed",
            "prefill model.layers.0.self_attn.q_proj",
        ),
        (
            "norm.layernorm@component=model.norm",
            "prefill model.norm",
            "norm.layernorm",
            "prefill model.layers.0.input_layernorm",
        ),
        (
            "norm.weight_unmapped@component=post_attention_layernorm",
            "prefill model.layers.0.post_attention_layernorm",
            "norm.weight_unmapped",
            "prefill model.layers.0.input_layernorm",
        ),
        (
            "kv.stale@layers=1",
            "decode.0 model.layers.1.self_attn.k_cache",
            "kv.stale",
            "decode.0 model.layers.0.self_attn.k_cache",
        ),
        (
            "mask.padding_ignored@steps=decode.*",
            "decode.0 model.mask",
            "mask.padding_ignored",
            "prefill model.mask",
        ),
    ];
    let mut wrong = Vec::new();
    for (scoped, at, everywhere, at_everywhere) in cases {
        let got = first(&run(&g, scoped));
        let got_everywhere = first(&run(&g, everywhere));
        println!("{scoped:58} {got:52} | {everywhere:24} {got_everywhere}");
        if got != at {
            wrong.push(format!("{scoped}: first divergence {got}, expected {at}"));
        }
        if got_everywhere != at_everywhere {
            wrong.push(format!(
                "{everywhere}: first divergence {got_everywhere}, expected {at_everywhere}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn outside_its_scope_a_fault_changes_nothing() {
    let g = golden();
    // Layer 0 never sees a fault narrowed to layer 1.
    let c = run(&g, "attn.no_scale@layers=1");
    let fails = failing(&c);
    assert!(!fails.is_empty());
    assert!(fails.iter().all(|s| !s.contains("model.layers.0.")), "{fails:#?}");
    // The prefill never sees a fault narrowed to decode steps.
    let c = run(&g, "mask.padding_ignored@steps=decode.*");
    let fails = failing(&c);
    assert!(!fails.is_empty());
    assert!(fails.iter().all(|s| !s.starts_with("prefill ")), "{fails:#?}");
    // A fault narrowed to the last decode step leaves every earlier step alone.
    let c = run(&g, "attn.no_scale@steps=decode.4");
    assert_eq!(first(&c), "decode.4 model.layers.0.self_attn.probs");
}

#[test]
fn the_cli_plants_a_scoped_fault_and_names_it_in_the_report() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rep = tmp.path().join("r");
    let (code, out, err) = parity(&[
        "run",
        "golden/gqa_pad_f32",
        "--impl",
        "ascend",
        "--dtype",
        "bfloat16",
        "--fault",
        "weights.gate_up_swapped@layers=1",
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    let r = report_json(&rep);
    assert_eq!(r["first_divergence"]["step"], "prefill");
    assert_eq!(r["first_divergence"]["site"], "model.layers.1.mlp");
    assert!(r["candidate"].as_str().unwrap().contains("weights.gate_up_swapped@layers=1"), "{r}");
}

#[test]
fn a_scope_the_fault_or_the_port_cannot_take_exits_2_naming_the_flag() {
    for (args, says) in [
        (
            vec!["--impl", "reference", "--fault", "rope.pos_reset@layers=1"],
            "rope.pos_reset cannot be narrowed to layers",
        ),
        (vec!["--impl", "reference", "--fault", "kv.stale@layers=x"], "layers: \"x\""),
        (
            vec!["--impl", "mindspore", "--fault", "kv.stale@steps=decode.*"],
            "no switch for kv.stale@steps=decode.*",
        ),
        (
            vec!["--impl", "mindspore", "--fault", "kv.wrong_slot@layers=1@offset=2"],
            "no switch for kv.wrong_slot@layers=1@offset=2",
        ),
        (
            vec!["--impl", "mindformers", "--fault", "kv.stale@layers=1"],
            "no switch for kv.stale@layers=1",
        ),
    ] {
        let mut all = vec!["run", "golden/gqa_pad_f32"];
        all.extend(args.iter());
        let (code, out, err) = parity(&all);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(err.contains("--fault") && err.contains(says), "{args:?}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("parity: error")).collect();
        assert_eq!(errors.len(), 1, "one error line: {err}");
    }
}

#[test]
fn no_diagnosis_reports_the_divergence_and_where_it_starts_without_hypotheses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rep = tmp.path().join("r");
    let (code, out, err) = parity(&[
        "run",
        "golden/gqa_pad_f32",
        "--impl",
        "ascend",
        "--fault",
        "rope.pos_reset",
        "--no-diagnosis",
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(!err.contains("diagnosing"), "{err}");
    let r = report_json(&rep);
    assert_eq!(r["first_divergence"]["site"], "inputs.position_ids");
    assert_eq!(r["diagnosis"], serde_json::json!([]), "{r}");
    assert_eq!(r["diagnosis_note"], "not made: not asked for");
    let starts = r["localisation"].as_str().unwrap_or_default();
    assert!(starts.starts_with("decode.0 inputs.position_ids"), "{starts}");
}
