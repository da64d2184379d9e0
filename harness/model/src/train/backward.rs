//! The backward pass of a training step: the blocks of [`super::blocks`] composed in
//! reverse over the [`Tape`], giving `grad.<site>` for every forward site with a
//! gradient (CONTRACT §6) and the gradient of every trainable parameter.
//!
//! Residual adds pass their gradient to both branches (summed where two paths meet:
//! `mid` receives the layer output's gradient and the post-attention norm's; the layer
//! input receives `mid`'s and the input norm's). A tied `lm_head` adds its weight's
//! gradient to the embedding's.

use std::collections::BTreeMap;

use ndarray::{Array2, Array3, ArrayD};

use contract::fault::Component;
use contract::site::{LayerPart, Site, Step};
use dump::Trainable;

use crate::linear::Linear;
use crate::llama::Llama;
use crate::plan::Plan;

use super::blocks::{self, LinearGrads, Wants};
use super::tape::{Projected, Tape};
use super::Storage;

/// What is trained and the names its gradients are dumped under.
#[derive(Debug, Clone)]
pub struct Trainables {
    pub trainable: Trainable,
    /// With an adapter: the PEFT names of each adapted projection's `lora_A` and `lora_B`
    /// as stored in `adapter_model.safetensors`, by layer and projection.
    pub adapter_keys: BTreeMap<(usize, Component), (String, String)>,
}

/// What the backward gives: gradients in the scaled space the backward ran in.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    /// `d (loss × scale) / d site` for every forward site with a gradient.
    pub sites: Vec<(Site, ArrayD<f64>)>,
    /// `d (loss × scale) / d parameter`, by HF or PEFT name.
    pub params: BTreeMap<String, ArrayD<f64>>,
}

struct Walk<'a> {
    trainables: &'a Trainables,
    st: Storage<'a>,
    out: Gradients,
    adapted: bool,
}

impl Walk<'_> {
    fn site(&mut self, site: Site, a: ArrayD<f64>) {
        self.out.sites.push((Site::Grad(Box::new(site)), a));
    }

    fn all(&self) -> bool {
        self.trainables.trainable == Trainable::All
    }

    /// A projection's backward, recording its parameters' gradients; `dy` is the
    /// gradient of its output (and of its LoRA delta, added to it).
    fn linear(
        &mut self,
        (layer, c, part): (usize, Component, LayerPart),
        lin: &Linear,
        x: &Array3<f64>,
        p: &Projected,
        dy: &Array3<f64>,
    ) -> Array3<f64> {
        if let (true, Some(_), Some(lora)) = (self.adapted, &p.delta, part.lora()) {
            self.site(Site::Layer(layer, lora), dy.clone().into_dyn());
        }
        let keys = self.trainables.adapter_keys.get(&(layer, c)).cloned();
        let want = Wants { dense: self.all(), adapter: keys.is_some() };
        let g: LinearGrads = blocks::linear(lin, x, p.ax.as_ref(), dy, want, self.st);
        let base = crate_module(layer, c);
        if let Some(w) = g.weight {
            self.out.params.insert(format!("{base}.weight"), w.into_dyn());
        }
        if let Some(b) = g.bias {
            self.out.params.insert(format!("{base}.bias"), b.into_dyn());
        }
        if let (Some((ka, kb)), Some(a), Some(b)) = (keys, g.lora_a, g.lora_b) {
            self.out.params.insert(ka, a.into_dyn());
            self.out.params.insert(kb, b.into_dyn());
        }
        g.dx
    }
}

fn crate_module(layer: usize, c: Component) -> String {
    ::weights::adapter::module_name(layer, c)
}

fn add(a: &Array3<f64>, b: &Array3<f64>, st: Storage) -> Array3<f64> {
    let mut s = a + b;
    st.act(&mut s);
    s
}

