//! One training step (CONTRACT §6) of the float64 reference and of the simulated
//! Ascend port against the HF training goldens under `fixtures/train/golden/` (made with
//! real transformers, torch and PEFT by `golden/generate.py --train`), and each planted
//! `train.*` fault against its HF-made candidate under `fixtures/train/candidates/`.
//!
//! Every site is compared by its relative L2 error `‖run − golden‖ / ‖golden‖`, padding
//! query rows left out as CONTRACT §2 says (the token axis of the site's forward value),
//! the mask as a visibility pattern, the positions exactly. A golden value that is not
//! finite (an overflowed float16 gradient) must be non-finite in the run too.

use std::path::PathBuf;

use llama_parity::contract::fault::{Fault, ScopedFault};
use llama_parity::contract::site::{Site, Step};
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunOptions};

fn fixture(kind: &str, name: &str) -> Dump {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/train").join(kind).join(name);
    assert!(dir.is_dir(), "training fixture {} is missing", dir.display());
    Dump::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Which bound a site is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Forward,
    Loss,
    Grad,
    Norm,
    ParamGrad,
    Update,
}

fn class(site: &Site) -> Class {
    match site {
        Site::Loss => Class::Loss,
        Site::Grad(_) => Class::Grad,
        Site::GradNorm => Class::Norm,
        Site::ParamGrad(_) => Class::ParamGrad,
        Site::Update(_) => Class::Update,
        _ => Class::Forward,
    }
}

/// A site's error: the relative L2 over the elements compared, and whether the run has a
/// non-finite value exactly where the golden has one.
struct SiteError {
    site: Site,
    rel_l2: f64,
    nonfinite_match: bool,
}

/// Every site of `golden`'s step `train` against `run`'s (a site the run lacks fails).
fn errors(golden: &Dump, run: &Dump) -> Vec<SiteError> {
    let valid = &golden.manifest.scenario.attention_mask;
    let mut out = Vec::new();
    for site in golden.sites(Step::Train) {
        let g = golden.get(Step::Train, site).expect("read").expect("listed").to_array();
        let r = run
            .get(Step::Train, site)
            .unwrap_or_else(|e| panic!("{site}: {e}"))
            .unwrap_or_else(|| panic!("{site}: missing from the run"))
            .to_array();
        assert_eq!(g.shape(), r.shape(), "{site}: shape");
        let axis = site.token_axis();
        let (mut num, mut den, mut nonfinite_match) = (0.0, 0.0, true);
        for ((idx, &gv), &rv) in g.indexed_iter().zip(r.iter()) {
            if let Some(a) = axis {
                if valid[idx[0]][idx[a]] == 0 {
                    continue;
                }
            }
            let (gv, rv) = if site.is_mask() {
                (f64::from(gv < -1.0), f64::from(rv < -1.0))
            } else {
                (gv, rv)
            };
            if !gv.is_finite() {
                nonfinite_match &= !rv.is_finite();
                continue;
            }
            num += (rv - gv) * (rv - gv);
            den += gv * gv;
        }
        let rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
        out.push(SiteError { site: site.clone(), rel_l2, nonfinite_match });
    }
    out
}

/// The worst error of each class, printed, and every site checked against `bound`.
fn judge(
    what: &str,
    golden: &Dump,
    run: &Dump,
    bound: impl Fn(Class) -> f64,
) -> Vec<(Class, f64, Site)> {
    let errs = errors(golden, run);
    assert!(!errs.is_empty(), "{what}: no site compared");
    let mut worst: Vec<(Class, f64, Site)> = Vec::new();
    for e in &errs {
        let c = class(&e.site);
        assert!(
            e.nonfinite_match,
            "{what}: {}: the golden's non-finite values are not the run's",
            e.site
        );
        match worst.iter_mut().find(|w| w.0 == c) {
            Some(w) if e.rel_l2.is_nan() || e.rel_l2 > w.1 => *w = (c, e.rel_l2, e.site.clone()),
            Some(_) => {}
            None => worst.push((c, e.rel_l2, e.site.clone())),
        }
    }
    worst.sort_by_key(|w| w.0);
    for (c, e, s) in &worst {
        println!("{what}: worst {c:?} {s}: rel-L2 {e:.3e} (bound {:.0e})", bound(*c));
    }
    for e in &errs {
        let b = bound(class(&e.site));
        assert!(e.rel_l2 <= b, "{what}: {}: rel-L2 {:.3e} above {b:.0e}", e.site, e.rel_l2);
    }
    worst
}

