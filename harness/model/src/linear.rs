//! A linear layer: `y = x · Wᵀ + b`, with `W` in HF's `[out, in]` layout
//! (`torch.nn.Linear.forward`, `F.linear(input, weight, bias)`).
//!
//! A weight stays in the checkpoint's stored dtype ([`Matrix::Stored`], a view into the
//! mapped file) and is read a block of [`ROW_BLOCK`] output rows at a time, when the
//! layer runs: host memory never holds a float64 copy of a matrix or a block. Each block is
//! one matrix product on the block's thread, each output element one fused multiply-add
//! chain over `k` in order: in float64 ([`fma_product64`]), or in float32 where the
//! numerics multiplies there ([`Products::Float32`]: a bfloat16/float16 port's float32
//! accumulation, [`fma_product`]), its weights widened (or rounded) a slice of `k` at a
//! time into the cache. The blocks run in parallel (rayon); each output element's
//! summation order is fixed by the chain, never by the block or the thread that ran it,
//! so the result is bit-identical whatever the thread count.

use std::cell::RefCell;

use ndarray::{s, Array1, Array2, Array3, ArrayView2, Axis};
use rayon::prelude::*;

use dump::Tensor;

use super::fma_product::{self, PackedInput};
use super::fma_product64::{self, PackedInput64};
use super::fma_tiles::fit;
use super::lora::Lora;
use super::numerics::{round_in_place, Numerics, Products, RoundAt};
use super::rowdot::rows_dot;

/// Output rows multiplied together by one task: their weights are read a slice of `k`
/// at a time.
pub const ROW_BLOCK: usize = 256;

/// Up to this many input rows, a stored matrix is multiplied a weight row at a time.
pub const VECTOR_ROWS: usize = 8;

