//! Stage 7, the pipeline: compare a candidate with its golden, diagnose a divergence and
//! build the report, in one call. Every user of the library goes through here: the
//! `parity` commands, `parity suite`, the benches and the tests, so that a comparison
//! is judged, diagnosed and reported the same way everywhere.
//!
//! Uses every earlier stage.

use crate::compare::tolerance::Policy;
use crate::compare::{compare, Comparison};
use crate::contract::error::Result;
use crate::diagnosis::diagnose;
use crate::dump::Dump;
use crate::model::{self, RunOptions, RunOutput};
use crate::report::baseline::{Baseline, DEFAULT_MAX_REGRESSION};
use crate::report::Report;

/// How to judge and what to add to the report.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// The tolerance policy every site is judged by (the diagnosis follows it too).
    pub policy: &'a Policy,
    /// Diagnose a divergence (rerunning the golden's scenario under each hypothesis).
    pub diagnose: bool,
    /// Called with a line of progress before each long stage.
    pub progress: &'a dyn Fn(&str),
    /// An accepted report to hold this run against (the regression gate).
    pub baseline: Option<&'a Baseline>,
    /// How much a site's error may grow beyond its noise before it regresses
    /// ([`crate::report::baseline`]).
    pub max_regression: f64,
}

impl<'a> Options<'a> {
    /// Judge by `policy`, diagnose divergences, say nothing.
    pub fn new(policy: &'a Policy) -> Options<'a> {
        Options {
            policy,
            diagnose: true,
            progress: &|_| {},
            baseline: None,
            max_regression: DEFAULT_MAX_REGRESSION,
        }
    }
}

/// Compares `candidate` with `golden`, diagnoses a divergence and builds the report.
/// `teacher_forced`, when given, is the candidate's run with each layer started from the
/// golden's input: its errors become each site's local error in the report.
///
/// With `opts.baseline`, the report is then held against the accepted one: sites that
/// regressed are marked and fail the verdict.
///
/// Errors only for inputs that cannot be compared (a baseline of another scenario
/// among them); a divergence or a regression is data in the report, and a diagnosis
/// that cannot be made is said in the report's `diagnosis_note`.
pub fn check(
    golden: &Dump,
    candidate: &Dump,
    teacher_forced: Option<&Dump>,
    opts: &Options,
) -> Result<Report> {
    let cmp = compare(golden, candidate, opts.policy)?;
    let mut report = Report::new(&cmp, Vec::new());
    if opts.diagnose {
        diagnose_into(&mut report, golden, candidate, &cmp, opts);
    }
    if let Some(tf) = teacher_forced {
        let local = compare(golden, tf, opts.policy)?;
        report.attach_local(&local);
    }
    if let Some(b) = opts.baseline {
        b.apply(&mut report, opts.max_regression)?;
    }
    Ok(report)
}

/// Runs `run`'s implementation on `golden`'s scenario and weights, then [`check`]s the
/// result. The run's output is returned too (to be written as a dump, say).
pub fn run(golden: &Dump, run: &RunOptions, opts: &Options) -> Result<(RunOutput, Report)> {
    (opts.progress)(&format!("running {} ...", run.implementation.name()));
    let out = model::run(golden, run)?;
    let report = check(golden, &out.dump, out.teacher_forced.as_ref(), opts)?;
    Ok((out, report))
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
        return;
    }
    (opts.progress)("diagnosing the divergence ...");
    match diagnose(golden, candidate, cmp) {
        Ok(d) => {
            report.diagnosis = d.findings;
            report.diagnosis_notes = d.notes;
        }
        Err(e) => report.diagnosis_note = Some(format!("not made: {e}")),
    }
}
