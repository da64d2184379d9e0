//! Where a divergence starts inside the computation, from the comparison alone: which
//! inputs of the first divergent site still match the golden. Said when no known fault
//! explains the divergence; it never names a fault.
//!
//! Each site is computed from a few earlier sites of the same step (HF
//! `LlamaDecoderLayer.forward`): `q_rope` from `q_proj` and the rotary tables, `probs`
//! from `q_rope`, the cached keys and the mask, the layer output from the layer input,
//! `o_proj` and the MLP... When those inputs match and the site does not, the fault is
//! in the computation between them.

use compare::{Comparison, Status};
use contract::site::{LayerPart, Site, Step};

/// The inputs of `site` among the contract's sites, and the computation that turns them
/// into it. `last_layer` is the model's last decoder layer.
fn inputs(site: &Site, last_layer: usize) -> (Vec<Site>, &'static str) {
    use LayerPart::*;
    let layer_input =
        |i: usize| if i == 0 { Site::EmbedTokens } else { Site::Layer(i - 1, Output) };
    match site {
        Site::PositionIds => (vec![], "the position bookkeeping (offsets, padding, decode steps)"),
        Site::EmbedTokens => (vec![], "the embedding lookup (its weights, or the token ids fed)"),
        Site::RotaryCos | Site::RotarySin => (
            vec![Site::PositionIds],
            "the rotary tables (frequencies, theta, scaling or their layout)",
        ),
        Site::Mask => (vec![Site::PositionIds], "the mask construction (causality or padding)"),
        Site::Layer(i, part) => {
            let l = |p: LayerPart| Site::Layer(*i, p);
            match part {
                InputLayernorm => {
                    (vec![layer_input(*i)], "the norm itself (its formula, epsilon or weight)")
                }
                QProj | KProj | VProj => (
                    vec![l(InputLayernorm)],
                    "the projection itself (its weights or how they were mapped), or its LoRA \
                     adapter where it has one",
                ),
                QProjLora | KProjLora | VProjLora => (
                    vec![l(InputLayernorm)],
                    "the LoRA delta itself (its A, B, rank or scaling)",
                ),
                OProjLora => (vec![l(Context)], "the LoRA delta itself (its A, B, rank or scaling)"),
                GateProjLora | UpProjLora | GateProj | UpProj => (
                    vec![l(PostAttentionLayernorm)],
                    "the MLP projection or its LoRA delta (weights, A, B, rank or scaling)",
                ),
                DownProjLora | DownProj => (
                    vec![l(GateProj), l(UpProj)],
                    "down_proj or its LoRA delta (weights, A, B, rank or scaling), or the activation",
                ),
                QRope => (
                    vec![l(QProj), Site::RotaryCos, Site::RotarySin],
                    "the rotation itself (its layout, or which table it applies)",
                ),
                KRope => (
                    vec![l(KProj), Site::RotaryCos, Site::RotarySin],
                    "the rotation itself (its layout, or which table it applies)",
                ),
                KCache => {
                    (vec![l(KRope)], "the cache write (which slot, or which keys are cached)")
                }
                VCache => (vec![l(VProj)], "the cache write (which slot)"),
                Probs => (vec![l(QRope), l(KCache), Site::Mask], "the score scale or the softmax"),
                Context => (
                    vec![l(Probs), l(VCache)],
                    "probs · V (which value head each query head reads)",
                ),
                OProj => (
                    vec![l(Context)],
                    "o_proj itself (its weights or how they were mapped), or its LoRA adapter \
                     where it has one",
                ),
                PostAttentionLayernorm => (
                    vec![layer_input(*i), l(OProj)],
                    "the residual add after attention, or the norm itself",
                ),
                Mlp => (
                    vec![l(PostAttentionLayernorm)],
                    "the MLP itself (gate, up and down weights, or the activation)",
                ),
                Output => (vec![layer_input(*i), l(OProj), l(Mlp)], "the residual adds"),
            }
        }
        Site::Norm => (vec![Site::Layer(last_layer, LayerPart::Output)], "the final norm itself"),
        Site::LmHead => (vec![Site::Norm], "lm_head itself (its weights, or tied embeddings)"),
        Site::Loss => (
            vec![Site::LmHead],
            "the loss itself (the label shift, the positions it ignores or its reduction)",
        ),
        Site::Grad(_) => (vec![Site::Loss], "the backward of that site"),
        Site::GradNorm => (vec![], "the global gradient norm (unscaling or its reduction)"),
        Site::ParamGrad(_) => (
            vec![Site::GradNorm],
            "the parameter's gradient (unscaling, clipping or the micro-batch average)",
        ),
        Site::Update(name) => (
            vec![Site::ParamGrad(name.clone())],
            "the optimizer step (bias correction, the weight-decay groups, or a step that \
             should have been skipped)",
        ),
        Site::Other(_) => (vec![], "a site outside the contract's table"),
    }
}

/// The short name of an input in a sentence (`q_proj`, `rotary cos`, `model.layers.0`).
fn short(site: &Site) -> String {
    match site {
        Site::Layer(_, LayerPart::Output) => site.to_string(),
        Site::Layer(_, part) => {
            let name = part.suffix().trim_start_matches('.');
            name.strip_prefix("self_attn.").unwrap_or(name).to_string()
        }
        Site::RotaryCos => "rotary cos".into(),
        Site::RotarySin => "rotary sin".into(),
        Site::PositionIds => "position ids".into(),
        Site::Mask => "the mask".into(),
        other => other.to_string(),
    }
}

/// Where `cmp`'s first divergence starts inside the computation, as a sentence; `None`
/// when the comparison has no divergence.
pub fn localise(cmp: &Comparison) -> Option<String> {
    let first = cmp.first_divergence()?;
    let last_layer = cmp
        .sites
        .iter()
        .filter_map(|s| match s.site {
            Site::Layer(i, _) => Some(i),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let (ins, computation) = inputs(&first.site, last_layer);
    let status = |step: Step, s: &Site| {
        cmp.sites.iter().find(|r| r.step == step && &r.site == s).map(|r| r.status)
    };
    let (mut matched, mut unknown) = (Vec::new(), Vec::new());
    for s in &ins {
        match status(first.step, s) {
            Some(Status::Pass) => matched.push(short(s)),
            _ => unknown.push(short(s)),
        }
    }
    let what = format!("{} {}", first.step, first.site);
    let mut out = if ins.is_empty() {
        format!("{what} is the first site computed that differs: {computation}")
    } else if unknown.is_empty() {
        format!("{what} differs while its inputs {} match: {computation}", join(&matched))
    } else if matched.is_empty() {
        format!(
            "{what} differs and none of its inputs ({}) was compared, so the divergence starts \
             there or in a site not dumped",
            join(&unknown)
        )
    } else {
        format!(
            "{what} differs while {} match{}; {} not compared: {computation}, or what produced \
             the uncompared inputs",
            join(&matched),
            if matched.len() == 1 { "es" } else { "" },
            join(&unknown)
        )
    };
    if matches!(first.step, Step::Decode(_))
        && matches!(first.site, Site::Layer(_, LayerPart::Probs | LayerPart::Context))
    {
        out.push_str(" (the cache holds every earlier step's keys and values too)");
    }
    Some(out)
}

fn join(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}
