//! The measures of a value site at memory speed: float32, bfloat16 and float16 lanes
//! decoded straight from the stored (memory-mapped) bytes, a block at a time, with
//! every metric of [`Accumulator`] and the per-token and per-head rel-L2 taken in one
//! read of the data.
//!
//! The tensor is walked in runs of consecutive elements that share their padding
//! filter, token row and head (the largest such run is the gcd of those axes'
//! strides), each run in blocks of at most [`BLOCK`] pairs. A block is decoded into two
//! small float32 arrays that stay in the L1 cache; the units in the last place and the
//! NaN/Inf check are taken on the way, as integer arithmetic on the bits ([`decode`]).
//! Two short branch-free passes over the arrays do the rest on four f64 lanes (an AVX2
//! register where the CPU has one, else plain arrays; the same bits either way):
//! `errors` (the sums, |d|, the relative error and its 1‰ and 5‰ counts; a product of
//! two float32 values is exact in f64), then `comoments` (Pearson's, about the block's
//! own means), both in [`kernels`]. Pair `k` of a block goes to lane `k % LANES`, each
//! lane adds in index order and the lanes combine in lane order; the first index of the
//! largest |d| is found afterwards from snapshots of the lanes' maxima.
//!
//! Blocks are measured in parallel (rayon), in tasks of whole blocks, then merged into
//! the site's accumulator one by one in index order ([`Accumulator::absorb`]). A block
//! is the same whatever task or thread measures it, and the merge is sequential, so the
//! numbers are bit-identical on any number of threads (and to the scalar kernel this
//! one replaced: the tests keep it as the reference).
//!
//! A pair with float64 on either side (a run's own output, held in memory) is read
//! into two float64 arrays a block at a time and measured by the same block kernel
//! (`WidePass` in [`plan`]; units in the last place per pair with [`ulp_distance`]), unless a
//! value reaches [`HUGE`], whose squares could overflow the plain sums. That site, and
//! any pair of integer dtypes, takes [`measure_simple`], the element-by-element path,
//! which is also the reference the fast one is tested against.
//! The error histogram is only reported for failing sites, so it is made by a second
//! pass over those ([`histogram`]), blocked and parallel the same way; [`statistics`]
//! is the light pass of a statistics-first comparison.
//!
//! The module follows those seams: [`plan`] cuts a tensor into tasks and blocks and
//! runs the passes over them, [`decode`] turns stored bytes into lanes, [`kernels`]
//! measures a decoded block, and [`tallies`] holds the sums of the light passes (the
//! statistics and the histogram); the entry points stay here.
//!
//! [`ulp_distance`]: crate::metrics::ulp_distance

mod decode;
mod kernels;
mod plan;
mod tallies;

use rayon::prelude::*;

use self::plan::{for_waves, Merge, Pair};
use self::plan::{MeasurePass, StatisticsPass, WidePass};
use self::tallies::{Decades, Moments};
use crate::metrics::{Accumulator, Block, ErrorHistogram, GroupL2};
use crate::verdict::{Groups, RowFilter};
use dump::msprobe::Stats;
use dump::{DType, Tensor};

/// Pairs per block: two float32 arrays of this many values stay in the L1 cache. Block
/// boundaries decide the order of the sums, so changing this changes the last bits of
/// the results.
pub const BLOCK: usize = 1024;

/// Independent partial sums per block; pair `k` of a block goes to lane `k % LANES`.
const LANES: usize = 4;

/// Pairs between two snapshots of the lanes' largest |d|, which narrow the search for
/// where it first occurs (a multiple of [`LANES`] dividing [`BLOCK`]).
const STRETCH: usize = 64;

/// Pairs per parallel task (a multiple of [`BLOCK`]).
const TASK: usize = 256 * BLOCK;

/// Most blocks in one task (for tensors cut into short runs).
const TASK_BLOCKS: usize = 4096;

/// Tasks measured at once before their blocks are merged: bounds the memory the
/// blocks' statistics take, and lets the pages of a large tensor be handed back as it
/// is read.
const WAVE: usize = 32;

/// A site's accumulated measures, before [`Accumulator::finish`].
pub struct Measured {
    pub acc: Accumulator,
    pub per_token: Option<GroupL2>,
    pub per_head: Option<GroupL2>,
}

