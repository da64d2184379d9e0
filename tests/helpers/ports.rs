//! What the tests of the real ports (the MindSpore port, MindFormers) share: the
//! goldens by name, a report's worst site, and MindFormers' interpreter, without which
//! its tests fail.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The names of the golden dumps under `golden/`, sorted.
pub fn golden_names() -> Vec<String> {
    super::dump_dirs("golden")
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// The site of `report` (a `report.json`) with the largest rel-L2, as
/// "step/site rel_l2 1.234e-5", or "-" when no site has one.
pub fn worst_site(report: &Value) -> String {
    let mut best: Option<(f64, String)> = None;
    for s in report["sites"].as_array().into_iter().flatten() {
        if let Some(r) = s["metrics"]["rel_l2"].as_f64() {
            if best.as_ref().is_none_or(|(b, _)| r > *b) {
                let k = format!(
                    "{}/{}",
                    s["step"].as_str().unwrap_or("?"),
                    s["site"].as_str().unwrap_or("?")
                );
                best = Some((r, k));
            }
        }
    }
    best.map_or("-".into(), |(r, k)| format!("{k} rel_l2 {r:.3e}"))
}

/// MindFormers' interpreter, found as `parity run --impl mindformers` finds it
/// (`PARITY_MINDFORMERS_PYTHON`, else the venv of `PARITY_MINDFORMERS_VENV` or
/// `~/.cache/llama-parity/mindformers-venv`). Panics, saying how to make the venv, when
/// it is not there: the tests that need MindFormers never pass silently without it.
pub fn mindformers_python() -> PathBuf {
    port_python(&llama_parity::model::ports::MINDFORMERS)
}

/// A port's interpreter, found as `parity run --impl` finds it; panics, saying how to
/// make the venv, when it is not there.
pub fn port_python(port: &llama_parity::model::ports::Port) -> PathBuf {
    let ports = llama_parity::model::Ports::from_vars(|k| std::env::var_os(k));
    let py = port.python(&ports);
    assert!(
        py.is_file(),
        "no {} interpreter at {}: run bash .ci/setup (it creates ~/.cache/llama-parity/{}), \
         or point {} or {} at one",
        port.program,
        py.display(),
        port.venv_name,
        port.python_env,
        port.venv_env
    );
    py
}

/// Runs MindFormers' interpreter on `script` (under `fixtures/ports/mindformers/`) with
/// `--jobs DIR/jobs.json` holding `jobs`, in `dir` (MindFormers writes its logs into the
/// current directory); panics with the script's stderr unless it exits 0.
pub fn run_mindformers_jobs(script: &str, dir: &Path, jobs: &[Value]) {
    let jobs_file = dir.join("jobs.json");
    std::fs::write(&jobs_file, serde_json::to_string(jobs).expect("json")).expect("write jobs");
    let out = Command::new(mindformers_python())
        .arg(super::root().join("fixtures/ports/mindformers").join(script))
        .arg("--jobs")
        .arg(&jobs_file)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} --jobs: exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `parity ... --report DIR` came to: its exit code, stdout and stderr together,
/// and one JSON file of the report (`Null` when it is missing or not JSON).
pub struct Reported {
    pub code: Option<i32>,
    pub output: String,
    pub report: Value,
}

/// Runs `parity ARGS... --report REPORT` from `cwd` and reads `REPORT/file`.
pub fn parity_reported<A: AsRef<OsStr>>(
    cwd: &Path,
    args: impl IntoIterator<Item = A>,
    report: &Path,
    file: &str,
) -> Reported {
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(cwd)
        .args(args)
        .arg("--report")
        .arg(report)
        .output()
        .expect("run parity");
    let output =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report = std::fs::read_to_string(report.join(file))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Reported { code: out.status.code(), output, report }
}

/// `parity run GOLDEN --impl IMPL` with the port's interpreter override (`env`) pointing
/// nowhere: exit 2, and stderr names the interpreter, `bash .ci/setup` and the port's
/// requirements file.
pub fn without_interpreter_exits_2_saying_how_to_install(env: &str, implementation: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(crate::helpers::root())
        .env(env, "/nonexistent/bin/python")
        .args(["run", "golden/mha_f32", "--impl", implementation])
        .output()
        .expect("run parity");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/bin/python") && stderr.contains("bash .ci/setup"),
        "{stderr}"
    );
    let requirements = format!("fixtures/ports/{implementation}/requirements.txt");
    assert!(stderr.contains(&requirements), "{stderr}");
}
