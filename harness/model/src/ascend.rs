//! `parity run --impl ascend`: how a MindSpore Llama port computes on Ascend, simulated
//! on the CPU with the model code of the reference and a [`Numerics`] that stores each
//! value where the port stores it.
//!
//! The defaults are MindFormers' conventions (`mindformers/models/llama/llama.py`,
//! `llama_layer.py`, `llama_transformer.py`, `mindformers/models/utils.py`), each a
//! named option of [`AscendOptions`]:
//!
//! | value | stored as | option |
//! |---|---|---|
//! | parameters | the compute dtype (the checkpoint is cast at load) | — |
//! | matmul outputs (q/k/v/o, gate/up/down, lm_head, `q·kᵀ`, `probs·v`) | inputs in the dtype, float32 accumulation (the Cube unit), output cast to the dtype | [`Accumulation`] |
//! | RMSNorm | `x` cast to float32, `mean(x²)` and `x·rsqrt(var+eps)` in float32, cast to the dtype, times the weight in the dtype (`LlamaRMSNorm._self_norm`) | [`NormWeightOrder`] |
//! | RoPE | `inv_freq` and `pos·inv_freq` in float32, tables for `max_position_embeddings` built once (`FreqsMgr`), cast to the rotary dtype, gathered by position | [`AscendOptions::rotary_dtype`] |
//! | mask | additive, `-10000` where hidden, in the compute dtype (`LowerTriangularMaskWithDynamic`: `(1 - mask) · multiply_data`) | [`AscendOptions::mask_fill`] |
//! | scores | `q·kᵀ` in the dtype, times `inv_norm_factor` (a tensor of the dtype), plus the mask, in the dtype | — |
//! | softmax | float32 (`softmax_compute_type`), cast back | [`SoftmaxPrecision`] (a fault seam) |
//! | KV cache | static `[B, nKV, max_len, D]` in the dtype, written in place (`ops.scatter_nd_update` / slice assign) | — |
//! | residual, SiLU·up, RoPE output | the dtype | — |
//!
//! A linear layer's float32 accumulation is computed as the port computes it: inputs and
//! weights (values of the dtype, which float32 holds exactly) multiplied and summed in
//! float32, one fused multiply-add chain an output ([`Products::Float32`]), then cast to
//! the dtype; at float32 those sums' own rounding is the port's whole error, so they are
//! computed there too. Elsewhere (`q·kᵀ`, `probs·v`: sums over a head's width or the
//! keys) it is simulated by rounding the float64 sum to float32 and then to the dtype; at
//! bfloat16 and float16 the difference (a few float32 ulps of the sum) is far below the
//! dtype's rounding. Values that a float16/bfloat16 op computes internally in float32
//! and casts once are rounded once.
//!
//! Faults are planted by the same [`Plan`] as in the reference; the two precision faults
//! are choices of this numerics: `norm.no_upcast` stores `mean(x²)` in the compute dtype,
//! `attn.softmax_low_precision` every softmax intermediate.

use contract::error::Result;
use dump::{Dump, Precision};

use crate::context::RunContext;
use crate::llama::Llama;
use crate::numerics::{Numerics, Products, RoundAt};
use crate::plan::{Plan, SoftmaxPrecision, VariancePrecision};
use crate::run::RunOutput;
use crate::runner::{load_model, Recorded, Replay, RopeTableSource, Runner};
use crate::step_output::Watch;

/// Where RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeightOrder {
    /// `cast(x · rsqrt(var + eps)) · w`, the product in the dtype (HF, and MindFormers'
    /// `LlamaRMSNorm._self_norm`).
    CastThenWeight,
    /// `cast(x · rsqrt(var + eps) · w)`, the weight applied in float32 before the one cast
    /// (the fused `ops.RmsNorm` kernel, MindFormers `LlamaRMSNorm._rms_norm`).
    WeightInFloat32,
}

/// How a matmul accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// float32 accumulation, the output cast to the dtype (Ascend's Cube unit).
    Float32,
    /// The output rounded once from the exact sum.
    Exact,
}

/// The simulated port's conventions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AscendOptions {
    /// The compute dtype: parameters and activations (`compute_dtype`).
    pub precision: Precision,
    /// The dtype of the cos/sin tables (`rotary_dtype`; MindFormers' predict configs set
    /// it to the compute dtype).
    pub rotary_dtype: Precision,
    /// The additive fill of hidden mask entries, stored in the compute dtype
    /// (`LowerTriangularMaskWithDynamic.multiply_data = -10000.0`).
    pub mask_fill: f64,
    pub norm_weight_order: NormWeightOrder,
    pub accumulation: Accumulation,
    /// Rotary tables built once and gathered (`FreqsMgr`), or per step.
    pub precomputed_rope_tables: bool,
}

impl AscendOptions {
    /// MindFormers' defaults at `precision`.
    pub fn mindformers(precision: Precision) -> AscendOptions {
        AscendOptions {
            precision,
            rotary_dtype: precision,
            mask_fill: -10000.0,
            norm_weight_order: NormWeightOrder::CastThenWeight,
            accumulation: Accumulation::Float32,
            precomputed_rope_tables: true,
        }
    }
}

