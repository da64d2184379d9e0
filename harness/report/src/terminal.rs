//! The compact terminal summary: verdict, first divergence, diagnosis, then the worst
//! sites. Colour only when asked (a terminal without NO_COLOR).

use std::fmt::Write;

use compare::{SiteMetrics, Status, Verdict};

use super::baseline::growth_text;
use super::{excess, Report, SiteEntry, Summary};

/// Renders the summary; `color` adds ANSI colours.
pub fn render_summary(r: &Report, color: bool) -> String {
    let paint =
        |code: &str, s: &str| if color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() };
    let mut out = String::new();
    let verdict = match r.verdict {
        Verdict::Pass => paint("1;32", "PASS"),
        Verdict::Fail => paint("1;31", "FAIL"),
    };
    let _ = writeln!(
        out,
        "{verdict}  {} vs {}  (scenario {}, golden {}, candidate {})",
        r.candidate, r.golden, r.scenario, r.golden_dtype, r.candidate_dtype
    );
    if let Some(t) = &r.train {
        let _ = writeln!(out, "training step: {}", t.line());
    }
    let s = &r.summary;
    let _ = writeln!(out, "sites: {}", s.counts());
    if s.nothing_checked() {
        let _ = writeln!(out, "{}", Summary::NOTHING_CHECKED);
    }
    if let Some((_, line)) = r.statistics_only() {
        let _ = writeln!(out, "{line}");
    }
    if let Some(fd) = &r.first_divergence {
        let _ = writeln!(
            out,
            "first divergence: {} {}  {}",
            fd.step,
            paint("1", &fd.site.to_string()),
            describe(fd)
        );
    }
    if let Some(n) = r.noise_floor_note.as_deref().filter(|n| n.starts_with("no noise floor")) {
        let _ = writeln!(out, "{n}");
    }
    if !r.diagnosis.is_empty() {
        let _ = writeln!(out, "diagnosis:");
        for f in &r.diagnosis {
            let _ = writeln!(
                out,
                "  {:<28} score {:.2}  {}",
                paint("1;33", &f.label()),
                f.score,
                f.explains
            );
        }
    } else if r.verdict == Verdict::Fail && s.fail > 0 {
        let _ = writeln!(out, "diagnosis: {}", r.empty_diagnosis_text());
    }
    if let Some(b) = &r.baseline {
        let _ = writeln!(
            out,
            "baseline: {}: {} sites compared, {} regressed (allowed growth x{})",
            b.report,
            b.compared,
            b.regressions.len(),
            b.max_regression
        );
        for g in &b.regressions {
            let _ =
                writeln!(out, "  {} {} {}  {}", paint("1;31", "regression"), g.step, g.site, g.why);
        }
    }
    let mut worst = r.worst(8);
    // Regressed sites are listed even when they are far inside their tolerance.
    for e in r.sites.iter().filter(|e| e.regression.is_some()) {
        if !worst.iter().any(|w| w.step == e.step && w.site == e.site) {
            worst.push(e);
        }
    }
    if !worst.is_empty() {
        let local_col = if r.teacher_forced { format!(" {:>11}", "local") } else { String::new() };
        let floored = r.sites.iter().any(|e| e.noise_floor.is_some());
        let floor_col = if floored { format!(" {:>8}", "x floor") } else { String::new() };
        let base_col =
            if r.baseline.is_some() { format!(" {:>10}", "x base") } else { String::new() };
        let _ = writeln!(
            out,
            "\n{:<8} {:<10} {:<46} {:>11} {:>10} {:>8}{floor_col}{local_col}{base_col}",
            "status", "step", "site", "rel_l2", "cosine", "x tol"
        );
        for e in worst {
            let st = match e.status {
                Status::Fail => paint("31", "fail    "),
                _ if e.regression.is_some() => paint("31", "regress "),
                _ => "pass    ".to_string(),
            };
            let (rel, cos) = match &e.metrics {
                Some(SiteMetrics::Values(m)) => {
                    (format!("{:.3e}", m.rel_l2), format!("{:.6}", m.cosine))
                }
                Some(m) => (format!("{:.3e}", m.error()), "-".to_string()),
                None => ("-".into(), "-".into()),
            };
            // Under teacher forcing: the error this site adds from the golden's input.
            let local = match (&e.local_metrics, r.teacher_forced) {
                (Some(m), true) => format!(" {:>11.3e}", m.error()),
                (None, true) => format!(" {:>11}", "-"),
                _ => String::new(),
            };
            // The error in floors: how far above what correct runs reach here.
            let xf = match (floored, e.times_floor()) {
                (true, Some(x)) if x.is_finite() => format!(" {x:>8.2}"),
                (true, Some(_)) => format!(" {:>8}", "inf"),
                (true, None) => format!(" {:>8}", "-"),
                _ => String::new(),
            };
            // Under --baseline: error now / max(error in the baseline, noise).
            let base = match (r.baseline.is_some(), e.baseline_growth) {
                (true, Some(g)) => format!(" {:>10}", growth_text(g)),
                (true, None) => format!(" {:>10}", "-"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{st} {:<10} {:<46} {:>11} {:>10} {:>8.2}{xf}{local}{base}",
                e.step,
                e.site,
                rel,
                cos,
                excess(e)
            );
        }
    }
    out
}

fn describe(e: &SiteEntry) -> String {
    match (&e.metrics, &e.note) {
        (_, Some(n)) => n.clone(),
        (Some(m), None) => format!("error {:.3e}", m.error()),
        _ => String::new(),
    }
}
