//! The diagnosis of one training step (CONTRACT §6).
//!
//! A divergence whose first site is a forward site is a forward's: the step's forward is
//! the prefill (docs/training.md), so the golden, the candidate and the comparison are
//! seen as a prefill ([`Dump::train_forward_as_prefill`]) and diagnosed as inference is,
//! by rerunning the simulated port under each fault of §3–§5.
//!
//! A divergence that starts at `loss` or later is matched against the eight `train.*`
//! faults by forms computed from the golden's own tensors and manifest, no run needed
//! ([`crate::faults::TRAIN_FACTS`] says each form):
//!
//! - the loss recomputed in float64 from the golden's logits (`lm_head`) with the labels
//!   unshifted, or with the -100 positions counted in the mean; the correct recomputation
//!   must give the golden's own loss first, or neither form is believed;
//! - the step's tail recomputed from the golden's unclipped gradients (`param_grad`
//!   divided by the golden's clip coefficient `min(1, max_grad_norm / (grad_norm +
//!   1e-6))`): gradients and `grad_norm` times the loss scale or the micro-batch count
//!   (clipped by the norm they give), each parameter clipped by its own norm, and
//!   AdamW's first step from `param_grad` and the weights before the step, correct,
//!   without bias correction, or with decay on the `no_decay` group; a step whose
//!   norm is non-finite is skipped (updates equal the weights);
//! - a skipped golden whose candidate's first divergent update moved the weight.
//!
//! A form is tried only where the golden lets its fault show (a loss scale, several
//! micro-batches, clipping, a `no_decay` parameter, a label -100 the loss reads, a
//! skipped step). It is judged at the first divergent site and every measured site after
//! it that it predicts, by the comparison's own tolerance at each site (`update.*` as
//! the change from the weight, like the comparison): it explains the divergence when it
//! differs from the golden at the first divergent site and is within tolerance of the
//! candidate at every one of those sites. Its score is `1 − excess / 2` (0.5 … 1), the
//! excess being the worst site's fraction of its tolerance. A form that fails one site
//! is refuted; a divergence no form explains is left to the localisation.

use std::collections::BTreeMap;

use compare::tolerance::{self, Tolerance};
use compare::train::PreStep;
use compare::{Comparison, SiteResult, Status};
use contract::error::Result;
use contract::fault::Fault;
use contract::site::{Site, Step};
use dump::Dump;
use model::RunContext;

use crate::faults::{train_facts, TrainNeeds, TRAIN_FACTS};
use crate::{Diagnosis, Finding};

/// Diagnoses the divergence of a training step's `cmp`; see the module doc.
pub(crate) fn diagnose(
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
    ctx: &RunContext,
) -> Result<Diagnosis> {
    let Some(first) = cmp.first_divergence() else { return Ok(Diagnosis::default()) };
    if is_forward(&first.site) {
        return diagnose_forward(golden, candidate, cmp, ctx);
    }
    diagnose_step(golden, candidate, cmp)
}

/// A forward site of a training step: neither the loss nor a backward site.
pub(crate) fn is_forward(site: &Site) -> bool {
    !site.is_backward() && *site != Site::Loss
}

/// `cmp`'s forward sites seen as the prefill's.
pub fn forward_as_prefill(cmp: &Comparison) -> Comparison {
    Comparison {
        sites: cmp
            .sites
            .iter()
            .filter(|s| s.step == Step::Train && is_forward(&s.site))
            .map(|s| SiteResult { step: Step::Prefill, ..s.clone() })
            .collect(),
        ..cmp.clone()
    }
}

/// A forward divergence, diagnosed as the prefill's; findings narrowed to steps name
/// the training step.
fn diagnose_forward(
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
    ctx: &RunContext,
) -> Result<Diagnosis> {
    let (Some(g), Some(c)) =
        (golden.train_forward_as_prefill()?, candidate.train_forward_as_prefill()?)
    else {
        return Ok(Diagnosis::default());
    };
    let mut d = crate::diagnose(&g, &c, &forward_as_prefill(cmp), ctx)?;
    for f in &mut d.findings {
        // The evidence names the step the candidate ran.
        f.explains = f.explains.replace("prefill ", "train ");
        if let Some(steps) = f.scope.as_mut().and_then(|s| s.get_mut("steps")) {
            *steps = serde_json::json!([Step::Train.to_string()]);
        }
    }
    Ok(d)
}

