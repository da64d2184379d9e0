//! The measures of a value site at memory speed: float32, bfloat16 and float16 lanes
//! decoded straight from the stored (memory-mapped) bytes, a block at a time, with
//! every metric of [`Accumulator`] and the per-token and per-head rel-L2 taken in one
//! read of the data.
//!
//! The tensor is walked in runs of consecutive elements that share their padding
//! filter, token row and head (the largest such run is the gcd of those axes'
//! strides), each run in blocks of at most [`BLOCK`] pairs. A block is decoded into two
//! small float32 arrays that stay in the L1 cache; the units in the last place and the
//! NaN/Inf check are taken on the way, as integer arithmetic on the bits ([`Lane`]).
//! Two short branch-free passes over the arrays do the rest on four f64 lanes
//! ([`F64x4`]: an AVX2 register where the CPU has one, else plain arrays; the same bits
//! either way): [`errors`] (the sums, |d|, the relative error and its 1‰ and 5‰ counts;
//! a product of two float32 values is exact in f64), then [`comoments`] (Pearson's,
//! about the block's own means). Pair `k` of a block goes to lane `k % LANES`, each
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
//! ([`WidePass`]; units in the last place per pair with [`ulp_distance`]), unless a
//! value reaches [`HUGE`], whose squares could overflow the plain sums. That site, and
//! any pair of integer dtypes, takes [`measure_simple`], the element-by-element path,
//! which is also the reference the fast one is tested against.
//! The error histogram is only reported for failing sites, so it is made by a second
//! pass over those ([`histogram`]), blocked and parallel the same way; [`statistics`]
//! is the light pass of a statistics-first comparison.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::metrics::{ulp_distance, ulp_distance_f64, Accumulator, Block, ErrorHistogram, GroupL2};
use crate::simd::{F64x4, Portable};
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

/// Calls `wave` with the element ranges of the parallel tasks that cover a tensor of
/// `numel` elements cut in runs of `run`, [`WAVE`] tasks at a time, in index order;
/// the pages of `g` and `c` that a wave read are handed back after it when the tensor
/// takes several waves.
fn for_waves(
    numel: usize,
    run: usize,
    g: &Tensor,
    c: &Tensor,
    mut wave: impl FnMut(&[Range<usize>]),
) {
    let plan = Plan::new(numel, run);
    let mut t0 = 0;
    while t0 < plan.tasks {
        let t1 = (t0 + WAVE).min(plan.tasks);
        let tasks: Vec<Range<usize>> = (t0..t1).map(|t| plan.range(t)).collect();
        wave(&tasks);
        if plan.tasks > WAVE {
            let read = plan.range(t0).start..plan.range(t1 - 1).end;
            g.release_elements(read.clone());
            c.release_elements(read);
        }
        t0 = t1;
    }
}

/// How a tensor of `numel` elements in runs of `run` is cut into parallel tasks: whole
/// runs a task, or pieces of [`TASK`] pairs of one long run. Either way a task holds
/// whole blocks, the blocks a sequential walk makes.
struct Plan {
    run: usize,
    /// Runs per task (when runs are short).
    runs_per_task: usize,
    /// Tasks per run (when runs are long).
    pieces: usize,
    runs: usize,
    tasks: usize,
}

impl Plan {
    fn new(numel: usize, run: usize) -> Plan {
        let runs = numel / run;
        if run > TASK {
            let pieces = run.div_ceil(TASK);
            Plan { run, runs_per_task: 1, pieces, runs, tasks: runs * pieces }
        } else {
            let k = (TASK / run).clamp(1, TASK_BLOCKS);
            Plan { run, runs_per_task: k, pieces: 1, runs, tasks: runs.div_ceil(k) }
        }
    }

    /// The elements of task `t`.
    fn range(&self, t: usize) -> Range<usize> {
        if self.pieces > 1 {
            let (r, p) = (t / self.pieces, t % self.pieces);
            let start = r * self.run + p * TASK;
            start..(start + TASK).min((r + 1) * self.run)
        } else {
            let k = self.runs_per_task;
            t * k * self.run..((t + 1) * k).min(self.runs) * self.run
        }
    }
}

