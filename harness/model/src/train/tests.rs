//! Every block's backward against central differences of its forward, in float64,
//! on random small shapes (fixed seeds): RMSNorm and its variants, the linear layer with
//! its LoRA bypass, attention with a causal and padding mask and GQA, RoPE in each
//! layout, SwiGLU, the embedding, the cross entropy (shift, -100, micro-batches), and the
//! whole tiny model's parameter gradients (everything trained, or the adapter).

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Array3, Array4, ArrayD, Zip};
use proptest::prelude::*;

use contract::fault::Component;
use dump::{ModelConfig, Precision, Scenario, Trainable};

use crate::attention;
use crate::embedding::Embedding;
use crate::linear::{Linear, Matrix};
use crate::llama::Llama;
use crate::lora::Lora;
use crate::mask;
use crate::mlp::silu;
use crate::numerics::Exact;
use crate::plan::{HeadMapping, MaskRule, NormBeta, NormKind, Plan, RopeLayout};
use crate::rms_norm::RmsNorm;
use crate::rng::SplitMix64;
use crate::rope::{self, Rope, RopeConfig};
use crate::weights::Weights;

use super::backward::{backward, Trainables};
use super::blocks::{self, Wants};
use super::loss::{cross_entropy, LossRule};
use super::tape::{self, forward};
use super::Storage;

const EXACT: Exact = Exact { mask_dtype: Precision::F32 };

fn st() -> Storage<'static> {
    Storage::exact(&EXACT)
}

fn config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: 12,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x7a11_9ad5),
        ..proptest::test_runner::Config::default()
    }
}

fn rand<D: ndarray::Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    r: &mut SplitMix64,
    shape: Sh,
) -> ndarray::Array<f64, D> {
    ndarray::Array::from_shape_simple_fn(shape, || r.uniform_pm1())
}

/// `Σ r ⊙ y`: a scalar whose gradient with respect to `y` is `r`.
fn dot<D: ndarray::Dimension>(r: &ndarray::Array<f64, D>, y: &ndarray::Array<f64, D>) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Checks `analytic` against the central difference of `f` in every element of `x`
/// (or `limit` of them, evenly spaced): `|fd − an| <= 1e-6 · max(|fd|, |an|, scale)`,
/// `scale` the largest analytic magnitude (so near-zero elements are judged against
/// the gradient's size).
fn check<D: ndarray::Dimension>(
    what: &str,
    x: &ndarray::Array<f64, D>,
    analytic: &ndarray::Array<f64, D>,
    limit: usize,
    f: impl Fn(&ndarray::Array<f64, D>) -> f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(x.shape(), analytic.shape(), "{}", what);
    let scale = analytic.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let len = x.len();
    let stride = len.div_ceil(limit.max(1)).max(1);
    let flat_an: Vec<f64> = analytic.iter().copied().collect();
    for i in (0..len).step_by(stride) {
        let mut xp = x.clone();
        let x0 = xp
            .as_slice_memory_order()
            .map(|s| s[i])
            .unwrap_or_else(|| x.iter().nth(i).copied().unwrap_or(0.0));
        let h = 1e-5 * x0.abs().max(1.0);
        let set = |a: &mut ndarray::Array<f64, D>, v: f64| {
            if let Some(s) = a.as_slice_memory_order_mut() {
                s[i] = v;
            }
        };
        set(&mut xp, x0 + h);
        let up = f(&xp);
        set(&mut xp, x0 - h);
        let down = f(&xp);
        let fd = (up - down) / (2.0 * h);
        let an = flat_an[i];
        let tol = 1e-6 * fd.abs().max(an.abs()).max(scale);
        prop_assert!((fd - an).abs() <= tol, "{what}[{i}]: central difference {fd}, analytic {an}");
    }
    Ok(())
}

const KINDS: [NormKind; 3] = [NormKind::Rms, NormKind::LayerNorm, NormKind::EpsOutside];
const LAYOUTS: [RopeLayout; 3] =
    [RopeLayout::HalfSplit, RopeLayout::Interleaved, RopeLayout::InterleavedSliced];

