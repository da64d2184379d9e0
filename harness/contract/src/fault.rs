//! The known porting faults of CONTRACT §3, with their stable IDs, where a planted
//! fault acts and the parameters it acts with (CONTRACT §4: `--fault ID@layers=2`,
//! `@steps=decode.*`, `@component=o_proj`, `@theta=500000`, `@offset=3`).

use std::fmt;

use super::site::Step;

/// A known porting fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    RopePosReset,
    RopePosFixed,
    RopePosOffByOne,
    RopeInterleaved,
    RopeCosSinSwapped,
    RopeWrongTheta,
    RopeLowPrecisionAngles,
    MaskNone,
    MaskInverted,
    MaskPaddingIgnored,
    MaskPadTokenMasked,
    MaskFp16Overflow,
    NormLayernorm,
    NormBias,
    NormEpsOutside,
    NormNoUpcast,
    NormWeightUnmapped,
    WeightsTransposed,
    WeightsGateUpSwapped,
    KvStale,
    KvWrongSlot,
    KvUnrotatedKeys,
    KvGqaTiled,
    AttnNoScale,
    AttnSoftmaxLowPrecision,
    LoraScaleAlpha,
    LoraScaleMissing,
    LoraRsloraIgnored,
    LoraPatternIgnored,
    LoraNotLoaded,
    LoraTargetMissing,
    LoraGateUpSwapped,
    LoraMergedLowPrecision,
    TrainLabelsUnshifted,
    TrainIgnoreIndexCounted,
    TrainLossScaleKept,
    TrainOverflowApplied,
    TrainWeightDecayEverywhere,
    TrainClipPerParameter,
    TrainAdamNoBiasCorrection,
    TrainMicroBatchesSummed,
}

impl Fault {
    /// The LoRA faults (CONTRACT §5): planted only on a golden with an adapter.
    pub const LORA: [Fault; 8] = [
        Fault::LoraScaleAlpha,
        Fault::LoraScaleMissing,
        Fault::LoraRsloraIgnored,
        Fault::LoraPatternIgnored,
        Fault::LoraNotLoaded,
        Fault::LoraTargetMissing,
        Fault::LoraGateUpSwapped,
        Fault::LoraMergedLowPrecision,
    ];

    /// The training faults (CONTRACT §6): they act on a training step only, so they are
    /// not in [`Fault::ALL`] (the faults an inference run can hold).
    pub const TRAIN: [Fault; 8] = [
        Fault::TrainLabelsUnshifted,
        Fault::TrainIgnoreIndexCounted,
        Fault::TrainLossScaleKept,
        Fault::TrainOverflowApplied,
        Fault::TrainWeightDecayEverywhere,
        Fault::TrainClipPerParameter,
        Fault::TrainAdamNoBiasCorrection,
        Fault::TrainMicroBatchesSummed,
    ];

    /// Whether the fault acts on a training step (needs a golden with `train`).
    pub fn is_train(self) -> bool {
        Fault::TRAIN.contains(&self)
    }

    /// Whether the fault acts on a LoRA adapter (needs a golden with one).
    pub fn is_lora(self) -> bool {
        Fault::LORA.contains(&self)
    }

    /// Every fault an inference run can hold, in the contract's order (§3, then §5);
    /// the training faults of §6 are [`Fault::TRAIN`].
    pub const ALL: [Fault; 33] = [
        Fault::RopePosReset,
        Fault::RopePosFixed,
        Fault::RopePosOffByOne,
        Fault::RopeInterleaved,
        Fault::RopeCosSinSwapped,
        Fault::RopeWrongTheta,
        Fault::RopeLowPrecisionAngles,
        Fault::MaskNone,
        Fault::MaskInverted,
        Fault::MaskPaddingIgnored,
        Fault::MaskPadTokenMasked,
        Fault::MaskFp16Overflow,
        Fault::NormLayernorm,
        Fault::NormBias,
        Fault::NormEpsOutside,
        Fault::NormNoUpcast,
        Fault::NormWeightUnmapped,
        Fault::WeightsTransposed,
        Fault::WeightsGateUpSwapped,
        Fault::KvStale,
        Fault::KvWrongSlot,
        Fault::KvUnrotatedKeys,
        Fault::KvGqaTiled,
        Fault::AttnNoScale,
        Fault::AttnSoftmaxLowPrecision,
        Fault::LoraScaleAlpha,
        Fault::LoraScaleMissing,
        Fault::LoraRsloraIgnored,
        Fault::LoraPatternIgnored,
        Fault::LoraNotLoaded,
        Fault::LoraTargetMissing,
        Fault::LoraGateUpSwapped,
        Fault::LoraMergedLowPrecision,
    ];