/// True for the dtypes the fast path decodes.
pub fn is_lane(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16 | DType::F16)
}

/// True for the float dtypes, which the fast path measures (float64 pairs on float64
/// scratch arrays).
fn is_float(d: DType) -> bool {
    is_lane(d) || d == DType::F64
}

/// Float64 pairs with a value this large or larger are measured element by element:
/// below it, the sums of squares of any tensor stay finite (2^960 per square).
const HUGE: f64 = 3.121_748_550_315_992_2e144; // 2^480, exactly

/// Measures the pairs of `g` and `c` (same shape) that `valid` keeps, with rel-L2 per
/// token row and per head when `tokens` / `heads` are given.
pub fn measure(
    g: &Tensor,
    c: &Tensor,
    valid: &RowFilter,
    tokens: Option<Groups>,
    heads: Option<Groups>,
) -> Measured {
    let lanes = is_lane(g.dtype()) && is_lane(c.dtype());
    let wide = !lanes && is_float(g.dtype()) && is_float(c.dtype());
    if !(lanes || wide) {
        return measure_simple(g, c, valid, tokens, heads);
    }
    let numel = g.numel();
    let run = [valid.run(), tokens.map(|t| t.stride), heads.map(|h| h.stride)]
        .into_iter()
        .flatten()
        .fold(numel, gcd)
        .max(1);
    let pair = Pair::new(g, c, valid, run);
    let mut merge = Merge {
        acc: Accumulator::new(c.dtype()),
        per_token: tokens.map(|t| GroupL2::new(t.n)),
        per_head: heads.map(|h| GroupL2::new(h.n)),
        tokens,
        heads,
        open: None,
    };
    let mut huge = false;
    for_waves(numel, run, g, c, |tasks| {
        let parts: Vec<(Vec<(usize, Block)>, bool)> = match (lanes, tasks.len()) {
            (true, 1) => {
                tasks.iter().map(|r| (pair.on_lanes::<MeasurePass>(r.clone()), false)).collect()
            }
            (true, _) => {
                tasks.par_iter().map(|r| (pair.on_lanes::<MeasurePass>(r.clone()), false)).collect()
            }
            (false, _) => tasks.par_iter().map(|r| pair.on_lanes::<WidePass>(r.clone())).collect(),
        };
        for (blocks, h) in &parts {
            huge |= h;
            for (run_start, b) in blocks {
                merge.push(*run_start, b);
            }
        }
    });
    if huge {
        // Squares of such values may overflow the plain sums: element by element, whose
        // accumulator keeps scaled ones too.
        return measure_simple(g, c, valid, tokens, heads);
    }
    merge.flush();
    Measured { acc: merge.acc, per_token: merge.per_token, per_head: merge.per_head }
}

/// The element-by-element path: every pair widened with [`Tensor::get_f64`] and pushed
/// into the accumulators. Any dtype; the reference for [`measure`].
pub fn measure_simple(
    g: &Tensor,
    c: &Tensor,
    valid: &RowFilter,
    tokens: Option<Groups>,
    heads: Option<Groups>,
) -> Measured {
    let mut acc = Accumulator::new(c.dtype());
    let mut per_token = tokens.map(|t| GroupL2::new(t.n));
    let mut per_head = heads.map(|h| GroupL2::new(h.n));
    // Element by element in index order, both tensors read a block at a time.
    let (mut gb, mut cb) = (vec![0.0; BLOCK], vec![0.0; BLOCK]);
    let numel = g.numel();
    for start in (0..numel).step_by(BLOCK) {
        let len = BLOCK.min(numel - start);
        g.read_f64_into(start, &mut gb[..len]);
        c.read_f64_into(start, &mut cb[..len]);
        for (k, (&gv, &cv)) in gb[..len].iter().zip(&cb[..len]).enumerate() {
            let i = start + k;
            if valid.keep(i) {
                acc.push(i, gv, cv);
                if let (Some(t), Some(a)) = (tokens, per_token.as_mut()) {
                    a.push(t.of(i), gv, cv);
                }
                if let (Some(h), Some(a)) = (heads, per_head.as_mut()) {
                    a.push(h.of(i), gv, cv);
                }
            }
        }
    }
    Measured { acc, per_token, per_head }
}

