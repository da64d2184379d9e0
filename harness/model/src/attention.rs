//! Eager scaled-dot-product attention with grouped key/value heads.
//!
//! `probs = softmax(q·kᵀ · scale + mask)` over keys, `context = probs · v`, following HF
//! `eager_attention_forward`: `repeat_kv` maps query head `h` to key/value head
//! `h / n_rep` (`n_rep = nH / nKV`; MQA is `nKV = 1`), `scale = 1/sqrt(D)`, the additive
//! mask is added after scaling, and the softmax is taken in float32 then cast back
//! (`RoundAt::Probs`). Head mapping and scaling are fault seams.
//!
//! Rounding points, in order: the raw `q·kᵀ` (`RoundAt::ScoreProduct`, a batched
//! matmul's output), the scale as a constant of the compute dtype (`RoundAt::Weight`,
//! MindFormers' `inv_norm_factor` tensor), the scaled scores (`RoundAt::Scores`), scores
//! plus mask (`RoundAt::MaskedScores`), every softmax intermediate
//! (`RoundAt::SoftmaxStep`, the softmax's own dtype), the probabilities
//! (`RoundAt::Probs`) and the context (`RoundAt::Context`).
//!
//! Heads run in parallel (rayon), each computed whole by one task, so the result does
//! not depend on the thread count.

use ndarray::{s, Array2, Array3, Array4, ArrayView4};
use rayon::prelude::*;

use super::heads::merge_heads;
use super::numerics::{Numerics, RoundAt};
use super::plan::{HeadMapping, ScoreScale};

/// The key/value head read by query head `h`.
pub fn kv_head(h: usize, heads: usize, kv_heads: usize, mapping: HeadMapping) -> usize {
    match mapping {
        HeadMapping::Grouped => h / (heads / kv_heads),
        HeadMapping::Tiled => h % kv_heads,
    }
}

/// The scale applied to scores.
pub fn scale(head_dim: usize, rule: ScoreScale) -> f64 {
    match rule {
        ScoreScale::InvSqrtHeadDim => 1.0 / (head_dim as f64).sqrt(),
        ScoreScale::Unscaled => 1.0,
    }
}

/// Softmax of one row, max-subtracted.
pub fn softmax(row: &mut [f64]) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
}

/// Softmax of one row whose intermediates are stored at `RoundAt::SoftmaxStep`:
/// `e = exp(x - max)`, summed left to right, `e / sum`. Equal to [`softmax`] when the
/// numerics keep those values exact.
pub fn softmax_in(row: &mut [f64], n: &dyn Numerics) {
    if !n.rounds_at(RoundAt::SoftmaxStep) {
        return softmax(row);
    }
    let r = |x: f64| n.round(RoundAt::SoftmaxStep, x);
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = r(r(*x - m).exp());
        sum = r(sum + *x);
    }
    for x in row.iter_mut() {
        *x = r(*x / sum);
    }
}

/// `q` `[batch, heads, T, D]`, `k`/`v` `[batch, kv_heads, S, D]`, `mask` `[batch, 1, T, S]`
/// → `(probs [batch, heads, T, S], context [batch, T, heads·D])`.
pub fn eager(
    q: &Array4<f64>,
    k: ArrayView4<f64>,
    v: ArrayView4<f64>,
    mask: &Array4<f64>,
    scale: f64,
    mapping: HeadMapping,
    n: &dyn Numerics,
) -> (Array4<f64>, Array3<f64>) {
    let (b, heads, t, d) = q.dim();
    let (_, kv_heads, s_len, _) = k.dim();
    let scale = n.round(RoundAt::Weight, scale);
    // One (row, head) a task, in parallel; each head's arithmetic is the same whichever
    // thread runs it.
    let pairs: Vec<(usize, usize)> =
        (0..b).flat_map(|bi| (0..heads).map(move |h| (bi, h))).collect();
    let per_head: Vec<(Array2<f64>, Array2<f64>)> = pairs
        .par_iter()
        .map(|&(bi, h)| {
            let mut probs = Array2::zeros((t, s_len));
            let mut ctx = Array2::zeros((t, d));
            let mut row = vec![0.0; s_len];
            let kh = kv_head(h, heads, kv_heads, mapping);
            let keys = k.slice(s![bi, kh, .., ..]);
            let vals = v.slice(s![bi, kh, .., ..]);
            for ti in 0..t {
                let qv = q.slice(s![bi, h, ti, ..]);
                for (si, r) in row.iter_mut().enumerate() {
                    let dot = n.round(RoundAt::ScoreProduct, qv.dot(&keys.row(si)));
                    let sc = n.round(RoundAt::Scores, dot * scale);
                    *r = n.round(RoundAt::MaskedScores, sc + mask[[bi, 0, ti, si]]);
                }
                softmax_in(&mut row, n);
                for (si, r) in row.iter_mut().enumerate() {
                    *r = n.round(RoundAt::Probs, *r);
                    probs[[ti, si]] = *r;
                }
                // `probs · V`, each output summed over the keys in order, as
                // `ndarray`'s vector-matrix `dot` sums it, a row of `V` at a time.
                let mut c = ctx.row_mut(ti);
                for (&p, vr) in row.iter().zip(vals.outer_iter()) {
                    c.zip_mut_with(&vr, |c, &v| *c += v * p);
                }
                c.mapv_inplace(|x| n.round(RoundAt::Context, x));
            }
            (probs, ctx)
        })
        .collect();
    let mut probs = Array4::zeros((b, heads, t, s_len));
    let mut ctx = Array4::zeros((b, heads, t, d));
    for (&(bi, h), (p, c)) in pairs.iter().zip(per_head) {
        probs.slice_mut(s![bi, h, .., ..]).assign(&p);
        ctx.slice_mut(s![bi, h, .., ..]).assign(&c);
    }
    (probs, merge_heads(&ctx))
}
