//! The known porting faults of CONTRACT §3, with their stable IDs, and where a planted
//! fault acts (CONTRACT §4: `--fault ID@layers=2`, `@steps=decode.*`,
//! `@component=o_proj`).

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
}

impl Fault {
    /// Every fault, in the contract's order.
    pub const ALL: [Fault; 25] = [
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
        }
    }

    /// Parses a stable ID.
    pub fn parse(id: &str) -> Option<Fault> {
        Fault::ALL.iter().copied().find(|f| f.id() == id)
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

    fn is_norm(self) -> bool {
        matches!(
            self,
            Component::InputLayernorm | Component::PostAttentionLayernorm | Component::ModelNorm
        )
    }
}

/// The scope dimensions a fault family takes.
#[derive(Debug, Clone, Copy)]
struct Dims {
    layers: bool,
    steps: bool,
    /// Which components, if the family has several.
    component: Option<ComponentFilter>,
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
            RopeWrongTheta | RopeLowPrecisionAngles | NormNoUpcast | AttnSoftmaxLowPrecision => {
                (false, false, None)
            }
        };
        Dims { layers, steps, component }
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

/// A planted fault and where it acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedFault {
    pub fault: Fault,
    pub scope: Scope,
}

impl From<Fault> for ScopedFault {
    fn from(fault: Fault) -> ScopedFault {
        ScopedFault { fault, scope: Scope::default() }
    }
}

impl ScopedFault {
    /// Parses `ID` or `ID@DIM=VALUE[@DIM=VALUE...]` (CONTRACT §4), with `layers=2,3`,
    /// `layers=1-3`, `steps=prefill,decode.*` and `component=o_proj`. The error says what
    /// is wrong, for the caller to attach to its flag.
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
                other => {
                    return Err(format!(
                        "{spec:?}: unknown scope {other:?}; scopes are layers, steps, component"
                    ))
                }
            }
        }
        Ok(ScopedFault { fault, scope })
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
        Ok(())
    }
}

/// `2`, `2,3`, `1-3`, `0,2-4`: sorted, without repeats.
fn parse_layers(value: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("layers: {value:?} is not a list of layer indices (2,3 or 1-3)");
    let mut out = Vec::new();
    for item in value.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 1 << 16 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(item.parse().map_err(|_| bad())?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn step_pattern_ok(p: &str) -> bool {
    p == "prefill" || p == "decode.*" || Step::parse(p).is_some()
}

fn step_matches(pattern: &str, step: Step) -> bool {
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
    fn a_scope_a_fault_cannot_take_is_refused_with_what_it_takes() {
        let e = ScopedFault::parse("rope.pos_reset@layers=1").unwrap_err();
        assert!(e.contains("cannot be narrowed to layers"), "{e}");
        let e = ScopedFault::parse("weights.transposed@component=input_layernorm").unwrap_err();
        assert!(e.contains("q_proj") && e.contains("o_proj"), "{e}");
        let e = ScopedFault::parse("kv.stale@steps=decode.x").unwrap_err();
        assert!(e.contains("decode.x"), "{e}");
        let e = ScopedFault::parse("kv.stale@layers=3-1").unwrap_err();
        assert!(e.contains("3-1"), "{e}");
        let e = ScopedFault::parse("kv.stale@where=1").unwrap_err();
        assert!(e.contains("unknown scope"), "{e}");
        assert!(ScopedFault::parse("no.such").unwrap_err().contains("unknown fault"));
    }
}
