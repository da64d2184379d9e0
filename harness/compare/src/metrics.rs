//! Error measures between a golden tensor `g` and a candidate tensor `c`, streamed in
//! one pass with `f64` accumulators (no whole-tensor copies).
//!
//! With `d = c - g` over the `n` element pairs where both sides are finite:
//!
//! | metric | formula |
//! |---|---|
//! | `cosine` | Σgc / √(Σg² Σc²); 1 when both are all zero, 0 when one is |
//! | `max_abs` | max \|d\|, with the index where it occurs |
//! | `max_rel` | max \|d\| / \|g\|; where g = 0, the dtype's eps is added to both sides (msprobe) |
//! | `mean_abs` | Σ\|d\| / n |
//! | `rel_l2` | √Σd² / √Σg² |
//! | `rmse` | √(Σd² / n) |
//! | `nmse`, `nmse_db` | Σd² / Σg², and 10·log10 of it |
//! | `pearson` | cov(g, c) / (σg σc) (Welford co-moments) |
//! | `snr_db` | 10·log10(Σg² / Σd²) |
//! | `max_ulp` | max distance in units in the last place of the candidate's dtype, golden rounded to it |
//! | `one_thousandth_ratio`, `five_thousandths_ratio` | fraction of elements whose relative error is below 0.001 / 0.005 |
//!
//! NaN and Inf are counted on each side; `new_nonfinite` counts elements where the
//! candidate is NaN or Inf and the golden is not the same non-finite value. Such an
//! element fails the site whatever the other numbers say.

use serde::{Deserialize, Serialize};

use dump::DType;

/// The measures of one site. Non-finite values serialize as the strings `"inf"`,
/// `"-inf"` and `"nan"` so that JSON stays valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Element pairs where both sides are finite.
    pub count: u64,
    #[serde(with = "num")]
    pub cosine: f64,
    #[serde(with = "num")]
    pub max_abs: f64,
    /// Multi-index of `max_abs` (empty when `count` is 0).
    pub max_abs_index: Vec<usize>,
    #[serde(with = "num")]
    pub max_rel: f64,
    #[serde(with = "num")]
    pub mean_abs: f64,
    #[serde(with = "num")]
    pub rel_l2: f64,
    #[serde(with = "num")]
    pub rmse: f64,
    #[serde(with = "num")]
    pub nmse: f64,
    #[serde(with = "num")]
    pub nmse_db: f64,
    #[serde(with = "num")]
    pub pearson: f64,
    #[serde(with = "num")]
    pub snr_db: f64,
    #[serde(with = "num")]
    pub max_ulp: f64,
    #[serde(with = "num")]
    pub one_thousandth_ratio: f64,
    #[serde(with = "num")]
    pub five_thousandths_ratio: f64,
    pub golden_nan: u64,
    pub golden_inf: u64,
    pub candidate_nan: u64,
    pub candidate_inf: u64,
    /// Elements where the candidate is NaN/Inf and the golden is not that same value.
    pub new_nonfinite: u64,
    /// Elements where the golden is NaN/Inf and the candidate does not reproduce it (set
    /// by the comparison, which sees both sides; CONTRACT §1 rules: such a site fails).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_nonfinite: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Streams element pairs into [`Metrics`].
#[derive(Debug, Clone)]
pub struct Accumulator {
    cand: DType,
    eps: f64,
    n: u64,
    sgg: f64,
    scc: f64,
    sgc: f64,
    sdd: f64,
    sad: f64,
    max_abs: f64,
    max_abs_at: Option<usize>,
    max_rel: f64,
    max_ulp: f64,
    below_1e3: u64,
    below_5e3: u64,
    // Welford state for Pearson.
    mean_g: f64,
    mean_c: f64,
    m2_g: f64,
    m2_c: f64,
    co: f64,
    golden_nan: u64,
    golden_inf: u64,
    candidate_nan: u64,
    candidate_inf: u64,
    new_nonfinite: u64,
    /// The same sums and Welford state over values scaled by [`SCALE`]: used only when
    /// the plain ones overflowed (values near the top of the F64 range), so ordinary
    /// values give exactly the results they always did.
    scaled: Sums,
}

/// 2^-600: values up to F64's largest scale to about 4e127, whose squares sum without
/// overflow. A power of two, so scaling itself is exact.
fn scale() -> f64 {
    (-600.0f64).exp2()
}

