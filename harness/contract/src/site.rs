//! Steps and sites (CONTRACT §1) and the order in which the model computes them.
//!
//! "First divergence" follows compute order: steps in `steps` order, then sites in the
//! order of the contract's table, layer by layer. Site names a producer adds beyond the
//! contract sort after the known ones of the same step, by name.

use std::cmp::Ordering;
use std::fmt;

/// One forward call: the prefill, or decode step `j`; or one training step (CONTRACT
/// §6: forward over the prompt, loss, backward, optimizer update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Prefill,
    Decode(usize),
    Train,
}

impl Step {
    /// Parses `"prefill"`, `"decode.N"` or `"train"`.
    pub fn parse(s: &str) -> Option<Step> {
        if s == "prefill" {
            return Some(Step::Prefill);
        }
        if s == "train" {
            return Some(Step::Train);
        }
        let n = s.strip_prefix("decode.")?;
        if n.is_empty()
            || !n.bytes().all(|b| b.is_ascii_digit())
            || (n.len() > 1 && n.starts_with('0'))
        {
            return None;
        }
        n.parse().ok().map(Step::Decode)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Prefill => f.write_str("prefill"),
            Step::Decode(j) => write!(f, "decode.{j}"),
            Step::Train => f.write_str("train"),
        }
    }
}

/// The parts of a decoder layer, in compute order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerPart {
    InputLayernorm,
    /// Optional (CONTRACT §5): a LoRA delta `s · B(A(x))` alone, before its projection.
    QProjLora,
    QProj,
    KProjLora,
    KProj,
    VProjLora,
    VProj,
    QRope,
    KRope,
    KCache,
    VCache,
    Probs,
    Context,
    OProjLora,
    OProj,
    PostAttentionLayernorm,
    /// Optional (CONTRACT §5): the MLP's projections and their LoRA deltas.
    GateProjLora,
    GateProj,
    UpProjLora,
    UpProj,
    DownProjLora,
    DownProj,
    Mlp,
    Output,
}

impl LayerPart {
    pub const ALL: [LayerPart; 14] = [
        LayerPart::InputLayernorm,
        LayerPart::QProj,
        LayerPart::KProj,
        LayerPart::VProj,
        LayerPart::QRope,
        LayerPart::KRope,
        LayerPart::KCache,
        LayerPart::VCache,
        LayerPart::Probs,
        LayerPart::Context,
        LayerPart::OProj,
        LayerPart::PostAttentionLayernorm,
        LayerPart::Mlp,
        LayerPart::Output,
    ];

    /// The optional parts a producer may add (CONTRACT §5): compared where a golden has
    /// them, never `missing` where it does not.
    pub const OPTIONAL: [LayerPart; 10] = [
        LayerPart::QProjLora,
        LayerPart::KProjLora,
        LayerPart::VProjLora,
        LayerPart::OProjLora,
        LayerPart::GateProjLora,
        LayerPart::GateProj,
        LayerPart::UpProjLora,
        LayerPart::UpProj,
        LayerPart::DownProjLora,
        LayerPart::DownProj,
    ];

    /// The LoRA delta site of a projection part (`q_proj` → `q_proj.lora`), `None` for
    /// a part that is not an adaptable projection.
    pub fn lora(self) -> Option<LayerPart> {
        Some(match self {
            LayerPart::QProj => LayerPart::QProjLora,
            LayerPart::KProj => LayerPart::KProjLora,
            LayerPart::VProj => LayerPart::VProjLora,
            LayerPart::OProj => LayerPart::OProjLora,
            LayerPart::GateProj => LayerPart::GateProjLora,
            LayerPart::UpProj => LayerPart::UpProjLora,
            LayerPart::DownProj => LayerPart::DownProjLora,
            _ => return None,
        })
    }

    /// The projection a LoRA delta part belongs to (`q_proj.lora` → `q_proj`).
    pub fn lora_of(self) -> Option<LayerPart> {
        [
            LayerPart::QProj,
            LayerPart::KProj,
            LayerPart::VProj,
            LayerPart::OProj,
            LayerPart::GateProj,
            LayerPart::UpProj,
            LayerPart::DownProj,
        ]
        .into_iter()
        .find(|p| p.lora() == Some(self))
    }

