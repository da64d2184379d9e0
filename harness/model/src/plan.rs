//! The fault seams: one enum per place where a real port goes wrong, chosen from the
//! planted faults (CONTRACT §3, `--fault ID`).
//!
//! The model code never asks "is fault X planted?"; each building block takes the
//! variant that says what it does (`RopeLayout::Interleaved`, `CacheWrite::Skip`, ...),
//! and [`Plan::new`] is the one place that maps fault IDs to variants. An implementation
//! with no faults gets [`Plan::default`], HF's behaviour everywhere.
//!
//! Two faults are precision choices ([`VariancePrecision`], [`SoftmaxPrecision`]): the
//! model code reads them through the [`Numerics`](super::numerics::Numerics) of the run,
//! so they change nothing in the float64 reference, whose compute dtype is float64.

use contract::fault::{Component, Fault, RotaryTable, Scaling, ScopedFault};
use contract::site::Step;

/// Where decode positions come from (positions bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodePositions {
    /// HF: the row's count of real tokens so far (`pos_offset` accumulates).
    #[default]
    Continue,
    /// `rope.pos_reset`: decode step j uses position j.
    Reset,
    /// `rope.pos_fixed`: every decode step uses position 0.
    Fixed,
    /// `rope.pos_off_by_one`: the right position plus this offset (1 unless the fault
    /// says `@offset=N`).
    Off(i64),
}

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeLayout {
    /// HF `rotate_half`: pairs (k, k + D/2).
    #[default]
    HalfSplit,
    /// GPT-J / Meta: pairs (2k, 2k + 1), pair k turning with frequency k.
    Interleaved,
    /// `rope.interleaved@table=sliced`: pairs (2k, 2k + 1) reading entry 2k of HF's
    /// duplicated cos/sin table (`cos[..., 0::2]`), so pair k turns with frequency
    /// 2k mod D/2.
    InterleavedSliced,
}

/// How the cos/sin tables reach the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeTables {
    #[default]
    AsComputed,
    /// `rope.cos_sin_swapped`.
    Swapped,
}

/// Which rotary frequencies are used.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeFrequencies {
    /// The configured theta and scaling.
    #[default]
    Configured,
    /// `rope.wrong_theta`: base `theta` (10000 unless the fault says `@theta=`), with the
    /// configured scaling dropped (plain RoPE) or kept (`@scaling=kept`).
    Wrong { theta: f64, keep_scaling: bool },
}

/// Precision of `position · inv_freq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnglePrecision {
    /// Whatever the numerics say (`RoundAt::RopeAngle`).
    #[default]
    Numerics,
    /// `rope.low_precision_angles`: float16.
    F16,
}

/// The visibility rule of the attention mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskRule {
    /// Causal and left padding hidden.
    #[default]
    CausalPadded,
    /// `mask.none`: everything visible in prefill (padding still hidden).
    NoCausal,
    /// `mask.inverted`: future visible, past hidden.
    Inverted,
    /// `mask.padding_ignored`: causal only.
    PaddingIgnored,
}

/// Which tokens the mask hides as padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSource {
    /// The scenario's `attention_mask` (HF `generate`).
    #[default]
    AttentionMask,
    /// `mask.pad_token_masked`: `input_ids != pad_token_id`, which also hides real
    /// tokens whose id is the pad id (the config's `pad_token_id`, 0 when absent).
    TokenIds,
}

/// The additive fill of hidden mask entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskFill {
    /// The implementation's convention ([`Numerics::mask_fill`](super::numerics::Numerics::mask_fill)).
    #[default]
    Convention,
    /// `mask.fp16_overflow`: `masked_fill(-1e9)` (the constant many ports copy from the
    /// original Transformer code), stored in the mask's dtype: finite in float32 and
    /// bfloat16, `-inf` in float16, where a fully hidden row becomes `-inf - (-inf)` = NaN.
    Overflowing,
}

/// The fill of [`MaskFill::Overflowing`].
pub const OVERFLOWING_FILL: f64 = -1.0e9;

