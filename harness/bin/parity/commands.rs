//! The commands: validate arguments into library options, run, print, report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, Verdict};
use llama_parity::contract::fault::Fault;
use llama_parity::diagnosis::diagnose;
use llama_parity::dump::{Dump, Precision, SafetensorsFile};
use llama_parity::model::{self, Implementation, RunOptions};
use llama_parity::report::{render_summary, Report};
use llama_parity::weights::check::check_weights;
use llama_parity::weights::ckpt::Checkpoint;
use llama_parity::weights::keymap::KeyMap;
use llama_parity::{Error, Result};

use crate::args::{
    CheckWeightsArgs, Cli, Command, CommonArgs, CompareArgs, DTypeArg, ImplArg, RunArgs,
};

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Compare(a) => cmd_compare(a),
        Command::Run(a) => cmd_run(a),
        Command::Suite(a) => crate::suite::cmd_suite(a),
        Command::CheckWeights(a) => cmd_check_weights(a),
        Command::Import(a) => crate::import::cmd_import(a),
    }
}

fn cmd_check_weights(a: CheckWeightsArgs) -> Result<ExitCode> {
    let map = match &a.map {
        Some(p) => KeyMap::load(p)?,
        None => KeyMap::mindspore(),
    };
    let dtype = a.dtype.map(|d| precision(d).dtype());
    let hf = SafetensorsFile::open(&a.hf)?;
    let port = Checkpoint::open(&a.port)?;
    let check = check_weights(&hf, &port, &map, dtype)?;
    print!("{}", check.render());
    if let Some(dir) = &a.report {
        check.write(dir)?;
        println!("report: {}", dir.join("weights.json").display());
    }
    Ok(if check.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn precision(d: DTypeArg) -> Precision {
    match d {
        DTypeArg::Float32 => Precision::F32,
        DTypeArg::Bfloat16 => Precision::Bf16,
        DTypeArg::Float16 => Precision::F16,
    }
}

fn cmd_compare(a: CompareArgs) -> Result<ExitCode> {
    let inputs = [a.golden.as_path(), a.candidate.as_path()];
    let policy = load_policy(&a.common)?;
    check_outputs(&inputs, &[("--report", a.common.report.as_deref())])?;
    let golden = Dump::open(&a.golden)?;
    if llama_parity::dump::msprobe::is_msprobe_dump(&a.candidate) {
        return crate::import::compare_msprobe(&a, &golden, &policy);
    }
    let mut candidate = Dump::open(&a.candidate)?;
    if let Some(p) = &a.map {
        let map = KeyMap::load(p)?;
        candidate = candidate.rename_sites(|name| map.to_hf(name))?;
    }
    let cmp = compare(&golden, &candidate, &policy)?;
    let mut report = Report::new(&cmp, Vec::new());
    diagnose_into(&mut report, &golden, &candidate, &cmp);
    finish(report, &a.common)
}

fn cmd_run(a: RunArgs) -> Result<ExitCode> {
    let implementation = match a.implementation {
        ImplArg::Reference => Implementation::Reference,
        ImplArg::Ascend => Implementation::Ascend,
        ImplArg::Mindspore => Implementation::MindSpore,
    };
    let precision = a.dtype.map(precision);
    let faults = a
        .faults
        .iter()
        .map(|id| {
            Fault::parse(id).ok_or_else(|| Error::Usage {
                flag: "--fault".into(),
                what: format!(
                    "unknown fault {id:?}; known: {}",
                    Fault::ALL.iter().map(|f| f.id()).collect::<Vec<_>>().join(", ")
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let policy = load_policy(&a.common)?;
    check_outputs(
        &[a.golden.as_path()],
        &[("--report", a.common.report.as_deref()), ("--dump", a.dump.as_deref())],
    )?;
    let golden = Dump::open(&a.golden)?;
    let opts = RunOptions { implementation, precision, faults, teacher_force: a.teacher_force };
    progress(&format!("running {} on {} ...", implementation.name(), a.golden.display()));
    let mut out = model::run(&golden, &opts)?;
    let mut name = format!("{} run", implementation.name());
    if !opts.faults.is_empty() {
        name.push_str(&format!(
            " with {}",
            opts.faults.iter().map(|f| f.id()).collect::<Vec<_>>().join(", ")
        ));
    }
    out.dump.set_name(name);
    if let Some(dir) = &a.dump {
        out.dump.write(dir)?;
        progress(&format!("dump written to {}", dir.display()));
    }
    let cmp = compare(&golden, &out.dump, &policy)?;
    let mut report = Report::new(&cmp, Vec::new());
    diagnose_into(&mut report, &golden, &out.dump, &cmp);
    if let Some(tf) = &out.teacher_forced {
        let local = compare(&golden, tf, &policy)?;
        report.attach_local(&local);
    }
    finish(report, &a.common)
}

/// Diagnoses a failed comparison into `report`. A diagnosis that cannot be made is
/// said in the report and leaves the verdict alone.
pub(crate) fn diagnose_into(
    report: &mut Report,
    golden: &Dump,
    candidate: &Dump,
    cmp: &llama_parity::compare::Comparison,
) {
    if cmp.first_divergence().is_none() {
        return;
    }
    match golden.weights() {
        Ok(Some(_)) => {}
        _ => {
            report.diagnosis_note = Some(
                "not made: the golden has no weights.safetensors to rerun its scenario with"
                    .to_string(),
            );
            return;
        }
    }
    progress("diagnosing the divergence ...");
    match diagnose(golden, candidate, cmp) {
        Ok(f) => report.diagnosis = f,
        Err(e) => report.diagnosis_note = Some(format!("not made: {e}")),
    }
}

pub(crate) fn load_policy(c: &CommonArgs) -> Result<Policy> {
    match &c.policy {
        Some(p) => Policy::load(p),
        None => Ok(Policy::default()),
    }
}

/// Prints the summary, writes the report, and maps the verdict to the exit status.
pub(crate) fn finish(report: Report, c: &CommonArgs) -> Result<ExitCode> {
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

pub(crate) fn progress(msg: &str) {
    eprintln!("parity: {msg}");
}

/// Refuses output directories that lie inside an input directory: a run never writes
/// into its inputs.
pub(crate) fn check_outputs(inputs: &[&Path], outputs: &[(&str, Option<&Path>)]) -> Result<()> {
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
