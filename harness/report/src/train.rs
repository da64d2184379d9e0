//! What a report says of one training step (CONTRACT §6) beside its sites: the step's
//! loss and gradient norm on both sides, whether each side skipped the step, and a table
//! of the parameter gradients.

use serde::{Deserialize, Serialize};

use compare::Status;

use super::baseline::num_opt;
use super::sci;

/// One scalar of the step on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalarPair {
    #[serde(with = "num_opt")]
    pub golden: Option<f64>,
    #[serde(with = "num_opt")]
    pub candidate: Option<f64>,
    /// `|candidate − golden| / |golden|`; absent where either is missing or not finite.
    #[serde(default, with = "num_opt", skip_serializing_if = "Option::is_none")]
    pub rel_err: Option<f64>,
}

impl ScalarPair {
    pub fn new(golden: Option<f64>, candidate: Option<f64>) -> ScalarPair {
        let rel_err = match (golden, candidate) {
            (Some(g), Some(c)) if g.is_finite() && c.is_finite() => Some(if g != 0.0 {
                (c - g).abs() / g.abs()
            } else if c == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }),
            _ => None,
        };
        ScalarPair { golden, candidate, rel_err }
    }

    /// `golden 2.3456e0, candidate 2.3457e0 (rel err 4.3e-5)`.
    pub fn line(&self) -> String {
        let v = |x: Option<f64>| x.map_or_else(|| "—".to_string(), sci);
        let mut s = format!("golden {}, candidate {}", v(self.golden), v(self.candidate));
        if let Some(e) = self.rel_err {
            s.push_str(&format!(" (rel err {})", sci(e)));
        }
        s
    }
}

/// Whether each side skipped the step (its updates equal the weights before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub golden: Option<bool>,
    pub candidate: Option<bool>,
}

/// One trainable parameter's gradient, candidate against golden.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGradRow {
    pub name: String,
    pub status: Status,
    #[serde(with = "num_opt")]
    pub rel_l2: Option<f64>,
    #[serde(with = "num_opt")]
    pub cosine: Option<f64>,
    /// `‖candidate‖ / ‖golden‖` over the finite elements.
    #[serde(with = "num_opt")]
    pub norm_ratio: Option<f64>,
}

/// The training step's facts in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub loss: ScalarPair,
    pub grad_norm: ScalarPair,
    pub skipped: Skipped,
    /// How `update.*` sites were judged, in words.
    pub updates_judged_as: String,
    pub param_grads: Vec<ParamGradRow>,
}

impl TrainSummary {
    /// One line for a summary: `loss golden …, candidate …; grad_norm …; skipped: …`.
    pub fn line(&self) -> String {
        let b = |x: Option<bool>| x.map_or("unknown", |b| if b { "yes" } else { "no" });
        format!(
            "loss {}; grad_norm {}; step skipped: golden {}, candidate {}",
            self.loss.line(),
            self.grad_norm.line(),
            b(self.skipped.golden),
            b(self.skipped.candidate)
        )
    }

    /// The parameter gradients worst first (failing, then by rel-L2), at most `n`.
    pub fn worst_param_grads(&self, n: usize) -> Vec<&ParamGradRow> {
        let mut v: Vec<&ParamGradRow> = self.param_grads.iter().collect();
        let key = |r: &ParamGradRow| (r.status == Status::Fail, r.rel_l2.unwrap_or(f64::INFINITY));
        v.sort_by(|a, b| {
            let (fa, ra) = key(a);
            let (fb, rb) = key(b);
            fb.cmp(&fa).then(rb.total_cmp(&ra))
        });
        v.truncate(n);
        v
    }
}

/// A number or `—`.
pub fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "—".to_string(), sci)
}