/// Which cache slot a step writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheWrite {
    /// The next free slot.
    #[default]
    NextSlot,
    /// `kv.stale`: decode k/v never written.
    Skip,
    /// `kv.wrong_slot`: decode writes this many slots past the next free one (1 unless
    /// the fault says `@offset=N`).
    SlotsOff(usize),
}

/// Which keys the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachedKeys {
    #[default]
    Rotated,
    /// `kv.unrotated_keys`: keys cached before RoPE.
    Unrotated,
}

/// Which key/value head a query head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadMapping {
    /// HF `repeat_kv`: query head h reads kv head h / n_rep.
    #[default]
    Grouped,
    /// `kv.gqa_tiled`: h % n_kv.
    Tiled,
}

/// The score scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreScale {
    /// `1/sqrt(D)`.
    #[default]
    InvSqrtHeadDim,
    /// `attn.no_scale`.
    Unscaled,
}

/// The normalisation applied where HF has RMSNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormKind {
    /// `x · rsqrt(mean(x²) + eps) · w`.
    #[default]
    Rms,
    /// `norm.layernorm`: mean subtracted first.
    LayerNorm,
    /// `norm.eps_outside`: `x / (sqrt(mean(x²)) + eps) · w`.
    EpsOutside,
}

/// A bias (LayerNorm beta) after the norm's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormBeta {
    /// RMSNorm has none.
    #[default]
    Absent,
    /// `norm.bias`: a beta left in, [`norm_beta`]`(j)` for hidden unit `j`.
    LeftIn,
}

/// The beta of `norm.bias` for hidden unit `j`: `0.1 + 0.02 · (j mod 5)`, deterministic,
/// non-zero, and large enough to exceed bfloat16's tolerance at the first norm.
pub fn norm_beta(j: usize) -> f64 {
    0.1 + 0.02 * (j % 5) as f64
}

/// The dtype of RMSNorm's `mean(x²)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VariancePrecision {
    /// Upcast to float32 (HF, MindFormers `LlamaRMSNorm.compute_type`).
    #[default]
    Float32,
    /// `norm.no_upcast`: the compute dtype.
    Compute,
}

/// The dtype of the softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SoftmaxPrecision {
    /// float32 (HF, MindFormers `softmax_compute_type`).
    #[default]
    Float32,
    /// `attn.softmax_low_precision`: the compute dtype.
    Compute,
}

/// How HF parameter names map onto the model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMapping {
    #[default]
    Hf,
    /// `weights.gate_up_swapped`.
    GateUpSwapped,
    /// `weights.transposed`: square projections (o_proj, and q_proj where square) not transposed.
    SquareTransposed,
    /// `norm.weight_unmapped`: the key map lacks the `input_layernorm` rule (or the rule
    /// of the component it is narrowed to), so those weights stay at ones.
    NormWeightsUnmapped,
}

/// How a LoRA adapter (CONTRACT §5) is loaded onto a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMapping {
    /// PEFT's: each module's own A, B and scaling.
    #[default]
    Peft,
    /// `lora.scale_alpha`: scaled by alpha (r ignored).
    ScaleAlpha,
    /// `lora.scale_missing`: added unscaled.
    ScaleMissing,
    /// `lora.rslora_ignored`: alpha / r where rsLoRA asks alpha / sqrt(r).
    RsloraIgnored,
    /// `lora.pattern_ignored`: the default r and alpha's scaling on every module.
    PatternIgnored,
    /// `lora.not_loaded`: no adapter (B left at zero).
    NotLoaded,
    /// `lora.target_missing`: the module left without its adapter.
    TargetMissing,
    /// `lora.gate_up_swapped`: gate_proj's adapter on up_proj and up_proj's on gate_proj.
    GateUpSwapped,
    /// `lora.merged_low_precision`: `W + s·B·A` folded in the compute dtype.
    MergedLowPrecision,
}