fn run(
    golden: &Dump,
    implementation: Implementation,
    precision: Option<Precision>,
    faults: &[Fault],
) -> Dump {
    let faults: Vec<ScopedFault> = faults.iter().map(|&f| f.into()).collect();
    let opts = RunOptions::new(implementation).with_precision(precision).with_faults(faults);
    model::run(golden, &opts).unwrap_or_else(|e| panic!("{e}")).dump
}

/// Bounds of the float64 reference against a float32 golden. Forward sites: float32's
/// rounding through two layers (measured ≤ 1e-6). The backward composes about twice the
/// forward's operations in float32 on the golden's side, so its gradients carry about
/// twice the rounding (measured ≤ 1.1e-6); `grad_norm` and the parameter gradients are
/// sums of those. An update is `p − lr·(≈ ±1)` per element: its error relative to the
/// weight is the float32 rounding of `p` plus the rare element whose tiny gradient is
/// resolved differently (measured ≤ 1.5e-6). 1e-5 for each leaves ~7× headroom and is
/// 3 orders of magnitude below what a fault moves (≥ 1e-2).
fn float32_bound(c: Class) -> f64 {
    match c {
        Class::Loss => 1e-6,
        _ => 1e-5,
    }
}

/// Bounds of a run against a float16 golden (or of a float16 run): float16's unit
/// roundoff is 4.9e-4, the forward crosses ~30 stored values per layer and the backward
/// as many again (measured ≤ 2.2e-3 forward, ≤ 2.7e-3 backward and parameter
/// gradients); an update's error is `lr` over the weight's size for each element whose
/// small gradient changes sign (measured ≤ 2e-4).
fn float16_bound(c: Class) -> f64 {
    match c {
        Class::Loss => 1e-4,
        _ => 1e-2,
    }
}

/// A bfloat16 run against a float32 golden: bfloat16's unit roundoff is 3.9e-3, 8× float16's
/// (measured ≤ 1.8e-2 forward, at the second layer's MLP; ≤ 2.4e-2 at the attention's
/// gradients): about 8 and 15 unit roundoffs.
fn bfloat16_bound(c: Class) -> f64 {
    match c {
        Class::Loss => 1e-3,
        Class::Forward => 3e-2,
        _ => 6e-2,
    }
}

const FLOAT32_GOLDENS: [&str; 3] = ["train_full_f32", "train_adapter_f32", "train_micro_f32"];

#[test]
fn reference_reproduces_every_float32_training_golden_at_every_site() {
    for name in FLOAT32_GOLDENS {
        let g = fixture("golden", name);
        let r = run(&g, Implementation::Reference, None, &[]);
        assert_eq!(r.manifest.steps, vec![Step::Train]);
        assert_eq!(r.manifest.producer["implementation"], "reference");
        judge(&format!("reference {name}"), &g, &r, float32_bound);
    }
}

#[test]
fn reference_reproduces_the_scaled_float16_golden_within_float16_bounds() {
    let g = fixture("golden", "train_scaled_f16");
    let r = run(&g, Implementation::Reference, None, &[]);
    assert_eq!(r.manifest.dtype, Precision::F16);
    judge("reference train_scaled_f16", &g, &r, float16_bound);
}

