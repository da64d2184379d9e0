//! The noise floor: the error a correct port of this model reaches at each site in the
//! candidate's dtype, measured on the golden's own scenario and weights.
//!
//! Rounding error grows with the width of the reductions, the depth and the range of
//! the activations, so a fixed threshold per dtype that holds at hidden size 64 raises
//! false alarms at hidden size 4096. The floor measures it instead: the golden's
//! scenario is run by the harness's own correct implementations ([`VARIANTS`]):
//!
//! - the float64 reference (what is left is the golden's own rounding);
//! - the simulated port at the candidate's dtype with MindFormers' conventions (float32
//!   accumulation, RMSNorm weight applied after the cast);
//! - the same dtype rounded at other op boundaries (one rounding from the exact sum,
//!   the RMSNorm weight applied in float32, float32 rotary tables);
//!
//! and per site the worst rel-L2 and the worst cosine against the golden are kept. A
//! site's threshold is then `max(least, MARGIN × floor)` for rel-L2 and
//! `1 - max(1 - least, MARGIN² × (1 - floor))` for cosine (for small errors
//! `1 - cosine` grows as the square of rel-L2), where `least` is one unit roundoff of
//! bfloat16/float16 and the fixed default at float32
//! ([`crate::tolerance::Tolerance::floor_minimum`]); a policy file's defaults
//! and rules still override (see [`crate::tolerance::Policy::decide_with_floor`]).
//!
//! At float32 the third variant is not run ([`variants_run`]): every value is rounded
//! once to float32 in both simulated ports, so it differs from the second only in
//! summing each product exactly where the second sums in float32 as a float32 port
//! does, and its error lies within the other two runs' (measured in docs/tolerances.md).
//!
//! Uses the model stage (stage 3) to run the variants. A run the caller has made already
//! is not made again (a `run --impl reference` is the reference variant, [`Known`]). A
//! floor is computed once per (golden content, dtype) and cached as JSON
//! ([`FloorCache`]), never inside the golden.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::reproduce;
use crate::tolerance::{Policy, Tolerance};
use crate::verdict::{compare, Comparison, SiteMetrics};
use contract::error::{Error, Result};
use contract::site::{self, Site, Step};
use dump::{Dump, Precision};
use model::ascend::{self, Accumulation, AscendOptions, NormWeightOrder};
use model::plan::Plan;
use model::{self, Implementation, RunContext, RunOptions};

/// How far above the measured floor a site's threshold sits. Measured
/// (docs/tolerances.md, and `tests/noise_floor.rs`): correct HF bfloat16/float16 runs of the
/// committed golden sit at most 1.9× the floor the simulated ports measure, while
/// the subtlest faults that show sit 5× and more above it.
pub const MARGIN: f64 = 3.0;

/// Format string of a cached floor file.
/// `@2`: the bfloat16/float16 variants multiply in float32 (`Products::Float32`);
/// `@3`: each of those float32 products is one fused multiply-add chain over `k` in order;
/// `@4`: the file records the harness that measured it and the reproduction check that
/// had to pass first ([`crate::reproduce`]);
/// `@5`: at float32 the simulated port multiplies in float32 too, and the exact
/// accumulation variant is not run ([`variants_run`]).
pub const FORMAT: &str = "llama-parity/noise-floor@5";

/// What measured a floor: this harness's version. A floor measured by another version is
/// measured again.
pub const HARNESS: &str = concat!("llama-parity ", env!("CARGO_PKG_VERSION"));

/// The largest rel-L2 floor a cached file may hold: an error as large as the activation
/// itself is no rounding (the hottest correct floor measured, the `8b-hot` scale model
/// at bfloat16, is 0.37). A cached floor above it, or with a negative cosine, is not
/// believed and is measured again (a floor just measured is kept whatever its size,
/// since the golden was reproduced first).
pub const CACHED_FLOOR_CAP: f64 = 1.0;

/// The correct runs whose worst error is the floor, by name, in the order they run.
pub const VARIANTS: [&str; 3] = [
    "reference (float64)",
    "ascend, MindFormers conventions (float32 accumulation, norm weight after the cast)",
    "ascend, other rounding boundaries (exact accumulation, norm weight in float32, float32 rotary tables)",
];

/// How many of [`VARIANTS`] a training step's floor runs: the float64 reference and the
/// simulated port with MindFormers' conventions (the training step is built for those).
pub const TRAIN_VARIANTS: usize = 2;

