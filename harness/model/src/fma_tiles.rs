//! What the float32 and float64 fused multiply-add products
//! ([`fma_product`](super::fma_product), [`fma_product64`](super::fma_product64)) share:
//! the input rows packed as tiles, the choice of kernel, and the pass over `k` a chunk at
//! a time that reads each chunk of the weight rows into a slab, hints the next one and
//! hands each group of weight rows to the element type's kernel. Each element type
//! ([`Element`]) brings its tile height, its chunk length and its kernels.

/// Weight rows per kernel tile: 24 accumulators and the two input vectors stay in the 32
/// vector registers.
pub(super) const TILE_COLS: usize = 12;

/// `v` with `len` elements, its contents left as they are where it had them (every
/// caller overwrites them all): a buffer a thread keeps between products, resized
/// without being zeroed (here and in `linear`).
pub(super) fn fit<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    v.truncate(len);
    v.resize(len, T::default());
}

/// The code that computes the chains; every one gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// The AVX-512 kernel of the element type.
    Avx512,
    /// The element type's plain loops compiled for AVX2 and FMA.
    Avx2Fma,
    /// The element type's plain loops compiled for the baseline of the target.
    Lanes,
}

impl Kernel {
    /// The fastest this CPU runs.
    pub(super) fn best() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2Fma]
            .into_iter()
            .find(|k| k.runs_here())
            .unwrap_or(Kernel::Lanes)
    }

    /// Whether this CPU has the instructions of `self`.
    pub(super) fn runs_here(self) -> bool {
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

/// A type the products sum in, with its tiles and kernels.
pub(super) trait Element: Copy + Default + Send + Sync + 'static {
    /// Input rows per kernel tile: two vectors of the type.
    const TILE_ROWS: usize;
    /// The slice of `k` one pass of the kernel covers: a tile's [`TILE_COLS`] weight rows
    /// stay in the L1 cache while every input tile passes over them.
    const CHUNK: usize;

    /// `v` as this type (rounded to nearest).
    fn from_f64(v: f64) -> Self;

    fn to_f64(self) -> f64;

    /// `self · a + b` rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;

    /// Continues every chain `sums[j][i]` (row stride `TILE_ROWS · a.tiles()`) of input
    /// row `i` and weight row `j < n` over `k` in `c0..c0 + kc`, the weights `slab`
    /// (`[n][kc]`), on `kernel`, which this CPU runs.
    fn chunk(
        kernel: Kernel,
        a: &Packed<Self>,
        c0: usize,
        kc: usize,
        slab: &[Self],
        n: usize,
        sums: &mut [Self],
    );
}

/// `k`'s chunks for element `T`: `(start, length)` of each.
pub(super) fn chunks<T: Element>(k: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..k).step_by(T::CHUNK).map(move |c0| (c0, T::CHUNK.min(k - c0)))
}

/// Input rows `a[m, k]` packed as tiles of `T::TILE_ROWS` rows, each `[k][TILE_ROWS]`
/// (rows past `m` zero): a tile's values at one `k` are two contiguous vectors.
#[derive(Debug, Clone)]
pub struct Packed<T> {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) data: Vec<T>,
}

impl<T: Element> Packed<T> {
    /// Packs row-major `a` (`[m, k]`), each value as `T`.
    pub fn new<V: Copy + Into<f64>>(a: &[V], m: usize, k: usize) -> Packed<T> {
        assert_eq!(a.len(), m * k, "input rows are [m, k]");
        let rows = T::TILE_ROWS;
        let tiles = m.div_ceil(rows);
        let mut data = vec![T::default(); tiles * k * rows];
        for (i, row) in a.chunks_exact(k.max(1)).enumerate().take(m) {
            let tile = &mut data[(i / rows) * k * rows..][..k * rows];
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * rows + i % rows] = T::from_f64(v.into());
            }
        }
        Packed { m, k, data }
    }

    pub(super) fn tiles(&self) -> usize {
        self.m.div_ceil(T::TILE_ROWS)
    }
}