    /// The suffix after `model.layers.{i}` (empty for the layer output).
    pub fn suffix(self) -> &'static str {
        match self {
            LayerPart::QProjLora => ".self_attn.q_proj.lora",
            LayerPart::KProjLora => ".self_attn.k_proj.lora",
            LayerPart::VProjLora => ".self_attn.v_proj.lora",
            LayerPart::OProjLora => ".self_attn.o_proj.lora",
            LayerPart::GateProjLora => ".mlp.gate_proj.lora",
            LayerPart::GateProj => ".mlp.gate_proj",
            LayerPart::UpProjLora => ".mlp.up_proj.lora",
            LayerPart::UpProj => ".mlp.up_proj",
            LayerPart::DownProjLora => ".mlp.down_proj.lora",
            LayerPart::DownProj => ".mlp.down_proj",
            LayerPart::InputLayernorm => ".input_layernorm",
            LayerPart::QProj => ".self_attn.q_proj",
            LayerPart::KProj => ".self_attn.k_proj",
            LayerPart::VProj => ".self_attn.v_proj",
            LayerPart::QRope => ".self_attn.q_rope",
            LayerPart::KRope => ".self_attn.k_rope",
            LayerPart::KCache => ".self_attn.k_cache",
            LayerPart::VCache => ".self_attn.v_cache",
            LayerPart::Probs => ".self_attn.probs",
            LayerPart::Context => ".self_attn.context",
            LayerPart::OProj => ".self_attn.o_proj",
            LayerPart::PostAttentionLayernorm => ".post_attention_layernorm",
            LayerPart::Mlp => ".mlp",
            LayerPart::Output => "",
        }
    }
}

/// A named activation of the model, or (CONTRACT §6) a value of a training step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Site {
    PositionIds,
    EmbedTokens,
    RotaryCos,
    RotarySin,
    Mask,
    Layer(usize, LayerPart),
    Norm,
    LmHead,
    /// The training loss (a scalar).
    Loss,
    /// `grad.<site>`: d loss / d (a forward site), the site's shape.
    Grad(Box<Site>),
    /// The global gradient norm after unscaling, before clipping (a scalar).
    GradNorm,
    /// `param_grad.<name>`: d loss / d (a trainable parameter), after unscaling and
    /// clipping; HF or PEFT parameter names.
    ParamGrad(String),
    /// `update.<name>`: the parameter after the optimizer step.
    Update(String),
    /// A site outside the contract's table, kept by name.
    Other(String),
}

/// Where a parameter sits in HF's `named_parameters()` order (PEFT's `base_model.model.`
/// prefix and a LoRA `lora_A`/`lora_B` after their projection's weight): embeddings,
/// then layer by layer (q, k, v, o, gate, up, down, input_layernorm,
/// post_attention_layernorm), the final norm, `lm_head`, and names outside these last.
pub fn parameter_order(name: &str) -> (usize, usize, usize, usize) {
    let n = name.strip_prefix("base_model.model.").unwrap_or(name);
    if n.starts_with("model.embed_tokens.") {
        return (0, 0, 0, 0);
    }
    if n.starts_with("model.norm.") {
        return (2, 0, 0, 0);
    }
    if n.starts_with("lm_head.") {
        return (3, 0, 0, 0);
    }
    if let Some(rest) = n.strip_prefix("model.layers.") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(i) = rest[..digits].parse::<usize>() {
            const PARTS: [&str; 9] = [
                ".self_attn.q_proj.",
                ".self_attn.k_proj.",
                ".self_attn.v_proj.",
                ".self_attn.o_proj.",
                ".mlp.gate_proj.",
                ".mlp.up_proj.",
                ".mlp.down_proj.",
                ".input_layernorm.",
                ".post_attention_layernorm.",
            ];
            let tail = &rest[digits..];
            if let Some(k) = PARTS.iter().position(|p| tail.starts_with(p)) {
                let leaf = &tail[PARTS[k].len()..];
                let sub = if leaf.starts_with("lora_A") {
                    2
                } else if leaf.starts_with("lora_B") {
                    3
                } else if leaf.starts_with("bias") {
                    1
                } else {
                    0
                };
                return (1, i, k, sub);
            }
            return (1, i, PARTS.len(), 0);
        }
    }
    (4, 0, 0, 0)
}

