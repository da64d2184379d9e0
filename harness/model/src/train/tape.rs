//! The forward of a training step, keeping what the backward reads (the tape).
//!
//! The prefill of CONTRACT §1 on `scenario.input_ids` with the training mask
//! (docs/training.md): positions `cumsum(attention_mask) − 1` with padding slots at 1,
//! the RoPE tables of those positions, the additive mask `[B, 1, P, P]` (causal and
//! padding), then HF's `LlamaForCausalLM.forward` with no KV cache. Every block is the
//! inference model's ([`crate::rms_norm`], [`crate::linear`], [`crate::lora`],
//! [`crate::rope`], [`crate::attention`], [`crate::mlp`]) under the run's numerics and
//! the plan's fault seams, so a §3 fault acts on the step's forward as in inference.

use ndarray::{Array2, Array3, Array4, ArrayD, Zip};

use contract::error::Result;
use contract::fault::Component;
use contract::site::{LayerPart, Site, Step};
use dump::Scenario;

use crate::attention;
use crate::embedding::Embedding;
use crate::heads::split_heads;
use crate::linear::Linear;
use crate::llama::Llama;
use crate::lora::Lora;
use crate::mask;
use crate::mlp::silu;
use crate::numerics::{round_in_place, Numerics, RoundAt};
use crate::plan::{MaskFill, PaddingSource, Plan, RopeTables, OVERFLOWING_FILL};
use crate::rms_norm::RmsNorm;
use crate::rope::{self, Rope};

/// A projection's output as computed.
#[derive(Debug, Clone)]
pub struct Projected {
    /// `[batch, seq, out]`: the adapted module's output.
    pub y: Array3<f64>,
    /// `[batch, seq, out]`: the LoRA delta `s · B(A(x))` alone, with a bypass.
    pub delta: Option<Array3<f64>>,
    /// `[batch·seq, r]`: `A(x)`, with a bypass.
    pub ax: Option<Array2<f64>>,
}

/// `lin` on `x` `[batch, seq, in]`, keeping the bypass's rank product.
pub fn project(lin: &Linear, x: &Array3<f64>, n: &dyn Numerics) -> Projected {
    let mut y = lin.dense(x, n);
    let (delta, ax) = match &lin.lora {
        Some(l) => {
            let (ax, d) = l.delta_parts(x, n);
            Lora::add_to(&mut y, &d, n);
            (Some(d), Some(ax))
        }
        None => (None, None),
    };
    Projected { y, delta, ax }
}

/// One decoder layer's forward values.
#[derive(Debug, Clone)]
pub struct LayerTape {
    /// `[batch, seq, H]`: the layer's input (the residual stream).
    pub input: Array3<f64>,
    /// `[batch, seq, H]`: `input_layernorm`'s output.
    pub x1: Array3<f64>,
    pub q: Projected,
    pub k: Projected,
    pub v: Projected,
    /// `[batch, heads, seq, D]`, `[batch, kv_heads, seq, D]`: after RoPE.
    pub q_rot: Array4<f64>,
    pub k_rot: Array4<f64>,
    /// `[batch, kv_heads, seq, D]`
    pub v_heads: Array4<f64>,
    /// `[batch, heads, seq, seq]`
    pub probs: Array4<f64>,
    /// `[batch, seq, heads·D]`
    pub context: Array3<f64>,
    pub o: Projected,
    /// `[batch, seq, H]`: `input + o_proj`.
    pub mid: Array3<f64>,
    /// `[batch, seq, H]`: `post_attention_layernorm`'s output.
    pub x2: Array3<f64>,
    pub gate: Projected,
    pub up: Projected,
    /// `[batch, seq, I]`: `silu(gate) · up`.
    pub hidden: Array3<f64>,
    pub down: Projected,
    /// `[batch, seq, H]`: the layer's output.
    pub output: Array3<f64>,
    /// The score scale applied.
    pub scale: f64,
}