/// The choices of every seam, derived from the planted faults.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The planted faults and where each acts; the seams below are those of every
    /// fault, and [`Plan::at`] narrows them to one place.
    pub faults: Vec<ScopedFault>,
    pub decode_positions: DecodePositions,
    pub rope_layout: RopeLayout,
    pub rope_tables: RopeTables,
    pub rope_frequencies: RopeFrequencies,
    pub angle_precision: AnglePrecision,
    pub mask_rule: MaskRule,
    pub cache_write: CacheWrite,
    pub cached_keys: CachedKeys,
    pub head_mapping: HeadMapping,
    pub score_scale: ScoreScale,
    pub norm_kind: NormKind,
    pub norm_beta: NormBeta,
    pub variance_precision: VariancePrecision,
    pub softmax_precision: SoftmaxPrecision,
    pub padding_source: PaddingSource,
    pub mask_fill: MaskFill,
    pub weight_mappings: Vec<WeightMapping>,
    pub lora_mappings: Vec<LoraMapping>,
}

impl Plan {
    /// The seams for `faults` planted everywhere (HF's behaviour where none applies).
    pub fn new(faults: &[Fault]) -> Plan {
        let scoped: Vec<ScopedFault> = faults.iter().map(|&f| f.into()).collect();
        Plan::scoped(&scoped)
    }

    /// The seams for `faults`, each acting within its scope. `norm.weight_unmapped`
    /// without a component acts on `input_layernorm`, the rule a key map most often lacks.
    pub fn scoped(faults: &[ScopedFault]) -> Plan {
        let faults: Vec<ScopedFault> = faults
            .iter()
            .cloned()
            .map(|mut f| {
                if f.fault == Fault::NormWeightUnmapped && f.scope.component.is_none() {
                    f.scope.component = Some(Component::InputLayernorm);
                }
                f
            })
            .collect();
        Plan { faults: faults.clone(), ..Plan::seams(&faults) }
    }

    /// The seams at one place: decoder layer `layer` (`None`: outside the layers), step
    /// `step` (`None`: when weights are loaded), on `component` (`None`: none in
    /// particular). Faults scoped elsewhere are left out.
    pub fn at(
        &self,
        layer: Option<usize>,
        step: Option<Step>,
        component: Option<Component>,
    ) -> Plan {
        let here: Vec<ScopedFault> =
            self.faults.iter().filter(|f| f.acts_at(layer, step, component)).cloned().collect();
        Plan { faults: here.clone(), ..Plan::seams(&here) }
    }