/// The indices of the [`VARIANTS`] a floor at `precision` runs, in order: all three at
/// bfloat16 and float16; at float32 the reference and MindFormers' conventions, since
/// the third rounds every value to float32 where the second does and differs from it
/// only in summing each product exactly instead of in float32 (measured: at the
/// Llama-3-8B shape it raises no site's floor above the other two runs', whose float32
/// sums err twice as much; at hidden 64 it raises some by at most 1.3×, all far below
/// float32's least threshold); the first [`TRAIN_VARIANTS`] for a training step.
pub fn variants_run(precision: Precision, train: bool) -> Vec<usize> {
    let all = if train { TRAIN_VARIANTS } else { VARIANTS.len() };
    (0..all).filter(|&k| !(precision == Precision::F32 && k == 2)).collect()
}

/// The floor of one site: the worst error of the correct runs against the golden.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiteFloor {
    pub rel_l2: f64,
    pub cosine: f64,
}

impl SiteFloor {
    /// `max(base, margin × self)`: the threshold of a site whose default is `base`.
    pub fn raise(&self, base: Tolerance, margin: f64) -> Tolerance {
        let rel = if self.rel_l2.is_finite() {
            base.max_rel_l2.max(margin * self.rel_l2)
        } else {
            base.max_rel_l2
        };
        let gap = 1.0 - self.cosine;
        let cos = if gap.is_finite() {
            1.0 - (1.0 - base.min_cosine).max(margin * margin * gap.max(0.0))
        } else {
            base.min_cosine
        };
        Tolerance { max_rel_l2: rel, min_cosine: cos, max_abs: base.max_abs }
    }

    /// How many floors `rel_l2` is (`inf` when the floor is 0 and the error is not).
    pub fn times(&self, rel_l2: f64) -> f64 {
        if self.rel_l2 > 0.0 {
            rel_l2 / self.rel_l2
        } else if rel_l2 > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }
}

/// The reproduction check a floor was measured after ([`crate::reproduce`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReproductionRecord {
    /// The bound's three constants when it was made: [`reproduce::LOCAL_BOUND`],
    /// [`reproduce::FLOAT32_BOUND`], [`reproduce::ANGLE_BOUND`].
    pub bound: [f64; 3],
    /// The worst value site's local error as a fraction of its own bound (at most 1
    /// for a reproduced golden).
    pub worst_of_bound: f64,
    /// The number of sites checked.
    pub sites_checked: usize,
}

/// The noise floor of one golden at one candidate dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseFloor {
    pub format: String,
    /// sha256 over the golden's files (see [`golden_hash`]); empty for an in-memory golden.
    pub golden_sha256: String,
    /// The candidate dtype this floor is for.
    pub precision: String,
    pub margin: f64,
    /// The correct runs measured.
    pub variants: Vec<String>,
    /// What measured it ([`HARNESS`]).
    pub harness: String,
    /// The reproduction check that passed before the floor was measured; a floor
    /// without one is never read from the cache.
    pub reproduction: Option<ReproductionRecord>,
    /// `"<step>/<site>"` → floor, value sites only.
    pub sites: BTreeMap<String, SiteFloor>,
}

