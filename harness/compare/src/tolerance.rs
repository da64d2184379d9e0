//! The tolerance policy: which metrics a site must meet to pass.
//!
//! A site passes when `rel_l2 <= max_rel_l2`, `cosine >= min_cosine`, `max_abs <=
//! max_abs` (when set) and the candidate has no NaN or Inf the golden lacks. Defaults
//! depend on the coarser of the golden's and the candidate's dtype; they are set so
//! that a correct bfloat16 or float16 run of the same model passes against a float32
//! golden while real porting faults fail (the measurements behind them are in
//! docs/tolerances.md).
//!
//! A policy file (`--policy FILE`, JSON) overrides them:
//!
//! ```json
//! {
//!   "defaults": { "bfloat16": { "max_rel_l2": 0.05 } },
//!   "rules": [
//!     { "site": "model.layers.*.self_attn.probs", "step": "decode.*", "max_rel_l2": 0.1 },
//!     { "site": "lm_head", "skip": true }
//!   ]
//! }
//! ```
//!
//! Where the comparison has a measured noise floor (see [`crate::floor`]), a
//! site's threshold is `margin × floor`, at least [`Tolerance::floor_minimum`] (one unit
//! roundoff at bfloat16/float16, the fixed default at float32); the file's `defaults`
//! replace that least threshold and its `rules` apply after, so a rule still sets a
//! site's threshold exactly.
//!
//! Rules apply in file order; a later matching rule overrides the fields it sets.
//! Patterns match whole names; `*` matches any run of characters.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::floor::SiteFloor;
use crate::metrics::Metrics;
use contract::error::{Error, Result};
use contract::site::{Site, Step};
use dump::Precision;

/// Thresholds one site must meet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub max_rel_l2: f64,
    pub min_cosine: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs: Option<f64>,
}

impl Tolerance {
    /// The default for a comparison at `precision` (the coarser of the golden's and the
    /// candidate's dtype).
    pub fn default_for(precision: Precision) -> Tolerance {
        match precision {
            Precision::F32 => Tolerance { max_rel_l2: 1e-4, min_cosine: 0.99999, max_abs: None },
            Precision::Bf16 => Tolerance { max_rel_l2: 0.05, min_cosine: 0.998, max_abs: None },
            Precision::F16 => Tolerance { max_rel_l2: 0.01, min_cosine: 0.9999, max_abs: None },
        }
    }

    /// The least threshold a measured noise floor may set at `precision`, in place of
    /// [`Tolerance::default_for`]. At bfloat16 and float16 the floor measures the
    /// rounding a correct port of this model reaches, so a site is held to
    /// `margin × floor` with one unit roundoff of the dtype as its least rel-L2 (2⁻⁸,
    /// 2⁻¹¹; 1 - cosine its square): a site no correct variant rounds (an embedding
    /// gathered from a golden of the same dtype) is not held to exactly zero. At float32
    /// the floor models rounding at op boundaries but not a port's summation order,
    /// which is all that separates two float32 runs, so the fixed default stays.
    pub fn floor_minimum(precision: Precision) -> Tolerance {
        let u = match precision {
            Precision::F32 => return Tolerance::default_for(precision),
            Precision::Bf16 => 2f64.powi(-8),
            Precision::F16 => 2f64.powi(-11),
        };
        Tolerance { max_rel_l2: u, min_cosine: 1.0 - u * u, max_abs: None }
    }
}

/// The threshold a site's excess comes from: the one it is furthest past, or nearest to
/// when it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    /// `rel_l2 / max_rel_l2`.
    RelL2,
    /// `(1 - cosine) / (1 - min_cosine)`.
    Cosine,
    /// `max_abs / max_abs`.
    MaxAbs,
    /// NaN/Inf where the golden has none, or golden NaN/Inf the candidate does not
    /// reproduce.
    NonFinite,
    /// Integer values or mask visibility, which must match exactly.
    Exact,
}

/// What [`Tolerance::judge`] decides for one site's metrics. Made once, where the site's
/// status is decided, and carried by its result ([`crate::SiteResult::judgement`]), so
/// that what reports show and rank by is what was judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// Every threshold met and no NaN/Inf the golden lacks.
    pub pass: bool,
    /// How far past its tolerance the site is: the largest of each metric's ratio to its
    /// threshold (`rel_l2 / max_rel_l2`, `(1 - cosine) / (1 - min_cosine)`,
    /// `max_abs / max_abs`); infinite for new NaN/Inf or a NaN metric. Above 1 exactly
    /// when the site fails.
    pub excess: f64,
    /// The criterion the excess comes from (the first to reach it, in the order above).
    pub criterion: Criterion,
    /// Why the site fails, one phrase per broken threshold; empty when it passes.
    pub why: Vec<String>,
}

