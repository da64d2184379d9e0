//! The real MindSpore port (`fixtures/ports/mindspore/run.py`), run in a subprocess:
//! `python run.py --golden GOLDEN --out TMP [--dtype D] [--fault ID]...` writes a
//! contract dump, which is read back into memory and the temporary directory removed.
//!
//! Where things are found:
//! - the interpreter: `$PARITY_MINDSPORE_PYTHON`, else `<venv>/bin/python` with `<venv>`
//!   `$PARITY_MINDSPORE_VENV` or `$HOME/.cache/llama-parity/mindspore-venv` (where
//!   `.ci/setup` creates it);
//! - the port: `$PARITY_MINDSPORE_PORT`, else `fixtures/ports/mindspore/run.py` in the
//!   source tree this binary was built from, else the same path under the current dir.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{RunOptions, RunOutput};
use crate::contract::error::{Error, Result};
use crate::contract::site;
use crate::dump::{Dump, Tensor};

const PORT_REL: &str = "fixtures/ports/mindspore/run.py";
const REQUIREMENTS_REL: &str = "fixtures/ports/mindspore/requirements.txt";
const PROGRAM: &str = "mindspore port";

/// The venv `.ci/setup` creates: `$PARITY_MINDSPORE_VENV`, else
/// `$HOME/.cache/llama-parity/mindspore-venv`.
pub fn default_venv() -> PathBuf {
    if let Some(v) = std::env::var_os("PARITY_MINDSPORE_VENV").filter(|v| !v.is_empty()) {
        return PathBuf::from(v);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/llama-parity/mindspore-venv")
}

/// The interpreter that runs the port.
pub fn python() -> PathBuf {
    match std::env::var_os("PARITY_MINDSPORE_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => default_venv().join("bin/python"),
    }
}

/// The port's `run.py`.
pub fn port_script() -> PathBuf {
    if let Some(p) = std::env::var_os("PARITY_MINDSPORE_PORT").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(PORT_REL);
    if built.is_file() {
        built
    } else {
        PathBuf::from(PORT_REL)
    }
}

fn install_hint(python: &Path, problem: &str) -> Error {
    let venv = default_venv();
    Error::External {
        program: PROGRAM.into(),
        what: format!(
            "MindSpore is not available: {problem} ({python}). Install it with `bash .ci/setup` (creates {venv}), \
             or by hand: `python3 -m venv {venv} && {venv}/bin/pip install -r {REQUIREMENTS_REL}`; \
             or set PARITY_MINDSPORE_PYTHON to an interpreter that has mindspore 2.10",
            python = python.display(),
            venv = venv.display(),
        ),
    }
}

/// Runs the port on `golden`'s scenario and returns its dump (held in memory).
/// `progress` receives each line the port writes.
pub fn run(golden: &Dump, opts: &RunOptions, progress: &mut dyn FnMut(&str)) -> Result<RunOutput> {
    if opts.teacher_force {
        return Err(Error::usage("--teacher-force", "the mindspore implementation runs the port as a whole; it cannot start a layer from the golden's input"));
    }
    let Some(golden_dir) = golden.dir() else {
        return Err(Error::usage(
            "--impl",
            "the mindspore port reads the golden from its directory; this golden is in memory",
        ));
    };
    let python = python();
    if !python.is_file() {
        return Err(install_hint(&python, "the interpreter does not exist"));
    }
    let port = port_script();
    if !port.is_file() {
        return Err(Error::External {
            program: PROGRAM.into(),
            what: format!(
                "{}: no such file (set PARITY_MINDSPORE_PORT to the port's run.py)",
                port.display()
            ),
        });
    }
    let tmp = tempfile::Builder::new()
        .prefix("parity-mindspore-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let out = tmp.path().join("dump");
    let mut cmd = Command::new(&python);
    cmd.arg(&port).arg("--golden").arg(golden_dir).arg("--out").arg(&out);
    // No __pycache__ written beside the port: a run never writes into its inputs.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(p) = opts.precision {
        cmd.args(["--dtype", p.name()]);
    }
    for f in &opts.faults {
        cmd.args(["--fault", f.id()]);
    }
    cmd.env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| install_hint(&python, &format!("cannot start the interpreter: {e}")))?;

    // The port's stdout is progress too; drain it on a thread so neither pipe fills.
    let stdout = child.stdout.take();
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stdout {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let mut last = String::new();
    let mut lines = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !line.trim().is_empty() {
                progress(&line);
                last = line.trim().to_string();
                lines.push(line);
            }
        }
    }
    let status = child.wait().map_err(|e| Error::io(&python, e))?;
    for line in drain.join().unwrap_or_default().lines().filter(|l| !l.trim().is_empty()) {
        progress(line);
    }
    if !status.success() {
        if let Some(module) = lines.iter().rev().find_map(|l| missing_module(l)) {
            return Err(install_hint(
                &python,
                &format!("the interpreter cannot import `{module}`"),
            ));
        }
        let code = status.code().map_or_else(|| "a signal".to_string(), |c| format!("status {c}"));
        let what = if last.is_empty() { "no message".to_string() } else { last };
        return Err(Error::External {
            program: PROGRAM.into(),
            what: format!("{} exited with {code}: {what}", port.display()),
        });
    }
    let dump = Dump::open(&out)?;
    let dump = into_memory(&dump)?;
    Ok(RunOutput { dump, teacher_forced: None })
}

/// The module named by a `ModuleNotFoundError: No module named 'x'` line.
fn missing_module(line: &str) -> Option<String> {
    let rest = line.split("No module named ").nth(1)?;
    Some(rest.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
}

/// A copy of `dump` held in memory, so that its directory can be removed.
fn into_memory(dump: &Dump) -> Result<Dump> {
    let mut tensors = BTreeMap::new();
    for &step in &dump.manifest.steps {
        for s in dump.sites(step) {
            if let Some(t) = dump.get(step, s)? {
                let owned = Tensor::owned(t.dtype(), t.shape().to_vec(), t.bytes().to_vec());
                tensors.insert(site::key(step, s), owned);
            }
        }
    }
    Dump::in_memory(dump.manifest.clone(), tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_is_recognised() {
        assert_eq!(
            missing_module("ModuleNotFoundError: No module named 'mindspore'").as_deref(),
            Some("mindspore")
        );
        assert_eq!(missing_module("run.py: no such file: x"), None);
    }
}
