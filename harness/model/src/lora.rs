//! A LoRA bypass on a linear layer (CONTRACT §5): `y = W x + s · B(A(x))`, `A` `[r, in]`,
//! `B` `[out, r]`.
//!
//! Follows PEFT's `lora.Linear.forward` (unmerged, dropout the identity at inference):
//! `result = base_layer(x); result = result + lora_B(lora_A(x)) * scaling`, each
//! product in the activation dtype; and mindpet's `LoRADense.construct` as MindFormers
//! runs it: `A` and `B` cast to the compute dtype, `x·Aᵀ` then `·Bᵀ` (float32
//! accumulation, each product cast to the compute dtype), `scaling` cast to the compute
//! dtype, the product added to the dense output. In this model's numerics: both factors
//! stored at `RoundAt::Weight`, each product rounded at `RoundAt::Projection`, the
//! scaling stored at `RoundAt::Weight`, the scaled delta and the sum rounded at
//! `RoundAt::Projection`. The float64 reference rounds none of them.
//!
//! A merged adapter (`W + s·B·A` folded into the checkpoint) has no bypass: its
//! projection is a plain [`Linear`](super::linear::Linear).

use ndarray::{Array2, Array3, Zip};

use ::weights::adapter::{self, Adapter, ModuleAdapter, PROJECTIONS};
use contract::error::{Error, Result};
use contract::fault::{Component, Fault};
use dump::Precision;

use super::linear::{Linear, Matrix};
use super::numerics::{round_in_place, Numerics, RoundAt};
use super::plan::{LoraMapping, Plan};
use super::weights::{LayerWeights, Weights};

/// The bypass of one projection.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`
    pub a: Matrix,
    /// `[out, r]`
    pub b: Matrix,
    /// `s`: `alpha / r`, or `alpha / sqrt(r)` under rsLoRA (as the plan's faults leave it).
    pub scaling: f64,
}

impl Lora {
    /// The delta `s · B(A(x))`: `[batch, seq, in]` → `[batch, seq, out]`.
    pub fn delta(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
        self.delta_parts(x, n).1
    }

    /// [`Lora::delta`] and the rank-`r` product `A(x)` it went through
    /// (`[batch·seq, r]`, rounded at `RoundAt::Projection`), which a backward pass reads.
    pub(crate) fn delta_parts(
        &self,
        x: &Array3<f64>,
        n: &dyn Numerics,
    ) -> (Array2<f64>, Array3<f64>) {
        let (b, t, h) = x.dim();
        let flat = x.as_standard_layout().into_owned();
        let flat = flat.into_shape_with_order((b * t, h)).expect("standard layout reshapes");
        let mut ax = self.a.matmul_t(flat.view(), n);
        round_in_place(n, RoundAt::Projection, &mut ax);
        let mut bax = self.b.matmul_t(ax.view(), n);
        round_in_place(n, RoundAt::Projection, &mut bax);
        let s = n.round(RoundAt::Weight, self.scaling);
        bax.mapv_inplace(|v| v * s);
        round_in_place(n, RoundAt::Projection, &mut bax);
        (ax, bax.into_shape_with_order((b, t, self.b.nrows())).expect("row count is b * t"))
    }

    /// `y += delta`, rounded at `RoundAt::Projection`. Both `[batch, seq, out]`.
    pub fn add_to(y: &mut Array3<f64>, delta: &Array3<f64>, n: &dyn Numerics) {
        Zip::from(&mut *y).and(delta).for_each(|a, &d| *a += d);
        round_in_place(n, RoundAt::Projection, y);
    }
}

/// The projection `c` of a layer.
fn projection_mut(lw: &mut LayerWeights, c: Component) -> &mut Linear {
    match c {
        Component::QProj => &mut lw.q_proj,
        Component::KProj => &mut lw.k_proj,
        Component::VProj => &mut lw.v_proj,
        Component::OProj => &mut lw.o_proj,
        Component::GateProj => &mut lw.gate_proj,
        Component::UpProj => &mut lw.up_proj,
        _ => &mut lw.down_proj,
    }
}

/// The scaling a port applies to module `m` under the plan's LoRA mapping `here`.
fn planned_scaling(m: &ModuleAdapter, adapter: &Adapter, here: &Plan) -> f64 {
    let c = &adapter.config;
    if here.maps_lora(LoraMapping::ScaleMissing) {
        1.0
    } else if here.maps_lora(LoraMapping::ScaleAlpha) {
        m.alpha
    } else if here.maps_lora(LoraMapping::RsloraIgnored) {
        m.alpha / m.rank as f64
    } else if here.maps_lora(LoraMapping::PatternIgnored) {
        adapter::scaling(c.r, c.lora_alpha, c.use_rslora)
    } else {
        m.scaling
    }
}

