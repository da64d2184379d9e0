//! A statistics-only comparison: the candidate is known by its per-site Max, Min, Mean
//! and Norm alone (an msprobe statistics-mode dump), the golden by its tensors.
//!
//! Statistics bound the real error from below, so a failure here is a real failure:
//! `|Norm(c) - Norm(g)| <= ||c - g||`, `sqrt(n) * |Mean(c) - Mean(g)| <= ||c - g||`,
//! and `|Max(c) - Max(g)|`, `|Min(c) - Min(g)| <= max|c - g|`. The site's `rel_l2` is
//! the larger of the first two over `||g||`, its `max_abs` the larger of the last two;
//! both are lower bounds, over the whole tensor (padding rows included, as msprobe
//! measures it), and cosine cannot be bounded (reported NaN). A pass proves nothing
//! beyond those bounds: a fault that keeps a site's four statistics (a permutation
//! of its values, say) passes. Every site's `note` says so.
//!
//! Masks are judged by how many entries are hidden (`Mean / Min` for an additive fill),
//! integer sites by exact statistics.
//!
//! The same bounds serve the statistics-first comparison of two full dumps
//! ([`SummaryOnly`], `parity compare --summary-only`): a value site whose bounds lie
//! within a tenth ([`STATISTICS_MARGIN`]) of every threshold is passed on statistics
//! alone, without its per-token, per-head or histogram work; any other site, and any
//! site the user names, is compared in full. It reads each tensor once either way (the
//! statistics need every element): what it saves is the arithmetic of the full
//! measures and the report's per-site breakdowns, not the reading.

use std::collections::BTreeMap;

use crate::metrics::Metrics;
use crate::tolerance::{glob, Decision, Judgement, Policy, Tolerance};
use crate::verdict::{Comparison, SiteMetrics, SiteResult, Status};
use contract::error::{Error, Result};
use contract::site::{Site, Step};
use dump::msprobe::{StatSite, Stats};
use dump::{Dump, Manifest, Tensor};

/// How every site judged on statistics alone is marked: its note starts so.
pub const STATISTICS_ONLY: &str = "statistics only";

/// The note every statistics-only site of an msprobe statistics dump carries.
pub const NOTE: &str = "statistics only (msprobe Max/Min/Mean/Norm): rel_l2 and max_abs are lower bounds over the whole tensor; cosine not measurable";

/// The note of a site passed on statistics alone by a statistics-first comparison.
pub const SUMMARY_NOTE: &str = "statistics only (summary mode: Max/Min/Mean/Norm of both tensors over the compared elements): rel_l2 and max_abs are lower bounds, within a tenth of the tolerance; cosine not measurable";

/// A site is passed on statistics alone when each lower bound is at most this fraction
/// of its threshold: a correct port's statistics agree far more closely than that (for
/// unbiased rounding, |ΔNorm| / Norm is about rel_l2 / sqrt(n)), so a site nearer its
/// threshold is one whose full measures are worth taking.
pub const STATISTICS_MARGIN: f64 = 0.1;

/// A statistics-first comparison of two full dumps: value sites judged first on the
/// statistics of both tensors, the sites in `full` always compared in full.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SummaryOnly {
    /// Site patterns compared in full: `SITE` or `STEP/SITE`, `*` matching any run of
    /// characters (`model.layers.0.*`, `decode.*/lm_head`).
    pub full: Vec<String>,
}

impl SummaryOnly {
    /// True when a pattern of `full` names `site` at `step`.
    pub fn forces_full(&self, step: Step, site: &Site) -> bool {
        self.full.iter().any(|p| names(p, step, site))
    }
}

/// True when pattern `p` (`SITE` or `STEP/SITE`) names `site` at `step`.
pub fn names(p: &str, step: Step, site: &Site) -> bool {
    match p.split_once('/') {
        Some((st, si)) => glob(st, &step.to_string()) && glob(si, &site.to_string()),
        None => glob(p, &site.to_string()),
    }
}

/// The lower bounds of a value site whose tensors have statistics `gs` and `cs` over `n`
/// compared elements, and their judgement ([`judge`]), when they lie within
/// [`STATISTICS_MARGIN`] of every threshold of `tol`; `None` when the site needs its full
/// measures.
pub fn clearly_within(
    tol: &Tolerance,
    gs: &Stats,
    cs: &Stats,
    n: u64,
) -> Option<(Metrics, Judgement)> {
    if n == 0 {
        return None;
    }
    let m = lower_bounds(gs, cs, n as f64);
    let j = judge(tol, &m);
    (j.pass && j.excess <= STATISTICS_MARGIN).then_some((m, j))
}