/// The golden's numbers the forms are computed from.
struct Golden {
    spec: dump::TrainSpec,
    /// Trainable parameters in the golden's order.
    params: Vec<String>,
    param_grad: BTreeMap<String, Vec<f64>>,
    /// The weights before the step, where the golden has them.
    weights: BTreeMap<String, Vec<f64>>,
    grad_norm: f64,
    loss: Option<f64>,
}

impl Golden {
    fn read(golden: &Dump, spec: &dump::TrainSpec) -> Result<Golden> {
        let pre = PreStep::open(golden)?;
        let mut g = Golden {
            spec: spec.clone(),
            params: Vec::new(),
            param_grad: BTreeMap::new(),
            weights: BTreeMap::new(),
            grad_norm: f64::NAN,
            loss: None,
        };
        for site in golden.sites(Step::Train) {
            match site {
                Site::ParamGrad(name) => {
                    if let Some(t) = golden.get(Step::Train, site)? {
                        g.params.push(name.clone());
                        g.param_grad.insert(name.clone(), t.to_f64_vec());
                    }
                    if let Some(w) = pre.weight(name) {
                        g.weights.insert(name.clone(), w.to_f64_vec());
                    }
                }
                Site::GradNorm => {
                    if let Some(t) = golden.get(Step::Train, site)? {
                        g.grad_norm = compare::train::scalar(&t).unwrap_or(f64::NAN);
                    }
                }
                Site::Loss => {
                    g.loss =
                        golden.get(Step::Train, site)?.and_then(|t| compare::train::scalar(&t));
                }
                _ => {}
            }
        }
        Ok(g)
    }

    fn skipped(&self) -> bool {
        !self.grad_norm.is_finite()
    }

    /// The clip coefficient of a gradient norm: `min(1, max_grad_norm / (norm + 1e-6))`,
    /// 1 without clipping.
    fn clip(&self, norm: f64) -> f64 {
        match self.spec.max_grad_norm {
            Some(m) if norm.is_finite() => (m / (norm + 1e-6)).min(1.0),
            _ => 1.0,
        }
    }

    /// A parameter's gradient before clipping (after unscaling).
    fn unclipped(&self, name: &str) -> Option<Vec<f64>> {
        let c = self.clip(self.grad_norm);
        self.param_grad.get(name).map(|v| v.iter().map(|x| x / c).collect())
    }

    /// Whether `fault` can show on this golden.
    fn shows(&self, needs: TrainNeeds) -> bool {
        let s = &self.spec;
        match needs {
            TrainNeeds::Nothing => true,
            TrainNeeds::IgnoredLabels => s
                .labels
                .iter()
                .any(|row| row.iter().skip(1).any(|&l| l == dump::TrainSpec::IGNORE_INDEX)),
            TrainNeeds::LossScale => s.loss_scale.value() != 1.0,
            TrainNeeds::SkippedStep => self.skipped(),
            TrainNeeds::NoDecayParameter => {
                s.optimizer.weight_decay > 0.0
                    && self.params.iter().any(|p| s.optimizer.is_no_decay(p))
            }
            TrainNeeds::Clipping => s.max_grad_norm.is_some(),
            TrainNeeds::MicroBatches => s.micro_batches > 1,
        }
    }
}

/// How a form's step differs from the golden's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    /// The loss with these label rules.
    Loss { shifted: bool, count_ignored: bool },
    /// The tail of the step from the golden's unclipped gradients.
    Tail { factor: f64, per_parameter_clip: bool, bias_correction: bool, decay_everywhere: bool },
    /// A skipped step applied.
    Applied,
}

impl Form {
    fn of(fault: Fault, g: &Golden) -> Form {
        let tail = |factor, per_parameter_clip, bias_correction, decay_everywhere| Form::Tail {
            factor,
            per_parameter_clip,
            bias_correction,
            decay_everywhere,
        };
        match fault {
            Fault::TrainLabelsUnshifted => Form::Loss { shifted: false, count_ignored: false },
            Fault::TrainIgnoreIndexCounted => Form::Loss { shifted: true, count_ignored: true },
            Fault::TrainLossScaleKept => tail(g.spec.loss_scale.value(), false, true, false),
            Fault::TrainMicroBatchesSummed => tail(g.spec.micro_batches as f64, false, true, false),
            Fault::TrainClipPerParameter => tail(1.0, true, true, false),
            Fault::TrainAdamNoBiasCorrection => tail(1.0, false, false, false),
            Fault::TrainWeightDecayEverywhere => tail(1.0, false, true, true),
            _ => Form::Applied,
        }
    }
}

