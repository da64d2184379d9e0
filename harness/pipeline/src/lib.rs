//! Stage 7, the pipeline: compare a candidate with its golden, diagnose a divergence and
//! build the report, in one call. Every user of the library goes through here: the
//! `parity` commands, `parity suite`, the benches and the tests, so that a comparison
//! is judged, diagnosed and reported the same way everywhere.
//!
//! - [`candidate`]: what is compared, opened from a path by its layout ([`Candidate`]);
//! - [`check`]: the one entry that judges any candidate, with the options each kind
//!   of candidate can take (and the refusal of those it cannot);
//! - [`run`]: an implementation's run on the golden's scenario, then [`check`];
//! - [`suite`]: every implementation on every golden and every faulty candidate beside
//!   them, with what each must give, and the `suite.json` record of the matrix.
//!
//! Uses every earlier stage.

pub mod candidate;
mod ranks;
pub mod suite;
pub mod train;

use std::path::Path;

use compare::floor::{floor_for_run, FloorCache, FloorSource, Known};
use compare::statistics::{compare_statistics, SummaryOnly};
use compare::tolerance::Policy;
use compare::{compare_with, compare_with_floor, Comparison};
use contract::error::{Error, Feature, Result};
use diagnosis::{diagnose, localise};
use dump::Dump;
use model::{self, Implementation, RunContext, RunOptions, RunOutput};
use report::baseline::{Baseline, DEFAULT_MAX_REGRESSION};
use report::Report;

pub use self::candidate::{open_golden, Candidate, CandidateRef, Kind, Naming, Statistics};

/// Where each site's threshold starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor<'a> {
    /// The fixed per-dtype defaults only.
    Off,
    /// The golden's noise floor, measured on every call.
    Measure,
    /// The golden's noise floor, measured once per (golden, dtype) and cached in
    /// [`FloorCache::default_dir`] (measured on every call when there is none).
    DefaultCache,
    /// The golden's noise floor, cached in this directory.
    Cache(&'a Path),
}

/// How to judge and what to add to the report.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// The tolerance policy every site is judged by (the diagnosis follows it too).
    pub policy: &'a Policy,
    /// Diagnose a divergence (rerunning the golden's scenario under each hypothesis).
    pub diagnose: bool,
    /// Called with a line of progress before each long stage.
    pub progress: &'a dyn Fn(&str),
    /// The noise floor that raises each site's default threshold.
    pub floor: Floor<'a>,
    /// An accepted report to hold this run against (the regression gate).
    pub baseline: Option<&'a Baseline>,
    /// How much a site's error may grow beyond its noise before it regresses
    /// ([`report::baseline`]).
    pub max_regression: f64,
    /// Statistics first: value sites whose statistics lie far inside their tolerance
    /// are passed on those alone ([`compare::statistics`]).
    pub summary_only: Option<&'a SummaryOnly>,
    /// What the noise floor's and the diagnosis' runs take from the caller: the sha256
    /// check of a referenced checkpoint, and who is told of their progress.
    pub context: &'a RunContext,
}