#[test]
fn reference_keeps_the_float16_range_so_it_overflows_and_skips_where_the_golden_did() {
    // The float64 reference keeps a float16 golden's range (not its rounding): its
    // scaled gradients overflow at the elements where the golden's did, and its step is
    // skipped as the golden's was.
    let g = fixture("golden", "train_overflow_f16");
    let r = run(&g, Implementation::Reference, None, &[]);
    judge("reference train_overflow_f16", &g, &r, float16_bound);
    let logits = Site::Grad(Box::new(Site::LmHead));
    let non_finite = |d: &Dump| -> Vec<usize> {
        let a = d.get(Step::Train, &logits).expect("read").expect("grad.lm_head").to_array();
        a.iter().enumerate().filter(|(_, x)| !x.is_finite()).map(|(i, _)| i).collect()
    };
    let (want, got) = (non_finite(&g), non_finite(&r));
    assert!(!want.is_empty(), "the golden overflows at grad.lm_head");
    assert_eq!(got, want, "the reference overflows at the golden's elements");
    let norm = r.get(Step::Train, &Site::GradNorm).expect("read").expect("grad_norm").to_array();
    assert!(norm.iter().all(|x| !x.is_finite()), "float64 grad_norm {norm}");
    assert_eq!(r.manifest.producer["step_skipped"], true);
    let ok = fixture("golden", "train_scaled_f16");
    let r = run(&ok, Implementation::Reference, None, &[]);
    assert_eq!(r.manifest.producer["step_skipped"], false, "a scale that fits is applied");
}

#[test]
fn ascend_float16_reproduces_the_float16_goldens_and_skips_the_overflowed_step() {
    for name in ["train_scaled_f16", "train_overflow_f16"] {
        let g = fixture("golden", name);
        let r = run(&g, Implementation::Ascend, Some(Precision::F16), &[]);
        assert_eq!(r.manifest.producer["implementation"], "ascend");
        judge(&format!("ascend-f16 {name}"), &g, &r, float16_bound);
    }
    let g = fixture("golden", "train_overflow_f16");
    let r = run(&g, Implementation::Ascend, Some(Precision::F16), &[]);
    assert_eq!(r.manifest.producer["step_skipped"], true);
    // The dynamic scale halves for the next step (MindSpore's DynamicLossScaler).
    assert_eq!(r.manifest.producer["next_loss_scale"], 524288.0);
    for site in r.sites(Step::Train).iter().filter(|s| matches!(s, Site::Update(_))) {
        let Site::Update(name) = site else { unreachable!() };
        let u = r.get(Step::Train, site).expect("read").expect("update").to_array();
        let w =
            g.weights().expect("weights").expect("weights file").get(name).expect(name).to_array();
        assert_eq!(u, w, "{name}: a skipped step leaves the weight");
    }
}

#[test]
fn ascend_bfloat16_reproduces_the_float32_goldens_within_bfloat16_bounds() {
    for name in FLOAT32_GOLDENS {
        let g = fixture("golden", name);
        let r = run(&g, Implementation::Ascend, Some(Precision::Bf16), &[]);
        assert_eq!(r.manifest.dtype, Precision::Bf16);
        judge(&format!("ascend-bf16 {name}"), &g, &r, bfloat16_bound);
    }
}

#[test]
fn ascend_float32_is_the_reference_to_float32_rounding() {
    let g = fixture("golden", "train_full_f32");
    let r = run(&g, Implementation::Ascend, Some(Precision::F32), &[]);
    judge("ascend-f32 train_full_f32", &g, &r, float32_bound);
}

