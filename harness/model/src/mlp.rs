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

/// The MLP's projections as computed (the optional sites of CONTRACT §5): each output
/// `[batch, seq, ·]` and, where the projection has a LoRA bypass, its delta.
#[derive(Debug, Clone)]
pub struct MlpParts {
    pub gate: (Array3<f64>, Option<Array3<f64>>),
    pub up: (Array3<f64>, Option<Array3<f64>>),
    /// `[batch, seq, hidden]`: the MLP's output.
    pub down: (Array3<f64>, Option<Array3<f64>>),
}

impl Mlp<'_> {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Array3<f64>, n: &dyn Numerics) -> Array3<f64> {
        self.forward_parts(x, n).down.0
    }

    /// [`Mlp::forward`], keeping each projection's output and LoRA delta.
    pub fn forward_parts(&self, x: &Array3<f64>, n: &dyn Numerics) -> MlpParts {
        let gate = self.gate_proj.forward_adapted(x, n);
        let up = self.up_proj.forward_adapted(x, n);
        let mut h = gate.0.clone();
        Zip::from(&mut h).and(&up.0).for_each(|g, &u| *g = silu(*g) * u);
        round_in_place(n, RoundAt::MlpHidden, &mut h);
        let down = self.down_proj.forward_adapted(&h, n);
        MlpParts { gate, up, down }
    }
}