fn owned_linear(
    w: &Array2<f64>,
    b: Option<&Array1<f64>>,
    lora: Option<(&Array2<f64>, &Array2<f64>, f64)>,
) -> Linear {
    Linear {
        weight: Matrix::Owned(w.clone()),
        bias: b.cloned(),
        lora: lora.map(|(a, bb, s)| Lora {
            a: Matrix::Owned(a.clone()),
            b: Matrix::Owned(bb.clone()),
            scaling: s,
        }),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn rms_norm_backward_matches_central_differences(
        seed in any::<u64>(), b in 1usize..3, t in 1usize..4, h in 2usize..9, k in 0usize..3,
    ) {
        let mut r = SplitMix64::new(seed);
        let (x, w, dy) = (rand(&mut r, (b, t, h)), rand(&mut r, h), rand(&mut r, (b, t, h)));
        let kind = KINDS[k];
        let eps = 1e-5;
        let norm = |x: &Array3<f64>, w: &Array1<f64>| {
            RmsNorm { weight: w, eps, kind, beta: NormBeta::Absent }.forward(x, &EXACT)
        };
        let (dx, dw) = blocks::rms_norm(&x, &w, eps, kind, &dy, st());
        check("dx", &x, &dx, 64, |x| dot(&dy, &norm(x, &w)))?;
        check("dweight", &w, &dw, 64, |w| dot(&dy, &norm(&x, w)))?;
    }

    #[test]
    fn lora_projection_backward_matches_central_differences(
        seed in any::<u64>(), b in 1usize..3, t in 1usize..4, inp in 1usize..7, out in 1usize..7,
        rank in 1usize..4, bias in any::<bool>(),
    ) {
        let mut r = SplitMix64::new(seed);
        let x = rand(&mut r, (b, t, inp));
        let w = rand(&mut r, (out, inp));
        let bv: Array1<f64> = rand(&mut r, out);
        let a = rand(&mut r, (rank, inp));
        let bb = rand(&mut r, (out, rank));
        let s = 0.5 + r.uniform_pm1().abs();
        let dy = rand(&mut r, (b, t, out));
        let bias = bias.then_some(&bv);
        let run = |x: &Array3<f64>, w: &Array2<f64>, bv: Option<&Array1<f64>>, a: &Array2<f64>, bb: &Array2<f64>| {
            dot(&dy, &tape::project(&owned_linear(w, bv, Some((a, bb, s))), x, &EXACT).y)
        };
        let lin = owned_linear(&w, bias, Some((&a, &bb, s)));
        let p = tape::project(&lin, &x, &EXACT);
        let g = blocks::linear(&lin, &x, p.ax.as_ref(), &dy, Wants { dense: true, adapter: true }, st());
        check("dx", &x, &g.dx, 64, |x| run(x, &w, bias, &a, &bb))?;
        check("dweight", &w, g.weight.as_ref().expect("dense"), 64, |w| run(&x, w, bias, &a, &bb))?;
        if let Some(bv) = bias {
            check("dbias", bv, g.bias.as_ref().expect("bias"), 64, |bv| run(&x, &w, Some(bv), &a, &bb))?;
        }
        check("dlora_A", &a, g.lora_a.as_ref().expect("A"), 64, |a| run(&x, &w, bias, a, &bb))?;
        check("dlora_B", &bb, g.lora_b.as_ref().expect("B"), 64, |bb| run(&x, &w, bias, &a, bb))?;
    }

    #[test]
    fn gqa_attention_with_causal_and_padding_mask_backward_matches_central_differences(
        seed in any::<u64>(), b in 1usize..3, kv in 1usize..3, rep in 1usize..3, t in 1usize..5,
        d in 1usize..4, pad in 0usize..3, tiled in any::<bool>(), unscaled in any::<bool>(),
    ) {
        let mut r = SplitMix64::new(seed);
        let heads = kv * rep;
        let q = rand(&mut r, (b, heads, t, d));
        let k = rand(&mut r, (b, kv, t, d));
        let v = rand(&mut r, (b, kv, t, d));
        let dctx = rand(&mut r, (b, t, heads * d));
        // Row 0 left-padded by `pad` slots; a moderate fill keeps every row differentiable
        // (rows fully hidden stay uniform, as in HF, and their gradient passes through).
        let valid: Vec<Vec<bool>> = (0..b).map(|bi| (0..t).map(|ti| bi > 0 || ti >= pad).collect()).collect();
        let m = mask::additive(&valid, 0, t, MaskRule::CausalPadded, -30.0);
        let mapping = if tiled { HeadMapping::Tiled } else { HeadMapping::Grouped };
        let scale = if unscaled { 1.0 } else { 1.0 / (d as f64).sqrt() };
        let ctx = |q: &Array4<f64>, k: &Array4<f64>, v: &Array4<f64>| {
            attention::eager(q, k.view(), v.view(), &m, scale, mapping, &EXACT)
        };
        let (probs, _) = ctx(&q, &k, &v);
        let g = blocks::attention(&q, &k, &v, &probs, &dctx, scale, mapping, st());
        check("dq", &q, &g.q, 64, |q| dot(&dctx, &ctx(q, &k, &v).1))?;
        check("dk", &k, &g.k, 64, |k| dot(&dctx, &ctx(&q, k, &v).1))?;
        check("dv", &v, &g.v, 64, |v| dot(&dctx, &ctx(&q, &k, v).1))?;
        // d ctx / d probs = v: the probabilities' gradient is dctx · vᵀ per head.
        let dp = Array4::from_shape_fn(probs.dim(), |(bi, h, i, j)| {
            let kh = attention::kv_head(h, heads, kv, mapping);
            (0..d).map(|e| dctx[[bi, i, h * d + e]] * v[[bi, kh, j, e]]).sum::<f64>()
        });
        prop_assert!(Zip::from(&dp).and(&g.probs).all(|a, b| (a - b).abs() <= 1e-12 * (1.0 + a.abs())));
    }

    #[test]
    fn rope_backward_is_the_rotation_transpose_by_central_differences(
        seed in any::<u64>(), b in 1usize..3, h in 1usize..3, t in 1usize..4, half in 1usize..4,
        l in 0usize..3, theta_i in 0usize..2,
    ) {
        let mut r = SplitMix64::new(seed);
        let d = 2 * half;
        let x = rand(&mut r, (b, h, t, d));
        let dy = rand(&mut r, (b, h, t, d));
        let positions = Array2::from_shape_fn((b, t), |_| r.below(40) as i64);
        let theta = [10000.0, 500000.0][theta_i];
        let mut rope = Rope::new(RopeConfig::plain(theta, d, 64), Default::default(), Default::default());
        let (cos, sin) = rope.tables(&positions, &EXACT);
        let layout = LAYOUTS[l];
        let dx = blocks::rope(&dy, cos.view(), sin.view(), layout, st());
        check("dx", &x, &dx, 64, |x| dot(&dy, &rope::apply(x, cos.view(), sin.view(), layout, &EXACT)))?;
    }

    #[test]
    fn swiglu_backward_matches_central_differences(
        seed in any::<u64>(), b in 1usize..3, t in 1usize..4, i in 1usize..9,
    ) {
        let mut r = SplitMix64::new(seed);
        let g: Array3<f64> = rand(&mut r, (b, t, i)).mapv(|v| 3.0 * v);
        let u = rand(&mut r, (b, t, i));
        let dm = rand(&mut r, (b, t, i));
        let f = |g: &Array3<f64>, u: &Array3<f64>| {
            let mut m = g.clone();
            Zip::from(&mut m).and(u).for_each(|a, &u| *a = silu(*a) * u);
            dot(&dm, &m)
        };
        let (dg, du) = blocks::swiglu(&g, &u, &dm, st());
        check("dgate", &g, &dg, 64, |g| f(g, &u))?;
        check("dup", &u, &du, 64, |u| f(&g, u))?;
    }

    #[test]
    fn embedding_backward_scatter_adds_repeated_tokens_by_central_differences(
        seed in any::<u64>(), b in 1usize..3, t in 1usize..5, vocab in 1usize..6, h in 1usize..5,
        padded in any::<bool>(),
    ) {
        let mut r = SplitMix64::new(seed);
        let e = rand(&mut r, (vocab, h));
        let ids: Vec<Vec<i64>> = (0..b).map(|_| (0..t).map(|_| r.below(vocab as u64) as i64).collect()).collect();
        let dh = rand(&mut r, (b, t, h));
        // The padding row gets no gradient (torch's `padding_idx`): its forward value is
        // then held fixed in the differences too.
        let padding_idx = padded.then_some(0);
        let de = blocks::embedding(&ids, &dh, vocab, padding_idx, st());
        prop_assert!(!padded || de.row(0).iter().all(|&x| x == 0.0));
        check("dembedding", &e, &de, 64, |e| {
            let mut e = e.clone();
            if padded {
                e.row_mut(0).assign(&Array1::zeros(h));
            }
            let m = Matrix::Owned(e);
            dot(&dh, &Embedding { weight: &m }.forward(&ids, &EXACT).expect("ids in range"))
        })?;
    }

    #[test]
    fn shifted_cross_entropy_ignoring_minus_100_matches_central_differences(
        seed in any::<u64>(), half_b in 1usize..3, t in 2usize..5, v in 2usize..7,
        split in any::<bool>(), unshifted in any::<bool>(), counted in any::<bool>(), summed in any::<bool>(),
    ) {
        let mut r = SplitMix64::new(seed);
        let b = 2 * half_b;
        let logits: Array3<f64> = rand(&mut r, (b, t, v)).mapv(|x| 4.0 * x);
        // Position 1 of every row is labelled (each micro-batch counts a label either way).
        let labels: Vec<Vec<i64>> = (0..b)
            .map(|_| (0..t).map(|ti| if ti != 1 && r.below(3) == 0 { -100 } else { r.below(v as u64) as i64 }).collect())
            .collect();
        let rule = LossRule { unshifted, count_ignored: counted, summed };
        let n = if split { 2 } else { 1 };
        let scale = 8.0;
        let l = cross_entropy(&logits, &labels, n, rule, scale, st()).expect("labels in range");
        let loss = |z: &Array3<f64>| {
            scale * cross_entropy(z, &labels, n, rule, 1.0, st()).expect("labels in range").value
        };
        if summed {
            // Summed micro-batches: the gradient is N times the mean loss's.
            let mean = l.dlogits.mapv(|x| x / n as f64);
            check("dlogits", &logits, &mean, 64, loss)?;
        } else {
            check("dlogits", &logits, &l.dlogits, 64, loss)?;
        }
        // The shift: with labels shifted the last position has no target.
        if !unshifted {
            prop_assert!(l.dlogits.slice(ndarray::s![.., t - 1, ..]).iter().all(|&x| x == 0.0));
        }
    }
}

// ---- The whole tiny model ----

fn tiny_config(tied: bool, layers: usize) -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 2, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tied
    }))
    .expect("config")
}