/// |c - g| by decade over the pairs `valid` keeps (a second pass, for failing sites).
pub fn histogram(g: &Tensor, c: &Tensor, valid: &RowFilter) -> ErrorHistogram {
    let mut h = ErrorHistogram::new();
    if !(is_lane(g.dtype()) && is_lane(c.dtype())) {
        for i in 0..g.numel() {
            if valid.keep(i) {
                h.push(g.get_f64(i), c.get_f64(i));
            }
        }
        return h;
    }
    let numel = g.numel();
    let run = valid.run().map_or(numel, |r| gcd(numel, r)).max(1);
    let pair = Pair::new(g, c, valid, run);
    let mut total = Decades::default();
    for_waves(numel, run, g, c, |tasks| {
        let parts: Vec<Decades> = tasks.par_iter().map(|r| pair.decades(r.clone())).collect();
        for p in &parts {
            total.add(p);
        }
    });
    total.into_histogram(h.counts.len())
}

/// Max, Min, Mean and L2 norm of `g` and of `c` over the pairs `valid` keeps, and how
/// many pairs those are; `None` when a kept value is NaN or Inf (statistics would say
/// nothing then). One light read of both tensors, in parallel tasks merged in index
/// order (the same numbers on any thread count).
pub fn statistics(g: &Tensor, c: &Tensor, valid: &RowFilter) -> Option<(Stats, Stats, u64)> {
    let mut total = Moments::default();
    if is_lane(g.dtype()) && is_lane(c.dtype()) {
        let numel = g.numel();
        let run = valid.run().map_or(numel, |r| gcd(numel, r)).max(1);
        let pair = Pair::new(g, c, valid, run);
        for_waves(numel, run, g, c, |tasks| {
            let parts: Vec<Moments> =
                tasks.par_iter().map(|r| pair.on_lanes::<StatisticsPass>(r.clone())).collect();
            for p in &parts {
                total.add(p);
            }
        });
    } else {
        for i in (0..g.numel()).filter(|&i| valid.keep(i)) {
            total.push(g.get_f64(i), c.get_f64(i));
        }
    }
    total.into_stats()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A fixed-seed value in [-1, 1) for the tests of every lanes module (splitmix64).
#[cfg(test)]
fn unit(i: u64) -> f64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::site::{LayerPart, Site, Step};
    use dump::Manifest;

    fn scenario() -> dump::Scenario {
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
        assert_eq!(histogram(&g, &c, &valid), slow_histogram(&g, &c, &valid), "{what}");
        // The statistics: none where a kept value is NaN/Inf, else the extremes and the
        // count exactly and the sums to rounding, as element by element.
        let mut slow = Moments::default();
        for i in (0..n).filter(|&i| valid.keep(i)) {
            slow.push(g.get_f64(i), c.get_f64(i));
        }
        match (statistics(&g, &c, &valid), slow.into_stats()) {
            (None, None) => {}
            (Some((fg, fc, fnum)), Some((sg, sc, snum))) => {
                assert_eq!(fnum, snum, "{what}");
                for (f, s) in [(fg, sg), (fc, sc)] {
                    assert_eq!((f.max, f.min), (s.max, s.min), "{what}");
                    for (x, y) in [(f.mean, s.mean), (f.norm, s.norm)] {
                        let (x, y) = (x.unwrap_or(f64::NAN), y.unwrap_or(f64::NAN));
                        assert!((x - y).abs() <= 1e-13 + 1e-11 * y.abs(), "{what}: {x} vs {y}");
                    }
                }
            }
            (a, b) => panic!("{what}: statistics {a:?} vs {b:?}"),
        }
    }

    fn slow_histogram(g: &Tensor, c: &Tensor, valid: &RowFilter) -> ErrorHistogram {
        let mut h = ErrorHistogram::new();
        for i in 0..g.numel() {
            if valid.keep(i) {
                h.push(g.get_f64(i), c.get_f64(i));
            }
        }
        h
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
    fn float64_pairs_measure_like_element_by_element() {
        // A run's own output (float64) against goldens of every float dtype, and a
        // float64 golden against the lane dtypes.
        let pairs = [DType::F64, DType::F32, DType::BF16, DType::F16]
            .map(|g| (g, DType::F64))
            .into_iter()
            .chain([DType::F32, DType::BF16].map(|c| (DType::F64, c)));
        for (gd, cd) in pairs {
            for poison in [false, true] {
                check(gd, cd, &[2, 5, 8], Site::Layer(0, LayerPart::Mlp), poison);
                check(gd, cd, &[2, 2, 5, 4], Site::Layer(0, LayerPart::QRope), poison);
                check(gd, cd, &[2, 5, 2500], Site::Layer(0, LayerPart::InputLayernorm), poison);
                check(gd, cd, &[2, 2, 5, 4], Site::Layer(0, LayerPart::KCache), poison);
            }
        }
        check(DType::F32, DType::F64, &[1, 2, 16 * TASK + 7], Site::LmHead, true);
    }

    #[test]
    fn float64_values_whose_squares_could_overflow_are_measured_element_by_element() {
        let sc = scenario();
        let shape = [1, 2, 3000];
        let site = Site::LmHead;
        let gv: Vec<f64> = (0..6000u64).map(|i| unit(i) * 1e200).collect();
        let cv: Vec<f64> = gv.iter().map(|x| x * (1.0 + 1e-9)).collect();
        let (g, c) =
            (Tensor::from_f64(&shape, &gv, DType::F64), Tensor::from_f64(&shape, &cv, DType::F64));
        let valid = RowFilter::new(Step::Prefill, &site, &shape, &sc);
        let fast = measure(&g, &c, &valid, None, None).acc.finish(&shape);
        let slow = measure_simple(&g, &c, &valid, None, None).acc.finish(&shape);
        assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
        assert!(fast.rel_l2.is_finite() && fast.rel_l2 > 0.0, "{fast:?}");
        assert_eq!(HUGE, 2f64.powi(480));
    }

    #[test]
    fn a_tensor_of_many_tasks_measures_like_one_element_by_element() {
        // Long runs cut into pieces of TASK pairs, and short runs many to a task, over
        // more than one wave of tasks.
        check(DType::F32, DType::BF16, &[1, 2, TASK + 3 * BLOCK + 5], Site::LmHead, true);
        check(DType::F32, DType::F16, &[1, 2, 8, 3000], Site::Layer(0, LayerPart::QRope), false);
        check(DType::F32, DType::F32, &[1, 8, 100, 640], Site::Layer(0, LayerPart::QRope), true);
        // More than one wave: 2 runs of 17 pieces.
        assert!(2 * (16 * TASK + 7).div_ceil(TASK) > WAVE);
        check(DType::BF16, DType::F32, &[1, 2, 16 * TASK + 7], Site::LmHead, false);
    }

    /// Blocks of one site measured on 1 and on 4 threads: every number bit-identical
    /// (a long row in pieces over two waves of tasks, and short runs with heads).
    #[test]
    fn a_site_of_many_tasks_gives_the_same_bits_on_any_thread_count() {
        let sc = scenario();
        for (shape, site) in [
            (vec![1, 2, 16 * TASK + 7], Site::LmHead),
            (vec![1, 8, 100, 640], Site::Layer(0, LayerPart::QRope)),
        ] {
            let n: usize = shape.iter().product();
            let gv: Vec<f64> = (0..n as u64).map(|i| unit(i) * 3.0).collect();
            let cv: Vec<f64> =
                gv.iter().enumerate().map(|(i, &x)| x + 1e-2 * unit(i as u64 + 7)).collect();
            let g = Tensor::from_f64(&shape, &gv, DType::F32);
            let c = Tensor::from_f64(&shape, &cv, DType::BF16);
            let valid = RowFilter::new(Step::Prefill, &site, &shape, &sc);
            let (tokens, heads) =
                (Groups::tokens(&site, &shape), Groups::heads(&site, &shape, None));
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                let pool = pool.expect("a thread pool");
                pool.install(|| {
                    let m = measure(&g, &c, &valid, tokens, heads);
                    let groups = [m.per_token.as_ref(), m.per_head.as_ref()].map(|a| {
                        a.map(|a| a.finish().iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                    });
                    let h = histogram(&g, &c, &valid);
                    format!("{:?} {groups:?} {h:?}", m.acc.finish(&shape))
                })
            };
            assert_eq!(run(1), run(4), "{site} {shape:?}");
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