impl NoiseFloor {
    /// Whether this floor can be believed for `golden` (whose content hashes to `hash`)
    /// at `precision`: the same key, margin, variants and harness; a reproduction check
    /// that passed under today's bound; every site one of the golden's value sites with
    /// a finite floor in range (rel-L2 in [0, [`CACHED_FLOOR_CAP`]], cosine in [0, 1]).
    pub fn validate(
        &self,
        hash: &str,
        precision: Precision,
        golden: &Dump,
    ) -> std::result::Result<(), String> {
        let expect = |what: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("{what} differs from this run's"))
            }
        };
        expect("format", self.format == FORMAT)?;
        expect("golden_sha256", self.golden_sha256 == hash)?;
        expect("precision", self.precision == precision.name())?;
        expect("margin", self.margin == MARGIN)?;
        let train = golden.manifest.train.is_some();
        let run = variants_run(precision, train).into_iter().map(|k| VARIANTS[k]);
        expect("variants", self.variants.iter().map(String::as_str).eq(run))?;
        expect("harness", self.harness == HARNESS)?;
        let Some(r) = &self.reproduction else {
            return Err("it records no reproduction check".into());
        };
        let today = [reproduce::LOCAL_BOUND, reproduce::FLOAT32_BOUND, reproduce::ANGLE_BOUND];
        if r.bound != today
            || r.sites_checked == 0
            || !(r.worst_of_bound >= 0.0 && r.worst_of_bound <= 1.0)
        {
            return Err(
                "its reproduction record does not show a golden reproduced under today's bound"
                    .into(),
            );
        }
        let cap = CACHED_FLOOR_CAP;
        let value_sites: std::collections::BTreeSet<String> = golden
            .manifest
            .steps
            .iter()
            .flat_map(|&step| golden.sites(step).iter().map(move |s| site::key(step, s)))
            .collect();
        if self.sites.is_empty() {
            return Err("it holds no site".into());
        }
        for (key, f) in &self.sites {
            if !value_sites.contains(key) {
                return Err(format!("site {key:?} is not a site of the golden"));
            }
            let cos_ok = f.cosine.is_finite() && (0.0..=1.0).contains(&f.cosine);
            if !(f.rel_l2.is_finite() && (0.0..=cap).contains(&f.rel_l2) && cos_ok) {
                return Err(format!(
                    "site {key}: floor rel-L2 {} cosine {} is not a rounding error (rel-L2 in [0, {cap}], cosine in [0, 1])",
                    f.rel_l2, f.cosine
                ));
            }
        }
        Ok(())
    }

    /// The floor of `site` at `step`, if measured.
    pub fn get(&self, step: Step, site: &Site) -> Option<SiteFloor> {
        self.sites.get(&site::key(step, site)).copied()
    }

    /// Measures the floor of `golden` for a candidate at `precision`; `None` when the
    /// golden has no weights to run its scenario with. The runs are made within `ctx`.
    /// It says nothing of whether the golden is reproduced: [`floor_for`] checks that
    /// first and records it.
    pub fn measure(
        golden: &Dump,
        precision: Precision,
        hash: &str,
        ctx: &RunContext,
    ) -> Result<Option<NoiseFloor>> {
        if !golden.has_weights() {
            return Ok(None);
        }
        let f = measure_with(golden, precision, hash, None, None, &|_| {}, ctx)?;
        Ok(Some(f))
    }
}

/// The floor over the [`VARIANTS`] run at `precision` ([`variants_run`]), variant 0 (the
/// reference) taken from `reference` (its comparison against the golden by the default
/// policy) and variant 1 from `port` when the caller has them already.
fn measure_with(
    golden: &Dump,
    precision: Precision,
    hash: &str,
    reference: Option<&Comparison>,
    port: Option<&Dump>,
    progress: &dyn Fn(&str),
    ctx: &RunContext,
) -> Result<NoiseFloor> {
    let mut sites: BTreeMap<String, SiteFloor> = BTreeMap::new();
    let policy = Policy::default();
    let train = golden.manifest.train.is_some();
    let run = variants_run(precision, train);
    for k in 0..VARIANTS.len() {
        if !run.contains(&k) {
            let why = if train {
                "is not built for a training step (the simulated step rounds at MindFormers' boundaries only)"
            } else {
                "rounds where variant 2 rounds at float32 and differs from it only in summing exactly"
            };
            progress(&format!("noise floor: variant {} {why}: not run", k + 1));
            continue;
        }
        let owned;
        let cmp = match (k, reference, port) {
            (0, Some(c), _) => c,
            (1, _, Some(run)) => {
                owned = compare(golden, run, &policy)?;
                &owned
            }
            _ => {
                owned = compare(golden, &run_variant(golden, precision, k, ctx)?, &policy)?;
                &owned
            }
        };
        for s in &cmp.sites {
            let Some(SiteMetrics::Values(m)) = &s.metrics else { continue };
            let e = sites
                .entry(site::key(s.step, &s.site))
                .or_insert(SiteFloor { rel_l2: 0.0, cosine: 1.0 });
            // NaN (nothing compared) leaves the floor as it was.
            if m.rel_l2 > e.rel_l2 {
                e.rel_l2 = m.rel_l2;
            }
            if m.cosine < e.cosine {
                e.cosine = m.cosine;
            }
        }
    }
    Ok(NoiseFloor {
        format: FORMAT.to_string(),
        golden_sha256: hash.to_string(),
        precision: precision.name().to_string(),
        margin: MARGIN,
        variants: run.iter().map(|&k| VARIANTS[k].to_string()).collect(),
        harness: HARNESS.to_string(),
        reproduction: None,
        sites,
    })
}

