//! A training step's facts for the report (CONTRACT §6): the loss and gradient norm of
//! both sides, whether each skipped the step, and the parameter-gradient table.

use compare::train::{scalar, PreStep};
use compare::{Comparison, SiteMetrics};
use contract::error::Result;
use contract::site::{Site, Step};
use dump::Dump;
use report::train::{ParamGradRow, ScalarPair, Skipped, TrainSummary};

/// The training facts of `cmp` (`golden` against `candidate`); `None` for inference.
pub fn summary(golden: &Dump, candidate: &Dump, cmp: &Comparison) -> Result<Option<TrainSummary>> {
    if golden.manifest.train.is_none() {
        return Ok(None);
    }
    let value = |d: &Dump, site: &Site| -> Result<Option<f64>> {
        Ok(d.get(Step::Train, site)?.and_then(|t| scalar(&t)))
    };
    let pre = PreStep::open(golden)?;
    // A side skipped the step when every update it dumped equals the weight before it.
    let skipped = |d: &Dump| -> Result<Option<bool>> {
        let mut seen = false;
        for site in golden.sites(Step::Train) {
            let Site::Update(name) = site else { continue };
            let (Some(u), Some(w)) = (d.get(Step::Train, site)?, pre.weight(name)) else {
                continue;
            };
            if u.shape() != w.shape() {
                return Ok(Some(false));
            }
            seen = true;
            if u.iter_f64().zip(w.iter_f64()).any(|(a, b)| a != b) {
                return Ok(Some(false));
            }
        }
        Ok(seen.then_some(true))
    };
    let norm = |d: &Dump, site: &Site| -> Result<Option<f64>> {
        Ok(d.get(Step::Train, site)?
            .map(|t| t.iter_f64().filter(|x| x.is_finite()).map(|x| x * x).sum::<f64>().sqrt()))
    };
    let mut param_grads = Vec::new();
    for r in cmp.sites.iter().filter(|r| matches!(r.site, Site::ParamGrad(_))) {
        let Site::ParamGrad(name) = &r.site else { continue };
        // Nothing compared (non-finite on both sides, a skipped step's gradients): no
        // numbers to show.
        let (rel_l2, cosine) = match &r.metrics {
            Some(SiteMetrics::Values(m)) if m.count > 0 => (Some(m.rel_l2), Some(m.cosine)),
            _ => (None, None),
        };
        let norm_ratio = match (norm(golden, &r.site)?, norm(candidate, &r.site)?) {
            _ if rel_l2.is_none() => None,
            (Some(g), Some(c)) if g > 0.0 => Some(c / g),
            (Some(_), Some(c)) => Some(if c == 0.0 { 1.0 } else { f64::INFINITY }),
            _ => None,
        };
        param_grads.push(ParamGradRow {
            name: name.clone(),
            status: r.status,
            rel_l2,
            cosine,
            norm_ratio,
        });
    }
    // The comparison judges an update as its change wherever the weight is known.
    let any_change = golden
        .sites(Step::Train)
        .iter()
        .any(|s| matches!(s, Site::Update(n) if pre.weight(n).is_some()));
    Ok(Some(TrainSummary {
        loss: ScalarPair::new(value(golden, &Site::Loss)?, value(candidate, &Site::Loss)?),
        grad_norm: ScalarPair::new(
            value(golden, &Site::GradNorm)?,
            value(candidate, &Site::GradNorm)?,
        ),
        skipped: Skipped { golden: skipped(golden)?, candidate: skipped(candidate)? },
        updates_judged_as: if any_change {
            "the change update − weight, from the golden's weights before the step".into()
        } else {
            "the updated parameters themselves (the golden holds no weights before the step to take the change from)".into()
        },
        param_grads,
    }))
}