/// Compares a golden dump with a candidate known only by `stats`, keyed by step and site.
pub fn compare_statistics(
    golden: &Dump,
    candidate: &Manifest,
    candidate_label: &str,
    stats: &BTreeMap<(Step, String), StatSite>,
    policy: &Policy,
) -> Result<Comparison> {
    let gm = &golden.manifest;
    let precision = gm.dtype.coarser(candidate.dtype);
    let mut sites = Vec::new();
    for &step in &gm.steps {
        for site in golden.sites(step) {
            let g = golden.get(step, site)?.ok_or_else(|| {
                Error::format(golden.label(), format!("tensor `{step}/{site}` vanished"))
            })?;
            let c = if candidate.steps.contains(&step) {
                stats.get(&(step, site.to_string()))
            } else {
                None
            };
            let mut r = SiteResult::unmeasured(
                step,
                site,
                &g,
                c.map(|c| c.shape.clone()),
                c.and_then(|c| c.dtype),
            );
            let tol = match policy.decide(step, site, precision) {
                Decision::Skip => {
                    r.status = Status::Skipped;
                    r.note = Some("skipped by policy".into());
                    sites.push(r);
                    continue;
                }
                Decision::Check(t) => t,
            };
            let Some(c) = c else {
                r.note =
                    Some("the candidate did not record this site (statistics-only dump)".into());
                sites.push(r);
                continue;
            };
            r.note = Some(NOTE.into());
            if c.shape != g.shape() {
                r.status = Status::Fail;
                r.note = Some(format!(
                    "{NOTE}; shape {:?} but the golden's is {:?}",
                    c.shape,
                    g.shape()
                ));
                sites.push(r);
                continue;
            }
            let gs = stats_of(&g);
            let n = g.numel() as f64;
            if site.is_mask() {
                let gh = (0..g.numel()).filter(|&i| g.get_f64(i) < -1.0).count() as f64;
                let ch = match (c.stats.mean, c.stats.min) {
                    (Some(mean), Some(min))
                        if min < -1.0 && mean.is_finite() && min.is_finite() =>
                    {
                        Some((mean / min * n).round())
                    }
                    _ => None,
                };
                match (Some(gh), ch) {
                    (Some(gh), Some(ch)) => {
                        let mism = (gh - ch).abs() as u64;
                        let j = Judgement::exact(mism, "hidden entries differ");
                        r.status = if j.pass { Status::Pass } else { Status::Fail };
                        r.judgement = Some(j);
                        r.metrics = Some(SiteMetrics::Exact {
                            count: g.numel() as u64,
                            mismatches: mism,
                            first_mismatch: None,
                        });
                        r.note = Some(format!("{NOTE}; hidden entries counted as Mean/Min: golden {gh}, candidate {ch}"));
                    }
                    _ => {
                        r.status = Status::Skipped;
                        r.note = Some(format!(
                            "{NOTE}; the mask's statistics cannot count hidden entries (Mean {:?}, Min {:?}: an additive fill at the dtype's minimum overflows the Mean)",
                            c.stats.mean, c.stats.min
                        ));
                    }
                }
                sites.push(r);
                continue;
            }
            if !g.dtype().is_float() {
                let same = |a: f64, b: f64| a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
                let cs = &c.stats;
                let pairs: Vec<(f64, f64)> =
                    [(gs.max, cs.max), (gs.min, cs.min), (gs.mean, cs.mean), (gs.norm, cs.norm)]
                        .iter()
                        .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
                        .collect();
                let mism = pairs.iter().filter(|(a, b)| !same(*a, *b)).count() as u64;
                let j = Judgement::exact(mism, "integer statistics differ");
                r.status = if pairs.is_empty() {
                    Status::Skipped
                } else if j.pass {
                    Status::Pass
                } else {
                    Status::Fail
                };
                r.judgement = (!pairs.is_empty()).then_some(j);
                r.metrics = Some(SiteMetrics::Exact {
                    count: pairs.len() as u64,
                    mismatches: mism,
                    first_mismatch: None,
                });
                r.note = Some(format!("{NOTE}; integer site: the {} recorded statistics must match exactly ({mism} differ)", pairs.len()));
                sites.push(r);
                continue;
            }
            let cs = if c.one_sided { one_sided(&gs, &c.stats) } else { c.stats };
            let m = lower_bounds(&gs, &cs, n);
            let j = judge(&tol, &m);
            r.status = if j.pass { Status::Pass } else { Status::Fail };
            if !j.pass {
                r.note = Some(format!("{NOTE}; {}", j.why.join("; ")));
            }
            r.tolerance = Some(tol);
            r.metrics = Some(SiteMetrics::Values(m));
            r.judgement = Some(j);
            sites.push(r);
        }
    }
    Ok(Comparison {
        golden: golden.label(),
        candidate: candidate_label.to_string(),
        scenario: gm.scenario.name.clone(),
        golden_precision: gm.dtype,
        candidate_precision: candidate.dtype,
        candidate_producer: candidate.producer.clone(),
        sites,
    })
}

