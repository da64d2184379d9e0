//! When a hypothesis explains a divergence, which of a family's forms is kept, how a
//! finding is scored, and how findings are ranked.
//!
//! A hypothesis's run must reproduce the candidate at the first divergent site within the
//! acceptance bound there and [`CLOSER_AT_FIRST`] of the correct run's error, reproduce
//! the median evidence site within its own bound, and halve the correct run's mean error
//! ([`CLOSER_ON_MEAN`]). A site's acceptance bound is the comparison's threshold there
//! or [`FLOOR_MARGIN`] times the noise floor, whichever is wider.

use contract::error::Result;
use contract::fault::ScopedFault;

use crate::evidence::Evidence;
use crate::finding::Finding;
use crate::fit::Fit;
use crate::forms::{is_single_layer, widened};

/// How many noise floors a hypothesis's run may lie from the candidate and still be
/// accepted: the margin the comparison itself puts above the floor
/// ([`compare::floor::MARGIN`]), so that the diagnosis and the verdict judge alike.
pub(crate) const FLOOR_MARGIN: f64 = compare::floor::MARGIN;

/// How close to the candidate, as a share of the correct run's error there, a
/// hypothesis's run must come at the first divergent site: a quarter, four times closer
/// than the correct run. A run is stopped at the first divergent site beyond it (see
/// [`Acceptance::first_bound`]), and a finished run is accepted only within it.
pub(crate) const CLOSER_AT_FIRST: f64 = 0.25;

/// The share of the correct run's mean error over the evidence that a hypothesis's run
/// may keep: a half.
pub(crate) const CLOSER_ON_MEAN: f64 = 0.5;

/// Two mean errors closer than this share of the larger tie: a form must be better by
/// more to replace the one kept, so that on a tie the earlier (plainer) form stays.
pub(crate) const TIE: f64 = 1e-9;

/// What a hypothesis must meet, from the correct run and the comparison's thresholds.
#[derive(Debug, Clone)]
pub(crate) struct Acceptance {
    /// The correct run measured against the candidate.
    pub clean: Fit,
    /// The comparison's threshold at each evidence site.
    thresholds: Vec<f64>,
    /// The acceptance bound at each evidence site: its threshold or [`FLOOR_MARGIN`]
    /// noise floors, whichever is wider.
    accepts: Vec<f64>,
    /// The acceptance bound at the first divergent site.
    accept: f64,
}

impl Acceptance {
    /// The rules for `evidence`, with the correct run's fit to the candidate `clean` and
    /// the noise `floor` (the median error of a correct simulation against the golden).
    pub fn new(evidence: &Evidence, clean: Fit, floor: f64) -> Acceptance {
        let thresholds = evidence.thresholds.clone();
        let accepts: Vec<f64> = thresholds.iter().map(|t| (FLOOR_MARGIN * floor).max(*t)).collect();
        let accept =
            accepts.first().copied().unwrap_or((FLOOR_MARGIN * floor).max(evidence.first_tol));
        Acceptance { clean, thresholds, accepts, accept }
    }

    /// Why no fault is named, when the correct run already reproduces a candidate that
    /// diverges in values within the comparison's own thresholds (the measured floor and
    /// the user's policy included): the divergence is within the floor. `None` when there
    /// is something to explain (positions and masks are exact: a mismatch there is never
    /// rounding).
    pub fn within_floor(&self, evidence: &Evidence) -> Option<String> {
        let clean = &self.clean;
        let within = evidence.first_is_values()
            && clean.at_first() <= evidence.first_threshold()
            && clean.within(&self.thresholds);
        within.then(|| {
            format!(
                "no fault named: a correct run reproduces the candidate within the thresholds ({} {:.1e} at {} {}; {} of {} evidence sites within)",
                clean.first_measure,
                clean.at_first(),
                evidence.first.step,
                evidence.first.site,
                clean.matched_each(&self.thresholds),
                clean.errors.len()
            )
        })
    }

    /// The farthest a hypothesis's run may be from the candidate at the first divergent
    /// site: the acceptance bound there, and [`CLOSER_AT_FIRST`] of the correct run's
    /// error. A run beyond it is stopped there.
    pub fn first_bound(&self) -> f64 {
        self.accept.min(CLOSER_AT_FIRST * self.clean.at_first())
    }

