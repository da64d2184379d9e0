//! One decoder layer, following HF `LlamaDecoderLayer.forward`:
//! `r = h; h = input_layernorm(h); h = r + o_proj(attn(h))`,
//! `r = h; h = post_attention_layernorm(h); h = r + mlp(h)`,
//! recording every per-layer contract site in compute order.

use ndarray::{s, Array3, Array4, ArrayView3, Axis, Zip};

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
        self.forward_steps(
            std::slice::from_mut(h),
            std::slice::from_ref(shared),
            cache,
            n,
            std::slice::from_mut(out),
        );
    }

    /// Runs the layer on several consecutive steps at once, `hs[j]` `[batch, T_j, hidden]`
    /// in place with `shared[j]` and `outs[j]`: what [`DecoderLayer::forward`] computes
    /// step after step, bit for bit. The projections (q/k/v, o, the MLP) take every
    /// step's rows in one product, so a decode step's weights are read once for all the
    /// steps; the norms, the rotary embedding, the cache writes and the attention run
    /// step by step in order, each under its step's plan. Each output element of a
    /// product is computed from its own row alone (see [`crate::linear`]), so stacking
    /// rows changes no bit as long as the caller keeps the product's kind
    /// ([`crate::linear::VECTOR_ROWS`]).
    pub fn forward_steps(
        &self,
        hs: &mut [Array3<f64>],
        shared: &[StepShared],
        cache: &mut KvCache,
        n: &dyn Numerics,
        outs: &mut [StepOutput],
    ) {
        let (c, lw) = (self.config, self.weights);
        let layer = Some(self.index);
        let site = |p: LayerPart| Site::Layer(self.index, p);
        let stopped = |outs: &[StepOutput]| outs.iter().any(StepOutput::stopped);
        let lengths: Vec<usize> = hs.iter().map(|h| h.dim().1).collect();

        let xs: Vec<Array3<f64>> = hs
            .iter()
            .zip(shared)
            .zip(outs.iter_mut())
            .map(|((h, sh), out)| {
                let norm = self.plan.at(layer, Some(sh.step), Some(Component::InputLayernorm));
                let x = RmsNorm::planned(&lw.input_layernorm, c.rms_norm_eps, &norm).forward(h, n);
                out.put(site(LayerPart::InputLayernorm), x.clone());
                x
            })
            .collect();
        let x = stack(&xs);
        // An adapted layer also records the optional sites (CONTRACT §5): each LoRA
        // delta right before its projection, and the MLP's projections.
        let adapted = lw.adapted;
        let put_projection =
            |outs: &mut [StepOutput], part: LayerPart, (y, delta): (Array3<f64>, Option<_>)| {
                let ys = unstack(&y, &lengths);
                let deltas = delta.map(|d| unstack(&d, &lengths));
                for (j, (out, y)) in outs.iter_mut().zip(&ys).enumerate() {
                    if let (Some(d), Some(lora)) = (&deltas, part.lora()) {
                        out.put(site(lora), d[j].clone());
                    }
                    out.put(site(part), y.clone());
                }
                ys
            };
        let q = put_projection(outs, LayerPart::QProj, lw.q_proj.forward_adapted(&x, n));
        let k = put_projection(outs, LayerPart::KProj, lw.k_proj.forward_adapted(&x, n));
        let v = put_projection(outs, LayerPart::VProj, lw.v_proj.forward_adapted(&x, n));
        if stopped(outs) {
            return;
        }
        let mut ctxs = Vec::with_capacity(hs.len());
        for (j, (sh, out)) in shared.iter().zip(outs.iter_mut()).enumerate() {
            let plan = &self.plan.at(layer, Some(sh.step), None);
            // The prefill fills the cache from its first slot; decode steps write as planned.
            let write = match sh.step {
                Step::Prefill | Step::Train => CacheWrite::NextSlot,
                Step::Decode(_) => plan.cache_write,
            };
            let q = split_heads(&q[j], c.num_attention_heads);
            let k = split_heads(&k[j], c.kv_heads());
            let v = split_heads(&v[j], c.kv_heads());
            let q_rot = rope::apply(&q, sh.cos, sh.sin, plan.rope_layout, n);
            let k_rot = rope::apply(&k, sh.cos, sh.sin, plan.rope_layout, n);
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
                sh.mask,
                attention::scale(c.head_dim(), plan.score_scale),
                plan.head_mapping,
                n,
            );
            out.put(site(LayerPart::Probs), probs);
            out.put(site(LayerPart::Context), ctx.clone());
            ctxs.push(ctx);
        }
        let (o, o_delta) = lw.o_proj.forward_adapted(&stack(&ctxs), n);
        let os = unstack(&o, &lengths);
        let o_deltas = o_delta.map(|d| unstack(&d, &lengths));
        for (j, (out, o)) in outs.iter_mut().zip(&os).enumerate() {
            if let Some(d) = &o_deltas {
                out.put(site(LayerPart::OProjLora), d[j].clone());
            }
            out.put(site(LayerPart::OProj), o.clone());
        }
        if stopped(outs) {
            return;
        }
        let xs: Vec<Array3<f64>> = hs
            .iter_mut()
            .zip(&os)
            .zip(shared)
            .zip(outs.iter_mut())
            .map(|(((h, o), sh), out)| {
                residual_add(h, o, n);
                let norm =
                    self.plan.at(layer, Some(sh.step), Some(Component::PostAttentionLayernorm));
                let x = RmsNorm::planned(&lw.post_attention_layernorm, c.rms_norm_eps, &norm)
                    .forward(h, n);
                out.put(site(LayerPart::PostAttentionLayernorm), x.clone());
                x
            })
            .collect();
        if stopped(outs) {
            return;
        }
        let x = stack(&xs);
        let mlp = Mlp { gate_proj: &lw.gate_proj, up_proj: &lw.up_proj, down_proj: &lw.down_proj };
        let y = if adapted {
            let parts = mlp.forward_parts(&x, n);
            let down = parts.down.0.clone();
            for (part, (y, delta)) in [
                (LayerPart::GateProj, parts.gate),
                (LayerPart::UpProj, parts.up),
                (LayerPart::DownProj, parts.down),
            ] {
                let ys = unstack(&y, &lengths);
                let deltas = delta.map(|d| unstack(&d, &lengths));
                for (j, (out, y)) in outs.iter_mut().zip(ys).enumerate() {
                    if let (Some(d), Some(lora)) = (&deltas, part.lora()) {
                        out.put(site(lora), d[j].clone());
                    }
                    out.put(site(part), y);
                }
            }
            down
        } else {
            mlp.forward(&x, n)
        };
        for ((h, y), out) in hs.iter_mut().zip(unstack(&y, &lengths)).zip(outs.iter_mut()) {
            out.put(site(LayerPart::Mlp), y.clone());
            residual_add(h, &y, n);
            out.put(site(LayerPart::Output), h.clone());
        }
    }
}

/// The steps' `[batch, T_j, ·]` arrays side by side along `T` (one step's array as it is).
fn stack(xs: &[Array3<f64>]) -> Array3<f64> {
    match xs {
        [x] => x.clone(),
        _ => {
            let views: Vec<_> = xs.iter().map(Array3::view).collect();
            ndarray::concatenate(Axis(1), &views).expect("the steps share batch and width")
        }
    }
}

/// [`stack`] undone: `y` `[batch, Σ T_j, ·]` cut into the steps' `[batch, T_j, ·]`.
fn unstack(y: &Array3<f64>, lengths: &[usize]) -> Vec<Array3<f64>> {
    if let [_] = lengths {
        return vec![y.clone()];
    }
    let mut at = 0;
    lengths
        .iter()
        .map(|&t| {
            let part = y.slice(s![.., at..at + t, ..]).to_owned();
            at += t;
            part
        })
        .collect()
}

/// `h += y`, rounded at `RoundAt::Residual`. Both `[batch, T, hidden]`.
fn residual_add(h: &mut Array3<f64>, y: &Array3<f64>, n: &dyn Numerics) {
    Zip::from(&mut *h).and(y).for_each(|a, &b| *a += b);
    round_in_place(n, RoundAt::Residual, h);
}
