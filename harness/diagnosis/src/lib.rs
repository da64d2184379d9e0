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
//! is the recorded run's. Hypotheses are refuted as early as the evidence allows: a divergence that starts at
//! the positions or the mask is explained only by faults acting there, a fault that
//! cannot show on the scenario is not run, and each run is watched site by site
//! ([`Refuter`]): it stops where it departs from a site the candidate matched, or fails
//! the first divergent site.
//!
//! The thresholds are the comparison's own, site by site (the measured noise floor and
//! the user's policy included), so the diagnosis and the verdict judge alike.

mod localise;

pub use localise::localise;

use std::cmp::Ordering;

use compare::tolerance::{Policy, Tolerance};
use compare::{compare_site, Comparison, Status};
use contract::error::Result;
use contract::fault::{Component, Fault, Params, RotaryTable, Scaling, Scope, ScopedFault};
use contract::site::{LayerPart, Site, Step};
use dump::{Dump, Manifest, Precision};
use model::ascend::{self, AscendOptions, Hypothesis};
use model::plan::Plan;
use model::runner::Replay;
use model::RunContext;
use serde::{Deserialize, Serialize};

/// One hypothesis of the diagnosis: a known fault, where it acts and with which
/// parameters (CONTRACT §4), how well it explains the divergence (0..1), and the
/// evidence in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub fault: String,
    pub score: f64,
    /// CONTRACT §4: `{"layers": [2] | "all"}`, with `"steps": [..]` when narrowed to steps
    /// and `"component": name` when narrowed to one; absent in reports written before
    /// scopes were fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<serde_json::Value>,
    /// The fitted parameters (`theta`, `scaling`, `table`, `offset`), empty for the
    /// family's default form.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub params: serde_json::Map<String, serde_json::Value>,
    pub explains: String,
}

impl Finding {
    /// A finding for `planted`, with its scope and parameters in the contract's JSON.
    pub fn new(planted: &ScopedFault, score: f64, explains: String) -> Finding {
        use serde_json::{json, Value};
        let s = &planted.scope;
        let mut scope = serde_json::Map::new();
        scope.insert("layers".into(), s.layers.as_ref().map_or(json!("all"), |l| json!(l)));
        if let Some(steps) = &s.steps {
            scope.insert("steps".into(), json!(steps));
        }
        if let Some(c) = s.component {
            scope.insert("component".into(), json!(c.name()));
        }
        // `rope.wrong_theta` in any but its default form says both its parameters.
        let mut p = planted.params;
        if planted.fault == Fault::RopeWrongTheta && !p.is_default() {
            p.theta = Some(p.theta_or_default());
            p.scaling = Some(p.scaling.unwrap_or(Scaling::Dropped));
        }
        let params = p.json().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Finding {
            fault: planted.fault.id().to_string(),
            score,
            scope: Some(Value::Object(scope)),
            params,
            explains,
        }
    }

    /// The fault with its fitted scope and parameters, as a reader wants it:
    /// `weights.gate_up_swapped {layers: [2]}`, `rope.wrong_theta {theta: 500000,
    /// scaling: dropped}`; the bare ID when it acts everywhere in its default form.
    pub fn label(&self) -> String {
        use serde_json::Value;
        let mut parts = Vec::new();
        if let Some(Value::Object(scope)) = &self.scope {
            for key in ["layers", "steps", "component"] {
                match scope.get(key) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) if s == "all" => {}
                    Some(Value::String(s)) => parts.push(format!("{key}: {s}")),
                    Some(Value::Array(a)) => {
                        let items: Vec<String> = a
                            .iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                            .collect();
                        parts.push(format!("{key}: [{}]", items.join(", ")));
                    }
                    Some(v) => parts.push(format!("{key}: {v}")),
                }
            }
        }
        for (k, v) in &self.params {
            parts
                .push(format!("{k}: {}", v.as_str().map_or_else(|| v.to_string(), str::to_string)));
        }
        if parts.is_empty() {
            self.fault.clone()
        } else {
            format!("{} {{{}}}", self.fault, parts.join(", "))
        }
    }
}

/// What a diagnosis found, best first, and what it could not try.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnosis {
    pub findings: Vec<Finding>,
    /// Hypotheses that could not be run on this golden, each with the reason.
    pub notes: Vec<String>,
}

