//! How a site's tensors are walked: cut into parallel tasks of whole blocks ([`Plan`]),
//! handed out a wave of tasks at a time ([`for_waves`]), each task's blocks listed in
//! index order ([`Pair::block_list`]) and run through a pass ([`BlockPass`]: every
//! measure, the same over float64 pairs, or the moments of the statistics), and the
//! measured blocks merged back in index order ([`Merge`]).

use std::ops::Range;

use super::kernels::{block, block_of};
use super::tallies::{block_moments, Decades, Moments};
use super::{BLOCK, TASK, TASK_BLOCKS, WAVE};
use crate::metrics::{Accumulator, Block, GroupL2};
use crate::simd::{F64x4, Portable};
use crate::verdict::{Groups, RowFilter};
use dump::{DType, Tensor};

/// Calls `wave` with the element ranges of the parallel tasks that cover a tensor of
/// `numel` elements cut in runs of `run`, [`WAVE`] tasks at a time, in index order;
/// the pages of `g` and `c` that a wave read are handed back after it when the tensor
/// takes several waves.
pub(super) fn for_waves(
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
pub(super) struct Pair<'a> {
    pub(super) gt: &'a Tensor,
    pub(super) ct: &'a Tensor,
    pub(super) gd: DType,
    pub(super) cd: DType,
    pub(super) gb: &'a [u8],
    pub(super) cb: &'a [u8],
    pub(super) eps: f64,
    pub(super) valid: &'a RowFilter<'a>,
    pub(super) run: usize,
}

impl<'a> Pair<'a> {
    pub(super) fn new(
        g: &'a Tensor,
        c: &'a Tensor,
        valid: &'a RowFilter<'a>,
        run: usize,
    ) -> Pair<'a> {
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

    /// Runs pass `P` over the blocks of `range`, on AVX2 lanes where the CPU has them.
    pub(super) fn on_lanes<P: BlockPass>(&self, range: Range<usize>) -> P::Out {
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
    pub(super) fn decades(&self, range: Range<usize>) -> Decades {
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
pub(super) trait BlockPass {
    type Out;
    /// The pass over the blocks of `range` on lanes `V`.
    ///
    /// # Safety
    /// The CPU has `V`'s features.
    unsafe fn run<V: F64x4>(pair: &Pair, range: Range<usize>) -> Self::Out;
}

/// Every measure of every block, each with the start of its run.
pub(super) struct MeasurePass;

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
pub(super) struct WidePass;

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
pub(super) struct StatisticsPass;

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
pub(super) struct Scratch {
    pub(super) g: Vec<f32>,
    pub(super) c: Vec<f32>,
    /// The block's pairs where either side is float64.
    pub(super) g64: Vec<f64>,
    pub(super) c64: Vec<f64>,
    /// Flat indices of the finite pairs, when a block holds NaN or Inf.
    pub(super) idx: Vec<usize>,
    /// |d| of each pair.
    pub(super) ad: Vec<f64>,
}

impl Scratch {
    pub(super) fn new() -> Scratch {
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
pub(super) struct Merge {
    pub(super) acc: Accumulator,
    pub(super) per_token: Option<GroupL2>,
    pub(super) per_head: Option<GroupL2>,
    pub(super) tokens: Option<Groups>,
    pub(super) heads: Option<Groups>,
    /// The run being summed: (its start, Σd², Σg², any new NaN/Inf).
    pub(super) open: Option<(usize, f64, f64, bool)>,
}

impl Merge {
    pub(super) fn push(&mut self, run_start: usize, b: &Block) {
        if self.open.is_some_and(|(s, ..)| s != run_start) {
            self.flush();
        }
        let (_, sdd, sgg, broken) = self.open.get_or_insert((run_start, 0.0, 0.0, false));
        *sdd += b.sdd;
        *sgg += b.sgg;
        *broken |= b.new_nonfinite > 0;
        self.acc.absorb(b);
    }

    pub(super) fn flush(&mut self) {
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