thread_local! {
    /// A thread's chunk of widened weight rows and float64 partial sums for
    /// [`fma_product64::product`], kept from one block to the next (and across products)
    /// so that they are neither allocated nor zeroed again.
    static SLAB_F64: RefCell<(Vec<f64>, Vec<f64>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// A thread's chunk of rounded weight rows and float32 partial sums for
    /// [`fma_product::product`], kept the same way.
    static SLAB_F32: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A `[rows, cols]` matrix: widened to `f64` already, or stored in a checkpoint's dtype.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// Values in `f64`, already stored at `RoundAt::Weight` by whoever built it.
    Owned(Array2<f64>),
    /// A row-major `[rows, cols]` tensor in its stored dtype (memory-mapped or owned);
    /// its values are stored at `RoundAt::Weight` as they are read.
    Stored(Tensor),
}

impl Matrix {
    pub fn nrows(&self) -> usize {
        match self {
            Matrix::Owned(a) => a.nrows(),
            Matrix::Stored(t) => t.shape()[0],
        }
    }

    pub fn ncols(&self) -> usize {
        match self {
            Matrix::Owned(a) => a.ncols(),
            Matrix::Stored(t) => t.shape()[1],
        }
    }

    /// Rows `r0..r1` as `f64` `[r1 - r0, cols]`, stored at `RoundAt::Weight`.
    pub fn rows(&self, r0: usize, r1: usize, n: &dyn Numerics) -> Array2<f64> {
        let mut v = Vec::new();
        self.rows_into(r0, r1, n, &mut v);
        Array2::from_shape_vec((r1 - r0, self.ncols()), v).expect("block shape")
    }

    /// Rows `r0..r1` as `f64` into `out` (row-major, resized to fit), stored at
    /// `RoundAt::Weight`: [`Matrix::rows`]'s values.
    fn rows_into(&self, r0: usize, r1: usize, n: &dyn Numerics, out: &mut Vec<f64>) {
        match self {
            Matrix::Owned(a) => {
                out.clear();
                out.extend(a.slice(s![r0..r1, ..]).iter());
            }
            Matrix::Stored(t) => {
                fit(out, (r1 - r0) * self.ncols());
                t.read_f64_rounded_into(r0 * self.ncols(), out, n.weight_precision());
            }
        }
    }

    /// Row `r`'s values `c0..c0 + out.len()` as `f64`, stored at `RoundAt::Weight`.
    fn row_f64_into(&self, r: usize, c0: usize, n: &dyn Numerics, out: &mut [f64]) {
        match self {
            Matrix::Owned(a) => {
                let src = a.slice(s![r, c0..c0 + out.len()]);
                out.iter_mut().zip(src).for_each(|(d, &v)| *d = v);
            }
            Matrix::Stored(t) => {
                t.read_f64_rounded_into(r * self.ncols() + c0, out, n.weight_precision())
            }
        }
    }

    /// Hints that row `r`'s stored values `c0..c0 + len` are read soon: their cache lines
    /// are prefetched into the L2 cache (a stored matrix on x86-64; nothing otherwise).
    fn prefetch_row(&self, r: usize, c0: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Matrix::Stored(t) = self {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            let size = t.dtype().size();
            let start = (r * self.ncols() + c0) * size;
            let bytes = &t.bytes()[start..start + len * size];
            for line in bytes.chunks(64) {
                // SAFETY: a prefetch reads nothing architecturally; the address is
                // inside `bytes`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r, c0, len);
    }

    /// Row `r`'s values `c0..c0 + out.len()` as `f32`, stored at `RoundAt::Weight`
    /// (values of a dtype float32 holds exactly when the numerics multiplies in float32).
    fn row_f32_into(&self, r: usize, c0: usize, n: &dyn Numerics, out: &mut [f32]) {
        match self {
            Matrix::Owned(a) => {
                let src = a.slice(s![r, c0..c0 + out.len()]);
                out.iter_mut().zip(src).for_each(|(d, &v)| *d = v as f32);
            }
            Matrix::Stored(t) => {
                t.read_f32_rounded_into(r * self.ncols() + c0, out, n.weight_precision())
            }
        }
    }

    /// Row `r` as `f64` `[cols]`, stored at `RoundAt::Weight` (an embedding lookup).
    pub fn row(&self, r: usize, n: &dyn Numerics) -> Array1<f64> {
        self.rows(r, r + 1, n).index_axis_move(Axis(0), 0)
    }

    /// Rows `r0..r1`, columns `c0..c1` as `f64` `[r1 - r0, c1 - c0]`, stored at
    /// `RoundAt::Weight`: a block of a matrix a backward product reads untransposed.
    pub(crate) fn block(
        &self,
        (r0, r1): (usize, usize),
        (c0, c1): (usize, usize),
        n: &dyn Numerics,
    ) -> Array2<f64> {
        match self {
            Matrix::Owned(a) => a.slice(s![r0..r1, c0..c1]).to_owned(),
            Matrix::Stored(t) => {
                let (cols, w) = (self.ncols(), c1 - c0);
                let mut v = vec![0.0; (r1 - r0) * w];
                for (i, row) in v.chunks_mut(w.max(1)).enumerate().take(r1 - r0) {
                    t.read_f64_rounded_into((r0 + i) * cols + c0, row, n.weight_precision());
                }
                Array2::from_shape_vec((r1 - r0, w), v).expect("block shape")
            }
        }
    }

    /// The whole matrix as `f64` (tests and small models only).
    pub fn to_array(&self) -> Array2<f64> {
        match self {
            Matrix::Owned(a) => a.clone(),
            Matrix::Stored(t) => {
                self.rows(0, t.shape()[0], &super::numerics::Exact::new(dump::Precision::F32))
            }
        }
    }

    /// `x · selfᵀ`: `x` `[m, cols]` → `[m, rows]`, in parallel blocks of [`ROW_BLOCK`]
    /// output columns, each block's weights widened (and rounded) a slice of `k` at a time
    /// when it runs, and multiplied in the precision of `n.products()`.
    ///
    /// A few input rows (a decode step) make this a matrix-vector product bound by
    /// reading the weights: each stored weight row is then decoded and dotted with each
    /// input row as it is read ([`rows_dot`]), instead of through a matrix product's
    /// slabs.
    pub fn matmul_t(&self, x: ArrayView2<f64>, n: &dyn Numerics) -> Array2<f64> {
        let (rows, cols, m) = (self.nrows(), self.ncols(), x.nrows());
        let x = x.as_standard_layout();
        let x64 = x.as_slice().expect("standard layout is contiguous");
        let in_f32 = n.products() == Products::Float32;
        let by_row = matches!(self, Matrix::Stored(_)) && m <= VECTOR_ROWS;
        // float32 inputs: as rows for the row dots, laid out for the kernel otherwise.
        let x32: Vec<f32> =
            if in_f32 && by_row { x64.iter().map(|&v| v as f32).collect() } else { vec![] };
        let packed = (in_f32 && !by_row).then(|| PackedInput::new(x64, m, cols));
        let packed64 = (!in_f32 && !by_row).then(|| PackedInput64::new(x64, m, cols));
        if let Matrix::Stored(t) = self {
            // Read whole: its pages mapped in one call, the first time only.
            t.populate();
        }
        let blocks: Vec<usize> = (0..rows.div_ceil(ROW_BLOCK)).collect();
        let parts: Vec<Vec<f64>> = blocks
            .par_iter()
            .map(|&bi| {
                let (r0, r1) = (bi * ROW_BLOCK, ((bi + 1) * ROW_BLOCK).min(rows));
                let nb = r1 - r0;
                let mut part = vec![0.0; m * nb];
                match (self, in_f32) {
                    (Matrix::Stored(t), _) if by_row => {
                        let (at, rows) = (n.weight_precision(), (r0, r1));
                        if in_f32 {
                            rows_dot(t, at, rows, &x32, &mut part);
                        } else {
                            rows_dot(t, at, rows, x64, &mut part);
                        }
                    }
                    (_, false) => SLAB_F64.with_borrow_mut(|(slab, sums)| {
                        let a = packed64.as_ref().expect("packed for a float64 product");
                        let read = |j, c0, dst: &mut [f64]| self.row_f64_into(r0 + j, c0, n, dst);
                        let prefetch = |j, c0, len| self.prefetch_row(r0 + j, c0, len);
                        fma_product64::product(a, nb, read, prefetch, &mut part, slab, sums);
                    }),
                    (_, true) => SLAB_F32.with_borrow_mut(|(slab, sums)| {
                        let a = packed.as_ref().expect("packed for a float32 product");
                        let read = |j, c0, dst: &mut [f32]| self.row_f32_into(r0 + j, c0, n, dst);
                        let prefetch = |j, c0, len| self.prefetch_row(r0 + j, c0, len);
                        fma_product::product(a, nb, read, prefetch, &mut part, slab, sums);
                    }),
                }
                part
            })
            .collect();
        let mut y = Array2::zeros((m, rows));
        for (bi, p) in parts.into_iter().enumerate() {
            let r0 = bi * ROW_BLOCK;
            let nb = p.len() / m.max(1);
            let p = Array2::from_shape_vec((m, nb), p).expect("a part is [m, block rows]");
            y.slice_mut(s![.., r0..r0 + nb]).assign(&p);
        }
        y
    }
}

/// Weight `[out, in]`, optional bias `[out]` and optional LoRA bypass (CONTRACT §5).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Array1<f64>>,
    /// An unmerged adapter's `s · B(A(x))`, added to the dense output.
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }

    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }

    /// `[batch, seq, in]` → `[batch, seq, out]`, rounded at `RoundAt::Projection`, with
    /// its LoRA delta added if it has one.
    pub fn forward(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
        self.forward_adapted(x, n).0
    }

    /// [`Linear::forward`] and, where the layer has a LoRA bypass, its delta
    /// `s · B(A(x))` alone (`[batch, seq, out]`, the optional `.lora` site).
    pub fn forward_adapted(
        &self,
        x: &Array3<f64>,
        n: &dyn Numerics,
    ) -> (Array3<f64>, Option<Array3<f64>>) {
        let mut y = self.dense(x, n);
        let delta = self.lora.as_ref().map(|l| l.delta(x, n));
        if let Some(d) = &delta {
            Lora::add_to(&mut y, d, n);
        }
        (y, delta)
    }

    /// `x · Wᵀ + b`, rounded at `RoundAt::Projection`, without the LoRA bypass.
    pub(crate) fn dense(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
        let (b, t, h) = x.dim();
        debug_assert_eq!(h, self.in_features());
        let flat =
            x.view().into_shape_with_order((b * t, h)).map(|v| v.to_owned()).unwrap_or_else(|_| {
                x.as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((b * t, h))
                    .expect("standard layout reshapes")
            });
        let mut y = self.weight.matmul_t(flat.view(), n);
        if let Some(bias) = &self.bias {
            y += &bias.view().insert_axis(Axis(0));
        }
        let mut y =
            y.into_shape_with_order((b, t, self.out_features())).expect("row count is b * t");
        round_in_place(n, RoundAt::Projection, &mut y);
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::Exact;
    use dump::DType;

    fn matrix(rows: usize, cols: usize) -> Array2<f64> {
        Array2::from_shape_fn((rows, cols), |(i, j)| ((i * 31 + j * 17) % 23) as f64 / 8.0 - 1.3)
    }

    /// What a bfloat16 port's projections take from its numerics (the simulated
    /// Ascend port's at bfloat16): weights stored in bfloat16, products in float32.
    struct Bf16Products;

    impl Numerics for Bf16Products {
        fn name(&self) -> &str {
            "bf16-weights-f32-products"
        }
        fn rounds_at(&self, at: RoundAt) -> bool {
            at == RoundAt::Weight
        }
        fn weight_precision(&self) -> Option<dump::Precision> {
            Some(dump::Precision::Bf16)
        }
        fn round(&self, at: RoundAt, x: f64) -> f64 {
            if at == RoundAt::Weight {
                dump::Precision::Bf16.round(x)
            } else {
                x
            }
        }
        fn mask_fill(&self) -> f64 {
            crate::numerics::dtype_min(dump::Precision::Bf16)
        }
        fn mask_precision(&self) -> dump::Precision {
            dump::Precision::Bf16
        }
        fn products(&self) -> Products {
            Products::Float32
        }
    }

    #[test]
    fn blocked_product_equals_the_exact_product_to_float64_rounding() {
        // 600 rows: two full blocks and a partial one; 12 input rows take the blocked
        // matrix product.
        let w = matrix(600, 40);
        let x = matrix(12, 40);
        let n = Exact::new(dump::Precision::F32);
        let exact = x.dot(&w.t());
        let t = Tensor::from_array(&w, DType::F64);
        let stored = Matrix::Stored(t).matmul_t(x.view(), &n);
        assert_eq!(Matrix::Owned(w).matmul_t(x.view(), &n), stored);
        assert!(stored.iter().zip(&exact).all(|(a, b)| (a - b).abs() <= 1e-12), "{stored}");
    }

    #[test]
    fn an_owned_matrix_in_column_major_layout_multiplies_like_its_rows() {
        // `weights.square_transposed` builds its matrix as `w.t().to_owned()`.
        let w = matrix(40, 300);
        let t = w.t().to_owned();
        assert!(!t.is_standard_layout());
        let x = matrix(12, 40);
        let n = Exact::new(dump::Precision::F32);
        let y = Matrix::Owned(t.clone()).matmul_t(x.view(), &n);
        let standard = Matrix::Owned(t.as_standard_layout().into_owned());
        assert_eq!(y, standard.matmul_t(x.view(), &n));
    }

    #[test]
    fn a_few_input_rows_are_dotted_with_each_stored_weight_row() {
        let w = matrix(600, 40);
        let x = matrix(3, 40).mapv(|v| v.sin());
        let n = Exact::new(dump::Precision::F32);
        let by_row = Array2::from_shape_fn((3, 600), |(i, r)| x.row(i).dot(&w.row(r)));
        let t = Tensor::from_array(&w, DType::F64);
        assert_eq!(Matrix::Stored(t).matmul_t(x.view(), &n), by_row);
    }

    #[test]
    fn float32_products_are_float32_sums_of_the_rounded_inputs() {
        // bfloat16 weights read from a float32 tensor, bfloat16 inputs: every product is
        // exact in float32, so each output is a float32 value within the float32
        // accumulation bound (k ulps of the sum of |terms|) of the exact sum, whether a
        // blocked product (12 rows) or row dots (3 rows) computed it.
        let n = Bf16Products;
        let bf = |v: f64| dump::Precision::Bf16.round(v);
        let w = matrix(600, 300).mapv(|v| v.sin());
        let t = Matrix::Stored(Tensor::from_array(&w, DType::F32));
        let wr = w.mapv(bf);
        for m in [12, 3] {
            let x = matrix(m, 300).mapv(|v| bf(v.cos()));
            let y = t.matmul_t(x.view(), &n);
            let exact = x.dot(&wr.t());
            let mass = x.mapv(f64::abs).dot(&wr.mapv(f64::abs).t());
            for ((y, e), s) in y.iter().zip(&exact).zip(&mass) {
                assert_eq!(*y, f64::from(*y as f32), "{m} rows: not a float32 value");
                assert!((y - e).abs() <= 300.0 * f64::from(f32::EPSILON) * s, "{m}: {y} {e}");
            }
            assert_ne!(y, exact.mapv(|v| f64::from(v as f32)), "{m}: summed in float64");
        }
        // A blocked product's element is the fused multiply-add chain over `k` in order.
        let x = matrix(40, 300).mapv(|v| bf(v.cos()));
        let y = t.matmul_t(x.view(), &n);
        for ((i, j), y) in y.indexed_iter() {
            let chain =
                (0..300).fold(0.0f32, |s, k| (x[[i, k]] as f32).mul_add(wr[[j, k]] as f32, s));
            assert_eq!(y.to_bits(), f64::from(chain).to_bits(), "[{i}, {j}]");
        }
    }

    #[test]
    fn the_product_is_bit_identical_on_one_and_two_threads() {
        let w = matrix(700, 300);
        let t = Matrix::Stored(Tensor::from_array(&w, DType::F32));
        let exact = Exact::new(dump::Precision::F32);
        let bf16 = Bf16Products;
        let numerics: [&dyn Numerics; 2] = [&exact, &bf16];
        for (n, m) in numerics.into_iter().flat_map(|n| [(n, 5), (n, 40)]) {
            let x = matrix(m, 300).mapv(|v| v.sin() * 1e-3 + v);
            let on = |k: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(k)
                    .build()
                    .expect("pool")
                    .install(|| t.matmul_t(x.view(), n))
            };
            let (one, two) = (on(1), on(2));
            assert!(one.iter().zip(two.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}");
        }
    }
}
