//! Aligns the sites of a golden dump and a candidate dump, measures each pair and
//! reaches a verdict, following the contract's comparison rules:
//!
//! - query rows of padding tokens are left out of every metric, and so are the KV-cache
//!   slots of padding tokens (see [`RowFilter`]);
//! - masks are compared as visibility patterns (float: hidden below -1, visible at 0;
//!   bool/int: visible when non-zero);
//! - integer sites (positions) must match exactly;
//! - a site the candidate lacks is `missing`, never `pass`;
//! - a shape mismatch fails that site and records both shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use rayon::prelude::*;

use crate::floor::{NoiseFloor, SiteFloor};
use crate::lanes;
use crate::metrics::{unravel, ErrorHistogram, Metrics};
use crate::statistics::{self, SummaryOnly};
use crate::tolerance::{Decision, Judgement, Policy, Tolerance};
use contract::error::{Error, Result};
use contract::site::{LayerPart, Site, Step};
use dump::{DType, Dump, Precision, Scenario, Tensor};

/// The outcome of one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Missing,
    Skipped,
}

/// The gate's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// What was measured at a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SiteMetrics {
    /// Float activations: the full set of error measures.
    Values(Metrics),
    /// Integer activations: exact match required.
    Exact { count: u64, mismatches: u64, first_mismatch: Option<Vec<usize>> },
    /// The attention mask: visibility patterns compared.
    Visibility {
        count: u64,
        mismatches: u64,
        first_mismatch: Option<Vec<usize>>,
        golden_visible: u64,
        candidate_visible: u64,
    },
}

impl SiteMetrics {
    /// The float measures, if this site has them.
    pub fn values(&self) -> Option<&Metrics> {
        match self {
            SiteMetrics::Values(m) => Some(m),
            _ => None,
        }
    }

    /// How many element pairs were compared.
    pub fn count(&self) -> u64 {
        match self {
            SiteMetrics::Values(m) => m.count,
            SiteMetrics::Exact { count, .. } | SiteMetrics::Visibility { count, .. } => *count,
        }
    }

    /// Integer values or mask entries that differ (0 for value sites, which have no
    /// exact rule).
    pub fn mismatches(&self) -> u64 {
        match self {
            SiteMetrics::Values(_) => 0,
            SiteMetrics::Exact { mismatches, .. } | SiteMetrics::Visibility { mismatches, .. } => {
                *mismatches
            }
        }
    }

    /// One number for "how wrong": rel-L2 for values, the mismatch fraction otherwise.
    pub fn error(&self) -> f64 {
        match self {
            SiteMetrics::Values(m) => m.rel_l2,
            SiteMetrics::Exact { count, mismatches, .. }
            | SiteMetrics::Visibility { count, mismatches, .. } => {
                if *count == 0 {
                    0.0
                } else {
                    *mismatches as f64 / *count as f64
                }
            }
        }
    }
}

/// The comparison of one site at one step.
#[derive(Debug, Clone)]
pub struct SiteResult {
    pub step: Step,
    pub site: Site,
    pub status: Status,
    pub metrics: Option<SiteMetrics>,
    pub tolerance: Option<Tolerance>,
    /// The judgement that decided a measured site's status, made once here: how far past
    /// its tolerance it is and which criterion says so. Of a site judged on statistics
    /// alone, what the statistics proved (its rel-L2 and max_abs lower bounds; its
    /// unknown cosine is not held against it). `None` where nothing was judged
    /// (missing, skipped by policy, a shape mismatch).
    pub judgement: Option<Judgement>,
    pub golden_shape: Vec<usize>,
    pub candidate_shape: Option<Vec<usize>>,
    pub golden_dtype: DType,
    pub candidate_dtype: Option<DType>,
    /// Why the site failed or was skipped, in words.
    pub note: Option<String>,
    /// Value sites with a token axis: rel-L2 of each token row `t` of this step (batch
    /// rows combined, padding rows left out; NaN where every row was padding).
    pub per_token: Option<Vec<f64>>,
    /// `q_rope`, `k_rope`, `probs` (head axis 1) and `context` (last axis split in
    /// `num_attention_heads` chunks): rel-L2 of each head.
    pub per_head: Option<Vec<f64>>,
    /// Failing value sites: |candidate - golden| counted by decade.
    pub abs_histogram: Option<ErrorHistogram>,
    /// Value sites, where a floor was measured: the error correct runs reach here.
    pub noise_floor: Option<SiteFloor>,
}

