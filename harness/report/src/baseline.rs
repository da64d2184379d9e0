//! The regression gate: this run's report held against an accepted `report.json` (the
//! baseline), site by site.
//!
//! A site regresses when
//!
//! - it passed in the baseline and fails (or is missing) now, or
//! - its error grew by more than the allowed factor `F` (`--max-regression`, default 2)
//!   beyond its noise: `error_now > F * max(error_baseline, noise)`.
//!
//! The error is rel-L2 for value sites and the mismatch fraction for positions and the
//! mask ([`SiteMetrics::error`]). The noise of a value site is the larger of one
//! rounding of the comparison's dtype (its unit roundoff, eps/2: 6.0e-8 float32, 3.9e-3
//! bfloat16, 4.9e-4 float16) and 1% of the site's `max_rel_l2`: an error that moves
//! about below that is rounding, not a change in the port. Integer and mask sites have
//! no noise (any mismatch fails them anyway). The growth reported per site is
//! `error_now / max(error_baseline, noise)`.
//!
//! Sites that only one of the two reports has are left out of the gate (a site added
//! since the baseline has nothing to regress from), except a site that passed in the
//! baseline and is missing now: a port that stops dumping a site must not slip past.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use compare::{SiteMetrics, Status, Verdict};
use contract::error::{Error, Result};
use contract::site::{Site, Step};
use dump::Precision;

use super::{Report, SiteEntry};

/// The default of `--max-regression`.
pub const DEFAULT_MAX_REGRESSION: f64 = 2.0;

/// Share of a site's `max_rel_l2` below which an error counts as noise.
pub const NOISE_SHARE_OF_TOLERANCE: f64 = 0.01;

/// An accepted report, loaded.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// The file it was read from.
    pub path: PathBuf,
    pub report: Report,
}

impl Baseline {
    /// Reads an accepted `report.json`. A file that is not one is an error naming it.
    pub fn load(path: &Path) -> Result<Baseline> {
        let text = dump::read::read_json_text(path)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a report.json: {e}")))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or_default();
        if !format.starts_with("llama-parity/report@") {
            return Err(Error::format(
                path,
                format!("not a report.json: format is {format:?}, expected llama-parity/report@N"),
            ));
        }
        let report: Report = serde_json::from_value(v)
            .map_err(|e| Error::format(path, format!("not a report.json: {e}")))?;
        check_errors(&report).map_err(|what| Error::format(path, what))?;
        Ok(Baseline { path: path.to_path_buf(), report })
    }

    /// Holds `report` against this baseline: fills each site's `baseline`,
    /// `baseline_status`, `baseline_growth` and `regression`, the report's `baseline`
    /// summary, and fails the verdict when any site regressed.
    ///
    /// Errors when the two reports are of different scenarios (a baseline of another
    /// golden proves nothing), naming the baseline file.
    pub fn apply(&self, report: &mut Report, max_regression: f64) -> Result<()> {
        let base = &self.report;
        if base.scenario != report.scenario {
            return Err(Error::format(
                &self.path,
                format!(
                    "the baseline is of scenario {:?}, this run of {:?}",
                    base.scenario, report.scenario
                ),
            ));
        }
        let precision = Precision::parse(&report.golden_dtype)
            .zip(Precision::parse(&report.candidate_dtype))
            .map(|(g, c)| g.coarser(c));
        let index: HashMap<(Step, &Site), &SiteEntry> =
            base.sites.iter().map(|e| ((e.step, &e.site), e)).collect();
        let mut regressions = Vec::new();
        let mut compared = 0;
        for e in &mut report.sites {
            let Some(b) = index.get(&(e.step, &e.site)) else { continue };
            compared += 1;
            e.baseline = b.metrics.clone();
            e.baseline_status = Some(b.status);
            e.baseline_growth = match (&e.metrics, &b.metrics) {
                (Some(now), Some(then)) => Some(growth(now, then, noise(e, precision))),
                _ => None,
            };
            let why = if b.status == Status::Pass && e.status == Status::Fail {
                Some("passed in the baseline, fails now".to_string())
            } else if b.status == Status::Pass && e.status == Status::Missing {
                Some("passed in the baseline, missing now".to_string())
            } else {
                match (e.baseline_growth, &e.metrics, &b.metrics) {
                    (Some(g), Some(now), Some(then)) if g > max_regression || g.is_nan() => {
                        Some(format!(
                            "error {} was {} in the baseline: x{} > x{max_regression}",
                            super::sci(now.error()),
                            super::sci(then.error()),
                            growth_text(g)
                        ))
                    }
                    _ => None,
                }
            };
            if let Some(why) = why {
                regressions.push(Regression {
                    step: e.step,
                    site: e.site.clone(),
                    why: why.clone(),
                });
                e.regression = Some(why);
            }
        }
        if !regressions.is_empty() {
            report.verdict = Verdict::Fail;
        }
        report.baseline = Some(BaselineSummary {
            report: self.path.display().to_string(),
            max_regression,
            compared,
            regressions,
        });
        Ok(())
    }
}

/// Under `--baseline`: which accepted report this run was held against, and what
/// regressed, in compute order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineSummary {
    /// The accepted report's path, as given.
    pub report: String,
    /// The allowed growth factor beyond noise.
    pub max_regression: f64,
    /// Sites found in both reports.
    pub compared: usize,
    pub regressions: Vec<Regression>,
}