/// `out[m, n]` (row-major) `= a · wᵀ` on `kernel`: the weights are read a chunk of `k` at
/// a time, as the product reaches it (`read(j, c0, dst)` fills `dst` with weight row
/// `j`'s values `c0..c0 + dst.len()`, so that only one chunk of the rows is ever held, in
/// the cache), and each group of weight rows' next chunk is hinted (`prefetch(j, c0,
/// len)`) before the group is multiplied. `slab` and `sums` are the chunk and the partial
/// sums, buffers the caller keeps from one call to the next.
#[allow(clippy::too_many_arguments)]
pub(super) fn product_on<T: Element>(
    kernel: Kernel,
    a: &Packed<T>,
    n: usize,
    mut read: impl FnMut(usize, usize, &mut [T]),
    mut prefetch: impl FnMut(usize, usize, usize),
    out: &mut [f64],
    slab: &mut Vec<T>,
    sums: &mut Vec<T>,
) {
    let (m, k) = (a.m, a.k);
    assert_eq!(out.len(), m * n, "product output size");
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
    // Partial sums `[n][width]`: weight row by input row (padded to whole tiles).
    let width = a.tiles() * T::TILE_ROWS;
    sums.clear();
    sums.resize(n * width, T::default());
    for (c0, kc) in chunks::<T>(k) {
        fit(slab, n * kc);
        for (j, row) in slab.chunks_exact_mut(kc).enumerate() {
            read(j, c0, row);
        }
        // A group of weight rows at a time, each group's next chunk hinted before it is
        // multiplied: the hints spread over the chunk's products.
        let next = (c0 + kc, T::CHUNK.min(k - (c0 + kc)));
        for j0 in (0..n).step_by(TILE_COLS) {
            let cols = TILE_COLS.min(n - j0);
            if next.1 > 0 {
                (j0..j0 + cols).for_each(|j| prefetch(j, next.0, next.1));
            }
            let slab = &slab[j0 * kc..][..cols * kc];
            let sums = &mut sums[j0 * width..][..cols * width];
            T::chunk(kernel, a, c0, kc, slab, cols, sums);
        }
    }
    for (i, o) in out.chunks_exact_mut(n.max(1)).enumerate().take(m) {
        for (j, o) in o.iter_mut().enumerate() {
            *o = sums[j * width + i].to_f64();
        }
    }
}

/// One chunk of a product as loops over a tile's `R` (`T::TILE_ROWS`) input rows, two
/// weight rows at a time: each row's chain continues in index order, and the `2R`
/// independent chains of a step of `k` are what the compiler vectorises. The
/// element type's `mul_add` is one fused multiply-add (the C library's where the CPU
/// has none), so these chains are the AVX-512 kernel's bit for bit.
#[inline(always)]
pub(super) fn lanes_chunk<T: Element, const R: usize>(
    a: &Packed<T>,
    c0: usize,
    kc: usize,
    slab: &[T],
    n: usize,
    sums: &mut [T],
) {
    debug_assert_eq!(R, T::TILE_ROWS);
    let (k, tiles) = (a.k, a.tiles());
    let width = tiles * R;
    let mut j = 0;
    while j < n {
        let cols = if n - j >= 2 { 2 } else { 1 };
        for t in 0..tiles {
            let at = &a.data[t * k * R + c0 * R..][..kc * R];
            let w = &slab[j * kc..][..cols * kc];
            let acc = &mut sums[j * width + t * R..];
            if cols == 2 {
                lanes_tile::<T, 2, R>(at, w, kc, acc, width);
            } else {
                lanes_tile::<T, 1, R>(at, w, kc, acc, width);
            }
        }
        j += cols;
    }
}

/// `N` weight rows (`w`, `[N][kc]`) by one tile of `R` input rows (`at`, `[kc][R]`),
/// continuing the chains `acc[jj * width..][..R]`.
#[inline(always)]
fn lanes_tile<T: Element, const N: usize, const R: usize>(
    at: &[T],
    w: &[T],
    kc: usize,
    acc: &mut [T],
    width: usize,
) {
    let mut s = [[T::default(); R]; N];
    for (jj, s) in s.iter_mut().enumerate() {
        s.copy_from_slice(&acc[jj * width..][..R]);
    }
    for (kk, av) in at.chunks_exact(R).enumerate() {
        for (jj, s) in s.iter_mut().enumerate() {
            let wv = w[jj * kc + kk];
            for (s, &x) in s.iter_mut().zip(av) {
                *s = x.mul_add(wv, *s);
            }
        }
    }
    for (jj, s) in s.iter().enumerate() {
        acc[jj * width..][..R].copy_from_slice(s);
    }
}