impl SiteResult {
    /// A site not measured yet (status `Missing`, no metrics): the golden's tensor `g`,
    /// and the candidate's shape and dtype where it has the site.
    pub fn unmeasured(
        step: Step,
        site: &Site,
        g: &Tensor,
        candidate_shape: Option<Vec<usize>>,
        candidate_dtype: Option<DType>,
    ) -> SiteResult {
        SiteResult {
            step,
            site: site.clone(),
            status: Status::Missing,
            metrics: None,
            tolerance: None,
            judgement: None,
            golden_shape: g.shape().to_vec(),
            candidate_shape,
            golden_dtype: g.dtype(),
            candidate_dtype,
            note: None,
            per_token: None,
            per_head: None,
            abs_histogram: None,
            noise_floor: None,
        }
    }
}

/// The comparison of a candidate with a golden.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub golden: String,
    pub candidate: String,
    pub scenario: String,
    pub golden_precision: Precision,
    pub candidate_precision: Precision,
    pub candidate_producer: serde_json::Value,
    /// Every golden site at every golden step, in compute order.
    pub sites: Vec<SiteResult>,
}

impl Comparison {
    /// Pass when at least one site was checked and none failed.
    pub fn verdict(&self) -> Verdict {
        let any_fail = self.sites.iter().any(|s| s.status == Status::Fail);
        let any_pass = self.sites.iter().any(|s| s.status == Status::Pass);
        if any_fail || !any_pass {
            Verdict::Fail
        } else {
            Verdict::Pass
        }
    }

    /// The first failing site in compute order.
    pub fn first_divergence(&self) -> Option<&SiteResult> {
        self.sites.iter().find(|s| s.status == Status::Fail)
    }

    /// Counts of sites by status: (pass, fail, missing, skipped).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let c = |st| self.sites.iter().filter(|s| s.status == st).count();
        (c(Status::Pass), c(Status::Fail), c(Status::Missing), c(Status::Skipped))
    }
}

/// Compares `candidate` with `golden` under `policy`.
///
/// Sites are measured in parallel on rayon's pool (every core unless
/// `RAYON_NUM_THREADS` says otherwise); each site is measured by one thread with a fixed
/// order of arithmetic, so the results do not depend on the number of threads. The
/// pages of a memory-mapped site are released once it is measured, so that memory stays
/// bounded whatever the dump's size.
///
/// Errors only for inputs that cannot be compared at all (different scenarios);
/// divergences are data in the returned [`Comparison`].
pub fn compare(golden: &Dump, candidate: &Dump, policy: &Policy) -> Result<Comparison> {
    compare_with_floor(golden, candidate, policy, None)
}

/// [`compare`] with each site's threshold raised to the margin times its measured noise
/// floor (see [`crate::floor`]) before the policy's rules apply.
pub fn compare_with_floor(
    golden: &Dump,
    candidate: &Dump,
    policy: &Policy,
    floor: Option<&NoiseFloor>,
) -> Result<Comparison> {
    compare_with(golden, candidate, policy, floor, None)
}

