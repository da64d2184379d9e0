//! Stage 6, the report: uses the comparison and the diagnosis' findings.
//!
//! Reports of a comparison, each rendered from a [`Report`] alone so that `compare`
//! and `run` give the same files:
//!
//! - `report.json`: the contract's fields and more;
//! - `report.html` ([`html`]): one self-contained page with charts ([`charts`]);
//! - `junit.xml` ([`junit`]): one test case per step and site, for CI test views;
//! - `summary.md` ([`markdown`]): a short summary for CI step summaries and PR comments;
//! - a compact terminal table ([`terminal`]).
//!
//! Under `--baseline`, [`baseline`] holds the report against an accepted one and marks
//! the sites that regressed; every format shows the deltas.
//!
//! Every file is written atomically, and the same report gives byte-identical files.

pub mod baseline;
mod charts;
mod html;
mod junit;
mod markdown;
mod terminal;
pub mod train;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use compare::floor::SiteFloor;
use compare::metrics::{num_vec, ErrorHistogram};
use compare::statistics::STATISTICS_ONLY;
use compare::tolerance::{Judgement, Tolerance};
use compare::{Comparison, SiteMetrics, SiteResult, Status, Verdict};
use contract::error::Result;
use contract::site::{Site, Step};
use diagnosis::Finding;
use dump::{write_set, DType, Precision};

pub use html::render_html;
pub use junit::render_junit;
pub use markdown::render_markdown;
pub use terminal::render_summary;

/// Format string of `report.json`.
pub const FORMAT: &str = "llama-parity/report@2";

/// One site of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteEntry {
    pub step: Step,
    pub site: Site,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SiteMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<Tolerance>,
    /// The judgement the comparison made of this site ([`SiteResult::judgement`]), which
    /// the "x tol" columns and the ranking of the worst sites read. Not written to
    /// `report.json` (which has no such field): a report read back from it has none.
    #[serde(skip)]
    pub judgement: Option<Judgement>,
    pub golden_shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_shape: Option<Vec<usize>>,
    pub golden_dtype: DType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_dtype: Option<DType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// With teacher forcing: the error this site adds on its own, from the golden's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_metrics: Option<SiteMetrics>,
    /// rel-L2 of each token row of this step (value sites with a token axis).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_vec")]
    pub per_token: Option<Vec<f64>>,
    /// rel-L2 of each attention head (`q_rope`, `k_rope`, `probs`, `context`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_vec")]
    pub per_head: Option<Vec<f64>>,
    /// |candidate - golden| by decade (failing value sites).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abs_histogram: Option<ErrorHistogram>,
    /// The error correct runs of this model reach here in the candidate's dtype (value
    /// sites, where a floor was measured): worst rel-L2 and worst cosine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_floor: Option<SiteFloor>,
    /// Under `--baseline`: this site's metrics in the accepted report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<SiteMetrics>,
    /// Under `--baseline`: this site's status in the accepted report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_status: Option<Status>,
    /// Under `--baseline`: error now / max(error in the baseline, noise)
    /// ([`baseline::growth`]).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "baseline::num_opt")]
    pub baseline_growth: Option<f64>,
    /// Under `--baseline`: why this site regressed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression: Option<String>,
    /// A candidate recorded over tensor-parallel ranks: how this site's ranks were put
    /// back together (`replicated`, `concat(2)`, `sum`, `stage: rank 1`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reassembly: Option<String>,
}

impl SiteEntry {
    fn from_result(r: &SiteResult) -> SiteEntry {
        SiteEntry {
            step: r.step,
            site: r.site.clone(),
            status: r.status,
            metrics: r.metrics.clone(),
            tolerance: r.tolerance,
            judgement: r.judgement.clone(),
            golden_shape: r.golden_shape.clone(),
            candidate_shape: r.candidate_shape.clone(),
            golden_dtype: r.golden_dtype,
            candidate_dtype: r.candidate_dtype,
            note: r.note.clone(),
            local_metrics: None,
            per_token: r.per_token.clone(),
            per_head: r.per_head.clone(),
            abs_histogram: r.abs_histogram.clone(),
            noise_floor: r.noise_floor,
            baseline: None,
            baseline_status: None,
            baseline_growth: None,
            regression: None,
            reassembly: None,
        }
    }

