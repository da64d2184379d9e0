//! Head layout: the projections' `[batch, seq, heads·D]` and attention's
//! `[batch, heads, seq, D]`.

use ndarray::{Array3, Array4};

/// `[batch, seq, heads·D]` → `[batch, heads, seq, D]` (HF `.view(B, T, -1, D).transpose(1, 2)`).
pub fn split_heads(x: &Array3<f64>, heads: usize) -> Array4<f64> {
    let (b, t, hd) = x.dim();
    let d = hd / heads;
    let v = x
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((b, t, heads, d))
        .expect("hd = heads * d");
    v.permuted_axes([0, 2, 1, 3]).as_standard_layout().into_owned()
}

/// `[batch, heads, seq, D]` → `[batch, seq, heads·D]`.
pub fn merge_heads(x: &Array4<f64>) -> Array3<f64> {
    let (b, h, t, d) = x.dim();
    let v = x.view().permuted_axes([0, 2, 1, 3]).as_standard_layout().into_owned();
    v.into_shape_with_order((b, t, h * d)).expect("standard layout")
}