/// The backward of `tape` from `dlogits` `[batch, seq, vocab]` (the gradient of the
/// scaled loss), for `model` run on `ids` `[batch][seq]` under `plan`.
pub fn backward(
    model: &Llama,
    tape: &Tape,
    ids: &[Vec<i64>],
    dlogits: &Array3<f64>,
    trainables: &Trainables,
    plan: &Plan,
    st: Storage,
) -> Gradients {
    let (c, w) = (&model.config, &model.weights);
    let adapted = w.layers.iter().any(|l| l.adapted);
    let mut g = Walk { trainables, st, out: Gradients::default(), adapted };
    let step = Some(Step::Train);
    let eps = c.rms_norm_eps;
    let all = g.all();

    g.site(Site::LmHead, dlogits.clone().into_dyn());
    let head = blocks::linear(
        &w.lm_head,
        &tape.normed,
        None,
        dlogits,
        Wants { dense: all, adapter: false },
        st,
    );
    g.site(Site::Norm, head.dx.clone().into_dyn());
    let last = tape.layers.last().map_or(&tape.embed, |l| &l.output);
    let kind = plan.at(None, step, Some(Component::ModelNorm)).norm_kind;
    let (mut dh, dnorm) = blocks::rms_norm(last, &w.norm, eps, kind, &head.dx, st);
    let mut norm_grads: Vec<(String, ArrayD<f64>)> = Vec::new();
    if all {
        norm_grads.push(("model.norm.weight".into(), dnorm.into_dyn()));
    }

    for (i, (l, lw)) in tape.layers.iter().zip(&w.layers).enumerate().rev() {
        let kind = |part| plan.at(Some(i), step, Some(part)).norm_kind;
        let lp = plan.at(Some(i), step, None);
        let site = |p: LayerPart| Site::Layer(i, p);
        g.site(site(LayerPart::Output), dh.clone().into_dyn());
        g.site(site(LayerPart::Mlp), dh.clone().into_dyn());
        if adapted {
            g.site(site(LayerPart::DownProj), dh.clone().into_dyn());
        }
        let dhidden = g.linear(
            (i, Component::DownProj, LayerPart::DownProj),
            &lw.down_proj,
            &l.hidden,
            &l.down,
            &dh,
        );
        let (dgate, dup) = blocks::swiglu(&l.gate.y, &l.up.y, &dhidden, st);
        // Compute order forward: gate, up; reverse: up's gradient sites first.
        if adapted {
            g.site(site(LayerPart::UpProj), dup.clone().into_dyn());
        }
        let dx2_up =
            g.linear((i, Component::UpProj, LayerPart::UpProj), &lw.up_proj, &l.x2, &l.up, &dup);
        if adapted {
            g.site(site(LayerPart::GateProj), dgate.clone().into_dyn());
        }
        let dx2_gate = g.linear(
            (i, Component::GateProj, LayerPart::GateProj),
            &lw.gate_proj,
            &l.x2,
            &l.gate,
            &dgate,
        );
        let dx2 = add(&dx2_gate, &dx2_up, st);
        g.site(site(LayerPart::PostAttentionLayernorm), dx2.clone().into_dyn());
        let (dmid_norm, dw_post) = blocks::rms_norm(
            &l.mid,
            &lw.post_attention_layernorm,
            eps,
            kind(Component::PostAttentionLayernorm),
            &dx2,
            st,
        );
        let dmid = add(&dh, &dmid_norm, st);
        g.site(site(LayerPart::OProj), dmid.clone().into_dyn());
        let dctx =
            g.linear((i, Component::OProj, LayerPart::OProj), &lw.o_proj, &l.context, &l.o, &dmid);
        g.site(site(LayerPart::Context), dctx.clone().into_dyn());
        let att = blocks::attention(
            &l.q_rot,
            &l.k_rot,
            &l.v_heads,
            &l.probs,
            &dctx,
            l.scale,
            lp.head_mapping,
            st,
        );
        g.site(site(LayerPart::Probs), att.probs.into_dyn());
        g.site(site(LayerPart::KRope), att.k.clone().into_dyn());
        g.site(site(LayerPart::QRope), att.q.clone().into_dyn());
        let dq = blocks::merged(&blocks::rope(
            &att.q,
            tape.cos.view(),
            tape.sin.view(),
            lp.rope_layout,
            st,
        ));
        let dk = blocks::merged(&blocks::rope(
            &att.k,
            tape.cos.view(),
            tape.sin.view(),
            lp.rope_layout,
            st,
        ));
        let dv = blocks::merged(&att.v);
        g.site(site(LayerPart::VProj), dv.clone().into_dyn());
        let dx1_v = g.linear((i, Component::VProj, LayerPart::VProj), &lw.v_proj, &l.x1, &l.v, &dv);
        g.site(site(LayerPart::KProj), dk.clone().into_dyn());
        let dx1_k = g.linear((i, Component::KProj, LayerPart::KProj), &lw.k_proj, &l.x1, &l.k, &dk);
        g.site(site(LayerPart::QProj), dq.clone().into_dyn());
        let dx1_q = g.linear((i, Component::QProj, LayerPart::QProj), &lw.q_proj, &l.x1, &l.q, &dq);
        let dx1 = add(&add(&dx1_q, &dx1_k, st), &dx1_v, st);
        g.site(site(LayerPart::InputLayernorm), dx1.clone().into_dyn());
        let (dinput_norm, dw_in) = blocks::rms_norm(
            &l.input,
            &lw.input_layernorm,
            eps,
            kind(Component::InputLayernorm),
            &dx1,
            st,
        );
        dh = add(&dmid, &dinput_norm, st);
        if all {
            let p = format!("model.layers.{i}");
            norm_grads.push((format!("{p}.input_layernorm.weight"), dw_in.into_dyn()));
            norm_grads.push((format!("{p}.post_attention_layernorm.weight"), dw_post.into_dyn()));
        }
    }
    g.site(Site::EmbedTokens, dh.clone().into_dyn());
    if all {
        let padding_idx = c
            .extra
            .get("pad_token_id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| usize::try_from(p).ok());
        let mut de: Array2<f64> = blocks::embedding(ids, &dh, c.vocab_size, padding_idx, st);
        let head_w = head.weight.expect("lm_head's weight gradient when everything trains");
        if c.tie_word_embeddings {
            de += &head_w;
            st.prod(&mut de);
        } else {
            g.out.params.insert("lm_head.weight".into(), head_w.into_dyn());
        }
        g.out.params.insert("model.embed_tokens.weight".into(), de.into_dyn());
        g.out.params.extend(norm_grads);
    }
    g.out
}
