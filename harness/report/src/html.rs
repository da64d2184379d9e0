//! `report.html`: one self-contained page (inline CSS and inline SVG; no script, no
//! font, image or stylesheet fetched) that reads without JavaScript, on screen and in
//! print.
//!
//! Top to bottom: the verdict, then what a reader needs at a glance (first
//! divergence, diagnosis, run facts), then the charts ([`super::charts`]), then a
//! table of every site.

use std::fmt::Write;

use compare::{SiteMetrics, Status, Verdict};
use contract::error::Result;

use super::baseline::growth_text;
use super::charts;
use super::{metrics_line, sci, shape, Report, SiteEntry};
use contract::site::{Site, Step};

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &(impl std::fmt::Display + ?Sized)) -> String {
    super::escape_xml(s)
}

const CSS: &str = r#"
:root { --pass: #1b7f3b; --fail: #c01c1c; --warn: #9a6700; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--ink); background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 0 20px 40px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size: 0.92em; }
.verdict { color: #fff; padding: 18px 20px; margin: 0 -20px 18px; display: flex; align-items: baseline; gap: 22px; flex-wrap: wrap; }
.verdict.pass { background: var(--pass); }
.verdict.fail { background: var(--fail); }
.verdict .word { font-size: 46px; font-weight: 800; letter-spacing: 2px; line-height: 1; }
.verdict .what { font-size: 16px; opacity: 0.95; }
.verdict .what b { font-weight: 700; }
.glance { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; margin-bottom: 18px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; background: #fff; }
.card.wide { grid-column: 1 / -1; }
.card h2 { font-size: 13px; text-transform: uppercase; letter-spacing: 0.06em; color: var(--muted); margin: 0 0 6px; }
.card.first { border-left: 6px solid var(--fail); }
.card.ok { border-left: 6px solid var(--pass); }
.big a { color: inherit; text-decoration: underline dotted; }
.big { font-size: 18px; font-weight: 650; word-break: break-all; }
.muted { color: var(--muted); }
ol.findings { margin: 4px 0 0; padding-left: 22px; }
ol.findings li { margin: 4px 0; }
.score { display: inline-block; min-width: 3.2em; padding: 0 6px; border-radius: 10px; background: #fff1c2; color: #5c4400; font-weight: 650; text-align: center; }
.none { color: var(--fail); font-weight: 650; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-all; }
.counts span { display: inline-block; margin-right: 12px; }
.c-pass { color: var(--pass); font-weight: 650; }
.c-fail { color: var(--fail); font-weight: 650; }
.c-missing, .c-skipped { color: var(--warn); font-weight: 650; }
h2.section { font-size: 20px; margin: 26px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
figure { margin: 0 0 22px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; break-inside: avoid; page-break-inside: avoid; }
figure h3 { margin: 0 0 4px; font-size: 16px; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; }
table.sites { border-collapse: collapse; width: 100%; font-size: 12.5px; }
table.sites th, table.sites td { border-bottom: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
table.sites th { background: var(--bg); position: sticky; top: 0; }
table.sites td.nw { white-space: nowrap; }
table.sites td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sites tr.fail td { background: #fdecec; }
table.sites tr.lora td:first-child { padding-left: 1.6em; }
table.sites tr.missing td, table.sites tr.skipped td { background: #fff8e1; }
table.sites tr.first td { outline: 2px solid var(--fail); outline-offset: -2px; }
table.sites tr.step td { background: var(--bg); font-weight: 650; }
.st { font-weight: 700; text-transform: uppercase; font-size: 11px; }
tr.pass .st { color: var(--pass); }
tr.fail .st { color: var(--fail); }
tr.missing .st, tr.skipped .st { color: var(--warn); }
footer { color: var(--muted); font-size: 12px; margin-top: 30px; }
@media (max-width: 760px) { .glance { grid-template-columns: 1fr; } }
@media print {
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  .verdict { margin: 0 0 10pt; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  .verdict .word { font-size: 30pt; }
  .card, figure { border-color: #999; }
  table.sites { font-size: 8pt; }
  table.sites th { position: static; }
  table.sites thead { display: table-header-group; }
  table.sites tr { break-inside: avoid; page-break-inside: avoid; }
  tr.fail td, tr.missing td, tr.skipped td, .score { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2.section { break-after: avoid; page-break-after: avoid; }
  a { color: inherit; text-decoration: none; }
}
"#;

/// Renders `report.html`.
pub fn render_html(r: &Report) -> Result<String> {
    let charts = charts::all(r)?;
    let mut out = String::with_capacity(64 * 1024);
    let word = verdict_word(r);
    let class = if r.verdict == Verdict::Pass { "pass" } else { "fail" };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"color-scheme\" content=\"light\">\n\
         <title>Parity {word}: {} vs {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        escape(&r.candidate),
        escape(&r.golden)
    );
    let _ = writeln!(
        out,
        "<header class=\"verdict {class}\" id=\"verdict\"><div class=\"word\">{word}</div>\
         <div class=\"what\"><b>{}</b> against golden <b>{}</b><br>scenario {} · {} golden · {} candidate</div></header>",
        escape(&r.candidate),
        escape(&r.golden),
        escape(&r.scenario),
        escape(&r.golden_dtype),
        escape(&r.candidate_dtype)
    );
    glance(&mut out, r);
    train_section(&mut out, r);
    if !charts.is_empty() {
        let _ = writeln!(out, "<h2 class=\"section\" id=\"charts\">Charts</h2>");
        for c in &charts {
            let _ = writeln!(
                out,
                "<figure id=\"fig-{id}\"><h3>{}</h3>\n{}<figcaption>{}</figcaption></figure>",
                escape(&c.title),
                c.svg.trim_end(),
                escape(&c.caption),
                id = c.id
            );
        }
    }
    sites_table(&mut out, r);
    let _ = writeln!(
        out,
        "<footer>{} · rendered by llama-parity {} · self-contained: no scripts, nothing fetched</footer>",
        escape(&r.format),
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(out, "</main>\n</body>\n</html>");
    Ok(out)
}

fn verdict_word(r: &Report) -> &'static str {
    match r.verdict {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
    }
}

fn is_first(r: &Report, e: &SiteEntry) -> bool {
    r.first_divergence.as_ref().is_some_and(|fd| fd.step == e.step && fd.site == e.site)
}

/// First divergence, diagnosis, run facts and counts.
fn glance(out: &mut String, r: &Report) {
    let _ = writeln!(out, "<section class=\"glance\" id=\"glance\">");
    match &r.first_divergence {
        Some(fd) => {
            let _ = writeln!(
                out,
                "<div class=\"card first\" id=\"first-divergence\"><h2>First divergence</h2>\
                 <div class=\"big\"><span class=\"mono\">{}</span> · <a href=\"#row-first\"><span class=\"mono\">{}</span></a></div>",
                escape(&fd.step),
                escape(&fd.site)
            );
            if let Some(m) = &fd.metrics {
                let _ = writeln!(out, "<div class=\"mono\">{}</div>", escape(&metrics_line(m)));
            }
            if let Some(n) = &fd.note {
                let _ = writeln!(out, "<div class=\"muted\">{}</div>", escape(n));
            }
            let _ = writeln!(
                out,
                "<div class=\"muted\">shape {} {}{}</div></div>",
                escape(&shape(&fd.golden_shape)),
                escape(&fd.golden_dtype),
                fd.candidate_dtype
                    .map_or_else(String::new, |d| format!(", candidate {}", escape(&d)))
            );
        }
        None => {
            let (class, text) = if r.verdict == Verdict::Pass {
                ("card ok", "None: every checked site is within tolerance.")
            } else {
                ("card first", "None failed, but the gate did not pass (no site was checked).")
            };
            let _ = writeln!(out, "<div class=\"{class}\" id=\"first-divergence\"><h2>First divergence</h2><div class=\"big\">{text}</div></div>");
        }
    }
    let _ = writeln!(out, "<div class=\"card\" id=\"diagnosis\"><h2>Diagnosis</h2>");
    if !r.diagnosis.is_empty() {
        let _ = writeln!(out, "<ol class=\"findings\">");
        for f in &r.diagnosis {
            let _ = writeln!(
                out,
                "<li><code>{}</code> <span class=\"score\" title=\"score\">{:.2}</span><br><span class=\"muted\">{}</span></li>",
                escape(&f.label()),
                f.score,
                escape(&f.explains)
            );
        }
        let _ = writeln!(out, "</ol>");
    } else if r.verdict == Verdict::Fail && r.summary.fail > 0 {
        let text = r.empty_diagnosis_text();
        let mut chars = text.chars();
        let text = chars
            .next()
            .map(|c| c.to_uppercase().collect::<String>() + chars.as_str())
            .unwrap_or_default();
        let _ = writeln!(out, "<p class=\"none\">{}.</p>", escape(&text));
    } else {
        let _ = writeln!(out, "<p class=\"muted\">Nothing to explain.</p>");
    }
    let _ = writeln!(out, "</div>");
    if let Some(b) = &r.baseline {
        let class = if b.regressions.is_empty() { "card wide ok" } else { "card wide first" };
        let _ = writeln!(
            out,
            "<div class=\"{class}\" id=\"baseline\"><h2>Baseline</h2><div>Held against <code>{}</code>: \
             {} sites compared, <b>{} regressed</b> (allowed growth x{} beyond noise).</div>",
            escape(&b.report),
            b.compared,
            b.regressions.len(),
            b.max_regression
        );
        if !b.regressions.is_empty() {
            let _ = writeln!(out, "<ol class=\"findings\">");
            for g in &b.regressions {
                let _ = writeln!(
                    out,
                    "<li><span class=\"mono\">{} {}</span><br><span class=\"muted\">{}</span></li>",
                    escape(&g.step),
                    escape(&g.site),
                    escape(&g.why)
                );
            }
            let _ = writeln!(out, "</ol>");
        }
        let _ = writeln!(out, "</div>");
    }
    let s = &r.summary;
    let _ = writeln!(out, "<div class=\"card wide\" id=\"run\"><h2>Run</h2><dl class=\"facts\">");
    let producer = producer_line(&r.candidate_producer);
    for (k, v) in [
        ("scenario", r.scenario.clone()),
        ("golden", format!("{} ({})", r.golden, r.golden_dtype)),
        ("candidate", format!("{} ({})", r.candidate, r.candidate_dtype)),
        ("candidate producer", producer),
        ("adapter", r.adapter.as_ref().map_or_else(|| "none".into(), |a| a.line())),
        (
            "teacher forcing",
            if r.teacher_forced { "yes: local errors measured".into() } else { "no".into() },
        ),
        (
            "thresholds",
            r.noise_floor_note.clone().unwrap_or_else(|| "the fixed per-dtype defaults".into()),
        ),
        (
            "policy",
            r.policy.as_ref().map_or_else(
                || "none (no --policy)".into(),
                |p| {
                    let lines = p.lines().into_iter().chain(p.warnings.iter().cloned());
                    format!("{}: {}", p.file, lines.collect::<Vec<_>>().join("; "))
                },
            ),
        ),
        ("ranks", r.reassembly_summary().unwrap_or_else(|| "one".into())),
    ] {
        let _ = writeln!(out, "<dt>{k}</dt><dd>{}</dd>", escape(&v));
    }
    let _ = writeln!(
        out,
        "<dt>sites</dt><dd class=\"counts\"><span class=\"c-pass\">{} pass</span><span class=\"c-fail\">{} fail</span>\
         <span class=\"c-missing\">{} missing</span><span class=\"c-skipped\">{} skipped</span></dd>",
        s.pass, s.fail, s.missing, s.skipped
    );
    if let Some((_, line)) = r.statistics_only() {
        let _ = writeln!(out, "<dt>statistics only</dt><dd>{}</dd>", escape(&line));
    }
    let _ = writeln!(out, "</dl></div>\n</section>");
}

/// A training step's loss, gradient norm and skip on both sides, and the parameter
/// gradients (CONTRACT §6); nothing for inference.
fn train_section(out: &mut String, r: &Report) {
    use super::train::opt;
    let Some(t) = &r.train else { return };
    let _ = writeln!(out, "<h2 class=\"section\" id=\"train\">Training step</h2>");
    let _ = writeln!(
        out,
        "<table class=\"sites\" id=\"train-scalars\"><thead><tr><th></th><th>golden</th><th>candidate</th><th>rel err</th></tr></thead><tbody>"
    );
    for (name, p) in [("loss", &t.loss), ("grad_norm", &t.grad_norm)] {
        let _ = writeln!(
            out,
            "<tr><td class=\"mono\">{name}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            opt(p.golden),
            opt(p.candidate),
            opt(p.rel_err)
        );
    }
    let b = |x: Option<bool>| x.map_or("unknown", |b| if b { "yes" } else { "no" });
    let _ = writeln!(
        out,
        "<tr><td>step skipped</td><td>{}</td><td>{}</td><td></td></tr></tbody></table>",
        b(t.skipped.golden),
        b(t.skipped.candidate)
    );
    let _ = writeln!(
        out,
        "<p class=\"muted\">Updates are judged as {}.</p>",
        escape(&t.updates_judged_as)
    );
    let _ = writeln!(
        out,
        "<table class=\"sites\" id=\"param-grads\"><thead><tr><th>parameter gradient</th><th>status</th><th>rel-L2</th><th>cosine</th><th>norm candidate/golden</th></tr></thead><tbody>"
    );
    for p in &t.param_grads {
        let status = match p.status {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Missing => "missing",
            Status::Skipped => "skipped",
        };
        let _ = writeln!(
            out,
            "<tr class=\"{status}\"><td class=\"mono\">{}</td><td class=\"c-{status}\">{status}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            escape(&p.name),
            opt(p.rel_l2),
            p.cosine.map_or_else(|| "—".into(), |c| format!("{c:.6}")),
            p.norm_ratio.map_or_else(|| "—".into(), |x| format!("{x:.4}"))
        );
    }
    let _ = writeln!(out, "</tbody></table>");
}

/// `framework version on device`, from the producer object's string fields.
fn producer_line(p: &serde_json::Value) -> String {
    let Some(o) = p.as_object() else { return "-".into() };
    let mut parts: Vec<String> = ["framework", "version", "device"]
        .iter()
        .filter_map(|k| o.get(*k).and_then(|v| v.as_str()).map(|v| format!("{k} {v}")))
        .collect();
    if parts.is_empty() {
        parts.push("-".into());
    }
    parts.join(", ")
}

fn sites_table(out: &mut String, r: &Report) {
    let _ = writeln!(out, "<h2 class=\"section\" id=\"sites\">Every site</h2>");
    let based = r.baseline.is_some();
    let _ = writeln!(
        out,
        "<table class=\"sites\"><thead><tr><th>site</th><th>status</th><th>rel_l2</th><th>cosine</th>\
         <th>max_abs</th><th>max_rel</th><th>new NaN/Inf</th><th title=\"rel_l2 over the noise floor (the worst error of correct runs here)\">x floor</th>{}<th>shape</th><th>note</th></tr></thead><tbody>",
        if based { "<th>baseline</th><th>x baseline</th>" } else { "" }
    );
    let columns = if based { 12 } else { 10 };
    let mut step: Option<Step> = None;
    for e in grouped_under_projections(&r.sites) {
        if step != Some(e.step) {
            step = Some(e.step);
            let _ = writeln!(
                out,
                "<tr class=\"step\"><td colspan=\"{columns}\">{}</td></tr>",
                escape(&e.step)
            );
        }
        let status = match e.status {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Missing => "missing",
            Status::Skipped => "skipped",
        };
        let first = is_first(r, e);
        let (rel, cos, ma, mr, nn) = match &e.metrics {
            Some(SiteMetrics::Values(m)) => (
                sci(m.rel_l2),
                format!("{:.6}", m.cosine),
                sci(m.max_abs),
                sci(m.max_rel),
                m.new_nonfinite.to_string(),
            ),
            Some(m) => (sci(m.error()), "-".into(), "-".into(), "-".into(), "-".into()),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let (xf, floor_title) = match (e.times_floor(), &e.noise_floor) {
            (Some(x), Some(f)) => {
                (format_times(x), format!("floor rel_l2 {}, cosine {:.6}", sci(f.rel_l2), f.cosine))
            }
            _ => ("-".into(), "no floor measured".into()),
        };
        let shapes = match &e.candidate_shape {
            Some(c) if c != &e.golden_shape => {
                format!("{} vs {}", shape(&e.golden_shape), shape(c))
            }
            _ => shape(&e.golden_shape),
        };
        let base = if based {
            let then = e.baseline.as_ref().map_or_else(|| "-".to_string(), |m| sci(m.error()));
            let g = e.baseline_growth.map_or_else(|| "-".to_string(), growth_text);
            let g = if e.regression.is_some() { format!("<b>{g}</b>") } else { g };
            format!("<td class=\"num\">{then}</td><td class=\"num\">{g}</td>")
        } else {
            String::new()
        };
        let mut note = e.table_note();
        if let Some(m @ (SiteMetrics::Exact { .. } | SiteMetrics::Visibility { .. })) = &e.metrics {
            if e.status == Status::Fail {
                note = metrics_line(m);
            }
        }
        let _ = writeln!(
            out,
            "<tr class=\"{status}{}{}\"{}><td class=\"mono\" title=\"{}\">{}</td><td class=\"st\">{status}</td>\
             <td class=\"num\">{rel}</td><td class=\"num\">{cos}</td><td class=\"num\">{ma}</td><td class=\"num\">{mr}</td>\
             <td class=\"num\">{nn}</td><td class=\"num\" title=\"{}\">{xf}</td>{base}<td class=\"mono nw\">{}</td><td>{}</td></tr>",
            if first { " first" } else if e.regression.is_some() { " fail" } else { "" },
            if is_lora_delta(&e.site) { " lora" } else { "" },
            if first { " id=\"row-first\"" } else { "" },
            escape(&e.site),
            escape(&short_or_full(&e.site)),
            escape(&floor_title),
            escape(&shapes),
            escape(&note)
        );
    }
    let _ = writeln!(out, "</tbody></table>");
}

/// Whether `site` is a LoRA delta (`<projection>.lora`, CONTRACT §5).
fn is_lora_delta(site: &Site) -> bool {
    matches!(site, Site::Layer(_, p) if p.lora_of().is_some())
}

/// The sites in report order, each LoRA delta moved right under its projection's row
/// (it is computed just before it), so that a projection and its delta read together.
fn grouped_under_projections(sites: &[SiteEntry]) -> Vec<&SiteEntry> {
    let mut out = Vec::with_capacity(sites.len());
    let mut pending: Vec<&SiteEntry> = Vec::new();
    for e in sites {
        if let Some(p) = pending.first() {
            if p.step != e.step {
                out.append(&mut pending);
            }
        }
        if is_lora_delta(&e.site) {
            pending.push(e);
            continue;
        }
        out.push(e);
        let mine = |d: &&SiteEntry| match (&d.site, &e.site) {
            (Site::Layer(i, dp), Site::Layer(j, p)) => i == j && dp.lora_of() == Some(*p),
            _ => false,
        };
        if let Some(k) = pending.iter().position(mine) {
            out.push(pending.remove(k));
        }
    }
    out.append(&mut pending);
    out
}

/// A multiple for a table cell: `2.31`, or `inf`.
pub fn format_times(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "inf".into()
    }
}

/// Layer sites are long; the table shows `L3 q_rope` and keeps the full name in the
/// cell's title.
fn short_or_full(site: &Site) -> String {
    match site {
        Site::Layer(..) => site.short_name(),
        other => other.to_string(),
    }
}
