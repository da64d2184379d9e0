//! One pass/fail rule ([`Tolerance::judge`]): the verdict, the report's "x tol" column and
//! the diagnosis all use it, and the diagnosis follows the user's policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{Status, Verdict};
use llama_parity::contract::fault::Fault;
use llama_parity::contract::site::{self, LayerPart, Site, Step};
use llama_parity::dump::{Dump, Precision, Tensor};
use llama_parity::model::{self, Implementation, RunOptions};
use llama_parity::pipeline::{self, Options};
use llama_parity::report::{excess, render_markdown};

fn golden() -> Dump {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/gqa_pad_f32");
    Dump::open(&dir).expect("golden")
}

/// `g` with the last element of `step/site` moved by `rel` times the tensor's L2 norm;
/// also returns the distance moved.
fn nudged(g: &Dump, step: Step, site: &Site, rel: f64) -> (Dump, f64) {
    let mut tensors = BTreeMap::new();
    for &s in &g.manifest.steps {
        for st in g.sites(s) {
            tensors.insert(site::key(s, st), g.get(s, st).expect("read").expect("present"));
        }
    }
    let key = site::key(step, site);
    let t = tensors[&key].clone();
    let mut v = t.to_f64_vec();
    let delta = rel * v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let last = v.len() - 1;
    v[last] += delta;
    tensors.insert(key, Tensor::from_f64(t.shape(), &v, t.dtype()));
    (Dump::in_memory(g.manifest.clone(), tensors).expect("dump"), delta)
}

fn policy(json: &str) -> Policy {
    let dir = tempfile::tempdir().expect("tempdir");
    let p: PathBuf = dir.path().join("policy.json");
    std::fs::write(&p, json).expect("write policy");
    Policy::load(&p).expect("policy")
}

#[test]
fn a_site_failing_only_on_max_abs_fails_in_the_verdict_the_report_and_the_summary() {
    let g = golden();
    let site = Site::Layer(1, LayerPart::Mlp);
    // One element off by 2e-5 of the tensor's norm: rel-L2 and cosine stay far inside
    // float32's defaults (1e-4, 0.99999); a max_abs of a tenth of that move does not.
    let (cand, delta) = nudged(&g, Step::Decode(1), &site, 2e-5);
    let strict = policy(&format!(
        r#"{{"rules": [{{"site": "model.layers.1.mlp", "max_abs": {:e}}}]}}"#,
        delta / 10.0
    ));
    let default = Policy::default();

    let loose = pipeline::check(&g, &cand, None, &Options::new(&default)).expect("check");
    assert_eq!(loose.verdict, Verdict::Pass, "inside the default tolerance");

    let opts = Options { diagnose: false, ..Options::new(&strict) };
    let report = pipeline::check(&g, &cand, None, &opts).expect("check");
    assert_eq!(report.verdict, Verdict::Fail);
    let first = report.first_divergence.as_ref().expect("a first divergence");
    assert_eq!(
        (first.step.to_string(), first.site.to_string()),
        ("decode.1".to_string(), "model.layers.1.mlp".to_string())
    );
    assert_eq!(first.status, Status::Fail);
    assert!(first.note.as_deref().unwrap_or("").contains("max_abs"), "{:?}", first.note);
    // The "x tol" column: past its tolerance (about 10x), not a rel-L2 ratio below 1.
    let x = excess(first);
    assert!(x > 5.0 && x < 20.0, "x tol {x}");
    // Every passing site stays at or below 1, every failing one above.
    for s in &report.sites {
        match s.status {
            Status::Pass => assert!(excess(s) <= 1.0, "{} {}: {}", s.step, s.site, excess(s)),
            Status::Fail => assert!(excess(s) > 1.0, "{} {}: {}", s.step, s.site, excess(s)),
            _ => {}
        }
    }
    let md = render_markdown(&report);
    assert!(md.contains("model.layers.1.mlp"), "{md}");
}

#[test]
fn the_diagnosis_accepts_hypotheses_by_the_users_policy() {
    let g = golden();
    let run = RunOptions::new(Implementation::Ascend)
        .with_precision(Precision::Bf16)
        .with_faults(vec![Fault::RopeInterleaved.into()]);
    let cand = model::run(&g, &run).expect("run").dump;
    let default = Policy::default();
    let loose = policy(r#"{"defaults": {"bfloat16": {"max_rel_l2": 0.2}}}"#);
    for (policy, own) in [(&default, None), (&loose, Some(0.2))] {
        let report = pipeline::check(&g, &cand, None, &Options::new(policy)).expect("check");
        assert_eq!(report.verdict, Verdict::Fail);
        let first = report.first_divergence.as_ref().expect("a first divergence");
        let t = first.tolerance.expect("a threshold").max_rel_l2;
        let top = report.diagnosis.first().expect("a finding");
        assert_eq!(top.fault, "rope.interleaved");
        // "... evidence sites within 2e-2 at the first ...": the acceptance bound.
        let bound: f64 = top
            .explains
            .split("sites within ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no bound in {}", top.explains));
        match own {
            // A policy default is the least threshold, and the diagnosis accepts within it.
            Some(d) => assert_eq!(bound, d, "{}", top.explains),
            // Without one, the first site's threshold is the measured floor's (3 × floor,
            // under the fixed 5e-2 on this small model), and so is the bound.
            None => assert!(t < 5e-2 && bound >= t * 0.95 && bound < 5e-2, "{t} {bound}"),
        }
    }
}