impl Judgement {
    /// The judgement of a site that must match exactly (integer values, mask
    /// visibility): it passes with no mismatch and is infinitely past its tolerance with
    /// any; `why` says what differs.
    pub fn exact(mismatches: u64, why: &str) -> Judgement {
        let pass = mismatches == 0;
        Judgement {
            pass,
            excess: if pass { 0.0 } else { f64::INFINITY },
            criterion: Criterion::Exact,
            why: if pass { Vec::new() } else { vec![why.to_string()] },
        }
    }
}

/// How far a measure is past its limit: `x / limit`. A NaN measure is infinitely past
/// any limit; against a limit of zero (or below), any positive measure is infinitely
/// past it and zero or less is not past it at all. Above 1 exactly when `x > limit`
/// (for a positive limit, up to rounding). [`Tolerance::judge`] takes a site's excess
/// as the largest of these over its metrics.
pub fn excess(x: f64, limit: f64) -> f64 {
    if x.is_nan() {
        f64::INFINITY
    } else if limit > 0.0 {
        x / limit
    } else if x > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

impl Tolerance {
    /// The one pass/fail rule: judges a value site's metrics against these thresholds.
    /// The verdict and the diagnosis use it; the report's "x tol" column shows the
    /// excess it gave.
    pub fn judge(&self, m: &Metrics) -> Judgement {
        // `x <= limit` rather than `!(x > limit)` on purpose: a NaN metric must fail.
        let within = |x: f64, limit: f64| x <= limit;
        let mut why = Vec::new();
        // The excess so far and where it comes from; the first criterion to reach the
        // largest ratio keeps it. (`self::excess` is the module's ratio function, which
        // this local shadows.)
        let (mut excess, mut criterion) = (0.0f64, Criterion::RelL2);
        let mut raise = |x: f64, c: Criterion| {
            if x > excess {
                (excess, criterion) = (x, c);
            }
        };
        // The first broken threshold, which decides a failing site whose ratios round
        // to 1 or below.
        let mut broken = None;
        if m.new_nonfinite > 0 {
            why.push(format!("{} NaN/Inf where the golden has none", m.new_nonfinite));
            broken = broken.or(Some(Criterion::NonFinite));
            raise(f64::INFINITY, Criterion::NonFinite);
        }
        if m.lost_nonfinite > 0 {
            why.push(format!(
                "{} golden NaN/Inf the candidate does not reproduce",
                m.lost_nonfinite
            ));
            broken = broken.or(Some(Criterion::NonFinite));
            raise(f64::INFINITY, Criterion::NonFinite);
        }
        if !within(m.rel_l2, self.max_rel_l2) {
            why.push(format!("rel_l2 {:.3e} > {:.1e}", m.rel_l2, self.max_rel_l2));
            broken = broken.or(Some(Criterion::RelL2));
        }
        raise(self::excess(m.rel_l2, self.max_rel_l2), Criterion::RelL2);
        if !within(-m.cosine, -self.min_cosine) {
            why.push(format!("cosine {:.6} < {}", m.cosine, self.min_cosine));
            broken = broken.or(Some(Criterion::Cosine));
        }
        raise(self::excess(1.0 - m.cosine, 1.0 - self.min_cosine), Criterion::Cosine);
        if let Some(ma) = self.max_abs {
            if !within(m.max_abs, ma) {
                why.push(format!("max_abs {:.3e} > {:.1e}", m.max_abs, ma));
                broken = broken.or(Some(Criterion::MaxAbs));
            }
            raise(self::excess(m.max_abs, ma), Criterion::MaxAbs);
        }
        let pass = why.is_empty();
        // Ratios round; the comparisons above decide, and the excess follows them.
        if pass {
            excess = excess.min(1.0);
        } else if excess <= 1.0 {
            excess = 1.0 + f64::EPSILON;
            criterion = broken.unwrap_or(criterion);
        }
        Judgement { pass, excess, criterion, why }
    }
}

/// Partial thresholds as written in a policy file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rel_l2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs: Option<f64>,
}

impl Override {
    fn apply(&self, t: &mut Tolerance) {
        if let Some(v) = self.max_rel_l2 {
            t.max_rel_l2 = v;
        }
        if let Some(v) = self.min_cosine {
            t.min_cosine = v;
        }
        if let Some(v) = self.max_abs {
            t.max_abs = Some(v);
        }
    }
}

