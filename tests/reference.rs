//! `parity run --impl reference` against the HF goldens under `golden/<name>` (merged
//! from the golden branch). A missing golden fails the test; it never passes silently.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, Status, Verdict};
use llama_parity::dump::Dump;
use llama_parity::model::{self, EventSink, Implementation, RunContext, RunEvent, RunOptions};

fn golden(name: &str) -> Dump {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden").join(name);
    assert!(
        dir.is_dir(),
        "golden dump {} is missing: merge the golden branch (golden/<name>/)",
        dir.display()
    );
    Dump::open(&dir).unwrap_or_else(|e| panic!("{e}"))
}

fn options(teacher_force: bool) -> RunOptions {
    RunOptions::new(Implementation::Reference).with_teacher_force(teacher_force)
}

/// Every site passes and every float site is within `max_rel_l2`; returns the worst.
fn check(name: &str, max_rel_l2: f64, teacher_force: bool) {
    let g = golden(name);
    let out = model::run(&g, &options(teacher_force)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let policy = Policy::default();
    let mut dumps = vec![("free", out.dump)];
    if let Some(tf) = out.teacher_forced {
        dumps.push(("teacher-forced", tf));
    }
    for (kind, d) in &dumps {
        let cmp = compare(&g, d, &policy).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!cmp.sites.is_empty());
        let mut worst = (0.0, String::new());
        for s in &cmp.sites {
            assert_eq!(
                s.status,
                Status::Pass,
                "{name} ({kind}): {}/{} is {:?} ({:?})",
                s.step,
                s.site,
                s.status,
                s.note
            );
            if let Some(m) = s.metrics.as_ref().and_then(|m| m.values()) {
                assert!(
                    m.rel_l2 <= max_rel_l2,
                    "{name} ({kind}): {}/{} rel_l2 {:.3e}",
                    s.step,
                    s.site,
                    m.rel_l2
                );
                if m.rel_l2 > worst.0 {
                    worst = (m.rel_l2, format!("{}/{}", s.step, s.site));
                }
            }
        }
        assert_eq!(cmp.verdict(), Verdict::Pass);
        eprintln!("{name} ({kind}): worst {} rel_l2 {:.3e}", worst.1, worst.0);
    }
}

#[test]
fn reference_matches_mha_f32_golden() {
    check("mha_f32", 1e-5, true);
}

#[test]
fn reference_matches_gqa_pad_f32_golden() {
    check("gqa_pad_f32", 1e-5, true);
}

#[test]
fn reference_matches_llama3_f32_golden() {
    check("llama3_f32", 1e-5, false);
}

#[test]
fn reference_matches_yarn_f32_golden() {
    check("yarn_f32", 1e-5, false);
}

#[test]
fn reference_matches_linear_f32_golden() {
    check("linear_f32", 1e-5, false);
}

#[test]
fn reference_matches_longrope_f32_golden() {
    check("longrope_f32", 1e-5, true);
}

#[test]
fn reference_matches_mqa_tied_f32_golden() {
    check("mqa_tied_f32", 1e-5, true);
}

/// HF's bfloat16 run is within the bfloat16 policy of the exact result.
#[test]
fn bf16_golden_is_within_bf16_tolerance_of_the_reference() {
    check("gqa_pad_bf16", 0.05, false);
}

/// HF's float16 run is within the float16 policy of the exact result. Regression: the
/// padding slots of layer 1's k/v cache failed (rel-L2 0.16) while the reference added
/// the -65504 fill in float64, where it does not swallow the score as float16 does.
#[test]
fn f16_golden_is_within_f16_tolerance_of_the_reference() {
    check("gqa_pad_f16", 0.01, false);
}

#[test]
fn the_reference_dump_names_its_producer_and_declares_the_golden_dtype() {
    let g = golden("gqa_pad_bf16");
    let out = model::run(&g, &options(false)).expect("run");
    let p = &out.dump.manifest.producer;
    assert_eq!(p["framework"], "llama-parity");
    assert_eq!(p["implementation"], "reference");
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(out.dump.manifest.dtype, g.manifest.dtype);
    assert_eq!(out.dump.manifest.steps, g.manifest.steps);
}

#[test]
fn a_run_tells_its_sink_when_it_starts_each_layer_of_each_step_in_compute_order_and_when_it_ends() {
    let g = golden("gqa_pad_f32");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    let sink: EventSink =
        Arc::new(move |e: &RunEvent<'_>| keep.lock().unwrap().push(format!("{e:?}")));
    let opts = options(true).with_context(RunContext::new().with_events(sink));
    let out = model::run(&g, &opts).expect("run");
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let layers = g.manifest.model.num_hidden_layers;
    // The prefill, then the decode steps in groups that run a layer at a time for all
    // of their steps (batch 2: four steps a group), in compute order.
    let steps = &g.manifest.steps;
    assert_eq!(g.manifest.scenario.batch(), 2);
    let mut groups = vec![&steps[..1]];
    groups.extend(steps[1..].chunks(4));
    let mut expected = Vec::new();
    for what in ["reference run", "reference run, teacher-forced"] {
        expected.push(format!("Started {{ what: {what:?} }}"));
        for group in &groups {
            for layer in 0..layers {
                for step in *group {
                    expected.push(format!(
                        "Layer {{ step: {step:?}, layer: {layer}, layers: {layers} }}"
                    ));
                }
            }
        }
        expected.push("Finished".to_string());
    }
    assert_eq!(*seen.lock().unwrap(), expected);
}
