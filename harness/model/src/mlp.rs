//! SwiGLU MLP: `down(silu(gate(x)) · up(x))`, `silu(z) = z · sigmoid(z)`.
//!
//! Follows HF `LlamaMLP.forward`: `self.down_proj(self.act_fn(self.gate_proj(x)) *
//! self.up_proj(x))` with `ACT2FN["silu"]`.

use ndarray::{Array3, Zip};

use super::linear::Linear;
use super::numerics::{round_in_place, Numerics, RoundAt};

#[derive(Debug, Clone, Copy)]
pub struct Mlp<'w> {
    pub gate_proj: &'w Linear,
    pub up_proj: &'w Linear,
    pub down_proj: &'w Linear,
}

/// `z · sigmoid(z)`.
pub fn silu(z: f64) -> f64 {
    z / (1.0 + (-z).exp())
}

impl Mlp<'_> {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
        let mut g = self.gate_proj.forward(x, n);
        let u = self.up_proj.forward(x, n);
        Zip::from(&mut g).and(&u).for_each(|g, &u| *g = silu(*g) * u);
        round_in_place(n, RoundAt::MlpHidden, &mut g);
        self.down_proj.forward(&g, n)
    }
}
