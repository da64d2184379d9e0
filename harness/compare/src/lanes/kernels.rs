//! The measures of one decoded block on four f64 lanes ([`F64x4`]): [`errors`] (the
//! sums, |d|, the relative error and its 1‰ and 5‰ counts), then [`comoments`]
//! (Pearson's, about the block's own means), the first index of the largest |d| from
//! snapshots of the lanes' maxima ([`first_largest`]), and the units in the last place
//! of the finite pairs of a block with NaN or Inf ([`max_ulp`]). Pair `k` goes to lane
//! `k % LANES`; each lane adds in index order and the lanes combine in lane order.

use super::decode::{ulps, Bf16Lane, Decoded, F16Lane, F32Lane, Lane};
use super::plan::Scratch;
use super::{BLOCK, LANES, STRETCH};
use crate::metrics::Block;
use crate::simd::F64x4;
use dump::DType;

/// The statistics of one decoded block of `len` pairs (in `s.g`, `s.c`) starting at
/// flat index `start`.
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
pub(super) unsafe fn block<V: F64x4>(
    cand: DType,
    decoded: Decoded,
    s: &mut Scratch,
    len: usize,
    start: usize,
    eps: f64,
) -> Block {
    let (g, c, idx) = (&mut s.g[..len], &mut s.c[..len], &mut s.idx[..len]);
    // SAFETY: passed on from the caller.
    unsafe {
        block_of::<V, f32>(decoded, g, c, idx, start, eps, |g, c| match cand {
            DType::F32 => max_ulp::<F32Lane>(g, c),
            DType::BF16 => max_ulp::<Bf16Lane>(g, c),
            _ => max_ulp::<F16Lane>(g, c),
        })
    }
}

