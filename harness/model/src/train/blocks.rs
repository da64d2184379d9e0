//! The backward of each block of the Llama forward, written from the formulas (the
//! adjoint of each HF op the forward composes), one function a block:
//!
//! - RMSNorm `y = w · x·r`, `r = (mean(x²) + eps)^-½`:
//!   `dw = Σ dy·x̂`, `dx = r·(g − x̂·mean(g·x̂))` with `g = dy·w`; LayerNorm (the
//!   `norm.layernorm` variant) subtracts the mean of that; `norm.eps_outside`'s
//!   `x / (sqrt(mean(x²)) + eps)` has its own adjoint;
//! - linear `y = x·Wᵀ + b + s·B(A x)`: `dx = dy·W + s·(dy·B)·A`, `dW = dyᵀ·x`,
//!   `db = Σ dy`, `dB = s·dyᵀ·(A x)`, `dA = (s·dy·B)ᵀ·x`;
//! - attention `P = softmax(q·kᵀ·c + mask)`, `ctx = P·v` with query head `h` reading
//!   key/value head `h / (nH/nKV)`: `dP = dctx·vᵀ`, `dS = P·(dP − Σ P·dP)`,
//!   `dq = c·dS·k`, and `dk = c·dSᵀ·q`, `dv = Pᵀ·dctx` summed over the query heads that
//!   share a key/value head (HF `repeat_kv`'s adjoint); the additive mask passes the
//!   gradient through;
//! - RoPE `x·cos + rotate_half(x)·sin`: the rotation's transpose,
//!   `dx = dy·cos + rotate_half_ᵀ(dy·sin)`;
//! - SwiGLU `m = silu(g)·u`: `dg = dm·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = dm·silu(g)`;
//! - embedding: `dE[id] += dh` (scatter-add), none for the padding index.
//!
//! Each result is stored as the run's [`Storage`] says (nothing rounded in float64).

use ndarray::{
    linalg::general_mat_mul, s, Array1, Array2, Array3, Array4, ArrayView2, ArrayView3, Axis, Zip,
};
use rayon::prelude::*;

use crate::attention::kv_head;
use crate::heads::{merge_heads, split_heads};
use crate::linear::{Linear, Matrix, ROW_BLOCK};
use crate::mlp::silu;
use crate::numerics::{Numerics, RoundAt};
use crate::plan::{HeadMapping, NormKind, RopeLayout};

use super::Storage;

/// Columns of the input dimension computed by one task of [`matmul_n`].
const COL_BLOCK: usize = 512;

