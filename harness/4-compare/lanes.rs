//! The measures of a value site at memory speed: float32, bfloat16 and float16 lanes
//! decoded straight from the stored (memory-mapped) bytes, a block at a time, into
//! f64, with every metric of [`Accumulator`] and the per-token and per-head rel-L2
//! taken in one pass over the data.
//!
//! The tensor is walked in runs of consecutive elements that share their padding
//! filter, token row and head (the largest such run is the gcd of those axes'
//! strides), each run in blocks of at most [`BLOCK`] pairs. A block's sums are
//! accumulated in f64 (a product of two float32 values is exact in f64), its Pearson
//! co-moments about its own means, and blocks merge into the site's accumulator in
//! index order ([`Accumulator::absorb`]): the arithmetic is the same whatever thread
//! measures the site, so results are bit-identical from run to run.
//!
//! Any other dtype pair (float64 on either side) takes [`measure_simple`], the
//! element-by-element path, which is also the reference the fast one is tested against.
//! The error histogram is only reported for failing sites, so it is made by a second,
//! element-by-element pass over those ([`histogram`]).

use crate::compare::metrics::{Accumulator, Block, ErrorHistogram, GroupL2};
use crate::compare::verdict::{Groups, RowFilter};
use crate::dump::{DType, Tensor};

/// Pairs per block: two f64 buffers of this many values stay in the L1 cache.
pub const BLOCK: usize = 1024;

/// Independent accumulators per block (see `block_with`).
const LANES: usize = 4;

/// A site's accumulated measures, before [`Accumulator::finish`].
pub(crate) struct Measured {
    pub acc: Accumulator,
    pub per_token: Option<GroupL2>,
    pub per_head: Option<GroupL2>,
}

/// True for the dtypes the fast path decodes.
pub fn is_lane(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16 | DType::F16)
}

/// Measures the pairs of `g` and `c` (same shape) that `valid` keeps, with rel-L2 per
/// token row and per head when `tokens` / `heads` are given.
pub(crate) fn measure(
    g: &Tensor,
    c: &Tensor,
    valid: &RowFilter,
    tokens: Option<Groups>,
    heads: Option<Groups>,
) -> Measured {
    if !(is_lane(g.dtype()) && is_lane(c.dtype())) {
        return measure_simple(g, c, valid, tokens, heads);
    }
    let mut acc = Accumulator::new(c.dtype());
    let mut per_token = tokens.map(|t| GroupL2::new(t.n));
    let mut per_head = heads.map(|h| GroupL2::new(h.n));
    let numel = g.numel();
    let run = [valid.run(), tokens.map(|t| t.stride), heads.map(|h| h.stride)]
        .into_iter()
        .flatten()
        .fold(numel, gcd)
        .max(1);
    let eps = c.dtype().eps();
    let (gbytes, cbytes) = (g.bytes(), c.bytes());
    let (mut gb, mut cb, mut idx) = (vec![0.0; BLOCK], vec![0.0; BLOCK], vec![0usize; BLOCK]);
    let mut i0 = 0;
    while i0 < numel {
        let end = (i0 + run).min(numel);
        if valid.keep(i0) {
            let (mut sdd, mut sgg, mut broken) = (0.0, 0.0, false);
            let mut s = i0;
            while s < end {
                let len = (end - s).min(BLOCK);
                decode(g.dtype(), gbytes, s, &mut gb[..len]);
                decode(c.dtype(), cbytes, s, &mut cb[..len]);
                let b = block(c.dtype(), &mut gb[..len], &mut cb[..len], &mut idx, s, eps);
                sdd += b.sdd;
                sgg += b.sgg;
                broken |= b.new_nonfinite > 0;
                acc.absorb(&b);
                s += len;
            }
            if let (Some(t), Some(a)) = (tokens, per_token.as_mut()) {
                a.absorb(t.of(i0), sdd, sgg, broken);
            }
            if let (Some(h), Some(a)) = (heads, per_head.as_mut()) {
                a.absorb(h.of(i0), sdd, sgg, broken);
            }
        }
        i0 = end;
    }
    Measured { acc, per_token, per_head }
}

/// The element-by-element path: every pair widened with [`Tensor::get_f64`] and pushed
/// into the accumulators. Any dtype; the reference for [`measure`].
pub(crate) fn measure_simple(
    g: &Tensor,
    c: &Tensor,
    valid: &RowFilter,
    tokens: Option<Groups>,
    heads: Option<Groups>,
) -> Measured {
    let mut acc = Accumulator::new(c.dtype());
    let mut per_token = tokens.map(|t| GroupL2::new(t.n));
    let mut per_head = heads.map(|h| GroupL2::new(h.n));
    for i in 0..g.numel() {
        if valid.keep(i) {
            let (gv, cv) = (g.get_f64(i), c.get_f64(i));
            acc.push(i, gv, cv);
            if let (Some(t), Some(a)) = (tokens, per_token.as_mut()) {
                a.push(t.of(i), gv, cv);
            }
            if let (Some(h), Some(a)) = (heads, per_head.as_mut()) {
                a.push(h.of(i), gv, cv);
            }
        }
    }
    Measured { acc, per_token, per_head }
}

