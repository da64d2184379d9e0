//! Whether the harness reproduces a golden: the check that comes before any noise floor
//! is believed.
//!
//! The floor ([`crate::floor`]) is the worst error of the harness's own correct runs
//! against the golden, and it raises every threshold to a margin times itself. That is
//! right when the error is rounding. When the harness does not compute what the
//! golden's producer computed (a feature it does not implement, weights that do not
//! belong to the activations, a bug of its own), the error is the whole difference and
//! the floor would swallow it: a faulty candidate would pass. So a floor is believed
//! only where the golden is reproduced.
//!
//! The rule. The float64 reference is run teacher-forced: each decoder layer starts from
//! the golden's own input to it (`model.embed_tokens` for layer 0, `model.layers.{i-1}`
//! for layer `i`), so that the error at each site is what its layer adds, not what it
//! inherits. The golden is reproduced when
//!
//! - at every value site, `rel_l2 ≤ LOCAL_BOUND × u + (FLOAT32_BOUND + ANGLE_BOUND × P) × u₃₂`,
//!   with `u` the unit roundoff of the golden's dtype (2⁻²⁴ float32, 2⁻⁸ bfloat16, 2⁻¹¹
//!   float16), `u₃₂` = 2⁻²⁴ and `P` the largest position fed up to that step;
//! - integer sites (positions) match exactly and masks hide and show the same entries;
//! - the golden holds no NaN/Inf the reference does not.
//!
//! A free-running reference within the same bound at every site reproduces the golden
//! whole, inherited error included (each layer's input is itself a site within the
//! bound): the floor judges its own reference run so first and makes the
//! teacher-forced run only where that run is past the bound somewhere
//! ([`crate::floor::floor_for_run`]); [`check`] (`parity check-golden`) always runs it.
//!
//! A training step (CONTRACT §6). Its forward is the prefill: its forward sites are held
//! to the rule above, teacher-forced on the step seen as a prefill where the free run is
//! past the bound. A backward has no teacher forcing (a gradient is computed from the
//! whole forward and every later layer's gradient), so the free-running reference is
//! judged at `loss` and every backward site, with the site's bound `b` (the rule's,
//! above) times the number of roundings it inherits at first order: `loss` reads the
//! logits, which the `L` layers and the head made (`(L + 1) × b`); a gradient, the
//! gradient norm, a parameter gradient or an update reads the whole forward and the
//! loss, then at most `L` backward layers and the head's gradient, each adding what a
//! forward layer adds, and one reduction more (`(2L + 3) × b`). Each layer's own error
//! is within `b` at first order (what the forward check shows), and first-order errors
//! add along a chain whose gains a correct golden keeps near one (normalised layers,
//! AdamW's first step normalising each gradient element): so a reproduced golden stays
//! within the sum, while a backward that computes something else is off by far more.
//!
//! rel-L2 alone decides a value site: `‖a − b‖ ≤ r‖a‖` bounds the angle between the two
//! as well (`1 − cosine ≤ r²/2` for small `r`).
//!
//! The bound. A layer rounds its activations at each op boundary of the golden's
//! dtype, and its reductions (hidden, head_dim, key and intermediate widths) add
//! rounding of their own; softmax and SwiGLU amplify what reaches them: the first term.
//! Whatever its dtype, a golden computes some of it in float32 (HF upcasts RMSNorm,
//! softmax and the rotary tables) over reductions as wide as the intermediate size, and
//! a float32 golden computes all of it so: the second term.
//! HF computes the rotary angles `position × inv_freq` in float32 whatever the model's
//! dtype, so an angle θ ≤ P is off by up to about 2θ·u₃₂ and so are the cos/sin entries
//! and what RoPE rotates with them: the second term, which grows with the context and
//! matters only for float32 goldens at long positions. Measured as the
//! worst `rel_l2 / u` of every site of correct HF goldens (docs/tolerances.md,
//! "Reproduction"), float32, bfloat16 and float16, at hidden 64 and at the 8B shape,
//! with [`LOCAL_BOUND`] set well above it and well below what the porting faults and
//! unreproducible goldens put there.

use dump::{Dump, Precision};

use crate::tolerance::Policy;
use crate::verdict::{compare, Comparison, SiteMetrics, Status};
use contract::error::Result;
use contract::site::{Site, Step};

/// How many unit roundoffs of the golden's dtype a site's local error may reach.
pub const LOCAL_BOUND: f64 = 64.0;

/// How many float32 unit roundoffs a site's local error may reach whatever the golden's
/// dtype (its float32 arithmetic; see the module doc).
pub const FLOAT32_BOUND: f64 = 1024.0;

/// How many float32 unit roundoffs per position of the largest position a site's local
/// error may add (the rotary angles' rounding; see the module doc).
pub const ANGLE_BOUND: f64 = 4.0;

