//! `parity suite`: every implementation on every golden, every faulty candidate
//! against its golden, as one matrix.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::Verdict;
use llama_parity::contract::fault::Fault;
use llama_parity::dump::{guard, Dump, Precision};
use llama_parity::model::{Implementation, RunContext, RunOptions};
use llama_parity::pipeline::{self, Options};
use llama_parity::report::baseline::Baseline;
use llama_parity::report::Report;
use llama_parity::{Error, Result};

use crate::args::SuiteArgs;

/// One cell of the matrix.
struct Row {
    golden: String,
    run: String,
    expect: Verdict,
    outcome: std::result::Result<Report, String>,
    seconds: f64,
}

impl Row {
    fn ok(&self) -> bool {
        match &self.outcome {
            Ok(r) => r.verdict == self.expect && self.diagnosis_ok(r),
            Err(_) => false,
        }
    }

    /// For a faulty candidate, the planted fault must be ranked first.
    fn diagnosis_ok(&self, r: &Report) -> bool {
        match self.run.strip_prefix("candidate ") {
            Some(fault) => r.diagnosis.first().is_some_and(|f| f.fault == fault),
            None => true,
        }
    }
}

pub fn cmd_suite(a: SuiteArgs) -> Result<ExitCode> {
    let goldens = list_dirs(&a.goldens)?;
    if goldens.is_empty() {
        return Err(Error::Usage {
            flag: "GOLDENS".into(),
            what: format!("{} holds no golden dump", a.goldens.display()),
        });
    }
    let mut inputs: Vec<&Path> = vec![a.goldens.as_path(), a.candidates.as_path()];
    inputs.extend(a.baseline.as_deref());
    let out = a.report.as_deref().map(|dir| guard::Output {
        label: "--report",
        dir,
        files: &["suite.json"],
    });
    guard::check_outputs(&inputs, &out.into_iter().collect::<Vec<_>>())?;
    crate::output::check_max_regression(a.max_regression)?;
    if let Some(b) = &a.baseline {
        if !b.is_dir() {
            return Err(Error::Usage {
                flag: "--baseline".into(),
                what: format!("{} is not a directory of a previous `suite --report`", b.display()),
            });
        }
    }
    let policy = Policy::default();
    // Port lines and warnings on stderr; no layer progress.
    let context = crate::progress::context(false);
    let run_of = |implementation: Implementation, precision: Option<Precision>| {
        RunOptions::new(implementation).with_precision(precision).with_context(context.clone())
    };
    // The accepted report of one run, when --baseline names a directory holding one.
    let baseline_of = |golden: &str, run: &str| -> Result<Option<Baseline>> {
        let Some(dir) = &a.baseline else { return Ok(None) };
        let p = dir.join(golden).join(run_dir(run)).join("report.json");
        if p.is_file() {
            Baseline::load(&p).map(Some)
        } else {
            Ok(None)
        }
    };
    let candidates = if a.candidates.is_dir() { list_dirs(&a.candidates)? } else { Vec::new() };
    let mut rows = Vec::new();
    for gdir in &goldens {
        let gname = name(gdir);
        let golden = Dump::open(gdir)?;
        let mut runs: Vec<(String, RunOptions)> =
            vec![("reference".into(), run_of(Implementation::Reference, None))];
        for p in [Precision::Bf16, Precision::F16] {
            runs.push((format!("ascend {p}"), run_of(Implementation::Ascend, Some(p))));
        }
        if a.mindspore {
            for p in [Precision::F32, Precision::F16] {
                runs.push((format!("mindspore {p}"), run_of(Implementation::MindSpore, Some(p))));
            }
        }
        for (label, opts) in runs {
            eprintln!("parity: suite: {gname}: {label}");
            let t = Instant::now();
            let outcome = baseline_of(&gname, &label)
                .and_then(|b| {
                    pipeline::run(
                        &golden,
                        &opts,
                        &options(&policy, b.as_ref(), a.max_regression, &context),
                    )
                })
                .map(|(_, report)| report)
                .map_err(|e| e.to_string());
            rows.push(Row {
                golden: gname.clone(),
                run: label,
                expect: Verdict::Pass,
                outcome,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
        for cdir in candidates.iter().filter(|c| name(c).split("__").next() == Some(gname.as_str()))
        {
            let dir_fault = name(cdir).split("__").nth(1).unwrap_or_default().to_string();
            let fault =
                Fault::parse_underscored(&dir_fault).map_or(dir_fault, |f| f.id().to_string());
            eprintln!("parity: suite: {gname}: candidate {fault}");
            let t = Instant::now();
            let run = format!("candidate {fault}");
            let outcome = (|| -> Result<Report> {
                let cand = Dump::open(cdir)?;
                let b = baseline_of(&gname, &run)?;
                pipeline::check(
                    &golden,
                    &cand,
                    None,
                    &options(&policy, b.as_ref(), a.max_regression, &context),
                )
            })()
            .map_err(|e| e.to_string());
            rows.push(Row {
                golden: gname.clone(),
                run,
                expect: Verdict::Fail,
                outcome,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
    }
    print_matrix(&rows);
    if let Some(dir) = &a.report {
        for r in &rows {
            if let Ok(rep) = &r.outcome {
                rep.write(&dir.join(&r.golden).join(run_dir(&r.run)))?;
            }
        }
        let summary: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "golden": r.golden, "run": r.run,
                    "expected": r.expect, "ok": r.ok(),
                    "verdict": r.outcome.as_ref().ok().map(|x| x.verdict),
                    "first_divergence": r.outcome.as_ref().ok().and_then(|x| x.first_divergence.as_ref().map(|f| format!("{}/{}", f.step, f.site))),
                    "diagnosis": r.outcome.as_ref().ok().and_then(|x| x.diagnosis.first().map(|f| f.fault.clone())),
                    "error": r.outcome.as_ref().err(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n";
        llama_parity::dump::write_atomic(&dir.join("suite.json"), text.as_bytes())?;
        println!("report: {}", dir.display());
    }
    let bad = rows.iter().filter(|r| !r.ok()).count();
    println!("\n{} of {} runs as expected", rows.len() - bad, rows.len());
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_matrix(rows: &[Row]) {
    println!(
        "{:<16} {:<34} {:<8} {:<8} {:<70} {:>6}",
        "golden", "run", "expect", "got", "first divergence / diagnosis", "secs"
    );
    for r in rows {
        let (got, detail) = match &r.outcome {
            Ok(rep) => {
                let v = match rep.verdict {
                    Verdict::Pass => "pass",
                    Verdict::Fail => "fail",
                };
                let fd = rep
                    .first_divergence
                    .as_ref()
                    .map(|f| format!("{}/{}", f.step, f.site))
                    .unwrap_or_default();
                let dg = rep
                    .diagnosis
                    .first()
                    .map(|f| format!(" => {} ({:.2})", f.fault, f.score))
                    .unwrap_or_default();
                (v.to_string(), format!("{fd}{dg}"))
            }
            Err(e) => ("error".to_string(), e.clone()),
        };
        let expect = match r.expect {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
        };
        let mark = if r.ok() { "" } else { "  <-- unexpected" };
        println!(
            "{:<16} {:<34} {:<8} {:<8} {:<70} {:>6.2}{mark}",
            r.golden, r.run, expect, got, detail, r.seconds
        );
    }
}

/// Judge by `policy`, held against `baseline` when there is one, the floor's and the
/// diagnosis' runs within `context`.
fn options<'a>(
    policy: &'a Policy,
    baseline: Option<&'a Baseline>,
    max_regression: f64,
    context: &'a RunContext,
) -> Options<'a> {
    Options { baseline, max_regression, context, ..Options::new(policy) }
}

/// The directory of one run's report under `--report DIR/<golden>/`.
fn run_dir(run: &str) -> String {
    run.replace(' ', "_")
}

fn list_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    v.sort();
    Ok(v)
}

fn name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
