//! A linear layer: `y = x · Wᵀ + b`, with `W` in HF's `[out, in]` layout
//! (`torch.nn.Linear.forward`, `F.linear(input, weight, bias)`).
//!
//! A weight stays in the checkpoint's stored dtype ([`Matrix::Stored`], a view into the
//! mapped file) and is widened to `f64` a block of [`ROW_BLOCK`] output rows at a time,
//! when the layer runs: host memory never holds a float64 copy of a whole matrix. The
//! blocks are computed in parallel (rayon); each output element is one dot product
//! whose summation order depends only on the block, never on the thread that ran it, so
//! the result is bit-identical whatever the thread count.

use ndarray::{s, Array1, Array2, Array3, ArrayView2, Axis};
use rayon::prelude::*;

use crate::dump::Tensor;

use super::numerics::{round_in_place, Numerics, RoundAt};

/// Output rows widened and multiplied together: 256 rows of a 14336-wide matrix are
/// 28 MiB of `f64` per thread.
pub const ROW_BLOCK: usize = 256;

/// Up to this many input rows, a stored matrix is multiplied a weight row at a time.
const VECTOR_ROWS: usize = 8;

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
        match self {
            Matrix::Owned(a) => a.slice(s![r0..r1, ..]).to_owned(),
            Matrix::Stored(t) => {
                let c = self.ncols();
                let mut v = vec![0.0; (r1 - r0) * c];
                t.read_f64_rounded_into(r0 * c, &mut v, n.weight_precision());
                Array2::from_shape_vec((r1 - r0, c), v).expect("block shape")
            }
        }
    }

    /// Row `r` as `f64` `[cols]`, stored at `RoundAt::Weight` (an embedding lookup).
    pub fn row(&self, r: usize, n: &dyn Numerics) -> Array1<f64> {
        self.rows(r, r + 1, n).index_axis_move(Axis(0), 0)
    }

    /// The whole matrix as `f64` (tests and small models only).
    pub fn to_array(&self) -> Array2<f64> {
        match self {
            Matrix::Owned(a) => a.clone(),
            Matrix::Stored(t) => self.rows(
                0,
                t.shape()[0],
                &super::numerics::Exact::new(crate::dump::Precision::F32),
            ),
        }
    }

    /// `x · selfᵀ`: `x` `[m, cols]` → `[m, rows]`, in parallel blocks of [`ROW_BLOCK`]
    /// output columns, each block's weights widened (and rounded) when it runs.
    ///
    /// A few input rows (a decode step) make this a matrix-vector product bound by
    /// reading the weights: a stored matrix is then widened one row at a time into a
    /// buffer that stays in cache and dotted with each input row, instead of widening
    /// and packing whole blocks for a matrix product.
    pub fn matmul_t(&self, x: ArrayView2<f64>, n: &dyn Numerics) -> Array2<f64> {
        let rows = self.nrows();
        let blocks: Vec<usize> = (0..rows.div_ceil(ROW_BLOCK)).collect();
        let by_row = matches!(self, Matrix::Stored(_)) && x.nrows() <= VECTOR_ROWS;
        let parts: Vec<Array2<f64>> = blocks
            .par_iter()
            .map(|&bi| {
                let (r0, r1) = (bi * ROW_BLOCK, ((bi + 1) * ROW_BLOCK).min(rows));
                match self {
                    Matrix::Owned(a) => x.dot(&a.slice(s![r0..r1, ..]).t()),
                    Matrix::Stored(t) if by_row => {
                        let c = self.ncols();
                        let mut w = Array1::zeros(c);
                        let mut part = Array2::zeros((x.nrows(), r1 - r0));
                        for r in r0..r1 {
                            let buf = w.as_slice_mut().expect("a new array is contiguous");
                            t.read_f64_rounded_into(r * c, buf, n.weight_precision());
                            for (i, xi) in x.outer_iter().enumerate() {
                                part[[i, r - r0]] = xi.dot(&w);
                            }
                        }
                        part
                    }
                    Matrix::Stored(_) => x.dot(&self.rows(r0, r1, n).t()),
                }
            })
            .collect();
        let mut y = Array2::zeros((x.nrows(), rows));
        for (bi, p) in parts.into_iter().enumerate() {
            let r0 = bi * ROW_BLOCK;
            y.slice_mut(s![.., r0..r0 + p.ncols()]).assign(&p);
        }
        y
    }
}

/// Weight `[out, in]` and optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Array1<f64>>,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }

    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }

    /// `[batch, seq, in]` → `[batch, seq, out]`, rounded at `RoundAt::Projection`.
    pub fn forward(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
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
    use crate::dump::DType;
    use crate::model::numerics::Exact;

    fn matrix(rows: usize, cols: usize) -> Array2<f64> {
        Array2::from_shape_fn((rows, cols), |(i, j)| ((i * 31 + j * 17) % 23) as f64 / 8.0 - 1.3)
    }

    #[test]
    fn blocked_stored_product_equals_the_whole_product() {
        // 600 rows: two full blocks and a partial one; 12 input rows take the blocked
        // matrix product.
        let w = matrix(600, 40);
        let x = matrix(12, 40);
        let n = Exact::new(crate::dump::Precision::F32);
        let whole = x.dot(&w.t());
        let t = Tensor::from_array(&w, DType::F64);
        assert_eq!(Matrix::Stored(t).matmul_t(x.view(), &n), whole);
        assert_eq!(Matrix::Owned(w).matmul_t(x.view(), &n), whole);
    }

    #[test]
    fn a_few_input_rows_are_dotted_with_each_stored_weight_row() {
        let w = matrix(600, 40);
        let x = matrix(3, 40).mapv(|v| v.sin());
        let n = Exact::new(crate::dump::Precision::F32);
        let by_row = Array2::from_shape_fn((3, 600), |(i, r)| x.row(i).dot(&w.row(r)));
        let t = Tensor::from_array(&w, DType::F64);
        assert_eq!(Matrix::Stored(t).matmul_t(x.view(), &n), by_row);
    }

    #[test]
    fn the_product_is_bit_identical_on_one_and_two_threads() {
        let w = matrix(700, 300);
        let x = matrix(5, 300).mapv(|v| v.sin() * 1e-3 + v);
        let t = Matrix::Stored(Tensor::from_array(&w, DType::F32));
        let n = Exact::new(crate::dump::Precision::F32);
        let on = |k: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(k)
                .build()
                .expect("pool")
                .install(|| t.matmul_t(x.view(), &n))
        };
        let (one, two) = (on(1), on(2));
        assert!(one.iter().zip(two.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
