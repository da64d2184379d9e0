//! RMSNorm: `y = w · cast(x · rsqrt(mean(x²) + eps))`.
//!
//! Follows HF `LlamaRMSNorm.forward`: upcast to float32, `variance = x.pow(2).mean(-1)`,
//! `x = x * torch.rsqrt(variance + eps)`, cast back to the input dtype, *then* multiply
//! by the weight. The two roundings are `RoundAt::NormVariance` and
//! `RoundAt::NormNormalized`; the product is `RoundAt::NormOutput`.
//!
//! The normalisation rule is a fault seam ([`NormKind`]), and so is a LayerNorm beta left
//! in ([`NormBeta`], added after the weight, stored like a parameter at `RoundAt::Weight`).
//! The variance's dtype is the numerics' (`RoundAt::NormVariance`; `norm.no_upcast` is an
//! implementation's numerics rounding it to the compute dtype).

use ndarray::{Array1, Array3, Axis, Zip};

use super::numerics::{round_in_place, Numerics, RoundAt};
use super::plan::{norm_beta, NormBeta, NormKind, Plan};

/// Weight `[hidden]` and epsilon.
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm<'w> {
    pub weight: &'w Array1<f64>,
    pub eps: f64,
    pub kind: NormKind,
    pub beta: NormBeta,
}

impl<'w> RmsNorm<'w> {
    /// The norm with `weight` and `eps`, in the plan's variant (`norm.layernorm`,
    /// `norm.eps_outside`, a beta left in).
    pub fn planned(weight: &'w Array1<f64>, eps: f64, plan: &Plan) -> RmsNorm<'w> {
        RmsNorm { weight, eps, kind: plan.norm_kind, beta: plan.norm_beta }
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
        let mut y = x.clone();
        for mut row in y.lanes_mut(Axis(2)) {
            let h = row.len() as f64;
            if self.kind == NormKind::LayerNorm {
                let mean = row.sum() / h;
                row.mapv_inplace(|v| v - mean);
            }
            let var = n.round(RoundAt::NormVariance, row.iter().map(|v| v * v).sum::<f64>() / h);
            match self.kind {
                NormKind::Rms | NormKind::LayerNorm => {
                    let r = 1.0 / (var + self.eps).sqrt();
                    row.mapv_inplace(|v| v * r);
                }
                NormKind::EpsOutside => {
                    let d = var.sqrt() + self.eps;
                    row.mapv_inplace(|v| v / d);
                }
            }
        }
        round_in_place(n, RoundAt::NormNormalized, &mut y);
        Zip::from(y.lanes_mut(Axis(2))).for_each(|mut row| row *= self.weight);
        if self.beta == NormBeta::LeftIn {
            let beta = Array1::from_shape_fn(self.weight.len(), |j| {
                n.round(RoundAt::Weight, norm_beta(j))
            });
            Zip::from(y.lanes_mut(Axis(2))).for_each(|mut row| row += &beta);
        }
        round_in_place(n, RoundAt::NormOutput, &mut y);
        y
    }
}
