//! The sums of the light passes: the moments of both sides for their statistics
//! ([`Moments`], on the lanes of the block kernel), and |c - g| counted by decade for the
//! error histogram of a failing site ([`Decades`]).

use std::sync::OnceLock;

use super::kernels::fold;
use super::LANES;
use crate::metrics::ErrorHistogram;
use crate::simd::F64x4;
use dump::msprobe::Stats;

/// Sums, extremes and the count of the pairs of some blocks, for their statistics.
#[derive(Clone, Copy)]
pub(super) struct Moments {
    pub(super) n: u64,
    /// Σg, Σg², Σc, Σc².
    pub(super) sums: [f64; 4],
    /// min g, max g, min c, max c.
    pub(super) min_g: f64,
    pub(super) max_g: f64,
    pub(super) min_c: f64,
    pub(super) max_c: f64,
    /// Every value was finite.
    pub(super) finite: bool,
}

impl Default for Moments {
    fn default() -> Moments {
        let inf = f64::INFINITY;
        Moments {
            n: 0,
            sums: [0.0; 4],
            min_g: inf,
            max_g: -inf,
            min_c: inf,
            max_c: -inf,
            finite: true,
        }
    }
}

impl Moments {
    /// Adds `o`, which follows these pairs in index order.
    pub(super) fn add(&mut self, o: &Moments) {
        self.n += o.n;
        for (a, b) in self.sums.iter_mut().zip(o.sums) {
            *a += b;
        }
        self.min_g = self.min_g.min(o.min_g);
        self.max_g = self.max_g.max(o.max_g);
        self.min_c = self.min_c.min(o.min_c);
        self.max_c = self.max_c.max(o.max_c);
        self.finite &= o.finite;
    }

    /// Adds one pair (the element-by-element path).
    pub(super) fn push(&mut self, x: f64, y: f64) {
        let one = Moments {
            n: 1,
            sums: [x, x * x, y, y * y],
            min_g: x,
            max_g: x,
            min_c: y,
            max_c: y,
            finite: x.is_finite() && y.is_finite(),
        };
        self.add(&one);
    }

    /// The statistics of both sides and the count; `None` unless every value was finite.
    pub(super) fn into_stats(self) -> Option<(Stats, Stats, u64)> {
        if !self.finite {
            return None;
        }
        let n = self.n.max(1) as f64;
        let [sg, sgg, sc, scc] = self.sums;
        let stats = |min: f64, max: f64, sum: f64, sq: f64| Stats {
            max: Some(max),
            min: Some(min),
            mean: Some(sum / n),
            norm: Some(sq.sqrt()),
        };
        Some((
            stats(self.min_g, self.max_g, sg, sgg),
            stats(self.min_c, self.max_c, sc, scc),
            self.n,
        ))
    }
}

/// The moments of one decoded block of finite pairs, on the lanes of [`errors`].
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
pub(super) unsafe fn block_moments<V: F64x4>(g: &[f32], c: &[f32]) -> Moments {
    // SAFETY (the whole body): passed on from the caller.
    unsafe {
        let z = V::zero();
        let (mut sg, mut sgg, mut sc, mut scc) = (z, z, z, z);
        let (inf, ninf) = (V::splat(f64::INFINITY), V::splat(f64::NEG_INFINITY));
        let (mut min_g, mut max_g, mut min_c, mut max_c) = (inf, ninf, inf, ninf);
        for (gq, cq) in g.chunks_exact(LANES).zip(c.chunks_exact(LANES)) {
            let (x, y) = (V::load(gq), V::load(cq));
            sg = sg.add(x);
            sgg = sgg.add(x.mul(x));
            sc = sc.add(y);
            scc = scc.add(y.mul(y));
            min_g = min_g.min(x);
            max_g = max_g.max(x);
            min_c = min_c.min(y);
            max_c = max_c.max(y);
        }
        let mut s = [sg.to_array(), sgg.to_array(), sc.to_array(), scc.to_array()];
        let whole = g.len() / LANES * LANES;
        let (mut lo_g, mut hi_g, mut lo_c, mut hi_c) =
            (min_g.to_array(), max_g.to_array(), min_c.to_array(), max_c.to_array());
        for (l, (&x, &y)) in g[whole..].iter().zip(&c[whole..]).enumerate() {
            let (x, y) = (f64::from(x), f64::from(y));
            s[0][l] += x;
            s[1][l] += x * x;
            s[2][l] += y;
            s[3][l] += y * y;
            (lo_g[l], hi_g[l]) = (lo_g[l].min(x), hi_g[l].max(x));
            (lo_c[l], hi_c[l]) = (lo_c[l].min(y), hi_c[l].max(y));
        }
        let lo = |v: [f64; LANES]| v.iter().fold(f64::INFINITY, |a, &x| a.min(x));
        let hi = |v: [f64; LANES]| v.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
        Moments {
            n: g.len() as u64,
            sums: s.map(fold),
            min_g: lo(lo_g),
            max_g: hi(hi_g),
            min_c: lo(lo_c),
            max_c: hi(hi_c),
            finite: true,
        }
    }
}