/// Σg², Σc², Σgc, Σd² and Pearson's Welford state, over scaled values.
#[derive(Debug, Clone, Default)]
struct Sums {
    sgg: f64,
    scc: f64,
    sgc: f64,
    sdd: f64,
    mean_g: f64,
    mean_c: f64,
    m2_g: f64,
    m2_c: f64,
    co: f64,
}

impl Accumulator {
    /// An empty accumulator; `candidate` is the candidate's storage dtype (for ULPs and
    /// the eps of the relative error).
    pub fn new(candidate: DType) -> Accumulator {
        let eps = if candidate.is_float() { candidate.eps() } else { f32::EPSILON as f64 };
        Accumulator {
            cand: candidate,
            eps,
            n: 0,
            sgg: 0.0,
            scc: 0.0,
            sgc: 0.0,
            sdd: 0.0,
            sad: 0.0,
            max_abs: 0.0,
            max_abs_at: None,
            max_rel: 0.0,
            max_ulp: 0.0,
            below_1e3: 0,
            below_5e3: 0,
            mean_g: 0.0,
            mean_c: 0.0,
            m2_g: 0.0,
            m2_c: 0.0,
            co: 0.0,
            golden_nan: 0,
            golden_inf: 0,
            candidate_nan: 0,
            candidate_inf: 0,
            new_nonfinite: 0,
            scaled: Sums::default(),
        }
    }

    /// Adds the pair at row-major flat index `index`.
    #[inline]
    pub fn push(&mut self, index: usize, g: f64, c: f64) {
        let (gf, cf) = (g.is_finite(), c.is_finite());
        self.golden_nan += g.is_nan() as u64;
        self.golden_inf += g.is_infinite() as u64;
        self.candidate_nan += c.is_nan() as u64;
        self.candidate_inf += c.is_infinite() as u64;
        if !cf && (gf || !(g == c || (g.is_nan() && c.is_nan()))) {
            self.new_nonfinite += 1;
        }
        if !(gf && cf) {
            return;
        }
        self.n += 1;
        let d = c - g;
        let ad = d.abs();
        self.sgg += g * g;
        self.scc += c * c;
        self.sgc += g * c;
        self.sdd += d * d;
        self.sad += ad;
        if ad > self.max_abs || self.max_abs_at.is_none() {
            self.max_abs = ad;
            self.max_abs_at = Some(index);
        }
        let rel = if g == 0.0 { ad / self.eps } else { ad / g.abs() };
        self.max_rel = self.max_rel.max(rel);
        self.below_1e3 += (rel < 1e-3) as u64;
        self.below_5e3 += (rel < 5e-3) as u64;
        self.max_ulp = self.max_ulp.max(ulp_distance(self.cand, g, c));
        let n = self.n as f64;
        let dg = g - self.mean_g;
        let dc = c - self.mean_c;
        self.mean_g += dg / n;
        self.mean_c += dc / n;
        self.m2_g += dg * (g - self.mean_g);
        self.m2_c += dc * (c - self.mean_c);
        self.co += dg * (c - self.mean_c);
        let (gs, cs) = (g * scale(), c * scale());
        let ds = cs - gs;
        let s = &mut self.scaled;
        s.sgg += gs * gs;
        s.scc += cs * cs;
        s.sgc += gs * cs;
        s.sdd += ds * ds;
        let dg = gs - s.mean_g;
        let dc = cs - s.mean_c;
        s.mean_g += dg / n;
        s.mean_c += dc / n;
        s.m2_g += dg * (gs - s.mean_g);
        s.m2_c += dc * (cs - s.mean_c);
        s.co += dg * (cs - s.mean_c);
    }