    /// The stable ID, e.g. `rope.pos_reset`.
    pub fn id(self) -> &'static str {
        match self {
            Fault::RopePosReset => "rope.pos_reset",
            Fault::RopePosFixed => "rope.pos_fixed",
            Fault::RopePosOffByOne => "rope.pos_off_by_one",
            Fault::RopeInterleaved => "rope.interleaved",
            Fault::RopeCosSinSwapped => "rope.cos_sin_swapped",
            Fault::RopeWrongTheta => "rope.wrong_theta",
            Fault::RopeLowPrecisionAngles => "rope.low_precision_angles",
            Fault::MaskNone => "mask.none",
            Fault::MaskInverted => "mask.inverted",
            Fault::MaskPaddingIgnored => "mask.padding_ignored",
            Fault::MaskPadTokenMasked => "mask.pad_token_masked",
            Fault::MaskFp16Overflow => "mask.fp16_overflow",
            Fault::NormLayernorm => "norm.layernorm",
            Fault::NormBias => "norm.bias",
            Fault::NormEpsOutside => "norm.eps_outside",
            Fault::NormNoUpcast => "norm.no_upcast",
            Fault::NormWeightUnmapped => "norm.weight_unmapped",
            Fault::WeightsTransposed => "weights.transposed",
            Fault::WeightsGateUpSwapped => "weights.gate_up_swapped",
            Fault::KvStale => "kv.stale",
            Fault::KvWrongSlot => "kv.wrong_slot",
            Fault::KvUnrotatedKeys => "kv.unrotated_keys",
            Fault::KvGqaTiled => "kv.gqa_tiled",
            Fault::AttnNoScale => "attn.no_scale",
            Fault::AttnSoftmaxLowPrecision => "attn.softmax_low_precision",
            Fault::LoraScaleAlpha => "lora.scale_alpha",
            Fault::LoraScaleMissing => "lora.scale_missing",
            Fault::LoraRsloraIgnored => "lora.rslora_ignored",
            Fault::LoraPatternIgnored => "lora.pattern_ignored",
            Fault::LoraNotLoaded => "lora.not_loaded",
            Fault::LoraTargetMissing => "lora.target_missing",
            Fault::LoraGateUpSwapped => "lora.gate_up_swapped",
            Fault::LoraMergedLowPrecision => "lora.merged_low_precision",
            Fault::TrainLabelsUnshifted => "train.labels_unshifted",
            Fault::TrainIgnoreIndexCounted => "train.ignore_index_counted",
            Fault::TrainLossScaleKept => "train.loss_scale_kept",
            Fault::TrainOverflowApplied => "train.overflow_applied",
            Fault::TrainWeightDecayEverywhere => "train.weight_decay_everywhere",
            Fault::TrainClipPerParameter => "train.clip_per_parameter",
            Fault::TrainAdamNoBiasCorrection => "train.adam_no_bias_correction",
            Fault::TrainMicroBatchesSummed => "train.micro_batches_summed",
        }
    }

    /// One line saying what the fault is.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::RopePosReset => {
                "decode positions restart from 0 instead of continuing from the context length"
            }
            Fault::RopePosFixed => "every decode step uses the same position (row 0 of the table)",
            Fault::RopePosOffByOne => "decode positions are one too far",
            Fault::RopeInterleaved => {
                "pairs (2k, 2k+1) rotated instead of HF's rotate_half pairs (k, k+D/2)"
            }
            Fault::RopeCosSinSwapped => "cos and sin tables swapped",
            Fault::RopeWrongTheta => "base theta or rope scaling ignored",
            Fault::RopeLowPrecisionAngles => "position x inv_freq computed in float16",
            Fault::MaskNone => "no causal mask in prefill",
            Fault::MaskInverted => "the future visible and the past hidden",
            Fault::MaskPaddingIgnored => "causal mask only; padding keys stay visible",
            Fault::MaskPadTokenMasked => "real tokens equal to the pad id masked as padding",
            Fault::MaskFp16Overflow => "an additive fill that overflows to -inf in float16",
            Fault::NormLayernorm => "mean subtracted (LayerNorm) where RMSNorm is required",
            Fault::NormBias => "a LayerNorm beta left in and non-zero",
            Fault::NormEpsOutside => {
                "x / (sqrt(mean(x^2)) + eps) instead of x * rsqrt(mean(x^2) + eps)"
            }
            Fault::NormNoUpcast => "variance computed in float16/bfloat16 instead of float32",
            Fault::NormWeightUnmapped => "a norm weight never loaded (left at ones)",
            Fault::WeightsTransposed => "a square projection weight loaded without its transpose",
            Fault::WeightsGateUpSwapped => "w1/w3 (gate/up) swapped in the key mapping",
            Fault::KvStale => "the decode step's k/v never written to the cache",
            Fault::KvWrongSlot => "the decode write lands one slot off",
            Fault::KvUnrotatedKeys => "keys cached before RoPE",
            Fault::KvGqaTiled => "GQA heads repeated by tiling (h % nKV) instead of h // (nH/nKV)",
            Fault::AttnNoScale => "scores not scaled by 1/sqrt(D)",
            Fault::AttnSoftmaxLowPrecision => "softmax computed in float16/bfloat16",
            Fault::LoraScaleAlpha => "LoRA delta scaled by lora_alpha (r ignored)",
            Fault::LoraScaleMissing => "LoRA delta added unscaled",
            Fault::LoraRsloraIgnored => "alpha / r used where use_rslora asks alpha / sqrt(r)",
            Fault::LoraPatternIgnored => {
                "LoRA scaling from the default r and alpha (rank_pattern / alpha_pattern ignored)"
            }
            Fault::LoraNotLoaded => "adapter weights never loaded (B left at zero)",
            Fault::LoraTargetMissing => "a target module left without its adapter",
            Fault::LoraGateUpSwapped => {
                "gate_proj's adapter applied to up_proj and up_proj's to gate_proj"
            }
            Fault::LoraMergedLowPrecision => {
                "W + s * B A merged in bfloat16/float16 instead of float32"
            }
            Fault::TrainLabelsUnshifted => {
                "the loss pairs logits t with label t (labels not shifted)"
            }
            Fault::TrainIgnoreIndexCounted => "positions labelled -100 counted in the loss mean",
            Fault::TrainLossScaleKept => "gradients not divided by the loss scale",
            Fault::TrainOverflowApplied => {
                "a step whose float16 gradients overflowed is applied instead of skipped"
            }
            Fault::TrainWeightDecayEverywhere => "weight decay applied to the no_decay group",
            Fault::TrainClipPerParameter => {
                "each parameter clipped by its own norm instead of the global norm"
            }
            Fault::TrainAdamNoBiasCorrection => "AdamW without bias correction",
            Fault::TrainMicroBatchesSummed => "micro-batch gradients summed, not averaged",
        }
    }

    /// Parses a stable ID.
    pub fn parse(id: &str) -> Option<Fault> {
        Fault::ALL.iter().chain(&Fault::TRAIN).copied().find(|f| f.id() == id)
    }

    /// Parses an ID spelled with `_` for its `.`, as candidate directory names spell it
    /// (`rope_pos_reset` for `rope.pos_reset`).
    pub fn parse_underscored(s: &str) -> Option<Fault> {
        let (family, rest) = s.split_once('_')?;
        Fault::parse(&format!("{family}.{rest}"))
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// A part of the model that a fault family has several of (CONTRACT §4 `component`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    InputLayernorm,
    PostAttentionLayernorm,
    ModelNorm,
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Component {
    pub const ALL: [Component; 10] = [
        Component::InputLayernorm,
        Component::PostAttentionLayernorm,
        Component::ModelNorm,
        Component::QProj,
        Component::KProj,
        Component::VProj,
        Component::OProj,
        Component::GateProj,
        Component::UpProj,
        Component::DownProj,
    ];

    /// The contract's name: `input_layernorm`, `model.norm`, `o_proj`, ...
    pub fn name(self) -> &'static str {
        match self {
            Component::InputLayernorm => "input_layernorm",
            Component::PostAttentionLayernorm => "post_attention_layernorm",
            Component::ModelNorm => "model.norm",
            Component::QProj => "q_proj",
            Component::KProj => "k_proj",
            Component::VProj => "v_proj",
            Component::OProj => "o_proj",
            Component::GateProj => "gate_proj",
            Component::UpProj => "up_proj",
            Component::DownProj => "down_proj",
        }
    }

    fn is_projection(self) -> bool {
        !self.is_norm()
    }

    fn is_norm(self) -> bool {
        matches!(
            self,
            Component::InputLayernorm | Component::PostAttentionLayernorm | Component::ModelNorm
        )
    }
}