/// The x86-64 kernels of element type `$t` (tiles of two `$half`-lane AVX-512 vectors,
/// `TILE_ROWS` rows, packed as `$packed`), by its intrinsics: [`lanes_chunk`] compiled
/// with AVX2 and FMA (`lanes_chunk_fma`), and the AVX-512 kernel (`chunk`), which
/// carries a tile of `TILE_ROWS` input rows by up to [`TILE_COLS`] weight rows in
/// registers over a chunk of `k`.
macro_rules! x86_kernels {
    ($t:ty, $packed:ty, $half:literal, $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $store:ident) => {
        use std::arch::x86_64::*;

        use super::{$packed, TILE_COLS, TILE_ROWS};

        /// [`lanes_chunk`](crate::fma_tiles::lanes_chunk) compiled with AVX2 and FMA.
        ///
        /// # Safety
        /// AVX2 and FMA; the operands as [`chunk`] takes them.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn lanes_chunk_fma(
            a: &$packed,
            c0: usize,
            kc: usize,
            slab: &[$t],
            n: usize,
            sums: &mut [$t],
        ) {
            crate::fma_tiles::lanes_chunk::<$t, TILE_ROWS>(a, c0, kc, slab, n, sums)
        }

        /// One tile: `TILE_ROWS` input rows (`a`, `[kc][TILE_ROWS]`) by `N` weight rows
        /// (`w`, row stride `ws`) over `kc` values of `k`, its chains continued from
        /// `acc` (`[N][TILE_ROWS]`, row stride `cs`) and written back there.
        ///
        /// # Safety
        /// AVX-512F; `a` readable for `kc * TILE_ROWS` values, `w` for `N` rows of `kc`
        /// at stride `ws`, `acc` readable and writable for `N` rows of `TILE_ROWS` at
        /// stride `cs`.
        #[target_feature(enable = "avx512f")]
        unsafe fn tile<const N: usize>(
            kc: usize,
            a: *const $t,
            w: *const $t,
            ws: usize,
            acc: *mut $t,
            cs: usize,
        ) {
            let mut s = [[$zero(); 2]; N];
            for (j, s) in s.iter_mut().enumerate() {
                s[0] = $load(acc.add(j * cs));
                s[1] = $load(acc.add(j * cs + $half));
            }
            for kk in 0..kc {
                let a0 = $load(a.add(kk * TILE_ROWS));
                let a1 = $load(a.add(kk * TILE_ROWS + $half));
                for (j, s) in s.iter_mut().enumerate() {
                    let b = $set1(*w.add(j * ws + kk));
                    s[0] = $fmadd(a0, b, s[0]);
                    s[1] = $fmadd(a1, b, s[1]);
                }
            }
            for (j, s) in s.iter().enumerate() {
                $store(acc.add(j * cs), s[0]);
                $store(acc.add(j * cs + $half), s[1]);
            }
        }

        /// Continues every chain `sums[j][i]` (row stride `TILE_ROWS · a.tiles()`) of
        /// input row `i` and weight row `j` over the chunk `c0..c0 + kc` of `k`, whose
        /// weights `slab` holds (`[n][kc]`).
        ///
        /// # Safety
        /// AVX-512F; `slab.len() == n * kc`, `sums.len() == n * TILE_ROWS * a.tiles()`,
        /// `c0 + kc <= a.k`.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn chunk(
            a: &$packed,
            c0: usize,
            kc: usize,
            slab: &[$t],
            n: usize,
            sums: &mut [$t],
        ) {
            let (k, tiles) = (a.k, a.tiles());
            let width = tiles * TILE_ROWS;
            for j0 in (0..n).step_by(TILE_COLS) {
                let cols = TILE_COLS.min(n - j0);
                let w = slab[j0 * kc..].as_ptr();
                for t in 0..tiles {
                    let a = a.data[t * k * TILE_ROWS + c0 * TILE_ROWS..].as_ptr();
                    let c = sums[j0 * width + t * TILE_ROWS..].as_mut_ptr();
                    match cols {
                        1 => tile::<1>(kc, a, w, kc, c, width),
                        2 => tile::<2>(kc, a, w, kc, c, width),
                        3 => tile::<3>(kc, a, w, kc, c, width),
                        4 => tile::<4>(kc, a, w, kc, c, width),
                        5 => tile::<5>(kc, a, w, kc, c, width),
                        6 => tile::<6>(kc, a, w, kc, c, width),
                        7 => tile::<7>(kc, a, w, kc, c, width),
                        8 => tile::<8>(kc, a, w, kc, c, width),
                        9 => tile::<9>(kc, a, w, kc, c, width),
                        10 => tile::<10>(kc, a, w, kc, c, width),
                        11 => tile::<11>(kc, a, w, kc, c, width),
                        12 => tile::<12>(kc, a, w, kc, c, width),
                        _ => unreachable!("a tile has 1 to {TILE_COLS} columns"),
                    }
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use x86_kernels;