impl<'a> Options<'a> {
    /// Judge by `policy` over the cached noise floor, diagnose divergences, say nothing;
    /// runs within the default [`RunContext`].
    pub fn new(policy: &'a Policy) -> Options<'a> {
        Options {
            policy,
            diagnose: true,
            progress: &|_| {},
            floor: Floor::DefaultCache,
            baseline: None,
            max_regression: DEFAULT_MAX_REGRESSION,
            summary_only: None,
            context: &model::context::DEFAULT,
        }
    }
}

/// Compares `candidate` with `golden`, diagnoses a divergence and builds the report:
/// the one entry every command, the suite and the tests go through. `candidate` is an
/// opened [`Candidate`] or a contract dump in hand. `teacher_forced`, when given, is the
/// candidate's run with each layer started from the golden's input: its errors become
/// each site's local error in the report.
///
/// With `opts.baseline`, the report is then held against the accepted one: sites that
/// regressed are marked and fail the verdict. With `opts.summary_only`, value sites are
/// judged on statistics first (the teacher-forced run, when given, is compared in full).
///
/// What each kind of candidate takes:
///
/// | option | with tensors | statistics only |
/// |---|---|---|
/// | `policy` | yes | yes |
/// | `baseline`, `max_regression` | yes | yes: the gate holds each site's error bound against the baseline's error |
/// | `floor` | yes | `Off` and `DefaultCache` (no floor, said in the report); `Measure` and `Cache` refused |
/// | `summary_only` | yes | refused: judged on statistics alone already |
/// | `diagnose` | yes | never made (no tensors to test hypotheses on), said in the report |
/// | `teacher_forced` | yes | refused: no tensors to start layers from |
///
/// An option a kind cannot take is an [`Error::Unsupported`] naming it, never ignored.
///
/// Errors only for inputs that cannot be compared (a baseline of another scenario
/// among them); a divergence or a regression is data in the report, and a diagnosis
/// that cannot be made is said in the report's `diagnosis_note`.
pub fn check<'c>(
    golden: &Dump,
    candidate: impl Into<CandidateRef<'c>>,
    teacher_forced: Option<&Dump>,
    opts: &Options,
) -> Result<Report> {
    check_known(golden, candidate, teacher_forced, opts, Known::default())
}

/// [`check`], the noise floor taking the runs in `known` instead of making them again.
fn check_known<'c>(
    golden: &Dump,
    candidate: impl Into<CandidateRef<'c>>,
    teacher_forced: Option<&Dump>,
    opts: &Options,
    known: Known,
) -> Result<Report> {
    let candidate = candidate.into();
    if golden.manifest.train.is_some() {
        if let CandidateRef::Statistics(stats) = candidate {
            return Err(Error::Usage {
                flag: "CANDIDATE".into(),
                what: format!(
                    "{} is an msprobe statistics dump and golden {} is one training step \
                     (CONTRACT §6): its loss, gradients and updates are compared from tensors, \
                     which a statistics dump does not hold",
                    stats.label,
                    golden.label()
                ),
            });
        }
    }
    let mut report = match candidate {
        CandidateRef::Tensors(dump) => check_tensors(golden, dump, teacher_forced, opts, known)?,
        CandidateRef::Statistics(stats) => check_statistics(golden, stats, teacher_forced, opts)?,
    };
    report.adapter = adapter_facts(golden)?;
    if let Some(b) = opts.baseline {
        b.apply(&mut report, opts.max_regression)?;
    }
    Ok(report)
}

/// The facts of `golden`'s LoRA adapter for the report, its files read and checked
/// against the model (an adapter that cannot be read is an error, never left out).
fn adapter_facts(golden: &Dump) -> Result<Option<weights::adapter::AdapterFacts>> {
    let Some((dir, merged)) = golden.adapter()? else { return Ok(None) };
    let adapter = weights::adapter::Adapter::open(&dir, &golden.manifest.model)?;
    Ok(Some(adapter.facts(merged)))
}

/// [`check`] of a candidate with tensors, before the baseline.
fn check_tensors(
    golden: &Dump,
    candidate: &Dump,
    teacher_forced: Option<&Dump>,
    opts: &Options,
    known: Known,
) -> Result<Report> {
    let source = noise_floor_known(golden, candidate, opts, known)?;
    let floor = source.as_ref().and_then(FloorSource::floor);
    let mut cmp = compare_with(golden, candidate, opts.policy, floor, opts.summary_only)?;
    ranks::fail_divergent_ranks(&mut cmp);
    let mut report = Report::new(&cmp, Vec::new());
    ranks::annotate(&mut report);
    report.train = train::summary(golden, candidate, &cmp)?;
    report.noise_floor_note = source.as_ref().map(FloorSource::note);
    if ranks::first_is_rank_divergence(&cmp) {
        report.diagnosis_note = Some(
            "not made: the first divergence is ranks that disagree where they should hold the same tensor, which no fault of a single-device model explains".into(),
        );
    } else if opts.diagnose {
        diagnose_into(&mut report, golden, candidate, &cmp, opts);
    } else if cmp.first_divergence().is_some() {
        report.diagnosis_note = Some("not made: not asked for".to_string());
        report.localisation = localise(&cmp);
    }
    if let Some(tf) = teacher_forced {
        let local = compare_with_floor(golden, tf, opts.policy, floor)?;
        report.attach_local(&local);
    }
    Ok(report)
}

