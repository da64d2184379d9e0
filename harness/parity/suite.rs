//! `parity suite`: every implementation on every golden, every faulty candidate
//! against its golden, as one matrix (`pipeline::suite`), printed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use llama_parity::compare::Verdict;
use llama_parity::contract::fault::Fault;
use llama_parity::dump::guard;
use llama_parity::pipeline::suite::{
    floor_distance, Plan, RealModel, Suite, SuiteOptions, REAL_MODEL_FAULTS,
};
use llama_parity::{Error, Result};

use crate::args::SuiteArgs;
use crate::output::progress;

pub fn cmd_suite(a: SuiteArgs) -> Result<ExitCode> {
    let mut plan = Plan::new(&a.goldens, &a.candidates, a.mindspore)?;
    let faults = real_faults(a.real_faults.as_deref())?;
    let real_dir = a.real_model.clone().or_else(|| {
        (!a.no_real_model).then(|| {
            llama_parity::contract::cache_dir("PARITY_MODELS", "models")
                .unwrap_or_else(|| PathBuf::from("models"))
                .join("smollm2-135m")
        })
    });
    if let Some(dir) = &real_dir {
        let real = RealModel {
            dir,
            mindspore: a.mindspore,
            mindformers: a.mindformers,
            faults: faults.as_deref(),
        };
        if !plan.add_real_model(&real) {
            if a.real_model.is_some() {
                return Err(Error::Usage {
                    flag: "--real-model".into(),
                    what: format!(
                        "{} does not hold golden_f32/ and golden_bf16/ (golden/make_smollm2.py makes them)",
                        dir.display()
                    ),
                });
            }
            eprintln!(
                "parity: suite: no real model's goldens at {} (bash .ci/setup makes them); left out",
                dir.display()
            );
        }
    }
    if plan.goldens.is_empty() {
        return Err(Error::Usage {
            flag: "GOLDENS".into(),
            what: format!("{} holds no golden dump", a.goldens.display()),
        });
    }
    let adapter_goldens = a.adapters.join("golden");
    if adapter_goldens.is_dir() {
        plan.add(&adapter_goldens, &a.adapters.join("candidates"), a.mindspore)?;
    } else if a.adapters != Path::new(crate::args::ADAPTER_SET) {
        return Err(Error::Usage {
            flag: "--adapters".into(),
            what: format!("{} holds no golden/ directory of adapter goldens", a.adapters.display()),
        });
    }
    let training_goldens = a.training.join("golden");
    if training_goldens.is_dir() {
        plan.add(&training_goldens, &a.training.join("candidates"), a.mindspore)?;
    } else if a.training != Path::new(crate::args::TRAINING_SET) {
        return Err(Error::Usage {
            flag: "--training".into(),
            what: format!(
                "{} holds no golden/ directory of training goldens",
                a.training.display()
            ),
        });
    }
    let mut inputs: Vec<&Path> = vec![
        a.goldens.as_path(),
        a.candidates.as_path(),
        a.adapters.as_path(),
        a.training.as_path(),
    ];
    inputs.extend(real_dir.as_deref());
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
    // Port lines and warnings on stderr; no layer progress.
    let context = crate::progress::context(false);
    let suite = plan.run(&SuiteOptions {
        baseline: a.baseline.as_deref(),
        max_regression: a.max_regression,
        progress: &progress,
        context: &context,
    })?;
    print_matrix(&suite);
    if let Some(dir) = &a.report {
        suite.write(dir)?;
        println!("report: {}", dir.display());
    }
    let bad = suite.unexpected();
    println!("\n{} of {} runs as expected", suite.runs.len() - bad, suite.runs.len());
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The faults `--real-faults` names, each one of the real model's matrix.
fn real_faults(ids: Option<&[String]>) -> Result<Option<Vec<Fault>>> {
    let Some(ids) = ids else { return Ok(None) };
    let mut out = Vec::new();
    for id in ids {
        let f = Fault::parse(id).filter(|f| REAL_MODEL_FAULTS.iter().any(|(g, _)| g == f));
        let Some(f) = f else {
            let known: Vec<&str> = REAL_MODEL_FAULTS.iter().map(|(f, _)| f.id()).collect();
            return Err(Error::Usage {
                flag: "--real-faults".into(),
                what: format!(
                    "{id:?} is not a fault of the real model's matrix ({})",
                    known.join(", ")
                ),
            });
        };
        out.push(f);
    }
    Ok(Some(out))
}

fn print_matrix(suite: &Suite) {
    println!(
        "{:<18} {:<44} {:<8} {:<8} {:<70} {:>9} {:>6}",
        "golden", "run", "expect", "got", "first divergence / diagnosis", "x floor", "secs"
    );
    let word = |v: Verdict| match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
    };
    for r in &suite.runs {
        let (got, detail) = match &r.outcome {
            Ok(rep) => {
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
                (word(rep.verdict).to_string(), format!("{fd}{dg}"))
            }
            Err(e) => ("error".to_string(), e.clone()),
        };
        let mark = if r.ok() { "" } else { "  <-- unexpected" };
        let floor = r
            .outcome
            .as_ref()
            .ok()
            .and_then(floor_distance)
            .map_or("-".to_string(), |(x, _)| format!("{x:.3}"));
        println!(
            "{:<18} {:<44} {:<8} {:<8} {:<70} {:>9} {:>6.2}{mark}",
            r.golden,
            r.run,
            word(r.expect.verdict),
            got,
            detail,
            floor,
            r.seconds
        );
    }
}
