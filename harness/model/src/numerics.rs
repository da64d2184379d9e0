//! Where a run rounds its values: the seam between the float64 reference and the
//! simulated low-precision ports.
//!
//! HF transformers keeps activations in the model's storage dtype (`float32`, `bfloat16`,
//! `float16`) and upcasts at a few named points (RMSNorm's variance, the rotary angles,
//! the softmax). Each such point of the model code is a [`RoundAt`]; the model calls
//! [`Numerics::round`] there and nowhere else, so that an implementation that simulates
//! fp16/bf16 storage with fp32 accumulation only has to say what happens at each point.
//!
//! The reference uses [`Exact`]: nothing is rounded, everything stays float64. An
//! implementation of the ascend port implements [`Numerics`] with, for instance,
//! `RoundAt::Projection => Precision::Bf16.round(x)` (a bf16 matmul result accumulated in
//! fp32 and stored in bf16) and `RoundAt::NormVariance => Precision::F32.round(x)`.

use ndarray::{Array, Dimension};

use dump::Precision;

/// A point of the forward pass where HF stores (rounds) a value, in compute order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoundAt {
    /// The weights as loaded (HF casts the checkpoint to the model dtype).
    Weight,
    /// The embedding output.
    Embedding,
    /// The rotary frequencies `inv_freq` (HF and MindFormers keep them in float32).
    RopeFrequency,
    /// `position · inv_freq` (HF: float32 with autocast disabled).
    RopeAngle,
    /// The cos/sin tables after the attention factor, cast to the activation dtype.
    RopeTable,
    /// RMSNorm's `mean(x²)` (HF: float32).
    NormVariance,
    /// RMSNorm's `x · rsqrt(var + eps)` cast back to the input dtype, before the weight.
    NormNormalized,
    /// RMSNorm's output (after the weight).
    NormOutput,
    /// A linear layer's output (q/k/v/o, gate/up/down, lm_head).
    Projection,
    /// Queries and keys after RoPE.
    RopeOutput,
    /// The raw product `q·kᵀ` (a batched matmul's output), before scaling.
    ScoreProduct,
    /// Attention scores `q·kᵀ · scale`.
    Scores,
    /// Scores plus the additive mask.
    MaskedScores,
    /// Each intermediate inside the softmax (`x - max`, its `exp`, the running sum, the
    /// quotient): the softmax's compute dtype (HF and MindFormers: float32).
    SoftmaxStep,
    /// Softmax output (HF: computed in float32, then cast to the query dtype).
    Probs,
    /// `probs · v`, the attention context.
    Context,
    /// `silu(gate) · up`, the MLP's hidden activation.
    MlpHidden,
    /// The residual stream after each addition.
    Residual,
}

impl RoundAt {
    /// Every point, in compute order.
    pub const ALL: [RoundAt; 18] = [
        RoundAt::Weight,
        RoundAt::Embedding,
        RoundAt::RopeFrequency,
        RoundAt::RopeAngle,
        RoundAt::RopeTable,
        RoundAt::NormVariance,
        RoundAt::NormNormalized,
        RoundAt::NormOutput,
        RoundAt::Projection,
        RoundAt::RopeOutput,
        RoundAt::ScoreProduct,
        RoundAt::Scores,
        RoundAt::MaskedScores,
        RoundAt::SoftmaxStep,
        RoundAt::Probs,
        RoundAt::Context,
        RoundAt::MlpHidden,
        RoundAt::Residual,
    ];
}

/// Where a linear layer's products are multiplied and summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// In float64, then rounded at `RoundAt::Projection`.
    Float64,
    /// In float32, term by term (a float32 matrix product): a bfloat16 or float16 port's
    /// matmul with float32 accumulation. Its inputs are float16/bfloat16 values, so each
    /// product is exact in float32 and only the sums round.
    Float32,
}

/// Decides how values are rounded at each [`RoundAt`] point.
pub trait Numerics: Send + Sync {
    /// A short name for manifests and messages (`"float64"`, `"ascend-bf16"`).
    fn name(&self) -> &str;

    /// True if `round(at, _)` may change a value; lets the model skip whole-array passes.
    fn rounds_at(&self, at: RoundAt) -> bool;

    /// The precision `RoundAt::Weight` rounds to (one [`Precision::round`]), or `None`
    /// when weights keep their values; lets a stored matrix be rounded as it is read.
    fn weight_precision(&self) -> Option<Precision>;

    /// The value stored at `at` for the exact value `x`.
    fn round(&self, at: RoundAt, x: f64) -> f64;