/// The two tensors of a site, ready to be read a block at a time.
struct Pair<'a> {
    gt: &'a Tensor,
    ct: &'a Tensor,
    gd: DType,
    cd: DType,
    gb: &'a [u8],
    cb: &'a [u8],
    eps: f64,
    valid: &'a RowFilter<'a>,
    run: usize,
}

impl<'a> Pair<'a> {
    fn new(g: &'a Tensor, c: &'a Tensor, valid: &'a RowFilter<'a>, run: usize) -> Pair<'a> {
        Pair {
            gt: g,
            ct: c,
            gd: g.dtype(),
            cd: c.dtype(),
            gb: g.bytes(),
            cb: c.bytes(),
            eps: c.dtype().eps(),
            valid,
            run,
        }
    }

    /// The blocks of `range` (whole runs, or a piece of one run starting at a multiple
    /// of [`BLOCK`] from its start) in the runs `valid` keeps, in index order: (start of
    /// the run, start of the block, pairs).
    fn block_list(&self, range: Range<usize>) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut s = range.start;
        while s < range.end {
            let run_start = s / self.run * self.run;
            let end = (run_start + self.run).min(range.end);
            if self.valid.keep(run_start) {
                let mut b = s;
                while b < end {
                    let len = (end - b).min(BLOCK);
                    out.push((run_start, b, len));
                    b += len;
                }
            }
            s = end;
        }
        out
    }

    /// Decodes the block of `len` pairs at `start` into the scratch arrays (measuring
    /// the units in the last place when `ULPS`).
    #[inline(always)]
    fn decode<const ULPS: bool>(&self, start: usize, len: usize, s: &mut Scratch) -> Decoded {
        let (g, c) = (&mut s.g[..len], &mut s.c[..len]);
        macro_rules! pairs {
            ($(($gd:ident, $gl:ty, $cd:ident, $cl:ty)),*) => {
                match (self.gd, self.cd) {
                    $((DType::$gd, DType::$cd) => {
                        decode_pair::<$gl, $cl, ULPS>(self.gb, self.cb, start, g, c)
                    })*
                    (gd, cd) => unreachable!("decode: {gd}/{cd} is not a lane pair (is_lane)"),
                }
            };
        }
        pairs!(
            (F32, F32Lane, F32, F32Lane),
            (F32, F32Lane, BF16, Bf16Lane),
            (F32, F32Lane, F16, F16Lane),
            (BF16, Bf16Lane, F32, F32Lane),
            (BF16, Bf16Lane, BF16, Bf16Lane),
            (BF16, Bf16Lane, F16, F16Lane),
            (F16, F16Lane, F32, F32Lane),
            (F16, F16Lane, BF16, Bf16Lane),
            (F16, F16Lane, F16, F16Lane)
        )
    }

    /// Reads the block of `len` pairs at `start` into the float64 scratch arrays (either
    /// side float64), measuring the units in the last place of the finite pairs.
    fn decode_wide(&self, start: usize, len: usize, s: &mut Scratch) -> Decoded {
        let (g, c) = (&mut s.g64[..len], &mut s.c64[..len]);
        self.gt.read_f64_into(start, g);
        self.ct.read_f64_into(start, c);
        let (mut finite, mut ulp, mut top) = (true, 0.0f64, 0.0f64);
        let wide = self.cd == DType::F64;
        for (&x, &y) in g.iter().zip(c.iter()) {
            // Without branches where the candidate is float64, so that the loop
            // vectorises: a non-finite pair's distance and magnitude are discarded.
            let both = x.is_finite() & y.is_finite();
            finite &= both;
            let u = if wide { ulp_distance_f64(x, y) } else { ulp_distance(self.cd, x, y) };
            ulp = if both && u > ulp { u } else { ulp };
            let m = x.abs().max(y.abs());
            top = if both && m > top { m } else { top };
        }
        Decoded { finite, max_ulp: ulp, huge: top >= HUGE }
    }

    /// Runs pass `P` over the blocks of `range`, on AVX2 lanes where the CPU has them.
    fn on_lanes<P: BlockPass>(&self, range: Range<usize>) -> P::Out {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.on_avx2::<P>(range) };
        }
        // SAFETY: portable lanes need no CPU feature.
        unsafe { P::run::<Portable>(self, range) }
    }

    /// [`on_lanes`](Self::on_lanes), the pass compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn on_avx2<P: BlockPass>(&self, range: Range<usize>) -> P::Out {
        P::run::<crate::simd::Avx2>(self, range)
    }

    /// |c - g| by decade over the blocks of `range`.
    fn decades(&self, range: Range<usize>) -> Decades {
        let mut out = Decades::default();
        let mut s = Scratch::new();
        for (_, start, len) in self.block_list(range) {
            self.decode::<false>(start, len, &mut s);
            let Scratch { g, c, ad, .. } = &mut s;
            out.add_block(&g[..len], &c[..len], ad);
        }
        out
    }
}

