//! What every command shares: flag values into library options, the output-directory
//! guard, progress lines, and printing a report and turning its verdict into the exit
//! status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::Verdict;
use llama_parity::dump::Precision;
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

pub fn load_policy(c: &CommonArgs) -> Result<Policy> {
    match &c.policy {
        Some(p) => Policy::load(p),
        None => Ok(Policy::default()),
    }
}

/// The accepted report of `--baseline`, if given, after checking `--max-regression`
/// and that `--report` would not overwrite it.
pub fn load_baseline(c: &CommonArgs) -> Result<Option<Baseline>> {
    check_max_regression(c.max_regression)?;
    let Some(path) = &c.baseline else { return Ok(None) };
    if let Some(dir) = &c.report {
        if absolute(&dir.join("report.json")) == absolute(path) {
            return Err(Error::Usage {
                flag: "--report".into(),
                what: format!(
                    "{} would overwrite the baseline {}; write the report elsewhere",
                    dir.display(),
                    path.display()
                ),
            });
        }
    }
    Baseline::load(path).map(Some)
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
pub fn finish(report: Report, c: &CommonArgs) -> Result<ExitCode> {
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

/// Refuses output directories that lie inside an input directory: a run never writes
/// into its inputs.
pub fn check_outputs(inputs: &[&Path], outputs: &[(&str, Option<&Path>)]) -> Result<()> {
    for (flag, out) in outputs {
        let Some(out) = out else { continue };
        let out_abs = absolute(out);
        for input in inputs {
            let in_abs = absolute(input);
            if out_abs.starts_with(&in_abs) {
                return Err(Error::Usage {
                    flag: (*flag).to_string(),
                    what: format!(
                        "{} lies inside the input {}; choose a directory outside it",
                        out.display(),
                        input.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The absolute, symlink-resolved form of `p`, resolving its longest existing prefix.
fn absolute(p: &Path) -> PathBuf {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = p.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|s| s.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return p,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    out
}
