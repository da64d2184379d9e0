//! The real MindSpore port (`fixtures/ports/mindspore/run.py`), run in a subprocess
//! (the subprocess code, [`Port`] and `run_port`, is shared with [`super::mindformers`]):
//! `python run.py --golden GOLDEN --out TMP [--dtype D] [--fault ID[@layers=L]]...` writes a
//! contract dump, which is read back into memory and the temporary directory removed.
//! The port narrows a fault to decoder layers (`--fault attn.no_scale@layers=1`); it
//! takes no other scope and no parameter.
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
use contract::error::{Error, Feature, Result};
use contract::fault::ScopedFault;
use contract::site;
use dump::{Dump, Tensor};

const PORT_REL: &str = "fixtures/ports/mindspore/run.py";

/// The MindSpore port's subprocess settings.
pub const PORT: Port = Port {
    program: "mindspore port",
    python_env: "PARITY_MINDSPORE_PYTHON",
    venv_env: "PARITY_MINDSPORE_VENV",
    port_env: "PARITY_MINDSPORE_PORT",
    venv_name: "mindspore-venv",
    port_rel: PORT_REL,
    install: "python3 -m venv {venv} && {venv}/bin/pip install -r fixtures/ports/mindspore/requirements.txt",
    needs: "mindspore 2.10",
    layer_scopes: true,
};

/// A port run in a subprocess by a Python interpreter from a venv: where each piece is
/// found and what to say when one is missing. Shared by the MindSpore port and
/// MindFormers' Llama ([`super::mindformers`]).
#[derive(Debug, Clone, Copy)]
pub struct Port {
    /// How messages name the subprocess, e.g. "mindspore port".
    pub program: &'static str,
    /// Environment variable naming the interpreter.
    pub python_env: &'static str,
    /// Environment variable naming the venv.
    pub venv_env: &'static str,
    /// Environment variable naming the runner script.
    pub port_env: &'static str,
    /// The venv's directory under `$HOME/.cache/llama-parity/`.
    pub venv_name: &'static str,
    /// The runner script, relative to the source tree.
    pub port_rel: &'static str,
    /// How to create the venv by hand; `{venv}` stands for its path.
    pub install: &'static str,
    /// What the interpreter must have, for the message.
    pub needs: &'static str,
    /// Whether the script's `--fault` takes a `layers` scope (`ID@layers=1,2`); no port
    /// takes any other scope or a parameter.
    pub layer_scopes: bool,
}

impl Port {
    /// The venv `.ci/setup` creates: `$<venv_env>`, else `$HOME/.cache/llama-parity/<venv_name>`.
    pub fn default_venv(&self) -> PathBuf {
        if let Some(v) = std::env::var_os(self.venv_env).filter(|v| !v.is_empty()) {
            return PathBuf::from(v);
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".cache/llama-parity").join(self.venv_name)
    }

    /// The interpreter that runs the port.
    pub fn python(&self) -> PathBuf {
        match std::env::var_os(self.python_env).filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => self.default_venv().join("bin/python"),
        }
    }

    /// The port's runner script.
    pub fn script(&self) -> PathBuf {
        if let Some(p) = std::env::var_os(self.port_env).filter(|v| !v.is_empty()) {
            return PathBuf::from(p);
        }
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(self.port_rel);
        if built.is_file() {
            built
        } else {
            PathBuf::from(self.port_rel)
        }
    }

    fn install_hint(&self, python: &Path, problem: &str) -> Error {
        let venv = self.default_venv();
        let install = self.install.replace("{venv}", &venv.display().to_string());
        Error::External {
            program: self.program.into(),
            what: format!(
                "{what} is not available: {problem} ({python}). Install it with `bash .ci/setup` (creates {venv}), \
                 or by hand: `{install}`; or set {env} to an interpreter that has {needs}",
                what = self.needs.split(' ').next().unwrap_or(self.needs),
                python = python.display(),
                venv = venv.display(),
                env = self.python_env,
                needs = self.needs,
            ),
        }
    }
}

