//! One training step (CONTRACT §6, docs/training.md): the forward of the prefill on
//! the scenario with the training mask, HF's shifted cross entropy, the backward of
//! every block written by hand, the global gradient norm, `clip_grad_norm_`, the loss
//! scale and the first AdamW step, as a dump of step `train`.
//!
//! One implementation serves the float64 reference and the simulated Ascend port (O2
//! mixed precision): the forward is the inference model's blocks under the run's
//! [`Numerics`](crate::numerics::Numerics), and the backward stores each gradient where
//! the forward stored its value ([`Storage`]): nowhere for the reference, in the compute
//! dtype (matrix products through float32 first) for a bfloat16/float16 run, whose
//! master weights, unscaled gradients, clipping and optimizer are float32.
//!
//! - [`tape`]: the forward, keeping what the backward reads;
//! - [`blocks`]: the backward of each block (RMSNorm, linear with LoRA, attention with
//!   GQA, RoPE, SwiGLU, embedding), each checked against central differences;
//! - [`loss`]: the cross entropy and its gradient (shift, -100, micro-batches);
//! - [`backward`]: the blocks composed in reverse over the tape;
//! - [`optim`]: unscaling, overflow, the global norm, clipping, AdamW;
//! - [`step`]: the whole step and its dump, with the eight `train.*` faults.

use ndarray::{Array, Dimension};

use dump::Precision;

use crate::numerics::{round_in_place, Numerics, RoundAt};

pub mod backward;
pub mod blocks;
pub mod loss;
pub mod optim;
pub mod step;
pub mod tape;

pub use step::run;

/// Where the backward pass stores its values: the forward's numerics (a low-precision
/// run stores each gradient in its compute dtype, a matrix product's through float32
/// first) and the master precision of parameters, unscaled gradients and the optimizer
/// (`None`: float64, the reference; float32 for a mixed-precision run). `range`: the
/// dtype whose range a stored value keeps without its rounding (the reference of a
/// float16/bfloat16 golden: a value past its largest finite number is infinite there,
/// as when that dtype stores it, so a loss scale that overflows the golden's gradients
/// overflows the reference's at the same elements and the step is skipped alike).
#[derive(Clone, Copy)]
pub struct Storage<'n> {
    pub numerics: &'n dyn Numerics,
    pub master: Option<Precision>,
    pub range: Option<Precision>,
}

impl<'n> Storage<'n> {
    /// Nothing rounded: the float64 reference's backward.
    pub fn exact(numerics: &'n dyn Numerics) -> Storage<'n> {
        Storage { numerics, master: None, range: None }
    }

    /// Values past the largest finite number of `range` become infinite.
    fn overflow<D: Dimension>(&self, a: &mut Array<f64, D>) {
        if let Some(p) = self.range {
            a.mapv_inplace(|x| {
                let r = p.round(x);
                if r.is_infinite() {
                    r
                } else {
                    x
                }
            });
        }
    }

    /// An elementwise result stored in the compute dtype.
    pub fn act<D: Dimension>(&self, a: &mut Array<f64, D>) {
        round_in_place(self.numerics, RoundAt::Residual, a);
        self.overflow(a);
    }

    /// A matrix product's result: float32 accumulation, stored in the compute dtype.
    pub fn prod<D: Dimension>(&self, a: &mut Array<f64, D>) {
        round_in_place(self.numerics, RoundAt::Projection, a);
        self.overflow(a);
    }

    /// A value of the softmax's own dtype (float32 in HF and MindFormers).
    pub fn softmax(&self, x: f64) -> f64 {
        self.numerics.round(RoundAt::SoftmaxStep, x)
    }

    /// A constant of the compute dtype (a scale applied to a product).
    pub fn constant(&self, x: f64) -> f64 {
        self.numerics.round(RoundAt::Weight, x)
    }

    /// A master value (parameter, unscaled gradient, optimizer state).
    pub fn master(&self, x: f64) -> f64 {
        self.master.map_or(x, |p| p.round(x))
    }

    /// Every element of `a` as a master value.
    pub fn master_array<D: Dimension>(&self, a: &mut Array<f64, D>) {
        if let Some(p) = self.master {
            a.mapv_inplace(|x| p.round(x));
        }
    }
}

#[cfg(test)]
mod tests;
