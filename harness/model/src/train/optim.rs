//! After the backward: unscaling, overflow, the global gradient norm, clipping and the
//! first AdamW step (docs/training.md), in the master precision.
//!
//! - unscale: `g / value` (the loss scale's);
//! - overflow: any NaN/Inf in a gradient after unscaling skips the step (every update
//!   is the weight), and a dynamic scale is halved for the next step (MindSpore's
//!   `DynamicLossScaler`, `torch.amp.GradScaler`: `scale / 2`);
//! - `grad_norm = sqrt(Σ_p ‖g_p‖²)`, as `clip_grad_norm_` returns it (per-parameter
//!   norms, then the norm of those);
//! - clipping: every gradient times `min(1, max_grad_norm / (grad_norm + 1e-6))`;
//! - AdamW from zero moments, step 1: `p ← p·(1 − lr·wd)` (wd 0 in the `no_decay`
//!   group), `m = (1−β₁)·g`, `v = (1−β₂)·g²`,
//!   `p ← p − (lr / (1−β₁)) · m / (sqrt(v) / sqrt(1−β₂) + eps)` (torch's
//!   `_single_tensor_adamw` arithmetic, each op stored in the master dtype).
//!
//! The faults of §6 that act here are the fields of [`OptimRule`].

use ndarray::ArrayD;

use dump::{AdamW, LossScale};

use super::Storage;

/// The optimizer-side faults of §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptimRule {
    /// `train.loss_scale_kept`: gradients not divided by the loss scale.
    pub loss_scale_kept: bool,
    /// `train.overflow_applied`: an overflowed step applied instead of skipped.
    pub overflow_applied: bool,
    /// `train.weight_decay_everywhere`: weight decay on the `no_decay` group too.
    pub weight_decay_everywhere: bool,
    /// `train.clip_per_parameter`: each gradient clipped by its own norm.
    pub clip_per_parameter: bool,
    /// `train.adam_no_bias_correction`: AdamW without bias correction.
    pub no_bias_correction: bool,
}

/// One trainable parameter: its name, its master value before the step, and its
/// gradient as the backward computed it (in the scaled space).
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub weight: ArrayD<f64>,
    pub grad: ArrayD<f64>,
}

/// What the optimizer step gives.
#[derive(Debug, Clone)]
pub struct Stepped {
    /// The global norm of the unscaled gradients, before clipping.
    pub grad_norm: f64,
    /// Per parameter: the gradient after unscaling and clipping.
    pub grads: Vec<ArrayD<f64>>,
    /// Per parameter: the value after the step.
    pub updates: Vec<ArrayD<f64>>,
    /// A gradient held NaN/Inf after unscaling.
    pub overflow: bool,
    /// The step was skipped (overflow, and not `overflow_applied`).
    pub skipped: bool,
    /// The loss scale for the next step (a dynamic scale halves on overflow).
    pub next_loss_scale: Option<f64>,
}

/// L2 norm of `g` in the master precision.
fn norm(g: &ArrayD<f64>, st: Storage) -> f64 {
    st.master(g.iter().map(|x| x * x).sum::<f64>().sqrt())
}

/// Unscales, clips and applies AdamW to `params` (in parameter order).
pub fn step(
    params: &[Param],
    optimizer: &AdamW,
    max_grad_norm: Option<f64>,
    loss_scale: LossScale,
    rule: OptimRule,
    st: Storage,
) -> Stepped {
    let value = loss_scale.value();
    let mut grads: Vec<ArrayD<f64>> = params
        .iter()
        .map(|p| {
            let mut g = p.grad.clone();
            if !rule.loss_scale_kept && value != 1.0 {
                g.mapv_inplace(|x| x / value);
            }
            st.master_array(&mut g);
            g
        })
        .collect();
    let overflow = grads.iter().any(|g| g.iter().any(|x| !x.is_finite()));
    let norms: Vec<f64> = grads.iter().map(|g| norm(g, st)).collect();
    let grad_norm = st.master(norms.iter().map(|n| n * n).sum::<f64>().sqrt());
    let skipped = overflow && !rule.overflow_applied;
    if let (Some(max), false) = (max_grad_norm, skipped) {
        for (g, &own) in grads.iter_mut().zip(&norms) {
            let total = if rule.clip_per_parameter { own } else { grad_norm };
            let coef = st.master((st.master(max) / st.master(total + 1e-6)).min(1.0));
            g.mapv_inplace(|x| st.master(x * coef));
        }
    }
    let (b1, b2) = optimizer.betas;
    let updates = params
        .iter()
        .zip(&grads)
        .map(|(p, g)| {
            if skipped {
                return p.weight.clone();
            }
            let decay = rule.weight_decay_everywhere || !optimizer.is_no_decay(&p.name);
            let wd = if decay { optimizer.weight_decay } else { 0.0 };
            let shrink = st.master(1.0 - optimizer.lr * wd);
            let (step_size, bc2_sqrt) = if rule.no_bias_correction {
                (st.master(optimizer.lr), 1.0)
            } else {
                (st.master(optimizer.lr / (1.0 - b1)), st.master((1.0 - b2).sqrt()))
            };
            let (c1, c2, eps) =
                (st.master(1.0 - b1), st.master(1.0 - b2), st.master(optimizer.eps));
            let mut out = p.weight.clone();
            ndarray::Zip::from(&mut out).and(g).for_each(|w, &g| {
                let w1 = st.master(*w * shrink);
                let m = st.master(c1 * g);
                let v = st.master(st.master(g * g) * c2);
                let denom = st.master(st.master(v.sqrt()) / bc2_sqrt) + eps;
                let denom = st.master(denom);
                *w = st.master(w1 - st.master(step_size * st.master(m / denom)));
            });
            out
        })
        .collect();
    let next_loss_scale = match loss_scale {
        LossScale::Dynamic(v) if overflow => Some(v / 2.0),
        LossScale::Dynamic(v) => Some(v),
        _ => None,
    };
    Stepped { grad_norm, grads, updates, overflow, skipped, next_loss_scale }
}