/// The scope dimensions and parameters a fault family takes.
#[derive(Debug, Clone, Copy)]
struct Dims {
    layers: bool,
    steps: bool,
    /// Which components, if the family has several.
    component: Option<ComponentFilter>,
    /// The parameters it takes (`theta`, `scaling`, `table`, `offset`).
    params: &'static [&'static str],
}

/// Which components a fault family has.
type ComponentFilter = fn(Component) -> bool;

impl Fault {
    /// Where this fault can be narrowed to. Faults that act before the first layer (the
    /// positions, the rotary tables, the mask) take steps only; key-mapping faults act
    /// when the checkpoint is loaded and take layers and components; precision choices
    /// of the whole run take no scope.
    fn dims(self) -> Dims {
        use Fault::*;
        let (layers, steps, component): (bool, bool, Option<ComponentFilter>) = match self {
            RopePosReset | RopePosFixed | RopePosOffByOne | RopeCosSinSwapped => {
                (false, true, None)
            }
            MaskNone | MaskInverted | MaskPaddingIgnored | MaskPadTokenMasked
            | MaskFp16Overflow => (false, true, None),
            RopeInterleaved | KvStale | KvWrongSlot | KvUnrotatedKeys | KvGqaTiled
            | AttnNoScale => (true, true, None),
            NormLayernorm | NormBias | NormEpsOutside => (true, true, Some(Component::is_norm)),
            NormWeightUnmapped => (true, false, Some(Component::is_norm)),
            WeightsTransposed => (true, false, Some(|c: Component| !c.is_norm())),
            WeightsGateUpSwapped => (true, false, None),
            LoraScaleAlpha
            | LoraScaleMissing
            | LoraRsloraIgnored
            | LoraPatternIgnored
            | LoraTargetMissing
            | LoraMergedLowPrecision => (true, false, Some(Component::is_projection)),
            // The whole adapter is never loaded; one module without it is target_missing.
            LoraNotLoaded => (false, false, None),
            LoraGateUpSwapped => (true, false, None),
            RopeWrongTheta | RopeLowPrecisionAngles | NormNoUpcast | AttnSoftmaxLowPrecision => {
                (false, false, None)
            }
            // A training step's loss, scaler and optimizer act on the whole step.
            TrainLabelsUnshifted
            | TrainIgnoreIndexCounted
            | TrainLossScaleKept
            | TrainOverflowApplied
            | TrainWeightDecayEverywhere
            | TrainClipPerParameter
            | TrainAdamNoBiasCorrection
            | TrainMicroBatchesSummed => (false, false, None),
        };
        let params: &[&str] = match self {
            RopeWrongTheta => &["theta", "scaling"],
            RopeInterleaved => &["table"],
            RopePosOffByOne | KvWrongSlot => &["offset"],
            _ => &[],
        };
        Dims { layers, steps, component, params }
    }