    /// Whether a run with fit `f` explains the divergence: it reproduces the first
    /// divergent site and the median site after it, and is far closer to the candidate
    /// than the correct run. The median tolerates a few sites where a port's variant of
    /// the fault differs from the simulated one (tables swapped where dumped or only
    /// where applied, say).
    pub fn explains(&self, f: &Fit) -> bool {
        f.at_first() <= self.accept
            && f.at_first() <= CLOSER_AT_FIRST * self.clean.at_first()
            && f.within(&self.accepts)
            && f.mean() <= CLOSER_ON_MEAN * self.clean.mean()
    }

    /// The share of the divergence (mean error over the evidence) that a run with fit
    /// `f` explains, in 0..1.
    pub fn score(&self, f: &Fit) -> f64 {
        (1.0 - ratio(f.mean(), self.clean.mean())).clamp(0.0, 1.0)
    }

    /// The finding for `form`, kept with fit `f`, with the evidence in the fault's own
    /// terms (`detail`) before the numbers.
    pub fn finding(
        &self,
        evidence: &Evidence,
        form: &ScopedFault,
        f: &Fit,
        detail: Option<String>,
    ) -> Finding {
        let clean = &self.clean;
        let explains = format!(
            "{} {} matches a run with {}: {} {:.1e} against {:.1e} for the correct run; {} of {} evidence sites within {:.0e} at the first and their own thresholds after it (mean error {:.1e} against {:.1e})",
            evidence.first.step,
            evidence.first.site,
            form,
            f.first_measure,
            f.at_first(),
            clean.at_first(),
            f.matched_each(&self.accepts),
            f.errors.len(),
            self.accept,
            f.mean(),
            clean.mean()
        );
        let explains = match detail {
            Some(d) => format!("{d}; {explains}"),
            None => explains,
        };
        Finding::new(form, self.score(f), explains)
    }
}

/// `a / b`, with 0/0 = 0 and a/0 = 1 (no improvement measurable).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else if a > 0.0 {
        1.0
    } else {
        0.0
    }
}

/// Whether `f` is closer to the candidate than `than`, by more than a [`TIE`].
fn improves(f: &Fit, than: &Fit) -> bool {
    f.mean() < than.mean() * (1.0 - TIE)
}

/// Whether `f` beats the form kept so far (any fit beats none).
fn better(f: &Fit, kept: &Option<(ScopedFault, Fit)>) -> bool {
    kept.as_ref().is_none_or(|(_, b)| improves(f, b))
}

/// A kept form that reproduces the candidate exactly, which nothing can better.
fn exact(kept: &Option<(ScopedFault, Fit)>) -> bool {
    kept.as_ref().is_some_and(|(_, b)| b.mean() == 0.0)
}

/// The best of a family's `forms` that explains the divergence, with its fit; `None`
/// when none does. Each form is run and measured by `measure` (`None`: refuted, or it
/// changes nothing here), in order, until one reproduces the candidate exactly. The
/// closest form scoped to one layer, accepted or not, is then widened a layer at a time
/// (up to `n_layers`) while the evidence fits better.
pub(crate) fn best_form(
    forms: Vec<ScopedFault>,
    n_layers: usize,
    acceptance: &Acceptance,
    mut measure: impl FnMut(&ScopedFault) -> Result<Option<Fit>>,
) -> Result<Option<(ScopedFault, Fit)>> {
    let mut best: Option<(ScopedFault, Fit)> = None;
    // The closest form scoped to the first divergent layer alone, accepted or not.
    let mut seed: Option<(ScopedFault, Fit)> = None;
    for form in forms {
        if exact(&best) {
            break;
        }
        let Some(f) = measure(&form)? else { continue };
        if acceptance.explains(&f) && better(&f, &best) {
            best = Some((form.clone(), f.clone()));
        }
        if is_single_layer(&form) && better(&f, &seed) {
            seed = Some((form, f));
        }
    }
    // Widen that scope one layer at a time while the evidence fits better.
    if let Some((mut form, mut f)) = seed.filter(|_| !exact(&best)) {
        while let Some(wider) = widened(&form, n_layers) {
            match measure(&wider)? {
                Some(g) if improves(&g, &f) => (form, f) = (wider, g),
                _ => break,
            }
            if acceptance.explains(&f) && better(&f, &best) {
                best = Some((form.clone(), f.clone()));
            }
        }
    }
    Ok(best)
}