/// The whole forward.
#[derive(Debug, Clone)]
pub struct Tape {
    /// `[batch, seq]`
    pub positions: Array2<i64>,
    /// `[batch, seq, H]`
    pub embed: Array3<f64>,
    /// `[batch, seq, D]`: as applied.
    pub cos: Array3<f64>,
    pub sin: Array3<f64>,
    /// `[batch, 1, seq, seq]`
    pub mask: Array4<f64>,
    pub layers: Vec<LayerTape>,
    /// `[batch, seq, H]`: `model.norm`'s output.
    pub normed: Array3<f64>,
    /// `[batch, seq, V]`
    pub logits: Array3<f64>,
}

/// Positions of a prefill: `cumsum(mask) − 1` per row, padding slots at 1.
pub fn positions(attention_mask: &[Vec<i64>]) -> Array2<i64> {
    let t = attention_mask.first().map_or(0, Vec::len);
    let mut p = Array2::zeros((attention_mask.len(), t));
    for (b, row) in attention_mask.iter().enumerate() {
        let mut c = 0;
        for (ti, &m) in row.iter().enumerate() {
            p[[b, ti]] = if m != 0 {
                c += 1;
                c - 1
            } else {
                1
            };
        }
    }
    p
}

/// Runs the forward of `sc`'s prefill on `model` with the training mask.
pub fn forward(model: &Llama, sc: &Scenario, n: &dyn Numerics, plan: &Plan) -> Result<Tape> {
    let step = Some(Step::Train);
    let here = plan.at(None, step, None);
    let (c, w) = (&model.config, &model.weights);
    let ids = &sc.input_ids;
    let t = ids.first().map_or(0, Vec::len);
    let positions = positions(&sc.attention_mask);
    let embed = Embedding { weight: &w.embed_tokens }.forward(ids, n)?;
    let mut rope = Rope::new(model.rope.clone(), here.rope_frequencies, here.angle_precision);
    let (mut cos, mut sin) = rope.tables(&positions, n);
    if here.rope_tables == RopeTables::Swapped {
        std::mem::swap(&mut cos, &mut sin);
    }
    let valid: Vec<Vec<bool>> = match here.padding_source {
        PaddingSource::AttentionMask => {
            sc.attention_mask.iter().map(|r| r.iter().map(|&m| m != 0).collect()).collect()
        }
        PaddingSource::TokenIds => {
            let pad = c.extra.get("pad_token_id").and_then(serde_json::Value::as_i64).unwrap_or(0);
            ids.iter().map(|r| r.iter().map(|&i| i != pad).collect()).collect()
        }
    };
    let fill = match here.mask_fill {
        MaskFill::Convention => n.mask_fill(),
        MaskFill::Overflowing => n.mask_precision().round(OVERFLOWING_FILL),
    };
    let mask = mask::additive(&valid, 0, t, here.mask_rule, fill);

    let mut h = embed.clone();
    let mut layers = Vec::with_capacity(w.layers.len());
    for (i, lw) in w.layers.iter().enumerate() {
        let lp = plan.at(Some(i), step, None);
        let norm = |part| plan.at(Some(i), step, Some(part));
        let input = h.clone();
        let x1 =
            RmsNorm::planned(&lw.input_layernorm, c.rms_norm_eps, &norm(Component::InputLayernorm))
                .forward(&h, n);
        let q = project(&lw.q_proj, &x1, n);
        let k = project(&lw.k_proj, &x1, n);
        let v = project(&lw.v_proj, &x1, n);
        let q_rot = rope::apply(
            &split_heads(&q.y, c.num_attention_heads),
            cos.view(),
            sin.view(),
            lp.rope_layout,
            n,
        );
        let k_rot = rope::apply(
            &split_heads(&k.y, c.kv_heads()),
            cos.view(),
            sin.view(),
            lp.rope_layout,
            n,
        );
        let v_heads = split_heads(&v.y, c.kv_heads());
        let scale = attention::scale(c.head_dim(), lp.score_scale);
        let (probs, context) = attention::eager(
            &q_rot,
            k_rot.view(),
            v_heads.view(),
            &mask,
            scale,
            lp.head_mapping,
            n,
        );
        let o = project(&lw.o_proj, &context, n);
        let mut mid = h.clone();
        Zip::from(&mut mid).and(&o.y).for_each(|a, &b| *a += b);
        round_in_place(n, RoundAt::Residual, &mut mid);
        let x2 = RmsNorm::planned(
            &lw.post_attention_layernorm,
            c.rms_norm_eps,
            &norm(Component::PostAttentionLayernorm),
        )
        .forward(&mid, n);
        let gate = project(&lw.gate_proj, &x2, n);
        let up = project(&lw.up_proj, &x2, n);
        let mut hidden = gate.y.clone();
        Zip::from(&mut hidden).and(&up.y).for_each(|g, &u| *g = silu(*g) * u);
        round_in_place(n, RoundAt::MlpHidden, &mut hidden);
        let down = project(&lw.down_proj, &hidden, n);
        let mut output = mid.clone();
        Zip::from(&mut output).and(&down.y).for_each(|a, &b| *a += b);
        round_in_place(n, RoundAt::Residual, &mut output);
        h = output.clone();
        layers.push(LayerTape {
            input,
            x1,
            q,
            k,
            v,
            q_rot,
            k_rot,
            v_heads,
            probs,
            context,
            o,
            mid,
            x2,
            gate,
            up,
            hidden,
            down,
            output,
            scale,
        });
    }
    let final_norm = plan.at(None, step, Some(Component::ModelNorm));
    let normed = RmsNorm::planned(&w.norm, c.rms_norm_eps, &final_norm).forward(&h, n);
    let logits = w.lm_head.dense(&normed, n);
    Ok(Tape { positions, embed, cos, sin, mask, layers, normed, logits })
}

