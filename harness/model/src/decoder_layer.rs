//! One decoder layer, following HF `LlamaDecoderLayer.forward`:
//! `r = h; h = input_layernorm(h); h = r + o_proj(attn(h))`,
//! `r = h; h = post_attention_layernorm(h); h = r + mlp(h)`,
//! recording every per-layer contract site in compute order.

use ndarray::{Array3, Array4, ArrayView3, Zip};

use contract::fault::Component;
use contract::site::{LayerPart, Site, Step};
use dump::ModelConfig;

use super::attention;
use super::heads::split_heads;
use super::kv_cache::KvCache;
use super::mlp::Mlp;
use super::numerics::{round_in_place, Numerics, RoundAt};
use super::plan::{CacheWrite, CachedKeys, Plan};
use super::rms_norm::RmsNorm;
use super::rope;
use super::step_output::StepOutput;
use super::weights::LayerWeights;

/// What every layer of one step shares: the step, the rotary tables `[batch, T, D]` and
/// the additive mask `[batch, 1, T, S]`.
pub struct StepShared<'s> {
    pub step: Step,
    pub cos: ArrayView3<'s, f64>,
    pub sin: ArrayView3<'s, f64>,
    pub mask: &'s Array4<f64>,
}

/// Layer `index` of a model, with the plan's fault variants (narrowed to this layer, the
/// step and each norm's component).
pub struct DecoderLayer<'a> {
    pub index: usize,
    pub weights: &'a LayerWeights,
    pub config: &'a ModelConfig,
    pub plan: &'a Plan,
}

impl DecoderLayer<'_> {
    /// Runs the layer on `h` `[batch, T, hidden]` in place, writing this step's keys and
    /// values into `cache` and the layer's sites into `out`.
    pub fn forward(
        &self,
        h: &mut Array3<f64>,
        shared: &StepShared,
        cache: &mut KvCache,
        n: &dyn Numerics,
        out: &mut StepOutput,
    ) {
        let (c, lw) = (self.config, self.weights);
        let (layer, step) = (Some(self.index), Some(shared.step));
        let plan = &self.plan.at(layer, step, None);
        let norm_plan = |part| self.plan.at(layer, step, Some(part));
        let site = |p: LayerPart| Site::Layer(self.index, p);
        // The prefill fills the cache from its first slot; decode steps write as planned.
        let write = match shared.step {
            Step::Prefill | Step::Train => CacheWrite::NextSlot,
            Step::Decode(_) => plan.cache_write,
        };

        let input_norm = norm_plan(Component::InputLayernorm);
        let x = RmsNorm::planned(&lw.input_layernorm, c.rms_norm_eps, &input_norm).forward(h, n);
        out.put(site(LayerPart::InputLayernorm), x.clone());
        // An adapted layer also records the optional sites (CONTRACT §5): each LoRA
        // delta right before its projection, and the MLP's projections.
        let adapted = lw.adapted;
        let mut put_projection = |part: LayerPart, (y, delta): (Array3<f64>, Option<_>)| {
            if let (Some(d), Some(lora)) = (delta, part.lora()) {
                out.put(site(lora), d);
            }
            out.put(site(part), y.clone());
            y
        };
        let q = put_projection(LayerPart::QProj, lw.q_proj.forward_adapted(&x, n));
        let k = put_projection(LayerPart::KProj, lw.k_proj.forward_adapted(&x, n));
        let v = put_projection(LayerPart::VProj, lw.v_proj.forward_adapted(&x, n));
        if out.stopped() {
            return;
        }
        let q = split_heads(&q, c.num_attention_heads);
        let k = split_heads(&k, c.kv_heads());
        let v = split_heads(&v, c.kv_heads());
        let q_rot = rope::apply(&q, shared.cos, shared.sin, plan.rope_layout, n);
        let k_rot = rope::apply(&k, shared.cos, shared.sin, plan.rope_layout, n);
        out.put(site(LayerPart::QRope), q_rot.clone());
        out.put(site(LayerPart::KRope), k_rot.clone());
        let cached_k = match plan.cached_keys {
            CachedKeys::Rotated => &k_rot,
            CachedKeys::Unrotated => &k,
        };
        cache.append(cached_k, &v, write);
        out.put(site(LayerPart::KCache), cache.keys().to_owned());
        out.put(site(LayerPart::VCache), cache.values().to_owned());
        let (probs, ctx) = attention::eager(
            &q_rot,
            cache.keys(),
            cache.values(),
            shared.mask,
            attention::scale(c.head_dim(), plan.score_scale),
            plan.head_mapping,
            n,
        );
        out.put(site(LayerPart::Probs), probs);
        out.put(site(LayerPart::Context), ctx.clone());
        let (o, o_delta) = lw.o_proj.forward_adapted(&ctx, n);
        if let Some(d) = o_delta {
            out.put(site(LayerPart::OProjLora), d);
        }
        out.put(site(LayerPart::OProj), o.clone());
        if out.stopped() {
            return;
        }
        residual_add(h, &o, n);

        let post_norm = norm_plan(Component::PostAttentionLayernorm);
        let x = RmsNorm::planned(&lw.post_attention_layernorm, c.rms_norm_eps, &post_norm)
            .forward(h, n);
        out.put(site(LayerPart::PostAttentionLayernorm), x.clone());
        if out.stopped() {
            return;
        }
        let mlp = Mlp { gate_proj: &lw.gate_proj, up_proj: &lw.up_proj, down_proj: &lw.down_proj };
        let y = if adapted {
            let parts = mlp.forward_parts(&x, n);
            for (part, (y, delta)) in [
                (LayerPart::GateProj, parts.gate),
                (LayerPart::UpProj, parts.up),
                (LayerPart::DownProj, parts.down.clone()),
            ] {
                if let (Some(d), Some(lora)) = (delta, part.lora()) {
                    out.put(site(lora), d);
                }
                out.put(site(part), y);
            }
            parts.down.0
        } else {
            mlp.forward(&x, n)
        };
        out.put(site(LayerPart::Mlp), y.clone());
        residual_add(h, &y, n);
        out.put(site(LayerPart::Output), h.clone());
    }
}

/// `h += y`, rounded at `RoundAt::Residual`. Both `[batch, T, hidden]`.
fn residual_add(h: &mut Array3<f64>, y: &Array3<f64>, n: &dyn Numerics) {
    Zip::from(&mut *h).and(y).for_each(|a, &b| *a += b);
    round_in_place(n, RoundAt::Residual, h);
}