/// [`compare_with_floor`], statistics first when `summary` is given: a value site whose
/// statistics lie far inside its tolerance is passed on them alone (its note says so,
/// [`statistics::SUMMARY_NOTE`]); every other site is compared in full.
pub fn compare_with(
    golden: &Dump,
    candidate: &Dump,
    policy: &Policy,
    floor: Option<&NoiseFloor>,
    summary: Option<&SummaryOnly>,
) -> Result<Comparison> {
    let (gm, cm) = (&golden.manifest, &candidate.manifest);
    let manifest = candidate.dir().map(|d| d.join("manifest.json")).unwrap_or_default();
    crate::train::same_step(gm, cm, &golden.label(), &manifest)?;
    same_inputs(&gm.scenario, &cm.scenario, &manifest)?;
    // The tolerance follows the coarser of the two dtypes: a float32 run measured
    // against a bfloat16 golden inherits the golden's own rounding error.
    let precision = gm.dtype.coarser(cm.dtype);
    let ctx = SiteContext {
        scenario: &gm.scenario,
        policy,
        precision,
        heads: Some(gm.model.num_attention_heads),
        floor,
        summary,
        layers: Some(gm.model.num_hidden_layers),
    };
    let pre_step = crate::train::PreStep::open(golden)?;
    let jobs: Vec<(Step, &Site)> = gm
        .steps
        .iter()
        .flat_map(|&step| golden.sites(step).iter().map(move |s| (step, s)))
        .collect();
    let sites = jobs
        .into_par_iter()
        .map(|(step, site)| {
            let g = golden.get(step, site)?.ok_or_else(|| {
                Error::format(golden.label(), format!("tensor `{step}/{site}` vanished"))
            })?;
            let c = if cm.steps.contains(&step) { candidate.get(step, site)? } else { None };
            let (golden_dtype, candidate_dtype) = (g.dtype(), c.as_ref().map(Tensor::dtype));
            let (g, c, change) = pre_step.judged(site, g, c);
            let mut r = compare_site_in(step, site, &g, c.as_ref(), &ctx);
            if change {
                // The dtypes stored, not those of the changes judged.
                (r.golden_dtype, r.candidate_dtype) = (golden_dtype, candidate_dtype);
                if r.note.is_none() {
                    r.note = Some(crate::train::CHANGE_NOTE.into());
                }
            }
            g.release();
            if let Some(c) = &c {
                c.release();
            }
            Ok(r)
        })
        .collect::<Result<Vec<SiteResult>>>()?;
    tensors_match_manifest_dtype(candidate, &sites, cm.dtype, &manifest)?;
    Ok(Comparison {
        golden: golden.label(),
        candidate: candidate.label(),
        scenario: gm.scenario.name.clone(),
        golden_precision: gm.dtype,
        candidate_precision: cm.dtype,
        candidate_producer: cm.producer.clone(),
        sites,
    })
}

/// A candidate whose manifest says bfloat16 or float16 while every float tensor it
/// holds is float32, with values that are not the stated dtype's (the first such site's
/// values are checked), is refused naming both: the manifest's dtype is what loosens the
/// thresholds, and float32 values judged at bfloat16's thresholds would pass errors
/// float32 never makes. A port that upcasts its bfloat16 outputs to float32 before
/// dumping holds bfloat16 values and is judged as stated; so is a dump with some tensors
/// in the stated dtype (a real port's mix), and float64 tensors, which carry the
/// harness's own runs at full precision.
fn tensors_match_manifest_dtype(
    candidate: &Dump,
    sites: &[SiteResult],
    stated: Precision,
    manifest: &Path,
) -> Result<()> {
    let exact: fn(f64) -> bool = match stated {
        Precision::F32 => return Ok(()),
        Precision::Bf16 => |x| (x as f32).to_bits() & 0xffff == 0,
        Precision::F16 => |x| f64::from(half::f16::from_f64(x)) == x || x.is_nan(),
    };
    let mut floats = sites.iter().filter(|r| r.candidate_dtype.is_some_and(|d| d.is_float()));
    let Some(first) = floats.next() else { return Ok(()) };
    if first.candidate_dtype != Some(DType::F32)
        || floats.any(|r| r.candidate_dtype != Some(DType::F32))
    {
        return Ok(());
    }
    let Some(t) = candidate.get(first.step, &first.site)? else { return Ok(()) };
    let foreign = (0..t.numel()).map(|i| t.get_f64(i)).find(|&x| !exact(x));
    t.release();
    if let Some(x) = foreign {
        return Err(Error::Manifest {
            path: manifest.to_path_buf(),
            what: format!(
                "dtype is {} but every float tensor of the candidate is F32, and {} `{}` holds {x:e}, which is no {} value: judged at {}'s thresholds, float32 values would pass errors float32 never makes; state the dtype the tensors were computed in",
                stated.name(),
                first.step,
                first.site,
                stated.name(),
                stated.name()
            ),
        });
    }
    Ok(())
}