impl Tape {
    /// The forward sites of step `train` in compute order (CONTRACT §6: the prefill's but
    /// the KV cache; with `adapted`, §5's optional LoRA and MLP projection sites).
    pub fn sites(&self, adapted: bool) -> Vec<(Site, ArrayD<f64>)> {
        let mut v: Vec<(Site, ArrayD<f64>)> = vec![
            (Site::PositionIds, self.positions.mapv(|p| p as f64).into_dyn()),
            (Site::EmbedTokens, self.embed.clone().into_dyn()),
            (Site::RotaryCos, self.cos.clone().into_dyn()),
            (Site::RotarySin, self.sin.clone().into_dyn()),
            (Site::Mask, self.mask.clone().into_dyn()),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let mut put = |p: LayerPart, a: ArrayD<f64>| v.push((Site::Layer(i, p), a));
            let proj =
                |put: &mut dyn FnMut(LayerPart, ArrayD<f64>), p: LayerPart, x: &Projected| {
                    if let (true, Some(d), Some(lora)) = (adapted, &x.delta, p.lora()) {
                        put(lora, d.clone().into_dyn());
                    }
                    put(p, x.y.clone().into_dyn());
                };
            put(LayerPart::InputLayernorm, l.x1.clone().into_dyn());
            proj(&mut put, LayerPart::QProj, &l.q);
            proj(&mut put, LayerPart::KProj, &l.k);
            proj(&mut put, LayerPart::VProj, &l.v);
            put(LayerPart::QRope, l.q_rot.clone().into_dyn());
            put(LayerPart::KRope, l.k_rot.clone().into_dyn());
            put(LayerPart::Probs, l.probs.clone().into_dyn());
            put(LayerPart::Context, l.context.clone().into_dyn());
            proj(&mut put, LayerPart::OProj, &l.o);
            put(LayerPart::PostAttentionLayernorm, l.x2.clone().into_dyn());
            if adapted {
                proj(&mut put, LayerPart::GateProj, &l.gate);
                proj(&mut put, LayerPart::UpProj, &l.up);
                proj(&mut put, LayerPart::DownProj, &l.down);
            }
            put(LayerPart::Mlp, l.down.y.clone().into_dyn());
            put(LayerPart::Output, l.output.clone().into_dyn());
        }
        v.push((Site::Norm, self.normed.clone().into_dyn()));
        v.push((Site::LmHead, self.logits.clone().into_dyn()));
        v
    }
}