/// Every matrix widened and owned, so a test can perturb it.
fn owned(mut w: Weights, tied: bool) -> Weights {
    let own = |m: &mut Matrix| *m = Matrix::Owned(m.to_array());
    own(&mut w.embed_tokens);
    for l in &mut w.layers {
        for p in [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ] {
            own(&mut p.weight);
        }
    }
    own(&mut w.lm_head.weight);
    if tied {
        w.lm_head.weight = w.embed_tokens.clone();
    }
    w
}

fn projection(l: &mut crate::weights::LayerWeights, c: Component) -> &mut Linear {
    match c {
        Component::QProj => &mut l.q_proj,
        Component::KProj => &mut l.k_proj,
        Component::VProj => &mut l.v_proj,
        Component::OProj => &mut l.o_proj,
        Component::GateProj => &mut l.gate_proj,
        Component::UpProj => &mut l.up_proj,
        _ => &mut l.down_proj,
    }
}

const PROJ: [Component; 7] = [
    Component::QProj,
    Component::KProj,
    Component::VProj,
    Component::OProj,
    Component::GateProj,
    Component::UpProj,
    Component::DownProj,
];

/// The parameter `name` of `w` (HF names; `lora.{i}.{c}.A` / `.B` for an adapter).
fn param(w: &mut Weights, name: &str) -> ArrayD<f64> {
    let get = |m: &Matrix| m.to_array().into_dyn();
    if name == "model.embed_tokens.weight" {
        return get(&w.embed_tokens);
    }
    if name == "lm_head.weight" {
        return get(&w.lm_head.weight);
    }
    if name == "model.norm.weight" {
        return w.norm.clone().into_dyn();
    }
    let (i, rest) = parse(name);
    let l = &mut w.layers[i];
    match rest {
        "input_layernorm.weight" => l.input_layernorm.clone().into_dyn(),
        "post_attention_layernorm.weight" => l.post_attention_layernorm.clone().into_dyn(),
        _ => {
            let (c, leaf) = component(rest);
            let lin = projection(l, c);
            match leaf {
                "weight" => get(&lin.weight),
                "lora_A" => get(&lin.lora.as_ref().expect("adapted").a),
                _ => get(&lin.lora.as_ref().expect("adapted").b),
            }
        }
    }
}