/// A candidate must be a run of the golden's inputs: its scenario's `input_ids`,
/// `attention_mask` and (when it has them) `decode_ids` equal the golden's; else an
/// error naming `manifest`, the candidate's manifest file.
pub fn same_inputs(g: &Scenario, c: &Scenario, manifest: &Path) -> Result<()> {
    let what = if g.input_ids != c.input_ids {
        "input_ids"
    } else if g.attention_mask != c.attention_mask {
        "attention_mask"
    } else if !c.decode_ids.is_empty() && g.decode_ids != c.decode_ids {
        "decode_ids"
    } else {
        return Ok(());
    };
    Err(Error::Manifest {
        path: manifest.to_path_buf(),
        what: format!(
            "scenario.{what} differs from the golden's: the two runs had different inputs"
        ),
    })
}

/// What a site comparison needs beyond the two tensors.
#[derive(Debug, Clone, Copy)]
pub struct SiteContext<'a> {
    pub scenario: &'a Scenario,
    pub policy: &'a Policy,
    /// The precision whose default tolerance applies: the coarser of the golden's and
    /// the candidate's.
    pub precision: Precision,
    /// `num_attention_heads` of the model, to split `context` into heads; `None`
    /// leaves `context` without a per-head breakdown.
    pub heads: Option<usize>,
    /// The measured noise floor, which raises each value site's default threshold.
    pub floor: Option<&'a NoiseFloor>,
    /// Statistics first: value sites judged on their statistics where those suffice.
    pub summary: Option<&'a SummaryOnly>,
    /// The model's decoder layers, which widen a training step's backward thresholds
    /// ([`crate::tolerance::backward_factor`]); `None` takes the widest.
    pub layers: Option<usize>,
}

/// Compares one site. `c` is `None` when the candidate lacks it.
pub fn compare_site(
    step: Step,
    site: &Site,
    g: &Tensor,
    c: Option<&Tensor>,
    scenario: &Scenario,
    policy: &Policy,
    precision: Precision,
) -> SiteResult {
    compare_site_in(
        step,
        site,
        g,
        c,
        &SiteContext {
            scenario,
            policy,
            precision,
            heads: None,
            floor: None,
            summary: None,
            layers: None,
        },
    )
}

