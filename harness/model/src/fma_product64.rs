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

#[cfg(any(test, target_arch = "x86_64"))]
use super::fma_tiles::TILE_COLS;
use super::fma_tiles::{lanes_chunk, product_on, Element, Kernel, Packed};

/// Input rows per kernel tile: two 8-lane vectors.
const TILE_ROWS: usize = 16;

/// The slice of `k` one pass of the kernel covers: a tile's 12 weight rows (24 KiB of float64)
/// stay in the L1 cache while every input tile passes over them.
pub const CHUNK: usize = 256;

/// Input rows `a[m, k]` packed as tiles of 16 rows, each `[k][16]` (rows past `m`
/// zero): a tile's 16 values at one `k` are two contiguous vectors.
pub type PackedInput64 = Packed<f64>;

impl Element for f64 {
    const TILE_ROWS: usize = TILE_ROWS;
    const CHUNK: usize = CHUNK;

    fn from_f64(v: f64) -> f64 {
        v
    }

    fn mul_add(self, a: f64, b: f64) -> f64 {
        f64::mul_add(self, a, b)
    }

    fn to_f64(self) -> f64 {
        self
    }

    fn chunk(
        kernel: Kernel,
        a: &PackedInput64,
        c0: usize,
        kc: usize,
        slab: &[f64],
        n: usize,
        sums: &mut [f64],
    ) {
        match kernel {
            // SAFETY (both): the CPU has the instructions (`product_on` asserts it);
            // `slab` is `[n][kc]` and `sums` `[n][width]`, and `a` holds `width / 16`
            // tiles of `[k][16]` with `c0 + kc <= k`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::chunk(a, c0, kc, slab, n, sums) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => unsafe { x86::lanes_chunk_fma(a, c0, kc, slab, n, sums) },
            _ => lanes_chunk::<f64, TILE_ROWS>(a, c0, kc, slab, n, sums),
        }
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    crate::fma_tiles::x86_kernels!(
        f64,
        PackedInput64,
        8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_storeu_pd
    );
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
