//! The variant set (`fixtures/variants/`, made by real HF transformers code with
//! `golden/generate.py --variants` on a configuration no other golden has: 4 layers,
//! GQA 12/4, yarn at theta 500000, batch 3 with left padding). Each faulty candidate's
//! manifest says what it holds (`producer.expect`): a known fault with the scope and
//! parameters it was planted with, or a fault outside CONTRACT §3 with the first site it
//! changes and the computation there.
//!
//! - At least 90 % of the known-fault variants are named top-1 with the right scope and
//!   parameters.
//! - No out-of-contract fault is named as a known fault; each gets a localisation that
//!   starts at its first site and names its computation.
//! - The correct bfloat16 run passes with an empty diagnosis.
//!
//! The confusion is printed (`cargo test --release --test main variants -- --nocapture`).

use std::path::Path;

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::Verdict;
use llama_parity::dump::Dump;
use llama_parity::pipeline::{self, Options};
use llama_parity::report::Report;
use serde_json::Value;

use crate::helpers::{dump_dirs, root};

fn golden() -> Dump {
    Dump::open(&root().join("fixtures/variants/golden/variants_f32")).expect("variant golden")
}

fn check(golden: &Dump, dir: &Path) -> (Report, Value) {
    let cand = Dump::open(dir).expect("candidate");
    let expect = cand.manifest.producer.get("expect").cloned().unwrap_or(Value::Null);
    let policy = Policy::default();
    let report = pipeline::check(golden, &cand, None, &Options::new(&policy)).expect("check");
    (report, expect)
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().trim_start_matches("variants_f32__").to_string()
}

/// The manifest's `expect` in the report's terms (CONTRACT §4): `steps` and `component`
/// appear only when narrowed.
fn in_report_terms(mut expect: Value) -> Value {
    if let Some(scope) = expect.get_mut("scope").and_then(Value::as_object_mut) {
        scope.retain(|k, v| !(v.is_null() || (k == "steps" && v == "all")));
    }
    expect
}

/// What the top finding says, in the manifest's `expect` terms.
fn top(report: &Report) -> Value {
    match report.diagnosis.first() {
        None => Value::Null,
        Some(f) => serde_json::json!({
            "fault": f.fault,
            "scope": f.scope.clone().unwrap_or(Value::Null),
            "params": Value::Object(f.params.clone()),
        }),
    }
}

#[test]
fn variants_of_known_faults_are_named_with_their_scope_and_parameters() {
    let g = golden();
    let (mut named, mut total, mut missed) = (0, 0, Vec::new());
    println!("\nvariant set, known faults: planted -> top-ranked diagnosis");
    for dir in dump_dirs("fixtures/variants/candidates") {
        let (report, expect) = check(&g, &dir);
        if expect["fault"].is_null() {
            continue;
        }
        assert_eq!(report.verdict, Verdict::Fail, "{}: passes the gate", name(&dir));
        let got = top(&report);
        let label = report.diagnosis.first().map_or("(none)".to_string(), |f| f.label());
        let ok = got == in_report_terms(expect.clone());
        println!("  {:<30} {:<5} {label}", name(&dir), if ok { "ok" } else { "MISS" });
        total += 1;
        if ok {
            named += 1;
        } else {
            missed.push(format!("{}: expected {expect}, got {got}", name(&dir)));
        }
    }
    println!("  named top-1 with scope and parameters: {named} of {total}");
    assert!(total >= 12, "the variant set holds {total} known-fault variants");
    assert!(named * 10 >= total * 9, "{named} of {total}; missed: {missed:#?}");
}

#[test]
fn faults_outside_the_contract_are_never_named_and_are_localised() {
    let g = golden();
    let mut total = 0;
    println!("\nvariant set, faults outside the contract: localisation");
    for dir in dump_dirs("fixtures/variants/candidates") {
        let (report, expect) = check(&g, &dir);
        if !expect["fault"].is_null() {
            continue;
        }
        total += 1;
        let who = name(&dir);
        assert_eq!(report.verdict, Verdict::Fail, "{who}: passes the gate");
        let labels: Vec<String> = report.diagnosis.iter().map(|f| f.label()).collect();
        assert!(labels.is_empty(), "{who}: named {labels:?}");
        let said = report.localisation.clone().unwrap_or_default();
        println!("  {who:<30} {said}");
        let first = expect["first"].as_str().expect("expect.first");
        let computation = expect["computation"].as_str().expect("expect.computation");
        assert!(said.starts_with(first), "{who}: localisation {said:?} does not start at {first}");
        assert!(said.contains(computation), "{who}: {said:?} does not name {computation:?}");
    }
    assert!(total >= 8, "the variant set holds {total} out-of-contract faults");
}

#[test]
fn the_correct_bfloat16_run_passes_with_an_empty_diagnosis() {
    let g = golden();
    let (report, _) = check(&g, &root().join("fixtures/variants/golden/variants_bf16"));
    assert_eq!(report.verdict, Verdict::Pass);
    assert!(report.diagnosis.is_empty(), "{:?}", report.diagnosis);
    assert!(report.localisation.is_none());
}
