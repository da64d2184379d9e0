//! What the comparison shows: where the divergence starts, the sites after it that were
//! measured (the evidence a hypothesis is judged on), the threshold the comparison
//! applied at each, and the evidence a fault shows in its own terms (the positions a
//! candidate was fed, the pairs its mask shows).

use std::cmp::Ordering;

use compare::tolerance::Tolerance;
use compare::{Comparison, SiteResult, Status};
use contract::error::Result;
use contract::fault::Fault;
use contract::site::{Site, Step};
use dump::Dump;

use crate::faults::{facts, Detail};

/// Compute order of (step, site) pairs: steps first, then sites within a step.
pub(crate) fn order(a: &(Step, Site), b: &(Step, Site)) -> Ordering {
    a.0.cmp(&b.0).then_with(|| a.1.compute_order(&b.1))
}

/// The evidence of a divergence.
#[derive(Debug)]
pub(crate) struct Evidence<'c> {
    /// The first divergent site's result.
    pub first: &'c SiteResult,
    /// Where it is.
    pub at: (Step, Site),
    /// The first divergent site and every site after it that was measured (passed or
    /// failed), in compute order.
    pub sites: Vec<(Step, Site)>,
    /// The rel-L2 threshold the comparison applied at each evidence site; integer and
    /// mask sites take the first site's.
    pub thresholds: Vec<f64>,
    /// The default tolerance at the coarser of the two dtypes.
    pub default_tol: Tolerance,
    /// The first site's rel-L2 threshold (the default one where it recorded none).
    pub first_tol: f64,
}

impl Evidence<'_> {
    /// The evidence of `cmp`'s divergence; `None` when the comparison has none.
    pub fn of(cmp: &Comparison) -> Option<Evidence<'_>> {
        let first = cmp.first_divergence()?;
        let at = (first.step, first.site.clone());
        let sites: Vec<(Step, Site)> = cmp
            .sites
            .iter()
            .filter(|s| matches!(s.status, Status::Pass | Status::Fail))
            .map(|s| (s.step, s.site.clone()))
            .filter(|k| order(k, &at) != Ordering::Less)
            .collect();
        let default_tol =
            Tolerance::default_for(cmp.golden_precision.coarser(cmp.candidate_precision));
        let first_tol = first.tolerance.unwrap_or(default_tol).max_rel_l2;
        let thresholds = sites
            .iter()
            .map(|(step, site)| {
                let s = cmp.sites.iter().find(|s| s.step == *step && &s.site == site);
                match s {
                    Some(s) if has_values(s) => s.tolerance.map_or(first_tol, |t| t.max_rel_l2),
                    _ => first_tol,
                }
            })
            .collect();
        Some(Evidence { first, at, sites, thresholds, default_tol, first_tol })
    }

    /// Whether the first divergent site holds float values (positions and masks are
    /// exact: a mismatch there is never rounding).
    pub fn first_is_values(&self) -> bool {
        has_values(self.first)
    }

    /// The threshold at the first divergent site.
    pub fn first_threshold(&self) -> f64 {
        self.thresholds.first().copied().unwrap_or(self.first_tol)
    }
}

/// Whether a site's comparison measured float values.
pub(crate) fn has_values(s: &SiteResult) -> bool {
    s.metrics.as_ref().and_then(|m| m.values()).is_some()
}

/// Whether the comparison checked `at` and found it within the thresholds.
pub(crate) fn passed(cmp: &Comparison, at: &(Step, Site)) -> bool {
    cmp.sites.iter().any(|s| s.step == at.0 && s.site == at.1 && s.status == Status::Pass)
}

/// The positions a golden and a candidate fed at one decode step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MovedPositions {
    pub step: Step,
    pub golden: Vec<f64>,
    pub candidate: Vec<f64>,
}

/// The positions the golden and the candidate fed at the first decode step where they
/// differ; steps either side did not dump are skipped.
pub(crate) fn moved_positions(golden: &Dump, candidate: &Dump) -> Result<Option<MovedPositions>> {
    for &step in golden.manifest.steps.iter().filter(|s| matches!(s, Step::Decode(_))) {
        let (Some(g), Some(c)) =
            (golden.get(step, &Site::PositionIds)?, candidate.get(step, &Site::PositionIds)?)
        else {
            continue;
        };
        let (g, c) = (g.to_f64_vec(), c.to_f64_vec());
        if g != c {
            return Ok(Some(MovedPositions { step, golden: g, candidate: c }));
        }
    }
    Ok(None)
}

/// Evidence in the terms of the fault itself, where the candidate dumped what it needs:
/// the positions a position fault fed, the keys a mask fault shows or hides.
pub(crate) fn detail(
    fault: Fault,
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
) -> Result<Option<String>> {
    match facts(fault).detail {
        Detail::Positions => Ok(moved_positions(golden, candidate)?.map(|m| positions_fed(&m))),
        Detail::MaskPattern => Ok(mask_shown(cmp)),
        Detail::None => Ok(None),
    }
}

fn positions_fed(m: &MovedPositions) -> String {
    let list = |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
    format!(
        "{} was fed positions [{}] instead of [{}]",
        m.step,
        list(&m.candidate),
        list(&m.golden)
    )
}