/// What a form says of one site.
enum Prediction {
    /// These values.
    Values(Vec<f64>),
    /// The update moved the weight (somewhere).
    Moved,
    /// Nothing: the form does not predict this site.
    None,
}

/// The golden's logits and labels, for the loss forms.
struct LossInputs {
    logits: Vec<f64>,
    /// `[B, P, V]`.
    shape: [usize; 3],
}

impl LossInputs {
    fn read(golden: &Dump) -> Result<Option<LossInputs>> {
        let Some(t) = golden.get(Step::Train, &Site::LmHead)? else { return Ok(None) };
        let &[b, p, v] = t.shape() else { return Ok(None) };
        Ok(Some(LossInputs { logits: t.to_f64_vec(), shape: [b, p, v] }))
    }

    /// HF's loss over these logits with `labels` (`[B][P]`), the batch cut in
    /// `micro_batches` (the mean of their means); `None` where a label lies outside the
    /// vocabulary or a micro-batch counts no label.
    fn loss(
        &self,
        labels: &[Vec<i64>],
        micro_batches: usize,
        shifted: bool,
        count_ignored: bool,
    ) -> Option<f64> {
        let [b, p, v] = self.shape;
        let n = micro_batches.max(1);
        if labels.len() != b || b % n != 0 {
            return None;
        }
        let rows = b / n;
        let mut total = 0.0;
        for k in 0..n {
            let (mut sum, mut count) = (0.0, 0usize);
            for (bi, row) in labels.iter().enumerate().skip(k * rows).take(rows) {
                for t in 0..p {
                    let label = if shifted {
                        match row.get(t + 1) {
                            Some(&l) => l,
                            None => continue,
                        }
                    } else {
                        *row.get(t)?
                    };
                    if label == dump::TrainSpec::IGNORE_INDEX {
                        count += usize::from(count_ignored);
                        continue;
                    }
                    let l = usize::try_from(label).ok().filter(|&l| l < v)?;
                    let z = &self.logits[(bi * p + t) * v..(bi * p + t + 1) * v];
                    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                    sum += lse - z[l];
                    count += 1;
                }
            }
            if count == 0 {
                return None;
            }
            total += sum / count as f64;
        }
        Some(total / n as f64)
    }
}

impl Golden {
    /// What `form` predicts at `site` (`golden_site`: the golden's tensor there).
    fn predict(
        &self,
        form: Form,
        site: &Site,
        golden_site: &[f64],
        loss: &Option<LossInputs>,
    ) -> Prediction {
        match form {
            Form::Loss { shifted, count_ignored } => match (site, loss) {
                (Site::Loss, Some(li)) => li
                    .loss(&self.spec.labels, self.spec.micro_batches, shifted, count_ignored)
                    .map_or(Prediction::None, |x| Prediction::Values(vec![x])),
                _ => Prediction::None,
            },
            Form::Applied => match site {
                Site::Update(_) if self.skipped() => Prediction::Moved,
                _ => Prediction::None,
            },
            Form::Tail { factor, per_parameter_clip, bias_correction, decay_everywhere } => {
                let norm = self.grad_norm * factor;
                let coef = |u: &[f64]| {
                    if per_parameter_clip {
                        self.clip(u.iter().map(|x| x * x).sum::<f64>().sqrt())
                    } else {
                        self.clip(norm)
                    }
                };
                let grad = |name: &str| -> Option<Vec<f64>> {
                    let u: Vec<f64> = self.unclipped(name)?.iter().map(|x| x * factor).collect();
                    let c = if norm.is_finite() { coef(&u) } else { 1.0 };
                    Some(u.iter().map(|x| x * c).collect())
                };
                match site {
                    Site::Loss => Prediction::Values(golden_site.to_vec()),
                    Site::Grad(_) => {
                        Prediction::Values(golden_site.iter().map(|x| x * factor).collect())
                    }
                    Site::GradNorm => Prediction::Values(vec![norm]),
                    Site::ParamGrad(name) => {
                        grad(name).map_or(Prediction::None, Prediction::Values)
                    }
                    Site::Update(name) => {
                        let (Some(w), Some(g)) = (self.weights.get(name), grad(name)) else {
                            return Prediction::None;
                        };
                        if !norm.is_finite() {
                            return Prediction::Values(w.clone());
                        }
                        let o = &self.spec.optimizer;
                        let decay = if decay_everywhere || !o.is_no_decay(name) {
                            o.weight_decay
                        } else {
                            0.0
                        };
                        let (b1, b2) = o.betas;
                        Prediction::Values(
                            w.iter()
                                .zip(&g)
                                .map(|(&p, &g)| {
                                    let p = p * (1.0 - o.lr * decay);
                                    let (m, v) = ((1.0 - b1) * g, (1.0 - b2) * g * g);
                                    if bias_correction {
                                        p - (o.lr / (1.0 - b1)) * m
                                            / (v.sqrt() / (1.0 - b2).sqrt() + o.eps)
                                    } else {
                                        p - o.lr * m / (v.sqrt() + o.eps)
                                    }
                                })
                                .collect(),
                        )
                    }
                    _ => Prediction::None,
                }
            }
        }
    }
}