/// Candidate statistics known from one side only (its Max and Norm at least the real
/// tensor's, its Min at most; no Mean: statistics of ranks that count padding of unknown
/// values) as the statistics nearest the golden's they allow: a Max or Norm below the
/// golden's and a Min above it still prove an error of at least the gap; otherwise the
/// golden's own value (no evidence). Non-finite values are kept as they are.
fn one_sided(gs: &Stats, cs: &Stats) -> Stats {
    let clamp = |c: Option<f64>, g: Option<f64>, upper: bool| match (c, g) {
        (Some(c), Some(g)) if c.is_finite() && g.is_finite() => {
            Some(if upper { c.min(g) } else { c.max(g) })
        }
        (c, _) => c,
    };
    Stats {
        max: clamp(cs.max, gs.max, true),
        min: clamp(cs.min, gs.min, false),
        mean: None,
        norm: clamp(cs.norm, gs.norm, true),
    }
}

/// The error measures two sets of statistics prove, for tensors of `n` elements: `rel_l2`
/// and `max_abs` are lower bounds of the real ones (`|ΔNorm|`, `sqrt(n)·|ΔMean|` over
/// the golden's norm; `|ΔMax|`, `|ΔMin|`), `new_nonfinite` is 1 when the candidate's
/// statistics hold a NaN/Inf the golden's do not, the rest is NaN (unknown).
pub fn lower_bounds(gs: &Stats, cs: &Stats, n: f64) -> Metrics {
    let all = |s: &Stats| [s.max, s.min, s.mean, s.norm];
    let nonfinite_new = all(cs).iter().flatten().any(|v| !v.is_finite())
        && all(gs).iter().flatten().all(|v| v.is_finite());
    // |a - b| where both were recorded, else 0 (no evidence).
    let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if a != b => (a - b).abs(),
        _ => 0.0,
    };
    let gnorm = gs.norm.unwrap_or(0.0);
    let l2_lb = diff(cs.norm, gs.norm).max(n.sqrt() * diff(cs.mean, gs.mean));
    let rel_l2 = if gnorm > 0.0 {
        l2_lb / gnorm
    } else if l2_lb == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let max_abs = diff(cs.max, gs.max).max(diff(cs.min, gs.min));
    bounds(n as u64, rel_l2, max_abs, nonfinite_new)
}

/// The one pass/fail rule on [`lower_bounds`]; statistics say nothing of the cosine, so
/// it is judged at its best (1): the judgement, its excess included, is that of the
/// rel-L2 and max_abs lower bounds (and any new NaN/Inf), never of the NaN cosine the
/// site stores.
pub fn judge(tol: &Tolerance, m: &Metrics) -> Judgement {
    tol.judge(&Metrics { cosine: 1.0, ..m.clone() })
}

/// Max, Min, Mean and L2 norm of a whole tensor, as msprobe computes them.
pub fn stats_of(t: &Tensor) -> Stats {
    let (mut max, mut min, mut sum, mut sq) = (f64::NEG_INFINITY, f64::INFINITY, 0.0, 0.0);
    for i in 0..t.numel() {
        let v = t.get_f64(i);
        max = max.max(v);
        min = min.min(v);
        sum += v;
        sq += v * v;
    }
    let n = t.numel().max(1) as f64;
    Stats { max: Some(max), min: Some(min), mean: Some(sum / n), norm: Some(sq.sqrt()) }
}