/// One regressed site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regression {
    pub step: Step,
    pub site: Site,
    /// Why, in words.
    pub why: String,
}

/// The noise of a site (see the module doc): 0 for integer and mask sites.
pub fn noise(e: &SiteEntry, precision: Option<Precision>) -> f64 {
    match &e.metrics {
        Some(SiteMetrics::Values(_)) => {
            let rounding = precision.map_or(0.0, |p| p.eps() / 2.0);
            let tol = e.tolerance.map_or(0.0, |t| t.max_rel_l2 * NOISE_SHARE_OF_TOLERANCE);
            rounding.max(tol)
        }
        _ => 0.0,
    }
}

/// Refuses a baseline whose errors would switch the growth check off: an error that is
/// NaN or negative, or infinite on a site that passed (growth against an infinite error
/// is 0 whatever happens now). A failed site may be infinitely wrong (a candidate that is
/// non-zero where the golden is all zeros), so its infinite error is kept. Integer and
/// mask sites cannot have more mismatches than elements.
fn check_errors(report: &Report) -> std::result::Result<(), String> {
    for (i, e) in report.sites.iter().enumerate() {
        let Some(m) = &e.metrics else { continue };
        let (field, value) = match m {
            SiteMetrics::Values(v) => ("metrics.rel_l2", v.rel_l2),
            SiteMetrics::Exact { count, mismatches, .. }
            | SiteMetrics::Visibility { count, mismatches, .. } => {
                if mismatches > count {
                    return Err(format!(
                        "sites[{i}] ({} {}): metrics.mismatches {mismatches} exceeds metrics.count {count}",
                        e.step, e.site
                    ));
                }
                continue;
            }
        };
        let bad =
            value.is_nan() || value < 0.0 || (value.is_infinite() && e.status == Status::Pass);
        if bad {
            return Err(format!(
                "sites[{i}] ({} {}): {field} is {} on a site that {}; a baseline's errors must be finite and non-negative",
                e.step,
                e.site,
                super::sci(value),
                if e.status == Status::Pass { "passed" } else { "did not pass" }
            ));
        }
    }
    Ok(())
}

/// `error_now / max(error_then, noise)`: 0 when both are 0, infinite when only the
/// present one is not, NaN stays NaN (and so counts as a regression).
pub fn growth(now: &SiteMetrics, then: &SiteMetrics, noise: f64) -> f64 {
    compare::metrics::ratio(now.error(), then.error().max(noise))
}

/// A growth factor for people: `2.10`, `inf`, `nan`.
pub fn growth_text(g: f64) -> String {
    if g.is_finite() {
        format!("{g:.2}")
    } else {
        super::sci(g)
    }
}

/// Serde for `Option<f64>` keeping non-finite values as strings (`"inf"`, `"nan"`).
pub mod num_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) if x.is_finite() => s.serialize_f64(*x),
            Some(x) => s.serialize_str(&super::super::sci(*x)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            F(f64),
            S(String),
        }
        Ok(match Option::<N>::deserialize(d)? {
            None => None,
            Some(N::F(f)) => Some(f),
            Some(N::S(s)) => Some(match s.as_str() {
                "nan" => f64::NAN,
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                _ => return Err(serde::de::Error::custom(format!("not a number: {s:?}"))),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use compare::metrics::Accumulator;
    use dump::DType;

    fn values(rel: f64) -> SiteMetrics {
        let mut a = Accumulator::new(DType::F32);
        a.push(0, 1.0, 1.0 + rel);
        SiteMetrics::Values(a.finish(&[1]))
    }

    #[test]
    fn growth_is_measured_against_the_larger_of_baseline_and_noise() {
        assert!((growth(&values(2e-5), &values(1e-5), 1e-6) - 2.0).abs() < 1e-9);
        // Below the noise, a baseline of 1e-8 counts as 1e-6.
        assert!((growth(&values(1.5e-6), &values(1e-8), 1e-6) - 1.5).abs() < 1e-9);
        assert_eq!(growth(&values(0.0), &values(0.0), 0.0), 0.0);
        assert_eq!(growth(&values(1e-3), &values(0.0), 0.0), f64::INFINITY);
    }

    #[test]
    fn noise_is_one_rounding_or_a_hundredth_of_the_tolerance() {
        let mut e = SiteEntry {
            step: Step::Prefill,
            site: Site::LmHead,
            status: Status::Pass,
            metrics: Some(values(1e-5)),
            tolerance: None,
            judgement: None,
            golden_shape: vec![1],
            candidate_shape: None,
            golden_dtype: DType::F32,
            candidate_dtype: None,
            note: None,
            local_metrics: None,
            per_token: None,
            per_head: None,
            abs_histogram: None,
            baseline: None,
            baseline_status: None,
            baseline_growth: None,
            regression: None,
            reassembly: None,
            noise_floor: None,
        };
        e.tolerance = Some(compare::tolerance::Tolerance::default_for(Precision::F32));
        assert!((noise(&e, Some(Precision::F32)) - 1e-6).abs() < 1e-18);
        e.tolerance = Some(compare::tolerance::Tolerance::default_for(Precision::Bf16));
        assert_eq!(noise(&e, Some(Precision::Bf16)), 7.8125e-3 / 2.0);
    }
}