/// Every HF-made candidate of a catalogued fault (`fixtures/train/candidates/<golden>__<fault>`,
/// the fault in its manifest's `producer.fault`) is reproduced by planting that fault in
/// the harness's own step on the golden: at the golden's dtype, by the reference for a
/// float32 golden and by the float16 simulation for a float16 one. Candidates of faults
/// outside the catalogue (`other.*`) are left to the diagnosis.
#[test]
fn each_planted_fault_reproduces_its_hf_candidate_at_every_site() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/train/candidates");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fixtures/train/candidates")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut planted = Vec::new();
    for name in &names {
        let cand = fixture("candidates", name);
        let Some(fault) = cand.manifest.producer["fault"].as_str().and_then(Fault::parse) else {
            continue;
        };
        let golden_name = name.split_once("__").expect("<golden>__<fault>").0;
        let g = fixture("golden", golden_name);
        let (implementation, precision, bound): (_, _, fn(Class) -> f64) = match g.manifest.dtype {
            Precision::F32 => (Implementation::Reference, None, float32_bound),
            p => (Implementation::Ascend, Some(p), float16_bound),
        };
        let r = run(&g, implementation, precision, &[fault]);
        judge(&format!("{name} ({fault})"), &cand, &r, bound);
        // And the fault is visible: the correct step does not reproduce the candidate.
        let clean = run(&g, implementation, precision, &[]);
        let moved = errors(&cand, &clean)
            .iter()
            .any(|e| e.rel_l2 > bound(class(&e.site)) || !e.nonfinite_match);
        assert!(moved, "{name}: the correct step already reproduces the candidate");
        planted.push(fault);
    }
    for f in Fault::TRAIN {
        assert!(planted.contains(&f) || !has_candidate(&names, f), "{f}");
    }
    assert!(planted.len() >= 12, "only {} candidates of catalogued faults", planted.len());
}

fn has_candidate(names: &[String], f: Fault) -> bool {
    names.iter().any(|n| n.ends_with(&f.id().replace('.', "_")))
}

#[test]
fn a_fault_a_training_step_does_not_plant_is_refused_naming_the_flag() {
    let g = fixture("golden", "train_full_f32");
    for f in [Fault::KvStale, Fault::RopePosReset, Fault::WeightsGateUpSwapped] {
        let opts = RunOptions::new(Implementation::Reference).with_faults(vec![f.into()]);
        let e = model::run(&g, &opts).err().unwrap_or_else(|| panic!("{f} planted silently"));
        let text = e.to_string();
        assert!(text.starts_with("--fault") && text.contains(f.id()), "{text}");
    }
}

#[test]
fn a_training_dump_written_to_disk_reads_back_site_for_site() {
    let g = fixture("golden", "train_adapter_f32");
    let r = run(&g, Implementation::Reference, None, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    r.write(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let back = Dump::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(back.manifest.train.is_some(), "the train field survives");
    assert_eq!(back.sites(Step::Train), r.sites(Step::Train));
    // Every site of Site::train is there, and §5's adapter sites with it.
    let params: Vec<String> = r
        .sites(Step::Train)
        .iter()
        .filter_map(|s| if let Site::ParamGrad(p) = s { Some(p.clone()) } else { None })
        .collect();
    assert_eq!(params.len(), 28, "14 adapted projections, A and B each");
    for s in Site::train(2, &params) {
        assert!(back.has(Step::Train, &s), "{s} missing");
    }
    assert!(back.has(Step::Train, &Site::parse("grad.model.layers.0.self_attn.q_proj.lora")));
    for s in r.sites(Step::Train) {
        let a = r.get(Step::Train, s).expect("read").expect("site").to_array();
        let b = back.get(Step::Train, s).expect("read").expect("site").to_array();
        assert_eq!(a, b, "{s}");
    }
}

#[test]
fn precision_faults_act_on_the_simulated_float16_step() {
    // `norm.no_upcast` and `attn.softmax_low_precision` are choices of the simulated
    // port's numerics: its forward (and so everything after) moves, the reference's not.
    let g = fixture("golden", "train_scaled_f16");
    let clean = run(&g, Implementation::Ascend, Some(Precision::F16), &[]);
    for f in [Fault::NormNoUpcast, Fault::AttnSoftmaxLowPrecision] {
        let faulty = run(&g, Implementation::Ascend, Some(Precision::F16), &[f]);
        let moved = errors(&clean, &faulty).iter().filter(|e| e.rel_l2 > 0.0).count();
        assert!(moved > 10, "{f}: {moved} sites moved");
        let reference = run(&g, Implementation::Reference, None, &[f]);
        let base = run(&g, Implementation::Reference, None, &[]);
        assert!(errors(&base, &reference).iter().all(|e| e.rel_l2 == 0.0), "{f} in float64");
    }
}