/// One site of the check.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteCheck {
    pub step: Step,
    pub site: Site,
    /// rel-L2 of the teacher-forced reference against the golden (value sites).
    pub rel_l2: Option<f64>,
    /// Its cosine (value sites), for the table.
    pub cosine: Option<f64>,
    /// Mismatched entries of an integer or mask site.
    pub mismatches: Option<u64>,
    /// The largest rel-L2 this site may show and still be reproduced.
    pub bound: f64,
    /// Whether the site is reproduced; `None` when it was not checked (the reference
    /// does not produce it, or nothing was compared).
    pub reproduced: Option<bool>,
    /// Why a site is not reproduced or not checked, in words.
    pub note: Option<String>,
}

impl SiteCheck {
    /// `rel_l2` in unit roundoffs of the golden's dtype.
    pub fn roundoffs(&self, golden: Precision) -> Option<f64> {
        self.rel_l2.map(|r| r / golden.unit_roundoff())
    }
}

/// The outcome of the check on one golden.
#[derive(Debug, Clone, PartialEq)]
pub struct Reproduction {
    /// The golden's name, for messages.
    pub golden: String,
    pub golden_precision: Precision,
    /// The position-free part of every site's bound: `LOCAL_BOUND × u + FLOAT32_BOUND × u₃₂`.
    pub bound: f64,
    /// Every golden site in compute order.
    pub sites: Vec<SiteCheck>,
}

impl Reproduction {
    /// The first site, in compute order, that the reference does not reproduce.
    pub fn first_unreproduced(&self) -> Option<&SiteCheck> {
        self.sites.iter().find(|s| s.reproduced == Some(false))
    }

    /// Reproduced: at least one site checked and none unreproduced.
    pub fn is_reproduced(&self) -> bool {
        self.first_unreproduced().is_none() && self.checked() > 0
    }

    /// How many sites were checked.
    pub fn checked(&self) -> usize {
        self.sites.iter().filter(|s| s.reproduced.is_some()).count()
    }