    /// The note a site table shows: the site's note, then how its ranks were put back
    /// together and why it regressed, where those apply.
    pub fn table_note(&self) -> String {
        let mut parts: Vec<String> = self.note.iter().cloned().collect();
        if let Some(k) = &self.reassembly {
            parts.push(format!("ranks: {k}"));
        }
        if let Some(why) = &self.regression {
            parts.push(format!("regressed: {why}"));
        }
        parts.join("; ")
    }

    /// rel-L2 for value sites, the mismatch fraction otherwise.
    pub fn error(&self) -> Option<f64> {
        self.metrics.as_ref().map(SiteMetrics::error)
    }

    /// rel-L2 in units of the site's noise floor, where both were measured.
    pub fn times_floor(&self) -> Option<f64> {
        match (&self.metrics, &self.noise_floor) {
            (Some(SiteMetrics::Values(m)), Some(f)) => Some(f.times(m.rel_l2)),
            _ => None,
        }
    }
}

/// Counts of sites by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub pass: usize,
    pub fail: usize,
    pub missing: usize,
    pub skipped: usize,
}

impl Summary {
    /// Said when no site passed or failed: the gate cannot pass on nothing.
    pub const NOTHING_CHECKED: &'static str =
        "no site was checked: the gate cannot pass on nothing";

    /// `N pass, N fail, N missing, N skipped`.
    pub fn counts(&self) -> String {
        format!(
            "{} pass, {} fail, {} missing, {} skipped",
            self.pass, self.fail, self.missing, self.skipped
        )
    }

    /// Whether nothing was judged (every site missing or skipped).
    pub fn nothing_checked(&self) -> bool {
        self.pass == 0 && self.fail == 0
    }
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: String,
    pub verdict: Verdict,
    pub golden: String,
    pub candidate: String,
    pub scenario: String,
    pub golden_dtype: String,
    pub candidate_dtype: String,
    pub candidate_producer: serde_json::Value,
    /// The golden's LoRA adapter (CONTRACT §5): r, alpha, the scaling of each module,
    /// merged or not; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<weights::adapter::AdapterFacts>,
    /// One training step (CONTRACT §6): loss, gradient norm and skip of both sides, the
    /// parameter gradients; absent for inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<train::TrainSummary>,
    pub first_divergence: Option<SiteEntry>,
    pub diagnosis: Vec<Finding>,
    pub summary: Summary,
    /// Why no diagnosis could be made (no weights beside the golden, say); absent when
    /// the diagnosis ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis_note: Option<String>,
    /// Where the first divergence starts inside the computation (which inputs of the
    /// first divergent site still match), when no known fault explains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localisation: Option<String>,
    /// Hypotheses the diagnosis could not run on this golden, each with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnosis_notes: Vec<String>,
    /// How the thresholds were set: from a measured noise floor (and how it was
    /// measured), or the fixed defaults and why; absent when no floor was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_floor_note: Option<String>,
    /// True when the sites carry `local_metrics` from a teacher-forced run.
    #[serde(default)]
    pub teacher_forced: bool,
    /// Under `--baseline`: the accepted report and what regressed against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<baseline::BaselineSummary>,
    /// Under `--policy`: the file the thresholds came from, as read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRecord>,
    pub sites: Vec<SiteEntry>,
}

/// The `--policy` file a run was judged by: its path, its `defaults` and `rules` as
/// read, and a warning for each rule that matched no site of the report (a misspelt
/// pattern loosens or skips nothing, and says so).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub file: String,
    #[serde(default)]
    pub defaults: std::collections::BTreeMap<String, compare::tolerance::Override>,
    #[serde(default)]
    pub rules: Vec<compare::tolerance::Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl PolicyRecord {
    /// One line per rule and default, for people: `rules[0] site model.* step *:
    /// max_rel_l2 1.8e308`.
    pub fn lines(&self) -> Vec<String> {
        let thresholds = |o: &compare::tolerance::Override| {
            let mut t = Vec::new();
            if let Some(x) = o.max_rel_l2 {
                t.push(format!("max_rel_l2 {}", sci(x)));
            }
            if let Some(x) = o.min_cosine {
                t.push(format!("min_cosine {}", sci(x)));
            }
            if let Some(x) = o.max_abs {
                t.push(format!("max_abs {}", sci(x)));
            }
            t
        };
        let mut out = Vec::new();
        for (k, o) in &self.defaults {
            out.push(format!("defaults.{k}: {}", thresholds(o).join(", ")));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let mut t = thresholds(&r.thresholds);
            if r.skip {
                t.insert(0, "skip".into());
            }
            let dtype = r.dtype.as_deref().map_or_else(String::new, |d| format!(" dtype {d}"));
            out.push(format!(
                "rules[{i}] site {} step {}{dtype}: {}",
                r.site,
                r.step,
                t.join(", ")
            ));
        }
        out
    }
}