/// How the first failing mask differs from the golden's, in (query, key) pairs.
fn mask_shown(cmp: &Comparison) -> Option<String> {
    let site = cmp.sites.iter().find(|s| s.site == Site::Mask && s.status == Status::Fail)?;
    match &site.metrics {
        Some(compare::SiteMetrics::Visibility {
            mismatches,
            golden_visible,
            candidate_visible,
            ..
        }) => Some(format!(
            "{} mask shows {candidate_visible} (query, key) pairs where the golden shows {golden_visible}; {mismatches} differ",
            site.step
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{comparison, site_result, Measured};
    use contract::site::LayerPart;
    use dump::Precision;

    fn l(i: usize, p: LayerPart) -> Site {
        Site::Layer(i, p)
    }

    /// Prefill of layer 0 passes up to q_proj, fails from k_proj on, with a skipped and a
    /// missing site after the first failure; decode.0's mask passes.
    fn divergent() -> Comparison {
        use LayerPart::*;
        use Measured::{Nothing, Pattern, Values};
        use Status::*;
        let p = Step::Prefill;
        comparison(vec![
            site_result(p, Site::Mask, Pass, Pattern),
            site_result(p, l(0, QProj), Pass, Values(Some(1e-4))),
            site_result(p, l(0, KProj), Fail, Values(Some(2e-4))),
            site_result(p, l(0, VProj), Skipped, Nothing),
            site_result(p, l(0, QRope), Missing, Nothing),
            site_result(p, l(0, KRope), Pass, Values(Some(3e-4))),
            site_result(p, l(0, Probs), Fail, Values(None)),
            site_result(Step::Decode(0), Site::Mask, Pass, Pattern),
        ])
    }

    #[test]
    fn a_comparison_without_a_failure_has_no_evidence() {
        let cmp = comparison(vec![site_result(
            Step::Prefill,
            Site::Mask,
            Status::Pass,
            Measured::Pattern,
        )]);
        assert!(Evidence::of(&cmp).is_none());
    }

    #[test]
    fn evidence_is_the_first_failure_and_every_measured_site_after_it() {
        use LayerPart::*;
        let cmp = divergent();
        let e = Evidence::of(&cmp).expect("divergent");
        assert_eq!(e.at, (Step::Prefill, l(0, KProj)));
        let p = Step::Prefill;
        assert_eq!(
            e.sites,
            [(p, l(0, KProj)), (p, l(0, KRope)), (p, l(0, Probs)), (Step::Decode(0), Site::Mask)]
        );
        assert!(e.first_is_values());
    }

    #[test]
    fn thresholds_are_each_sites_own_with_the_first_sites_for_exact_sites_and_gaps() {
        let cmp = divergent();
        let e = Evidence::of(&cmp).expect("divergent");
        // k_proj's own, k_rope's own, probs recorded none and the mask is a pattern:
        // both take the first site's.
        assert_eq!(e.thresholds, [2e-4, 3e-4, 2e-4, 2e-4]);
        assert_eq!(e.first_threshold(), 2e-4);
        assert_eq!(e.first_tol, 2e-4);
    }

    #[test]
    fn a_first_site_without_a_tolerance_takes_the_default_at_the_coarser_dtype() {
        let mut cmp = comparison(vec![site_result(
            Step::Prefill,
            Site::EmbedTokens,
            Status::Fail,
            Measured::Values(None),
        )]);
        cmp.candidate_precision = Precision::Bf16;
        let e = Evidence::of(&cmp).expect("divergent");
        let bf16 = Tolerance::default_for(Precision::Bf16);
        assert_eq!(e.default_tol, bf16);
        assert_eq!(e.first_tol, bf16.max_rel_l2);
        assert_eq!(e.thresholds, [bf16.max_rel_l2]);
    }

    #[test]
    fn a_divergence_at_the_mask_is_not_values() {
        let cmp = comparison(vec![site_result(
            Step::Prefill,
            Site::Mask,
            Status::Fail,
            Measured::Pattern,
        )]);
        let e = Evidence::of(&cmp).expect("divergent");
        assert!(!e.first_is_values());
        assert_eq!(e.thresholds, [Tolerance::default_for(Precision::F32).max_rel_l2]);
    }

    #[test]
    fn passed_is_true_only_where_the_comparison_passed_that_step_and_site() {
        let cmp = divergent();
        assert!(passed(&cmp, &(Step::Prefill, Site::Mask)));
        assert!(passed(&cmp, &(Step::Decode(0), Site::Mask)));
        assert!(!passed(&cmp, &(Step::Decode(1), Site::Mask)));
        assert!(!passed(&cmp, &(Step::Prefill, l(0, LayerPart::KProj))));
        assert!(!passed(&cmp, &(Step::Prefill, l(0, LayerPart::VProj))));
    }

    #[test]
    fn order_is_step_first_then_compute_order() {
        let a = (Step::Prefill, Site::LmHead);
        let b = (Step::Decode(0), Site::PositionIds);
        assert_eq!(order(&a, &b), Ordering::Less);
        let c = (Step::Prefill, l(1, LayerPart::InputLayernorm));
        assert_eq!(order(&c, &a), Ordering::Less);
        assert_eq!(order(&(Step::Prefill, Site::Mask), &c), Ordering::Less);
        assert_eq!(order(&c, &c.clone()), Ordering::Equal);
    }

    #[test]
    fn the_mask_detail_counts_the_pairs_of_the_first_failing_mask() {
        let mut cmp = divergent();
        assert_eq!(mask_shown(&cmp), None);
        cmp.sites[7].status = Status::Fail;
        assert_eq!(
            mask_shown(&cmp).as_deref(),
            Some("decode.0 mask shows 3 (query, key) pairs where the golden shows 2; 1 differ")
        );
    }

    #[test]
    fn the_positions_detail_lists_the_candidates_positions_then_the_goldens() {
        assert_eq!(
            positions_fed(&MovedPositions {
                step: Step::Decode(0),
                golden: vec![6.0, 9.0],
                candidate: vec![0.0, 0.0]
            }),
            "decode.0 was fed positions [0, 0] instead of [6, 9]"
        );
    }
}