impl AscendOptions {
    /// MindFormers' defaults at `precision`, with the additive mask fill of the framework
    /// that produced a dump (`Manifest::framework`): PyTorch's HF code fills hidden
    /// entries with the dtype's minimum, so a padding query's fully hidden row is
    /// uniform; MindSpore's -10000 leaves it uneven.
    pub fn for_framework(precision: Precision, framework: &str) -> AscendOptions {
        let mut o = AscendOptions::mindformers(precision);
        if matches!(framework, "transformers" | "pytorch" | "torch") {
            o.mask_fill = crate::numerics::dtype_min(precision);
        }
        o
    }
}

/// The numerics of the simulated port (with the precision faults of its plan).
#[derive(Debug, Clone)]
pub struct AscendNumerics {
    opts: AscendOptions,
    variance: VariancePrecision,
    softmax: SoftmaxPrecision,
    name: String,
}

impl AscendNumerics {
    pub fn new(opts: AscendOptions, plan: &Plan) -> AscendNumerics {
        let name = format!("ascend-{}", opts.precision.name());
        AscendNumerics {
            opts,
            variance: plan.variance_precision,
            softmax: plan.softmax_precision,
            name,
        }
    }

    /// The roundings a value stored at `at` goes through, in order: one precision, or
    /// float32 first and then another (a matmul accumulated in float32, the rotary
    /// tables computed in float32).
    fn steps(&self, at: RoundAt) -> (Option<Precision>, Precision) {
        let p = self.opts.precision;
        let f32 = Precision::F32;
        match at {
            RoundAt::Weight | RoundAt::Embedding => (None, p),
            RoundAt::RopeFrequency | RoundAt::RopeAngle => (None, f32),
            RoundAt::RopeTable => (Some(f32), self.opts.rotary_dtype),
            RoundAt::NormVariance => match self.variance {
                VariancePrecision::Float32 => (None, f32),
                VariancePrecision::Compute => (None, p),
            },
            RoundAt::NormNormalized => match self.opts.norm_weight_order {
                NormWeightOrder::CastThenWeight => (None, p),
                NormWeightOrder::WeightInFloat32 => (None, f32),
            },
            RoundAt::NormOutput => (None, p),
            // A matmul's output: through float32 when it accumulates there, then the dtype.
            RoundAt::Projection | RoundAt::ScoreProduct | RoundAt::Context => {
                match self.opts.accumulation {
                    Accumulation::Float32 => (Some(f32), p),
                    Accumulation::Exact => (None, p),
                }
            }
            RoundAt::RopeOutput | RoundAt::Scores | RoundAt::MaskedScores => (None, p),
            RoundAt::SoftmaxStep => match self.softmax {
                SoftmaxPrecision::Float32 => (None, f32),
                SoftmaxPrecision::Compute => (None, p),
            },
            RoundAt::Probs | RoundAt::MlpHidden | RoundAt::Residual => (None, p),
        }
    }
}

impl Numerics for AscendNumerics {
    fn name(&self) -> &str {
        &self.name
    }

    fn rounds_at(&self, _at: RoundAt) -> bool {
        true
    }

    fn weight_precision(&self) -> Option<Precision> {
        match self.steps(RoundAt::Weight) {
            (None, p) => Some(p),
            (Some(_), _) => unreachable!("weights are rounded once"),
        }
    }

    fn round(&self, at: RoundAt, x: f64) -> f64 {
        match self.steps(at) {
            (Some(first), then) => then.round(first.round(x)),
            (None, p) => p.round(x),
        }
    }

    fn round_slice(&self, at: RoundAt, xs: &mut [f64]) {
        let (first, then) = self.steps(at);
        if let Some(first) = first {
            first.round_slice(xs);
        }
        then.round_slice(xs);
    }

    fn mask_fill(&self) -> f64 {
        self.opts.precision.round(self.opts.mask_fill)
    }

    fn mask_precision(&self) -> Precision {
        self.opts.precision
    }

    fn products(&self) -> Products {
        // Inputs and weights are values of the dtype, which float32 holds exactly.
        match self.opts.accumulation {
            Accumulation::Float32 => Products::Float32,
            Accumulation::Exact => Products::Float64,
        }
    }
}

/// Runs `golden`'s scenario as the simulated port with `opts`; the dump declares
/// `opts.precision`. The run is told to `ctx`, whose sha256 check applies to a
/// referenced checkpoint.
pub fn run(
    golden: &Dump,
    opts: &AscendOptions,
    plan: &Plan,
    teacher_force: bool,
    ctx: &RunContext,
) -> Result<RunOutput> {
    run_watched(golden, opts, plan, teacher_force, None, ctx)
}

/// How a run departs from the correct recorded one: replayed from a step and layer
/// ([`Replay`]), its sites shown to a watch that may stop it early.
pub struct Hypothesis<'b> {
    pub plan: &'b Plan,
    pub replay: Option<Replay<'b>>,
    pub watch: Option<std::sync::Arc<Watch>>,
}