/// [`check`] of a statistics-only candidate, before the baseline: each site judged on
/// the lower bounds its statistics prove ([`compare::statistics`]), by the policy alone.
fn check_statistics(
    golden: &Dump,
    stats: &Statistics,
    teacher_forced: Option<&Dump>,
    opts: &Options,
) -> Result<Report> {
    const WHAT: &str = "an msprobe statistics dump";
    if teacher_forced.is_some() {
        return Err(Error::unsupported(
            Feature::TeacherForcing,
            format!("{WHAT} holds no tensors to start each layer from"),
        ));
    }
    if opts.summary_only.is_some() {
        return Err(Error::unsupported(
            Feature::SummaryOnly,
            format!(
                "{WHAT} is judged on its statistics alone already, and holds no tensors to compare any site in full"
            ),
        ));
    }
    let floor_note = match opts.floor {
        Floor::Off => None,
        Floor::DefaultCache => Some(
            FloorSource::Unavailable(format!(
                "{WHAT} is judged on its statistics' error bounds, which a noise floor does not raise"
            ))
            .note(),
        ),
        Floor::Measure | Floor::Cache(_) => {
            return Err(Error::unsupported(
                Feature::NoiseFloor,
                format!(
                    "{WHAT} is judged on its statistics' error bounds against the policy's thresholds; a noise floor does not raise them"
                ),
            ))
        }
    };
    (opts.progress)("statistics-mode msprobe dump: each site is judged on Max/Min/Mean/Norm alone");
    let mut cmp =
        compare_statistics(golden, &stats.manifest, &stats.label, &stats.sites, opts.policy)?;
    ranks::fail_divergent_ranks(&mut cmp);
    let mut report = Report::new(&cmp, Vec::new());
    ranks::annotate(&mut report);
    report.noise_floor_note = floor_note;
    if cmp.first_divergence().is_some() {
        report.diagnosis_note = Some(
            "not made: a statistics-only dump has no tensors to test fault hypotheses against"
                .into(),
        );
    }
    Ok(report)
}

/// The noise floor of `golden` at the candidate's dtype, as `opts.floor` asks; `None`
/// when it asks for none.
pub fn noise_floor(golden: &Dump, candidate: &Dump, opts: &Options) -> Result<Option<FloorSource>> {
    noise_floor_known(golden, candidate, opts, Known::default())
}

/// [`noise_floor`], taking the runs in `known` instead of making them again.
fn noise_floor_known(
    golden: &Dump,
    candidate: &Dump,
    opts: &Options,
    known: Known,
) -> Result<Option<FloorSource>> {
    let precision = candidate.manifest.dtype;
    let Some(cache) = floor_cache(opts) else {
        return Ok(Some(FloorSource::Unavailable(
            "--no-floor; the golden's reproduction is not checked either".into(),
        )));
    };
    floor_for_run(golden, precision, cache.as_ref(), opts.progress, opts.context, known).map(Some)
}

/// Where `opts.floor` keeps floors: `None` when it asks for none, `Some(None)` when it
/// measures without a cache.
fn floor_cache(opts: &Options) -> Option<Option<FloorCache>> {
    match opts.floor {
        Floor::Off => None,
        Floor::Measure => Some(None),
        Floor::DefaultCache => Some(FloorCache::default_dir().map(|dir| FloorCache { dir })),
        Floor::Cache(dir) => Some(Some(FloorCache { dir: dir.to_path_buf() })),
    }
}