fn bounds(count: u64, rel_l2: f64, max_abs: f64, nonfinite: bool) -> Metrics {
    let nan = f64::NAN;
    Metrics {
        count,
        cosine: nan,
        max_abs,
        max_abs_index: Vec::new(),
        max_rel: nan,
        mean_abs: nan,
        rel_l2,
        rmse: nan,
        nmse: nan,
        nmse_db: nan,
        pearson: nan,
        snr_db: nan,
        max_ulp: nan,
        one_thousandth_ratio: nan,
        five_thousandths_ratio: nan,
        golden_nan: 0,
        golden_inf: 0,
        candidate_nan: 0,
        candidate_inf: 0,
        new_nonfinite: u64::from(nonfinite),
        lost_nonfinite: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tolerance::Criterion;
    use dump::DType;

    #[test]
    fn statistics_of_a_small_tensor_are_exact() {
        let t = Tensor::from_f64(&[2, 2], &[1.0, -2.0, 3.0, 0.0], DType::F32);
        let s = stats_of(&t);
        assert_eq!((s.max, s.min, s.mean), (Some(3.0), Some(-2.0), Some(0.5)));
        assert!((s.norm.unwrap() - 14f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn patterns_name_a_site_or_a_step_and_site() {
        let (site, step) = (Site::LmHead, Step::Decode(1));
        assert!(names("lm_head", step, &site));
        assert!(names("decode.*/lm_head", step, &site));
        assert!(!names("prefill/lm_head", step, &site));
        assert!(!names("model.*", step, &site));
        let s = SummaryOnly { full: vec!["x".into(), "*/lm_*".into()] };
        assert!(s.forces_full(step, &site));
        assert!(!SummaryOnly::default().forces_full(step, &site));
    }

    /// Statistics a tenth of the threshold apart pass on their own; nearer ones, and
    /// ones past the threshold, need the full measures.
    #[test]
    fn only_statistics_far_inside_the_tolerance_pass_alone() {
        let tol = Tolerance { max_rel_l2: 1e-2, min_cosine: 0.999, max_abs: None };
        let g = Stats { max: Some(2.0), min: Some(-2.0), mean: Some(0.0), norm: Some(10.0) };
        let at = |norm: f64| Stats { norm: Some(norm), ..g };
        let (m, j) = clearly_within(&tol, &g, &at(10.0 + 1e-4), 100).expect("far inside");
        assert!((m.rel_l2 - 1e-5).abs() < 1e-12 && m.cosine.is_nan(), "{m:?}");
        // Judged on the bound it proved, not on the NaN cosine.
        assert_eq!((j.excess, j.criterion), (m.rel_l2 / tol.max_rel_l2, Criterion::RelL2));
        assert!(clearly_within(&tol, &g, &at(10.0 + 0.02), 100).is_none(), "a fifth of it");
        assert!(clearly_within(&tol, &g, &at(10.5), 100).is_none(), "past it");
        assert!(clearly_within(&tol, &g, &g, 0).is_none(), "nothing compared");
    }

    /// One-sided statistics prove an error only where they fall on the far side of the
    /// golden's: a Max or Norm below it, a Min above it.
    #[test]
    fn one_sided_statistics_prove_only_the_gap_on_their_side() {
        let g = Stats { max: Some(2.0), min: Some(-2.0), mean: Some(0.1), norm: Some(10.0) };
        // Padding made them larger (Max, Norm) and smaller (Min): no evidence.
        let over = Stats { max: Some(5.0), min: Some(-7.0), mean: None, norm: Some(12.0) };
        assert_eq!(one_sided(&g, &over), Stats { mean: None, ..g });
        let m = lower_bounds(&g, &one_sided(&g, &over), 100.0);
        assert_eq!((m.rel_l2, m.max_abs), (0.0, 0.0));
        // A Norm and Max below the golden's, a Min above it: the gaps are proved.
        let under = Stats { max: Some(1.5), min: Some(-1.0), mean: None, norm: Some(8.0) };
        let m = lower_bounds(&g, &one_sided(&g, &under), 100.0);
        assert_eq!((m.rel_l2, m.max_abs), (0.2, 1.0));
        // A NaN stays a NaN.
        let nan = Stats { max: Some(f64::NAN), ..under };
        assert!(one_sided(&g, &nan).max.unwrap().is_nan());
    }

    /// The bounds hold: |dNorm| and sqrt(n)|dMean| never exceed the true L2 error.
    #[test]
    fn statistics_bounds_never_exceed_the_true_error() {
        let g = [0.3, -1.2, 2.5, 0.7, -0.1, 1.9];
        let c = [0.35, -1.0, 2.4, 0.9, -0.3, 2.0];
        let gt = Tensor::from_f64(&[6], &g, DType::F64);
        let ct = Tensor::from_f64(&[6], &c, DType::F64);
        let (gs, cs) = (stats_of(&gt), stats_of(&ct));
        let v = |s: Option<f64>| s.unwrap();
        let (gs, cs) = (
            (v(gs.max), v(gs.min), v(gs.mean), v(gs.norm)),
            (v(cs.max), v(cs.min), v(cs.mean), v(cs.norm)),
        );
        let l2: f64 = g.iter().zip(&c).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        let maxabs = g.iter().zip(&c).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!((cs.3 - gs.3).abs() <= l2 + 1e-12);
        assert!(6f64.sqrt() * (cs.2 - gs.2).abs() <= l2 + 1e-12);
        assert!((cs.0 - gs.0).abs() <= maxabs + 1e-12);
        assert!((cs.1 - gs.1).abs() <= maxabs + 1e-12);
        // and they are not vacuous here
        assert!((cs.3 - gs.3).abs() > 0.0 && (cs.0 - gs.0).abs() > 0.0);
    }
}