/// A pass over the blocks of a task's range, generic over the lanes it runs on.
trait BlockPass {
    type Out;
    /// The pass over the blocks of `range` on lanes `V`.
    ///
    /// # Safety
    /// The CPU has `V`'s features.
    unsafe fn run<V: F64x4>(pair: &Pair, range: Range<usize>) -> Self::Out;
}

/// Every measure of every block, each with the start of its run.
struct MeasurePass;

impl BlockPass for MeasurePass {
    type Out = Vec<(usize, Block)>;

    #[inline(always)]
    unsafe fn run<V: F64x4>(pair: &Pair, range: Range<usize>) -> Self::Out {
        let list = pair.block_list(range);
        let mut out = Vec::with_capacity(list.len());
        let mut s = Scratch::new();
        for (run_start, start, len) in list {
            let decoded = pair.decode::<true>(start, len, &mut s);
            // SAFETY: passed on from the caller.
            let b = unsafe { block::<V>(pair.cd, decoded, &mut s, len, start, pair.eps) };
            out.push((run_start, b));
        }
        out
    }
}

/// [`MeasurePass`] over float64 pairs, and whether a value was [`HUGE`].
struct WidePass;

impl BlockPass for WidePass {
    type Out = (Vec<(usize, Block)>, bool);

    #[inline(always)]
    unsafe fn run<V: F64x4>(pair: &Pair, range: Range<usize>) -> Self::Out {
        let list = pair.block_list(range);
        let (mut out, mut huge) = (Vec::with_capacity(list.len()), false);
        let mut s = Scratch::new();
        for (run_start, start, len) in list {
            let decoded = pair.decode_wide(start, len, &mut s);
            huge |= decoded.huge;
            let Scratch { g64, c64, idx, .. } = &mut s;
            let (g, c, idx) = (&mut g64[..len], &mut c64[..len], &mut idx[..len]);
            // SAFETY: passed on from the caller.
            let b = unsafe {
                block_of::<V, f64>(decoded, g, c, idx, start, pair.eps, |_, _| decoded.max_ulp)
            };
            out.push((run_start, b));
        }
        (out, huge)
    }
}

/// The moments of both sides, for their statistics.
struct StatisticsPass;

impl BlockPass for StatisticsPass {
    type Out = Moments;

    #[inline(always)]
    unsafe fn run<V: F64x4>(pair: &Pair, range: Range<usize>) -> Moments {
        let mut out = Moments::default();
        let mut s = Scratch::new();
        for (_, start, len) in pair.block_list(range) {
            if !pair.decode::<false>(start, len, &mut s).finite {
                out.finite = false;
                break;
            }
            // SAFETY: passed on from the caller.
            out.add(&unsafe { block_moments::<V>(&s.g[..len], &s.c[..len]) });
        }
        out
    }
}