/// Runs `run`'s implementation on `golden`'s scenario and weights, names the run after
/// its implementation and planted faults, writes its dump into `keep` when given (before
/// the comparison, so that a port's output is kept whatever the comparison and
/// diagnosis make of it), then [`check`]s it. The run's output is returned too.
pub fn run(
    golden: &Dump,
    run: &RunOptions,
    keep: Option<&Path>,
    opts: &Options,
) -> Result<(RunOutput, Report)> {
    (opts.progress)(&format!("running {} on {} ...", run.implementation.name(), golden.label()));
    // The reference without faults is the floor's first variant and the run the
    // reproduction check judges: they are taken from this run, not made again. When the
    // floor is to be measured, its port run is made alongside this one (the threads
    // each leaves idle go to the other) and used once the golden is reproduced; an error
    // of it is met again, after the check, by the floor making it itself.
    let correct_reference =
        run.implementation == Implementation::Reference && run.faults.is_empty();
    let precision = run.precision.unwrap_or(golden.manifest.dtype);
    let with_port = correct_reference
        && match floor_cache(opts) {
            Some(cache) => compare::floor::will_measure(golden, precision, cache.as_ref())?,
            None => false,
        };
    let (out, port) = rayon::join(
        || model::run(golden, run),
        || with_port.then(|| compare::floor::run_variant(golden, precision, 1, opts.context)),
    );
    let mut out = out?;
    out.dump.set_name(run_name(run));
    if let Some(dir) = keep {
        out.dump.write(dir)?;
        (opts.progress)(&format!("dump written to {}", dir.display()));
    }
    let known = if correct_reference {
        Known {
            reference: Some(&out.dump),
            teacher_forced: out.teacher_forced.as_ref(),
            port: port.as_ref().and_then(|p| p.as_ref().ok()),
        }
    } else {
        Known::default()
    };
    let report = check_known(golden, &out.dump, out.teacher_forced.as_ref(), opts, known)?;
    Ok((out, report))
}

/// How a run is named in reports: `ascend run`, `reference run with rope.pos_reset`.
pub fn run_name(run: &RunOptions) -> String {
    let mut name = format!("{} run", run.implementation.name());
    if !run.faults.is_empty() {
        let ids: Vec<String> = run.faults.iter().map(ToString::to_string).collect();
        name.push_str(&format!(" with {}", ids.join(", ")));
    }
    name
}

/// Diagnoses a failed comparison into `report`. A diagnosis that cannot be made is said
/// in the report and leaves the verdict alone.
fn diagnose_into(
    report: &mut Report,
    golden: &Dump,
    candidate: &Dump,
    cmp: &Comparison,
    opts: &Options,
) {
    if cmp.first_divergence().is_none() {
        return;
    }
    if !golden.has_weights() {
        report.diagnosis_note = Some(
            "not made: the golden has no weights (weights.safetensors or a checkpoint \
             referenced by its manifest) to rerun its scenario with"
                .to_string(),
        );
        report.localisation = localise(cmp);
        return;
    }
    (opts.progress)("diagnosing the divergence ...");
    // The diagnosis's hypotheses each map only the layers they run and drop them after,
    // which keeps its memory to the checkpoint's bytes and its own state: the checkpoint
    // the runs before it shared is let go, and the hypotheses do not share one.
    let context = RunContext { checkpoints: None, ..opts.context.clone() };
    if let Some(shared) = &opts.context.checkpoints {
        shared.clear();
    }
    match diagnose(golden, candidate, cmp, &context) {
        Ok(d) => {
            report.diagnosis = d.findings;
            report.diagnosis_notes = d.notes;
        }
        Err(e) => report.diagnosis_note = Some(format!("not made: {e}")),
    }
    if report.diagnosis.is_empty() {
        report.localisation = localise(cmp);
    }
}
