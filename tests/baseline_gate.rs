//! The regression gate (`--baseline REPORT`, `--max-regression F`): a candidate whose
//! error doubles at one site, still inside tolerance, passes the tolerance gate but
//! fails against the accepted baseline, which names that site; an accepted candidate
//! passes against its own baseline; bad baselines exit 2 naming the file or flag.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use crate::helpers::synthetic;

use llama_parity::contract::site::Site;
use llama_parity::dump::{DType, Dump, Tensor};
use llama_parity::report::Report;

/// The site whose error the second candidate doubles (and a half).
const STEP: &str = "decode.0";
const SITE: &str = "model.layers.1.mlp";

fn unit(i: usize, salt: u64) -> f64 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// The golden with every float site off by a relative `rel` (about rel-L2 `rel/√3`,
/// far inside float32's 1e-4 and far above its noise of 1e-6), and `SITE` at `STEP`
/// off by `rel * site_factor`. Positions and the mask are copied.
fn candidate(golden: &Dump, rel: f64, site_factor: f64) -> Dump {
    let mut tensors = BTreeMap::new();
    for &step in &golden.manifest.steps {
        for site in golden.sites(step) {
            let g = golden.get(step, site).expect("get").expect("tensor");
            let key = format!("{step}/{site}");
            let is_value = g.dtype().is_float() && !site.is_mask() && *site != Site::PositionIds;
            if !is_value {
                tensors.insert(key, g);
                continue;
            }
            let r = if step.to_string() == STEP && site.to_string() == SITE {
                rel * site_factor
            } else {
                rel
            };
            let v: Vec<f64> = g
                .iter_f64()
                .enumerate()
                .map(|(i, x)| x * (1.0 + r * unit(i, key.len() as u64)))
                .collect();
            tensors.insert(key, Tensor::from_f64(g.shape(), &v, DType::F32));
        }
    }
    let mut manifest = golden.manifest.clone();
    manifest.producer = serde_json::json!({"framework": "port", "version": "0", "device": "cpu"});
    Dump::in_memory(manifest, tensors).expect("candidate")
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    /// golden/, accepted/ (every site off by 1e-5) and doubled/ (one site by 2.5e-5).
    fn new() -> Case {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = synthetic::golden();
        g.write(&dir.path().join("golden")).expect("golden");
        candidate(&g, 1e-5, 1.0).write(&dir.path().join("accepted")).expect("accepted");
        candidate(&g, 1e-5, 2.5).write(&dir.path().join("doubled")).expect("doubled");
        Case { dir }
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).to_string_lossy().into_owned()
    }

    fn parity(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_parity"))
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("run parity")
    }

    /// `compare golden CAND --report out/NAME` plus `extra`.
    fn compare(&self, cand: &str, report: &str, extra: &[&str]) -> (Option<i32>, String, Report) {
        let out = self.path(&format!("out/{report}"));
        let mut args = vec!["compare", "golden", cand, "--report", out.as_str()];
        args.extend_from_slice(extra);
        let o = self.parity(&args);
        let text = std::fs::read_to_string(Path::new(&out).join("report.json")).expect("report");
        let rep: Report = serde_json::from_str(&text).expect("report.json parses");
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), rep)
    }
}

