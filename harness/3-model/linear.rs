//! A linear layer: `y = x · Wᵀ + b`, with `W` in HF's `[out, in]` layout
//! (`torch.nn.Linear.forward`, `F.linear(input, weight, bias)`).

use ndarray::{Array1, Array2, Array3, Axis};

use super::numerics::{round_in_place, Numerics, RoundAt};

/// Weight `[out, in]` and optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Array2<f64>,
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
        let mut y = flat.dot(&self.weight.t());
        if let Some(bias) = &self.bias {
            y += &bias.view().insert_axis(Axis(0));
        }
        let mut y =
            y.into_shape_with_order((b, t, self.out_features())).expect("row count is b * t");
        round_in_place(n, RoundAt::Projection, &mut y);
        y
    }
}