/// One rule of a policy file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Site pattern, e.g. `model.layers.*.self_attn.probs`.
    #[serde(default = "star")]
    pub site: String,
    /// Step pattern, e.g. `decode.*`.
    #[serde(default = "star")]
    pub step: String,
    /// Only for candidates of this dtype (`float32`, `bfloat16`, `float16`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Leave matching sites out of the verdict (reported `skipped`).
    #[serde(default)]
    pub skip: bool,
    #[serde(flatten)]
    pub thresholds: Override,
}

fn star() -> String {
    "*".to_string()
}

/// What the policy decides for one site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Check(Tolerance),
    Skip,
}

/// The tolerance policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub defaults: BTreeMap<String, Override>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = dump::read::read_json_text(path)?;
        let bad = |what: String| Error::format(path, format!("not a valid policy: {what}"));
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !v.is_object() {
            return Err(bad("expected a JSON object with `defaults` and/or `rules`".into()));
        }
        let p: Policy = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        let check = |o: &Override, at: &str| -> Result<()> {
            let fine = |x: Option<f64>, lo: f64, hi: f64| x.is_none_or(|x| x >= lo && x <= hi);
            let what = if !fine(o.max_rel_l2, 0.0, f64::MAX) {
                "max_rel_l2 must be a finite number >= 0"
            } else if !fine(o.min_cosine, -1.0, 1.0) {
                "min_cosine must lie in [-1, 1]"
            } else if !fine(o.max_abs, 0.0, f64::MAX) {
                "max_abs must be a finite number >= 0"
            } else {
                return Ok(());
            };
            Err(Error::format(path, format!("{at}: {what}")))
        };
        for (k, o) in &p.defaults {
            check(o, &format!("defaults.{k}"))?;
        }
        for (i, r) in p.rules.iter().enumerate() {
            check(&r.thresholds, &format!("rules[{i}]"))?;
        }
        for k in p.defaults.keys() {
            if Precision::parse(k).is_none() {
                return Err(Error::format(
                    path,
                    format!("defaults: {k:?} is not float32, bfloat16 or float16"),
                ));
            }
        }
        for (i, r) in p.rules.iter().enumerate() {
            if let Some(d) = &r.dtype {
                if Precision::parse(d).is_none() {
                    return Err(Error::format(
                        path,
                        format!("rules[{i}].dtype: {d:?} is not float32, bfloat16 or float16"),
                    ));
                }
            }
        }
        Ok(p)
    }

    /// The decision for `site` at `step` for a candidate computed at `precision`.
    pub fn decide(&self, step: Step, site: &Site, precision: Precision) -> Decision {
        self.decide_with_floor(step, site, precision, None)
    }

    /// The decision for `site` at `step` with the site's measured noise floor: the
    /// least threshold ([`Tolerance::floor_minimum`], or the file's `defaults` for the
    /// dtype when it has them) raised to `margin × floor` ([`SiteFloor::raise`]), then
    /// the file's matching rules, which override it. Without a floor: the default.
    pub fn decide_with_floor(
        &self,
        step: Step,
        site: &Site,
        precision: Precision,
        floor: Option<(SiteFloor, f64)>,
    ) -> Decision {
        self.decide_in(step, site, precision, floor, None)
    }

    /// [`Policy::decide_with_floor`] for a model of `layers` decoder layers: the least
    /// threshold of a training step's backward site is its forward one widened by
    /// [`backward_factor`] (the deepest when `layers` is `None`), the policy's own
    /// defaults included; a rule still sets a site's threshold exactly.
    pub fn decide_in(
        &self,
        step: Step,
        site: &Site,
        precision: Precision,
        floor: Option<(SiteFloor, f64)>,
        layers: Option<usize>,
    ) -> Decision {
        // A policy's own defaults stay the least threshold; the built-in one yields to
        // the measured floor (see `Tolerance::floor_minimum`).
        let own = self.defaults.get(precision.name());
        let mut t = match (&floor, own) {
            (Some(_), None) => Tolerance::floor_minimum(precision),
            _ => Tolerance::default_for(precision),
        };
        if let Some(o) = own {
            o.apply(&mut t);
        }
        t = t.widened(backward_factor(site, layers));
        if let Some((f, margin)) = floor {
            t = f.raise(t, margin);
        }
        let (step_s, site_s) = (step.to_string(), site.to_string());
        let mut skip = false;
        for r in &self.rules {
            let dtype_ok =
                r.dtype.as_deref().and_then(Precision::parse).is_none_or(|d| d == precision);
            if dtype_ok && glob(&r.site, &site_s) && glob(&r.step, &step_s) {
                r.thresholds.apply(&mut t);
                skip = r.skip;
            }
        }
        if skip {
            Decision::Skip
        } else {
            Decision::Check(t)
        }
    }
}