/// Ranks findings best first; findings with the same score keep their order.
pub(crate) fn rank(findings: &mut [Finding]) {
    findings.sort_by(|a, b| b.score.total_cmp(&a.score));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{comparison, fit, site_result, Measured};
    use compare::Status;
    use contract::site::{Site, Step};

    /// Rules where the comparison's thresholds are 1e-3 at three evidence sites, the
    /// floor is `floor` and the correct run is `clean` away.
    fn rules(clean: &[f64], floor: f64) -> Acceptance {
        Acceptance {
            clean: fit(clean),
            thresholds: vec![1e-3; 3],
            accepts: vec![(FLOOR_MARGIN * floor).max(1e-3); 3],
            accept: (FLOOR_MARGIN * floor).max(1e-3),
        }
    }

    fn form(spec: &str) -> ScopedFault {
        ScopedFault::parse(spec).expect("a scoped fault")
    }

    #[test]
    fn the_floor_margin_is_the_comparisons_own() {
        assert_eq!(FLOOR_MARGIN, compare::floor::MARGIN);
    }

    #[test]
    fn the_acceptance_bound_is_the_threshold_or_the_floor_margin_whichever_is_wider() {
        let cmp = comparison(vec![
            site_result(
                Step::Prefill,
                Site::EmbedTokens,
                Status::Fail,
                Measured::Values(Some(1e-3)),
            ),
            site_result(Step::Prefill, Site::Norm, Status::Pass, Measured::Values(Some(1e-2))),
        ]);
        let evidence = Evidence::of(&cmp).expect("divergent");
        let a = Acceptance::new(&evidence, fit(&[1.0, 1.0]), 1e-3);
        assert_eq!(a.accepts, [FLOOR_MARGIN * 1e-3, 1e-2]);
        assert_eq!(a.accept, FLOOR_MARGIN * 1e-3);
        assert_eq!(a.thresholds, [1e-3, 1e-2]);
        let a = Acceptance::new(&evidence, fit(&[1.0, 1.0]), 0.0);
        assert_eq!(a.accepts, [1e-3, 1e-2]);
    }

    #[test]
    fn a_run_must_be_four_times_closer_than_the_correct_run_at_the_first_site() {
        let a = rules(&[0.1, 0.1, 0.1], 1.0);
        assert_eq!(a.first_bound(), 0.025);
        assert!(a.explains(&fit(&[0.025, 0.0, 0.0])));
        assert!(!a.explains(&fit(&[0.026, 0.0, 0.0])));
    }

    #[test]
    fn a_run_must_lie_within_the_acceptance_bound_at_the_first_site() {
        // The floor margin allows 3e-3; the correct run is far.
        let a = rules(&[1.0, 1.0, 1.0], 1e-3);
        assert_eq!(a.first_bound(), FLOOR_MARGIN * 1e-3);
        assert!(a.explains(&fit(&[FLOOR_MARGIN * 1e-3, 0.0, 0.0])));
        assert!(!a.explains(&fit(&[4e-3, 0.0, 0.0])));
    }

    #[test]
    fn a_run_must_meet_the_median_site_and_halve_the_mean_error() {
        let a = rules(&[1.0, 1.0, 1.0], 1e-3);
        // The median site (second largest ratio of three) beyond its bound.
        assert!(!a.explains(&fit(&[0.0, 0.1, 0.1])));
        assert!(a.explains(&fit(&[0.0, 0.0, 0.1])));
        // Within every bound yet not halving the mean: the correct run is close.
        let a = rules(&[1e-3, 1e-3, 1e-3], 1.0);
        assert!(!a.explains(&fit(&[0.0, 1e-3, 1e-3])));
        assert!(a.explains(&fit(&[0.0, 0.0, 1e-3])));
    }

    #[test]
    fn a_candidate_the_correct_run_reproduces_in_values_is_within_the_floor() {
        let cmp = comparison(vec![
            site_result(
                Step::Prefill,
                Site::EmbedTokens,
                Status::Fail,
                Measured::Values(Some(1e-3)),
            ),
            site_result(Step::Prefill, Site::Norm, Status::Pass, Measured::Values(Some(1e-3))),
        ]);
        let evidence = Evidence::of(&cmp).expect("divergent");
        let a = Acceptance::new(&evidence, fit(&[1e-3, 5e-4]), 0.0);
        assert_eq!(
            a.within_floor(&evidence).as_deref(),
            Some("no fault named: a correct run reproduces the candidate within the thresholds (rel-L2 1.0e-3 at prefill model.embed_tokens; 2 of 2 evidence sites within)")
        );
        let a = Acceptance::new(&evidence, fit(&[2e-3, 5e-4]), 0.0);
        assert_eq!(a.within_floor(&evidence), None);
        // A mask mismatch is never rounding.
        let cmp = comparison(vec![site_result(
            Step::Prefill,
            Site::Mask,
            Status::Fail,
            Measured::Pattern,
        )]);
        let evidence = Evidence::of(&cmp).expect("divergent");
        assert_eq!(Acceptance::new(&evidence, fit(&[0.0]), 0.0).within_floor(&evidence), None);
    }

    #[test]
    fn the_score_is_the_share_of_the_mean_error_explained() {
        let a = rules(&[0.5, 0.5, 0.5], 0.0);
        assert_eq!(a.score(&fit(&[0.125, 0.125, 0.125])), 0.75);
        assert_eq!(a.score(&fit(&[0.0, 0.0, 0.0])), 1.0);
        assert_eq!(a.score(&fit(&[1.0, 1.0, 1.0])), 0.0, "clamped");
        assert_eq!(ratio(0.0, 0.0), 0.0);
        assert_eq!(ratio(1.0, 0.0), 1.0);
        assert_eq!(ratio(1.0, 4.0), 0.25);
    }

    #[test]
    fn findings_are_ranked_by_score_keeping_the_order_of_ties() {
        let finding = |id: &str, score| Finding::new(&form(id), score, String::new());
        let mut found = vec![
            finding("norm.bias", 0.5),
            finding("norm.layernorm", 0.9),
            finding("attn.no_scale", 0.5),
        ];
        rank(&mut found);
        let ids: Vec<&str> = found.iter().map(|f| f.fault.as_str()).collect();
        assert_eq!(ids, ["norm.layernorm", "norm.bias", "attn.no_scale"]);
    }

    /// `best_form` over `forms`, each measured as `fits` says (absent: refuted), and
    /// the forms it ran, in order.
    fn search(
        forms: &[&str],
        fits: &[(&str, &[f64])],
        n_layers: usize,
    ) -> (Option<ScopedFault>, Vec<ScopedFault>) {
        let a = rules(&[1.0, 1.0, 1.0], 1e-3);
        let mut ran = Vec::new();
        let best = best_form(forms.iter().map(|s| form(s)).collect(), n_layers, &a, |f| {
            ran.push(f.clone());
            Ok(fits.iter().find(|(s, _)| form(s) == *f).map(|(_, e)| fit(e)))
        })
        .expect("no error");
        (best.map(|(f, _)| f), ran)
    }

    fn forms(specs: &[&str]) -> Vec<ScopedFault> {
        specs.iter().map(|s| form(s)).collect()
    }

    #[test]
    fn the_closest_accepted_form_is_kept_and_an_earlier_one_on_a_tie() {
        let (best, _) = search(
            &["norm.bias", "norm.bias@layers=0", "norm.bias@component=model.norm"],
            &[
                ("norm.bias", &[0.0, 0.0, 2e-3]),
                ("norm.bias@layers=0", &[0.0, 0.0, 1e-3]),
                ("norm.bias@component=model.norm", &[0.0, 0.0, 1e-3]),
            ],
            1,
        );
        assert_eq!(best, Some(form("norm.bias@layers=0")));
    }

    #[test]
    fn an_exact_form_ends_the_search() {
        let (best, ran) = search(
            &["norm.bias", "norm.bias@layers=0"],
            &[("norm.bias", &[0.0, 0.0, 0.0]), ("norm.bias@layers=0", &[0.0, 0.0, 0.0])],
            2,
        );
        assert_eq!(best, Some(form("norm.bias")));
        assert_eq!(ran, forms(&["norm.bias"]));
    }

    #[test]
    fn a_family_whose_forms_are_refuted_or_explain_nothing_keeps_none() {
        let (best, ran) = search(
            &["norm.bias", "norm.bias@layers=0"],
            &[("norm.bias@layers=0", &[0.5, 0.5, 0.5])],
            1,
        );
        assert_eq!(best, None);
        assert_eq!(ran, forms(&["norm.bias", "norm.bias@layers=0"]));
    }

    #[test]
    fn the_single_layer_seed_is_widened_while_the_evidence_fits_better() {
        let (best, ran) = search(
            &["norm.bias", "norm.bias@layers=1"],
            &[
                ("norm.bias", &[0.0, 0.5, 0.5]),
                ("norm.bias@layers=1", &[0.0, 0.2, 0.2]),
                ("norm.bias@layers=1-2", &[0.0, 0.0, 0.1]),
                ("norm.bias@layers=1-3", &[0.0, 0.0, 0.1]),
            ],
            5,
        );
        assert_eq!(best, Some(form("norm.bias@layers=1-2")));
        // The tie at 1-3 stops the widening before 1-4.
        assert_eq!(
            ran,
            forms(&[
                "norm.bias",
                "norm.bias@layers=1",
                "norm.bias@layers=1-2",
                "norm.bias@layers=1-3"
            ])
        );
    }
}