fn set_param(w: &mut Weights, name: &str, v: &ArrayD<f64>, tied: bool) {
    let m = |v: &ArrayD<f64>| Matrix::Owned(v.clone().into_dimensionality().expect("2-d"));
    let vec = |v: &ArrayD<f64>| -> Array1<f64> { v.clone().into_dimensionality().expect("1-d") };
    if name == "model.embed_tokens.weight" {
        w.embed_tokens = m(v);
        if tied {
            w.lm_head.weight = m(v);
        }
        return;
    }
    if name == "lm_head.weight" {
        w.lm_head.weight = m(v);
        return;
    }
    if name == "model.norm.weight" {
        w.norm = vec(v);
        return;
    }
    let (i, rest) = parse(name);
    let l = &mut w.layers[i];
    match rest {
        "input_layernorm.weight" => l.input_layernorm = vec(v),
        "post_attention_layernorm.weight" => l.post_attention_layernorm = vec(v),
        _ => {
            let (c, leaf) = component(rest);
            let lin = projection(l, c);
            match leaf {
                "weight" => lin.weight = m(v),
                "lora_A" => lin.lora.as_mut().expect("adapted").a = m(v),
                _ => lin.lora.as_mut().expect("adapted").b = m(v),
            }
        }
    }
}

fn parse(name: &str) -> (usize, &str) {
    let n = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = n.strip_prefix("model.layers.").expect("a layer parameter");
    let (i, rest) = rest.split_once('.').expect("index");
    (i.parse().expect("index"), rest)
}