    /// Merges the statistics of one block of pairs ([`Block`], made by the fast path in
    /// [`crate::lanes`]): sums add, maxima keep the earliest index, and
    /// Pearson's co-moments merge by Chan's formula. Blocks must come in index order.
    pub fn absorb(&mut self, b: &Block) {
        self.golden_nan += b.golden_nan;
        self.golden_inf += b.golden_inf;
        self.candidate_nan += b.candidate_nan;
        self.candidate_inf += b.candidate_inf;
        self.new_nonfinite += b.new_nonfinite;
        if b.n == 0 {
            return;
        }
        self.sgg += b.sgg;
        self.scc += b.scc;
        self.sgc += b.sgc;
        self.sdd += b.sdd;
        self.sad += b.sad;
        if b.max_abs > self.max_abs || self.max_abs_at.is_none() {
            self.max_abs = b.max_abs;
            self.max_abs_at = Some(b.max_abs_at);
        }
        self.max_rel = self.max_rel.max(b.max_rel);
        self.max_ulp = self.max_ulp.max(b.max_ulp);
        self.below_1e3 += b.below_1e3;
        self.below_5e3 += b.below_5e3;
        let (na, nb) = (self.n as f64, b.n as f64);
        let n = na + nb;
        let dg = b.mean_g - self.mean_g;
        let dc = b.mean_c - self.mean_c;
        let w = na * nb / n;
        self.mean_g += dg * nb / n;
        self.mean_c += dc * nb / n;
        self.m2_g += b.m2_g + dg * dg * w;
        self.m2_c += b.m2_c + dc * dc * w;
        self.co += b.co + dg * dc * w;
        self.n += b.n;
    }

    /// The measures, with `max_abs_index` unravelled over `shape`.
    pub fn finish(&self, shape: &[usize]) -> Metrics {
        let n = self.n as f64;
        // The plain sums, or the scaled ones where a plain one overflowed (`unit` is
        // what one unit of the sums' values is worth: 1, or 1/SCALE).
        let plain = [self.sgg, self.scc, self.sgc, self.sdd].iter().all(|x| x.is_finite());
        let s = &self.scaled;
        let (sgg, scc, sgc, sdd, unit) = if plain {
            (self.sgg, self.scc, self.sgc, self.sdd, 1.0)
        } else {
            (s.sgg, s.scc, s.sgc, s.sdd, 1.0 / scale())
        };
        let (m2_g, m2_c, co) = if [self.m2_g, self.m2_c, self.co].iter().all(|x| x.is_finite()) {
            (self.m2_g, self.m2_c, self.co)
        } else {
            (s.m2_g, s.m2_c, s.co)
        };
        let cosine = if sgg == 0.0 && scc == 0.0 {
            1.0
        } else if sgg == 0.0 || scc == 0.0 {
            0.0
        } else {
            (sgc / (sgg.sqrt() * scc.sqrt())).clamp(-1.0, 1.0)
        };
        let nmse = ratio(sdd, sgg);
        let pearson = if m2_g == 0.0 && m2_c == 0.0 {
            if sdd == 0.0 {
                1.0
            } else {
                0.0
            }
        } else if m2_g == 0.0 || m2_c == 0.0 {
            0.0
        } else {
            (co / (m2_g.sqrt() * m2_c.sqrt())).clamp(-1.0, 1.0)
        };
        let frac = |k: u64| if self.n == 0 { 1.0 } else { k as f64 / n };
        Metrics {
            count: self.n,
            cosine,
            max_abs: self.max_abs,
            max_abs_index: self.max_abs_at.map(|i| unravel(i, shape)).unwrap_or_default(),
            max_rel: self.max_rel,
            mean_abs: if self.n == 0 { 0.0 } else { self.sad / n },
            rel_l2: nmse.sqrt(),
            rmse: if self.n == 0 { 0.0 } else { (sdd / n).sqrt() * unit },
            nmse,
            nmse_db: 10.0 * nmse.log10(),
            pearson,
            snr_db: if sdd == 0.0 { f64::INFINITY } else { 10.0 * (sgg / sdd).log10() },
            max_ulp: self.max_ulp,
            one_thousandth_ratio: frac(self.below_1e3),
            five_thousandths_ratio: frac(self.below_5e3),
            golden_nan: self.golden_nan,
            golden_inf: self.golden_inf,
            candidate_nan: self.candidate_nan,
            candidate_inf: self.candidate_inf,
            new_nonfinite: self.new_nonfinite,
            lost_nonfinite: 0,
        }
    }
}

