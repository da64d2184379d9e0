//! Refuting hypotheses as early as the evidence allows: before any run (a fault acting
//! after the divergence starts, or where the divergence does not, or with nothing to act
//! on), before a form's run (a narrowed form whose first effect lands on a site the
//! candidate matched), and while it runs ([`Refuter`]: the run stops at the first site
//! it cannot be the candidate's at). A form that survives is replayed from the recorded
//! correct run where it departs from it, and measured ([`Replays::measure`]).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use compare::{Comparison, Status};
use contract::error::Result;
use contract::fault::{Fault, ScopedFault};
use contract::site::{self, Site, Step};
use dump::{Dump, Manifest, Precision, Scenario, Tensor};
use model::ascend::{self, AscendOptions, Hypothesis};
use model::llama::Watch;
use model::plan::Plan;
use model::runner::{Recorded, Replay};
use model::RunContext;

use crate::evidence::{has_values, order, passed, Evidence};
use crate::faults::facts;
use crate::fit::{error_between, fit, Fit};
use crate::forms::{departure, form_effect};
use crate::visibility::{earliest_effect, first_site, Visibility};

/// How many times the larger of a matched site's threshold and the correct run's own
/// distance from the candidate a run may stray there before it is refuted: slack for a
/// port's variant of a fault that differs a little from the simulated one, not a noise
/// margin (the threshold already holds that).
pub(crate) const REFUTATION_SLACK: f64 = 3.0;

/// The faults worth running for a divergence that starts at `first`, on a golden with
/// manifest `m` and a candidate at `precision`, in the contract's order. Left out: a
/// fault acting only after the divergence starts (it cannot explain it), one acting
/// elsewhere when the divergence starts at the positions or the mask (those are computed
/// from the scenario alone), and one with nothing to act on in this scenario (it changes
/// nothing), unless the table says its other forms act anyway.
pub(crate) fn hypotheses(first: &(Step, Site), m: &Manifest, precision: Precision) -> Vec<Fault> {
    Fault::ALL
        .into_iter()
        .filter(|&fault| order(&earliest_effect(fault), first) != Ordering::Greater)
        .filter(|&fault| {
            !matches!(first.1, Site::PositionIds | Site::Mask)
                || earliest_effect(fault).1 == first.1
        })
        .filter(|&fault| {
            !facts(fault).screened
                || !matches!(first_site(fault, m, precision), Visibility::CannotShow(_))
        })
        .collect()
}

/// Refutes a hypothesis while it runs: at the sites before the first divergence that
/// the candidate matched, a run far from the candidate (beyond [`REFUTATION_SLACK`] times
/// the larger of the site's threshold and the correct run's own distance from the
/// candidate) would have failed where the candidate passed, so it cannot be the
/// candidate's fault, and its run stops there instead of computing every later layer and
/// step. The first divergent site is added with its own bound ([`Refuter::require`]).
pub(crate) struct Refuter {
    /// `"<step>/<site>"` → the candidate's tensor and the bound on a run's error from it.
    sites: Arc<HashMap<String, (Tensor, f64)>>,
    scenario: Arc<Scenario>,
}

impl Refuter {
    /// The refuter of runs of `golden`'s scenario against `candidate`, from the sites
    /// before the divergence that `cmp` passed, with the correct run `baseline`.
    pub fn new(
        golden: &Dump,
        candidate: &Dump,
        cmp: &Comparison,
        baseline: &Dump,
        evidence: &Evidence,
    ) -> Result<Refuter> {
        let scenario = &golden.manifest.scenario;
        let mut sites = HashMap::new();
        for s in cmp.sites.iter().filter(|s| s.status == Status::Pass) {
            if order(&(s.step, s.site.clone()), &evidence.at) != Ordering::Less {
                continue;
            }
            let (Some(c), Some(b)) =
                (candidate.get(s.step, &s.site)?, baseline.get(s.step, &s.site)?)
            else {
                continue;
            };
            let (clean, _) = error_between(&b, &c, s.step, &s.site, scenario);
            let bound = if has_values(s) {
                REFUTATION_SLACK * s.tolerance.unwrap_or(evidence.default_tol).max_rel_l2.max(clean)
            } else {
                clean
            };
            sites.insert(site::key(s.step, &s.site), (c, bound));
        }
        Ok(Refuter { sites: Arc::new(sites), scenario: Arc::new(scenario.clone()) })
    }

    /// Adds `at` with its own bound: a run farther than `bound` from the candidate there
    /// is refuted.
    pub fn require(&mut self, candidate: &Dump, at: &(Step, Site), bound: f64) -> Result<()> {
        if let Some(c) = candidate.get(at.0, &at.1)? {
            let mut sites = (*self.sites).clone();
            sites.insert(site::key(at.0, &at.1), (c, bound));
            self.sites = Arc::new(sites);
        }
        Ok(())
    }

    /// The watch for one form's run; `None` when there is nothing to refute it by. The
    /// dumped rotary tables do not refute a fault the table says they cannot.
    fn watch(&self, form: &ScopedFault) -> Option<Arc<Watch>> {
        if self.sites.is_empty() {
            return None;
        }
        let (sites, scenario) = (self.sites.clone(), self.scenario.clone());
        let tables_free = !facts(form.fault).tables_refute;
        Some(Arc::new(Watch::new(move |step, site, a| {
            if tables_free && matches!(site, Site::RotaryCos | Site::RotarySin) {
                return true;
            }
            let Some((c, bound)) = sites.get(&site::key(step, site)) else {
                return true;
            };
            let run = Tensor::from_array(a, dump::DType::F64);
            error_between(&run, c, step, site, &scenario).0 <= *bound
        })))
    }
}

