//! After the backward: unscaling, overflow, the global gradient norm, clipping and the
//! first AdamW step (docs/training.md), in the master precision.
//!
//! - unscale: `g / value` (the loss scale's);
//! - overflow: any NaN/Inf in a gradient after unscaling skips the step (every update
//!   is the weight), and a dynamic scale is halved for the next step (MindSpore's
//!   `DynamicLossScaler`, `torch.amp.GradScaler`: `scale / 2`);
//! - `grad_norm = sqrt(Σ_p ‖g_p‖²)`, as `clip_grad_norm_` returns it (per-parameter
//!   norms, then the norm of those);
//! - clipping: every gradient times `min(1, max_grad_norm / (grad_norm + 1e-6))`, on a
//!   skipped step too (`clip_grad_norm_` comes before the scaler's check), NaN kept;
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
    // Clipping multiplies even a step that will be skipped (`clip_grad_norm_` runs
    // before the scaler's check): a non-finite norm makes every gradient NaN (or 0 times
    // its finite entries when the norm is Inf), and `clamp(max=1)` keeps a NaN.
    if let Some(max) = max_grad_norm {
        for (g, &own) in grads.iter_mut().zip(&norms) {
            let total = if rule.clip_per_parameter { own } else { grad_norm };
            let coef = st.master(max) / st.master(total + 1e-6);
            let coef = st.master(if coef.is_nan() { coef } else { coef.min(1.0) });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::Exact;
    use dump::Precision;
    use ndarray::arr1;

    const EXACT: Exact = Exact { mask_dtype: Precision::F32 };

    fn adamw() -> AdamW {
        AdamW {
            lr: 0.1,
            betas: (0.9, 0.999),
            eps: 0.0,
            weight_decay: 0.5,
            no_decay: vec!["*norm*".into()],
        }
    }

    fn params() -> Vec<Param> {
        vec![
            Param {
                name: "w".into(),
                weight: arr1(&[1.0, 2.0]).into_dyn(),
                grad: arr1(&[3.0, -4.0]).into_dyn(),
            },
            Param {
                name: "norm".into(),
                weight: arr1(&[1.0]).into_dyn(),
                grad: arr1(&[0.0]).into_dyn(),
            },
        ]
    }

    #[test]
    fn first_adamw_step_by_hand() {
        // |g| = 5: clipped to norm 1 by 1/(5 + 1e-6); the first bias-corrected Adam step
        // is lr·sign(g) with eps 0; decay 1 − 0.05 on `w`, none on `norm`.
        let s = step(
            &params(),
            &adamw(),
            Some(1.0),
            LossScale::None,
            OptimRule::default(),
            Storage::exact(&EXACT),
        );
        assert_eq!(s.grad_norm, 5.0);
        let c = 1.0 / (5.0 + 1e-6);
        assert_eq!(s.grads[0], arr1(&[3.0 * c, -4.0 * c]).into_dyn());
        let u = &s.updates[0];
        assert!((u[0] - (0.95 - 0.1)).abs() < 1e-12 && (u[1] - (1.9 + 0.1)).abs() < 1e-12, "{u}");
        // A zero gradient with eps 0 is 0/0: torch's NaN, as here.
        assert!(s.updates[1][0].is_nan());
        // Without bias correction the step is lr·(1−β₁)/sqrt(1−β₂) times sign(g).
        let rule = OptimRule { no_bias_correction: true, ..OptimRule::default() };
        let s = step(&params(), &adamw(), None, LossScale::None, rule, Storage::exact(&EXACT));
        let k = 0.1 * 0.1 / 0.001f64.sqrt();
        assert!((s.updates[0][0] - (0.95 - k)).abs() < 1e-12, "{}", s.updates[0]);
    }

    #[test]
    fn an_overflowed_step_is_skipped_and_halves_a_dynamic_scale() {
        let mut p = params();
        p[0].grad[0] = f64::INFINITY;
        let st = Storage::exact(&EXACT);
        let s = step(&p, &adamw(), Some(1.0), LossScale::Dynamic(1024.0), OptimRule::default(), st);
        assert!(s.overflow && s.skipped && s.grad_norm.is_infinite());
        assert_eq!(s.next_loss_scale, Some(512.0));
        assert_eq!(s.updates[0], p[0].weight);
        // Clipping by 1/(Inf + 1e-6) = 0 still ran: Inf·0 is NaN, a finite entry 0.
        assert!(s.grads[0][0].is_nan() && s.grads[0][1] == 0.0);
        let rule = OptimRule { overflow_applied: true, ..OptimRule::default() };
        let s = step(&p, &adamw(), Some(1.0), LossScale::Dynamic(1024.0), rule, st);
        assert!(!s.skipped && s.updates[0].iter().any(|x| x.is_nan()));
    }
}
