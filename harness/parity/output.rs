//! What every command shares: flag values into library options, the output-directory
//! guard, progress lines, and printing a report and turning its verdict into the exit
//! status.

use std::io::IsTerminal;
use std::process::ExitCode;

use llama_parity::compare::statistics::{self, SummaryOnly};
use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::Verdict;
use llama_parity::contract::error::escape_controls;
use llama_parity::dump::guard::{self, Output};
use llama_parity::dump::Dump;
use llama_parity::dump::Precision;
use llama_parity::model::RunContext;
use llama_parity::pipeline::{Floor, Options};
use llama_parity::report::baseline::Baseline;
use llama_parity::report::{render_summary, Report};
use llama_parity::{Error, Result};

use crate::args::{CommonArgs, DTypeArg};

pub fn precision(d: DTypeArg) -> Precision {
    match d {
        DTypeArg::Float32 => Precision::F32,
        DTypeArg::Bfloat16 => Precision::Bf16,
        DTypeArg::Float16 => Precision::F16,
    }
}

/// The noise floor the flags ask for; `--floor-cache` must name a directory (or a path
/// that does not exist yet).
pub fn floor(c: &CommonArgs) -> Result<Floor<'_>> {
    if c.no_floor {
        return Ok(Floor::Off);
    }
    match &c.floor_cache {
        Some(dir) if dir.exists() && !dir.is_dir() => Err(Error::Usage {
            flag: "--floor-cache".into(),
            what: format!("{} is not a directory", dir.display()),
        }),
        Some(dir) => Ok(Floor::Cache(dir)),
        None => Ok(Floor::DefaultCache),
    }
}

pub fn load_policy(c: &CommonArgs) -> Result<Policy> {
    match &c.policy {
        Some(p) => Policy::load(p),
        None => Ok(Policy::default()),
    }
}

/// The accepted report of `--baseline`, if given, after checking `--max-regression`.
/// (The baseline is an input: the output guard keeps `--report` from overwriting it.)
pub fn load_baseline(c: &CommonArgs) -> Result<Option<Baseline>> {
    check_max_regression(c.max_regression)?;
    let Some(path) = &c.baseline else { return Ok(None) };
    Baseline::load(path).map(Some)
}

/// The statistics-first comparison `--summary-only` asks for, its `--full` patterns
/// checked against the golden's sites: each must name at least one.
pub fn summary_only(c: &CommonArgs, golden: &Dump) -> Result<Option<SummaryOnly>> {
    if !c.summary_only {
        return Ok(None);
    }
    for p in &c.full {
        let named =
            golden.manifest.steps.iter().any(|&step| {
                golden.sites(step).iter().any(|site| statistics::names(p, step, site))
            });
        if !named {
            return Err(Error::Usage {
                flag: "--full".into(),
                what: format!(
                    "{:?} names no site of the golden (a site name or STEP/SITE, * for any run of characters, e.g. 'model.layers.0.*' or 'decode.*/lm_head')",
                    escape_controls(p)
                ),
            });
        }
    }
    Ok(Some(SummaryOnly { full: c.full.clone() }))
}

/// `--max-regression` must be a finite factor of at least 1.
pub fn check_max_regression(f: f64) -> Result<()> {
    if f.is_finite() && f >= 1.0 {
        Ok(())
    } else {
        Err(Error::Usage {
            flag: "--max-regression".into(),
            what: format!("{f} is not a growth factor: give a finite number >= 1"),
        })
    }
}

/// Prints the summary, writes the report, and maps the verdict to the exit status.
pub fn finish(mut report: Report, c: &CommonArgs, policy: &Policy) -> Result<ExitCode> {
    if let Some(file) = &c.policy {
        report.record_policy(file, policy);
        for w in report.policy.iter().flat_map(|p| &p.warnings) {
            eprintln!("parity: warning: {w}");
        }
    }
    let color = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let text = render_summary(&report, color);
    if c.quiet {
        for line in text.lines().take_while(|l| !l.is_empty()) {
            println!("{line}");
        }
    } else {
        print!("{text}");
    }
    if let Some(dir) = &c.report {
        report.write(dir)?;
        println!("report: {}", dir.display());
    }
    Ok(match report.verdict {
        Verdict::Pass => ExitCode::SUCCESS,
        Verdict::Fail => ExitCode::from(1),
    })
}

pub fn progress(msg: &str) {
    eprintln!("parity: {msg}");
}

/// What `compare` and `run` may write, as outputs to guard: the report set of
/// `--report DIR` and the noise-floor cache of `--floor-cache DIR`.
pub fn common_outputs(c: &CommonArgs) -> Vec<Output<'_>> {
    let report = c.report.as_deref().map(|dir| Output {
        label: "--report",
        dir,
        files: guard::REPORT_FILES,
    });
    let cache =
        c.floor_cache.as_deref().map(|dir| Output { label: "--floor-cache", dir, files: &[] });
    report.into_iter().chain(cache).collect()
}

/// The pipeline options of `compare` and `run`, from their common flags and what was
/// loaded for them: progress on stderr, the floor, the baseline and `--max-regression`,
/// statistics first, and the context of the runs the floor and the diagnosis make.
pub fn check_options<'a>(
    c: &CommonArgs,
    policy: &'a Policy,
    floor: Floor<'a>,
    baseline: Option<&'a Baseline>,
    summary: Option<&'a SummaryOnly>,
    context: &'a RunContext,
) -> Options<'a> {
    Options {
        context,
        progress: &progress,
        floor,
        baseline,
        max_regression: c.max_regression,
        summary_only: summary,
        diagnose: !c.no_diagnosis,
        ..Options::new(policy)
    }
}