    fn seams(faults: &[ScopedFault]) -> Plan {
        let mut p = Plan::default();
        for sf in faults {
            let params = &sf.params;
            match sf.fault {
                Fault::RopePosReset => p.decode_positions = DecodePositions::Reset,
                Fault::RopePosFixed => p.decode_positions = DecodePositions::Fixed,
                Fault::RopePosOffByOne => {
                    p.decode_positions = DecodePositions::Off(params.offset_or_default())
                }
                Fault::RopeInterleaved => {
                    p.rope_layout = match params.table {
                        Some(RotaryTable::Sliced) => RopeLayout::InterleavedSliced,
                        _ => RopeLayout::Interleaved,
                    }
                }
                Fault::RopeCosSinSwapped => p.rope_tables = RopeTables::Swapped,
                Fault::RopeWrongTheta => {
                    p.rope_frequencies = RopeFrequencies::Wrong {
                        theta: params.theta_or_default(),
                        keep_scaling: params.scaling == Some(Scaling::Kept),
                    }
                }
                Fault::RopeLowPrecisionAngles => p.angle_precision = AnglePrecision::F16,
                Fault::MaskNone => p.mask_rule = MaskRule::NoCausal,
                Fault::MaskInverted => p.mask_rule = MaskRule::Inverted,
                Fault::MaskPaddingIgnored => p.mask_rule = MaskRule::PaddingIgnored,
                Fault::NormLayernorm => p.norm_kind = NormKind::LayerNorm,
                Fault::NormEpsOutside => p.norm_kind = NormKind::EpsOutside,
                Fault::NormWeightUnmapped => {
                    p.weight_mappings.push(WeightMapping::NormWeightsUnmapped)
                }
                Fault::WeightsTransposed => p.weight_mappings.push(WeightMapping::SquareTransposed),
                Fault::WeightsGateUpSwapped => p.weight_mappings.push(WeightMapping::GateUpSwapped),
                Fault::KvStale => p.cache_write = CacheWrite::Skip,
                Fault::KvWrongSlot => {
                    p.cache_write = CacheWrite::SlotsOff(params.offset_or_default().max(1) as usize)
                }
                Fault::KvUnrotatedKeys => p.cached_keys = CachedKeys::Unrotated,
                Fault::KvGqaTiled => p.head_mapping = HeadMapping::Tiled,
                Fault::AttnNoScale => p.score_scale = ScoreScale::Unscaled,
                Fault::MaskPadTokenMasked => p.padding_source = PaddingSource::TokenIds,
                Fault::MaskFp16Overflow => p.mask_fill = MaskFill::Overflowing,
                Fault::NormBias => p.norm_beta = NormBeta::LeftIn,
                Fault::NormNoUpcast => p.variance_precision = VariancePrecision::Compute,
                Fault::AttnSoftmaxLowPrecision => p.softmax_precision = SoftmaxPrecision::Compute,
                Fault::LoraScaleAlpha => p.lora_mappings.push(LoraMapping::ScaleAlpha),
                Fault::LoraScaleMissing => p.lora_mappings.push(LoraMapping::ScaleMissing),
                Fault::LoraRsloraIgnored => p.lora_mappings.push(LoraMapping::RsloraIgnored),
                Fault::LoraPatternIgnored => p.lora_mappings.push(LoraMapping::PatternIgnored),
                Fault::LoraNotLoaded => p.lora_mappings.push(LoraMapping::NotLoaded),
                Fault::LoraTargetMissing => p.lora_mappings.push(LoraMapping::TargetMissing),
                Fault::LoraGateUpSwapped => p.lora_mappings.push(LoraMapping::GateUpSwapped),
                Fault::LoraMergedLowPrecision => {
                    p.lora_mappings.push(LoraMapping::MergedLowPrecision)
                }
                // Training faults act on the loss, the scaler and the optimizer of a
                // training step, which reads them from `faults` itself.
                Fault::TrainLabelsUnshifted
                | Fault::TrainIgnoreIndexCounted
                | Fault::TrainLossScaleKept
                | Fault::TrainOverflowApplied
                | Fault::TrainWeightDecayEverywhere
                | Fault::TrainClipPerParameter
                | Fault::TrainAdamNoBiasCorrection
                | Fault::TrainMicroBatchesSummed => {}
            }
        }
        p
    }

    pub fn maps(&self, m: WeightMapping) -> bool {
        self.weight_mappings.contains(&m)
    }

    /// Whether the plan loads a LoRA adapter with `m`.
    pub fn maps_lora(&self, m: LoraMapping) -> bool {
        self.lora_mappings.contains(&m)
    }
}

/// Refuses a fault scope that selects nothing or reaches past the model: a layer index
/// outside the model's `layers` decoder layers, or a step pattern that matches none of
/// the scenario's `steps`. Such a fault would plant nothing (or less than it says), and
/// the run would pass as if it had been tried.
pub fn check_scopes(faults: &[ScopedFault], layers: usize, steps: &[Step]) -> Result<(), String> {
    for f in faults {
        let id = f.fault.id();
        if let Some(outside) = f.scope.layers.iter().flatten().find(|&&l| l >= layers) {
            return Err(format!(
                "{id}@layers: layer {outside} is outside the model, which has {layers} decoder layers (0-{})",
                layers.saturating_sub(1)
            ));
        }
        let matched = |p: &&String| steps.iter().any(|&s| contract::fault::step_matches(p, s));
        if let Some(none) = f.scope.steps.iter().flatten().find(|p| !matched(p)) {
            let have: Vec<String> = steps.iter().map(ToString::to_string).collect();
            return Err(format!(
                "{id}@steps: step {none} matches none of the scenario's steps ({})",
                have.join(", ")
            ));
        }
    }
    Ok(())
}
