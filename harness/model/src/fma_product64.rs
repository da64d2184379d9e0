//! The float64 matrix product of the reference's projections
//! ([`Products::Float64`](super::numerics::Products::Float64)): `out[m, n] = a[m, k] ·
//! w[n, k]ᵀ`, where every output element is one chain of fused multiply-adds over `k` in
//! index order, starting from zero, in float64:
//!
//! ```text
//! out[i][j] = fma(a[i][k-1], w[j][k-1], … fma(a[i][1], w[j][1], fma(a[i][0], w[j][0], 0)))
//! ```
//!
//! The same order as the float32 product of [`fma_product`](super::fma_product), so
//! each result's bits are named without reference to blocking, threads or the CPU. The
//! AVX-512 kernel computes it for 16 input rows (two 8-lane vectors) by 12 weight rows at
//! a time, carrying the chain across [`CHUNK`]-long slices of `k` through memory;
//! [`lanes_chunk`] computes the same chains as plain loops that the compiler vectorises
//! (compiled for AVX2 and FMA on an x86-64 CPU without AVX-512); without FMA the C
//! library's `fma` gives the same bits.
//!
//! The weight rows are read a chunk at a time as the product reaches it, widened from
//! their stored dtype into a slab that stays in the cache: no float64 copy of a whole
//! block of rows is written to memory and read back. While a chunk is multiplied, the
//! next chunk's rows are prefetched.

use super::fma_product::fit;

/// Input rows per kernel tile: two 8-lane vectors.
const TILE_ROWS: usize = 16;

/// Weight rows per kernel tile: 24 accumulators and the two input vectors stay in the 32
/// vector registers.
const TILE_COLS: usize = 12;

/// The slice of `k` one pass of the kernel covers: a tile's 12 weight rows (24 KiB of
/// float64) stay in the L1 cache while every input tile passes over them.
pub const CHUNK: usize = 256;

/// `k`'s chunks: `(start, length)` of each.
fn chunks(k: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..k).step_by(CHUNK).map(move |c0| (c0, CHUNK.min(k - c0)))
}

/// Input rows `a[m, k]` packed as tiles of 16 rows, each `[k][16]` (rows past `m` zero):
/// a tile's 16 values at one `k` are two contiguous vectors.
#[derive(Debug, Clone)]
pub struct PackedInput64 {
    m: usize,
    k: usize,
    data: Vec<f64>,
}

impl PackedInput64 {
    /// Packs row-major `a` (`[m, k]`).
    pub fn new(a: &[f64], m: usize, k: usize) -> PackedInput64 {
        assert_eq!(a.len(), m * k, "input rows are [m, k]");
        let tiles = m.div_ceil(TILE_ROWS);
        let mut data = vec![0.0f64; tiles * k * TILE_ROWS];
        for (i, row) in a.chunks_exact(k.max(1)).enumerate().take(m) {
            let tile = &mut data[(i / TILE_ROWS) * k * TILE_ROWS..][..k * TILE_ROWS];
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * TILE_ROWS + i % TILE_ROWS] = v;
            }
        }
        PackedInput64 { m, k, data }
    }

    fn tiles(&self) -> usize {
        self.m.div_ceil(TILE_ROWS)
    }
}

/// `out[m, n]` (row-major) `= a · wᵀ` for `n` weight rows of length `a`'s `k`, each
/// element the fused multiply-add chain of the module's documentation.
///
/// `read(j, c0, dst)` fills `dst` with weight row `j`'s values `c0..c0 + dst.len()`;
/// `prefetch(j, c0, len)` may hint that those values are read next (or do nothing).
/// `slab` and `sums` are the chunk of weights and the partial sums, buffers the caller
/// keeps from one call to the next.
pub fn product(
    a: &PackedInput64,
    n: usize,
    read: impl FnMut(usize, usize, &mut [f64]),
    prefetch: impl FnMut(usize, usize, usize),
    out: &mut [f64],
    slab: &mut Vec<f64>,
    sums: &mut Vec<f64>,
) {
    product_on(Kernel::best(), a, n, read, prefetch, out, slab, sums);
}