/// The earliest (step, site) at which a fault can change an activation.
pub fn earliest_effect(fault: Fault) -> (Step, Site) {
    use Fault::*;
    let l0 = |p| Site::Layer(0, p);
    match fault {
        RopePosReset | RopePosFixed | RopePosOffByOne => (Step::Decode(0), Site::PositionIds),
        RopeInterleaved => (Step::Prefill, l0(LayerPart::QRope)),
        RopeCosSinSwapped | RopeWrongTheta | RopeLowPrecisionAngles => {
            (Step::Prefill, Site::RotaryCos)
        }
        MaskNone | MaskInverted | MaskPaddingIgnored | MaskPadTokenMasked | MaskFp16Overflow => {
            (Step::Prefill, Site::Mask)
        }
        NormLayernorm | NormBias | NormEpsOutside | NormNoUpcast | NormWeightUnmapped => {
            (Step::Prefill, l0(LayerPart::InputLayernorm))
        }
        WeightsTransposed => (Step::Prefill, l0(LayerPart::QProj)),
        WeightsGateUpSwapped => (Step::Prefill, l0(LayerPart::Mlp)),
        KvStale | KvWrongSlot => (Step::Decode(0), l0(LayerPart::KCache)),
        KvUnrotatedKeys => (Step::Prefill, l0(LayerPart::KCache)),
        KvGqaTiled | AttnNoScale | AttnSoftmaxLowPrecision => (Step::Prefill, l0(LayerPart::Probs)),
    }
}

/// Whether a planted fault can show on a golden, and where it first does.
#[derive(Debug, Clone, PartialEq)]
pub enum Visibility {
    /// The first (step, site) in compute order whose comparison the fault changes.
    Shows(Step, Site),
    /// The golden's shape or scenario gives the fault nothing to act on.
    CannotShow(String),
}

/// Where `fault`, planted in a run at `precision` of the scenario in `m`, first shows
/// under the contract's comparison rules: [`earliest_effect`] refined by what the
/// model and scenario let the fault act on. Faults whose effect is below a dtype's
/// resolution are not decided here (that is a measurement, see `tests/fault_matrix.rs`).
pub fn first_site(fault: Fault, m: &Manifest, precision: Precision) -> Visibility {
    use Fault::*;
    let c = &m.model;
    let sc = &m.scenario;
    let no = |why: &str| Visibility::CannotShow(why.to_string());
    let (nh, nkv, d, h) = (c.num_attention_heads, c.kv_heads(), c.head_dim(), c.hidden_size);
    let padded = sc.has_padding();
    let (step, site) = earliest_effect(fault);
    match fault {
        RopePosReset | RopePosFixed | RopePosOffByOne | KvStale | KvWrongSlot
            if sc.decode_steps() == 0 =>
        {
            no("no decode step")
        }
        RopeWrongTheta => {
            let rope =
                model::rope::RopeConfig::from_model(c, std::path::Path::new("manifest.json"));
            match rope {
                Ok(r) if r.theta == 10000.0 && r.kind == model::rope::RopeType::Default => {
                    no("the configured rope is already theta 10000 without scaling")
                }
                _ => Visibility::Shows(step, site),
            }
        }
        MaskPaddingIgnored if !padded => no("no padding"),
        MaskPadTokenMasked => {
            let pad = c.extra.get("pad_token_id").and_then(serde_json::Value::as_i64).unwrap_or(0);
            let in_prefill = sc
                .input_ids
                .iter()
                .zip(&sc.attention_mask)
                .any(|(ids, mask)| ids.iter().zip(mask).any(|(&i, &k)| k != 0 && i == pad));
            let in_decode = sc.decode_ids.iter().flatten().any(|&i| i == pad);
            if in_prefill {
                Visibility::Shows(step, site)
            } else if in_decode {
                let j = (0..sc.decode_steps())
                    .find(|&j| sc.decode_ids.iter().any(|r| r.get(j) == Some(&pad)))
                    .unwrap_or(0);
                Visibility::Shows(Step::Decode(j), Site::Mask)
            } else {
                no("no real token has the pad id")
            }
        }
        // The -inf fill itself hides what it should (the mask is compared as a pattern);
        // the NaN of a fully hidden row is a padding query's, which comparisons leave
        // out, until layer 1 reads that row's keys and values at the padding slots.
        MaskFp16Overflow if precision != Precision::F16 => {
            no("the -1e9 fill is finite below float16")
        }
        MaskFp16Overflow if !padded => no("no fully hidden row without padding"),
        MaskFp16Overflow if c.num_hidden_layers < 2 => {
            no("one layer: the NaN rows stay padding rows")
        }
        MaskFp16Overflow => Visibility::Shows(Step::Prefill, Site::Layer(1, LayerPart::Probs)),
        // Each square projection is left untransposed, in the loader's order.
        WeightsTransposed => {
            let l0 = |p| Site::Layer(0, p);
            if nh * d == h {
                Visibility::Shows(step, l0(LayerPart::QProj))
            } else if nkv * d == h {
                Visibility::Shows(step, l0(LayerPart::KProj))
            } else if c.intermediate_size == h {
                Visibility::Shows(step, l0(LayerPart::Mlp))
            } else if c.vocab_size == h {
                Visibility::Shows(step, Site::LmHead)
            } else {
                no("no square projection")
            }
        }
        KvGqaTiled if nkv == 1 || nkv == nh => {
            no("n_rep = 1 or nKV = 1: tiling and grouping agree")
        }
        _ => Visibility::Shows(step, site),
    }
}

