//! How closely a run reproduces a target (the candidate, or the golden for the noise
//! floor) at the evidence sites, measured as the comparison measures: rel-L2 for values,
//! the mismatch fraction for integer sites and the mask, padding left out alike.

use compare::compare_site;
use compare::tolerance::Policy;
use contract::error::Result;
use contract::site::{Site, Step};
use dump::{Dump, Precision, Scenario, Tensor};

/// The largest error a site counts with: a run that is wholly off (or non-finite) at one
/// site does not outweigh every other site in a mean.
pub(crate) const ERROR_CAP: f64 = 10.0;

/// How closely a run reproduces the target at the evidence sites.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fit {
    /// Error between the run and the target at each evidence site, in order:
    /// rel-L2, or the mismatch fraction for integer sites and the mask (capped at
    /// [`ERROR_CAP`]).
    pub errors: Vec<f64>,
    /// What the error at the first divergent site measures.
    pub first_measure: &'static str,
}

impl Fit {
    /// The error at the first divergent site; infinite when nothing was measured.
    pub fn at_first(&self) -> f64 {
        self.errors.first().copied().unwrap_or(f64::INFINITY)
    }

    pub fn mean(&self) -> f64 {
        if self.errors.is_empty() {
            f64::INFINITY
        } else {
            self.errors.iter().sum::<f64>() / self.errors.len() as f64
        }
    }

    /// The median error (the upper one of an even count).
    pub fn median(&self) -> f64 {
        let mut v = self.errors.clone();
        if v.is_empty() {
            return f64::INFINITY;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Evidence sites where the error is at most that site's bound.
    pub fn matched_each(&self, bounds: &[f64]) -> usize {
        self.errors.iter().zip(bounds).filter(|(e, b)| e <= b).count()
    }

    /// The median evidence site is within its bound: the median of `error / bound` is
    /// at most 1 (with one common bound, the median error against it).
    pub fn within(&self, bounds: &[f64]) -> bool {
        let mut v: Vec<f64> = self
            .errors
            .iter()
            .zip(bounds)
            .map(|(e, b)| {
                if *b > 0.0 {
                    e / b
                } else if *e > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        if v.is_empty() {
            return false;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] <= 1.0
    }
}

/// Measures `run` against `target` at the evidence sites (padding handled as in
/// comparisons, with `golden`'s scenario). A site either side lacks is left out.
pub(crate) fn fit(
    run: &Dump,
    target: &Dump,
    golden: &Dump,
    evidence: &[(Step, Site)],
) -> Result<Fit> {
    let mut errors = Vec::with_capacity(evidence.len());
    let mut first_measure = "rel-L2";
    for (step, site) in evidence {
        let (Some(r), Some(t)) = (run.get(*step, site)?, target.get(*step, site)?) else {
            continue;
        };
        let (e, values) = error_between(&r, &t, *step, site, &golden.manifest.scenario);
        if errors.is_empty() && !values {
            first_measure = "mismatch fraction";
        }
        errors.push(e);
    }
    Ok(Fit { errors, first_measure })
}

/// The error between a run's tensor and a target's at one site: rel-L2, or the mismatch
/// fraction for integer sites and the mask (capped at [`ERROR_CAP`]), and whether it is
/// rel-L2.
pub(crate) fn error_between(
    run: &Tensor,
    target: &Tensor,
    step: Step,
    site: &Site,
    scenario: &Scenario,
) -> (f64, bool) {
    let res =
        compare_site(step, site, run, Some(target), scenario, &Policy::default(), Precision::F32);
    let e = res.metrics.as_ref().map_or(f64::INFINITY, |m| m.error());
    let values = matches!(res.metrics, Some(compare::SiteMetrics::Values(_)));
    (if e.is_finite() { e.min(ERROR_CAP) } else { ERROR_CAP }, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, fit as fit_of};
    use dump::DType;

    #[test]
    fn an_empty_fit_is_infinitely_far_and_never_within() {
        let f = fit_of(&[]);
        assert_eq!(f.at_first(), f64::INFINITY);
        assert_eq!(f.mean(), f64::INFINITY);
        assert_eq!(f.median(), f64::INFINITY);
        assert!(!f.within(&[]));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_upper_middle() {
        assert_eq!(fit_of(&[4.0, 1.0, 3.0, 2.0]).median(), 3.0);
        assert_eq!(fit_of(&[5.0, 1.0, 3.0]).median(), 3.0);
        assert_eq!(fit_of(&[5.0, 1.0, 3.0]).mean(), 3.0);
        assert_eq!(fit_of(&[5.0, 1.0, 3.0]).at_first(), 5.0);
    }

    #[test]
    fn within_asks_the_median_site_to_meet_its_own_bound() {
        // Ratios 0.5, 2, 0.9: median 0.9.
        assert!(fit_of(&[1.0, 4.0, 0.9]).within(&[2.0, 2.0, 1.0]));
        // Ratios 2, 2, 0.9: median 2.
        assert!(!fit_of(&[4.0, 4.0, 0.9]).within(&[2.0, 2.0, 1.0]));
        assert_eq!(fit_of(&[1.0, 4.0, 0.9]).matched_each(&[2.0, 2.0, 1.0]), 2);
    }

    #[test]
    fn a_zero_bound_is_met_only_by_a_zero_error() {
        assert!(fit_of(&[0.0]).within(&[0.0]));
        assert!(!fit_of(&[1e-30]).within(&[0.0]));
    }

    #[test]
    fn error_between_is_rel_l2_to_the_run_capped_at_the_error_cap() {
        let m = testing::manifest(|_| {});
        let site = Site::Other("values".into());
        let t = |v: &[f64]| Tensor::from_array(&ndarray::arr1(v), DType::F32);
        let error = |run: &[f64], target: &[f64]| {
            error_between(&t(run), &t(target), Step::Prefill, &site, &m.scenario)
        };
        assert_eq!(error(&[3.0, 4.0], &[3.0, 4.0]), (0.0, true));
        let (e, _) = error(&[3.0, 4.0], &[0.0, 0.0]);
        assert!((e - 1.0).abs() < 1e-12, "{e}");
        assert_eq!(error(&[3.0, 4.0], &[300.0, 400.0]), (ERROR_CAP, true));
        assert_eq!(error(&[0.0, 0.0], &[3.0, 4.0]), (ERROR_CAP, true), "infinite");
    }
}