/// The sizes a site's contract shape is made of (CONTRACT §2): batch `B`, the prefill
/// length `P`, attention and key/value heads, head dim `D`, hidden `H` and vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeDims {
    pub batch: usize,
    pub prefill: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// The MLP's width `I` (the optional `mlp.gate_proj` / `up_proj` sites).
    pub intermediate: usize,
}

impl Site {
    /// The contract's shape of this site at `step` (CONTRACT §2): `T` tokens fed (the
    /// prefill length, or 1 in a decode step) and `S` keys cached after the step. A site
    /// outside the table is taken as a hidden state `[B, T, H]`.
    pub fn shape(&self, step: Step, d: &ShapeDims) -> Vec<usize> {
        let (b, t, s) = match step {
            Step::Prefill | Step::Train => (d.batch, d.prefill, d.prefill),
            Step::Decode(j) => (d.batch, 1, d.prefill + j + 1),
        };
        let (nh, nkv, hd) = (d.heads, d.kv_heads, d.head_dim);
        match self {
            Site::PositionIds => vec![b, t],
            Site::RotaryCos | Site::RotarySin => vec![b, t, hd],
            Site::Mask => vec![b, 1, t, s],
            Site::Layer(_, part) => match part {
                LayerPart::QProj | LayerPart::QProjLora | LayerPart::Context => {
                    vec![b, t, nh * hd]
                }
                LayerPart::KProj
                | LayerPart::VProj
                | LayerPart::KProjLora
                | LayerPart::VProjLora => {
                    vec![b, t, nkv * hd]
                }
                LayerPart::GateProj
                | LayerPart::UpProj
                | LayerPart::GateProjLora
                | LayerPart::UpProjLora => vec![b, t, d.intermediate],
                LayerPart::QRope => vec![b, nh, t, hd],
                LayerPart::KRope => vec![b, nkv, t, hd],
                LayerPart::KCache | LayerPart::VCache => vec![b, nkv, s, hd],
                LayerPart::Probs => vec![b, nh, t, s],
                _ => vec![b, t, d.hidden],
            },
            Site::LmHead => vec![b, t, d.vocab],
            Site::Loss | Site::GradNorm => vec![],
            Site::Grad(inner) => inner.shape(step, d),
            Site::ParamGrad(name) | Site::Update(name) => {
                parameter_shape(name, d).unwrap_or_default()
            }
            _ => vec![b, t, d.hidden],
        }
    }
}

/// The HF layout of a base parameter from the model's sizes (`q_proj.weight` is
/// `[nH·D, H]`); `None` for a name outside HF's Llama (a LoRA factor, whose rank the
/// sizes do not give).
pub fn parameter_shape(name: &str, d: &ShapeDims) -> Option<Vec<usize>> {
    let n = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (h, q, kv, i) = (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.intermediate);
    if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
        return Some(vec![d.vocab, h]);
    }
    if n == "model.norm.weight" {
        return Some(vec![h]);
    }
    let rest = n.strip_prefix("model.layers.")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse::<usize>().ok()?;
    Some(match &rest[digits..] {
        ".self_attn.q_proj.weight" => vec![q, h],
        ".self_attn.k_proj.weight" | ".self_attn.v_proj.weight" => vec![kv, h],
        ".self_attn.o_proj.weight" => vec![h, q],
        ".mlp.gate_proj.weight" | ".mlp.up_proj.weight" => vec![i, h],
        ".mlp.down_proj.weight" => vec![h, i],
        ".input_layernorm.weight" | ".post_attention_layernorm.weight" => vec![h],
        _ => return None,
    })
}

