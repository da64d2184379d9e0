//! Token embedding: `e[b, t] = W[ids[b, t]]` (`nn.Embedding`, `LlamaModel.embed_tokens`).
//! Only the rows of the ids fed are read from the table (stored at `RoundAt::Weight`).

use ndarray::Array3;

use contract::error::{Error, Result};

use super::linear::Matrix;
use super::numerics::{round_in_place, Numerics, RoundAt};

/// The embedding table `[vocab, hidden]`.
#[derive(Debug, Clone, Copy)]
pub struct Embedding<'w> {
    pub weight: &'w Matrix,
}

impl Embedding<'_> {
    /// `ids` `[batch][seq]` → `[batch, seq, hidden]`. An id outside the vocabulary is a
    /// `Usage` error naming it.
    pub fn forward(&self, ids: &[Vec<i64>], n: &dyn Numerics) -> Result<Array3<f64>> {
        let (b, t, h) = (ids.len(), ids.first().map_or(0, Vec::len), self.weight.ncols());
        let v = self.weight.nrows();
        let mut out = Array3::zeros((b, t, h));
        for (bi, row) in ids.iter().enumerate() {
            for (ti, &id) in row.iter().enumerate() {
                let idx = usize::try_from(id).ok().filter(|&i| i < v).ok_or_else(|| {
                    Error::scenario(
                        "input_ids",
                        format!(
                            "token id {id} at [{bi}][{ti}] is outside the vocabulary (size {v})"
                        ),
                    )
                })?;
                out.slice_mut(ndarray::s![bi, ti, ..]).assign(&self.weight.row(idx, n));
            }
        }
        round_in_place(n, RoundAt::Embedding, &mut out);
        Ok(out)
    }
}
