//! `summary.md`: a short Markdown summary for CI step summaries (`$GITHUB_STEP_SUMMARY`)
//! and pull-request comments: the verdict, the first divergence, the diagnosis, the
//! worst sites and the counts. Plain status words, no emoji.

use std::fmt::Write;

use compare::{SiteMetrics, Status, Verdict};

use super::baseline::growth_text;
use super::{excess, metrics_line, sci, Report, Summary};

/// Escapes text for a Markdown table cell or inline text: backslash-escapes the
/// characters Markdown gives meaning to, and turns newlines into spaces.
pub fn escape_md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' => {
                out.push('\\');
                out.push(ch);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Renders `summary.md`.
pub fn render_markdown(r: &Report) -> String {
    let mut out = String::new();
    let word = match r.verdict {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
    };
    let _ = writeln!(out, "## Parity: **{word}**\n");
    let _ = writeln!(
        out,
        "`{}` against golden `{}`, scenario `{}`, dtypes golden {} / candidate {}{}.\n",
        r.candidate.replace('`', "'"),
        r.golden.replace('`', "'"),
        r.scenario.replace('`', "'"),
        escape_md(&r.golden_dtype),
        escape_md(&r.candidate_dtype),
        if r.teacher_forced { ", teacher forced" } else { "" }
    );
    if let Some(a) = &r.adapter {
        let _ = writeln!(out, "Adapter: {}.\n", escape_md(&a.line()));
    }
    if let Some(t) = &r.train {
        let _ = writeln!(out, "Training step: {}.\n", escape_md(&t.line()));
        let worst = t.worst_param_grads(3);
        if worst.iter().any(|p| p.status == Status::Fail) {
            let rows: Vec<String> = worst
                .iter()
                .filter(|p| p.status == Status::Fail)
                .map(|p| {
                    format!(
                        "`{}` rel-L2 {}, norm ratio {}",
                        p.name.replace('`', "'"),
                        super::train::opt(p.rel_l2),
                        super::train::opt(p.norm_ratio)
                    )
                })
                .collect();
            let _ = writeln!(out, "Worst parameter gradients: {}.\n", rows.join("; "));
        }
    }
    let s = &r.summary;
    let _ = writeln!(out, "Sites: {}.\n", s.counts());
    if s.nothing_checked() {
        let _ = writeln!(out, "**{}.**\n", Summary::NOTHING_CHECKED);
    }
    if let Some((_, line)) = r.statistics_only() {
        let mut line = escape_md(&line);
        line[..1].make_ascii_uppercase();
        let _ = writeln!(out, "{line}.\n");
    }
    match &r.first_divergence {
        Some(fd) => {
            let _ = writeln!(
                out,
                "**First divergence:** `{}` `{}`",
                fd.step,
                fd.site.to_string().replace('`', "'")
            );
            if let Some(m) = &fd.metrics {
                let _ = writeln!(out, "({}).", escape_md(&metrics_line(m)));
            }
            if let Some(n) = &fd.note {
                let _ = writeln!(out, "{}.", escape_md(n));
            }
            if let Some(k) = &fd.reassembly {
                let _ = writeln!(out, "Its ranks: {}.", escape_md(k));
            }
            let _ = writeln!(out);
        }
        None if r.verdict == Verdict::Pass => {
            let _ = writeln!(out, "Every checked site is within tolerance.\n");
        }
        None => {}
    }
    if !r.diagnosis.is_empty() {
        let _ = writeln!(out, "**Diagnosis** (best first):\n");
        for f in &r.diagnosis {
            let _ = writeln!(
                out,
                "- `{}` (score {:.2}): {}",
                f.label().replace('`', "'"),
                f.score,
                escape_md(&f.explains)
            );
        }
        let _ = writeln!(out);
    } else if r.verdict == Verdict::Fail && s.fail > 0 {
        let _ = writeln!(out, "**Diagnosis:** {}.\n", escape_md(&r.empty_diagnosis_text()));
    }
    if let Some(b) = &r.baseline {
        let _ = writeln!(
            out,
            "**Baseline:** `{}`: {} sites compared, {} regressed (allowed growth x{}).\n",
            b.report.replace('`', "'"),
            b.compared,
            b.regressions.len(),
            b.max_regression
        );
        for g in &b.regressions {
            let _ = writeln!(
                out,
                "- **regression** `{}` `{}`: {}",
                g.step,
                g.site.to_string().replace('`', "'"),
                escape_md(&g.why)
            );
        }
        if !b.regressions.is_empty() {
            let _ = writeln!(out);
        }
    }
    let based = r.baseline.is_some();
    let mut worst = r.worst(10);
    // Regressed sites are listed even when they are far inside their tolerance.
    for e in r.sites.iter().filter(|e| e.regression.is_some()) {
        if !worst.iter().any(|w| w.step == e.step && w.site == e.site) {
            worst.push(e);
        }
    }
    if !worst.is_empty() {
        if based {
            let _ = writeln!(
                out,
                "| status | step | site | rel_l2 | cosine | x tolerance | x floor | baseline rel_l2 | x baseline |"
            );
            let _ = writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|---:|");
        } else {
            let _ =
                writeln!(out, "| status | step | site | rel_l2 | cosine | x tolerance | x floor |");
            let _ = writeln!(out, "|---|---|---|---:|---:|---:|---:|");
        }
        for e in worst {
            let status = if e.status == Status::Fail {
                "**fail**"
            } else if e.regression.is_some() {
                "**regressed**"
            } else {
                "pass"
            };
            let (rel, cos) = match &e.metrics {
                Some(SiteMetrics::Values(m)) => (sci(m.rel_l2), format!("{:.6}", m.cosine)),
                Some(m) => (sci(m.error()), "-".to_string()),
                None => ("-".into(), "-".into()),
            };
            let base = if based {
                let then = e.baseline.as_ref().map_or_else(|| "-".to_string(), |m| sci(m.error()));
                let g = e.baseline_growth.map_or_else(|| "-".to_string(), growth_text);
                let g = if e.regression.is_some() { format!("**{g}**") } else { g };
                format!(" {then} | {g} |")
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {status} | {} | {} | {rel} | {cos} | {} | {} |{base}",
                escape_md(&e.step.to_string()),
                escape_md(&e.site.to_string()),
                format_excess(excess(e)),
                e.times_floor().map_or_else(|| "-".to_string(), format_excess)
            );
        }
        let _ = writeln!(out);
    }
    if let Some(n) = &r.noise_floor_note {
        let _ = writeln!(out, "Thresholds: {}.\n", escape_md(n));
    }
    if let Some(p) = &r.policy {
        let _ = writeln!(
            out,
            "Policy `{}`: its thresholds override the defaults where its rules match.\n",
            p.file.replace('`', "'")
        );
        let warnings = p.warnings.iter().map(|w| format!("warning: {w}"));
        for line in p.lines().into_iter().chain(warnings) {
            let _ = writeln!(out, "- {}", escape_md(&line));
        }
        let _ = writeln!(out);
    }
    if let Some(n) = r.reassembly_summary() {
        let _ = writeln!(out, "Ranks: {}.\n", escape_md(&n));
    }
    let _ = writeln!(out, "Full report: `report.html`; every site: `report.json`, `junit.xml`.");
    out
}

fn format_excess(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "inf".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_md_neutralises_table_and_emphasis_characters() {
        assert_eq!(escape_md("a|b"), "a\\|b");
        assert_eq!(escape_md("x_1 *y* <z>"), "x\\_1 \\*y\\* \\<z\\>");
        assert_eq!(escape_md("two\nlines"), "two lines");
    }
}