/// Runs of hypotheses, each replayed from the recorded correct run where its form departs
/// from it, watched by the refuter, and measured at the evidence sites.
pub(crate) struct Replays<'a> {
    pub golden: &'a Dump,
    pub candidate: &'a Dump,
    pub cmp: &'a Comparison,
    pub evidence: &'a Evidence<'a>,
    /// The simulated port at the candidate's dtype.
    pub simulated: &'a AscendOptions,
    /// The correct run, recorded.
    pub recorded: &'a Recorded,
    /// What the runs are made within.
    pub ctx: &'a RunContext,
    pub refuter: Refuter,
    /// Forms that could not be run, each with the reason.
    pub notes: Vec<String>,
}

impl Replays<'_> {
    /// Runs `form` and measures it against the candidate; `None` when it is refuted or
    /// changes nothing here.
    pub fn measure(&mut self, form: &ScopedFault) -> Result<Option<Fit>> {
        let (golden, evidence) = (self.golden, self.evidence);
        let effect = form_effect(form);
        if order(&effect, &evidence.at) == Ordering::Greater {
            return Ok(None);
        }
        // A form narrowed to some layers, steps or a component whose first effect lands
        // on a site the candidate matched is refuted without a run. (Not so the forms
        // acting everywhere, whose effect may stay under the tolerance where it starts,
        // nor a fault the dumped tables do not refute.)
        let narrowed = !form.scope.is_everywhere();
        if narrowed && facts(form.fault).tables_refute && passed(self.cmp, &effect) {
            return Ok(None);
        }
        let watch = self.refuter.watch(form);
        let planned = Plan::scoped(std::slice::from_ref(form));
        let replay = departure(&golden.manifest, &effect).map(|(step, layer)| Replay {
            base: self.recorded,
            step,
            layer,
        });
        let hypothesis = Hypothesis { plan: &planned, replay, watch: watch.clone() };
        let dump = match ascend::run_hypothesis(golden, self.simulated, hypothesis, self.ctx) {
            Ok(dump) => dump,
            Err(e) => {
                self.notes.push(format!("{form} not tried: {e}"));
                return Ok(None);
            }
        };
        if watch.is_some_and(|w| w.stopped()) {
            return Ok(None);
        }
        // A form that changes nothing on this scenario explains nothing.
        let baseline = &self.recorded.dump;
        if fit(&dump, baseline, golden, &evidence.sites)?.errors.iter().all(|&e| e == 0.0) {
            return Ok(None);
        }
        Ok(Some(fit(&dump, self.candidate, golden, &evidence.sites)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::manifest;
    use contract::site::LayerPart;
    use serde_json::json;

    #[test]
    fn a_divergence_at_the_positions_is_explained_only_by_position_faults() {
        let m = manifest(|_| {});
        let got = hypotheses(&(Step::Decode(0), Site::PositionIds), &m, Precision::F32);
        assert_eq!(got, [Fault::RopePosReset, Fault::RopePosFixed, Fault::RopePosOffByOne]);
    }

    #[test]
    fn a_divergence_at_the_prefill_mask_is_explained_only_by_mask_faults_that_can_show() {
        // The tiny scenario has padding but no real token with the pad id, and runs at
        // float32: pad-token masking and the float16 overflow cannot show.
        let m = manifest(|_| {});
        let got = hypotheses(&(Step::Prefill, Site::Mask), &m, Precision::F32);
        assert_eq!(got, [Fault::MaskNone, Fault::MaskInverted, Fault::MaskPaddingIgnored]);
    }

    #[test]
    fn faults_acting_after_the_divergence_are_not_run() {
        let m = manifest(|_| {});
        let first = (Step::Prefill, Site::Layer(0, LayerPart::QRope));
        let got = hypotheses(&first, &m, Precision::F32);
        assert!(got.contains(&Fault::RopeInterleaved), "{got:?}");
        assert!(got.contains(&Fault::NormLayernorm), "{got:?}");
        assert!(!got.contains(&Fault::KvUnrotatedKeys), "{got:?}");
        assert!(!got.contains(&Fault::RopePosReset), "acts in decode: {got:?}");
    }

    #[test]
    fn wrong_theta_is_run_even_where_its_default_form_cannot_show() {
        let m = manifest(|_| {});
        assert!(matches!(
            first_site(Fault::RopeWrongTheta, &m, Precision::F32),
            Visibility::CannotShow(_)
        ));
        let got = hypotheses(&(Step::Prefill, Site::RotaryCos), &m, Precision::F32);
        assert!(got.contains(&Fault::RopeWrongTheta), "{got:?}");
        // Other faults that cannot show are left out: gqa tiling without grouped heads.
        let mha = manifest(|v| v["model"]["num_key_value_heads"] = json!(4));
        let first = (Step::Prefill, Site::Layer(0, LayerPart::Probs));
        assert!(!hypotheses(&first, &mha, Precision::F32).contains(&Fault::KvGqaTiled));
        assert!(hypotheses(&first, &m, Precision::F32).contains(&Fault::KvGqaTiled));
    }

    #[test]
    fn the_fp16_overflow_is_run_only_for_a_float16_candidate() {
        let m = manifest(|_| {});
        let first = (Step::Prefill, Site::Layer(1, LayerPart::Probs));
        assert!(!hypotheses(&first, &m, Precision::Bf16).contains(&Fault::MaskFp16Overflow));
        assert!(hypotheses(&first, &m, Precision::F16).contains(&Fault::MaskFp16Overflow));
    }
}