/// The correct run (no fault) of `golden`'s scenario as the simulated port, recorded to
/// replay hypotheses from.
pub fn run_recorded(golden: &Dump, opts: &AscendOptions, ctx: &RunContext) -> Result<Recorded> {
    let plan = Plan::default();
    with_runner(golden, opts, &plan, None, ctx, |runner, model, _| {
        runner.run_recorded(model, golden)
    })
}

/// The run of one hypothesis: replayed from its departure when it has one, else in full.
pub fn run_hypothesis(
    golden: &Dump,
    opts: &AscendOptions,
    h: Hypothesis,
    ctx: &RunContext,
) -> Result<Dump> {
    with_runner(golden, opts, h.plan, h.watch, ctx, |runner, model, _| match &h.replay {
        Some(replay) => runner.run_replayed(model, golden, replay),
        None => Ok(runner.run(model, golden, false)?.dump),
    })
}

/// [`run`], with every site of the free run shown to `watch`, which may stop it early.
pub fn run_watched(
    golden: &Dump,
    opts: &AscendOptions,
    plan: &Plan,
    teacher_force: bool,
    watch: Option<std::sync::Arc<Watch>>,
    ctx: &RunContext,
) -> Result<RunOutput> {
    with_runner(golden, opts, plan, watch, ctx, |runner, model, warnings| {
        let out = runner.run(model, golden, teacher_force)?;
        Ok(RunOutput { warnings, ..out })
    })
}

/// Loads `golden`'s model for the simulated port with `opts` and `plan` and hands its
/// runner, the model and the load's warnings to `f`.
fn with_runner<T>(
    golden: &Dump,
    opts: &AscendOptions,
    plan: &Plan,
    watch: Option<std::sync::Arc<Watch>>,
    ctx: &RunContext,
    f: impl FnOnce(&Runner, &Llama, Vec<String>) -> Result<T>,
) -> Result<T> {
    let numerics = AscendNumerics::new(*opts, plan);
    let mut warnings = Vec::new();
    let mut model = load_model(golden, plan, ctx, &mut warnings)?;
    model.weights.round(&numerics);
    let rope_tables = if opts.precomputed_rope_tables {
        RopeTableSource::Precomputed
    } else {
        RopeTableSource::PerStep
    };
    let runner = Runner {
        implementation: "ascend",
        numerics: &numerics,
        plan,
        declared: opts.precision,
        rope_tables,
        watch,
        context: ctx,
    };
    f(&runner, &model, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_output_goes_through_float32_then_the_dtype() {
        let n = AscendNumerics::new(AscendOptions::mindformers(Precision::F16), &Plan::default());
        // 1 + 2^-11 is a float16 tie (rounds to even: 1.0); the 2^-30 above it is below
        // f32 resolution, so the f32 step makes it the tie again. (half's conversions from
        // f64 themselves go through f32, so a direct cast gives the same here.)
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-30);
        assert_eq!(n.round(RoundAt::Projection, x), 1.0);
        assert_eq!(n.round(RoundAt::Projection, 1.0 + 2f64.powi(-10)), 1.0 + 2f64.powi(-10));
    }

    #[test]
    fn a_float32_accumulating_port_multiplies_in_float32_at_every_dtype_and_an_exact_one_in_float64(
    ) {
        let plan = Plan::default();
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            let n = AscendNumerics::new(AscendOptions::mindformers(p), &plan);
            assert_eq!(n.products(), Products::Float32, "{p}");
            let exact = AscendOptions {
                accumulation: Accumulation::Exact,
                ..AscendOptions::mindformers(p)
            };
            assert_eq!(AscendNumerics::new(exact, &plan).products(), Products::Float64, "{p}");
        }
    }

    #[test]
    fn mask_fill_is_minus_ten_thousand_in_the_dtype() {
        let n = AscendNumerics::new(AscendOptions::mindformers(Precision::Bf16), &Plan::default());
        assert_eq!(n.mask_fill(), -9984.0);
        let n = AscendNumerics::new(AscendOptions::mindformers(Precision::F16), &Plan::default());
        assert_eq!(n.mask_fill(), -10000.0);
    }

    #[test]
    fn precision_faults_move_the_variance_and_softmax_to_the_dtype() {
        let plan = Plan::new(&[
            contract::fault::Fault::NormNoUpcast,
            contract::fault::Fault::AttnSoftmaxLowPrecision,
        ]);
        let n = AscendNumerics::new(AscendOptions::mindformers(Precision::Bf16), &plan);
        let x = 1.0 + 2f64.powi(-12);
        assert_eq!(n.round(RoundAt::NormVariance, x), 1.0);
        assert_eq!(n.round(RoundAt::SoftmaxStep, x), 1.0);
        let clean =
            AscendNumerics::new(AscendOptions::mindformers(Precision::Bf16), &Plan::default());
        assert_eq!(clean.round(RoundAt::NormVariance, x), x);
    }
}