/// How far `pred` is from `target` as a fraction of `tol`: the larger of `rel_l2 /
/// max_rel_l2` and `(1 − cosine) / (1 − min_cosine)` over the pairs finite on both sides
/// (rel-L2 against `pred`); infinite where one side is non-finite and the other is not
/// the same value, or the lengths differ.
fn excess(pred: &[f64], target: &[f64], tol: &Tolerance) -> f64 {
    if pred.len() != target.len() {
        return f64::INFINITY;
    }
    let (mut spp, mut stt, mut spt, mut sdd) = (0.0, 0.0, 0.0, 0.0);
    for (&p, &t) in pred.iter().zip(target) {
        if !(p.is_finite() && t.is_finite()) {
            if p == t || (p.is_nan() && t.is_nan()) {
                continue;
            }
            return f64::INFINITY;
        }
        spp += p * p;
        stt += t * t;
        spt += p * t;
        sdd += (p - t) * (p - t);
    }
    let rel = if spp > 0.0 {
        (sdd / spp).sqrt()
    } else if sdd > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let cos = if spp == 0.0 && stt == 0.0 {
        1.0
    } else if spp == 0.0 || stt == 0.0 {
        0.0
    } else {
        (spt / (spp.sqrt() * stt.sqrt())).clamp(-1.0, 1.0)
    };
    tolerance::excess(rel, tol.max_rel_l2).max(tolerance::excess(1.0 - cos, 1.0 - tol.min_cosine))
}