/// `s · B · A` `[out, in]` in float64, or, with `low`, as a port merging in that dtype
/// computes it: `A`, `B` and `s` stored in `low`, the product `B·A` and `s · B·A` each
/// rounded to it (PEFT `get_delta_weight` on a bfloat16/float16 device).
fn merge_delta(m: &ModuleAdapter, s: f64, low: Option<Precision>) -> Array2<f64> {
    let r = |v: f64| low.map_or(v, |p| p.round(v));
    let a = m.a.to_array().into_dimensionality::<ndarray::Ix2>().expect("A is [r, in]");
    let b = m.b.to_array().into_dimensionality::<ndarray::Ix2>().expect("B is [out, r]");
    let (a, b) = (a.mapv(r), b.mapv(r));
    let s = r(s);
    b.dot(&a).mapv(|v| r(r(v) * s))
}

/// Puts `adapter` onto `weights` as the plan's LoRA mappings say; `run` is the golden's
/// dtype.
///
/// Unmerged (`merged == false`): each adapted projection gets its bypass ([`Lora`]).
/// Merged: the golden's weights already hold `W + s·B·A` (its producer folded the
/// adapter before running, CONTRACT §5), so a correct run changes nothing; a planted
/// fault refolds the module in float64 from the unmerged base `W - s·B·A`: with its own
/// scaling or module (`lora.scale_*`, `lora.gate_up_swapped`, ...), without it
/// (`lora.not_loaded`, `lora.target_missing`), or in the low dtype
/// (`lora.merged_low_precision`: `run` where it is bfloat16 or float16, else bfloat16;
/// base, `B·A`, `s·B·A` and the sum each rounded to it).
///
/// Every layer is marked adapted, so that it records the optional sites of CONTRACT §5.
pub fn attach(
    weights: &mut Weights,
    adapter: &Adapter,
    merged: bool,
    plan: &Plan,
    run: Precision,
) -> Result<()> {
    if !merged {
        if let Some(f) = plan.faults.iter().find(|f| f.fault == Fault::LoraMergedLowPrecision) {
            return Err(Error::Usage {
                flag: "--fault".into(),
                what: format!(
                    "{f}: the golden's adapter is not merged (adapter.merged is false); this \
                     fault folds an adapter into the weights"
                ),
            });
        }
    }
    let low = match run {
        Precision::F32 => Precision::Bf16,
        p => p,
    };
    for (i, lw) in weights.layers.iter_mut().enumerate() {
        lw.adapted = true;
        let swap = plan.at(Some(i), None, None).maps_lora(LoraMapping::GateUpSwapped);
        for c in PROJECTIONS {
            let here = plan.at(Some(i), None, Some(c));
            let source = match (swap, c) {
                (true, Component::GateProj) => Component::UpProj,
                (true, Component::UpProj) => Component::GateProj,
                _ => c,
            };
            let dropped = here.maps_lora(LoraMapping::NotLoaded)
                || here.maps_lora(LoraMapping::TargetMissing);
            let used = if dropped { None } else { adapter.get(i, source) };
            let s = used.map(|m| planned_scaling(m, adapter, &here));
            let lin = projection_mut(lw, c);
            if !merged {
                lin.lora = used.zip(s).map(|(m, scaling)| Lora {
                    a: Matrix::Stored(m.a.clone()),
                    b: Matrix::Stored(m.b.clone()),
                    scaling,
                });
                continue;
            }
            let truth = adapter.get(i, c);
            let low_precision = here.maps_lora(LoraMapping::MergedLowPrecision);
            let unchanged = match (truth, used) {
                (Some(t), Some(u)) => t.a_key == u.a_key && Some(t.scaling) == s,
                (None, None) => true,
                _ => false,
            };
            if unchanged && !low_precision {
                continue;
            }
            let mut w = lin.weight.to_array();
            if let Some(t) = truth {
                w -= &merge_delta(t, t.scaling, None);
            }
            let low = low_precision.then_some(low);
            if let Some(p) = low {
                w.mapv_inplace(|v| p.round(v));
            }
            if let (Some(u), Some(s)) = (used, s) {
                w += &merge_delta(u, s, low);
            }
            let stored = low.unwrap_or(run);
            w.mapv_inplace(|v| stored.round(v));
            lin.weight = Matrix::Owned(w);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::Exact;
    use ndarray::Array2;

    #[test]
    fn delta_is_scaling_times_b_a_x_by_hand() {
        // A = [[1, 0], [0, 2]] (r=2, in=2), B = [[1, 1]] (out=1): B(A x) = x0 + 2 x1.
        let a = Matrix::Owned(Array2::from_shape_vec((2, 2), vec![1.0, 0.0, 0.0, 2.0]).unwrap());
        let b = Matrix::Owned(Array2::from_shape_vec((1, 2), vec![1.0, 1.0]).unwrap());
        let l = Lora { a, b, scaling: 0.5 };
        let x = Array3::from_shape_vec((1, 2, 2), vec![1.0, 3.0, -2.0, 0.5]).unwrap();
        let d = l.delta(&x, &Exact::new(dump::Precision::F32));
        assert_eq!(d.shape(), &[1, 2, 1]);
        assert_eq!(d.iter().copied().collect::<Vec<_>>(), vec![3.5, -0.5]);
    }
}