/// [`block`] over pairs of either width (`g`, `c`, each `idx`'s length), with
/// `nonfinite_ulp` measuring the units in the last place over the finite pairs when the
/// block holds NaN or Inf (else `decoded.max_ulp` is the block's).
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
pub(super) unsafe fn block_of<V: F64x4, E: Elem>(
    decoded: Decoded,
    g: &mut [E],
    c: &mut [E],
    idx: &mut [usize],
    start: usize,
    eps: f64,
    nonfinite_ulp: impl FnOnce(&[E], &[E]) -> f64,
) -> Block {
    let mut b = Block::default();
    let mut n = g.len();
    let finite = decoded.finite;
    if !finite {
        // Count NaN/Inf as Accumulator::push does, and keep the finite pairs in front.
        let mut m = 0;
        for k in 0..n {
            let (x, y) = (g[k], c[k]);
            if b.count_nonfinite(x.wide(), y.wide()) {
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
    // SAFETY: passed on from the caller.
    let (e, [m2_g, m2_c, co]) = unsafe {
        let e = errors::<V, E>(g, c, eps);
        let m = comoments::<V, E>(g, c, e.sg / n as f64, e.sc / n as f64);
        (e, m)
    };
    // The first pair reaching the largest |d| (there is one: n > 0).
    let at = first_largest(g, c, &e);
    b.n = n as u64;
    b.sgg = e.sgg;
    b.scc = e.scc;
    b.sgc = e.sgc;
    b.sdd = e.sdd;
    b.sad = e.sad;
    b.mean_g = e.sg / n as f64;
    b.mean_c = e.sc / n as f64;
    b.m2_g = m2_g;
    b.m2_c = m2_c;
    b.co = co;
    b.max_abs = e.max_abs;
    b.max_abs_at = if finite { start + at } else { idx[at] };
    b.max_rel = e.max_rel;
    b.max_ulp = if finite { decoded.max_ulp } else { nonfinite_ulp(g, c) };
    b.below_1e3 = e.below_1e3;
    b.below_5e3 = e.below_5e3;
    b
}

/// An element of a decoded block: float32 (the lanes' dtypes), or float64.
pub(super) trait Elem: Copy + Into<f64> {
    /// The element as `f64` (exactly).
    #[inline(always)]
    fn wide(self) -> f64 {
        self.into()
    }

    /// Four elements from the front of `s`, widened.
    ///
    /// # Safety
    /// The CPU has `V`'s features.
    unsafe fn load<V: F64x4>(s: &[Self]) -> V;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<V: F64x4>(s: &[f32]) -> V {
        // SAFETY: passed on from the caller.
        unsafe { V::load(s) }
    }
}

impl Elem for f64 {
    #[inline(always)]
    unsafe fn load<V: F64x4>(s: &[f64]) -> V {
        // SAFETY: passed on from the caller.
        unsafe { V::load_f64(s) }
    }
}

/// Lane partial sums combined in lane order.
#[inline(always)]
pub(super) fn fold(v: [f64; LANES]) -> f64 {
    v.iter().fold(0.0, |a, x| a + x)
}

/// The largest lane.
#[inline(always)]
pub(super) fn fold_max(v: [f64; LANES]) -> f64 {
    v.iter().fold(0.0f64, |a, &x| a.max(x))
}

/// What [`errors`] measures over a block.
struct Errors {
    sg: f64,
    sc: f64,
    sgg: f64,
    scc: f64,
    sgc: f64,
    sdd: f64,
    sad: f64,
    max_abs: f64,
    /// max |d| of each lane.
    lane_max_abs: [f64; LANES],
    /// max |d| of each lane so far at the end of each stretch of [`STRETCH`] pairs
    /// (of the pairs that fill whole vector steps).
    seen: [[f64; LANES]; BLOCK / STRETCH],
    max_rel: f64,
    below_1e3: u64,
    below_5e3: u64,
}

/// The lanes of [`errors`], as arrays (the two counts as integers in their bits).
struct ErrorLanes([[f64; LANES]; 11]);

impl ErrorLanes {
    /// Adds the pair `(x, y)` to lane `l` (the scalar form of one step of [`errors`]'
    /// vector loop).
    #[inline(always)]
    fn pair(&mut self, l: usize, x: f64, y: f64, eps: f64) {
        let s = &mut self.0;
        let d = y - x;
        let ad = d.abs();
        s[0][l] += x;
        s[1][l] += y;
        s[2][l] += x * x;
        s[3][l] += y * y;
        s[4][l] += x * y;
        s[5][l] += d * d;
        s[6][l] += ad;
        s[7][l] = if ad > s[7][l] { ad } else { s[7][l] };
        let rel = ad / if x == 0.0 { eps } else { x.abs() };
        s[8][l] = if rel > s[8][l] { rel } else { s[8][l] };
        s[9][l] = f64::from_bits(s[9][l].to_bits() + u64::from(rel < 1e-3));
        s[10][l] = f64::from_bits(s[10][l].to_bits() + u64::from(rel < 5e-3));
    }
}

/// Σg, Σc, Σg², Σc², Σgc, Σd², Σ|d|, max |d|, the largest relative error (|d| / |g|,
/// or |d| / eps where g = 0) and how many relative errors are below 1e-3 and 5e-3, in
/// one pass: pair `k` on lane `k % LANES`, in index order within a lane (four pairs a
/// vector step, then the last `n % 4` on lanes `0..`).
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
unsafe fn errors<V: F64x4, E: Elem>(g: &[E], c: &[E], eps: f64) -> Errors {
    // SAFETY (the whole body): passed on from the caller.
    unsafe {
        let z = V::zero();
        let (mut sg, mut sc, mut sgg, mut scc, mut sgc) = (z, z, z, z, z);
        let (mut sdd, mut sad, mut max_abs, mut max_rel, mut n1, mut n5) = (z, z, z, z, z, z);
        let (veps, t1, t5) = (V::splat(eps), V::splat(1e-3), V::splat(5e-3));
        let whole = g.len() / LANES * LANES;
        let mut seen = [[0.0; LANES]; BLOCK / STRETCH];
        let stretches = g[..whole].chunks(STRETCH).zip(c[..whole].chunks(STRETCH));
        for ((gs, cs), seen) in stretches.zip(seen.iter_mut()) {
            for (gq, cq) in gs.chunks_exact(LANES).zip(cs.chunks_exact(LANES)) {
                let (x, y) = (E::load::<V>(gq), E::load::<V>(cq));
                sg = sg.add(x);
                sc = sc.add(y);
                sgg = sgg.add(x.mul(x));
                scc = scc.add(y.mul(y));
                sgc = sgc.add(x.mul(y));
                let d = y.sub(x);
                let a = d.abs();
                sdd = sdd.add(d.mul(d));
                sad = sad.add(a);
                max_abs = max_abs.max(a);
                let rel = a.div(x.if_zero(veps, x.abs()));
                max_rel = max_rel.max(rel);
                n1 = rel.count_below(t1, n1);
                n5 = rel.count_below(t5, n5);
            }
            *seen = max_abs.to_array();
        }
        let mut s = ErrorLanes([
            sg.to_array(),
            sc.to_array(),
            sgg.to_array(),
            scc.to_array(),
            sgc.to_array(),
            sdd.to_array(),
            sad.to_array(),
            max_abs.to_array(),
            max_rel.to_array(),
            n1.to_array(),
            n5.to_array(),
        ]);
        for (l, (&x, &y)) in g[whole..].iter().zip(&c[whole..]).enumerate() {
            s.pair(l, x.wide(), y.wide(), eps);
        }
        let s = s.0;
        Errors {
            sg: fold(s[0]),
            sc: fold(s[1]),
            sgg: fold(s[2]),
            scc: fold(s[3]),
            sgc: fold(s[4]),
            sdd: fold(s[5]),
            sad: fold(s[6]),
            max_abs: fold_max(s[7]),
            lane_max_abs: s[7],
            seen,
            max_rel: fold_max(s[8]),
            below_1e3: s[9].iter().map(|n| n.to_bits()).sum(),
            below_5e3: s[10].iter().map(|n| n.to_bits()).sum(),
        }
    }
}

/// Pearson's co-moments about the block's means: Σ(g-ḡ)², Σ(c-c̄)², Σ(g-ḡ)(c-c̄), on
/// the lanes of [`errors`].
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
unsafe fn comoments<V: F64x4, E: Elem>(g: &[E], c: &[E], mg: f64, mc: f64) -> [f64; 3] {
    // SAFETY (the whole body): passed on from the caller.
    unsafe {
        let z = V::zero();
        let (mut sxx, mut syy, mut sxy) = (z, z, z);
        let (vmg, vmc) = (V::splat(mg), V::splat(mc));
        let (gw, cw) = (g.chunks_exact(LANES), c.chunks_exact(LANES));
        let (gt, ct) = (gw.remainder(), cw.remainder());
        for (gq, cq) in gw.zip(cw) {
            let (dx, dy) = (E::load::<V>(gq).sub(vmg), E::load::<V>(cq).sub(vmc));
            sxx = sxx.add(dx.mul(dx));
            syy = syy.add(dy.mul(dy));
            sxy = sxy.add(dx.mul(dy));
        }
        let mut s = [sxx.to_array(), syy.to_array(), sxy.to_array()];
        for (l, (&x, &y)) in gt.iter().zip(ct).enumerate() {
            let (dx, dy) = (x.wide() - mg, y.wide() - mc);
            s[0][l] += dx * dx;
            s[1][l] += dy * dy;
            s[2][l] += dx * dy;
        }
        s.map(fold)
    }
}

/// The index of the first pair whose |d| is the largest: in each lane that reaches the
/// largest, its first pair there (lane `l` holds pairs `l, l + 4, ...`, then the
/// tail's pair `l`), found in the first stretch where that lane had reached it; the
/// smallest of those.
#[inline(always)]
fn first_largest<E: Elem>(g: &[E], c: &[E], e: &Errors) -> usize {
    let whole = g.len() / LANES * LANES;
    let hit = |k: &usize| *k < g.len() && (c[*k].wide() - g[*k].wide()).abs() == e.max_abs;
    let mut first = usize::MAX;
    for l in (0..LANES).filter(|&l| e.lane_max_abs[l] == e.max_abs) {
        let stretch = e.seen[..whole.div_ceil(STRETCH)].iter().position(|s| s[l] == e.max_abs);
        let k = match stretch {
            Some(j) => (j * STRETCH + l..((j + 1) * STRETCH).min(whole)).step_by(LANES).find(hit),
            None => Some(whole + l).filter(hit),
        };
        first = first.min(k.unwrap_or(usize::MAX));
    }
    if first == usize::MAX {
        0
    } else {
        first
    }
}

/// The largest distance in the units in the last place of candidate dtype `C` (its
/// values exact in `C`).
fn max_ulp<C: Lane>(g: &[f32], c: &[f32]) -> f64 {
    let u = g.iter().zip(c).map(|(&x, &y)| ulps::<C>(C::key_of(y), C::key_of(x)));
    f64::from(u.fold(0, u32::max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanes::decode::decode_pair;
    use crate::lanes::unit;
    use crate::simd::Portable;
    use dump::Tensor;

    /// The block kernel as it was first written (scalar, element by element within
    /// each lane): the kernel must give exactly its bits.
    fn reference_block(cand: DType, g: &[f64], c: &[f64], start: usize, eps: f64) -> Block {
        fn line(bits: u32, sign: u32) -> i64 {
            if bits & sign != 0 {
                -((bits & (sign - 1)) as i64)
            } else {
                bits as i64
            }
        }
        let key = |x: f64| match cand {
            DType::F32 => line((x as f32).to_bits(), 1 << 31),
            DType::BF16 => line(u32::from(half::bf16::from_f32(x as f32).to_bits()), 1 << 15),
            _ => line(u32::from(half::f16::from_f32(x as f32).to_bits()), 1 << 15),
        };
        let mut b = Block::default();
        let (mut gv, mut cv, mut idx) = (Vec::new(), Vec::new(), Vec::new());
        for (k, (&x, &y)) in g.iter().zip(c).enumerate() {
            if b.count_nonfinite(x, y) {
                gv.push(x);
                cv.push(y);
                idx.push(start + k);
            }
        }
        let n = gv.len();
        if n == 0 {
            return b;
        }
        let whole = n / LANES * LANES;
        let lane = |k: usize| if k < whole { k % LANES } else { k - whole };
        let mut sum = [[0.0f64; LANES]; 7];
        let (mut max_abs, mut at) = ([-1.0f64; LANES], [0usize; LANES]);
        let (mut max_rel, mut max_ulp) = ([0.0f64; LANES], [0u64; LANES]);
        let (mut n1, mut n5) = (0u64, 0u64);
        for k in 0..n {
            let (l, x, y) = (lane(k), gv[k], cv[k]);
            let d = y - x;
            let ad = d.abs();
            for (j, v) in [x, y, x * x, y * y, x * y, d * d, ad].into_iter().enumerate() {
                sum[j][l] += v;
            }
            if ad > max_abs[l] {
                max_abs[l] = ad;
                at[l] = k;
            }
            let rel = if x == 0.0 { ad / eps } else { ad / x.abs() };
            max_rel[l] = max_rel[l].max(rel);
            n1 += (rel < 1e-3) as u64;
            n5 += (rel < 5e-3) as u64;
            max_ulp[l] = max_ulp[l].max((key(y) - key(x)).unsigned_abs());
        }
        let fold = |v: &[f64; LANES]| v.iter().fold(0.0, |a, x| a + x);
        let (mg, mc) = (fold(&sum[0]) / n as f64, fold(&sum[1]) / n as f64);
        let mut m2 = [[0.0f64; LANES]; 3];
        for k in 0..n {
            let (l, dx, dy) = (lane(k), gv[k] - mg, cv[k] - mc);
            m2[0][l] += dx * dx;
            m2[1][l] += dy * dy;
            m2[2][l] += dx * dy;
        }
        let (mut best, mut best_at) = (-1.0f64, usize::MAX);
        for l in 0..LANES.min(n) {
            if max_abs[l] > best || (max_abs[l] == best && at[l] < best_at) {
                (best, best_at) = (max_abs[l], at[l]);
            }
        }
        Block {
            n: n as u64,
            sgg: fold(&sum[2]),
            scc: fold(&sum[3]),
            sgc: fold(&sum[4]),
            sdd: fold(&sum[5]),
            sad: fold(&sum[6]),
            max_abs: best,
            max_abs_at: idx[best_at],
            max_rel: max_rel.iter().fold(0.0f64, |a, &x| a.max(x)),
            max_ulp: max_ulp.iter().copied().max().unwrap_or(0) as f64,
            below_1e3: n1,
            below_5e3: n5,
            mean_g: mg,
            mean_c: mc,
            m2_g: fold(&m2[0]),
            m2_c: fold(&m2[1]),
            co: fold(&m2[2]),
            ..b
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn block_avx2(cand: DType, d: Decoded, s: &mut Scratch, len: usize, eps: f64) -> Block {
        block::<crate::simd::Avx2>(cand, d, s, len, 7, eps)
    }

    /// Blocks of every length up to a few vectors, and whole ones, with zeros and
    /// NaN/Inf in the golden and candidate: the vector kernel (portable and AVX2, where
    /// the CPU has it) gives the reference kernel's bits, field for field.
    #[test]
    fn the_vector_kernel_gives_the_reference_bits() {
        let lens = (1..=13).chain([63, 64, 65, BLOCK - 1, BLOCK]);
        let mut case = 0u64;
        for cand in [DType::F32, DType::BF16, DType::F16] {
            let round = |v: f64| Tensor::from_f64(&[1], &[v], cand).get_f64(0);
            for len in lens.clone() {
                for kind in 0..4 {
                    case += 1;
                    let mut s = Scratch::new();
                    for k in 0..len {
                        let u = unit(case * 10_000 + k as u64);
                        let x = match kind {
                            0 => u * 3.0,
                            1 => (u * 40.0).exp2() * u.signum(), // wide range
                            _ => (u * 8.0).round() / 4.0,        // exact zeros and ties
                        };
                        let y = x * (1.0 + 2e-3 * unit(case * 7_777 + k as u64));
                        s.g[k] = x as f32;
                        s.c[k] = round(y) as f32;
                    }
                    if kind == 3 && len > 2 {
                        s.g[len / 2] = f32::NAN;
                        s.c[len - 1] = f32::INFINITY;
                        s.g[0] = 0.0;
                    }
                    let (g, c): (Vec<f64>, Vec<f64>) = s.g[..len]
                        .iter()
                        .zip(&s.c[..len])
                        .map(|(&x, &y)| (f64::from(x), f64::from(y)))
                        .unzip();
                    let want = format!("{:?}", reference_block(cand, &g, &c, 7, cand.eps()));
                    // Through the bytes, as a dump holds them: a float32 golden.
                    let gt = Tensor::from_f64(&[len], &g, DType::F32);
                    let ct = Tensor::from_f64(&[len], &c, cand);
                    let decode = |s: &mut Scratch| {
                        let (gs, cs) = (&mut s.g[..len], &mut s.c[..len]);
                        let (gb, cb) = (gt.bytes(), ct.bytes());
                        match cand {
                            DType::F32 => decode_pair::<F32Lane, F32Lane, true>(gb, cb, 0, gs, cs),
                            DType::BF16 => {
                                decode_pair::<F32Lane, Bf16Lane, true>(gb, cb, 0, gs, cs)
                            }
                            _ => decode_pair::<F32Lane, F16Lane, true>(gb, cb, 0, gs, cs),
                        }
                    };
                    let d = decode(&mut s);
                    // SAFETY: portable lanes need no CPU feature.
                    let got = unsafe { block::<Portable>(cand, d, &mut s, len, 7, cand.eps()) };
                    assert_eq!(format!("{got:?}"), want, "portable {cand} len {len} kind {kind}");
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::has_avx2() {
                        let mut s = Scratch::new();
                        let d = decode(&mut s);
                        // SAFETY: the CPU has AVX2.
                        let got = unsafe { block_avx2(cand, d, &mut s, len, cand.eps()) };
                        assert_eq!(format!("{got:?}"), want, "avx2 {cand} len {len} kind {kind}");
                    }
                }
            }
        }
    }
}
