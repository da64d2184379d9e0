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

use std::collections::BTreeMap;

use crate::compare::metrics::Metrics;
use crate::compare::tolerance::{Decision, Policy};
use crate::compare::verdict::{Comparison, SiteMetrics, SiteResult, Status};
use crate::contract::error::{Error, Result};
use crate::contract::site::Step;
use crate::dump::msprobe::{StatSite, Stats};
use crate::dump::{Dump, Manifest, Tensor};

/// The note every statistics-only site carries.
pub const NOTE: &str = "statistics only (msprobe Max/Min/Mean/Norm): rel_l2 and max_abs are lower bounds over the whole tensor; cosine not measurable";

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
            let mut r = SiteResult {
                step,
                site: site.clone(),
                status: Status::Missing,
                metrics: None,
                tolerance: None,
                golden_shape: g.shape().to_vec(),
                candidate_shape: c.map(|c| c.shape.clone()),
                golden_dtype: g.dtype(),
                candidate_dtype: c.and_then(|c| c.dtype),
                note: None,
                per_token: None,
                per_head: None,
                abs_histogram: None,
                noise_floor: None,
            };
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
                        r.status = if mism == 0 { Status::Pass } else { Status::Fail };
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
                r.status = if pairs.is_empty() {
                    Status::Skipped
                } else if mism == 0 {
                    Status::Pass
                } else {
                    Status::Fail
                };
                r.metrics = Some(SiteMetrics::Exact {
                    count: pairs.len() as u64,
                    mismatches: mism,
                    first_mismatch: None,
                });
                r.note = Some(format!("{NOTE}; integer site: the {} recorded statistics must match exactly ({mism} differ)", pairs.len()));
                sites.push(r);
                continue;
            }
            let cs = &c.stats;
            let all = |s: &Stats| [s.max, s.min, s.mean, s.norm];
            let nonfinite_new = all(cs).iter().flatten().any(|v| !v.is_finite())
                && all(&gs).iter().flatten().all(|v| v.is_finite());
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
            let m = bounds(g.numel() as u64, rel_l2, max_abs, nonfinite_new);
            // The one pass/fail rule, on the lower bounds; statistics say nothing of the
            // cosine, so it is judged at its best (1).
            let j = tol.judge(&Metrics { cosine: 1.0, ..m.clone() });
            r.status = if j.pass { Status::Pass } else { Status::Fail };
            if !j.pass {
                r.note = Some(format!("{NOTE}; {}", j.why.join("; ")));
            }
            r.tolerance = Some(tol);
            r.metrics = Some(SiteMetrics::Values(m));
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
    use crate::dump::DType;

    #[test]
    fn statistics_of_a_small_tensor_are_exact() {
        let t = Tensor::from_f64(&[2, 2], &[1.0, -2.0, 3.0, 0.0], DType::F32);
        let s = stats_of(&t);
        assert_eq!((s.max, s.min, s.mean), (Some(3.0), Some(-2.0), Some(0.5)));
        assert!((s.norm.unwrap() - 14f64.sqrt()).abs() < 1e-12);
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
