//! `parity suite`: every implementation on every golden, every faulty candidate
//! against its golden, as one matrix (`pipeline::suite`), printed.

use std::path::Path;
use std::process::ExitCode;

use llama_parity::compare::Verdict;
use llama_parity::dump::guard;
use llama_parity::pipeline::suite::{Plan, Suite, SuiteOptions};
use llama_parity::{Error, Result};

use crate::args::SuiteArgs;
use crate::output::progress;

pub fn cmd_suite(a: SuiteArgs) -> Result<ExitCode> {
    let mut plan = Plan::new(&a.goldens, &a.candidates, a.mindspore)?;
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
    let mut inputs: Vec<&Path> =
        vec![a.goldens.as_path(), a.candidates.as_path(), a.adapters.as_path()];
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

fn print_matrix(suite: &Suite) {
    println!(
        "{:<16} {:<34} {:<8} {:<8} {:<70} {:>6}",
        "golden", "run", "expect", "got", "first divergence / diagnosis", "secs"
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
        println!(
            "{:<16} {:<34} {:<8} {:<8} {:<70} {:>6.2}{mark}",
            r.golden,
            r.run,
            word(r.expect.verdict),
            got,
            detail,
            r.seconds
        );
    }
}