/// |c - g| by decade over some blocks: pairs with d = 0, pairs where both are finite,
/// and for each decade bound of [`ErrorHistogram`] the pairs at or above it.
#[derive(Default)]
pub(super) struct Decades {
    exact: u64,
    finite: u64,
    at_least: [u64; 32],
}

impl Decades {
    pub(super) fn add(&mut self, o: &Decades) {
        self.exact += o.exact;
        self.finite += o.finite;
        for (a, b) in self.at_least.iter_mut().zip(o.at_least) {
            *a += b;
        }
    }

    /// Adds a decoded block; `ad` is scratch.
    pub(super) fn add_block(&mut self, g: &[f32], c: &[f32], ad: &mut Vec<f64>) {
        ad.clear();
        ad.extend(
            g.iter()
                .zip(c)
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|(&x, &y)| (f64::from(y) - f64::from(x)).abs()),
        );
        self.finite += ad.len() as u64;
        self.exact += ad.iter().map(|&a| u64::from(a == 0.0)).sum::<u64>();
        for (n, &t) in self.at_least.iter_mut().zip(decade_bounds()) {
            *n += ad.iter().map(|&a| u64::from(a >= t)).sum::<u64>();
        }
    }

    /// The histogram of `buckets` decades ([`ErrorHistogram::push`]'s buckets).
    pub(super) fn into_histogram(self, buckets: usize) -> ErrorHistogram {
        let mut h = ErrorHistogram::new();
        let above = |k: usize| if k == 0 { self.finite - self.exact } else { self.at_least[k - 1] };
        for k in 0..buckets {
            let next = if k + 1 < buckets { self.at_least[k] } else { 0 };
            h.counts[k] = above(k) - next;
        }
        h.exact = self.exact;
        h
    }
}

/// The decade bounds of [`ErrorHistogram`]: bound `k` is the smallest positive f64
/// that [`ErrorHistogram::push`] puts in bucket `k + 1` or above (found by bisection
/// over the f64 bit patterns with that very rule, so the buckets are the same).
fn decade_bounds() -> &'static [f64] {
    static BOUNDS: OnceLock<Vec<f64>> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        let decade = |x: f64| x.log10().floor() as i64;
        (ErrorHistogram::MIN_EXP + 1..=ErrorHistogram::MAX_EXP)
            .map(|e| {
                // The smallest positive finite x with decade(x) >= e.
                let (mut lo, mut hi) = (1u64, f64::MAX.to_bits());
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if decade(f64::from_bits(mid)) >= i64::from(e) {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }
                f64::from_bits(lo)
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanes::unit;

    #[test]
    fn decade_bounds_bucket_like_the_histogram() {
        let bucket = |ad: f64| {
            let mut h = ErrorHistogram::new();
            h.push(0.0, ad);
            h.counts.iter().position(|&n| n == 1)
        };
        let by_bounds = |ad: f64| Some(decade_bounds().iter().filter(|&&t| ad >= t).count());
        for &t in decade_bounds() {
            for k in -64i64..=64 {
                let x = f64::from_bits((t.to_bits() as i64 + k) as u64);
                assert_eq!(by_bounds(x), bucket(x), "{x:e}");
            }
        }
        for i in 0..100_000u64 {
            let x = 10f64.powf(unit(i) * 20.0);
            assert_eq!(by_bounds(x), bucket(x), "{x:e}");
        }
    }
}