fn component(rest: &str) -> (Component, &str) {
    let (module, leaf) = rest.rsplit_once('.').expect("leaf");
    let (module, leaf) = match leaf {
        "weight" if module.ends_with("lora_A") || module.ends_with("lora_B") => {
            let (m, l) = module.rsplit_once('.').expect("lora");
            (m, l)
        }
        _ => (module, leaf),
    };
    let c = PROJ.iter().copied().find(|c| module.ends_with(c.name())).expect("a projection");
    (c, leaf)
}

struct TinyRun {
    cfg: ModelConfig,
    weights: Weights,
    scenario: Scenario,
    labels: Vec<Vec<i64>>,
    tied: bool,
}

impl TinyRun {
    fn new(seed: u64, tied: bool, layers: usize, batch: usize, t: usize, adapter: bool) -> TinyRun {
        let cfg = tiny_config(tied, layers);
        let mut weights = owned(Weights::random(&cfg, seed), tied);
        let mut r = SplitMix64::new(seed ^ 0x5eed);
        if adapter {
            for l in weights.layers.iter_mut() {
                l.adapted = true;
                for c in PROJ {
                    let lin = projection(l, c);
                    let rank = 1 + r.below(3) as usize;
                    let (o, i) = (lin.out_features(), lin.in_features());
                    lin.lora = Some(Lora {
                        a: Matrix::Owned(rand(&mut r, (rank, i))),
                        b: Matrix::Owned(rand(&mut r, (o, rank)).mapv(|x| 0.3 * x)),
                        scaling: 2.0 / rank as f64,
                    });
                }
            }
        }
        // Row 0 left-padded; a label only where neither the token nor its predecessor
        // is padding (a padding query's fully hidden row is uniform in HF whatever its
        // scores, so its gradient passes through a value the forward does not move).
        let pad: Vec<usize> = (0..batch).map(|b| if b == 0 { t.min(2) - 1 } else { 0 }).collect();
        let input_ids: Vec<Vec<i64>> =
            (0..batch).map(|_| (0..t).map(|_| r.below(11) as i64).collect()).collect();
        let attention_mask: Vec<Vec<i64>> =
            pad.iter().map(|&p| (0..t).map(|ti| i64::from(ti >= p)).collect()).collect();
        let labels = input_ids
            .iter()
            .zip(&pad)
            .map(|(row, &p)| {
                row.iter().enumerate().map(|(ti, &id)| if ti <= p { -100 } else { id }).collect()
            })
            .collect();
        let scenario: Scenario = serde_json::from_value(serde_json::json!({
            "name": "tiny", "input_ids": input_ids, "attention_mask": attention_mask
        }))
        .expect("scenario");
        TinyRun { cfg, weights, scenario, labels, tied }
    }