    /// The worst value site's rel-L2 in unit roundoffs, and the site.
    pub fn worst(&self) -> Option<(&SiteCheck, f64)> {
        self.sites
            .iter()
            .filter_map(|s| s.roundoffs(self.golden_precision).map(|r| (s, r)))
            .filter(|(_, r)| r.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The worst value site's rel-L2 as a fraction of its own bound (at most 1 when
    /// the golden is reproduced; 0 when no value site was checked).
    pub fn worst_of_bound(&self) -> f64 {
        self.sites
            .iter()
            .filter_map(|s| s.rel_l2.map(|r| r / s.bound))
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max)
    }

    /// One line for a message: the first unreproduced site and its numbers.
    pub fn describe_failure(&self) -> Option<String> {
        let s = self.first_unreproduced()?;
        let nonfinite = s.note.as_deref().filter(|n| n.contains("NaN/Inf"));
        let what = match (s.rel_l2, s.mismatches) {
            (Some(_), _) if nonfinite.is_some() => format!(
                "the float64 reference's values and the golden's differ in where they are NaN/Inf: {}",
                nonfinite.unwrap_or_default()
            ),
            (Some(r), _) => format!(
                "the float64 reference, {}, is off by \
                 rel-L2 {r:.3e} ({:.0} unit roundoffs of {}), above the {:.3e} rounding explains",
                if is_forward(&s.site) {
                    "given the golden's own inputs to this layer"
                } else {
                    "running the whole step (a backward has no teacher forcing)"
                },
                r / self.golden_precision.unit_roundoff(),
                self.golden_precision,
                s.bound
            ),
            (None, Some(n)) => format!("{n} entries differ from the reference's"),
            _ => s.note.clone().unwrap_or_else(|| "not reproduced".into()),
        };
        Some(format!("{} {}: {what}", s.step, s.site))
    }
}

/// Checks that the float64 reference reproduces `golden` (see the module doc). The
/// golden must have weights (`weights.safetensors` or a checkpoint by reference); the
/// run is made within `ctx`. A training golden is judged by [`check_train`] on the
/// reference's free run of its step.
pub fn check(golden: &Dump, ctx: &model::RunContext) -> Result<Reproduction> {
    if golden.manifest.train.is_some() {
        let opts =
            model::RunOptions::new(model::Implementation::Reference).with_context(ctx.clone());
        let free = model::run(golden, &opts)?;
        let cmp = compare(golden, &free.dump, &Policy::default())?;
        return check_train(golden, &cmp, ctx);
    }
    let run = model::reference::run_teacher_forced(golden, ctx)?;
    judge(golden, &run)
}

/// The check of a training golden: `free` is the comparison of the reference's free run
/// of the step against it; the forward sites are judged teacher-forced on the step seen
/// as a prefill, `loss` and the backward sites on the free run by their inherited bound
/// (see the module doc).
pub fn check_train(
    golden: &Dump,
    free: &Comparison,
    ctx: &model::RunContext,
) -> Result<Reproduction> {
    let mut r = judge_comparison(golden, free);
    let Some(view) = golden.train_forward_as_prefill()? else { return Ok(r) };
    let tf = model::reference::run_teacher_forced(&view, ctx)?;
    let local = judge(&view, &tf)?;
    for s in r.sites.iter_mut().filter(|s| is_forward(&s.site)) {
        if let Some(l) = local.sites.iter().find(|l| l.site == s.site) {
            *s = SiteCheck { step: s.step, ..l.clone() };
        }
    }
    Ok(r)
}

/// A forward site of a training step (neither `loss` nor a backward site).
fn is_forward(site: &Site) -> bool {
    !site.is_backward() && *site != Site::Loss
}

/// The bound of a site whose inherited bound is `b`: `b`, but for `update.*` (judged as
/// its change) at least `2·√b`. AdamW's first step moves an element by about
/// `lr·sign(g)`: an element whose gradient is within the gradient's own rounding error
/// may move the other way (an error of `2·lr`), and with a gradient off by a relative
/// `b` about a fraction `b` of the elements are that small (gradient magnitudes spread
/// evenly near zero), which puts the change off by about `2·√b`.
pub fn site_bound(site: &Site, b: f64) -> f64 {
    match site {
        Site::Update(_) => b.max(2.0 * b.sqrt()),
        _ => b,
    }
}

/// How many site bounds a training step's site inherits (see the module doc): 1 for a
/// forward site, `L + 1` for `loss`, `2L + 3` for a backward site.
pub fn inherited_bounds(site: &Site, layers: usize) -> f64 {
    if site.is_backward() {
        (2 * layers + 3) as f64
    } else if *site == Site::Loss {
        (layers + 1) as f64
    } else {
        1.0
    }
}

/// Judges `teacher_forced` (the reference's teacher-forced run of `golden`) by the rule.
pub fn judge(golden: &Dump, teacher_forced: &Dump) -> Result<Reproduction> {
    let cmp = compare(golden, teacher_forced, &Policy::default())?;
    Ok(judge_comparison(golden, &cmp))
}

/// [`judge`] on the comparison of a reference run against `golden` by the default
/// policy, made already.
pub fn judge_comparison(golden: &Dump, cmp: &Comparison) -> Reproduction {
    let precision = golden.manifest.dtype;
    let u32 = Precision::F32.unit_roundoff();
    let bound = LOCAL_BOUND * precision.unit_roundoff() + FLOAT32_BOUND * u32;
    let sc = &golden.manifest.scenario;
    let layers = golden.manifest.model.num_hidden_layers;
    let prefill_max = sc.prefill_positions().iter().flatten().copied().max().unwrap_or(0);
    let largest_position = |step: Step| -> f64 {
        let p = match step {
            Step::Prefill | Step::Train => prefill_max,
            Step::Decode(j) => {
                sc.decode_positions(j).into_iter().max().unwrap_or(0).max(prefill_max)
            }
        };
        p.max(0) as f64
    };
    let sites = cmp
        .sites
        .iter()
        .map(|s| {
            let mut c = SiteCheck {
                step: s.step,
                site: s.site.clone(),
                rel_l2: None,
                cosine: None,
                mismatches: None,
                bound: site_bound(
                    &s.site,
                    (bound + ANGLE_BOUND * largest_position(s.step) * u32)
                        * inherited_bounds(&s.site, layers),
                ),
                reproduced: None,
                note: None,
            };
            match (&s.status, &s.metrics) {
                (Status::Missing, _) => {
                    c.note = Some("the reference does not produce this site".into());
                }
                (Status::Fail, _) if s.candidate_shape.as_ref() != Some(&s.golden_shape) => {
                    c.reproduced = Some(false);
                    c.note = s.note.clone();
                }
                (_, Some(SiteMetrics::Values(m))) => {
                    c.rel_l2 = Some(m.rel_l2);
                    c.cosine = Some(m.cosine);
                    if m.lost_nonfinite > 0 || m.new_nonfinite > 0 {
                        c.reproduced = Some(false);
                        c.note = s.note.clone();
                    } else if m.rel_l2.is_nan() {
                        c.note = Some("nothing compared".into());
                    } else {
                        c.reproduced = Some(m.rel_l2 <= c.bound);
                    }
                }
                (_, Some(SiteMetrics::Exact { mismatches, .. }))
                | (_, Some(SiteMetrics::Visibility { mismatches, .. })) => {
                    c.mismatches = Some(*mismatches);
                    c.reproduced = Some(*mismatches == 0);
                }
                _ => c.note = s.note.clone(),
            }
            c
        })
        .collect();
    Reproduction { golden: golden.label(), golden_precision: precision, bound, sites }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_sites_inherit_the_bounds_of_the_layers_they_read() {
        let l = 2;
        assert_eq!(inherited_bounds(&Site::parse("model.layers.1.mlp"), l), 1.0);
        assert_eq!(inherited_bounds(&Site::Loss, l), 3.0);
        assert_eq!(inherited_bounds(&Site::parse("grad.model.embed_tokens"), l), 7.0);
        assert_eq!(inherited_bounds(&Site::GradNorm, l), 7.0);
        // An update's change: at least 2·sqrt(b), the sign flips of rounding.
        let b = 1e-4;
        assert_eq!(site_bound(&Site::parse("param_grad.lm_head.weight"), b), b);
        assert!((site_bound(&Site::parse("update.lm_head.weight"), b) - 0.02).abs() < 1e-15);
        assert_eq!(site_bound(&Site::parse("update.lm_head.weight"), 4.0), 4.0);
    }
}