/// How many times a forward site's least threshold a site of a training step gets
/// (docs/training.md, "Judging"): 1 for the forward sites and `loss`; for a backward site
/// `2 × (1 + d / L)`, `d` the decoder layers the backward has passed through when it
/// reaches the site (0 at `grad.lm_head` and `grad.model.norm`, `L − i` in layer `i`, `L`
/// at `grad.model.embed_tokens`) and `L` for `grad_norm`, `param_grad.*` and `update.*`,
/// which gather every layer's gradient (the global norm scales all of them). A gradient
/// carries the forward's error at the logits (what the forward threshold allows) and
/// adds the backward's own: two products per projection (input and weight gradients)
/// where the forward has one, over as many layers again. So between 2 and 4; 4 where
/// `layers` is unknown.
pub fn backward_factor(site: &Site, layers: Option<usize>) -> f64 {
    let depth = |d: usize| match layers {
        Some(l) if l > 0 => 2.0 * (1.0 + d.min(l) as f64 / l as f64),
        _ => 4.0,
    };
    let all = layers.unwrap_or(usize::MAX);
    match site {
        Site::Grad(inner) => match inner.as_ref() {
            Site::LmHead | Site::Norm => 2.0,
            Site::Layer(i, _) => depth(all.saturating_sub(*i)),
            _ => depth(all),
        },
        Site::GradNorm | Site::ParamGrad(_) | Site::Update(_) => depth(all),
        _ => 1.0,
    }
}

impl Tolerance {
    /// These thresholds `k` times wider: `k × max_rel_l2` (and `max_abs`), `k² × (1 −
    /// min_cosine)` (for small errors `1 − cosine` grows as the square of rel-L2).
    pub fn widened(self, k: f64) -> Tolerance {
        if k == 1.0 {
            return self;
        }
        Tolerance {
            max_rel_l2: self.max_rel_l2 * k,
            min_cosine: (1.0 - (1.0 - self.min_cosine) * k * k).max(-1.0),
            max_abs: self.max_abs.map(|a| a * k),
        }
    }
}