/// The divergence at `loss` or later, matched against the training forms.
fn diagnose_step(golden: &Dump, candidate: &Dump, cmp: &Comparison) -> Result<Diagnosis> {
    let Some(spec) = golden.manifest.train.as_ref() else { return Ok(Diagnosis::default()) };
    let Some(first) = cmp.first_divergence() else { return Ok(Diagnosis::default()) };
    let g = Golden::read(golden, spec)?;
    let loss_inputs = LossInputs::read(golden)?;
    let mut notes = Vec::new();
    let start = cmp.sites.iter().position(|s| std::ptr::eq(s, first)).unwrap_or(0);
    let evidence: Vec<&SiteResult> = cmp.sites[start..]
        .iter()
        .filter(|s| matches!(s.status, Status::Pass | Status::Fail) && !is_forward(&s.site))
        .collect();
    // The tensors as the comparison judges them: updates as their change.
    let weight = |site: &Site| match site {
        Site::Update(name) => g.weights.get(name),
        _ => None,
    };
    let change = |site: &Site, v: Vec<f64>| match weight(site) {
        Some(w) if w.len() == v.len() => v.iter().zip(w).map(|(a, b)| a - b).collect(),
        _ => v,
    };
    let mut golden_at = BTreeMap::new();
    let mut candidate_at = BTreeMap::new();
    for s in &evidence {
        let key = s.site.to_string();
        if let Some(t) = golden.get(Step::Train, &s.site)? {
            golden_at.insert(key.clone(), t.to_f64_vec());
        }
        if let Some(t) = candidate.get(Step::Train, &s.site)? {
            candidate_at.insert(key, t.to_f64_vec());
        }
    }
    // The loss forms are believed only where the correct recomputation is the golden's.
    let loss_believed = match (&loss_inputs, g.loss) {
        (Some(li), Some(gl)) => {
            let clean = li.loss(&spec.labels, spec.micro_batches, true, false);
            let tol = cmp
                .sites
                .iter()
                .find(|s| s.site == Site::Loss)
                .and_then(|s| s.tolerance)
                .unwrap_or_else(|| Tolerance::default_for(cmp.golden_precision));
            match clean {
                Some(c) if excess(&[gl], &[c], &tol) <= 1.0 => true,
                other => {
                    notes.push(format!(
                        "train.labels_unshifted, train.ignore_index_counted: not tried: the loss \
                         recomputed from the golden's logits ({}) is not the golden's loss ({gl:e})",
                        other.map_or_else(|| "none: a label outside the vocabulary".into(), |x| format!("{x:e}"))
                    ));
                    false
                }
            }
        }
        _ => false,
    };
    let mut findings = Vec::new();
    for facts in &TRAIN_FACTS {
        let fault = facts.fault;
        if !g.shows(facts.needs) {
            continue;
        }
        let form = Form::of(fault, &g);
        if matches!(form, Form::Loss { .. }) && !loss_believed {
            continue;
        }
        let mut worst = (0.0f64, first.site.clone());
        let mut judged = 0usize;
        let mut refuted = false;
        for (k, s) in evidence.iter().enumerate() {
            let key = s.site.to_string();
            let (Some(gv), Some(cv)) = (golden_at.get(&key), candidate_at.get(&key)) else {
                if k == 0 {
                    refuted = true;
                    break;
                }
                continue;
            };
            let tol = s.tolerance.unwrap_or_else(|| Tolerance::default_for(cmp.golden_precision));
            let x = match g.predict(form, &s.site, gv, &loss_inputs) {
                Prediction::None => {
                    if k == 0 {
                        refuted = true;
                        break;
                    }
                    continue;
                }
                Prediction::Moved => {
                    let moved = change(&s.site, cv.clone()).iter().any(|&d| d != 0.0);
                    if moved {
                        0.0
                    } else {
                        f64::INFINITY
                    }
                }
                Prediction::Values(p) => {
                    let (p, c) = (change(&s.site, p), change(&s.site, cv.clone()));
                    // The form must change what the golden holds where the divergence starts.
                    if k == 0 && excess(&p, &change(&s.site, gv.clone()), &tol) <= 1.0 {
                        refuted = true;
                        break;
                    }
                    excess(&p, &c, &tol)
                }
            };
            judged += 1;
            // A NaN excess refutes too.
            if x.is_nan() || x > 1.0 {
                refuted = true;
                break;
            }
            if x > worst.0 {
                worst = (x, s.site.clone());
            }
        }
        if refuted || judged == 0 {
            continue;
        }
        let detail = detail(fault, &g, &golden_at, &candidate_at, &first.site);
        let explains = format!(
            "{}{}: within tolerance of the candidate at {judged} site{} from {} on (worst {:.2} of \
             its tolerance, at {}), while the golden is {} past it there",
            facts.form,
            detail.map_or_else(String::new, |d| format!(" ({d})")),
            if judged == 1 { "" } else { "s" },
            first.site,
            worst.0,
            worst.1,
            first.judgement.as_ref().map_or_else(|| "far".to_string(), |j| format!("{:.3}×", j.excess)),
        );
        // A training fault acts on the whole step: no scope, no parameters.
        findings.push(Finding {
            fault: fault.id().to_string(),
            score: 1.0 - worst.0 / 2.0,
            scope: None,
            params: serde_json::Map::new(),
            explains,
        });
    }
    findings.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.fault.cmp(&b.fault)));
    Ok(Diagnosis { findings, notes })
}

