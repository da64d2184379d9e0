//! `junit.xml`: one `<testcase>` per step and site, in the JUnit shape that GitLab,
//! Jenkins and GitHub test reporters read.
//!
//! `classname` is the step, `name` the site. A failing site carries
//! `<failure type="divergence">` with its measures; a missing or skipped site carries
//! `<skipped/>`. The `<testsuite>` counts tests, failures and skipped; `time` is 0 so
//! that the file does not change between identical runs.

use std::fmt::Write;

use compare::Status;

use super::baseline::growth_text;
use super::{escape_xml, metrics_line, shape, Report, SiteEntry};

/// Renders `junit.xml`.
pub fn render_junit(r: &Report) -> String {
    let tests = r.sites.len();
    let failures =
        r.sites.iter().filter(|s| s.status == Status::Fail || s.regression.is_some()).count();
    let skipped = r
        .sites
        .iter()
        .filter(|s| matches!(s.status, Status::Missing | Status::Skipped) && s.regression.is_none())
        .count();
    let suite = format!("parity {} vs {} ({})", r.candidate, r.golden, r.scenario);
    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        out,
        r#"<testsuites name="llama-parity" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}" time="0">"#
    );
    let _ = writeln!(
        out,
        r#"  <testsuite name="{}" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}" time="0">"#,
        escape_xml(&suite)
    );
    let _ = writeln!(out, "    <properties>");
    for (k, v) in [
        ("verdict", format!("{:?}", r.verdict).to_lowercase()),
        ("scenario", r.scenario.clone()),
        ("golden", r.golden.clone()),
        ("candidate", r.candidate.clone()),
        ("golden_dtype", r.golden_dtype.clone()),
        ("candidate_dtype", r.candidate_dtype.clone()),
        (
            "first_divergence",
            r.first_divergence
                .as_ref()
                .map_or_else(|| "none".to_string(), |fd| format!("{} {}", fd.step, fd.site)),
        ),
        (
            "diagnosis",
            r.diagnosis
                .first()
                .map_or_else(|| "none".to_string(), |f| format!("{} ({:.2})", f.label(), f.score)),
        ),
    ]
    .into_iter()
    .chain(r.baseline.iter().flat_map(|b| {
        [
            ("baseline", b.report.clone()),
            ("regressions", b.regressions.len().to_string()),
            ("max_regression", b.max_regression.to_string()),
        ]
    }))
    .chain(r.train.iter().flat_map(|t| {
        [
            ("train_loss", t.loss.line()),
            ("train_grad_norm", t.grad_norm.line()),
            (
                "train_skipped",
                format!("golden {:?}, candidate {:?}", t.skipped.golden, t.skipped.candidate),
            ),
        ]
    })) {
        let _ = writeln!(out, r#"      <property name="{k}" value="{}"/>"#, escape_xml(&v));
    }
    let _ = writeln!(out, "    </properties>");
    for e in &r.sites {
        testcase(&mut out, r, e);
    }
    let _ = writeln!(out, "  </testsuite>");
    let _ = writeln!(out, "</testsuites>");
    out
}

fn testcase(out: &mut String, r: &Report, e: &SiteEntry) {
    let head = format!(
        r#"    <testcase classname="{}" name="{}" time="0""#,
        escape_xml(&e.step),
        escape_xml(&e.site)
    );
    // Under --baseline: the delta, on every site the baseline has.
    let delta = e.baseline.as_ref().map(|then| {
        format!(
            "baseline ({}): {}; now: {}; growth x{}",
            e.baseline_status.map_or_else(|| "-".to_string(), |s| format!("{s:?}").to_lowercase()),
            metrics_line(then),
            e.metrics.as_ref().map_or_else(|| "-".to_string(), metrics_line),
            e.baseline_growth.map_or_else(|| "-".to_string(), growth_text)
        )
    });
    if let (Some(why), false) = (&e.regression, e.status == Status::Fail) {
        let _ = writeln!(out, "{head}>");
        let _ = writeln!(
            out,
            r#"      <failure message="{}" type="regression">{}</failure>"#,
            escape_xml(&format!("regressed against the baseline: {why}")),
            escape_xml(delta.as_deref().unwrap_or_default())
        );
        let _ = writeln!(out, "    </testcase>");
        return;
    }
    let system_out = delta
        .as_ref()
        .map(|d| format!("      <system-out>{}</system-out>\n", escape_xml(d)))
        .unwrap_or_default();
    match e.status {
        Status::Pass if system_out.is_empty() => {
            let _ = writeln!(out, "{head}/>");
        }
        Status::Pass => {
            let _ = write!(out, "{head}>\n{system_out}    </testcase>\n");
        }
        Status::Missing | Status::Skipped => {
            let why = e.note.clone().unwrap_or_else(|| format!("{:?}", e.status).to_lowercase());
            let _ = writeln!(out, "{head}>");
            let _ = writeln!(out, r#"      <skipped message="{}"/>"#, escape_xml(&why));
            let _ = writeln!(out, "{system_out}    </testcase>");
        }
        Status::Fail => {
            let message = e.note.clone().unwrap_or_else(|| "diverges from the golden".into());
            let mut body = String::new();
            if let Some(m) = &e.metrics {
                let _ = writeln!(body, "{}", metrics_line(m));
            }
            if let Some(t) = &e.tolerance {
                let _ = writeln!(
                    body,
                    "tolerance: max_rel_l2 {:e}, min_cosine {}",
                    t.max_rel_l2, t.min_cosine
                );
            }
            let _ = writeln!(
                body,
                "golden {} {}, candidate {} {}",
                shape(&e.golden_shape),
                e.golden_dtype,
                e.candidate_shape.as_deref().map_or_else(|| "-".into(), shape),
                e.candidate_dtype.map_or_else(|| "-".to_string(), |d| d.to_string())
            );
            if r.first_divergence.as_ref().is_some_and(|fd| fd.step == e.step && fd.site == e.site)
            {
                let _ = writeln!(body, "this is the first divergence in compute order");
                for f in &r.diagnosis {
                    let _ = writeln!(
                        body,
                        "diagnosis: {} (score {:.2}): {}",
                        f.label(),
                        f.score,
                        f.explains
                    );
                }
            }
            if let Some(why) = &e.regression {
                let _ = writeln!(body, "regressed against the baseline: {why}");
            }
            let _ = writeln!(out, "{head}>");
            let _ = writeln!(
                out,
                r#"      <failure message="{}" type="divergence">{}</failure>"#,
                escape_xml(&message),
                escape_xml(body.trim_end())
            );
            let _ = writeln!(out, "{system_out}    </testcase>");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_xml_covers_markup_quotes_and_controls() {
        assert_eq!(escape_xml(r#"a<b>&"c" 'd'"#), "a&lt;b&gt;&amp;&quot;c&quot; &apos;d&apos;");
        assert_eq!(escape_xml("x\u{1}y\tz\n"), "x?y\tz\n");
        assert_eq!(escape_xml("model.layers.0.mlp"), "model.layers.0.mlp");
    }
}