/// The code that computes the chains; every one gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// The AVX-512 kernel ([`x86::chunk`]).
    Avx512,
    /// [`lanes_chunk`] compiled for AVX2 and FMA.
    Avx2Fma,
    /// [`lanes_chunk`] compiled for the baseline of the target.
    Lanes,
}

impl Kernel {
    /// The fastest this CPU runs.
    fn best() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2Fma]
            .into_iter()
            .find(|k| k.runs_here())
            .unwrap_or(Kernel::Lanes)
    }

    /// Whether this CPU has the instructions of `self`.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            Kernel::Avx512 => std::is_x86_feature_detected!("avx512f"),
            Kernel::Avx2Fma => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            Kernel::Lanes => true,
        };
        #[cfg(not(target_arch = "x86_64"))]
        return self == Kernel::Lanes;
    }
}

/// [`product`] on `kernel`.
#[allow(clippy::too_many_arguments)]
fn product_on(
    kernel: Kernel,
    a: &PackedInput64,
    n: usize,
    mut read: impl FnMut(usize, usize, &mut [f64]),
    mut prefetch: impl FnMut(usize, usize, usize),
    out: &mut [f64],
    slab: &mut Vec<f64>,
    sums: &mut Vec<f64>,
) {
    let (m, k) = (a.m, a.k);
    assert_eq!(out.len(), m * n, "product output size");
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
    // Partial sums `[n][width]`: weight row by input row (padded to whole tiles).
    let width = a.tiles() * TILE_ROWS;
    sums.clear();
    sums.resize(n * width, 0.0);
    for (c0, kc) in chunks(k) {
        fit(slab, n * kc);
        for (j, row) in slab.chunks_exact_mut(kc).enumerate() {
            read(j, c0, row);
        }
        // A group of weight rows at a time, each group's next chunk hinted before it is
        // multiplied: the hints spread over the chunk's products.
        let next = (c0 + kc, CHUNK.min(k - (c0 + kc)));
        for j0 in (0..n).step_by(TILE_COLS) {
            let cols = TILE_COLS.min(n - j0);
            if next.1 > 0 {
                (j0..j0 + cols).for_each(|j| prefetch(j, next.0, next.1));
            }
            let slab = &slab[j0 * kc..][..cols * kc];
            let sums = &mut sums[j0 * width..][..cols * width];
            chunk_on(kernel, a, c0, kc, slab, cols, sums);
        }
    }
    for (i, o) in out.chunks_exact_mut(n.max(1)).enumerate().take(m) {
        for (j, o) in o.iter_mut().enumerate() {
            *o = sums[j * width + i];
        }
    }
}

/// One chunk of [`product_on`] for `n` weight rows on `kernel`, which this CPU runs
/// (asserted by [`product_on`]).
fn chunk_on(
    kernel: Kernel,
    a: &PackedInput64,
    c0: usize,
    kc: usize,
    slab: &[f64],
    n: usize,
    sums: &mut [f64],
) {
    match kernel {
        // SAFETY (both): the CPU has the instructions; `slab` is `[n][kc]` and `sums`
        // `[n][width]`, and `a` holds `width / 16` tiles of `[k][16]` with `c0 + kc <= k`.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { x86::chunk(a, c0, kc, slab, n, sums) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { x86::lanes_chunk_fma(a, c0, kc, slab, n, sums) },
        _ => lanes_chunk(a, c0, kc, slab, n, sums),
    }
}

/// One chunk of [`product`] as loops over a tile's 16 input rows, two weight rows at a
/// time: each row's chain continues in index order, and the 32 independent chains of a
/// step of `k` are what the compiler vectorises.
#[inline(always)]
fn lanes_chunk(a: &PackedInput64, c0: usize, kc: usize, slab: &[f64], n: usize, sums: &mut [f64]) {
    let (k, tiles) = (a.k, a.tiles());
    let width = tiles * TILE_ROWS;
    let mut j = 0;
    while j < n {
        let cols = if n - j >= 2 { 2 } else { 1 };
        for t in 0..tiles {
            let at = &a.data[t * k * TILE_ROWS + c0 * TILE_ROWS..][..kc * TILE_ROWS];
            let w = &slab[j * kc..][..cols * kc];
            let acc = &mut sums[j * width + t * TILE_ROWS..];
            if cols == 2 {
                lanes_tile::<2>(at, w, kc, acc, width);
            } else {
                lanes_tile::<1>(at, w, kc, acc, width);
            }
        }
        j += cols;
    }
}