/// The statistics of one block of element pairs, as [`Accumulator::absorb`] merges
/// them: over the `n` pairs where both sides are finite, the sums, maxima and counts of
/// [`Accumulator`], and Pearson's means and co-moments about the block's own means.
#[derive(Debug, Clone, Default)]
pub struct Block {
    pub n: u64,
    pub sgg: f64,
    pub scc: f64,
    pub sgc: f64,
    pub sdd: f64,
    pub sad: f64,
    pub max_abs: f64,
    /// Flat index of the first pair reaching `max_abs`.
    pub max_abs_at: usize,
    pub max_rel: f64,
    pub max_ulp: f64,
    pub below_1e3: u64,
    pub below_5e3: u64,
    pub mean_g: f64,
    pub mean_c: f64,
    pub m2_g: f64,
    pub m2_c: f64,
    pub co: f64,
    pub golden_nan: u64,
    pub golden_inf: u64,
    pub candidate_nan: u64,
    pub candidate_inf: u64,
    pub new_nonfinite: u64,
}

impl Block {
    /// Counts the NaN and Inf of the pair `(g, c)` as [`Accumulator::push`] does;
    /// true when both sides are finite (the pair enters the sums).
    #[inline]
    pub fn count_nonfinite(&mut self, g: f64, c: f64) -> bool {
        self.golden_nan += g.is_nan() as u64;
        self.golden_inf += g.is_infinite() as u64;
        self.candidate_nan += c.is_nan() as u64;
        self.candidate_inf += c.is_infinite() as u64;
        if !c.is_finite() && (g.is_finite() || !(g == c || (g.is_nan() && c.is_nan()))) {
            self.new_nonfinite += 1;
        }
        g.is_finite() && c.is_finite()
    }
}

/// rel-L2 per group of elements (a token row, a head), streamed in the same pass as
/// [`Accumulator`]: Σd² and Σg² per group over the pairs where both sides are finite.
///
/// A group with a new NaN/Inf on the candidate's side reads `+inf`; a group that
/// received no element (every row of it padding) reads NaN.
#[derive(Debug, Clone)]
pub struct GroupL2 {
    sdd: Vec<f64>,
    sgg: Vec<f64>,
    /// The same over values scaled by [`scale`], used where the plain sums overflowed.
    scaled: Vec<(f64, f64)>,
    seen: Vec<bool>,
    broken: Vec<bool>,
}

impl GroupL2 {
    /// An accumulator over `groups` groups.
    pub fn new(groups: usize) -> GroupL2 {
        GroupL2 {
            sdd: vec![0.0; groups],
            sgg: vec![0.0; groups],
            scaled: vec![(0.0, 0.0); groups],
            seen: vec![false; groups],
            broken: vec![false; groups],
        }
    }

    /// Adds the pair `(g, c)` to group `k` (ignored when `k` is out of range).
    #[inline]
    pub fn push(&mut self, k: usize, g: f64, c: f64) {
        if k >= self.sdd.len() {
            return;
        }
        self.seen[k] = true;
        if g.is_finite() && c.is_finite() {
            let d = c - g;
            self.sdd[k] += d * d;
            self.sgg[k] += g * g;
            let (gs, ds) = (g * scale(), c * scale() - g * scale());
            self.scaled[k].0 += ds * ds;
            self.scaled[k].1 += gs * gs;
        } else if !c.is_finite() && (g.is_finite() || !(g == c || (g.is_nan() && c.is_nan()))) {
            self.broken[k] = true;
        }
    }

    /// Adds to group `k` the sums of a run of pairs that all fall in it (ignored when
    /// `k` is out of range): Σd² and Σg² over its finite pairs, and whether any pair had
    /// a new NaN/Inf on the candidate's side. The run must hold at least one pair.
    pub fn absorb(&mut self, k: usize, sdd: f64, sgg: f64, broken: bool) {
        if k >= self.sdd.len() {
            return;
        }
        self.seen[k] = true;
        self.sdd[k] += sdd;
        self.sgg[k] += sgg;
        self.broken[k] |= broken;
    }

    /// rel-L2 of each group.
    pub fn finish(&self) -> Vec<f64> {
        (0..self.sdd.len())
            .map(|k| {
                if self.broken[k] {
                    f64::INFINITY
                } else if !self.seen[k] {
                    f64::NAN
                } else if self.sdd[k].is_finite() && self.sgg[k].is_finite() {
                    ratio(self.sdd[k], self.sgg[k]).sqrt()
                } else {
                    ratio(self.scaled[k].0, self.scaled[k].1).sqrt()
                }
            })
            .collect()
    }
}