/// Compares one site under `ctx`. `c` is `None` when the candidate lacks it.
pub fn compare_site_in(
    step: Step,
    site: &Site,
    g: &Tensor,
    c: Option<&Tensor>,
    ctx: &SiteContext,
) -> SiteResult {
    let SiteContext { scenario, policy, precision, heads, floor, summary, layers } = *ctx;
    let site_floor = floor.and_then(|f| f.get(step, site)).filter(|_| g.dtype().is_float());
    let mut r = SiteResult {
        noise_floor: site_floor,
        ..SiteResult::unmeasured(step, site, g, c.map(|c| c.shape().to_vec()), c.map(Tensor::dtype))
    };
    let margin = floor.map_or(0.0, |f| f.margin);
    let tol = match policy.decide_in(step, site, precision, site_floor.map(|f| (f, margin)), layers)
    {
        Decision::Skip => {
            r.status = Status::Skipped;
            r.note = Some("skipped by policy".into());
            return r;
        }
        Decision::Check(t) => t,
    };
    let Some(c) = c else {
        r.note = Some("the candidate did not dump this site".into());
        return r;
    };
    r.tolerance = Some(tol);
    if c.shape() != g.shape() {
        r.status = Status::Fail;
        r.note = Some(format!("shape {:?} but the golden's is {:?}", c.shape(), g.shape()));
        return r;
    }
    let valid = RowFilter::new(step, site, g.shape(), scenario);
    if site.is_mask() {
        let m = compare_visibility(g, c, &valid);
        let j = Judgement::exact(m.mismatches(), "the mask hides or shows different keys");
        r.status = if j.pass { Status::Pass } else { Status::Fail };
        if r.status == Status::Fail {
            r.note = Some(j.why.join("; "));
        } else if m.count() == 0 {
            r.status = Status::Skipped;
            r.note = Some(NOTHING_COMPARED.into());
        }
        r.metrics = Some(m);
        r.judgement = Some(j);
    } else if !g.dtype().is_float() || matches!(site, Site::PositionIds) {
        let m = compare_exact(g, c, &valid);
        let j = Judgement::exact(m.mismatches(), "integer values differ");
        r.status = if j.pass { Status::Pass } else { Status::Fail };
        if r.status == Status::Fail {
            r.note = Some(j.why.join("; "));
        } else if m.count() == 0 {
            r.status = Status::Skipped;
            r.note = Some(NOTHING_COMPARED.into());
        }
        r.metrics = Some(m);
        r.judgement = Some(j);
    } else if let Some((m, j)) = summary
        .filter(|s| !s.forces_full(step, site))
        .and_then(|_| lanes::statistics(g, c, &valid))
        .and_then(|(gs, cs, n)| statistics::clearly_within(&tol, &gs, &cs, n))
    {
        r.status = Status::Pass;
        r.note = Some(statistics::SUMMARY_NOTE.into());
        r.metrics = Some(SiteMetrics::Values(m));
        r.judgement = Some(j);
    } else {
        let tokens = Groups::tokens(site, g.shape());
        let head_groups = Groups::heads(site, g.shape(), heads);
        let measured = lanes::measure(g, c, &valid, tokens, head_groups);
        let mut m = measured.acc.finish(g.shape());
        if m.golden_nan + m.golden_inf > 0 {
            // Golden NaN/Inf the candidate does not reproduce: left out of every metric,
            // so counted here (CONTRACT §1 rules); only where the golden has any.
            m.lost_nonfinite = (0..g.numel())
                .filter(|&i| valid.keep(i))
                .filter(|&i| {
                    let (gv, cv) = (g.get_f64(i), c.get_f64(i));
                    !(gv.is_finite() || gv == cv || gv.is_nan() && cv.is_nan())
                })
                .count() as u64;
        }
        r.per_token = measured.per_token.map(|a| a.finish());
        r.per_head = measured.per_head.map(|a| a.finish());
        let j = tol.judge(&m);
        r.status = if j.pass { Status::Pass } else { Status::Fail };
        r.note = (!j.pass).then(|| j.why.join("; "));
        if m.count == 0 && r.status == Status::Pass {
            r.status = Status::Skipped;
            r.note = Some(NOTHING_COMPARED.into());
        }
        r.metrics = Some(SiteMetrics::Values(m));
        r.judgement = Some(j);
        if r.status == Status::Fail {
            r.abs_histogram = Some(lanes::histogram(g, c, &valid));
        }
    }
    r
}

/// The note of a site where no element pair was compared (CONTRACT §1 rules: never
/// `pass`).
const NOTHING_COMPARED: &str =
    "nothing compared: every element is padding, the site is empty, or non-finite on both sides";

/// A partition of a tensor's flat indices: index `i` lies in group `(i / stride) % n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Groups {
    pub stride: usize,
    pub n: usize,
}

impl Groups {
    #[inline]
    pub fn of(self, i: usize) -> usize {
        (i / self.stride) % self.n
    }

    /// Token rows: the site's token axis.
    pub fn tokens(site: &Site, shape: &[usize]) -> Option<Groups> {
        let ax = site.token_axis().filter(|&ax| ax < shape.len() && shape[ax] > 0)?;
        Some(Groups { stride: shape[ax + 1..].iter().product(), n: shape[ax] })
    }

    /// Heads: axis 1 of `q_rope`, `k_rope` and `probs` (`[B, heads, T, ·]`), or the
    /// last axis of `context` (`[B, T, nH·D]`) cut into `heads` equal chunks.
    pub fn heads(site: &Site, shape: &[usize], heads: Option<usize>) -> Option<Groups> {
        match site {
            Site::Layer(_, LayerPart::QRope | LayerPart::KRope | LayerPart::Probs)
                if shape.len() == 4 && shape[1] > 0 =>
            {
                Some(Groups { stride: shape[2..].iter().product(), n: shape[1] })
            }
            Site::Layer(_, LayerPart::Context) => {
                let (nh, last) = (heads?, *shape.last()?);
                (shape.len() == 3 && nh > 0 && last % nh == 0 && last > 0)
                    .then(|| Groups { stride: last / nh, n: nh })
            }
            _ => None,
        }
    }
}