fn order(a: &(Step, Site), b: &(Step, Site)) -> Ordering {
    a.0.cmp(&b.0).then_with(|| a.1.compute_order(&b.1))
}

/// How closely a run reproduces the candidate at the evidence sites.
#[derive(Debug, Clone)]
struct Fit {
    /// Error between the run and the candidate at each evidence site, in order:
    /// rel-L2, or the mismatch fraction for integer sites and the mask (capped at 10).
    errors: Vec<f64>,
    /// What the error at the first divergent site measures.
    first_measure: &'static str,
}

impl Fit {
    fn at_first(&self) -> f64 {
        self.errors.first().copied().unwrap_or(f64::INFINITY)
    }

    fn mean(&self) -> f64 {
        if self.errors.is_empty() {
            f64::INFINITY
        } else {
            self.errors.iter().sum::<f64>() / self.errors.len() as f64
        }
    }

    fn median(&self) -> f64 {
        let mut v = self.errors.clone();
        if v.is_empty() {
            return f64::INFINITY;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Evidence sites where the error is at most that site's bound.
    fn matched_each(&self, bounds: &[f64]) -> usize {
        self.errors.iter().zip(bounds).filter(|(e, b)| e <= b).count()
    }

    /// The median evidence site is within its bound: the median of `error / bound` is
    /// at most 1 (with one common bound, the median error against it).
    fn within(&self, bounds: &[f64]) -> bool {
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

/// Ranks the known faults that explain `cmp`'s divergence, best first. Empty when the
/// comparison passed, when the golden has no weights, or when no fault fits well.
///
/// A hypothesis is accepted only when its run lies within the tolerance that the
/// comparison applied at the first divergent site (the user's policy, at the coarser of
/// the two dtypes) or within three times the noise floor, whichever is wider. A
/// hypothesis that cannot run on this golden is said in [`Diagnosis::notes`]. The runs
/// are made within `ctx`.
pub fn diagnose(
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
    ctx: &RunContext,
) -> Result<Diagnosis> {
    let Some(first) = cmp.first_divergence() else { return Ok(Diagnosis::default()) };
    if !golden.has_weights() {
        return Ok(Diagnosis::default());
    }
    let first_at = (first.step, first.site.clone());
    // Evidence: the first divergent site and every site the candidate dumped after it
    // that was measured.
    let evidence: Vec<(Step, Site)> = cmp
        .sites
        .iter()
        .filter(|s| matches!(s.status, Status::Pass | Status::Fail))
        .map(|s| (s.step, s.site.clone()))
        .filter(|k| order(k, &first_at) != Ordering::Less)
        .collect();
    let precision = candidate.manifest.dtype;
    // The simulated port at the candidate's dtype, with the candidate's framework's mask
    // fill: the two fills differ on a padding query's fully hidden row, which reaches
    // later layers once a fault lets padding keys be read.
    let simulated = AscendOptions::for_framework(precision, candidate.manifest.framework());
    // The correct run, recorded: a hypothesis is replayed from it at the step and layer
    // where its fault first acts (block replay), everything before being the same.
    let recorded = ascend::run_recorded(golden, &simulated, ctx)?;
    let baseline = &recorded.dump;
    let clean = fit(baseline, candidate, golden, &evidence)?;
    // The noise floor: how far a correct simulation is from the correct golden here.
    let floor = fit(baseline, golden, golden, &evidence)?.median();
    // The threshold the comparison itself applied at each evidence site (every checked
    // site carries one; integer and mask sites take the first site's).
    let default_tol = Tolerance::default_for(cmp.golden_precision.coarser(cmp.candidate_precision));
    let first_tol = first.tolerance.unwrap_or(default_tol).max_rel_l2;
    let thresholds: Vec<f64> = evidence
        .iter()
        .map(|(step, site)| {
            let s = cmp.sites.iter().find(|s| s.step == *step && &s.site == site);
            match s {
                Some(s) if s.metrics.as_ref().and_then(|m| m.values()).is_some() => {
                    s.tolerance.map_or(first_tol, |t| t.max_rel_l2)
                }
                _ => first_tol,
            }
        })
        .collect();
    let accepts: Vec<f64> = thresholds.iter().map(|t| (3.0 * floor).max(*t)).collect();
    let accept = accepts.first().copied().unwrap_or((3.0 * floor).max(first_tol));
    let mut notes = Vec::new();
    let mut refuter = Refuter::new(golden, candidate, cmp, baseline, &first_at, default_tol)?;
    // A candidate the correct run reproduces within the comparison's own thresholds (the
    // measured floor and the user's policy included) is within the floor: nothing to
    // explain. (Positions and masks are exact: a mismatch there is never rounding.)
    let first_is_values = first.metrics.as_ref().and_then(|m| m.values()).is_some();
    if first_is_values
        && clean.at_first() <= thresholds.first().copied().unwrap_or(first_tol)
        && clean.within(&thresholds)
    {
        notes.push(format!(
            "no fault named: a correct run reproduces the candidate within the thresholds ({} {:.1e} at {} {}; {} of {} evidence sites within)",
            clean.first_measure,
            clean.at_first(),
            first.step,
            first.site,
            clean.matched_each(&thresholds),
            clean.errors.len()
        ));
        return Ok(Diagnosis { findings: Vec::new(), notes });
    }
    // A hypothesis must reproduce the first divergent site (within the acceptance
    // threshold and four times closer than the correct run, as `explains` asks): its run
    // stops there if not.
    refuter.require(candidate, &first_at, accept.min(0.25 * clean.at_first()))?;
    let mut found = Vec::new();
    let n_layers = golden.manifest.model.num_hidden_layers;
    for fault in Fault::ALL {
        if order(&earliest_effect(fault), &first_at) == Ordering::Greater {
            continue;
        }
        if fault == Fault::MaskFp16Overflow && precision != Precision::F16 {
            continue;
        }
        // Positions and the mask are computed from the scenario alone: a divergence that
        // starts there is explained only by a fault that acts there.
        if matches!(first_at.1, Site::PositionIds | Site::Mask)
            && earliest_effect(fault).1 != first_at.1
        {
            continue;
        }
        // A fault with nothing to act on in this scenario changes nothing (a theta fault
        // excepted: its other bases act on any rope).
        if fault != Fault::RopeWrongTheta
            && matches!(first_site(fault, &golden.manifest, precision), Visibility::CannotShow(_))
        {
            continue;
        }
        // Runs one form and measures it; `None` when it is refuted or changes nothing here.
        let mut measure = |form: &ScopedFault| -> Result<Option<Fit>> {
            let effect = form_effect(form);
            if order(&effect, &first_at) == Ordering::Greater {
                return Ok(None);
            }
            // A form narrowed to some layers, steps or a component whose first effect lands
            // on a site the candidate matched is refuted without a run. (Not so the forms
            // acting everywhere, whose effect may stay under the tolerance where it starts,
            // nor swapped tables, which a port may swap only where it applies them.)
            let narrowed = !form.scope.is_everywhere();
            if narrowed && fault != Fault::RopeCosSinSwapped && passed(cmp, &effect) {
                return Ok(None);
            }
            let watch = refuter.watch(form);
            let planned = Plan::scoped(std::slice::from_ref(form));
            let replay = departure(golden, &effect).map(|(step, layer)| Replay {
                base: &recorded,
                step,
                layer,
            });
            let hypothesis = Hypothesis { plan: &planned, replay, watch: watch.clone() };
            let dump = match ascend::run_hypothesis(golden, &simulated, hypothesis, ctx) {
                Ok(dump) => dump,
                Err(e) => {
                    notes.push(format!("{form} not tried: {e}"));
                    return Ok(None);
                }
            };
            if watch.is_some_and(|w| w.stopped()) {
                return Ok(None);
            }
            // A form that changes nothing on this scenario explains nothing.
            if fit(&dump, baseline, golden, &evidence)?.errors.iter().all(|&e| e == 0.0) {
                return Ok(None);
            }
            Ok(Some(fit(&dump, candidate, golden, &evidence)?))
        };
        // It must reproduce the first divergent site and most sites after it, and be far
        // closer to the candidate than the correct run is. The median tolerates a few
        // sites where a port's variant of the fault differs from the simulated one (tables
        // swapped where dumped or only where applied, say).
        let explains = |f: &Fit| {
            f.at_first() <= accept
                && f.at_first() <= 0.25 * clean.at_first()
                && f.within(&accepts)
                && f.mean() <= 0.5 * clean.mean()
        };
        // Strictly better only: on a tie the earlier (plainer) form stays.
        let better = |f: &Fit, best: &Option<(ScopedFault, Fit)>| {
            best.as_ref().is_none_or(|(_, b)| f.mean() < b.mean() * (1.0 - 1e-9))
        };
        // The family's default form, then the narrower scopes and other parameters that
        // start where the divergence does; the best fit of the family is kept.
        let mut best: Option<(ScopedFault, Fit)> = None;
        // The closest form scoped to the first divergent layer alone, accepted or not.
        let mut seed: Option<(ScopedFault, Fit)> = None;
        // A form that reproduces the candidate exactly cannot be bettered.
        let exact =
            |best: &Option<(ScopedFault, Fit)>| best.as_ref().is_some_and(|(_, b)| b.mean() == 0.0);
        for form in forms(fault, &first_at, golden, candidate)? {
            if exact(&best) {
                break;
            }
            let Some(f) = measure(&form)? else { continue };
            if explains(&f) && better(&f, &best) {
                best = Some((form.clone(), f.clone()));
            }
            if form.scope.layers.as_ref().is_some_and(|l| l.len() == 1) && better(&f, &seed) {
                seed = Some((form, f));
            }
        }
        // Widen that scope one layer at a time while the evidence fits better.
        if let Some((mut form, mut f)) = seed.filter(|_| !exact(&best)) {
            while let Some(wider) = widened(&form, n_layers) {
                match measure(&wider)? {
                    Some(g) if g.mean() < f.mean() * (1.0 - 1e-9) => (form, f) = (wider, g),
                    _ => break,
                }
                if explains(&f) && better(&f, &best) {
                    best = Some((form.clone(), f.clone()));
                }
            }
        }
        let Some((form, f)) = best else { continue };
        // The share of the divergence (mean error over the evidence) the fault explains.
        let score = (1.0 - ratio(f.mean(), clean.mean())).clamp(0.0, 1.0);
        let explains = format!(
            "{} {} matches a run with {}: {} {:.1e} against {:.1e} for the correct run; {} of {} evidence sites within {:.0e} at the first and their own thresholds after it (mean error {:.1e} against {:.1e})",
            first.step,
            first.site,
            form,
            f.first_measure,
            f.at_first(),
            clean.at_first(),
            f.matched_each(&accepts),
            f.errors.len(),
            accept,
            f.mean(),
            clean.mean()
        );
        let explains = match detail(fault, golden, candidate, cmp)? {
            Some(d) => format!("{d}; {explains}"),
            None => explains,
        };
        found.push(Finding::new(&form, score, explains));
    }
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(Diagnosis { findings: found, notes })
}

/// Refutes a hypothesis while it runs: at the sites before the first divergence that
/// the candidate matched, a run far from the candidate (beyond three times the larger
/// of the site's threshold and the correct run's own distance from the candidate)
/// would have failed where the candidate passed, so it cannot be the candidate's fault,
/// and its run stops there instead of computing every later layer and step.
struct Refuter {
    /// `"<step>/<site>"` → the candidate's tensor and the bound on a run's error from it.
    sites: std::sync::Arc<std::collections::HashMap<String, (dump::Tensor, f64)>>,
    scenario: std::sync::Arc<dump::Scenario>,
}

impl Refuter {
    fn new(
        golden: &Dump,
        candidate: &Dump,
        cmp: &Comparison,
        baseline: &Dump,
        first: &(Step, Site),
        default_tol: Tolerance,
    ) -> Result<Refuter> {
        let scenario = &golden.manifest.scenario;
        let mut sites = std::collections::HashMap::new();
        for s in cmp.sites.iter().filter(|s| s.status == Status::Pass) {
            if order(&(s.step, s.site.clone()), first) != Ordering::Less {
                continue;
            }
            let (Some(c), Some(b)) =
                (candidate.get(s.step, &s.site)?, baseline.get(s.step, &s.site)?)
            else {
                continue;
            };
            let (clean, _) = error_between(&b, &c, s.step, &s.site, scenario);
            let bound = if s.metrics.as_ref().and_then(|m| m.values()).is_some() {
                3.0 * s.tolerance.unwrap_or(default_tol).max_rel_l2.max(clean)
            } else {
                clean
            };
            sites.insert(contract::site::key(s.step, &s.site), (c, bound));
        }
        Ok(Refuter {
            sites: std::sync::Arc::new(sites),
            scenario: std::sync::Arc::new(scenario.clone()),
        })
    }

    /// Adds `at` with its own bound: a run farther than `bound` from the candidate there
    /// is refuted.
    fn require(&mut self, candidate: &Dump, at: &(Step, Site), bound: f64) -> Result<()> {
        if let Some(c) = candidate.get(at.0, &at.1)? {
            let mut sites = (*self.sites).clone();
            sites.insert(contract::site::key(at.0, &at.1), (c, bound));
            self.sites = std::sync::Arc::new(sites);
        }
        Ok(())
    }

    /// The watch for one form's run; `None` when there is nothing to refute it by. A
    /// port may swap the rotary tables only where it applies them, so the dumped tables
    /// do not refute `rope.cos_sin_swapped`.
    fn watch(&self, form: &ScopedFault) -> Option<std::sync::Arc<model::llama::Watch>> {
        if self.sites.is_empty() {
            return None;
        }
        let (sites, scenario) = (self.sites.clone(), self.scenario.clone());
        let tables_free = form.fault == Fault::RopeCosSinSwapped;
        Some(std::sync::Arc::new(model::llama::Watch::new(move |step, site, a| {
            if tables_free && matches!(site, Site::RotaryCos | Site::RotarySin) {
                return true;
            }
            let Some((c, bound)) = sites.get(&contract::site::key(step, site)) else {
                return true;
            };
            let run = dump::Tensor::from_array(a, dump::DType::F64);
            error_between(&run, c, step, site, &scenario).0 <= *bound
        })))
    }
}

/// The error between a run's tensor and a target's at one site: rel-L2, or the mismatch
/// fraction for integer sites and the mask (capped at 10), and whether it is rel-L2.
fn error_between(
    run: &dump::Tensor,
    target: &dump::Tensor,
    step: Step,
    site: &Site,
    scenario: &dump::Scenario,
) -> (f64, bool) {
    let res =
        compare_site(step, site, run, Some(target), scenario, &Policy::default(), Precision::F32);
    let e = res.metrics.as_ref().map_or(f64::INFINITY, |m| m.error());
    let values = matches!(res.metrics, Some(compare::SiteMetrics::Values(_)));
    (if e.is_finite() { e.min(10.0) } else { 10.0 }, values)
}

/// The forms of `fault` worth trying for a divergence that starts at `first`: the
/// contract's default form first, then the scopes that begin where the divergence does
/// (the first divergent layer alone, widened later as the evidence asks; decode steps only when the
/// divergence starts in decode; the component whose site diverges first), and the
/// parameters a family takes (a grid over theta and scaling, the position offset the
/// candidate's positions show, a cache slot offset, the sliced rotary table).
fn forms(
    fault: Fault,
    first: &(Step, Site),
    golden: &Dump,
    candidate: &Dump,
) -> Result<Vec<ScopedFault>> {
    let (step, site) = first;
    let mut layer_scopes: Vec<Option<Vec<usize>>> = vec![None];
    if fault.takes_layers() {
        if let Site::Layer(l, _) = site {
            layer_scopes.push(Some(vec![*l]));
        }
    }
    let mut step_scopes: Vec<Option<Vec<String>>> = vec![None];
    let decode_only = matches!(earliest_effect(fault).0, Step::Decode(_));
    if fault.takes_steps() && !decode_only && matches!(step, Step::Decode(_)) {
        step_scopes.push(Some(vec!["decode.*".to_string()]));
    }
    let family = fault.components();
    let mut components: Vec<Option<Component>> = vec![None];
    if !family.is_empty() {
        let at: Vec<Component> =
            components_at(site).into_iter().filter(|c| family.contains(c)).collect();
        components.extend(if at.is_empty() { family } else { at }.into_iter().map(Some));
    }
    let params = param_grid(fault, golden, candidate)?;
    let mut out = Vec::new();
    for layers in &layer_scopes {
        for component in &components {
            for steps in &step_scopes {
                for p in &params {
                    let form = ScopedFault {
                        fault,
                        scope: Scope {
                            layers: layers.clone(),
                            steps: steps.clone(),
                            component: *component,
                        },
                        params: *p,
                    };
                    if !out.contains(&form) {
                        out.push(form);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `form` with its layer scope grown by the next layer, when it is a run of layers that
/// stops before the last one.
fn widened(form: &ScopedFault, n_layers: usize) -> Option<ScopedFault> {
    let layers = form.scope.layers.as_ref()?;
    let (&lo, &hi) = (layers.first()?, layers.last()?);
    if hi + 1 >= n_layers || layers.len() != hi - lo + 1 {
        return None;
    }
    let mut wider = form.clone();
    wider.scope.layers = Some((lo..=hi + 1).collect());
    Some(wider)
}

/// Whether the comparison checked `at` and found it within the thresholds.
fn passed(cmp: &Comparison, at: &(Step, Site)) -> bool {
    cmp.sites.iter().any(|s| s.step == at.0 && s.site == at.1 && s.status == Status::Pass)
}

/// Where a run with `form` planted departs from the correct run of `golden`'s scenario
/// (nothing before it differs): the index of its step among the golden's steps, and its
/// decoder layer (all of them for the final norm and `lm_head`, none for the sites
/// before the layers). A hypothesis is replayed from there.
pub fn departure_of(golden: &Dump, form: &ScopedFault) -> Option<(usize, usize)> {
    departure(golden, &form_effect(form))
}

fn departure(golden: &Dump, effect: &(Step, Site)) -> Option<(usize, usize)> {
    let step = golden.manifest.steps.iter().position(|s| *s == effect.0)?;
    let layer = match effect.1 {
        Site::Layer(l, _) => l,
        Site::Norm | Site::LmHead => golden.manifest.model.num_hidden_layers,
        _ => 0,
    };
    Some((step, layer))
}

/// The components whose own site is `site`.
fn components_at(site: &Site) -> Vec<Component> {
    use LayerPart::*;
    match site {
        Site::Norm => vec![Component::ModelNorm],
        Site::Layer(_, part) => match part {
            InputLayernorm => vec![Component::InputLayernorm],
            PostAttentionLayernorm => vec![Component::PostAttentionLayernorm],
            QProj => vec![Component::QProj],
            KProj => vec![Component::KProj],
            VProj => vec![Component::VProj],
            OProj => vec![Component::OProj],
            Mlp => vec![Component::GateProj, Component::UpProj, Component::DownProj],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The site where `component` of layer `layer` is first seen.
fn component_site(component: Component, layer: usize) -> Site {
    use LayerPart::*;
    let part = match component {
        Component::ModelNorm => return Site::Norm,
        Component::InputLayernorm => InputLayernorm,
        Component::PostAttentionLayernorm => PostAttentionLayernorm,
        Component::QProj => QProj,
        Component::KProj => KProj,
        Component::VProj => VProj,
        Component::OProj => OProj,
        Component::GateProj | Component::UpProj | Component::DownProj => Mlp,
    };
    Site::Layer(layer, part)
}

/// The earliest (step, site) at which `form` can change an activation: the family's
/// [`earliest_effect`] moved to the first layer, step and component of its scope.
fn form_effect(form: &ScopedFault) -> (Step, Site) {
    let (mut step, mut site) = earliest_effect(form.fault);
    let l0 = form.scope.layers.as_ref().and_then(|l| l.first().copied()).unwrap_or(0);
    if let Some(c) = form.scope.component {
        site = component_site(c, l0);
    } else if let Site::Layer(_, part) = site {
        site = Site::Layer(l0, part);
    }
    if let Some(steps) = &form.scope.steps {
        if !steps.iter().any(|p| p == "prefill") {
            let first_decode = steps
                .iter()
                .filter_map(|p| match Step::parse(p) {
                    Some(Step::Decode(j)) => Some(j),
                    _ => (p == "decode.*").then_some(0),
                })
                .min()
                .unwrap_or(0);
            step = step.max(Step::Decode(first_decode));
        }
    }
    (step, site)
}

/// The parameter sets to try for `fault`, its default form first.
fn param_grid(fault: Fault, golden: &Dump, candidate: &Dump) -> Result<Vec<Params>> {
    let mut out = vec![Params::default()];
    match fault {
        Fault::RopeWrongTheta => {
            let configured = model::rope::RopeConfig::from_model(
                &golden.manifest.model,
                std::path::Path::new("manifest.json"),
            )
            .map(|r| r.theta)
            .unwrap_or(10000.0);
            let mut thetas = vec![10000.0, configured, 500000.0, 1000000.0];
            // The bases that best reproduce the candidate's own rotary tables.
            for keep in [false, true] {
                if let Some(t) = fit_theta(golden, candidate, keep)? {
                    if thetas.iter().all(|g| (t / g - 1.0).abs() > 1e-3) {
                        thetas.push(t);
                    }
                }
            }
            thetas.dedup_by(|a, b| a == b);
            for theta in thetas {
                for scaling in [Scaling::Dropped, Scaling::Kept] {
                    // The configured theta with its scaling is the correct run.
                    if theta == configured && scaling == Scaling::Kept {
                        continue;
                    }
                    if theta == 10000.0 && scaling == Scaling::Dropped {
                        continue;
                    }
                    out.push(Params {
                        theta: Some(theta),
                        scaling: Some(scaling),
                        ..Params::default()
                    });
                }
            }
        }
        Fault::RopeInterleaved => {
            out.push(Params { table: Some(RotaryTable::Sliced), ..Params::default() });
        }
        Fault::RopePosOffByOne => {
            let offsets = match position_offset(golden, candidate)? {
                Some(d) if d != 1 && d != 0 => vec![d],
                Some(_) => Vec::new(),
                None => vec![2, 3, -1],
            };
            out.extend(
                offsets.into_iter().map(|o| Params { offset: Some(o), ..Params::default() }),
            );
        }
        Fault::KvWrongSlot => {
            // A write that lands past the cache at every step is `kv.stale`, not this.
            let steps = golden.manifest.scenario.decode_steps() as i64;
            out.extend(
                [2, 3]
                    .into_iter()
                    .filter(|&o| o < steps)
                    .map(|o| Params { offset: Some(o), ..Params::default() }),
            );
        }
        _ => {}
    }
    Ok(out)
}

/// The base theta whose rotary sin table (the configured scaling dropped, or kept)
/// comes closest to the candidate's prefill `model.rotary_emb.sin`: a grid over log10
/// theta from 2 to 8, then a golden-section search in the best cell, rounded to three
/// significant digits. `None` when the candidate did not dump the table.
fn fit_theta(golden: &Dump, candidate: &Dump, keep_scaling: bool) -> Result<Option<f64>> {
    use model::numerics::Exact;
    use model::plan::{AnglePrecision, RopeFrequencies};
    use model::rope::{Rope, RopeConfig};
    let (Some(sin), Some(pos)) = (
        candidate.get(Step::Prefill, &Site::RotarySin)?,
        golden.get(Step::Prefill, &Site::PositionIds)?,
    ) else {
        return Ok(None);
    };
    let config =
        RopeConfig::from_model(&golden.manifest.model, std::path::Path::new("manifest.json"))?;
    let Ok(pos) = pos.to_array().into_dimensionality::<ndarray::Ix2>() else { return Ok(None) };
    let pos = pos.mapv(|p| p as i64);
    let target = sin.to_f64_vec();
    let numerics = Exact::new(Precision::F32);
    let error = |log_theta: f64| -> f64 {
        let frequencies = RopeFrequencies::Wrong { theta: 10f64.powf(log_theta), keep_scaling };
        let mut rope = Rope::new(config.clone(), frequencies, AnglePrecision::Numerics);
        let (_, s) = rope.tables(&pos, &numerics);
        if s.len() != target.len() {
            return f64::INFINITY;
        }
        // Relative: the small angles of the slow frequencies are where theta shows.
        s.iter().zip(&target).map(|(a, b)| ((a - b) / b.abs().max(1e-6)).powi(2)).sum()
    };
    let best = (0..=120)
        .map(|i| 2.0 + 0.05 * f64::from(i))
        .map(|x| (x, error(x)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(4.0, |(x, _)| x);
    // Golden-section search in the best cell: one new evaluation a step.
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = (best - 0.05, best + 0.05);
    let (mut a, mut b) = (hi - r * (hi - lo), lo + r * (hi - lo));
    let (mut ea, mut eb) = (error(a), error(b));
    for _ in 0..60 {
        if ea < eb {
            (hi, b, eb) = (b, a, ea);
            a = hi - r * (hi - lo);
            ea = error(a);
        } else {
            (lo, a, ea) = (a, b, eb);
            b = lo + r * (hi - lo);
            eb = error(b);
        }
    }
    let theta = 10f64.powf((lo + hi) / 2.0);
    let magnitude = 10f64.powf(theta.log10().floor() - 2.0);
    Ok(Some((theta / magnitude).round() * magnitude))
}

/// How far the candidate's decode positions are from the golden's at the first decode
/// step where they differ, when every row is off by the same amount (0 when they are
/// those of another position fault).
fn position_offset(golden: &Dump, candidate: &Dump) -> Result<Option<i64>> {
    for &step in golden.manifest.steps.iter().filter(|s| matches!(s, Step::Decode(_))) {
        let (Some(g), Some(c)) =
            (golden.get(step, &Site::PositionIds)?, candidate.get(step, &Site::PositionIds)?)
        else {
            continue;
        };
        let (g, c) = (g.to_f64_vec(), c.to_f64_vec());
        if g == c {
            continue;
        }
        // Positions that restart at the step index or stay at 0 are `rope.pos_reset` and
        // `rope.pos_fixed`, whatever offset they happen to equal for one row.
        let Step::Decode(j) = step else { continue };
        if c.iter().all(|&x| x == j as f64) || c.iter().all(|&x| x == 0.0) {
            return Ok(Some(0));
        }
        let d: Vec<f64> = c.iter().zip(&g).map(|(c, g)| c - g).collect();
        return Ok(if g.len() == c.len() && d.iter().all(|x| *x == d[0]) {
            Some(d[0] as i64)
        } else {
            None
        });
    }
    Ok(None)
}

/// Measures `run` against `target` at the evidence sites (padding handled as in
/// comparisons, with `golden`'s scenario).
fn fit(run: &Dump, target: &Dump, golden: &Dump, evidence: &[(Step, Site)]) -> Result<Fit> {
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

/// Evidence in the terms of the fault itself, where the candidate dumped what it needs:
/// the positions a position fault fed, the keys a mask fault shows or hides.
fn detail(
    fault: Fault,
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
) -> Result<Option<String>> {
    use Fault::*;
    match fault {
        RopePosReset | RopePosFixed | RopePosOffByOne => {
            for &step in golden.manifest.steps.iter().filter(|s| matches!(s, Step::Decode(_))) {
                let (Some(g), Some(c)) = (
                    golden.get(step, &Site::PositionIds)?,
                    candidate.get(step, &Site::PositionIds)?,
                ) else {
                    continue;
                };
                let (g, c) = (g.to_f64_vec(), c.to_f64_vec());
                if g != c {
                    let list =
                        |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
                    return Ok(Some(format!(
                        "{step} was fed positions [{}] instead of [{}]",
                        list(&c),
                        list(&g)
                    )));
                }
            }
            Ok(None)
        }
        MaskNone | MaskInverted | MaskPaddingIgnored | MaskPadTokenMasked => {
            let site = cmp.sites.iter().find(|s| s.site == Site::Mask && s.status == Status::Fail);
            Ok(site.and_then(|s| match &s.metrics {
                Some(compare::SiteMetrics::Visibility { mismatches, golden_visible, candidate_visible, .. }) => Some(format!(
                    "{} mask shows {candidate_visible} (query, key) pairs where the golden shows {golden_visible}; {mismatches} differ",
                    s.step
                )),
                _ => None,
            }))
        }
        _ => Ok(None),
    }
}