/// The venv `.ci/setup` creates: `$PARITY_MINDSPORE_VENV`, else
/// `$HOME/.cache/llama-parity/mindspore-venv`.
pub fn default_venv() -> PathBuf {
    PORT.default_venv()
}

/// The interpreter that runs the port.
pub fn python() -> PathBuf {
    PORT.python()
}

/// Runs the port on `golden`'s scenario and returns its dump (held in memory).
/// `progress` receives each line the port writes.
pub fn run(golden: &Dump, opts: &RunOptions, progress: &mut dyn FnMut(&str)) -> Result<RunOutput> {
    run_port(&PORT, "mindspore", golden, opts, &[], progress)
}

/// Runs `port`'s script as `python SCRIPT --golden GOLDEN --out TMP [--dtype D]
/// [--fault ID[@layers=L]]... EXTRA...` in a temporary working directory (a port may
/// write logs there; nothing lands beside the golden or in the caller's directory),
/// then reads its dump back into memory and removes the directory. `impl_name` names
/// the implementation in usage errors.
pub fn run_port(
    port: &Port,
    impl_name: &str,
    golden: &Dump,
    opts: &RunOptions,
    extra: &[String],
    progress: &mut dyn FnMut(&str),
) -> Result<RunOutput> {
    let layers_only = |f: &ScopedFault| {
        port.layer_scopes && f.scope.steps.is_none() && f.scope.component.is_none()
    };
    if let Some(f) = opts
        .faults
        .iter()
        .find(|f| !(f.scope.is_everywhere() || layers_only(f)) || !f.params.is_default())
    {
        let plants = if port.layer_scopes {
            "in its default form, narrowed to layers at most"
        } else {
            "everywhere"
        };
        return Err(Error::unsupported(
            Feature::FaultScope,
            format!("the {impl_name} port plants {} {plants}; it has no switch for {f}", f.fault),
        ));
    }
    if opts.teacher_force {
        return Err(Error::unsupported(
            Feature::TeacherForcing,
            format!("the {impl_name} implementation runs the port as a whole; it cannot start a layer from the golden's input"),
        ));
    }
    let Some(golden_dir) = golden.dir() else {
        return Err(Error::unsupported(
            Feature::Implementation,
            format!("the {impl_name} port reads the golden from its directory; this golden is in memory"),
        ));
    };
    let golden_dir = std::path::absolute(golden_dir).map_err(|e| Error::io(golden_dir, e))?;
    let python = port.python();
    if !python.is_file() {
        return Err(port.install_hint(&python, "the interpreter does not exist"));
    }
    let script = port.script();
    if !script.is_file() {
        return Err(Error::External {
            program: port.program.into(),
            what: format!(
                "{}: no such file (set {} to the port's runner script)",
                script.display(),
                port.port_env
            ),
        });
    }
    let script = std::path::absolute(&script).map_err(|e| Error::io(&script, e))?;
    let tmp = tempfile::Builder::new()
        .prefix("parity-port-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let out = tmp.path().join("dump");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).map_err(|e| Error::io(&work, e))?;
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg("--golden").arg(&golden_dir).arg("--out").arg(&out);
    // No __pycache__ written beside the port: a run never writes into its inputs.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(p) = opts.precision {
        cmd.args(["--dtype", p.name()]);
    }
    for f in &opts.faults {
        // `ID`, or `ID@layers=1,2` (only a port that takes layer scopes gets here with one)
        cmd.arg("--fault").arg(f.to_string());
    }
    cmd.args(extra)
        .current_dir(&work)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| port.install_hint(&python, &format!("cannot start the interpreter: {e}")))?;

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
            return Err(
                port.install_hint(&python, &format!("the interpreter cannot import `{module}`"))
            );
        }
        let code = status.code().map_or_else(|| "a signal".to_string(), |c| format!("status {c}"));
        let what = if last.is_empty() { "no message".to_string() } else { last };
        return Err(Error::External {
            program: port.program.into(),
            what: format!("{} exited with {code}: {what}", script.display()),
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