impl Report {
    /// Builds the report of `cmp`, with `diagnosis` best first.
    pub fn new(cmp: &Comparison, diagnosis: Vec<Finding>) -> Report {
        let (pass, fail, missing, skipped) = cmp.counts();
        Report {
            format: FORMAT.to_string(),
            verdict: cmp.verdict(),
            golden: cmp.golden.clone(),
            candidate: cmp.candidate.clone(),
            scenario: cmp.scenario.clone(),
            golden_dtype: cmp.golden_precision.name().to_string(),
            candidate_dtype: cmp.candidate_precision.name().to_string(),
            candidate_producer: cmp.candidate_producer.clone(),
            adapter: None,
            train: None,
            first_divergence: cmp.first_divergence().map(SiteEntry::from_result),
            diagnosis,
            diagnosis_note: None,
            localisation: None,
            diagnosis_notes: Vec::new(),
            noise_floor_note: None,
            summary: Summary { pass, fail, missing, skipped },
            teacher_forced: false,
            baseline: None,
            policy: None,
            sites: cmp.sites.iter().map(SiteEntry::from_result).collect(),
        }
    }

    /// Records the policy read from `file` that judged this report, with a warning for
    /// each rule that matched none of its sites at its precision.
    pub fn record_policy(&mut self, file: &Path, policy: &compare::tolerance::Policy) {
        let precision = Precision::parse(&self.golden_dtype)
            .zip(Precision::parse(&self.candidate_dtype))
            .map(|(g, c)| g.coarser(c));
        let warnings = policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                let dtype_ok = |p: Precision| {
                    r.dtype.as_deref().and_then(Precision::parse).is_none_or(|d| d == p)
                };
                !precision.is_some_and(dtype_ok)
                    || !self.sites.iter().any(|e| {
                        compare::tolerance::glob(&r.site, &e.site.to_string())
                            && compare::tolerance::glob(&r.step, &e.step.to_string())
                    })
            })
            .map(|(i, r)| {
                format!(
                    "{}: rules[{i}] (site {:?}, step {:?}{}) matches no site of this comparison",
                    file.display(),
                    r.site,
                    r.step,
                    r.dtype.as_deref().map_or_else(String::new, |d| format!(", dtype {d}"))
                )
            })
            .collect();
        self.policy = Some(PolicyRecord {
            file: file.display().to_string(),
            defaults: policy.defaults.clone(),
            rules: policy.rules.clone(),
            warnings,
        });
    }

    /// How a candidate recorded over tensor-parallel ranks was put back together: each
    /// kind with its number of sites (`concat(2) x24, replicated x40`), most first;
    /// `None` for a single-rank candidate.
    pub fn reassembly_summary(&self) -> Option<String> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for k in self.sites.iter().filter_map(|e| e.reassembly.as_deref()) {
            *counts.entry(k).or_default() += 1;
        }
        if counts.is_empty() {
            return None;
        }
        let mut v: Vec<(&str, usize)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        Some(format!("sites put back together from the ranks as: {}", parts.join(", ")))
    }

    /// What to say of a failed comparison whose diagnosis is empty.
    pub fn empty_diagnosis_text(&self) -> String {
        let text = self
            .diagnosis_note
            .clone()
            .unwrap_or_else(|| "no known fault explains this divergence".to_string());
        match &self.localisation {
            Some(l) => format!("{text}; {l}"),
            None => text,
        }
    }

    /// Attaches the local (teacher-forced) measures of `local`, site by site.
    pub fn attach_local(&mut self, local: &Comparison) {
        for (e, l) in self.sites.iter_mut().zip(&local.sites) {
            if e.step == l.step && e.site == l.site {
                e.local_metrics = l.metrics.clone();
            }
        }
        self.teacher_forced = true;
    }

    /// The report as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        s.push('\n');
        s
    }

    /// Every report file by name, rendered in memory.
    pub fn render_files(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            ("report.json", self.to_json()),
            ("report.html", render_html(self)?),
            ("junit.xml", render_junit(self)),
            ("summary.md", render_markdown(self)),
        ])
    }

    /// Writes every report file into `dir` (created if needed) as one whole set
    /// ([`write_set`]: locked, written aside, renamed into place). All are rendered
    /// before the first is written, so a rendering error writes nothing.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let files = self.render_files()?;
        let set: Vec<(&str, &[u8])> = files.iter().map(|(n, t)| (*n, t.as_bytes())).collect();
        write_set(dir, &set)
    }

    /// How many sites were judged on statistics alone (their note starts with
    /// [`STATISTICS_ONLY`]: an msprobe statistics dump, or a statistics-first comparison),
    /// and a line saying so; `None` when none was.
    pub fn statistics_only(&self) -> Option<(usize, String)> {
        let n = self
            .sites
            .iter()
            .filter(|s| matches!(s.status, Status::Pass | Status::Fail))
            .filter(|s| s.note.as_deref().is_some_and(|n| n.starts_with(STATISTICS_ONLY)))
            .count();
        let checked = self.summary.pass + self.summary.fail;
        (n > 0).then(|| {
            (
                n,
                format!(
                    "judged on statistics alone: {n} of {checked} checked sites (their rel_l2 \
                     and max_abs are lower bounds; no per-token, per-head or histogram breakdown)"
                ),
            )
        })
    }

    /// Sites that did not pass or are closest to failing, worst first.
    pub fn worst(&self, n: usize) -> Vec<&SiteEntry> {
        let mut v: Vec<&SiteEntry> =
            self.sites.iter().filter(|s| matches!(s.status, Status::Pass | Status::Fail)).collect();
        v.sort_by(|a, b| excess(b).total_cmp(&excess(a)));
        v.truncate(n);
        v
    }
}