/// `N` weight rows (`w`, `[N][kc]`) by one tile of 16 input rows (`at`, `[kc][16]`),
/// continuing the chains `acc[jj * width..][..16]`.
#[inline(always)]
fn lanes_tile<const N: usize>(at: &[f64], w: &[f64], kc: usize, acc: &mut [f64], width: usize) {
    let mut s = [[0.0f64; TILE_ROWS]; N];
    for (jj, s) in s.iter_mut().enumerate() {
        s.copy_from_slice(&acc[jj * width..][..TILE_ROWS]);
    }
    for (kk, av) in at.chunks_exact(TILE_ROWS).enumerate() {
        for (jj, s) in s.iter_mut().enumerate() {
            let wv = w[jj * kc + kk];
            for (s, &x) in s.iter_mut().zip(av) {
                *s = x.mul_add(wv, *s);
            }
        }
    }
    for (jj, s) in s.iter().enumerate() {
        acc[jj * width..][..TILE_ROWS].copy_from_slice(s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PackedInput64, TILE_COLS, TILE_ROWS};

    /// [`super::lanes_chunk`] compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// AVX2 and FMA; the operands as [`chunk`] takes them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lanes_chunk_fma(
        a: &PackedInput64,
        c0: usize,
        kc: usize,
        slab: &[f64],
        n: usize,
        sums: &mut [f64],
    ) {
        super::lanes_chunk(a, c0, kc, slab, n, sums)
    }

    /// One tile: 16 input rows (`a`, `[kc][16]`) by `N` weight rows (`w`, row stride
    /// `ws`) over `kc` values of `k`, its chains continued from `acc` (`[N][16]`, row
    /// stride `cs`) and written back there.
    ///
    /// # Safety
    /// AVX-512F; `a` readable for `kc * 16` values, `w` for `N` rows of `kc` at stride
    /// `ws`, `acc` readable and writable for `N` rows of 16 at stride `cs`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const N: usize>(
        kc: usize,
        a: *const f64,
        w: *const f64,
        ws: usize,
        acc: *mut f64,
        cs: usize,
    ) {
        let mut s = [[_mm512_setzero_pd(); 2]; N];
        for (j, s) in s.iter_mut().enumerate() {
            s[0] = _mm512_loadu_pd(acc.add(j * cs));
            s[1] = _mm512_loadu_pd(acc.add(j * cs + 8));
        }
        for kk in 0..kc {
            let a0 = _mm512_loadu_pd(a.add(kk * TILE_ROWS));
            let a1 = _mm512_loadu_pd(a.add(kk * TILE_ROWS + 8));
            for (j, s) in s.iter_mut().enumerate() {
                let b = _mm512_set1_pd(*w.add(j * ws + kk));
                s[0] = _mm512_fmadd_pd(a0, b, s[0]);
                s[1] = _mm512_fmadd_pd(a1, b, s[1]);
            }
        }
        for (j, s) in s.iter().enumerate() {
            _mm512_storeu_pd(acc.add(j * cs), s[0]);
            _mm512_storeu_pd(acc.add(j * cs + 8), s[1]);
        }
    }

    /// Continues every chain `sums[j][i]` (row stride `16 · a.tiles()`) of input row `i`
    /// and weight row `j` over the chunk `c0..c0 + kc` of `k`, whose weights `slab` holds
    /// (`[n][kc]`).
    ///
    /// # Safety
    /// AVX-512F; `slab.len() == n * kc`, `sums.len() == n * 16 * a.tiles()`,
    /// `c0 + kc <= a.k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chunk(
        a: &PackedInput64,
        c0: usize,
        kc: usize,
        slab: &[f64],
        n: usize,
        sums: &mut [f64],
    ) {
        let (k, tiles) = (a.k, a.tiles());
        let width = tiles * TILE_ROWS;
        for j0 in (0..n).step_by(TILE_COLS) {
            let cols = TILE_COLS.min(n - j0);
            let w = slab[j0 * kc..].as_ptr();
            for t in 0..tiles {
                let a = a.data[t * k * TILE_ROWS + c0 * TILE_ROWS..].as_ptr();
                let c = sums[j0 * width + t * TILE_ROWS..].as_mut_ptr();
                macro_rules! run {
                    ($($n:literal)*) => {
                        match cols {
                            $($n => tile::<$n>(kc, a, w, kc, c, width),)*
                            _ => unreachable!("a tile has 1 to {TILE_COLS} columns"),
                        }
                    };
                }
                run!(1 2 3 4 5 6 7 8 9 10 11 12);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// `len` values: mostly of one scale, some tiny (subnormal products), some large and
    /// of both signs (cancellation), a few zeros.
    fn values(rng: &mut SplitMix64, len: usize) -> Vec<f64> {
        (0..len)
            .map(|_| {
                let v = rng.uniform_pm1();
                match rng.below(20) {
                    0 => v * 1e-300,
                    1 => v * 1e12,
                    2 => 0.0,
                    _ => v,
                }
            })
            .collect()
    }

    /// The chain of the module's documentation, on the unpacked operands.
    fn chain(a: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for kk in 0..k {
                    s = a[i * k + kk].mul_add(w[j * k + kk], s);
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn run(kernel: Kernel, a: &[f64], w: &[f64], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut out = vec![f64::NAN; m * n];
        let read = |j: usize, c0: usize, dst: &mut [f64]| {
            dst.copy_from_slice(&w[j * k + c0..][..dst.len()])
        };
        let mut hinted = Vec::new();
        let prefetch = |j: usize, c0: usize, len: usize| hinted.push((j, c0, len));
        let (mut slab, mut sums) = (vec![f64::NAN; 3000], vec![f64::NAN; 5000]);
        let a = PackedInput64::new(a, m, k);
        product_on(kernel, &a, n, read, prefetch, &mut out, &mut slab, &mut sums);
        // Every chunk after the first is hinted for each row, within the row.
        assert_eq!(hinted.len(), n * k.div_ceil(CHUNK).saturating_sub(1));
        assert!(hinted.iter().all(|&(j, c0, len)| j < n && c0 > 0 && c0 + len <= k));
        out
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn every_output_is_the_fused_multiply_add_chain_over_k_in_order() {
        let kernels: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2Fma, Kernel::Lanes]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        // Sizes around the tile (16 × 12) and chunk (256) edges, and k = 0 and 1.
        let mut seed = 17;
        for (m, n, k) in [
            (1, 1, 1),
            (15, 11, 255),
            (16, 12, 256),
            (17, 13, 257),
            (70, 40, 1100),
            (9, 25, 0),
            (64, 1, 3),
        ] {
            seed += 1;
            let mut rng = SplitMix64::new(seed);
            let (a, w) = (values(&mut rng, m * k), values(&mut rng, n * k));
            let want = bits(&chain(&a, &w, m, n, k));
            for &kernel in &kernels {
                let got = bits(&run(kernel, &a, &w, (m, n, k)));
                assert_eq!(got, want, "{kernel:?}: {m}×{n}×{k}");
            }
        }
    }

    #[test]
    fn the_chain_is_not_a_pairwise_sum() {
        // The order is observable: a sum of the rounded products differs in some element.
        let (m, n, k) = (8, 8, 2000);
        let mut rng = SplitMix64::new(11);
        let (a, w) = (values(&mut rng, m * k), values(&mut rng, n * k));
        let out = run(Kernel::best(), &a, &w, (m, n, k));
        let summed: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k).map(|kk| a[i * k + kk] * w[j * k + kk]).sum()
            })
            .collect();
        assert_ne!(bits(&out), bits(&summed));
    }
}