/// The fault's evidence in its own terms, in words.
fn detail(
    fault: Fault,
    g: &Golden,
    golden_at: &BTreeMap<String, Vec<f64>>,
    candidate_at: &BTreeMap<String, Vec<f64>>,
    first: &Site,
) -> Option<String> {
    let scalar = |m: &BTreeMap<String, Vec<f64>>, s: &Site| {
        m.get(&s.to_string()).and_then(|v| v.first().copied())
    };
    let norm = |v: &[f64]| v.iter().filter(|x| x.is_finite()).map(|x| x * x).sum::<f64>().sqrt();
    let ratio_at = |s: &Site| {
        let (gv, cv) = (golden_at.get(&s.to_string())?, candidate_at.get(&s.to_string())?);
        let gn = norm(gv);
        (gn > 0.0).then(|| norm(cv) / gn)
    };
    let spec = &g.spec;
    Some(match train_facts(fault)?.fault {
        Fault::TrainLabelsUnshifted | Fault::TrainIgnoreIndexCounted => format!(
            "loss: candidate {:e}, golden {:e}",
            scalar(candidate_at, &Site::Loss)?,
            scalar(golden_at, &Site::Loss)?
        ),
        Fault::TrainLossScaleKept => format!(
            "{first} candidate/golden {:.4} where the loss scale is {}",
            ratio_at(first)?,
            spec.loss_scale.value()
        ),
        Fault::TrainMicroBatchesSummed => format!(
            "{first} candidate/golden {:.4} over {} micro-batches",
            ratio_at(first)?,
            spec.micro_batches
        ),
        Fault::TrainClipPerParameter => format!(
            "{first} candidate/golden {:.4}; global clip coefficient {:.4} at grad_norm {:e}, max_grad_norm {}",
            ratio_at(first)?,
            g.clip(g.grad_norm),
            g.grad_norm,
            spec.max_grad_norm?
        ),
        Fault::TrainOverflowApplied => format!(
            "golden grad_norm {}; the candidate's {first} differs from the weight",
            g.grad_norm
        ),
        Fault::TrainWeightDecayEverywhere | Fault::TrainAdamNoBiasCorrection => format!(
            "lr {}, betas ({}, {}), weight_decay {}; change of {first} candidate/golden {:.4}",
            spec.optimizer.lr,
            spec.optimizer.betas.0,
            spec.optimizer.betas.1,
            spec.optimizer.weight_decay,
            {
                let w = g.weights.get(first.to_string().strip_prefix("update.")?)?;
                let d = |v: &Vec<f64>| -> Vec<f64> { v.iter().zip(w).map(|(a, b)| a - b).collect() };
                let (gd, cd) = (d(golden_at.get(&first.to_string())?), d(candidate_at.get(&first.to_string())?));
                let gn = norm(&gd);
                if gn > 0.0 { norm(&cd) / gn } else { f64::INFINITY }
            }
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_excess_is_zero_on_equal_values_and_infinite_on_lost_non_finite() {
        let tol = Tolerance { max_rel_l2: 1e-3, min_cosine: 0.999, max_abs: None };
        assert!(excess(&[1.0, 2.0], &[1.0, 2.0], &tol) < 1e-9);
        // A zero gradient on both sides passes.
        assert_eq!(excess(&[0.0, 0.0], &[0.0, 0.0], &tol), 0.0);
        assert_eq!(excess(&[f64::INFINITY], &[f64::INFINITY], &tol), 0.0);
        assert_eq!(excess(&[f64::INFINITY], &[1.0], &tol), f64::INFINITY);
        // rel-L2 2e-3 against 1e-3: twice the tolerance.
        let x = excess(&[1.0], &[1.002], &tol);
        assert!((x - 2.0).abs() < 1e-9, "{x}");
    }

    #[test]
    fn the_loss_forms_shift_and_count_by_hand() {
        // B = 1, P = 3, V = 2; logits (0, ln 3) at every position: CE of label 1 is
        // ln(4/3), of label 0 ln 4.
        let l3 = 3f64.ln();
        let li = LossInputs { logits: vec![0.0, l3, 0.0, l3, 0.0, l3], shape: [1, 3, 2] };
        let labels = vec![vec![0, 1, -100]];
        let (a, b) = ((4.0f64 / 3.0).ln(), 4f64.ln());
        // Shifted: pairs (0, 1) and (1, -100): one label.
        let shifted = li.loss(&labels, 1, true, false).unwrap();
        assert!((shifted - a).abs() < 1e-12);
        // -100 counted: the same sum over two.
        let counted = li.loss(&labels, 1, true, true).unwrap();
        assert!((counted - a / 2.0).abs() < 1e-12);
        // Unshifted: pairs (0, 0), (1, 1); -100 left out.
        let unshifted = li.loss(&labels, 1, false, false).unwrap();
        assert!((unshifted - (a + b) / 2.0).abs() < 1e-12);
        // A label outside the vocabulary gives none.
        assert_eq!(li.loss(&[vec![0, 7, 1]], 1, true, false), None);
    }
}