    /// Whether the family has several components to be narrowed to, and which.
    pub fn components(self) -> Vec<Component> {
        match self.dims().component {
            Some(allowed) => Component::ALL.iter().copied().filter(|c| allowed(*c)).collect(),
            None => Vec::new(),
        }
    }

    /// Whether the family can be narrowed to decoder layers.
    pub fn takes_layers(self) -> bool {
        self.dims().layers
    }

    /// Whether the family can be narrowed to steps.
    pub fn takes_steps(self) -> bool {
        self.dims().steps
    }

    /// The parameters the family takes, by name.
    pub fn param_names(self) -> &'static [&'static str] {
        self.dims().params
    }
}

/// What `rope.wrong_theta` does with the configured rope scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// The scaling (yarn, llama3, linear ...) is ignored: plain RoPE at `theta`.
    Dropped,
    /// The configured scaling is kept, applied to `theta`.
    Kept,
}

impl Scaling {
    /// The `--fault` spelling: `dropped`, `kept`.
    pub fn name(self) -> &'static str {
        match self {
            Scaling::Dropped => "dropped",
            Scaling::Kept => "kept",
        }
    }
}

/// Which cos/sin entries the interleaved (GPT-J) rotation of `rope.interleaved` reads
/// for pair k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryTable {
    /// Entry k of the half table: pair k turns with frequency k.
    Half,
    /// HF's duplicated table sliced `[0::2]`: entry 2k, so pair k turns with frequency
    /// 2k mod D/2.
    Sliced,
}

