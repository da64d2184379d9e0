//! The commands: validate arguments into library options, run, print, report.

use std::io::IsTerminal;
use std::process::ExitCode;

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, Verdict};
use llama_parity::contract::fault::Fault;
use llama_parity::diagnosis::diagnose;
use llama_parity::dump::guard::{self, Output};
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
    }
}

fn cmd_check_weights(a: CheckWeightsArgs) -> Result<ExitCode> {
    let report = a.report.as_deref().map(|dir| Output {
        label: "--report",
        dir,
        files: guard::WEIGHTS_REPORT_FILES,
    });
    guard::check_outputs(
        &[Some(a.hf.as_path()), Some(&a.port), a.map.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &report.into_iter().collect::<Vec<_>>(),
    )?;
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
    let inputs = [
        Some(a.golden.as_path()),
        Some(&a.candidate),
        a.common.policy.as_deref(),
        a.map.as_deref(),
    ];
    guard::check_outputs(
        &inputs.into_iter().flatten().collect::<Vec<_>>(),
        &report_output(&a.common),
    )?;
    let policy = load_policy(&a.common)?;
    let golden = Dump::open(&a.golden)?;
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
    let dump =
        a.dump.as_deref().map(|dir| Output { label: "--dump", dir, files: guard::DUMP_FILES });
    guard::check_outputs(
        &[Some(a.golden.as_path()), a.common.policy.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &[report_output(&a.common), dump.into_iter().collect()].concat(),
    )?;
    let policy = load_policy(&a.common)?;
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
fn diagnose_into(
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
fn finish(report: Report, c: &CommonArgs) -> Result<ExitCode> {
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

/// The report set of `--report DIR`, as an output to guard.
pub(crate) fn report_output(c: &CommonArgs) -> Vec<Output<'_>> {
    c.report
        .as_deref()
        .map(|dir| Output { label: "--report", dir, files: guard::REPORT_FILES })
        .into_iter()
        .collect()
}

fn progress(msg: &str) {
    eprintln!("parity: {msg}");
}
