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
//! Only hypotheses whose earliest effect lies at or before the first divergent site
//! are run: a fault cannot explain a divergence that begins before it acts. A
//! hypothesis whose run equals the correct run at every evidence site (a padding fault
//! on a golden without padding, say) changes nothing here and is never accepted, and a
//! candidate that the correct run already reproduces within the thresholds is within
//! the noise floor: no fault is named for it.
//!
//! The thresholds are the comparison's own, site by site (the measured noise floor and
//! the user's policy included), so the diagnosis and the verdict judge alike.

mod localise;

pub use localise::localise;

use std::cmp::Ordering;

use crate::compare::tolerance::{Policy, Tolerance};
use crate::compare::{compare_site, Comparison, Status};
use crate::contract::error::Result;
use crate::contract::fault::Fault;
use crate::contract::site::{LayerPart, Site, Step};
use crate::dump::{Dump, Manifest, Precision};
use crate::model::{self, Implementation, RunOptions};
use serde::{Deserialize, Serialize};

/// One hypothesis of the diagnosis: a known fault, how well it explains the divergence
/// (0..1), and the evidence in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub fault: String,
    pub score: f64,
    pub explains: String,
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
            let rope = crate::model::rope::RopeConfig::from_model(
                c,
                std::path::Path::new("manifest.json"),
            );
            match rope {
                Ok(r) if r.theta == 10000.0 && r.kind == crate::model::rope::RopeType::Default => {
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
/// hypothesis that cannot run on this golden is said in [`Diagnosis::notes`].
pub fn diagnose(golden: &Dump, candidate: &Dump, cmp: &Comparison) -> Result<Diagnosis> {
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
    let run = |faults: Vec<Fault>| -> Result<Dump> {
        let opts = RunOptions {
            implementation: Implementation::Ascend,
            precision: Some(precision),
            faults: faults.into_iter().map(Into::into).collect(),
            teacher_force: false,
        };
        Ok(model::run(golden, &opts)?.dump)
    };
    let baseline = run(Vec::new())?;
    let clean = fit(&baseline, candidate, golden, &evidence)?;
    // The noise floor: how far a correct simulation is from the correct golden here.
    let floor = fit(&baseline, golden, golden, &evidence)?.median();
    // The threshold the comparison itself applied at each evidence site (every checked
    // site carries one; integer and mask sites take the first site's).
    let default_tol = Tolerance::default_for(cmp.golden_precision.coarser(cmp.candidate_precision));
    let first_tol = first.tolerance.unwrap_or(default_tol).max_rel_l2;
    let accepts: Vec<f64> = evidence
        .iter()
        .map(|(step, site)| {
            let s = cmp.sites.iter().find(|s| s.step == *step && &s.site == site);
            let t = match s {
                Some(s) if s.metrics.as_ref().and_then(|m| m.values()).is_some() => {
                    s.tolerance.map_or(first_tol, |t| t.max_rel_l2)
                }
                _ => first_tol,
            };
            (3.0 * floor).max(t)
        })
        .collect();
    let accept = accepts.first().copied().unwrap_or((3.0 * floor).max(first_tol));
    let mut notes = Vec::new();
    // A candidate the correct run reproduces is within the floor: nothing to explain.
    // (Positions and masks are exact: a mismatch there is never rounding.)
    let first_is_values = first.metrics.as_ref().and_then(|m| m.values()).is_some();
    if first_is_values && clean.at_first() <= accept && clean.within(&accepts) {
        notes.push(format!(
            "no fault named: a correct run reproduces the candidate within the thresholds ({} {:.1e} at {} {}; {} of {} evidence sites within)",
            clean.first_measure,
            clean.at_first(),
            first.step,
            first.site,
            clean.matched_each(&accepts),
            clean.errors.len()
        ));
        return Ok(Diagnosis { findings: Vec::new(), notes });
    }
    let mut found = Vec::new();
    for fault in Fault::ALL {
        if order(&earliest_effect(fault), &first_at) == Ordering::Greater {
            continue;
        }
        if fault == Fault::MaskFp16Overflow && precision != Precision::F16 {
            continue;
        }
        let dump = match run(vec![fault]) {
            Ok(d) => d,
            Err(e) => {
                notes.push(format!("{} not tried: {e}", fault.id()));
                continue;
            }
        };
        // A fault that changes nothing on this scenario explains nothing.
        if fit(&dump, &baseline, golden, &evidence)?.errors.iter().all(|&e| e == 0.0) {
            continue;
        }
        let f = fit(&dump, candidate, golden, &evidence)?;
        // It must reproduce the first divergent site and most sites after it, and be
        // far closer to the candidate than the correct run is. The median tolerates a
        // few sites where a port's variant of the fault differs from the simulated one
        // (tables swapped where dumped or only where applied, say).
        let explains_first = f.at_first() <= accept && f.at_first() <= 0.25 * clean.at_first();
        let explains_rest = f.within(&accepts) && f.mean() <= 0.5 * clean.mean();
        if !(explains_first && explains_rest) {
            continue;
        }
        // The share of the divergence (mean error over the evidence) the fault explains.
        let score = (1.0 - ratio(f.mean(), clean.mean())).clamp(0.0, 1.0);
        let explains = format!(
            "{} {} matches a run with {}: {} {:.1e} against {:.1e} for the correct run; {} of {} evidence sites within {:.0e} at the first and their own thresholds after it (mean error {:.1e} against {:.1e})",
            first.step,
            first.site,
            fault.id(),
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
        found.push(Finding { fault: fault.id().to_string(), score, explains });
    }
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(Diagnosis { findings: found, notes })
}

/// Measures `run` against `target` at the evidence sites (padding handled as in
/// comparisons, with `golden`'s scenario).
fn fit(run: &Dump, target: &Dump, golden: &Dump, evidence: &[(Step, Site)]) -> Result<Fit> {
    let policy = Policy::default();
    let mut errors = Vec::with_capacity(evidence.len());
    let mut first_measure = "rel-L2";
    for (step, site) in evidence {
        let (Some(r), Some(t)) = (run.get(*step, site)?, target.get(*step, site)?) else {
            continue;
        };
        let res = compare_site(
            *step,
            site,
            &r,
            Some(&t),
            &golden.manifest.scenario,
            &policy,
            Precision::F32,
        );
        let e = res.metrics.as_ref().map_or(f64::INFINITY, |m| m.error());
        if errors.is_empty() && !matches!(res.metrics, Some(crate::compare::SiteMetrics::Values(_)))
        {
            first_measure = "mismatch fraction";
        }
        errors.push(if e.is_finite() { e.min(10.0) } else { 10.0 });
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
                Some(crate::compare::SiteMetrics::Visibility { mismatches, golden_visible, candidate_visible, .. }) => Some(format!(
                    "{} mask shows {candidate_visible} (query, key) pairs where the golden shows {golden_visible}; {mismatches} differ",
                    s.step
                )),
                _ => None,
            }))
        }
        _ => Ok(None),
    }
}