/// The simulated port's options of variant `k` (1 or 2) of [`VARIANTS`] at `precision`.
fn ascend_options(precision: Precision, k: usize) -> AscendOptions {
    match k {
        1 => AscendOptions::mindformers(precision),
        _ => AscendOptions {
            accumulation: Accumulation::Exact,
            norm_weight_order: NormWeightOrder::WeightInFloat32,
            rotary_dtype: Precision::F32,
            ..AscendOptions::mindformers(precision)
        },
    }
}

/// Runs correct variant `k` of [`VARIANTS`] on `golden`'s scenario at `precision`,
/// within `ctx`.
pub fn run_variant(
    golden: &Dump,
    precision: Precision,
    k: usize,
    ctx: &RunContext,
) -> Result<Dump> {
    let plan = Plan::default();
    let out = match k {
        0 => model::run(
            golden,
            &RunOptions::new(Implementation::Reference)
                .with_precision(precision)
                .with_context(ctx.clone()),
        )?,
        // The training step's simulated port (MindFormers' conventions), through the
        // one entry that runs a step.
        1 if golden.manifest.train.is_some() => model::run(
            golden,
            &RunOptions::new(Implementation::Ascend)
                .with_precision(precision)
                .with_context(ctx.clone()),
        )?,
        _ => ascend::run(golden, &ascend_options(precision, k), &plan, false, ctx)?,
    };
    Ok(out.dump)
}

/// sha256 over a golden directory's files: the relative path, length and sha256 of each
/// regular file, in path order; the key of its cached floors. A file's sha256 is
/// remembered across runs as a checkpoint shard's is
/// ([`weights::checkpoint::sha256_once`]), so a golden is read whole only once.
pub fn golden_hash(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for rel in files {
        let path = dir.join(&rel);
        let len = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0u8]);
        h.update(len.to_le_bytes());
        h.update(weights::checkpoint::sha256_once(&path)?.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(|e| Error::io(&p, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if ft.is_dir() {
            collect_files(root, &p, out)?;
        } else if p.is_file() {
            out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
        }
    }
    Ok(())
}

/// Where floors are cached: one JSON file per (golden hash, dtype).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloorCache {
    pub dir: PathBuf,
}

impl FloorCache {
    /// `$PARITY_FLOOR_CACHE`, else `$XDG_CACHE_HOME/llama-parity/floors`, else
    /// `~/.cache/llama-parity/floors`; `None` when none is set.
    pub fn default_dir() -> Option<PathBuf> {
        contract::cache_dir("PARITY_FLOOR_CACHE", "floors")
    }

    /// The file of `hash` at `precision`.
    pub fn path(&self, hash: &str, precision: Precision) -> PathBuf {
        // The format's version is in the name, so that two versions of the harness
        // sharing a cache keep their own files instead of measuring each other's again.
        let version = FORMAT.rsplit('@').next().unwrap_or("0");
        self.dir.join(format!("{hash}-{}-v{version}.json", precision.name()))
    }

    /// The cached floor of this key, validated: `Ok(None)` when there is none,
    /// `Err(why)` when the file is there but cannot be believed (it is then measured
    /// again and overwritten). A cached floor can make a run recompute, never pass.
    pub fn load(
        &self,
        hash: &str,
        precision: Precision,
        golden: &Dump,
    ) -> std::result::Result<Option<NoiseFloor>, String> {
        let path = self.path(hash, precision);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let text = dump::read::read_json_text(&path).map_err(|e| e.to_string())?;
        let f: NoiseFloor =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        f.validate(hash, precision, golden).map_err(|why| format!("{}: {why}", path.display()))?;
        Ok(Some(f))
    }

    /// Stores `floor` (atomically).
    pub fn store(&self, floor: &NoiseFloor, precision: Precision) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.path(&floor.golden_sha256, precision);
        let text =
            serde_json::to_string_pretty(floor).map_err(|e| Error::format(&path, e.to_string()))?;
        // A temporary file of its own (several threads or processes may store the same
        // floor at once), renamed into place.
        let mut tmp =
            tempfile::NamedTempFile::new_in(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        tmp.write_all((text + "\n").as_bytes()).map_err(|e| Error::io(tmp.path(), e))?;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        Ok(path)
    }
}