    fn model(&self, w: Weights) -> Llama {
        Llama::new(self.cfg.clone(), w, std::path::Path::new("tiny")).expect("tiny model")
    }

    fn loss(&self, w: &Weights, plan: &Plan) -> f64 {
        let model = self.model(w.clone());
        let tape = forward(&model, &self.scenario, &EXACT, plan).expect("forward");
        cross_entropy(&tape.logits, &self.labels, 1, LossRule::default(), 1.0, st())
            .expect("loss")
            .value
    }

    fn gradients(&self, trainables: &Trainables, plan: &Plan) -> BTreeMap<String, ArrayD<f64>> {
        let model = self.model(self.weights.clone());
        let tape = forward(&model, &self.scenario, &EXACT, plan).expect("forward");
        let l = cross_entropy(&tape.logits, &self.labels, 1, LossRule::default(), 1.0, st())
            .expect("loss");
        backward(&model, &tape, &self.scenario.input_ids, &l.dlogits, trainables, plan, st()).params
    }

    fn check_all(
        &self,
        grads: &BTreeMap<String, ArrayD<f64>>,
        plan: &Plan,
    ) -> Result<(), TestCaseError> {
        for (name, g) in grads {
            let mut w = self.weights.clone();
            let x = param(&mut w, name);
            check(name, &x, g, 24, |x| {
                let mut w = self.weights.clone();
                set_param(&mut w, name, x, self.tied);
                self.loss(&w, plan)
            })?;
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 10, ..config() })]

    #[test]
    fn whole_tiny_model_parameter_gradients_match_central_differences(
        seed in any::<u64>(), tied in any::<bool>(), layers in 1usize..3, t in 2usize..5,
        fault in 0usize..6,
    ) {
        let run = TinyRun::new(seed, tied, layers, 2, t, false);
        // The forward faults a training step plants change the function differentiated.
        let faults = [vec![], vec![contract::fault::Fault::NormLayernorm],
            vec![contract::fault::Fault::RopeInterleaved, contract::fault::Fault::AttnNoScale],
            vec![contract::fault::Fault::KvGqaTiled, contract::fault::Fault::NormEpsOutside],
            vec![contract::fault::Fault::MaskNone], vec![contract::fault::Fault::MaskPaddingIgnored]];
        let plan = Plan::new(&faults[fault]);
        let trainables = Trainables { trainable: Trainable::All, adapter_keys: BTreeMap::new() };
        let grads = run.gradients(&trainables, &plan);
        let expected = 1 + 9 * layers + 1 + usize::from(!tied);
        prop_assert_eq!(grads.len(), expected, "{:?}", grads.keys().collect::<Vec<_>>());
        run.check_all(&grads, &plan)?;
    }

    #[test]
    fn tiny_model_lora_gradients_match_central_differences(
        seed in any::<u64>(), layers in 1usize..3, t in 2usize..5,
    ) {
        let run = TinyRun::new(seed, false, layers, 2, t, true);
        let mut keys = BTreeMap::new();
        for i in 0..layers {
            for c in PROJ {
                let m = ::weights::adapter::module_name(i, c);
                keys.insert((i, c), (format!("base_model.model.{m}.lora_A.weight"), format!("base_model.model.{m}.lora_B.weight")));
            }
        }
        let trainables = Trainables { trainable: Trainable::Adapter, adapter_keys: keys };
        let plan = Plan::default();
        let grads = run.gradients(&trainables, &plan);
        prop_assert_eq!(grads.len(), 14 * layers);
        run.check_all(&grads, &plan)?;
    }
}