/// `dy · W`: `dy` `[m, out]`, `w` `[out, in]` → `[m, in]` (the input gradient of a
/// linear layer), in float64. The weight is read a block at a time (stored at
/// `RoundAt::Weight`, as the forward read it); column blocks run in parallel, each
/// summing its row blocks in order, so the result does not depend on the thread count.
pub fn matmul_n(w: &Matrix, dy: ArrayView2<f64>, n: &dyn Numerics) -> Array2<f64> {
    let (rows, cols, m) = (w.nrows(), w.ncols(), dy.nrows());
    let cblocks: Vec<usize> = (0..cols.div_ceil(COL_BLOCK)).collect();
    let parts: Vec<Array2<f64>> = cblocks
        .par_iter()
        .map(|&cb| {
            let (c0, c1) = (cb * COL_BLOCK, ((cb + 1) * COL_BLOCK).min(cols));
            let mut acc = Array2::zeros((m, c1 - c0));
            for r0 in (0..rows).step_by(ROW_BLOCK) {
                let r1 = (r0 + ROW_BLOCK).min(rows);
                let wb = w.block((r0, r1), (c0, c1), n);
                general_mat_mul(1.0, &dy.slice(s![.., r0..r1]), &wb, 1.0, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = Array2::zeros((m, cols));
    for (cb, p) in parts.into_iter().enumerate() {
        let c0 = cb * COL_BLOCK;
        out.slice_mut(s![.., c0..c0 + p.ncols()]).assign(&p);
    }
    out
}

/// `[batch, seq, f]` → `[batch·seq, f]` (a copy only when not contiguous).
pub fn flat(x: &Array3<f64>) -> Array2<f64> {
    let (b, t, f) = x.dim();
    x.as_standard_layout().into_owned().into_shape_with_order((b * t, f)).expect("b·t rows")
}

/// RMSNorm's (or the planned variant's) backward: `x` the input `[batch, seq, H]`,
/// `weight` `[H]` as applied, `dy` the gradient of the output → `(dx, dweight)`.
pub fn rms_norm(
    x: &Array3<f64>,
    weight: &Array1<f64>,
    eps: f64,
    kind: NormKind,
    dy: &Array3<f64>,
    st: Storage,
) -> (Array3<f64>, Array1<f64>) {
    let h = x.len_of(Axis(2));
    let hf = h as f64;
    let mut dx = Array3::zeros(x.raw_dim());
    let mut dw = Array1::zeros(h);
    let n = st.numerics;
    for ((xr, dyr), mut dxr) in
        x.lanes(Axis(2)).into_iter().zip(dy.lanes(Axis(2))).zip(dx.lanes_mut(Axis(2)))
    {
        let mean = if kind == NormKind::LayerNorm { xr.sum() / hf } else { 0.0 };
        let xc: Vec<f64> = xr.iter().map(|v| v - mean).collect();
        let var = n.round(RoundAt::NormVariance, xc.iter().map(|v| v * v).sum::<f64>() / hf);
        // The normalized value as the forward stored it, and its derivative's factors.
        let (den, sd) = match kind {
            NormKind::Rms | NormKind::LayerNorm => ((var + eps).sqrt(), 0.0),
            NormKind::EpsOutside => (var.sqrt() + eps, var.sqrt()),
        };
        let xhat: Vec<f64> = xc.iter().map(|v| n.round(RoundAt::NormNormalized, v / den)).collect();
        let g: Vec<f64> = dyr.iter().zip(weight).map(|(d, w)| d * w).collect();
        for j in 0..h {
            dw[j] += dyr[j] * xhat[j];
        }
        let dxc: Vec<f64> = match kind {
            NormKind::Rms | NormKind::LayerNorm => {
                let dot = g.iter().zip(&xc).map(|(g, x)| g * x / den).sum::<f64>() / hf;
                g.iter().zip(&xc).map(|(g, x)| (g - x / den * dot) / den).collect()
            }
            NormKind::EpsOutside => {
                let dot = g.iter().zip(&xc).map(|(g, x)| g * x).sum::<f64>();
                let k = if sd > 0.0 { dot / (den * den * sd * hf) } else { 0.0 };
                g.iter().zip(&xc).map(|(g, x)| g / den - x * k).collect()
            }
        };
        let shift = if kind == NormKind::LayerNorm { dxc.iter().sum::<f64>() / hf } else { 0.0 };
        for (d, v) in dxr.iter_mut().zip(&dxc) {
            *d = v - shift;
        }
    }
    st.act(&mut dx);
    st.prod(&mut dw);
    (dx, dw)
}

/// Which parameter gradients a linear layer's backward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    /// The weight (and bias) of the dense layer.
    pub dense: bool,
    /// The LoRA factors.
    pub adapter: bool,
}

/// What a linear layer's backward gives.
#[derive(Debug, Clone)]
pub struct LinearGrads {
    /// `[batch, seq, in]`
    pub dx: Array3<f64>,
    /// `[out, in]`
    pub weight: Option<Array2<f64>>,
    /// `[out]`
    pub bias: Option<Array1<f64>>,
    /// `[r, in]`
    pub lora_a: Option<Array2<f64>>,
    /// `[out, r]`
    pub lora_b: Option<Array2<f64>>,
}

/// A linear layer's backward: `x` its input `[batch, seq, in]`, `ax` the LoRA rank
/// product `A(x)` `[batch·seq, r]` the forward kept (with a bypass), `dy` the gradient
/// of its output `[batch, seq, out]`.
pub fn linear(
    lin: &Linear,
    x: &Array3<f64>,
    ax: Option<&Array2<f64>>,
    dy: &Array3<f64>,
    want: Wants,
    st: Storage,
) -> LinearGrads {
    let n = st.numerics;
    let (b, t, _) = dy.dim();
    let dy2 = flat(dy);
    let mut dx = matmul_n(&lin.weight, dy2.view(), n);
    st.prod(&mut dx);
    let x2 = (want.dense || want.adapter).then(|| flat(x));
    let (mut weight, mut bias) = (None, None);
    if want.dense {
        let mut dw = dy2.t().dot(x2.as_ref().expect("input kept"));
        st.prod(&mut dw);
        weight = Some(dw);
        if lin.bias.is_some() {
            let mut db = dy2.sum_axis(Axis(0));
            st.prod(&mut db);
            bias = Some(db);
        }
    }
    let (mut lora_a, mut lora_b) = (None, None);
    if let (Some(l), Some(ax)) = (&lin.lora, ax) {
        // result + lora_B(lora_A(x)) · s: the product's gradient is dy · s.
        let s = st.constant(l.scaling);
        let mut v = dy2.mapv(|d| d * s);
        st.act(&mut v);
        let mut du = matmul_n(&l.b, v.view(), n);
        st.prod(&mut du);
        let mut dxl = matmul_n(&l.a, du.view(), n);
        st.prod(&mut dxl);
        dx += &dxl;
        st.act(&mut dx);
        if want.adapter {
            let mut db = v.t().dot(ax);
            st.prod(&mut db);
            let mut da = du.t().dot(x2.as_ref().expect("input kept"));
            st.prod(&mut da);
            lora_a = Some(da);
            lora_b = Some(db);
        }
    }
    let dx = dx.into_shape_with_order((b, t, lin.in_features())).expect("b·t rows");
    LinearGrads { dx, weight, bias, lora_a, lora_b }
}

/// What attention's backward gives.
#[derive(Debug, Clone)]
pub struct AttentionGrads {
    /// `[batch, heads, T, S]`: the gradient of the probabilities.
    pub probs: Array4<f64>,
    /// `[batch, heads, T, D]`: of the rotated queries.
    pub q: Array4<f64>,
    /// `[batch, kv_heads, S, D]`: of the rotated keys, summed over the sharing heads.
    pub k: Array4<f64>,
    /// `[batch, kv_heads, S, D]`: of the values.
    pub v: Array4<f64>,
}

/// Eager attention's backward: `q` `[batch, heads, T, D]`, `k`, `v`
/// `[batch, kv_heads, S, D]`, `probs` `[batch, heads, T, S]` as the forward stored them,
/// `dctx` the gradient of the context `[batch, T, heads·D]`; `scale` the score scale.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Array4<f64>,
    k: &Array4<f64>,
    v: &Array4<f64>,
    probs: &Array4<f64>,
    dctx: &Array3<f64>,
    scale: f64,
    mapping: HeadMapping,
    st: Storage,
) -> AttentionGrads {
    let (b, heads, t, d) = q.dim();
    let kv_heads = k.dim().1;
    let scale = st.constant(scale);
    let dctx = split_heads(dctx, heads);
    let pairs: Vec<(usize, usize)> =
        (0..b).flat_map(|bi| (0..heads).map(move |h| (bi, h))).collect();
    type HeadGrads = (Array2<f64>, Array2<f64>, Array2<f64>, Array2<f64>);
    let per_head: Vec<HeadGrads> = pairs
        .par_iter()
        .map(|&(bi, h)| {
            let kh = kv_head(h, heads, kv_heads, mapping);
            let p = probs.slice(s![bi, h, .., ..]);
            let dc = dctx.slice(s![bi, h, .., ..]);
            let keys = k.slice(s![bi, kh, .., ..]);
            let vals = v.slice(s![bi, kh, .., ..]);
            let mut dp = dc.dot(&vals.t());
            st.prod(&mut dp);
            let mut dv = p.t().dot(&dc);
            st.prod(&mut dv);
            // Softmax's adjoint in its own dtype, cast back; then the scale.
            let mut ds = Array2::zeros(dp.raw_dim());
            for ((pr, dpr), mut dsr) in p.outer_iter().zip(dp.outer_iter()).zip(ds.outer_iter_mut())
            {
                let dot = st.softmax(pr.iter().zip(&dpr).map(|(a, b)| a * b).sum::<f64>());
                for ((o, &pv), &dv) in dsr.iter_mut().zip(&pr).zip(&dpr) {
                    *o = st.softmax(pv * (dv - dot));
                }
            }
            st.act(&mut ds);
            ds.mapv_inplace(|x| x * scale);
            st.act(&mut ds);
            let mut dq = ds.dot(&keys);
            st.prod(&mut dq);
            let mut dk = ds.t().dot(&q.slice(s![bi, h, .., ..]));
            st.prod(&mut dk);
            (dp, dq, dk, dv)
        })
        .collect();
    let s_len = k.dim().2;
    let mut g = AttentionGrads {
        probs: Array4::zeros((b, heads, t, s_len)),
        q: Array4::zeros((b, heads, t, d)),
        k: Array4::zeros((b, kv_heads, s_len, d)),
        v: Array4::zeros((b, kv_heads, s_len, d)),
    };
    for (&(bi, h), (dp, dq, dk, dv)) in pairs.iter().zip(per_head) {
        let kh = kv_head(h, heads, kv_heads, mapping);
        g.probs.slice_mut(s![bi, h, .., ..]).assign(&dp);
        g.q.slice_mut(s![bi, h, .., ..]).assign(&dq);
        let mut ks = g.k.slice_mut(s![bi, kh, .., ..]);
        ks += &dk;
        let mut vs = g.v.slice_mut(s![bi, kh, .., ..]);
        vs += &dv;
    }
    st.act(&mut g.k);
    st.act(&mut g.v);
    g
}

/// RoPE's backward: `dy` the gradient of the rotated tensor `[batch, heads, T, D]`,
/// `cos`, `sin` `[batch, T, D]` as applied → the gradient of its input (the rotation's
/// transpose).
pub fn rope(
    dy: &Array4<f64>,
    cos: ArrayView3<f64>,
    sin: ArrayView3<f64>,
    layout: RopeLayout,
    st: Storage,
) -> Array4<f64> {
    let (b, h, t, d) = dy.dim();
    let half = d / 2;
    let mut dx = Array4::zeros((b, h, t, d));
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let g = dy.slice(s![bi, hi, ti, ..]);
                let c = cos.slice(s![bi, ti, ..]);
                let sn = sin.slice(s![bi, ti, ..]);
                let mut o = dx.slice_mut(s![bi, hi, ti, ..]);
                match layout {
                    // out[j] = x[j]·c[j] + rot[j]·s[j], rot[j] = -x[j+half] (j < half),
                    // x[j-half] (j >= half).
                    RopeLayout::HalfSplit => {
                        for j in 0..d {
                            let other = if j < half {
                                g[j + half] * sn[j + half]
                            } else {
                                -g[j - half] * sn[j - half]
                            };
                            o[j] = g[j] * c[j] + other;
                        }
                    }
                    RopeLayout::Interleaved | RopeLayout::InterleavedSliced => {
                        let stride = if layout == RopeLayout::Interleaved { 1 } else { 2 };
                        for k in 0..half {
                            let (g0, g1) = (g[2 * k], g[2 * k + 1]);
                            let (ck, sk) = (c[stride * k], sn[stride * k]);
                            o[2 * k] = g0 * ck + g1 * sk;
                            o[2 * k + 1] = g1 * ck - g0 * sk;
                        }
                    }
                }
            }
        }
    }
    st.act(&mut dx);
    dx
}