/// How far past its tolerance a site is (> 1 fails), as its comparison judged it
/// ([`Judgement::excess`]): for value sites the largest ratio of a metric to its
/// threshold (of the rel-L2 and max_abs lower bounds, for a site judged on statistics
/// alone), infinite for integer or mask sites with mismatches; 0 where nothing was
/// judged.
pub fn excess(s: &SiteEntry) -> f64 {
    s.judgement.as_ref().map_or(0.0, |j| j.excess)
}

/// Escapes text for XML content and attribute values (quotes included). Characters
/// XML 1.0 forbids (controls other than tab, newline, return) become `?`.
pub fn escape_xml(s: &(impl std::fmt::Display + ?Sized)) -> String {
    let s = s.to_string();
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// A number for people: `1.234e-5`, or `nan`/`inf`/`-inf`; the same bytes every time.
pub fn sci(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        format!("{x:.3e}")
    }
}

/// The main measures of a site in one line: `rel_l2 1.2e-3, cosine 0.999981, ...`.
pub fn metrics_line(m: &SiteMetrics) -> String {
    match m {
        SiteMetrics::Values(v) => format!(
            "rel_l2 {}, cosine {:.6}, max_abs {}, max_rel {}, new NaN/Inf {}",
            sci(v.rel_l2),
            v.cosine,
            sci(v.max_abs),
            sci(v.max_rel),
            v.new_nonfinite
        ),
        SiteMetrics::Exact { count, mismatches, first_mismatch } => {
            format!("{mismatches} of {count} values differ{}", at(first_mismatch))
        }
        SiteMetrics::Visibility { count, mismatches, first_mismatch, golden_visible, candidate_visible } => format!(
            "{mismatches} of {count} entries differ in visibility{} (visible: golden {golden_visible}, candidate {candidate_visible})",
            at(first_mismatch)
        ),
    }
}

fn at(idx: &Option<Vec<usize>>) -> String {
    idx.as_ref().map_or_else(String::new, |i| format!(", first at {i:?}"))
}

/// A shape as `[2, 4, 6]`.
pub fn shape(s: &[usize]) -> String {
    format!("{s:?}")
}