impl RotaryTable {
    /// The `--fault` spelling: `half`, `sliced`.
    pub fn name(self) -> &'static str {
        match self {
            RotaryTable::Half => "half",
            RotaryTable::Sliced => "sliced",
        }
    }
}

/// The parameters of a planted fault (CONTRACT §4 `params`); `None` is the family's
/// default form (CONTRACT §3).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Params {
    /// `rope.wrong_theta`: the base used (default 10000).
    pub theta: Option<f64>,
    /// `rope.wrong_theta`: what happens to the configured scaling (default dropped).
    pub scaling: Option<Scaling>,
    /// `rope.interleaved`: which table entries the rotation reads (default half).
    pub table: Option<RotaryTable>,
    /// `rope.pos_off_by_one`: how far decode positions are off; `kv.wrong_slot`: how
    /// many slots past the next free one the decode write lands (default 1 for both).
    pub offset: Option<i64>,
}

impl Params {
    pub fn is_default(&self) -> bool {
        *self == Params::default()
    }

    /// `rope.wrong_theta`'s theta, 10000 unless given.
    pub fn theta_or_default(&self) -> f64 {
        self.theta.unwrap_or(10000.0)
    }

    /// The offset, 1 unless given.
    pub fn offset_or_default(&self) -> i64 {
        self.offset.unwrap_or(1)
    }

    /// The parameters as `(name, value)` pairs, in the `--fault` spelling.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(t) = self.theta {
            out.push(("theta", format!("{t}")));
        }
        if let Some(s) = self.scaling {
            out.push(("scaling", s.name().to_string()));
        }
        if let Some(t) = self.table {
            out.push(("table", t.name().to_string()));
        }
        if let Some(o) = self.offset {
            out.push(("offset", format!("{o}")));
        }
        out
    }

    /// The parameters given, in the order `theta`, `scaling`, `table`, `offset`, as JSON
    /// values (CONTRACT §4 `params`): numbers for `theta` and `offset`, names otherwise.
    pub fn json(&self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        let mut out = Vec::new();
        if let Some(t) = self.theta {
            out.push(("theta", json!(t)));
        }
        if let Some(s) = self.scaling {
            out.push(("scaling", json!(s.name())));
        }
        if let Some(t) = self.table {
            out.push(("table", json!(t.name())));
        }
        if let Some(o) = self.offset {
            out.push(("offset", json!(o)));
        }
        out
    }
}

/// Where a planted fault acts; every dimension left `None` means everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    /// Decoder layers, by index.
    pub layers: Option<Vec<usize>>,
    /// Step names or patterns (`prefill`, `decode.1`, `decode.*`).
    pub steps: Option<Vec<String>>,
    pub component: Option<Component>,
}

impl Scope {
    pub fn is_everywhere(&self) -> bool {
        *self == Scope::default()
    }
}

/// A planted fault, where it acts and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopedFault {
    pub fault: Fault,
    pub scope: Scope,
    pub params: Params,
}

impl From<Fault> for ScopedFault {
    fn from(fault: Fault) -> ScopedFault {
        ScopedFault { fault, scope: Scope::default(), params: Params::default() }
    }
}