/// The per-task scratch arrays of one block.
struct Scratch {
    g: Vec<f32>,
    c: Vec<f32>,
    /// The block's pairs where either side is float64.
    g64: Vec<f64>,
    c64: Vec<f64>,
    /// Flat indices of the finite pairs, when a block holds NaN or Inf.
    idx: Vec<usize>,
    /// |d| of each pair.
    ad: Vec<f64>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            g: vec![0.0; BLOCK],
            c: vec![0.0; BLOCK],
            g64: vec![0.0; BLOCK],
            c64: vec![0.0; BLOCK],
            idx: vec![0; BLOCK],
            ad: vec![0.0; BLOCK],
        }
    }
}

/// Blocks merged in index order: the site's accumulator, and per run the Σd² and Σg²
/// that go to its token row and head.
struct Merge {
    acc: Accumulator,
    per_token: Option<GroupL2>,
    per_head: Option<GroupL2>,
    tokens: Option<Groups>,
    heads: Option<Groups>,
    /// The run being summed: (its start, Σd², Σg², any new NaN/Inf).
    open: Option<(usize, f64, f64, bool)>,
}

impl Merge {
    fn push(&mut self, run_start: usize, b: &Block) {
        if self.open.is_some_and(|(s, ..)| s != run_start) {
            self.flush();
        }
        let (_, sdd, sgg, broken) = self.open.get_or_insert((run_start, 0.0, 0.0, false));
        *sdd += b.sdd;
        *sgg += b.sgg;
        *broken |= b.new_nonfinite > 0;
        self.acc.absorb(b);
    }