/// |c - g| by decade over the pairs `valid` keeps (a second pass, for failing sites).
pub(crate) fn histogram(g: &Tensor, c: &Tensor, valid: &RowFilter) -> ErrorHistogram {
    let mut h = ErrorHistogram::new();
    for i in 0..g.numel() {
        if valid.keep(i) {
            h.push(g.get_f64(i), c.get_f64(i));
        }
    }
    h
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Decodes elements `start..start + out.len()` of little-endian `bytes` of `dtype`.
fn decode(dtype: DType, bytes: &[u8], start: usize, out: &mut [f64]) {
    let n = out.len();
    match dtype {
        DType::F32 => {
            let b = &bytes[start * 4..(start + n) * 4];
            for (o, e) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([e[0], e[1], e[2], e[3]]) as f64;
            }
        }
        DType::BF16 => {
            let b = &bytes[start * 2..(start + n) * 2];
            for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([e[0], e[1]]) as u32) << 16) as f64;
            }
        }
        DType::F16 => {
            let b = &bytes[start * 2..(start + n) * 2];
            for (o, e) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f32() as f64;
            }
        }
        other => unreachable!("decode: {other} is not a lane dtype (checked by is_lane)"),
    }
}

/// Sign-magnitude bits to a line on which neighbouring values differ by one.
#[inline]
fn line(bits: u32, sign: u32) -> i64 {
    if bits & sign != 0 {
        -((bits & (sign - 1)) as i64)
    } else {
        bits as i64
    }
}

/// The statistics of one block, `g` and `c` decoded, the block starting at flat index
/// `start`; `idx` is scratch for the flat indices when non-finite pairs are dropped.
fn block(
    cand: DType,
    g: &mut [f64],
    c: &mut [f64],
    idx: &mut [usize],
    start: usize,
    eps: f64,
) -> Block {
    // The golden is rounded to the candidate's dtype for ULPs. Every lane value is exact
    // in float32, so rounding through f32 equals rounding the f64 directly.
    match cand {
        DType::F32 => block_with(g, c, idx, start, eps, |x| line((x as f32).to_bits(), 1 << 31)),
        DType::BF16 => block_with(g, c, idx, start, eps, |x| {
            line(half::bf16::from_f32(x as f32).to_bits() as u32, 1 << 15)
        }),
        _ => block_with(g, c, idx, start, eps, |x| {
            line(half::f16::from_f32(x as f32).to_bits() as u32, 1 << 15)
        }),
    }
}