/// Decides which flat indices carry meaning: not a padding query row, and not a KV-cache
/// slot of a padding token.
///
/// A padding token's query row means nothing (HF gives it a uniform softmax), so
/// neither do the hidden states computed from it, nor the keys and values that the
/// next layer derives from those states and writes into the cache. Padding slots of
/// `k_cache`/`v_cache` are therefore left out at every step, as padding query rows are.
pub struct RowFilter<'a> {
    scenario: &'a Scenario,
    step: Step,
    /// (stride of the batch axis, stride of the filtered axis, its length, kind).
    axes: Option<(usize, usize, usize, Axis)>,
}

#[derive(Clone, Copy)]
enum Axis {
    /// Query rows of this step's tokens (prefill only).
    Query,
    /// KV-cache slots: slot s < P is prefill token s.
    Slot,
}

impl<'a> RowFilter<'a> {
    pub fn new(step: Step, site: &Site, shape: &[usize], scenario: &'a Scenario) -> RowFilter<'a> {
        let stride = |k: usize| shape[k + 1..].iter().product::<usize>();
        let batch_ok =
            |ax: usize| shape.len() > ax && shape[0] == scenario.batch() && scenario.has_padding();
        let axes = match (step, site) {
            (_, Site::Layer(_, LayerPart::KCache | LayerPart::VCache)) if batch_ok(2) => {
                Some((stride(0), stride(2), shape[2], Axis::Slot))
            }
            (Step::Prefill | Step::Train, _) => match site.token_axis() {
                Some(ax) if batch_ok(ax) && shape[ax] == scenario.prefill_len() => {
                    Some((stride(0), stride(ax), shape[ax], Axis::Query))
                }
                _ => None,
            },
            _ => None,
        };
        RowFilter { scenario, step, axes }
    }

    /// The stride of the filtered axis: [`keep`](Self::keep) is the same for every
    /// index of an aligned run of this many elements. `None` when nothing is filtered.
    pub fn run(&self) -> Option<usize> {
        self.axes.map(|(_, st, _, _)| st)
    }

    /// True when flat index `i` carries meaning.
    #[inline]
    pub fn keep(&self, i: usize) -> bool {
        match self.axes {
            None => true,
            Some((sb, st, n, Axis::Query)) => {
                self.scenario.is_valid_query(self.step, i / sb, (i / st) % n)
            }
            Some((sb, st, n, Axis::Slot)) => {
                let slot = (i / st) % n;
                slot >= self.scenario.prefill_len()
                    || self.scenario.is_valid_query(Step::Prefill, i / sb, slot)
            }
        }
    }
}

fn compare_exact(g: &Tensor, c: &Tensor, valid: &RowFilter) -> SiteMetrics {
    let (mut count, mut mismatches, mut first) = (0u64, 0u64, None);
    for i in 0..g.numel() {
        if !valid.keep(i) {
            continue;
        }
        count += 1;
        if g.get_f64(i) != c.get_f64(i) {
            mismatches += 1;
            first.get_or_insert(i);
        }
    }
    SiteMetrics::Exact { count, mismatches, first_mismatch: first.map(|i| unravel(i, g.shape())) }
}

/// Visibility of one mask entry: `Some(true)` visible, `Some(false)` hidden, `None`
/// for a value that is neither (NaN), which never matches.
pub fn visible(dtype: DType, v: f64) -> Option<bool> {
    if dtype.is_float() {
        if v.is_nan() {
            None
        } else {
            Some(v >= -1.0)
        }
    } else {
        Some(v != 0.0)
    }
}

fn compare_visibility(g: &Tensor, c: &Tensor, valid: &RowFilter) -> SiteMetrics {
    let (mut count, mut mismatches, mut first, mut gv, mut cv) = (0u64, 0u64, None, 0u64, 0u64);
    for i in 0..g.numel() {
        if !valid.keep(i) {
            continue;
        }
        count += 1;
        let a = visible(g.dtype(), g.get_f64(i));
        let b = visible(c.dtype(), c.get_f64(i));
        gv += (a == Some(true)) as u64;
        cv += (b == Some(true)) as u64;
        if a.is_none() || a != b {
            mismatches += 1;
            first.get_or_insert(i);
        }
    }
    SiteMetrics::Visibility {
        count,
        mismatches,
        first_mismatch: first.map(|i| unravel(i, g.shape())),
        golden_visible: gv,
        candidate_visible: cv,
    }
}
