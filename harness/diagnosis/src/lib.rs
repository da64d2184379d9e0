//! Stage 5, diagnosis: names the known porting fault behind a divergence. Uses the
//! model (to rerun the golden's scenario under each hypothesis) and the comparison;
//! knows nothing of reports.
//!
//! Each fault of CONTRACT §3 is a hypothesis. For a divergent candidate whose golden
//! carries weights, the harness reruns the golden's scenario with the simulated port
//! (the `ascend` implementation, at the candidate's dtype) once without a fault and
//! once per hypothesis with that fault planted, and measures how well each run
//! reproduces the candidate at the evidence sites: the first divergent site and every
//! site the candidate dumped after it. A hypothesis explains the divergence when its
//! run is much closer to the candidate than the fault-free run is, and about as close
//! as a correct simulation is to a correct HF run (the noise floor). A poor fit is
//! never presented as a finding.
//!
//! Each fault is tried in several forms (CONTRACT §4): its default form, narrowed to the
//! first divergent layer (then widened a layer at a time while the evidence fits
//! better), to decode steps or to the component whose site diverges first, and with the
//! parameters its family takes (a theta grid and a base fitted to the candidate's rotary
//! table, the offset its positions show, ...). Each family keeps its best form, which
//! the finding reports with its scope and parameters.
//!
//! Only hypotheses whose earliest effect lies at or before the first divergent site
//! are run: a fault cannot explain a divergence that begins before it acts. A
//! hypothesis whose run equals the correct run at every evidence site (a padding fault
//! on a golden without padding, say) changes nothing here and is never accepted, and a
//! candidate that the correct run already reproduces within the thresholds is within
//! the noise floor: no fault is named for it.
//!
//! The correct run is recorded once, and each hypothesis is replayed from the step and
//! layer where its form first acts ([`departure_of`]; block replay): everything before
//! is the recorded run's. Hypotheses are refuted as early as the evidence allows: a
//! divergence that starts at the positions or the mask is explained only by faults
//! acting there, a fault that cannot show on the scenario is not run, and each run is
//! watched site by site: it stops where it departs from a site the candidate matched,
//! or fails the first divergent site.
//!
//! The thresholds are the comparison's own, site by site (the measured noise floor and
//! the user's policy included), so the diagnosis and the verdict judge alike.
//!
//! The modules, in the order a diagnosis uses them:
//!
//! - `faults`: the one table of what the diagnosis knows of each fault;
//! - `visibility`: where a fault first acts, and whether a golden lets it show;
//! - `evidence`: what the comparison shows (first divergence, evidence sites and their
//!   thresholds, the evidence in a fault's own terms);
//! - `fit`: how closely a run reproduces a target at the evidence sites;
//! - `forms` and `params`: the forms of a family worth trying, and the parameter fits;
//! - `refutation`: which hypotheses are run, and their replayed, watched runs;
//! - `acceptance`: when a form explains the divergence, which one a family keeps, the
//!   score and the ranking;
//! - `finding`: what is handed on;
//! - `localise`: where a divergence starts, said when no fault explains it.

mod acceptance;
mod evidence;
mod faults;
mod finding;
mod fit;
mod forms;
mod localise;
mod params;
mod refutation;
#[cfg(test)]
mod testing;
mod train;
mod visibility;

pub use finding::{Diagnosis, Finding};
pub use forms::departure_of;
pub use localise::localise;
pub use train::forward_as_prefill;
pub use visibility::{earliest_effect, first_site, Visibility};

use compare::Comparison;
use contract::error::Result;
use dump::Dump;
use model::ascend::{self, AscendOptions};
use model::RunContext;

use acceptance::{best_form, rank, Acceptance};
use evidence::Evidence;
use fit::fit;
use refutation::{hypotheses, Refuter, Replays};

/// Ranks the known faults that explain `cmp`'s divergence, best first. Empty when the
/// comparison passed, when the golden has no weights, or when no fault fits well.
///
/// A hypothesis is accepted only when its run lies within the tolerance that the
/// comparison applied at the first divergent site (the user's policy, at the coarser of
/// the two dtypes) or within the comparison's margin ([`compare::floor::MARGIN`]) times
/// the noise floor, whichever is wider. A hypothesis that cannot run on this golden is
/// said in [`Diagnosis::notes`]. The runs are made within `ctx`.
pub fn diagnose(
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
    ctx: &RunContext,
) -> Result<Diagnosis> {
    let Some(evidence) = Evidence::of(cmp) else { return Ok(Diagnosis::default()) };
    if golden.manifest.train.is_some() {
        return train::diagnose(golden, candidate, cmp, ctx);
    }
    if !golden.has_weights() {
        return Ok(Diagnosis::default());
    }
    // The simulated port at the candidate's dtype, with the candidate's framework's mask
    // fill: the two fills differ on a padding query's fully hidden row, which reaches
    // later layers once a fault lets padding keys be read.
    let precision = candidate.manifest.dtype;
    let simulated = AscendOptions::for_framework(precision, candidate.manifest.framework());
    // The correct run, recorded: a hypothesis is replayed from it at the step and layer
    // where its fault first acts (block replay), everything before being the same.
    let recorded = ascend::run_recorded(golden, &simulated, ctx)?;
    let baseline = &recorded.dump;
    let clean = fit(baseline, candidate, golden, &evidence.sites)?;
    // The noise floor: how far a correct simulation is from the correct golden here.
    let floor = fit(baseline, golden, golden, &evidence.sites)?.median();
    let acceptance = Acceptance::new(&evidence, clean, floor);
    let mut refuter = Refuter::new(golden, candidate, cmp, baseline, &evidence)?;
    if let Some(note) = acceptance.within_floor(&evidence) {
        return Ok(Diagnosis { findings: Vec::new(), notes: vec![note] });
    }
    // A hypothesis must reproduce the first divergent site: its run stops there if not.
    refuter.require(candidate, &evidence.at, acceptance.first_bound())?;
    let mut replays = Replays {
        golden,
        candidate,
        cmp,
        evidence: &evidence,
        simulated: &simulated,
        recorded: &recorded,
        ctx,
        refuter,
        notes: Vec::new(),
    };
    let n_layers = golden.manifest.model.num_hidden_layers;
    let mut findings = Vec::new();
    for fault in hypotheses(&evidence.at, &golden.manifest, precision) {
        let params = params::param_grid(fault, golden, candidate)?;
        let forms = forms::forms(fault, &evidence.at, &params);
        let kept = best_form(forms, n_layers, &acceptance, |form| replays.measure(form))?;
        let Some((form, f)) = kept else { continue };
        let detail = evidence::detail(fault, golden, candidate, cmp)?;
        findings.push(acceptance.finding(&evidence, &form, &f, detail));
    }
    rank(&mut findings);
    Ok(Diagnosis { findings, notes: replays.notes })
}