impl Site {
    /// Parses a contract site name; names outside the table become `Site::Other`.
    pub fn parse(name: &str) -> Site {
        match name {
            "inputs.position_ids" => return Site::PositionIds,
            "model.embed_tokens" => return Site::EmbedTokens,
            "model.rotary_emb.cos" => return Site::RotaryCos,
            "model.rotary_emb.sin" => return Site::RotarySin,
            "model.mask" => return Site::Mask,
            "model.norm" => return Site::Norm,
            "lm_head" => return Site::LmHead,
            "loss" => return Site::Loss,
            "grad_norm" => return Site::GradNorm,
            _ => {}
        }
        if let Some(inner) = name.strip_prefix("grad.") {
            return Site::Grad(Box::new(Site::parse(inner)));
        }
        if let Some(p) = name.strip_prefix("param_grad.") {
            return Site::ParamGrad(p.to_string());
        }
        if let Some(p) = name.strip_prefix("update.") {
            return Site::Update(p.to_string());
        }
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && !(digits > 1 && rest.starts_with('0')) {
                if let Ok(i) = rest[..digits].parse::<usize>() {
                    let suffix = &rest[digits..];
                    let parts = LayerPart::ALL.iter().chain(&LayerPart::OPTIONAL);
                    if let Some(part) = parts.into_iter().find(|p| p.suffix() == suffix) {
                        return Site::Layer(i, *part);
                    }
                }
            }
        }
        Site::Other(name.to_string())
    }

    /// Every contract site of a model with `layers` decoder layers, in compute order.
    pub fn all(layers: usize) -> Vec<Site> {
        let mut v = vec![
            Site::PositionIds,
            Site::EmbedTokens,
            Site::RotaryCos,
            Site::RotarySin,
            Site::Mask,
        ];
        for i in 0..layers {
            v.extend(LayerPart::ALL.iter().map(|&p| Site::Layer(i, p)));
        }
        v.push(Site::Norm);
        v.push(Site::LmHead);
        v
    }

    /// Every site of a training step with `layers` decoder layers and these trainable
    /// `parameters` (CONTRACT §6), in compute order: the forward sites of the prefill
    /// but the KV cache, `loss`, the gradients of those with one ([`Site::has_grad`]) in
    /// reverse, `grad_norm`, then each parameter's gradient and update in parameter
    /// order. Optional sites (§5's adapter and MLP projections) are not listed.
    pub fn train(layers: usize, parameters: &[String]) -> Vec<Site> {
        let forward: Vec<Site> = Site::all(layers)
            .into_iter()
            .filter(|s| !matches!(s, Site::Layer(_, LayerPart::KCache | LayerPart::VCache)))
            .collect();
        let mut params = parameters.to_vec();
        params.sort_by(|a, b| parameter_order(a).cmp(&parameter_order(b)).then(a.cmp(b)));
        let mut v = forward.clone();
        v.push(Site::Loss);
        v.extend(forward.into_iter().rev().filter(Site::has_grad).map(|s| Site::Grad(Box::new(s))));
        v.push(Site::GradNorm);
        v.extend(params.iter().map(|p| Site::ParamGrad(p.clone())));
        v.extend(params.iter().map(|p| Site::Update(p.clone())));
        v
    }

    /// Whether a training step has `grad.<this site>` (CONTRACT §6): every forward value
    /// site but the position ids, the RoPE tables, the mask and the KV cache.
    pub fn has_grad(&self) -> bool {
        match self {
            Site::EmbedTokens | Site::Norm | Site::LmHead => true,
            Site::Layer(_, p) => !matches!(p, LayerPart::KCache | LayerPart::VCache),
            _ => false,
        }
    }

    /// Whether the site is the gradient, parameter gradient or update of a training step
    /// (its value is not a forward activation).
    pub fn is_backward(&self) -> bool {
        matches!(self, Site::Grad(_) | Site::GradNorm | Site::ParamGrad(_) | Site::Update(_))
    }

    /// Compute order within a step: the forward sites, then (a training step) `loss`,
    /// the gradients in reverse forward order, `grad_norm`, parameter gradients and
    /// updates in parameter order; names outside the contract after their group's.
    fn group(&self) -> usize {
        match self {
            Site::Loss => 1,
            Site::Grad(_) => 2,
            Site::GradNorm => 3,
            Site::ParamGrad(_) => 4,
            Site::Update(_) => 5,
            _ => 0,
        }
    }

    /// Rank in forward compute order within a step.
    fn rank(&self) -> (usize, usize, usize) {
        match self {
            Site::PositionIds => (0, 0, 0),
            Site::EmbedTokens => (1, 0, 0),
            Site::RotaryCos => (2, 0, 0),
            Site::RotarySin => (3, 0, 0),
            Site::Mask => (4, 0, 0),
            Site::Layer(i, p) => (5, *i, *p as usize),
            Site::Norm => (6, 0, 0),
            Site::LmHead => (7, 0, 0),
            _ => (8, 0, 0),
        }
    }

    /// Compares two sites in compute order.
    pub fn compute_order(&self, other: &Site) -> Ordering {
        self.group().cmp(&other.group()).then_with(|| match (self, other) {
            (Site::Grad(a), Site::Grad(b)) => b.compute_order(a),
            (Site::ParamGrad(a), Site::ParamGrad(b)) | (Site::Update(a), Site::Update(b)) => {
                parameter_order(a).cmp(&parameter_order(b)).then_with(|| a.cmp(b))
            }
            _ => self.rank().cmp(&other.rank()).then_with(|| match (self, other) {
                (Site::Other(a), Site::Other(b)) => a.cmp(b),
                _ => Ordering::Equal,
            }),
        })
    }

    /// The layer index, for layer sites, their gradients and their parameters.
    pub fn layer(&self) -> Option<usize> {
        match self {
            Site::Layer(i, _) => Some(*i),
            Site::Grad(inner) => inner.layer(),
            Site::ParamGrad(name) | Site::Update(name) => match parameter_order(name) {
                (1, i, _, _) => Some(i),
                _ => None,
            },
            _ => None,
        }
    }

    /// The axis that indexes the tokens fed in this step (`T`), whose padding rows are
    /// left out of every metric; `None` where no axis is a query axis (the KV cache).
    pub fn token_axis(&self) -> Option<usize> {
        match self {
            Site::Mask => Some(2),
            Site::Layer(_, LayerPart::QRope | LayerPart::KRope | LayerPart::Probs) => Some(2),
            Site::Layer(_, LayerPart::KCache | LayerPart::VCache) => None,
            Site::Grad(inner) => inner.token_axis(),
            Site::Other(_) | Site::Loss | Site::GradNorm | Site::ParamGrad(_) | Site::Update(_) => {
                None
            }
            _ => Some(1),
        }
    }

    /// True for the attention mask, which is compared as a visibility pattern.
    pub fn is_mask(&self) -> bool {
        matches!(self, Site::Mask)
    }

    /// The short name for chart labels: `L3 q_rope`, `L12 output`, `embed_tokens`,
    /// `lm_head`.
    pub fn short_name(&self) -> String {
        match self {
            Site::Layer(i, LayerPart::Output) => format!("L{i} output"),
            Site::Layer(i, p) => {
                let part = p.suffix().trim_start_matches('.');
                format!("L{i} {}", part.strip_prefix("self_attn.").unwrap_or(part))
            }
            Site::Grad(inner) => format!("grad {}", inner.short_name()),
            Site::ParamGrad(name) | Site::Update(name) => {
                let n = name.strip_prefix("base_model.model.").unwrap_or(name);
                let n = n.strip_prefix("model.").unwrap_or(n);
                let n = n.strip_suffix(".weight").unwrap_or(n);
                let n = match n.strip_prefix("layers.") {
                    Some(rest) => format!("L{}", rest.replacen("self_attn.", "", 1)),
                    None => n.to_string(),
                };
                let kind = if matches!(self, Site::ParamGrad(_)) { "grad" } else { "update" };
                format!("{kind} {n}")
            }
            other => {
                let name = other.to_string();
                name.strip_prefix("model.").unwrap_or(&name).to_string()
            }
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::PositionIds => f.write_str("inputs.position_ids"),
            Site::EmbedTokens => f.write_str("model.embed_tokens"),
            Site::RotaryCos => f.write_str("model.rotary_emb.cos"),
            Site::RotarySin => f.write_str("model.rotary_emb.sin"),
            Site::Mask => f.write_str("model.mask"),
            Site::Layer(i, p) => write!(f, "model.layers.{i}{}", p.suffix()),
            Site::Norm => f.write_str("model.norm"),
            Site::LmHead => f.write_str("lm_head"),
            Site::Loss => f.write_str("loss"),
            Site::Grad(inner) => write!(f, "grad.{inner}"),
            Site::GradNorm => f.write_str("grad_norm"),
            Site::ParamGrad(name) => write!(f, "param_grad.{name}"),
            Site::Update(name) => write!(f, "update.{name}"),
            Site::Other(s) => f.write_str(s),
        }
    }
}

