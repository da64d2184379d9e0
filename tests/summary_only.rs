//! Statistics first (`--summary-only`, `--full PATTERN`): a correct run passes with its
//! value sites judged on statistics alone and marked so, except the sites forced to a
//! full comparison; faulty candidates fail at the same first site as in a full
//! comparison; bad patterns and flag combinations exit 2 naming the flag.

use std::process::{Command, Output};

use llama_parity::compare::statistics::{SummaryOnly, STATISTICS_ONLY};
use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{SiteMetrics, Status};
use llama_parity::dump::Dump;
use llama_parity::pipeline::{self, Floor, Options};
use llama_parity::report::{excess, render_markdown, Report, SiteEntry};

use crate::helpers::root;

fn parity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run parity")
}

fn statistics_only(e: &SiteEntry) -> bool {
    e.note.as_deref().is_some_and(|n| n.starts_with(STATISTICS_ONLY))
}

fn is_value_site(e: &SiteEntry) -> bool {
    matches!(e.metrics, Some(SiteMetrics::Values(_)))
}

/// HF's own bfloat16 run against the float32 golden, with the MLP output of the last
/// layer forced to a full comparison at every decode step.
#[test]
fn a_correct_run_passes_with_sites_marked_statistics_only_but_the_forced_ones() {
    let out = tempfile::tempdir().expect("tempdir");
    let report = out.path().join("r");
    let o = parity(&[
        "compare",
        "golden/gqa_pad_f32",
        "golden/gqa_pad_bf16",
        "--no-floor",
        "--summary-only",
        "--full",
        "decode.*/model.layers.1.mlp",
        "--report",
        &report.to_string_lossy(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("judged on statistics alone"), "{stdout}");
    let text = std::fs::read_to_string(report.join("report.json")).expect("report.json");
    let r: Report = serde_json::from_str(&text).expect("parses");
    let forced = |e: &SiteEntry| {
        e.step.to_string().starts_with("decode.") && e.site.to_string() == "model.layers.1.mlp"
    };
    let (mut marked, mut forced_seen) = (0, 0);
    for e in r.sites.iter().filter(|e| is_value_site(e)) {
        assert_eq!(e.status, Status::Pass, "{} {}", e.step, e.site);
        if forced(e) {
            forced_seen += 1;
            assert!(!statistics_only(e), "forced site marked: {} {} {:?}", e.step, e.site, e.note);
            assert!(e.per_token.is_some(), "a full comparison measures per token");
        } else {
            marked += 1;
            assert!(statistics_only(e), "{} {} {:?}", e.step, e.site, e.note);
            assert!(e.per_token.is_none() && e.per_head.is_none());
        }
    }
    assert!(forced_seen >= 1 && marked > 100, "forced {forced_seen}, marked {marked}");
    let md = std::fs::read_to_string(report.join("summary.md")).expect("summary.md");
    assert!(md.contains(&format!("Judged on statistics alone: {marked} of")), "{md}");
    let html = std::fs::read_to_string(report.join("report.html")).expect("report.html");
    assert!(html.contains("statistics only"), "the HTML says which sites");
}

fn first_site(golden: &Dump, candidate: &Dump, summary: Option<&SummaryOnly>) -> String {
    let policy = Policy::default();
    let opts = Options {
        diagnose: false,
        floor: Floor::Off,
        summary_only: summary,
        ..Options::new(&policy)
    };
    let r = pipeline::check(golden, candidate, None, &opts).expect("check");
    let fd = r.first_divergence.expect("a divergence");
    assert!(!statistics_only(&fd), "a failing site is never judged on statistics alone");
    format!("{} {}", fd.step, fd.site)
}

/// Every HF-made faulty candidate that diverges at a value site (the ones that
/// diverge at positions or the mask, always compared in full, too).
#[test]
fn a_faulty_candidate_fails_at_the_same_first_site() {
    let dir = root().join("fixtures/candidates");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("candidates")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    let summary = SummaryOnly::default();
    for name in names {
        let golden_name = name.split("__").next().expect("golden name");
        let golden = Dump::open(&root().join("golden").join(golden_name)).expect("golden");
        let candidate = Dump::open(&dir.join(&name)).expect("candidate");
        assert_eq!(
            first_site(&golden, &candidate, Some(&summary)),
            first_site(&golden, &candidate, None),
            "{name}"
        );
    }
    // And through the binary, with its exit status.
    let o = parity(&[
        "compare",
        "golden/gqa_pad_f32",
        "fixtures/candidates/gqa_pad_f32__rope_interleaved",
        "--no-floor",
        "--summary-only",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("first divergence: prefill model.layers.0.self_attn.q_rope"),
        "{stdout}"
    );
}

/// The "x tol" of a site judged on statistics alone is what was judged: its rel-L2 (and
/// max_abs, where the policy sets one) lower bound over the threshold, never the NaN of
/// the cosine statistics cannot measure. Regression: the report judged the stored
/// metrics again, NaN cosine included, so every such site showed `inf` and ranked above
/// the sites that really fail.
#[test]
fn a_site_judged_on_statistics_alone_is_ranked_by_the_bounds_it_was_judged_on() {
    let golden = Dump::open(&root().join("golden/gqa_pad_f32")).expect("golden");
    let policy = Policy::default();
    let summary = SummaryOnly::default();
    let opts = Options {
        diagnose: false,
        floor: Floor::Off,
        summary_only: Some(&summary),
        ..Options::new(&policy)
    };
    for (candidate, fails) in [
        ("golden/gqa_pad_bf16", false),
        ("fixtures/candidates/gqa_pad_f32__rope_interleaved", true),
    ] {
        let cand = Dump::open(&root().join(candidate)).expect("candidate");
        let r = pipeline::check(&golden, &cand, None, &opts).expect("check");
        assert_eq!(r.summary.fail > 0, fails, "{candidate}");
        let mut marked = 0;
        for e in r.sites.iter().filter(|e| statistics_only(e) && e.status == Status::Pass) {
            let (Some(SiteMetrics::Values(m)), Some(t)) = (&e.metrics, &e.tolerance) else {
                panic!("{candidate} {} {}: a value site with its tolerance", e.step, e.site)
            };
            assert!(m.cosine.is_nan(), "statistics cannot measure the cosine");
            let want = t
                .max_abs
                .map_or(m.rel_l2 / t.max_rel_l2, |a| (m.rel_l2 / t.max_rel_l2).max(m.max_abs / a));
            assert_eq!(excess(e), want, "{candidate} {} {}", e.step, e.site);
            assert!(want <= 0.1, "passed on statistics: within a tenth of the tolerance");
            marked += 1;
        }
        assert!(marked > 20, "{candidate}: {marked} sites judged on statistics alone");
        // Worst first: every failing site before any site passed on statistics alone.
        let worst = r.worst(r.sites.len());
        let first_marked = worst.iter().position(|e| statistics_only(e)).expect("marked");
        let last_fail = worst.iter().rposition(|e| e.status == Status::Fail);
        assert!(last_fail.is_none_or(|f| f < first_marked), "{candidate}: {last_fail:?}");
        // No "inf" in the summary's table for a site that passed.
        let md = render_markdown(&r);
        for row in md.lines().filter(|l| l.starts_with("| pass |")) {
            assert!(!row.contains("| inf |"), "{candidate}: {row}");
        }
        if !fails {
            assert!(md.lines().any(|l| l.starts_with("| pass |")), "{md}");
        }
    }
}

#[test]
fn run_takes_summary_only_too() {
    let o = parity(&[
        "run",
        "golden/gqa_pad_f32",
        "--impl",
        "reference",
        "--no-floor",
        "--summary-only",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("judged on statistics alone"));
}

#[test]
fn bad_patterns_and_flag_combinations_exit_2_naming_the_flag() {
    let base = ["compare", "golden/gqa_pad_f32", "golden/gqa_pad_bf16", "--no-floor"];
    for (extra, flag) in [
        (vec!["--summary-only", "--full", "model.layers.9.*"], "--full"),
        (vec!["--summary-only", "--full", ""], "--full"),
        (vec!["--full", "lm_head"], "--summary-only"),
        (vec!["--summary-only", "--baseline", "reports/baselines/none.json"], "--baseline"),
    ] {
        let o = parity(&[&base[..], &extra[..]].concat());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
}