    /// The additive fill of a hidden mask entry (HF eager: `torch.finfo(dtype).min`).
    fn mask_fill(&self) -> f64;

    /// The dtype the additive mask is stored in (where a fill may overflow).
    fn mask_precision(&self) -> Precision;

    /// How a linear layer multiplies and sums: in float64 (the default), or in float32
    /// as a port does whose inputs and weights are in a dtype float32 holds exactly.
    fn products(&self) -> Products {
        Products::Float64
    }

    /// Rounds every value of `xs` in place at `at`: [`Numerics::round`] of each, with
    /// one dispatch for the whole slice where an implementation overrides it.
    fn round_slice(&self, at: RoundAt, xs: &mut [f64]) {
        for x in xs {
            *x = self.round(at, *x);
        }
    }

    /// Rounds every element of `a` in place at `at`.
    fn round_array<D: Dimension>(&self, at: RoundAt, a: &mut Array<f64, D>)
    where
        Self: Sized,
    {
        round_in_place(self, at, a);
    }
}

/// Rounds `a` at `at` through a trait object (the model holds `&dyn Numerics`).
pub fn round_in_place<D: Dimension>(n: &dyn Numerics, at: RoundAt, a: &mut Array<f64, D>) {
    if !n.rounds_at(at) {
        return;
    }
    match a.as_slice_memory_order_mut() {
        Some(xs) => n.round_slice(at, xs),
        None => a.mapv_inplace(|x| n.round(at, x)),
    }
}

/// Nothing is rounded: the float64 reference.
///
/// One exception, which defines values rather than approximating them: a masked score
/// (`score + fill`, far below any real score) is stored in the mask's dtype, as HF
/// stores it. In float32 and bfloat16 the fill swallows the score in float64 too, but a
/// float16 fill of `-65504` does not: HF's `score + fill` rounds to `-65504` (or `-inf`
/// once `score <= -16`), so a padding query's fully masked row is uniform in HF and would
/// not be in float64. Visible entries are never touched.
#[derive(Debug, Clone, Copy)]
pub struct Exact {
    /// The dtype whose `finfo.min` fills hidden mask entries, so that fully masked rows
    /// behave as in HF (every entry equal, a uniform softmax, no NaN).
    pub mask_dtype: Precision,
}

impl Exact {
    pub fn new(mask_dtype: Precision) -> Exact {
        Exact { mask_dtype }
    }
}

impl Numerics for Exact {
    fn name(&self) -> &str {
        "float64"
    }

    fn rounds_at(&self, at: RoundAt) -> bool {
        at == RoundAt::MaskedScores
    }

    fn weight_precision(&self) -> Option<Precision> {
        None
    }

    fn round(&self, at: RoundAt, x: f64) -> f64 {
        if at == RoundAt::MaskedScores && x < self.mask_fill() / 2.0 {
            self.mask_dtype.round(x)
        } else {
            x
        }
    }

    fn mask_fill(&self) -> f64 {
        dtype_min(self.mask_dtype)
    }

    fn mask_precision(&self) -> Precision {
        self.mask_dtype
    }
}

/// `torch.finfo(dtype).min` of a precision.
pub fn dtype_min(p: Precision) -> f64 {
    match p {
        Precision::F32 => f32::MIN as f64,
        Precision::Bf16 => half::bf16::MIN.to_f64(),
        Precision::F16 => half::f16::MIN.to_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_minima_are_torch_finfo_min() {
        assert_eq!(dtype_min(Precision::F16), -65504.0);
        assert_eq!(dtype_min(Precision::F32), -3.4028234663852886e38);
        assert_eq!(dtype_min(Precision::Bf16), -3.3895313892515355e38);
    }

    #[test]
    fn exact_stores_masked_scores_like_the_mask_dtype() {
        let n = Exact::new(Precision::F16);
        assert_eq!(n.round(RoundAt::MaskedScores, -65504.0 + 0.37), -65504.0);
        assert_eq!(n.round(RoundAt::MaskedScores, -65504.0 - 20.0), f64::NEG_INFINITY);
        assert_eq!(n.round(RoundAt::MaskedScores, 0.37), 0.37);
    }

    #[test]
    fn exact_rounds_nothing() {
        let n = Exact::new(Precision::F32);
        let mut a = ndarray::arr1(&[0.1, 1.0 / 3.0]);
        n.round_array(RoundAt::Projection, &mut a);
        assert_eq!(a, ndarray::arr1(&[0.1, 1.0 / 3.0]));
    }
}