/// The activation key of a site in a step: `"<step>/<site>"`.
pub fn key(step: Step, site: &Site) -> String {
    format!("{step}/{site}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_shapes_by_hand() {
        let d = ShapeDims {
            batch: 2,
            prefill: 6,
            heads: 8,
            kv_heads: 2,
            head_dim: 4,
            hidden: 32,
            vocab: 50,
            intermediate: 48,
        };
        let l = |p| Site::Layer(1, p);
        assert_eq!(Site::Mask.shape(Step::Prefill, &d), vec![2, 1, 6, 6]);
        assert_eq!(Site::Mask.shape(Step::Decode(2), &d), vec![2, 1, 1, 9]);
        assert_eq!(l(LayerPart::KCache).shape(Step::Decode(0), &d), vec![2, 2, 7, 4]);
        assert_eq!(l(LayerPart::Probs).shape(Step::Prefill, &d), vec![2, 8, 6, 6]);
        assert_eq!(l(LayerPart::QProj).shape(Step::Prefill, &d), vec![2, 6, 32]);
        assert_eq!(l(LayerPart::VProj).shape(Step::Decode(1), &d), vec![2, 1, 8]);
        assert_eq!(l(LayerPart::QRope).shape(Step::Prefill, &d), vec![2, 8, 6, 4]);
        assert_eq!(Site::RotaryCos.shape(Step::Decode(3), &d), vec![2, 1, 4]);
        assert_eq!(Site::PositionIds.shape(Step::Prefill, &d), vec![2, 6]);
        assert_eq!(Site::LmHead.shape(Step::Decode(0), &d), vec![2, 1, 50]);
        assert_eq!(l(LayerPart::Mlp).shape(Step::Prefill, &d), vec![2, 6, 32]);
        assert_eq!(l(LayerPart::UpProj).shape(Step::Prefill, &d), vec![2, 6, 48]);
        assert_eq!(l(LayerPart::KProjLora).shape(Step::Decode(0), &d), vec![2, 1, 8]);
        assert_eq!(l(LayerPart::DownProjLora).shape(Step::Prefill, &d), vec![2, 6, 32]);
    }

    #[test]
    fn optional_sites_round_trip_and_sort_before_their_consumer() {
        for p in LayerPart::OPTIONAL {
            let s = Site::Layer(2, p);
            assert_eq!(Site::parse(&s.to_string()), s);
        }
        let order = |a: &str, b: &str| Site::parse(a).compute_order(&Site::parse(b));
        assert_eq!(
            order("model.layers.0.self_attn.q_proj.lora", "model.layers.0.self_attn.q_proj"),
            Ordering::Less
        );
        assert_eq!(order("model.layers.0.mlp.down_proj", "model.layers.0.mlp"), Ordering::Less);
        assert_eq!(
            order("model.layers.0.mlp.gate_proj", "model.layers.0.post_attention_layernorm"),
            Ordering::Greater
        );
        assert_eq!(LayerPart::QProjLora.lora_of(), Some(LayerPart::QProj));
        assert_eq!(LayerPart::UpProj.lora(), Some(LayerPart::UpProjLora));
    }

    #[test]
    fn short_names_label_charts() {
        let short = |n: &str| Site::parse(n).short_name();
        assert_eq!(short("model.layers.3.self_attn.q_rope"), "L3 q_rope");
        assert_eq!(short("model.layers.12"), "L12 output");
        assert_eq!(short("model.layers.0.mlp"), "L0 mlp");
        assert_eq!(short("model.layers.0.post_attention_layernorm"), "L0 post_attention_layernorm");
        assert_eq!(short("model.embed_tokens"), "embed_tokens");
        assert_eq!(short("lm_head"), "lm_head");
    }

    #[test]
    fn steps_parse_and_print() {
        assert_eq!(Step::parse("prefill"), Some(Step::Prefill));
        assert_eq!(Step::parse("decode.12"), Some(Step::Decode(12)));
        assert_eq!(Step::parse("decode."), None);
        assert_eq!(Step::parse("decode.01"), None);
        assert_eq!(Step::parse("decode.x"), None);
        assert_eq!(Step::Decode(3).to_string(), "decode.3");
        assert!(Step::Prefill < Step::Decode(0) && Step::Decode(2) < Step::Decode(10));
    }

    #[test]
    fn a_training_step_orders_forward_loss_backward_in_reverse_then_parameters() {
        let params: Vec<String> = [
            "lm_head.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
        ]
        .map(String::from)
        .to_vec();
        let all = Site::train(2, &params);
        for s in &all {
            assert_eq!(Site::parse(&s.to_string()), *s, "{s}");
        }
        let mut shuffled = all.clone();
        shuffled.reverse();
        shuffled.sort_by(|a, b| a.compute_order(b));
        assert_eq!(shuffled, all);
        let names: Vec<String> = all.iter().map(Site::to_string).collect();
        let at = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n}"));
        assert!(at("lm_head") < at("loss") && at("loss") < at("grad.lm_head"));
        assert!(at("grad.lm_head") < at("grad.model.layers.1.mlp"));
        assert!(at("grad.model.layers.0.input_layernorm") < at("grad.model.embed_tokens"));
        assert!(at("grad.model.embed_tokens") < at("grad_norm"));
        assert!(
            at("param_grad.model.embed_tokens.weight")
                < at("param_grad.model.layers.0.self_attn.q_proj.weight")
        );
        assert!(
            at("param_grad.model.layers.0.self_attn.q_proj.weight")
                < at("param_grad.model.layers.0.post_attention_layernorm.weight")
        );
        assert!(at("param_grad.lm_head.weight") < at("update.model.embed_tokens.weight"));
        assert!(!names.iter().any(|n| n.contains("cache")));
        assert!(at("model.mask") < at("model.layers.0.input_layernorm"));
        assert!(!names.iter().any(|n| n.starts_with("grad.") && n.contains("rotary")));
        assert_eq!(
            parameter_order("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
            (1, 0, 0, 3)
        );
        assert_eq!(Site::parse("grad.model.layers.3.mlp").layer(), Some(3));
        assert_eq!(Site::parse("grad.model.layers.3.mlp").token_axis(), Some(1));
        assert_eq!(Site::parse("loss").token_axis(), None);
        assert_eq!(Step::parse("train"), Some(Step::Train));
    }

    #[test]
    fn every_contract_site_round_trips() {
        for s in Site::all(3) {
            assert_eq!(Site::parse(&s.to_string()), s);
        }
        assert_eq!(Site::parse("model.layers.07.mlp"), Site::Other("model.layers.07.mlp".into()));
        assert_eq!(Site::parse("model.layers.1.foo"), Site::Other("model.layers.1.foo".into()));
    }

    #[test]
    fn compute_order_is_the_table_order_layer_by_layer() {
        let all = Site::all(2);
        let mut shuffled = all.clone();
        shuffled.reverse();
        shuffled.sort_by(|a, b| a.compute_order(b));
        assert_eq!(shuffled, all);
        assert_eq!(
            Site::parse("model.layers.0")
                .compute_order(&Site::parse("model.layers.1.input_layernorm")),
            Ordering::Less
        );
        assert_eq!(
            Site::parse("model.layers.10.mlp").compute_order(&Site::parse("model.layers.9.mlp")),
            Ordering::Greater
        );
    }
}

/// Steps and sites are written by name (`"decode.0"`, `"model.layers.0.mlp"`), as in
/// the contract's files.
mod serde_by_name {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Site, Step};

    impl Serialize for Step {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(self)
        }
    }

    impl<'de> Deserialize<'de> for Step {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Step, D::Error> {
            let name = String::deserialize(d)?;
            Step::parse(&name).ok_or_else(|| {
                D::Error::custom(format!("{name:?} is not a step (prefill, decode.N or train)"))
            })
        }
    }

    impl Serialize for Site {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(self)
        }
    }

    impl<'de> Deserialize<'de> for Site {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Site, D::Error> {
            Ok(Site::parse(&String::deserialize(d)?))
        }
    }
}