impl ScopedFault {
    /// Parses `ID` or `ID@DIM=VALUE[@DIM=VALUE...]` (CONTRACT §4), with the scopes
    /// `layers=2,3`, `layers=1-3`, `steps=prefill,decode.*` and `component=o_proj`, and
    /// the parameters `theta=500000`, `scaling=dropped|kept` (`rope.wrong_theta`),
    /// `table=half|sliced` (`rope.interleaved`) and `offset=N` (`rope.pos_off_by_one`,
    /// `kv.wrong_slot`). The error says what is wrong, for the caller to attach to its
    /// flag.
    pub fn parse(spec: &str) -> Result<ScopedFault, String> {
        let mut parts = spec.split('@');
        let id = parts.next().unwrap_or_default();
        let fault = Fault::parse(id).ok_or_else(|| {
            format!(
                "unknown fault {id:?}; known: {}",
                Fault::ALL.iter().map(|f| f.id()).collect::<Vec<_>>().join(", ")
            )
        })?;
        let dims = fault.dims();
        let mut scope = Scope::default();
        let mut params = Params::default();
        for part in parts {
            let (dim, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{spec:?}: a scope is DIM=VALUE, got {part:?}"))?;
            let refuse = |what: &str| format!("{id} cannot be narrowed to {what}");
            match dim {
                "layers" if !dims.layers => return Err(refuse("layers")),
                "layers" => scope.layers = Some(parse_layers(value)?),
                "steps" if !dims.steps => return Err(refuse("steps")),
                "steps" => {
                    let steps: Vec<String> = value.split(',').map(str::to_string).collect();
                    if let Some(bad) = steps.iter().find(|p| !step_pattern_ok(p)) {
                        return Err(format!("steps: {bad:?} is not prefill, decode.N or decode.*"));
                    }
                    scope.steps = Some(steps);
                }
                "component" => {
                    let Some(allowed) = dims.component else {
                        return Err(refuse("a component"));
                    };
                    let names: Vec<&str> =
                        Component::ALL.iter().filter(|c| allowed(**c)).map(|c| c.name()).collect();
                    let c = Component::ALL
                        .iter()
                        .copied()
                        .find(|c| allowed(*c) && c.name() == value)
                        .ok_or_else(|| {
                            format!("{id}: component {value:?}; it takes {}", names.join(", "))
                        })?;
                    scope.component = Some(c);
                }
                "theta" | "scaling" | "table" | "offset" if !dims.params.contains(&dim) => {
                    return Err(if dims.params.is_empty() {
                        format!("{id} takes no parameters")
                    } else {
                        format!("{id} takes {}, not {dim}", dims.params.join(", "))
                    })
                }
                "theta" => {
                    let t: f64 = value
                        .parse()
                        .ok()
                        .filter(|t: &f64| t.is_finite() && *t > 1.0)
                        .ok_or_else(|| format!("theta: {value:?} is not a number above 1"))?;
                    params.theta = Some(t);
                }
                "scaling" => {
                    params.scaling = Some(match value {
                        "dropped" => Scaling::Dropped,
                        "kept" => Scaling::Kept,
                        _ => return Err(format!("scaling: {value:?} is not dropped or kept")),
                    })
                }
                "table" => {
                    params.table = Some(match value {
                        "half" => RotaryTable::Half,
                        "sliced" => RotaryTable::Sliced,
                        _ => return Err(format!("table: {value:?} is not half or sliced")),
                    })
                }
                "offset" => {
                    let o: i64 = value
                        .parse()
                        .ok()
                        .filter(|o: &i64| *o != 0 && o.abs() <= 1 << 20)
                        .ok_or_else(|| format!("offset: {value:?} is not a non-zero whole number"))?;
                    if fault == Fault::KvWrongSlot && o < 0 {
                        return Err(format!("offset: {value:?}; a cache write lands past the next free slot (offset ≥ 1)"));
                    }
                    params.offset = Some(o);
                }
                other => {
                    return Err(format!(
                        "{spec:?}: unknown scope or parameter {other:?}; scopes are layers, steps, component; {id} takes {}",
                        if dims.params.is_empty() { "no parameters".to_string() } else { dims.params.join(", ") }
                    ))
                }
            }
        }
        Ok(ScopedFault { fault, scope, params })
    }

    /// Whether the fault acts at `layer` (`None`: outside the decoder layers), `step`
    /// (`None`: when weights are loaded) and `component` (`None`: no particular one).
    ///
    /// A fault narrowed to layers never acts outside them, one narrowed to steps never
    /// at load time, and one narrowed to a component only on that component.
    pub fn acts_at(
        &self,
        layer: Option<usize>,
        step: Option<Step>,
        component: Option<Component>,
    ) -> bool {
        let s = &self.scope;
        let layer_ok = match (&s.layers, layer) {
            (None, _) => true,
            (Some(ls), Some(l)) => ls.contains(&l),
            (Some(_), None) => false,
        };
        let step_ok = match (&s.steps, step) {
            (None, _) => true,
            (Some(ps), Some(st)) => ps.iter().any(|p| step_matches(p, st)),
            (Some(_), None) => false,
        };
        let component_ok = match (s.component, component) {
            (None, _) => true,
            (Some(c), Some(at)) => c == at,
            (Some(_), None) => false,
        };
        layer_ok && step_ok && component_ok
    }
}

impl fmt::Display for ScopedFault {
    /// The `--fault` spelling: `weights.gate_up_swapped@layers=2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.fault.id())?;
        if let Some(ls) = &self.scope.layers {
            let ls: Vec<String> = ls.iter().map(usize::to_string).collect();
            write!(f, "@layers={}", ls.join(","))?;
        }
        if let Some(ps) = &self.scope.steps {
            write!(f, "@steps={}", ps.join(","))?;
        }
        if let Some(c) = self.scope.component {
            write!(f, "@component={}", c.name())?;
        }
        for (name, value) in self.params.pairs() {
            write!(f, "@{name}={value}")?;
        }
        Ok(())
    }
}

