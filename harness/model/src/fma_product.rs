//! The float32 matrix product of a bfloat16/float16 port's projections
//! ([`Products::Float32`](super::numerics::Products::Float32)): `out[m, n] = a[m, k] ·
//! w[n, k]ᵀ`, where every output element is one chain of fused multiply-adds over `k` in
//! index order, starting from zero:
//!
//! ```text
//! out[i][j] = fma(a[i][k-1], w[j][k-1], … fma(a[i][1], w[j][1], fma(a[i][0], w[j][0], 0)))
//! ```
//!
//! That order names each result's bits without reference to blocking, threads or the
//! CPU. The AVX-512 kernel computes it for 32 input rows (two 16-lane vectors) by 12
//! weight rows at a time, carrying the chain across [`CHUNK`]-long slices of `k` through
//! memory; [`lanes_chunk`] computes the same chains for 32 input rows by 2 weight rows
//! as plain loops over the rows, which the compiler turns into vector fused
//! multiply-adds where it may use them: compiled for AVX2 and FMA, the path of an x86-64
//! CPU without AVX-512, or on a target whose baseline has them (aarch64). An x86-64 CPU
//! without FMA gets the same bits from the C library's `fmaf`, one element at a time.
//!
//! The input rows are laid out for the kernel once per product ([`PackedInput`]); the
//! weight rows are read a chunk at a time as the product reaches it, so that a chunk is
//! rounded to the weight precision into the cache and used there.

#[cfg(any(test, target_arch = "x86_64"))]
use super::fma_tiles::TILE_COLS;
use super::fma_tiles::{lanes_chunk, product_on, Element, Kernel, Packed};

/// Input rows per kernel tile: two 16-lane vectors.
const TILE_ROWS: usize = 32;

/// The slice of `k` one pass of the kernel covers: a tile's 12 weight rows (24 KiB)
/// stay in the L1 cache while every input tile passes over them.
pub const CHUNK: usize = 512;

/// Input rows `a[m, k]` packed as tiles of 32 rows, each `[k][32]` (rows past `m`
/// zero): a tile's 32 values at one `k` are two contiguous vectors.
pub type PackedInput = Packed<f32>;

impl Element for f32 {
    const TILE_ROWS: usize = TILE_ROWS;
    const CHUNK: usize = CHUNK;

    fn from_f64(v: f64) -> f32 {
        v as f32
    }

    fn mul_add(self, a: f32, b: f32) -> f32 {
        f32::mul_add(self, a, b)
    }

    fn to_f64(self) -> f64 {
        f64::from(self)
    }

    fn chunk(
        kernel: Kernel,
        a: &PackedInput,
        c0: usize,
        kc: usize,
        slab: &[f32],
        n: usize,
        sums: &mut [f32],
    ) {
        match kernel {
            // SAFETY (both): the CPU has the instructions (`product_on` asserts it);
            // `slab` is `[n][kc]` and `sums` `[n][width]`, and `a` holds `width / 32`
            // tiles of `[k][32]` with `c0 + kc <= k`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::chunk(a, c0, kc, slab, n, sums) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => unsafe { x86::lanes_chunk_fma(a, c0, kc, slab, n, sums) },
            _ => lanes_chunk::<f32, TILE_ROWS>(a, c0, kc, slab, n, sums),
        }
    }
}

/// `out[m, n]` (row-major) `= a · wᵀ` for `n` weight rows of length `a`'s `k`, each
/// element the fused multiply-add chain of the module's documentation.
///
/// The weights are read a chunk of `k` at a time, as the product reaches it:
/// `read(j, c0, dst)` fills `dst` with weight row `j`'s values `c0..c0 + dst.len()`, so
/// that only one chunk of the rows (`n × CHUNK`) is ever held, in the cache;
/// `prefetch(j, c0, len)` may hint that row `j`'s values `c0..c0 + len` are read next (the
/// next chunk's, called as each row of a chunk is read), or do nothing. `slab` and `sums`
/// are the chunk and the float32 partial sums, buffers the caller keeps from one call to
/// the next.
pub fn product(
    a: &PackedInput,
    n: usize,
    read: impl FnMut(usize, usize, &mut [f32]),
    prefetch: impl FnMut(usize, usize, usize),
    out: &mut [f64],
    slab: &mut Vec<f32>,
    sums: &mut Vec<f32>,
) {
    product_on(Kernel::best(), a, n, read, prefetch, out, slab, sums);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    crate::fma_tiles::x86_kernels!(
        f32,
        PackedInput,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// `m × k` values: mostly of one scale, some tiny (subnormal products), some large
    /// and of both signs (cancellation), a few zeros.
    fn values(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let v = rng.uniform_pm1() as f32;
                match rng.below(20) {
                    0 => v * 1e-30,
                    1 => v * 1e6,
                    2 => 0.0,
                    _ => v,
                }
            })
            .collect()
    }

    /// The chain of the module's documentation, on the unpacked operands.
    fn chain(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f32;
                for kk in 0..k {
                    s = a[i * k + kk].mul_add(w[j * k + kk], s);
                }
                out[i * n + j] = f64::from(s);
            }
        }
        out
    }

    fn operands(m: usize, n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SplitMix64::new(seed);
        (values(&mut rng, m * k), values(&mut rng, n * k))
    }

    /// `a · wᵀ` through [`product_on`], `w` row-major `[n, k]`.
    fn run(kernel: Kernel, a: &[f32], w: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut out = vec![f64::NAN; m * n];
        let read = |j: usize, c0: usize, dst: &mut [f32]| {
            dst.copy_from_slice(&w[j * k + c0..][..dst.len()])
        };
        let (mut slab, mut sums) = (vec![f32::NAN; 3000], vec![f32::NAN; 5000]);
        let a = PackedInput::new(a, m, k);
        product_on(kernel, &a, n, read, |_, _, _| {}, &mut out, &mut slab, &mut sums);
        out
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn every_output_is_the_fused_multiply_add_chain_over_k_in_order() {
        // Every kernel this CPU runs.
        let kernels: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2Fma, Kernel::Lanes]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        // Sizes around the tile (32 × 12) and chunk (512) edges, and k = 0 and 1.
        let mut seed = 7;
        for (m, n, k) in [
            (1, 1, 1),
            (31, 11, 511),
            (32, 12, 512),
            (33, 13, 513),
            (70, 40, 1100),
            (9, 25, 0),
            (64, 1, 3),
        ] {
            seed += 1;
            let (a, w) = operands(m, n, k, seed);
            let want = bits(&chain(&a, &w, m, n, k));
            for &kernel in &kernels {
                let got = bits(&run(kernel, &a, &w, (m, n, k)));
                assert_eq!(got, want, "{kernel:?}: {m}×{n}×{k}");
            }
        }
    }

    #[test]
    fn the_chain_is_not_a_pairwise_or_float64_sum() {
        // The order is observable: a float64 sum rounded once differs in some element.
        let (m, n, k) = (8, 8, 2000);
        let (a, w) = operands(m, n, k, 11);
        let out = run(Kernel::best(), &a, &w, (m, n, k));
        let wide: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let s: f64 =
                    (0..k).map(|kk| f64::from(a[i * k + kk]) * f64::from(w[j * k + kk])).sum();
                f64::from(s as f32)
            })
            .collect();
        assert_ne!(bits(&out), bits(&wide));
    }
}