/// Counts of absolute errors |d| in decades: bucket `k` holds `10^(min_exp+k) <= |d| <
/// 10^(min_exp+k+1)`; the first bucket also takes every smaller non-zero |d| and the
/// last every larger one. `exact` counts |d| = 0. Only pairs where both sides are finite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorHistogram {
    pub min_exp: i32,
    pub counts: Vec<u64>,
    pub exact: u64,
}

impl ErrorHistogram {
    /// Smallest decade kept apart (1e-12 and below share the first bucket).
    pub const MIN_EXP: i32 = -12;
    /// Largest decade kept apart (1e3 and above share the last bucket).
    pub const MAX_EXP: i32 = 3;

    pub fn new() -> ErrorHistogram {
        ErrorHistogram {
            min_exp: Self::MIN_EXP,
            counts: vec![0; (Self::MAX_EXP - Self::MIN_EXP + 1) as usize],
            exact: 0,
        }
    }

    /// Adds the pair `(g, c)`.
    #[inline]
    pub fn push(&mut self, g: f64, c: f64) {
        if !(g.is_finite() && c.is_finite()) {
            return;
        }
        let ad = (c - g).abs();
        if ad == 0.0 {
            self.exact += 1;
            return;
        }
        let e = (ad.log10().floor() as i64)
            .clamp(self.min_exp as i64, (self.min_exp as i64) + self.counts.len() as i64 - 1);
        self.counts[(e - self.min_exp as i64) as usize] += 1;
    }

    /// Every counted pair.
    pub fn total(&self) -> u64 {
        self.exact + self.counts.iter().sum::<u64>()
    }
}

impl Default for ErrorHistogram {
    fn default() -> Self {
        ErrorHistogram::new()
    }
}

/// `a / b` with 0/0 = 0 and x/0 = +inf.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        a / b
    }
}

/// Row-major flat index to multi-index.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// Distance between `c` and `g` rounded to `dtype`, in units in the last place of
/// `dtype` (the number of representable values between them). 0 for integer dtypes.
pub fn ulp_distance(dtype: DType, g: f64, c: f64) -> f64 {
    // Sign-magnitude bits to a line on which neighbouring values differ by one
    // (-0 and +0 both map to 0).
    fn line(bits: u64, sign: u64) -> i128 {
        if bits & sign != 0 {
            -((bits & (sign - 1)) as i128)
        } else {
            bits as i128
        }
    }
    if dtype == DType::F64 {
        return ulp_distance_f64(g, c);
    }
    let key = |x: f64| -> i128 {
        match dtype {
            DType::F32 => line((x as f32).to_bits() as u64, 1 << 31),
            DType::F16 => line(half::f16::from_f64(x).to_bits() as u64, 1 << 15),
            DType::BF16 => line(half::bf16::from_f64(x).to_bits() as u64, 1 << 15),
            _ => 0,
        }
    };
    if !dtype.is_float() {
        return 0.0;
    }
    let d = key(c) - key(g);
    // The same rounding to f64 of the same integer; through i64 where it fits, which is
    // far cheaper than converting an i128.
    match i64::try_from(d) {
        Ok(d) => d.unsigned_abs() as f64,
        Err(_) => d.unsigned_abs() as f64,
    }
}

/// [`ulp_distance`] for a float64 candidate, in 64-bit integers (the two positions
/// differ by less than 2^64, so their difference is exact in wrapping arithmetic); with
/// no dtype to match on, a loop over pairs vectorises.
#[inline(always)]
pub fn ulp_distance_f64(g: f64, c: f64) -> f64 {
    fn line(bits: u64) -> i64 {
        let m = (bits & !(1 << 63)) as i64;
        if bits >> 63 != 0 {
            -m
        } else {
            m
        }
    }
    let (a, b) = (line(c.to_bits()), line(g.to_bits()));
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    (hi as u64).wrapping_sub(lo as u64) as f64
}

/// Serde for `Option<Vec<f64>>` that keeps non-finite values as strings, like `num`.
pub mod num_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct N(f64);

    impl Serialize for N {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::num::serialize(&self.0, s)
        }
    }

    impl<'de> Deserialize<'de> for N {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<N, D::Error> {
            super::num::deserialize(d).map(N)
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<f64>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_seq(v.iter().map(|&x| N(x))),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        let v: Option<Vec<N>> = Option::deserialize(d)?;
        Ok(v.map(|v| v.into_iter().map(|n| n.0).collect()))
    }
}