/// Where a comparison's floor came from, in words for the report.
#[derive(Debug, Clone, PartialEq)]
pub enum FloorSource {
    /// Measured now or read from the cache.
    Measured(NoiseFloor),
    /// None could be measured; the fixed defaults apply. The reason in words.
    Unavailable(String),
}

impl FloorSource {
    /// The floor, when there is one.
    pub fn floor(&self) -> Option<&NoiseFloor> {
        match self {
            FloorSource::Measured(f) => Some(f),
            FloorSource::Unavailable(_) => None,
        }
    }

    /// One sentence for the report.
    pub fn note(&self) -> String {
        match self {
            FloorSource::Measured(f) => format!(
                "thresholds are max(least, {} x noise floor), the least being one unit roundoff at bfloat16/float16 (rel-L2 2^-8, 2^-11) and the fixed default at float32; the floor is the worst error against the golden of {} correct runs at {}: {}",
                f.margin,
                f.variants.len(),
                f.precision,
                f.variants.join("; ")
            ),
            FloorSource::Unavailable(why) => {
                format!("no noise floor ({why}): the fixed per-dtype defaults apply")
            }
        }
    }
}

/// The floor of `golden` for a candidate at `precision`: from `cache` when it holds
/// one, else measured within `ctx` (and stored there; a cache that cannot be written is
/// said in `progress`, not an error).
pub fn floor_for(
    golden: &Dump,
    precision: Precision,
    cache: Option<&FloorCache>,
    progress: &dyn Fn(&str),
    ctx: &RunContext,
) -> Result<FloorSource> {
    floor_for_run(golden, precision, cache, progress, ctx, Known::default())
}

/// Runs of the golden's scenario the caller has made already, which the floor and the
/// reproduction check take instead of making them again.
#[derive(Clone, Copy, Default)]
pub struct Known<'a> {
    /// The float64 reference's free run without faults (variant 0 of [`VARIANTS`]).
    pub reference: Option<&'a Dump>,
    /// The float64 reference's teacher-forced run without faults.
    pub teacher_forced: Option<&'a Dump>,
    /// The simulated port's run with MindFormers' conventions at the candidate's dtype,
    /// without faults (variant 1 of [`VARIANTS`]).
    pub port: Option<&'a Dump>,
}

/// Whether [`floor_for_run`] would measure the floor of `golden` at `precision` (it has
/// weights to run, and `cache` holds no floor of it that can be believed): what a
/// caller asks before making the floor's runs alongside its own.
pub fn will_measure(
    golden: &Dump,
    precision: Precision,
    cache: Option<&FloorCache>,
) -> Result<bool> {
    if !golden.has_weights() {
        return Ok(false);
    }
    let (Some(dir), Some(c)) = (golden.dir(), cache) else { return Ok(true) };
    Ok(!matches!(c.load(&golden_hash(dir)?, precision, golden), Ok(Some(_))))
}