    fn flush(&mut self) {
        if let Some((s, sdd, sgg, broken)) = self.open.take() {
            if let (Some(t), Some(a)) = (self.tokens, self.per_token.as_mut()) {
                a.absorb(t.of(s), sdd, sgg, broken);
            }
            if let (Some(h), Some(a)) = (self.heads, self.per_head.as_mut()) {
                a.absorb(h.of(s), sdd, sgg, broken);
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A dtype the fast path reads: how an element is decoded, and where values lie on the
/// line on which neighbouring values of the dtype differ by one (units in the last
/// place).
trait Lane {
    const DTYPE: DType;
    /// Bytes per element: 4 or 2.
    const SIZE: usize;
    /// A value from its bits, widened (exactly).
    fn widen(bits: u32) -> f32;
    /// The position of a finite `x` rounded to this dtype (to nearest, ties to even).
    fn key_of(x: f32) -> i64;

    /// The element stored little-endian in `e` (`SIZE` bytes), as its bits.
    #[inline(always)]
    fn bits(e: &[u8]) -> u32 {
        // `try_into` on an exact chunk cannot fail; written so, a read is one load.
        if Self::SIZE == 4 {
            u32::from_le_bytes(e.try_into().unwrap_or_default())
        } else {
            u32::from(u16::from_le_bytes(e.try_into().unwrap_or_default()))
        }
    }

    /// The position of the value with these bits.
    #[inline(always)]
    fn key(bits: u32) -> i64 {
        i64::from(if Self::SIZE == 4 { line32(bits) } else { line16(bits) })
    }
}

struct F32Lane;
struct Bf16Lane;
struct F16Lane;

impl Lane for F32Lane {
    const DTYPE: DType = DType::F32;
    const SIZE: usize = 4;
    #[inline(always)]
    fn widen(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
    #[inline(always)]
    fn key_of(x: f32) -> i64 {
        Self::key(x.to_bits())
    }
}

impl Lane for Bf16Lane {
    const DTYPE: DType = DType::BF16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn widen(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }
    #[inline(always)]
    fn key_of(x: f32) -> i64 {
        Self::key(bf16_bits(x))
    }
}

impl Lane for F16Lane {
    const DTYPE: DType = DType::F16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn widen(bits: u32) -> f32 {
        f16_to_f32(bits as u16)
    }
    #[inline(always)]
    fn key_of(x: f32) -> i64 {
        Self::key(f16_bits(x))
    }
}

/// The distance between two line positions of a candidate dtype `C`, as u32: at most
/// 2^32 - 2 (float32), exact in wrapping arithmetic, and 16-bit positions stay in i32.
#[inline(always)]
fn ulps<C: Lane>(a: i64, b: i64) -> u32 {
    if C::SIZE == 2 {
        (a as i32 - b as i32).unsigned_abs()
    } else {
        let (hi, lo) = if a > b { (a, b) } else { (b, a) };
        (hi as u32).wrapping_sub(lo as u32)
    }
}

/// What [`decode_pair`] learns of a block on the way.
#[derive(Clone, Copy)]
struct Decoded {
    /// Every value of both sides is finite.
    finite: bool,
    /// The largest distance in the candidate's units in the last place (when finite;
    /// for float64 pairs, over the finite pairs).
    max_ulp: f64,
    /// A finite value of [`HUGE`] or more (float64 pairs only).
    huge: bool,
}

/// Decodes pairs `start..start + g.len()` of the little-endian `gb` (golden, dtype `G`)
/// and `cb` (candidate, `C`) into `g` and `c`, measuring the units in the last place
/// on the way when `ULPS`.
#[inline(always)]
fn decode_pair<G: Lane, C: Lane, const ULPS: bool>(
    gb: &[u8],
    cb: &[u8],
    start: usize,
    g: &mut [f32],
    c: &mut [f32],
) -> Decoded {
    let n = g.len();
    let gb = &gb[start * G::SIZE..(start + n) * G::SIZE];
    let cb = &cb[start * C::SIZE..(start + n) * C::SIZE];
    let (mut top, mut ulp) = (0u32, 0u32);
    // Where both sides have the same dtype the golden needs no rounding.
    let same = G::DTYPE == C::DTYPE;
    for ((go, co), (ge, ce)) in
        g.iter_mut().zip(c.iter_mut()).zip(gb.chunks_exact(G::SIZE).zip(cb.chunks_exact(C::SIZE)))
    {
        let (xb, yb) = (G::bits(ge), C::bits(ce));
        let (x, y) = (G::widen(xb), C::widen(yb));
        *go = x;
        *co = y;
        top = top.max(x.to_bits() & 0x7FFF_FFFF).max(y.to_bits() & 0x7FFF_FFFF);
        if ULPS {
            let kx = if same { C::key(xb) } else { C::key_of(x) };
            ulp = ulp.max(ulps::<C>(C::key(yb), kx));
        }
    }
    Decoded { finite: top < 0x7F80_0000, max_ulp: f64::from(ulp), huge: false }
}

/// float16 bits to float32, exactly (NaN stays NaN), without branches: the exponent is
/// rebiased, infinities and NaN get the rest of float32's exponent, and subnormals are
/// renormalized by one float32 subtraction.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let o = (h & 0x7FFF) << 13;
    let exp = o & 0x0F80_0000;
    let biased = o + 0x3800_0000; // exponent + (127 - 15)
    let special = biased + 0x3800_0000; // Inf/NaN: all exponent bits set
    let small = (f32::from_bits(biased + 0x0080_0000) - f32::from_bits(0x3880_0000)).to_bits();
    let r = if exp == 0x0F80_0000 {
        special
    } else if exp == 0 {
        small
    } else {
        biased
    };
    f32::from_bits(r | ((h & 0x8000) << 16))
}

/// A finite float32 rounded to nearest-even bfloat16, as bits (as `half::bf16::from_f32`).
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16
}

/// A finite float32 rounded to nearest-even float16, as bits (as `half::f16::from_f32`):
/// subnormal results by one float32 addition that aligns the mantissa, normal ones by
/// integer rounding of the rebiased bits, infinity from 65536 up.
#[inline(always)]
fn f16_bits(x: f32) -> u32 {
    const HALF: u32 = 0x3F00_0000; // 0.5: aligns float16's subnormal mantissa at the bottom
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7FFF_FFFF;
    let sub = (f32::from_bits(a) + f32::from_bits(HALF)).to_bits().wrapping_sub(HALF);
    let norm = a.wrapping_add(0xC800_0FFF).wrapping_add((a >> 13) & 1) >> 13;
    let r = if a >= 0x4780_0000 {
        0x7C00
    } else if a < 0x3880_0000 {
        sub
    } else {
        norm
    };
    r | sign
}

/// Sign-magnitude 16-bit float bits to a line on which neighbouring values differ by
/// one (-0 and +0 both at 0).
#[inline(always)]
fn line16(r: u32) -> i32 {
    let m = (r & 0x7FFF) as i32;
    if r & 0x8000 != 0 {
        -m
    } else {
        m
    }
}

/// The same for float32 bits.
#[inline(always)]
fn line32(b: u32) -> i32 {
    let m = (b & 0x7FFF_FFFF) as i32;
    if b >> 31 != 0 {
        -m
    } else {
        m
    }
}

/// The statistics of one decoded block of `len` pairs (in `s.g`, `s.c`) starting at
/// flat index `start`.
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
unsafe fn block<V: F64x4>(
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
unsafe fn block_of<V: F64x4, E: Elem>(
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
trait Elem: Copy + Into<f64> {
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
fn fold(v: [f64; LANES]) -> f64 {
    v.iter().fold(0.0, |a, x| a + x)
}

/// The largest lane.
#[inline(always)]
fn fold_max(v: [f64; LANES]) -> f64 {
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

/// Sums, extremes and the count of the pairs of some blocks, for their statistics.
#[derive(Clone, Copy)]
struct Moments {
    n: u64,
    /// Σg, Σg², Σc, Σc².
    sums: [f64; 4],
    /// min g, max g, min c, max c.
    min_g: f64,
    max_g: f64,
    min_c: f64,
    max_c: f64,
    /// Every value was finite.
    finite: bool,
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
    fn add(&mut self, o: &Moments) {
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
    fn push(&mut self, x: f64, y: f64) {
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
    fn into_stats(self) -> Option<(Stats, Stats, u64)> {
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
unsafe fn block_moments<V: F64x4>(g: &[f32], c: &[f32]) -> Moments {
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
struct Decades {
    exact: u64,
    finite: u64,
    at_least: [u64; 32],
}

impl Decades {
    fn add(&mut self, o: &Decades) {
        self.exact += o.exact;
        self.finite += o.finite;
        for (a, b) in self.at_least.iter_mut().zip(o.at_least) {
            *a += b;
        }
    }

    /// Adds a decoded block; `ad` is scratch.
    fn add_block(&mut self, g: &[f32], c: &[f32], ad: &mut Vec<f64>) {
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
    fn into_histogram(self, buckets: usize) -> ErrorHistogram {
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
    use contract::site::{LayerPart, Site, Step};
    use dump::Manifest;

    fn unit(i: u64) -> f64 {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

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

    /// Float32 bit patterns spread over the whole line: every exponent, both signs,
    /// mantissas at and around the rounding points.
    fn sample_bits() -> impl Iterator<Item = u32> {
        (0..=0xFFFFu32)
            .flat_map(|hi| {
                [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
                    .map(|lo| (hi << 16) | lo)
            })
            .chain((0..2_000_000u64).map(|i| (unit(i).to_bits() >> 20) as u32))
    }

    #[test]
    fn branch_free_conversions_equal_the_half_crate() {
        for bits in sample_bits() {
            let x = f32::from_bits(bits);
            if !x.is_finite() {
                continue;
            }
            assert_eq!(bf16_bits(x), u32::from(half::bf16::from_f32(x).to_bits()), "{bits:#x}");
            assert_eq!(f16_bits(x), u32::from(half::f16::from_f32(x).to_bits()), "{bits:#x}");
        }
        for h in 0..=u16::MAX {
            let (a, b) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{h:#x}");
        }
    }

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