mod num {
    //! Serde for `f64` that keeps non-finite values as strings.
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("nan")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            F(f64),
            S(String),
        }
        match N::deserialize(d)? {
            N::F(f) => Ok(f),
            N::S(s) => match s.as_str() {
                "nan" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(serde::de::Error::custom(format!("not a number: {s:?}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    fn measure(g: &[f64], c: &[f64], dtype: DType) -> Metrics {
        let mut a = Accumulator::new(dtype);
        for (i, (&g, &c)) in g.iter().zip(c).enumerate() {
            a.push(i, g, c);
        }
        a.finish(&[g.len()])
    }

    #[test]
    fn every_metric_matches_hand_computed_values() {
        // g = [1, 2, 3, 4], c = [1, 2, 3, 5]: d = [0, 0, 0, 1].
        let m = measure(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 3.0, 5.0], DType::F32);
        assert_eq!(m.count, 4);
        assert_relative_eq!(m.cosine, 34.0 / (30.0f64 * 39.0).sqrt(), max_relative = 1e-12);
        assert_eq!(m.max_abs, 1.0);
        assert_eq!(m.max_abs_index, vec![3]);
        assert_relative_eq!(m.max_rel, 0.25);
        assert_relative_eq!(m.mean_abs, 0.25);
        assert_relative_eq!(m.rel_l2, 1.0 / 30.0f64.sqrt(), max_relative = 1e-12);
        assert_relative_eq!(m.rmse, 0.5);
        assert_relative_eq!(m.nmse, 1.0 / 30.0, max_relative = 1e-12);
        assert_relative_eq!(m.nmse_db, -14.771212547196624, max_relative = 1e-12);
        assert_relative_eq!(m.snr_db, 14.771212547196624, max_relative = 1e-12);
        // cov = 6.5, Σ(g-ḡ)² = 5, Σ(c-c̄)² = 8.75.
        assert_relative_eq!(m.pearson, 6.5 / (5.0f64 * 8.75).sqrt(), max_relative = 1e-12);
        // 4.0 and 5.0 are 2^21 float32 ULPs apart (ULP in [4, 8) is 2^-21).
        assert_eq!(m.max_ulp, 2097152.0);
        assert_eq!(m.one_thousandth_ratio, 0.75);
        assert_eq!(m.five_thousandths_ratio, 0.75);
        assert_eq!(
            (m.golden_nan, m.golden_inf, m.candidate_nan, m.candidate_inf, m.new_nonfinite),
            (0, 0, 0, 0, 0)
        );
    }

    /// Regression (issue 12, defect 12): identical F64 tensors near 1e300 read
    /// "cosine NaN" because Σg² overflowed.
    #[test]
    fn values_near_the_top_of_f64_measure_like_ordinary_ones() {
        let g = [1e300, -3e300, 2e307, 5.0];
        let m = measure(&g, &g, DType::F64);
        assert_eq!((m.cosine, m.rel_l2, m.pearson, m.max_abs), (1.0, 0.0, 1.0, 0.0));
        let c = [1e300, -3e300, 2.2e307, 5.0];
        let m = measure(&g, &c, DType::F64);
        assert!(m.cosine.is_finite() && m.cosine > 0.99 && m.cosine < 1.0, "{}", m.cosine);
        assert_relative_eq!(m.rel_l2, 0.1, max_relative = 1e-9);
        assert_relative_eq!(m.rmse, 1e306, max_relative = 1e-9);
        // Ordinary values take the plain sums: the same bits as before.
        let m = measure(&[1.0, 2.0, 3.0], &[1.0, 2.0, 4.0], DType::F64);
        assert_eq!(m.rel_l2, (1.0f64 / 14.0).sqrt());
    }

    #[test]
    fn identical_tensors_are_perfect() {
        let m = measure(&[0.5, -1.0, 3.0], &[0.5, -1.0, 3.0], DType::F32);
        assert_eq!(
            (m.cosine, m.rel_l2, m.max_abs, m.max_rel, m.max_ulp, m.pearson),
            (1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        );
        assert_eq!(m.nmse_db, f64::NEG_INFINITY);
        assert_eq!(m.snr_db, f64::INFINITY);
        assert_eq!(m.one_thousandth_ratio, 1.0);
    }

    #[test]
    fn zero_golden_uses_the_dtype_eps_for_relative_error() {
        // msprobe's rule: where g = 0, eps is added to both sides, so rel = |c| / eps.
        let m = measure(&[0.0, 0.0], &[0.0, 1e-3], DType::F16);
        assert_relative_eq!(m.max_rel, 1e-3 / 9.765625e-4, max_relative = 1e-12);
        assert_eq!(m.rel_l2, f64::INFINITY);
        assert_eq!(m.cosine, 0.0);
        assert_eq!(m.snr_db, f64::NEG_INFINITY);
        assert_eq!(m.one_thousandth_ratio, 0.5);
        let z = measure(&[0.0, 0.0], &[0.0, 0.0], DType::F32);
        assert_eq!((z.cosine, z.rel_l2, z.max_rel, z.pearson), (1.0, 0.0, 0.0, 1.0));
    }

    #[test]
    fn nan_and_inf_are_counted_and_new_ones_flagged() {
        let m =
            measure(&[1.0, f64::NAN, f64::INFINITY], &[1.0, f64::NAN, f64::INFINITY], DType::F32);
        assert_eq!((m.golden_nan, m.golden_inf, m.candidate_nan, m.candidate_inf), (1, 1, 1, 1));
        assert_eq!(m.new_nonfinite, 0);
        assert_eq!(m.count, 1);
        assert_eq!(m.rel_l2, 0.0);
        let m =
            measure(&[1.0, 2.0, f64::INFINITY], &[1.0, f64::NAN, f64::NEG_INFINITY], DType::F32);
        assert_eq!(m.new_nonfinite, 2);
        assert_eq!(m.count, 1);
        // A NaN in the golden alone is counted but is not the candidate's fault.
        let m = measure(&[f64::NAN, 1.0], &[0.0, 1.0], DType::F32);
        assert_eq!((m.golden_nan, m.new_nonfinite, m.count), (1, 0, 1));
    }

    #[test]
    fn constant_tensors_have_defined_correlation() {
        let m = measure(&[2.0; 3], &[2.0; 3], DType::F32);
        assert_eq!(m.pearson, 1.0);
        let m = measure(&[2.0; 3], &[3.0; 3], DType::F32);
        assert_eq!(m.pearson, 0.0);
        assert_relative_eq!(m.cosine, 1.0);
        assert_relative_eq!(m.rel_l2, 0.5);
        let m = measure(&[2.0, 2.0, 2.0], &[1.0, 2.0, 3.0], DType::F32);
        assert_eq!(m.pearson, 0.0);
    }

    #[test]
    fn length_one_tensors() {
        let m = measure(&[2.0], &[3.0], DType::F32);
        assert_eq!(m.count, 1);
        assert_eq!(m.cosine, 1.0);
        assert_eq!(m.rel_l2, 0.5);
        assert_eq!(m.max_rel, 0.5);
        assert_eq!(m.max_abs_index, vec![0]);
        assert_eq!(m.pearson, 0.0);
        assert_eq!(m.rmse, 1.0);
        let e = Accumulator::new(DType::F32).finish(&[0]);
        assert_eq!((e.count, e.rel_l2, e.cosine), (0, 0.0, 1.0));
        assert!(e.max_abs_index.is_empty());
    }

    #[test]
    fn float64_ulps_in_64_bits_equal_the_distance_between_line_positions() {
        let values = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::MAX,
            -f64::MAX,
            f64::MIN_POSITIVE,
            f64::from_bits(1),
            -f64::from_bits(1),
            1.0 + f64::EPSILON,
            3.5e-300,
            -2.25e300,
        ];
        for &g in &values {
            for &c in &values {
                // Sign-magnitude bits to signed positions, their distance in i128.
                let line = |x: f64| {
                    let m = i128::from(x.to_bits() & !(1 << 63));
                    if x.is_sign_negative() {
                        -m
                    } else {
                        m
                    }
                };
                let want = (line(c) - line(g)).unsigned_abs() as f64;
                assert_eq!(ulp_distance_f64(g, c), want, "{g} {c}");
                assert_eq!(ulp_distance(DType::F64, g, c), want, "{g} {c}");
            }
        }
    }

    #[test]
    fn ulps_count_representable_values_of_the_candidate_dtype() {
        assert_eq!(ulp_distance(DType::BF16, 1.0, 1.0078125), 1.0);
        assert_eq!(ulp_distance(DType::F16, 1.0, 1.0 + 2.0 * 9.765625e-4), 2.0);
        assert_eq!(ulp_distance(DType::F16, -0.0, 0.0), 0.0);
        // The smallest positive and negative subnormals are two steps apart across zero.
        assert_eq!(
            ulp_distance(DType::F32, -(f32::from_bits(1) as f64), f32::from_bits(1) as f64),
            2.0
        );
        // The golden is rounded to the candidate's dtype first.
        assert_eq!(ulp_distance(DType::BF16, 1.001, 1.0), 0.0);
        assert_eq!(ulp_distance(DType::I32, 1.0, 5.0), 0.0);
        // float64 across zero: 2 × 0x7fef_ffff_ffff_ffff steps, past what i64 holds.
        let across = 2.0 * 0x7fef_ffff_ffff_ffffu64 as f64;
        assert_eq!(ulp_distance(DType::F64, -f64::MAX, f64::MAX), across);
        assert_eq!(ulp_distance(DType::F64, 1.0, 1.0 + f64::EPSILON), 1.0);
    }

    #[test]
    fn max_abs_index_is_unravelled_row_major() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(7, &[2, 2, 2]), vec![1, 1, 1]);
        let mut a = Accumulator::new(DType::F32);
        for i in 0..6 {
            a.push(i, 0.0, if i == 4 { 2.0 } else { 0.0 });
        }
        assert_eq!(a.finish(&[2, 3]).max_abs_index, vec![1, 1]);
    }

    #[test]
    fn non_finite_metrics_serialize_as_strings() {
        let m = measure(&[0.0], &[1.0], DType::F32);
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["rel_l2"], "inf");
        assert_eq!(j["snr_db"], "-inf");
        let back: Metrics = serde_json::from_value(j).unwrap();
        assert_eq!(back.rel_l2, f64::INFINITY);
    }

    #[test]
    fn group_l2_is_rel_l2_of_each_group() {
        let mut g = GroupL2::new(3);
        g.push(0, 3.0, 3.0);
        g.push(0, 4.0, 4.0);
        g.push(1, 3.0, 3.3);
        g.push(1, 4.0, 4.4);
        let v = g.finish();
        assert_eq!(v[0], 0.0);
        assert!((v[1] - 0.1).abs() < 1e-12, "{}", v[1]);
        assert!(v[2].is_nan(), "a group with no element reads NaN");
        g.push(2, 1.0, f64::NAN);
        assert_eq!(g.finish()[2], f64::INFINITY);
    }

    #[test]
    fn histogram_buckets_by_decade_and_clamps_the_ends() {
        let mut h = ErrorHistogram::new();
        h.push(1.0, 1.0);
        h.push(1.0, 1.5); // 0.5 -> decade -1
        h.push(0.0, 1e-20); // below the first decade
        h.push(0.0, 1e9); // above the last
        h.push(0.0, f64::NAN); // not counted
        assert_eq!(h.exact, 1);
        assert_eq!(h.counts[(-1 - ErrorHistogram::MIN_EXP) as usize], 1);
        assert_eq!(h.counts[0], 1);
        assert_eq!(*h.counts.last().unwrap(), 1);
        assert_eq!(h.total(), 4);
    }

    #[test]
    fn num_vec_round_trips_non_finite_values() {
        #[derive(Serialize, Deserialize)]
        struct W {
            #[serde(with = "num_vec")]
            v: Option<Vec<f64>>,
        }
        let s = serde_json::to_string(&W { v: Some(vec![0.5, f64::INFINITY, f64::NAN]) }).unwrap();
        assert_eq!(s, r#"{"v":[0.5,"inf","nan"]}"#);
        let w: W = serde_json::from_str(&s).unwrap();
        let v = w.v.unwrap();
        assert_eq!(v[0], 0.5);
        assert!(v[1].is_infinite() && v[2].is_nan());
    }
}