/// [`floor_for`], with the runs the caller has already made.
///
/// The reproduction check comes first. The free-running reference (variant 0, which
/// the floor measures anyway) is judged by the rule of [`crate::reproduce`] first: when
/// every site of it is within its bound, the reference reproduces the golden whole, its
/// inherited error included, which the teacher-forced run (the same bound on the error
/// each layer adds alone) could only confirm. Otherwise the teacher-forced run is made
/// and decides, as `parity check-golden` does.
pub fn floor_for_run(
    golden: &Dump,
    precision: Precision,
    cache: Option<&FloorCache>,
    progress: &dyn Fn(&str),
    ctx: &RunContext,
    known: Known,
) -> Result<FloorSource> {
    if !golden.has_weights() {
        return Ok(FloorSource::Unavailable(
            "the golden has neither weights.safetensors nor a checkpoint to run its scenario with"
                .into(),
        ));
    }
    let hash = match golden.dir() {
        Some(d) => golden_hash(d)?,
        None => String::new(),
    };
    let cache = cache.filter(|_| !hash.is_empty());
    if let Some(c) = cache {
        match c.load(&hash, precision, golden) {
            Ok(Some(f)) => {
                progress(&format!("noise floor at {precision} from the cache"));
                return Ok(FloorSource::Measured(f));
            }
            Ok(None) => {}
            Err(why) => {
                progress(&format!("cached noise floor not believed ({why}): measuring it again"))
            }
        }
    }
    // A floor is believed only where the golden is reproduced.
    progress("checking that the reference reproduces the golden ...");
    let owned;
    let mut port = None;
    let reference = match known.reference {
        Some(r) => r,
        None => {
            // The port's run, which the floor needs once the golden is reproduced, runs
            // alongside the reference's (the threads each leaves idle go to the other);
            // its result waits for the check, and an error of it comes after the
            // check's, as when it is made after.
            let (r, p) = rayon::join(
                || run_variant(golden, precision, 0, ctx),
                || known.port.is_none().then(|| run_variant(golden, precision, 1, ctx)),
            );
            port = p;
            owned = r?;
            &owned
        }
    };
    let known = match (&port, known.port) {
        (Some(Ok(p)), None) => Known { port: Some(p), ..known },
        _ => known,
    };
    let reference = compare(golden, reference, &Policy::default())?;
    let mut reproduction = reproduce::judge_comparison(golden, &reference);
    if reproduction.is_reproduced() {
        progress(&format!(
            "reproduced: the free-running reference is within every site's bound (at most {:.2} of it)",
            reproduction.worst_of_bound()
        ));
    } else {
        progress("the free-running reference is not within every site's bound: checking each layer alone (one teacher-forced run) ...");
        reproduction = match known.teacher_forced {
            // A training step: its forward teacher-forced, its backward on the free run.
            _ if golden.manifest.train.is_some() => {
                reproduce::check_train(golden, &reference, ctx)?
            }
            Some(tf) => reproduce::judge(golden, tf)?,
            None => reproduce::check(golden, ctx)?,
        };
    }
    if let Some(what) = reproduction.describe_failure() {
        return Err(Error::NotReproduced { golden: golden.label(), what });
    }
    if reproduction.checked() == 0 {
        return Err(Error::NotReproduced {
            golden: golden.label(),
            what: "no site: the reference produced none of the golden's sites".into(),
        });
    }
    let record = ReproductionRecord {
        bound: [reproduce::LOCAL_BOUND, reproduce::FLOAT32_BOUND, reproduce::ANGLE_BOUND],
        worst_of_bound: reproduction.worst_of_bound(),
        sites_checked: reproduction.checked(),
    };
    progress(&format!(
        "measuring the noise floor at {precision} ({} correct runs, the reference's done) ...",
        variants_run(precision, golden.manifest.train.is_some()).len()
    ));
    let mut f =
        measure_with(golden, precision, &hash, Some(&reference), known.port, progress, ctx)?;
    f.reproduction = Some(record);
    // Through JSON and back, so that a measured floor and the same floor read from the
    // cache are the same numbers (JSON's decimal form may move a last bit) and give
    // byte-identical reports.
    let f = serde_json::to_string(&f)
        .ok()
        .and_then(|t| serde_json::from_str::<NoiseFloor>(&t).ok())
        .unwrap_or(f);
    if let Some(c) = cache {
        if let Err(e) = c.store(&f, precision) {
            progress(&format!("noise floor not cached: {e}"));
        }
    }
    Ok(FloorSource::Measured(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_keeps_the_default_above_a_small_floor_and_follows_a_large_one() {
        let base = Tolerance { max_rel_l2: 0.05, min_cosine: 0.998, max_abs: Some(1.0) };
        let small = SiteFloor { rel_l2: 0.01, cosine: 0.99995 };
        assert_eq!(small.raise(base, 3.0), base);
        let large = SiteFloor { rel_l2: 0.04, cosine: 0.999 };
        let t = large.raise(base, 3.0);
        assert!((t.max_rel_l2 - 0.12).abs() < 1e-15);
        // 1 - cosine scales with the square of the margin: 9 × 1e-3.
        assert!((t.min_cosine - (1.0 - 9e-3)).abs() < 1e-12);
        assert_eq!(t.max_abs, Some(1.0));
    }

    #[test]
    fn times_is_the_error_in_floors() {
        let f = SiteFloor { rel_l2: 0.02, cosine: 1.0 };
        assert!((f.times(0.06) - 3.0).abs() < 1e-12, "{}", f.times(0.06));
        let zero = SiteFloor { rel_l2: 0.0, cosine: 1.0 };
        assert_eq!(zero.times(0.0), 0.0);
        assert_eq!(zero.times(1e-9), f64::INFINITY);
    }
}