#[inline(always)]
fn block_with(
    g: &mut [f64],
    c: &mut [f64],
    idx: &mut [usize],
    start: usize,
    eps: f64,
    key: impl Fn(f64) -> i64,
) -> Block {
    let mut b = Block::default();
    let mut n = g.len();
    let all_finite =
        g.iter().zip(c.iter()).fold(true, |ok, (x, y)| ok & x.is_finite() & y.is_finite());
    let compacted = !all_finite;
    if compacted {
        // Count NaN/Inf as Accumulator::push does, and keep the finite pairs in front.
        let mut m = 0;
        for k in 0..n {
            let (x, y) = (g[k], c[k]);
            b.golden_nan += x.is_nan() as u64;
            b.golden_inf += x.is_infinite() as u64;
            b.candidate_nan += y.is_nan() as u64;
            b.candidate_inf += y.is_infinite() as u64;
            if !y.is_finite() && (x.is_finite() || !(x == y || (x.is_nan() && y.is_nan()))) {
                b.new_nonfinite += 1;
            }
            if x.is_finite() && y.is_finite() {
                g[m] = x;
                c[m] = y;
                idx[m] = start + k;
                m += 1;
            }
        }
        n = m;
    }
    if n == 0 {
        return b;
    }
    let (g, c) = (&g[..n], &c[..n]);
    // LANES independent accumulators (pair k goes to lane k % LANES), combined in lane
    // order at the end: a fixed order of arithmetic the compiler can vectorize.
    let mut sum = [[0.0f64; LANES]; 7]; // Σg, Σc, Σg², Σc², Σgc, Σd², Σ|d|
    let (mut max_abs, mut at) = ([-1.0f64; LANES], [0usize; LANES]);
    let (mut max_rel, mut max_ulp) = ([0.0f64; LANES], [0u64; LANES]);
    let (mut below_1e3, mut below_5e3) = ([0u64; LANES], [0u64; LANES]);
    // A macro rather than a closure: the body must inline into the loops.
    macro_rules! pair {
        ($k:expr, $l:expr) => {{
            let (k, l): (usize, usize) = ($k, $l);
            let (x, y) = (g[k], c[k]);
            let d = y - x;
            let ad = d.abs();
            sum[0][l] += x;
            sum[1][l] += y;
            sum[2][l] += x * x;
            sum[3][l] += y * y;
            sum[4][l] += x * y;
            sum[5][l] += d * d;
            sum[6][l] += ad;
            if ad > max_abs[l] {
                max_abs[l] = ad;
                at[l] = k;
            }
            let rel = if x == 0.0 { ad / eps } else { ad / x.abs() };
            max_rel[l] = max_rel[l].max(rel);
            below_1e3[l] += (rel < 1e-3) as u64;
            below_5e3[l] += (rel < 5e-3) as u64;
            max_ulp[l] = max_ulp[l].max((key(y) - key(x)).unsigned_abs());
        }};
    }
    let whole = n / LANES * LANES;
    for k0 in (0..whole).step_by(LANES) {
        for l in 0..LANES {
            pair!(k0 + l, l);
        }
    }
    for k in whole..n {
        pair!(k, k - whole);
    }
    let fold = |v: &[f64; LANES]| v.iter().fold(0.0, |a, x| a + x);
    let nf = n as f64;
    let (mg, mc) = (fold(&sum[0]) / nf, fold(&sum[1]) / nf);
    b.sgg = fold(&sum[2]);
    b.scc = fold(&sum[3]);
    b.sgc = fold(&sum[4]);
    b.sdd = fold(&sum[5]);
    b.sad = fold(&sum[6]);
    // The largest |d|, at its first index (the smallest index among lanes that reach it).
    let (mut best, mut best_at) = (-1.0f64, usize::MAX);
    for l in 0..LANES.min(n) {
        if max_abs[l] > best || (max_abs[l] == best && at[l] < best_at) {
            best = max_abs[l];
            best_at = at[l];
        }
    }
    let mut m2 = [[0.0f64; LANES]; 3];
    for k0 in (0..whole).step_by(LANES) {
        for l in 0..LANES {
            let (dx, dy) = (g[k0 + l] - mg, c[k0 + l] - mc);
            m2[0][l] += dx * dx;
            m2[1][l] += dy * dy;
            m2[2][l] += dx * dy;
        }
    }
    for k in whole..n {
        let (dx, dy, l) = (g[k] - mg, c[k] - mc, k - whole);
        m2[0][l] += dx * dx;
        m2[1][l] += dy * dy;
        m2[2][l] += dx * dy;
    }
    b.m2_g = fold(&m2[0]);
    b.m2_c = fold(&m2[1]);
    b.co = fold(&m2[2]);
    let (max_abs, at) = (best, best_at);
    let max_rel = max_rel.iter().fold(0.0f64, |a, &x| a.max(x));
    let max_ulp = max_ulp.iter().copied().max().unwrap_or(0);
    let below_1e3: u64 = below_1e3.iter().sum();
    let below_5e3: u64 = below_5e3.iter().sum();
    b.n = n as u64;
    b.mean_g = mg;
    b.mean_c = mc;
    b.max_abs = max_abs;
    b.max_abs_at = if compacted { idx[at] } else { start + at };
    b.max_rel = max_rel;
    b.max_ulp = max_ulp as f64;
    b.below_1e3 = below_1e3;
    b.below_5e3 = below_5e3;
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::site::{LayerPart, Site, Step};
    use crate::dump::Manifest;

    fn unit(i: u64) -> f64 {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn scenario() -> crate::dump::Scenario {
        let text = r#"{"format": "llama-parity/dump@1", "producer": {},
          "model": {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
          "dtype": "float32",
          "scenario": {"name": "t", "input_ids": [[1, 2, 3, 4, 5], [0, 0, 3, 4, 5]],
                       "attention_mask": [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], "decode_ids": [[1], [2]]},
          "steps": ["prefill", "decode.0"]}"#;
        Manifest::parse(text, std::path::Path::new("t/manifest.json")).expect("manifest").scenario
    }

    /// The fast path against the element-by-element one: the same counts, indices and
    /// maxima exactly, the sums to rounding (absolute and relative bounds).
    fn check(gd: DType, cd: DType, shape: &[usize], site: Site, poison: bool) {
        let n: usize = shape.iter().product();
        let gv: Vec<f64> = (0..n as u64).map(|i| unit(i) * 3.0).collect();
        let mut cv: Vec<f64> =
            gv.iter().enumerate().map(|(i, &x)| x + 1e-2 * unit(i as u64 + 99_991)).collect();
        let mut gv = gv;
        if poison {
            gv[3] = f64::NAN;
            cv[7] = f64::INFINITY;
            gv[n - 2] = f64::INFINITY;
            cv[n - 2] = f64::INFINITY;
            gv[5] = 0.0;
        }
        let (g, c) = (Tensor::from_f64(shape, &gv, gd), Tensor::from_f64(shape, &cv, cd));
        let sc = scenario();
        let valid = RowFilter::new(Step::Prefill, &site, shape, &sc);
        let tokens = Groups::tokens(&site, shape);
        let heads = Groups::heads(&site, shape, Some(2));
        let fast = measure(&g, &c, &valid, tokens, heads);
        let slow = measure_simple(&g, &c, &valid, tokens, heads);
        let (a, b) = (fast.acc.finish(shape), slow.acc.finish(shape));
        let what = format!("{gd} vs {cd} {shape:?} {site} poison={poison}");
        assert_eq!(
            (a.count, a.max_abs, &a.max_abs_index, a.max_rel, a.max_ulp),
            (b.count, b.max_abs, &b.max_abs_index, b.max_rel, b.max_ulp),
            "{what}"
        );
        assert_eq!(
            (a.one_thousandth_ratio, a.five_thousandths_ratio, a.new_nonfinite),
            (b.one_thousandth_ratio, b.five_thousandths_ratio, b.new_nonfinite),
            "{what}"
        );
        assert_eq!(
            (a.golden_nan, a.golden_inf, a.candidate_nan, a.candidate_inf),
            (b.golden_nan, b.golden_inf, b.candidate_nan, b.candidate_inf),
            "{what}"
        );
        for (name, x, y) in [
            ("cosine", a.cosine, b.cosine),
            ("rel_l2", a.rel_l2, b.rel_l2),
            ("mean_abs", a.mean_abs, b.mean_abs),
            ("rmse", a.rmse, b.rmse),
            ("pearson", a.pearson, b.pearson),
        ] {
            assert!((x - y).abs() <= 1e-13 + 1e-11 * y.abs(), "{what}: {name} {x} vs {y}");
        }
        let groups = |m: &Measured| {
            (m.per_token.as_ref().map(GroupL2::finish), m.per_head.as_ref().map(GroupL2::finish))
        };
        let ((ta, ha), (tb, hb)) = (groups(&fast), groups(&slow));
        for (x, y) in [(ta, tb), (ha, hb)] {
            assert_eq!(x.as_ref().map(Vec::len), y.as_ref().map(Vec::len), "{what}");
            for (p, q) in x.unwrap_or_default().iter().zip(y.unwrap_or_default().iter()) {
                assert!(
                    (p.is_nan() && q.is_nan()) || p == q || (p - q).abs() <= 1e-11 * q.abs(),
                    "{what}: group {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn fast_path_agrees_with_the_element_by_element_path() {
        let lanes = [DType::F32, DType::BF16, DType::F16];
        for gd in lanes {
            for cd in lanes {
                for poison in [false, true] {
                    // A padded prefill hidden state, q_rope with heads, a long row
                    // that spans several blocks, and a cache with padding slots.
                    check(gd, cd, &[2, 5, 8], Site::Layer(0, LayerPart::Mlp), poison);
                    check(gd, cd, &[2, 2, 5, 4], Site::Layer(0, LayerPart::QRope), poison);
                    check(gd, cd, &[2, 5, 2500], Site::Layer(0, LayerPart::InputLayernorm), poison);
                    check(gd, cd, &[2, 2, 5, 4], Site::Layer(0, LayerPart::KCache), poison);
                    check(gd, cd, &[2, 5, 8], Site::Layer(0, LayerPart::Context), poison);
                }
            }
        }
    }

    #[test]
    fn the_first_largest_error_wins_across_blocks() {
        // Equal maxima in two blocks and two lanes: the earliest index is reported, as
        // element by element.
        let n = 3 * BLOCK;
        let g = vec![1.0; n];
        let mut c = vec![1.0; n];
        c[BLOCK + 5] = 2.0;
        c[BLOCK + 6] = 2.0; // the same block, another lane, later
        c[BLOCK + 9] = 2.0; // the same lane, later
        c[2 * BLOCK + 1] = 2.0;
        let (g, c) =
            (Tensor::from_f64(&[n], &g, DType::F32), Tensor::from_f64(&[n], &c, DType::F32));
        let sc = scenario();
        let valid = RowFilter::new(Step::Prefill, &Site::LmHead, &[n], &sc);
        let m = measure(&g, &c, &valid, None, None).acc.finish(&[n]);
        assert_eq!(m.max_abs_index, vec![BLOCK + 5]);
    }
}