/// Whole-string match where `*` matches any run of characters.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics with these three measures and nothing non-finite (the rest unknown).
    fn metrics(rel_l2: f64, cosine: f64, max_abs: f64) -> Metrics {
        let none = dump::msprobe::Stats { max: None, min: None, mean: None, norm: None };
        Metrics { rel_l2, cosine, max_abs, ..crate::statistics::lower_bounds(&none, &none, 1.0) }
    }

    #[test]
    fn excess_is_the_ratio_to_the_limit_and_infinite_for_nan() {
        assert_eq!(excess(3.0, 2.0), 1.5);
        assert_eq!(excess(f64::NAN, 2.0), f64::INFINITY);
        assert_eq!(excess(1e-9, 0.0), f64::INFINITY);
        assert_eq!(excess(0.0, 0.0), 0.0);
        assert_eq!(excess(-1.0, 0.0), 0.0);
    }

    #[test]
    fn the_judgement_names_the_criterion_its_excess_comes_from() {
        let tol = Tolerance { max_rel_l2: 1e-2, min_cosine: 0.99, max_abs: Some(0.5) };
        let j = |m: &Metrics| {
            let j = tol.judge(m);
            (j.pass, j.excess, j.criterion)
        };
        // Passing, nearest the cosine threshold: (1 - 0.995) / (1 - 0.99) = 0.5.
        let (pass, x, c) = j(&metrics(1e-3, 0.995, 0.1));
        assert!(pass && (x - 0.5).abs() < 1e-9 && c == Criterion::Cosine, "{x} {c:?}");
        // Failing on max_abs alone: 2.0 / 0.5.
        assert_eq!(j(&metrics(1e-3, 0.999, 2.0)), (false, 4.0, Criterion::MaxAbs));
        // rel_l2 and max_abs tie at 3: the first in order keeps it.
        assert_eq!(j(&metrics(3e-2, 0.999, 1.5)), (false, 3.0, Criterion::RelL2));
        // A NaN cosine is infinitely past its threshold.
        assert_eq!(j(&metrics(1e-3, f64::NAN, 0.1)), (false, f64::INFINITY, Criterion::Cosine));
        // New NaN/Inf decide before any ratio.
        let m = Metrics { new_nonfinite: 2, ..metrics(1e-3, f64::NAN, 0.1) };
        assert_eq!(j(&m), (false, f64::INFINITY, Criterion::NonFinite));
        // Nothing off at all: excess 0, by rel_l2.
        assert_eq!(j(&metrics(0.0, 1.0, 0.0)), (true, 0.0, Criterion::RelL2));
        let exact = Judgement::exact(3, "integer values differ");
        assert_eq!(
            (exact.pass, exact.excess, exact.criterion),
            (false, f64::INFINITY, Criterion::Exact)
        );
        assert_eq!(Judgement::exact(0, "x").excess, 0.0);
    }

    #[test]
    fn backward_sites_widen_with_the_layers_the_backward_passed_through() {
        let f = |n: &str, l| backward_factor(&Site::parse(n), l);
        assert_eq!(f("model.layers.1.mlp", Some(4)), 1.0);
        assert_eq!(f("loss", Some(4)), 1.0);
        assert_eq!(f("grad.lm_head", Some(4)), 2.0);
        // Layer 3 of 4: one layer of backward behind it.
        assert_eq!(f("grad.model.layers.3.mlp", Some(4)), 2.5);
        assert_eq!(f("grad.model.layers.0.mlp", Some(4)), 4.0);
        assert_eq!(f("grad.model.embed_tokens", Some(4)), 4.0);
        assert_eq!(f("grad_norm", Some(4)), 4.0);
        assert_eq!(f("update.model.norm.weight", None), 4.0);
        let p = Policy::default();
        let Decision::Check(t) =
            p.decide_in(Step::Train, &Site::GradNorm, Precision::F32, None, Some(2))
        else {
            panic!()
        };
        assert!((t.max_rel_l2 - 4e-4).abs() < 1e-15, "{t:?}");
        assert!((1.0 - t.min_cosine - 16.0 * 1e-5).abs() < 1e-12, "{t:?}");
        // A rule still sets the threshold exactly.
        let p: Policy =
            serde_json::from_str(r#"{"rules":[{"site":"grad_norm","max_rel_l2":0.5}]}"#).unwrap();
        let Decision::Check(t) =
            p.decide_in(Step::Train, &Site::GradNorm, Precision::F32, None, Some(2))
        else {
            panic!()
        };
        assert_eq!(t.max_rel_l2, 0.5);
    }

    #[test]
    fn glob_matches_whole_names() {
        assert!(glob("model.layers.*.mlp", "model.layers.12.mlp"));
        assert!(!glob("model.layers.*.mlp", "model.layers.1.mlp.x"));
        assert!(glob("*", "anything"));
        assert!(glob("decode.*", "decode.0"));
        assert!(!glob("decode.*", "prefill"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "acb"));
        assert!(glob("lm_head", "lm_head"));
    }

    #[test]
    fn later_rules_override_earlier_ones() {
        let p: Policy = serde_json::from_str(
            r#"{"defaults":{"bfloat16":{"max_rel_l2":0.2}},
                "rules":[{"site":"model.layers.*.mlp","max_rel_l2":0.3},
                         {"site":"model.layers.1.mlp","step":"decode.*","min_cosine":0.5},
                         {"site":"lm_head","dtype":"float16","skip":true}]}"#,
        )
        .unwrap();
        let mlp1 = Site::parse("model.layers.1.mlp");
        let Decision::Check(t) = p.decide(Step::Decode(0), &mlp1, Precision::Bf16) else {
            panic!()
        };
        assert_eq!((t.max_rel_l2, t.min_cosine), (0.3, 0.5));
        let Decision::Check(t) = p.decide(Step::Prefill, &mlp1, Precision::Bf16) else { panic!() };
        assert_eq!(
            (t.max_rel_l2, t.min_cosine),
            (0.3, Tolerance::default_for(Precision::Bf16).min_cosine)
        );
        let Decision::Check(t) = p.decide(Step::Prefill, &Site::EmbedTokens, Precision::Bf16)
        else {
            panic!()
        };
        assert_eq!(t.max_rel_l2, 0.2);
        assert_eq!(p.decide(Step::Prefill, &Site::LmHead, Precision::F16), Decision::Skip);
        assert!(matches!(
            p.decide(Step::Prefill, &Site::LmHead, Precision::F32),
            Decision::Check(_)
        ));
    }
}
