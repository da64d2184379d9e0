//! The noise floor (`compare::floor`): measured per golden and dtype from correct runs,
//! cached by the golden's content, shown in every report, overridden by policy rules,
//! replaced by the fixed defaults (and said so) where the golden has no weights; and
//! the measurements behind its margin: correct HF low-precision runs sit below
//! `MARGIN × floor`, HF-made faulty candidates above it.

use std::path::{Path, PathBuf};
use std::process::Command;

use llama_parity::compare::floor::{
    floor_for, golden_hash, FloorCache, FloorSource, NoiseFloor, MARGIN,
};
use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, compare_with_floor, SiteMetrics, Status, Verdict};
use llama_parity::contract::site::{LayerPart, Site};
use llama_parity::diagnosis::diagnose;
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunContext, RunOptions};
use llama_parity::pipeline::{self, Floor, Options};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn golden(name: &str) -> Dump {
    Dump::open(&root().join("golden").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn measure(g: &Dump, p: Precision) -> NoiseFloor {
    NoiseFloor::measure(g, p, "test", &RunContext::new())
        .expect("measure")
        .expect("the golden has weights")
}

/// Copies a golden's files into a fresh directory (optionally without its weights).
fn copy_golden(name: &str, to: &Path, weights: bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(root().join("golden").join(name)).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && (weights || p.file_name().unwrap() != "weights.safetensors") {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn ascend(g: &Dump, p: Precision, faults: Vec<llama_parity::contract::fault::Fault>) -> Dump {
    let opts = RunOptions::new(Implementation::Ascend)
        .with_precision(p)
        .with_faults(faults.into_iter().map(Into::into).collect());
    model::run(g, &opts).expect("run").dump
}

/// The margin's lower side: HF's own bfloat16 and float16 runs of the gqa_pad weights,
/// measured against the float32 golden, sit below `MARGIN` floors at every value site.
#[test]
fn correct_hf_low_precision_runs_sit_below_the_margin() {
    let g = golden("gqa_pad_f32");
    for (cand, p) in [("gqa_pad_bf16", Precision::Bf16), ("gqa_pad_f16", Precision::F16)] {
        let floor = measure(&g, p);
        let cmp = compare(&g, &golden(cand), &Policy::default()).expect("compare");
        let mut worst = (0.0f64, String::new());
        let mut worst_cos = 0.0f64;
        let mut n = 0;
        for s in &cmp.sites {
            let (Some(SiteMetrics::Values(m)), Some(f)) = (&s.metrics, floor.get(s.step, &s.site))
            else {
                continue;
            };
            n += 1;
            // 1 - cosine in units of the floor's, against MARGIN² (it scales as rel-L2²).
            if f.cosine < 1.0 {
                worst_cos = worst_cos.max((1.0 - m.cosine) / (1.0 - f.cosine));
            }
            let x = f.times(m.rel_l2);
            if x > worst.0 {
                worst = (
                    x,
                    format!(
                        "{} {} rel-L2 {:.2e}, floor {:.2e}",
                        s.step, s.site, m.rel_l2, f.rel_l2
                    ),
                );
            }
        }
        println!(
            "HF {cand}: worst {:.2} floors over {n} sites at {}; 1 - cosine at most {worst_cos:.2} x the floor's",
            worst.0, worst.1
        );
        assert!(worst_cos <= MARGIN * MARGIN, "{cand}: 1 - cosine {worst_cos:.2} x the floor's");
        assert!(n > 100, "{cand}: only {n} sites measured");
        assert!(worst.0 <= MARGIN, "{cand}: {:.2} floors at {}", worst.0, worst.1);
    }
}

/// The margin's upper side: every HF-made faulty candidate still fails at the same first
/// site with the floor in the thresholds, and sits well above `MARGIN` floors there.
#[test]
fn hf_made_faulty_candidates_sit_above_the_margin() {
    let mut floors: std::collections::BTreeMap<(String, Precision), NoiseFloor> =
        Default::default();
    for dir in crate::helpers::dump_dirs("fixtures/candidates") {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let gname = name.split("__").next().unwrap().to_string();
        let g = golden(&gname);
        let cand = Dump::open(&dir).unwrap();
        let p = cand.manifest.dtype;
        let floor = floors.entry((gname.clone(), p)).or_insert_with(|| measure(&g, p));
        let plain = compare(&g, &cand, &Policy::default()).unwrap();
        let floored = compare_with_floor(&g, &cand, &Policy::default(), Some(floor)).unwrap();
        assert_eq!(floored.verdict(), Verdict::Fail, "{name}");
        let (a, b) = (plain.first_divergence().unwrap(), floored.first_divergence().unwrap());
        assert_eq!((a.step, &a.site), (b.step, &b.site), "{name}: first divergence moved");
        let x = b
            .noise_floor
            .zip(b.metrics.as_ref().and_then(|m| m.values()))
            .map(|(f, m)| f.times(m.rel_l2));
        println!("{name}: {} {} x floor {x:?}", b.step, b.site);
        if let Some(x) = x {
            assert!(x > MARGIN, "{name}: only {x:.2} floors at its first divergence");
        }
    }
}

/// Measured once per (golden content, dtype), then read back; another golden content is
/// another key; the golden's directory is never written.
#[test]
fn the_floor_is_cached_by_golden_content() {
    let tmp = tempfile::tempdir().unwrap();
    let gdir = tmp.path().join("g");
    copy_golden("mha_f32", &gdir, true);
    let before: Vec<_> = std::fs::read_dir(&gdir).unwrap().map(|e| e.unwrap().path()).collect();
    let cache = FloorCache { dir: tmp.path().join("cache") };
    let g = Dump::open(&gdir).unwrap();
    let said = std::cell::RefCell::new(Vec::<String>::new());
    let progress = |s: &str| said.borrow_mut().push(s.to_string());
    let a = floor_for(&g, Precision::Bf16, Some(&cache), &progress, &RunContext::new()).unwrap();
    let b = floor_for(&g, Precision::Bf16, Some(&cache), &progress, &RunContext::new()).unwrap();
    assert!(a == b, "the cached floor differs from the measured one");
    let said = said.into_inner();
    assert!(said[0].starts_with("checking that the reference reproduces"), "{said:?}");
    assert!(said[1].starts_with("reproduced: the free-running reference"), "{said:?}");
    assert!(said[2].starts_with("measuring the noise floor"), "{said:?}");
    assert_eq!(said.len(), 4, "{said:?}");
    assert!(said[3].contains("from the cache"), "{said:?}");
    let hash = golden_hash(&gdir).unwrap();
    assert!(cache.path(&hash, Precision::Bf16).is_file());
    let after: Vec<_> = std::fs::read_dir(&gdir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(before, after, "nothing is written into the golden");
    // Another dtype and another content are other keys.
    assert!(cache.load(&hash, Precision::F16, &g).expect("no file, no error").is_none());
    let mut m = std::fs::read_to_string(gdir.join("manifest.json")).unwrap();
    m.push('\n');
    std::fs::write(gdir.join("manifest.json"), m).unwrap();
    assert_ne!(golden_hash(&gdir).unwrap(), hash);
    let FloorSource::Measured(f) = a else { panic!("no floor") };
    assert_eq!(f.golden_sha256, hash);
    // bfloat16 floors are far above float32 noise and below the bf16 default.
    let mlp = f.sites.get("prefill/model.layers.0.mlp").expect("mlp floor");
    assert!(mlp.rel_l2 > 1e-3 && mlp.rel_l2 < 5e-2, "{mlp:?}");
}

/// No weights beside the golden: the fixed defaults, and the report says so.
#[test]
fn a_golden_without_weights_keeps_the_fixed_defaults_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let gdir = tmp.path().join("g");
    copy_golden("gqa_pad_f32", &gdir, false);
    let g = Dump::open(&gdir).unwrap();
    let cand = golden("gqa_pad_bf16");
    let policy = Policy::default();
    let cache = tmp.path().join("cache");
    let opts = Options { floor: Floor::Cache(&cache), ..Options::new(&policy) };
    let r = pipeline::check(&g, &cand, None, &opts).unwrap();
    assert_eq!(r.verdict, Verdict::Pass);
    let note = r.noise_floor_note.as_deref().unwrap();
    assert!(note.starts_with("no noise floor") && note.contains("fixed"), "{note}");
    assert!(r.sites.iter().all(|s| s.noise_floor.is_none()));
    assert!(!cache.exists(), "nothing measured, nothing cached");
}

/// A policy rule sets a site's threshold exactly, floor or not; other sites keep
/// `max(least, MARGIN × floor)`, the least at bfloat16 being one unit roundoff (2⁻⁸).
#[test]
fn policy_rules_override_the_floor() {
    let g = golden("gqa_pad_f32");
    let cand = ascend(&g, Precision::Bf16, vec![]);
    let policy: Policy =
        serde_json::from_str(r#"{"rules":[{"site":"lm_head","max_rel_l2":1e-9}]}"#).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let opts = Options { floor: Floor::Cache(&cache), diagnose: false, ..Options::new(&policy) };
    let r = pipeline::check(&g, &cand, None, &opts).unwrap();
    let lm: Vec<_> = r.sites.iter().filter(|s| s.site.to_string() == "lm_head").collect();
    assert!(!lm.is_empty(), "no lm_head site to hold to the rule");
    assert!(lm.iter().all(|s| s.tolerance.unwrap().max_rel_l2 == 1e-9 && s.status == Status::Fail));
    let mut floored = 0;
    for s in r.sites.iter().filter(|s| s.site.to_string() != "lm_head") {
        if let (Some(t), Some(f)) = (s.tolerance, s.noise_floor) {
            let least = 2f64.powi(-8);
            assert_eq!(t.max_rel_l2, least.max(MARGIN * f.rel_l2), "{} {}", s.step, s.site);
            floored += 1;
        }
    }
    // Without a measured floor the loop above checks nothing; that must not pass.
    assert!(floored > 0, "no site outside the rule has a noise floor: nothing was checked");
}

/// Regression (issue 18: a correct bfloat16 run failed at a too-tight threshold and the
/// diagnosis named `mask.padding_ignored` with score 1.00 on a golden without padding):
/// a candidate that a correct run reproduces is within the floor, and no fault is named.
#[test]
fn the_diagnosis_names_no_fault_for_a_candidate_within_the_floor() {
    let g = golden("mha_f32");
    assert!(!g.manifest.scenario.has_padding());
    let cand = ascend(&g, Precision::Bf16, vec![]);
    // Tight enough that this correct run fails.
    let policy: Policy =
        serde_json::from_str(r#"{"defaults":{"bfloat16":{"max_rel_l2":1e-3}}}"#).unwrap();
    let cmp = compare(&g, &cand, &policy).unwrap();
    assert_eq!(cmp.verdict(), Verdict::Fail);
    let d = diagnose(&g, &cand, &cmp, &RunContext::new()).unwrap();
    assert!(d.findings.is_empty(), "{:?}", d.findings);
    assert!(d.notes.iter().any(|n| n.starts_with("no fault named")), "{:?}", d.notes);
}

/// A fault with no effect on the scenario (padding faults without padding) is never a
/// finding, even next to a real fault.
#[test]
fn the_diagnosis_never_accepts_a_fault_that_changes_nothing_here() {
    use llama_parity::contract::fault::Fault;
    let g = golden("mha_f32");
    let cand = ascend(&g, Precision::Bf16, vec![Fault::RopePosReset]);
    let cmp = compare(&g, &cand, &Policy::default()).unwrap();
    let d = diagnose(&g, &cand, &cmp, &RunContext::new()).unwrap();
    assert_eq!(d.findings.first().map(|f| f.fault.as_str()), Some("rope.pos_reset"));
    assert!(d.findings.iter().all(|f| f.fault != "mask.padding_ignored"), "{:?}", d.findings);
}

/// The CLI: `noise_floor` per value site in report.json, the "x floor" column in
/// summary.md, the terminal and report.html, the band in the chart; a cache reused;
/// `--no-floor`; a bad `--floor-cache` is a usage error naming the flag.
#[test]
fn reports_show_the_floor_and_the_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_parity"))
            .current_dir(root())
            .args(["run", "golden/gqa_pad_f32", "--impl", "ascend", "--dtype", "bfloat16"])
            .args(extra)
            .output()
            .expect("run parity")
    };
    let o = run(&["--floor-cache", cache.to_str().unwrap(), "--report", out.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("x floor"), "{stdout}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("measuring the noise floor"));
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let sites = rep["sites"].as_array().unwrap();
    let with_floor = sites.iter().filter(|s| s["noise_floor"]["rel_l2"].is_number()).count();
    let values = sites.iter().filter(|s| s["metrics"]["kind"] == "values").count();
    assert_eq!(with_floor, values, "every value site carries its floor");
    assert!(rep["noise_floor_note"].as_str().unwrap().contains("noise floor"));
    assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("x floor"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("x floor") && html.contains("noise floor"));
    // Second run: from the cache.
    let o = run(&["--floor-cache", cache.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("from the cache"));
    // --no-floor: no floor column, no measurement.
    let o = run(&["--no-floor"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("x floor"));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("noise floor"));
    // A file is not a cache directory; the golden is not a place for one.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    for bad in [file.to_str().unwrap(), "golden/gqa_pad_f32/cache"] {
        let o = run(&["--floor-cache", bad]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--floor-cache"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// The floor over every variant run at `p`, each run in full: the worst rel-L2 and
/// cosine of each value site, as the floor's documentation defines it.
fn floor_of_every_variant(
    g: &Dump,
    p: Precision,
) -> std::collections::BTreeMap<String, llama_parity::compare::floor::SiteFloor> {
    use llama_parity::compare::floor::{run_variant, variants_run, SiteFloor};
    let mut sites = std::collections::BTreeMap::new();
    for k in variants_run(p, false) {
        let run = run_variant(g, p, k, &RunContext::new()).expect("variant");
        let cmp = compare(g, &run, &Policy::default()).expect("compare");
        for s in &cmp.sites {
            let Some(SiteMetrics::Values(m)) = &s.metrics else { continue };
            let e = sites
                .entry(llama_parity::contract::site::key(s.step, &s.site))
                .or_insert(SiteFloor { rel_l2: 0.0, cosine: 1.0 });
            if m.rel_l2 > e.rel_l2 {
                e.rel_l2 = m.rel_l2;
            }
            if m.cosine < e.cosine {
                e.cosine = m.cosine;
            }
        }
    }
    sites
}

/// At float32 the floor runs the reference and the port with MindFormers' conventions,
/// which sums its projections in float32: the third variant rounds every value where
/// that port rounds and differs from it only in its exact sums, so it is not run. The
/// two ports do differ there (the float32 sums are the port's), at bfloat16 and float16
/// all three run, and the floor measured is the floor of the variants run in full.
#[test]
fn at_float32_the_floor_runs_the_float32_summing_port_and_leaves_out_the_exact_one() {
    use llama_parity::compare::floor::{run_variant, variants_run};
    let g = golden("gqa_pad_f32");
    let ctx = RunContext::new();
    assert_eq!(variants_run(Precision::F32, false), vec![0, 1]);
    for p in [Precision::Bf16, Precision::F16] {
        assert_eq!(variants_run(p, false), vec![0, 1, 2], "{p}");
    }
    assert_eq!(variants_run(Precision::F32, true), vec![0, 1]);
    let one = run_variant(&g, Precision::F32, 1, &ctx).unwrap();
    let two = run_variant(&g, Precision::F32, 2, &ctx).unwrap();
    let cmp = compare(&one, &two, &Policy::default()).unwrap();
    let (mut projections, mut differ) = (0, 0);
    for s in &cmp.sites {
        if let (Some(SiteMetrics::Values(m)), Site::Layer(_, LayerPart::QProj | LayerPart::Mlp)) =
            (&s.metrics, &s.site)
        {
            projections += 1;
            differ += usize::from(m.max_abs > 0.0);
        }
    }
    assert!(projections > 10 && differ * 2 > projections, "{differ} of {projections} differ");
    let f = measure(&g, Precision::F32);
    assert_eq!(f.variants.len(), 2);
    assert_eq!(f.sites, floor_of_every_variant(&g, Precision::F32));
}

/// A first `parity run --impl reference` takes its own run as the floor's first variant
/// and the run the reproduction check judges: the floor it caches is the floor of every
/// variant run in full, and the one `parity compare` measures on its own.
#[test]
fn a_first_reference_run_caches_the_floor_every_variant_run_in_full_gives() {
    for (name, p) in [("gqa_pad_f32", Precision::F32), ("gqa_pad_bf16", Precision::Bf16)] {
        let g = golden(name);
        let tmp = tempfile::tempdir().unwrap();
        let (run_cache, cmp_cache) = (tmp.path().join("run"), tmp.path().join("compare"));
        let dir = root().join("golden").join(name);
        let dir = dir.to_str().unwrap();
        let parity = |cache: &Path, args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_parity"))
                .env("PARITY_FLOOR_CACHE", cache)
                .args(args)
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        parity(&run_cache, &["run", dir, "--impl", "reference", "-q", "--no-diagnosis"]);
        parity(&cmp_cache, &["compare", dir, dir, "-q", "--no-diagnosis"]);
        let read = |cache: &Path| {
            let files: Vec<_> =
                std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()).collect();
            assert_eq!(files.len(), 1, "{files:?}");
            let text = std::fs::read_to_string(&files[0]).unwrap();
            (text.clone(), serde_json::from_str::<NoiseFloor>(&text).unwrap())
        };
        let (run_text, floor) = read(&run_cache);
        assert_eq!(floor.precision, p.name());
        assert_eq!(floor.sites, floor_of_every_variant(&g, p), "{name}");
        assert_eq!(
            run_text,
            read(&cmp_cache).0,
            "{name}: the run's floor file and compare's differ"
        );
    }
}