/// The most layer indices one `layers=` scope may list (repeats counted).
pub const MAX_LAYER_INDICES: usize = 1 << 16;

/// `value` cut to its first 40 characters, for a one-line message.
fn shorten(value: &str) -> String {
    match value.char_indices().nth(40) {
        Some((at, _)) => format!("{:?}...", &value[..at]),
        None => format!("{value:?}"),
    }
}

/// `2`, `2,3`, `1-3`, `0,2-4`: sorted, without repeats.
fn parse_layers(value: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("layers: {} is not a list of layer indices (2,3 or 1-3)", shorten(value));
    let mut out = Vec::new();
    // Counted before anything is expanded: many wide ranges in one value (`0-65536,`
    // repeated over 128 kB) would otherwise ask for gigabytes.
    let mut count = 0usize;
    for item in value.split(',') {
        let (a, b): (usize, usize) = match item.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let a = item.parse().map_err(|_| bad())?;
                (a, a)
            }
        };
        if a > b {
            return Err(bad());
        }
        count = count.saturating_add(b - a).saturating_add(1);
        if count > MAX_LAYER_INDICES {
            return Err(format!(
                "layers: {}: more than {MAX_LAYER_INDICES} layer indices",
                shorten(value)
            ));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn step_pattern_ok(p: &str) -> bool {
    p == "prefill" || p == "decode.*" || Step::parse(p).is_some()
}

/// Whether the step pattern `pattern` (`prefill`, `decode.3`, `decode.*`) names `step`.
pub fn step_matches(pattern: &str, step: Step) -> bool {
    match pattern {
        "decode.*" => matches!(step, Step::Decode(_)),
        p => Step::parse(p) == Some(step),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_parse_back() {
        let mut ids: Vec<_> = Fault::ALL.iter().map(|f| f.id()).collect();
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.id()), Some(f));
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Fault::ALL.len());
        assert_eq!(Fault::parse("rope.nope"), None);
        assert_eq!(
            Fault::parse_underscored("weights_gate_up_swapped"),
            Some(Fault::WeightsGateUpSwapped)
        );
        assert_eq!(Fault::parse_underscored("rope"), None);
    }

    #[test]
    fn scoped_faults_parse_print_back_and_act_only_in_their_scope() {
        let f = ScopedFault::parse("weights.gate_up_swapped@layers=2,0-1").unwrap();
        assert_eq!(f.scope.layers, Some(vec![0, 1, 2]));
        assert_eq!(f.to_string(), "weights.gate_up_swapped@layers=0,1,2");
        assert!(f.acts_at(Some(1), None, None));
        assert!(!f.acts_at(Some(3), None, None));
        assert!(!f.acts_at(None, None, None));

        let m = ScopedFault::parse("mask.padding_ignored@steps=decode.*").unwrap();
        assert!(m.acts_at(None, Some(Step::Decode(3)), None));
        assert!(!m.acts_at(None, Some(Step::Prefill), None));

        let n = ScopedFault::parse("norm.layernorm@component=model.norm").unwrap();
        assert!(n.acts_at(None, Some(Step::Prefill), Some(Component::ModelNorm)));
        assert!(!n.acts_at(Some(0), Some(Step::Prefill), Some(Component::InputLayernorm)));

        let plain = ScopedFault::from(Fault::KvStale);
        assert!(plain.acts_at(Some(7), Some(Step::Decode(0)), None));
        assert_eq!(plain.to_string(), "kv.stale");
    }

    #[test]
    fn parameters_parse_and_print_back() {
        let f = ScopedFault::parse("rope.wrong_theta@theta=500000@scaling=kept").unwrap();
        assert_eq!(f.params.theta, Some(500000.0));
        assert_eq!(f.params.scaling, Some(Scaling::Kept));
        assert_eq!(f.to_string(), "rope.wrong_theta@theta=500000@scaling=kept");
        let r = ScopedFault::parse("rope.interleaved@layers=1@table=sliced").unwrap();
        assert_eq!(r.params.table, Some(RotaryTable::Sliced));
        assert_eq!(r.to_string(), "rope.interleaved@layers=1@table=sliced");
        let o = ScopedFault::parse("rope.pos_off_by_one@offset=-2").unwrap();
        assert_eq!(o.params.offset_or_default(), -2);
        assert_eq!(ScopedFault::from(Fault::KvWrongSlot).params.offset_or_default(), 1);
        assert_eq!(ScopedFault::from(Fault::RopeWrongTheta).params.theta_or_default(), 10000.0);
    }

    #[test]
    fn a_scope_a_fault_cannot_take_is_refused_with_what_it_takes() {
        let e = ScopedFault::parse("rope.pos_reset@layers=1").unwrap_err();
        assert!(e.contains("cannot be narrowed to layers"), "{e}");
        let e = ScopedFault::parse("weights.transposed@component=input_layernorm").unwrap_err();
        assert!(e.contains("q_proj") && e.contains("o_proj"), "{e}");
        let e = ScopedFault::parse("kv.stale@steps=decode.x").unwrap_err();
        assert!(e.contains("decode.x"), "{e}");
        let e = ScopedFault::parse("kv.stale@layers=3-1").unwrap_err();
        assert!(e.contains("3-1"), "{e}");
        // Counted before expanding: two ranges of 32769 indices are one too many.
        assert!(ScopedFault::parse("kv.stale@layers=0-65535").is_ok());
        let e = ScopedFault::parse("kv.stale@layers=0-32768,1-32768").unwrap_err();
        assert!(e.contains("more than 65536 layer indices"), "{e}");
        let long = format!("kv.stale@layers={}", "0-65535,".repeat(1000));
        let e = ScopedFault::parse(&long).unwrap_err();
        assert!(e.len() < 200, "the message quotes the whole value: {e}");
        let e = ScopedFault::parse("kv.stale@where=1").unwrap_err();
        assert!(e.contains("unknown scope"), "{e}");
        let e = ScopedFault::parse("kv.stale@theta=5").unwrap_err();
        assert!(e.contains("takes no parameters"), "{e}");
        let e = ScopedFault::parse("rope.wrong_theta@offset=2").unwrap_err();
        assert!(e.contains("theta, scaling"), "{e}");
        let e = ScopedFault::parse("kv.wrong_slot@offset=-1").unwrap_err();
        assert!(e.contains("offset"), "{e}");
        let e = ScopedFault::parse("rope.pos_off_by_one@offset=0").unwrap_err();
        assert!(e.contains("non-zero"), "{e}");
        assert!(ScopedFault::parse("no.such").unwrap_err().contains("unknown fault"));
    }
}