#[test]
fn a_doubled_error_inside_tolerance_fails_against_the_baseline_naming_the_site() {
    let case = Case::new();
    let (code, _, accepted) = case.compare("accepted", "accepted", &[]);
    assert_eq!(code, Some(0), "the accepted candidate passes the tolerance gate");
    assert_eq!(accepted.format, "llama-parity/report@2");
    let baseline = case.path("out/accepted/report.json");

    // Without --baseline the doubled site is still inside tolerance: the gate passes.
    let (code, _, plain) = case.compare("doubled", "plain", &[]);
    assert_eq!(code, Some(0), "inside tolerance, the plain gate passes");
    assert!(plain.baseline.is_none() && plain.sites.iter().all(|e| e.baseline.is_none()));
    let site = |r: &Report| {
        r.sites
            .iter()
            .find(|e| e.step.to_string() == STEP && e.site.to_string() == SITE)
            .cloned()
            .expect("the doubled site")
    };
    let (then, now) = (site(&accepted).error().unwrap(), site(&plain).error().unwrap());
    assert!(now > 2.0 * then && now < 1e-4, "error {then:e} -> {now:e}: doubled, inside 1e-4");

    // With it, that site and only that site regresses.
    let (code, stdout, gated) = case.compare("doubled", "gated", &["--baseline", &baseline]);
    assert_eq!(code, Some(1), "the regression fails the gate:\n{stdout}");
    let b = gated.baseline.as_ref().expect("report.json `baseline`");
    let names: Vec<String> =
        b.regressions.iter().map(|g| format!("{} {}", g.step, g.site)).collect();
    assert_eq!(names, vec![format!("{STEP} {SITE}")], "exactly the doubled site regresses");
    assert_eq!(b.compared, gated.sites.len());
    assert!(
        stdout.contains(&format!("regression {STEP} {SITE}")),
        "the terminal names it:\n{stdout}"
    );
    let e = site(&gated);
    assert!(e.regression.is_some() && e.baseline.is_some());
    let growth = e.baseline_growth.expect("growth");
    assert!(growth > 2.0 && growth < 3.0, "growth {growth}");
    // Every other value site carries its delta and stays within the factor.
    for e in gated.sites.iter().filter(|e| e.regression.is_none()) {
        assert!(e.baseline.is_some(), "{} {} has its baseline", e.step, e.site);
        assert!(e.baseline_growth.is_some_and(|g| g <= 2.0), "{} {}", e.step, e.site);
    }

    // Every report file shows the delta.
    let read =
        |f: &str| std::fs::read_to_string(Path::new(&case.path("out/gated")).join(f)).expect(f);
    let md = read("summary.md");
    assert!(md.contains("x baseline") && md.contains("**regressed**"), "{md}");
    assert!(md.contains(&format!("`{STEP}` `{SITE}`")), "{md}");
    let junit = read("junit.xml");
    assert!(junit.contains(r#"type="regression""#), "junit marks the regression");
    assert!(junit.contains("failures=\"1\""), "one failure: the regressed site");
    assert!(junit.contains("<system-out>baseline (pass)"), "junit carries the deltas");
    let html = read("report.html");
    assert!(html.contains("id=\"baseline\"") && html.contains("<th>x baseline</th>"));
    assert!(html.contains("decode.0 baseline"), "the chart has the baseline as a second line");

    // --max-regression loosens the gate: a growth of 2.5 is within 3.
    let (code, _, loose) =
        case.compare("doubled", "loose", &["--baseline", &baseline, "--max-regression", "3"]);
    assert_eq!(code, Some(0));
    assert!(loose.baseline.as_ref().is_some_and(|b| b.regressions.is_empty()));
}

#[test]
fn an_accepted_candidate_passes_against_its_own_baseline() {
    let case = Case::new();
    let (code, _, _) = case.compare("accepted", "accepted", &[]);
    assert_eq!(code, Some(0));
    let baseline = case.path("out/accepted/report.json");
    let (code, stdout, again) = case.compare("accepted", "again", &["--baseline", &baseline]);
    assert_eq!(code, Some(0), "{stdout}");
    let b = again.baseline.expect("baseline summary");
    assert!(b.regressions.is_empty() && b.compared == again.sites.len());
    assert!(again.sites.iter().filter_map(|e| e.baseline_growth).all(|g| g <= 1.0 + 1e-12));
}

#[test]
fn bad_baselines_and_factors_exit_2_naming_the_file_or_flag() {
    let case = Case::new();
    let (code, _, _) = case.compare("accepted", "accepted", &[]);
    assert_eq!(code, Some(0));
    let good = std::fs::read_to_string(case.path("out/accepted/report.json")).expect("report");
    let write = |name: &str, text: &str| {
        let p = case.path(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let other_scenario = good.replace("\"synthetic-padded\"", "\"another-scenario\"");
    let cases = [
        (write("truncated.json", &good[..good.len() / 2]), "truncated.json", "not a report.json"),
        (
            write("other.json", r#"{"format": "something/else@1"}"#),
            "other.json",
            "not a report.json",
        ),
        (write("elsewhere.json", &other_scenario), "elsewhere.json", "scenario"),
        (case.path("absent.json"), "absent.json", "No such file"),
    ];
    for (path, name, what) in &cases {
        let o = case.parity(&["compare", "golden", "doubled", "--baseline", path]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("parity: error: ") && last.contains(name), "{name}: {stderr}");
        assert!(last.contains(what), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    let good_path = case.path("out/accepted/report.json");
    for f in ["0.5", "nan", "inf"] {
        let o = case.parity(&[
            "compare",
            "golden",
            "doubled",
            "--baseline",
            &good_path,
            "--max-regression",
            f,
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--max-regression {f}: {stderr}");
        assert!(stderr.contains("--max-regression"), "{stderr}");
    }
    // The report may not overwrite the baseline it is held against.
    let o = case.parity(&[
        "compare",
        "golden",
        "doubled",
        "--baseline",
        &good_path,
        "--report",
        &case.path("out/accepted"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("would overwrite the input"));
}

#[test]
fn run_and_suite_take_a_baseline_too() {
    let case = Case::new();
    let golden = crate::helpers::root().join("golden/mha_f32");
    let golden = golden.to_string_lossy();
    let out = |n: &str| case.path(&format!("out/{n}"));
    let run = |report: &str, extra: &[&str]| {
        let mut args =
            vec!["run", &golden, "--impl", "ascend", "--dtype", "bfloat16", "--report", report];
        args.extend_from_slice(extra);
        case.parity(&args)
    };
    assert_eq!(run(&out("run1"), &[]).status.code(), Some(0));
    let base = format!("{}/report.json", out("run1"));
    let o = run(&out("run2"), &["--baseline", &base]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    let rep: Report = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/report.json", out("run2"))).unwrap(),
    )
    .unwrap();
    assert!(rep.baseline.is_some_and(|b| b.regressions.is_empty() && b.compared > 0));
    // The float16 run held against the bfloat16 baseline: its errors shrink, nothing
    // regresses; the bfloat16 run held against a float16 baseline regresses.
    let f16 = |report: &str, extra: &[&str]| {
        let mut args =
            vec!["run", &golden, "--impl", "ascend", "--dtype", "float16", "--report", report];
        args.extend_from_slice(extra);
        case.parity(&args)
    };
    assert_eq!(f16(&out("f16"), &["--baseline", &base]).status.code(), Some(0));
    let f16_base = format!("{}/report.json", out("f16"));
    assert_eq!(run(&out("run3"), &["--baseline", &f16_base]).status.code(), Some(1));

    // suite: a previous `suite --report DIR` is the baseline of the next.
    let goldens = case.dir.path().join("goldens");
    std::fs::create_dir_all(&goldens).unwrap();
    copy_dir(Path::new(golden.as_ref()), &goldens.join("mha_f32"));
    let suite = |extra: &[&str]| {
        let mut args = vec!["suite", "goldens", "--candidates", "none"];
        args.extend_from_slice(extra);
        case.parity(&args)
    };
    assert_eq!(suite(&["--report", "out/suite1"]).status.code(), Some(0));
    let o = suite(&["--report", "out/suite2", "--baseline", "out/suite1"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    let text = std::fs::read_to_string(
        case.dir.path().join("out/suite2/mha_f32/ascend_bfloat16/report.json"),
    )
    .unwrap();
    let rep: Report = serde_json::from_str(&text).unwrap();
    assert!(rep.baseline.is_some(), "each run is held against its own accepted report");
    assert_eq!(
        suite(&["--report", "out/suite1", "--baseline", "out/suite1"]).status.code(),
        Some(2)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