/// SwiGLU's backward: `gate`, `up` `[batch, seq, I]` as the forward stored them, `dm` the
/// gradient of `silu(gate)·up` → `(dgate, dup)`.
pub fn swiglu(
    gate: &Array3<f64>,
    up: &Array3<f64>,
    dm: &Array3<f64>,
    st: Storage,
) -> (Array3<f64>, Array3<f64>) {
    let mut dg = Array3::zeros(gate.raw_dim());
    let mut du = Array3::zeros(up.raw_dim());
    Zip::from(&mut dg).and(&mut du).and(gate).and(up).and(dm).for_each(|dg, du, &g, &u, &m| {
        let sg = 1.0 / (1.0 + (-g).exp());
        *du = m * silu(g);
        *dg = m * u * sg * (1.0 + g * (1.0 - sg));
    });
    st.act(&mut dg);
    st.act(&mut du);
    (dg, du)
}

/// The embedding's backward: `dh` `[batch, seq, H]` scattered onto the rows of `ids`
/// (`[batch][seq]`) of a `[vocab, H]` gradient, summed where a token repeats. The row of
/// `padding_idx` gets none (`nn.Embedding(vocab, H, padding_idx)`, which HF's
/// `LlamaModel` builds with `config.pad_token_id`), wherever that token occurs.
pub fn embedding(
    ids: &[Vec<i64>],
    dh: &Array3<f64>,
    vocab: usize,
    padding_idx: Option<usize>,
    st: Storage,
) -> Array2<f64> {
    let h = dh.len_of(Axis(2));
    let mut de = Array2::zeros((vocab, h));
    for (bi, row) in ids.iter().enumerate() {
        for (ti, &id) in row.iter().enumerate() {
            if Some(id as usize) == padding_idx {
                continue;
            }
            let mut r = de.row_mut(id as usize);
            r += &dh.slice(s![bi, ti, ..]);
        }
    }
    st.prod(&mut de);
    de
}

/// `[batch, heads, seq, D]` → `[batch, seq, heads·D]`: the gradient of a split tensor
/// seen by the projection that made it.
pub fn merged(x: &Array4<f64>) -> Array3<f64> {
    merge_heads(x)
}
