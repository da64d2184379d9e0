//! The real MindSpore port (`fixtures/ports/mindspore/run.py`), run in a subprocess
//! (the subprocess code, [`Port`] and `run_port`, is shared with `mindformers`):
//! `python run.py --golden GOLDEN --out TMP [--dtype D] [--fault ID[@layers=L]]...` writes a
//! contract dump, which is read back into memory and the temporary directory removed.
//! The port narrows a fault to decoder layers (`--fault attn.no_scale@layers=1`); it
//! takes no other scope and no parameter.
//!
//! A golden of one training step (CONTRACT §6, `train` in its manifest) goes to the port
//! the same way: its runner sees `train` and runs the step (`train.py`), the `train.*`
//! faults passed as `--fault` like any other. What comes back must be that step:
//! `steps` `["train"]` and the golden's own `train` field, else the run is an error. A
//! port that does not train ([`Port::trains`]) is refused such a golden.
//!
//! Where the interpreter and the script are found is [`crate::ports`]' business
//! ([`MINDSPORE`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use contract::error::{Error, Feature, Result};
use contract::fault::ScopedFault;
use contract::site::{self, Step};
use dump::{Dump, Tensor};

use crate::context::RunEvent;
use crate::ports::{Port, MINDSPORE};
use crate::run::{RunOptions, RunOutput};

/// Runs the port on `golden`'s scenario and returns its dump (held in memory). Each
/// line the port writes goes to the context's sink ([`RunEvent::PortLine`]).
pub fn run(golden: &Dump, opts: &RunOptions) -> Result<RunOutput> {
    run_port(&MINDSPORE, "mindspore", golden, opts, &[])
}

/// Runs `port`'s script as `python SCRIPT --golden GOLDEN --out TMP [--dtype D]
/// [--fault ID[@layers=L]]... EXTRA...` in a temporary working directory (a port may
/// write logs there; nothing lands beside the golden or in the caller's directory),
/// then reads its dump back into memory and removes the directory. `impl_name` names
/// the implementation in usage errors and in the [`RunEvent::PortLine`]s its lines
/// become; the interpreter and the script are found in `opts.context.ports`.
pub fn run_port(
    port: &Port,
    impl_name: &str,
    golden: &Dump,
    opts: &RunOptions,
    extra: &[String],
) -> Result<RunOutput> {
    let ports = &opts.context.ports;
    let progress = |line: &str| opts.context.emit(&RunEvent::PortLine { port: impl_name, line });
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
    if golden.manifest.train.is_some() && !port.trains {
        return Err(Error::unsupported(
            Feature::Implementation,
            format!(
                "field `train` (one training step, CONTRACT §6) is not implemented by the \
                 {impl_name} port"
            ),
        ));
    }
    let Some(golden_dir) = golden.dir() else {
        return Err(Error::unsupported(
            Feature::Implementation,
            format!("the {impl_name} port reads the golden from its directory; this golden is in memory"),
        ));
    };
    let golden_dir = std::path::absolute(golden_dir).map_err(|e| Error::io(golden_dir, e))?;
    let python = port.python(ports);
    if !python.is_file() {
        return Err(port.install_hint(ports, &python, "the interpreter does not exist"));
    }
    let script = port.script(ports);
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
    let mut child = cmd.spawn().map_err(|e| {
        port.install_hint(ports, &python, &format!("cannot start the interpreter: {e}"))
    })?;

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
            return Err(port.install_hint(
                ports,
                &python,
                &format!("the interpreter cannot import `{module}`"),
            ));
        }
        let code = status.code().map_or_else(|| "a signal".to_string(), |c| format!("status {c}"));
        let what = if last.is_empty() { "no message".to_string() } else { last };
        return Err(Error::External {
            program: port.program.into(),
            what: format!("{} exited with {code}: {what}", script.display()),
        });
    }
    let dump = Dump::open(&out)?;
    if let Some(what) = not_the_step(golden, &dump) {
        return Err(Error::External {
            program: port.program.into(),
            what: format!(
                "{} wrote a dump that is not the golden's step: {what}",
                script.display()
            ),
        });
    }
    let dump = into_memory(&dump)?;
    Ok(RunOutput { dump, teacher_forced: None, warnings: Vec::new() })
}

/// Why the port's `dump` is not a run of `golden`'s training step, or `None` when it
/// is one (or the golden is not a training step): `steps` must be `["train"]` and
/// `train` the golden's own.
fn not_the_step(golden: &Dump, dump: &Dump) -> Option<String> {
    let spec = golden.manifest.train.as_ref()?;
    if dump.manifest.steps != [Step::Train] {
        let steps: Vec<String> = dump.manifest.steps.iter().map(ToString::to_string).collect();
        return Some(format!("its steps are {steps:?}, not [\"train\"]"));
    }
    match &dump.manifest.train {
        None => Some("its manifest has no `train` field".into()),
        Some(t) if t != spec => Some("its `train` field differs from the golden's".into()),
        Some(_) => None,
    }
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

    /// A manifest of one training step with `lr`, or of a prefill when `lr` is None.
    fn dump(lr: Option<f64>) -> Dump {
        let train = lr.map_or(String::new(), |lr| {
            format!(
                r#", "train": {{"labels": [[-100, 2, 3]], "micro_batches": 1, "trainable": "all",
                  "optimizer": {{"name": "adamw", "lr": {lr}, "betas": [0.9, 0.999], "eps": 1e-8,
                                "weight_decay": 0.1, "no_decay": []}},
                  "max_grad_norm": 1.0, "loss_scale": {{"kind": "none"}}}}"#
            )
        });
        let steps = if lr.is_some() { "train" } else { "prefill" };
        let text = format!(
            r#"{{"format": "llama-parity/dump@1", "producer": {{}},
              "model": {{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}},
              "dtype": "float32",
              "scenario": {{"name": "t", "input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]],
                           "decode_ids": [[]]}},
              "steps": ["{steps}"]{train}}}"#
        );
        let m = dump::Manifest::parse(&text, std::path::Path::new("t/manifest.json"))
            .expect("manifest");
        let key = if lr.is_some() { "train/loss" } else { "prefill/model.norm" };
        let t = Tensor::from_f64(&[], &[1.0], dump::DType::F32);
        Dump::in_memory(m, BTreeMap::from([(key.to_string(), t)])).expect("dump")
    }

    #[test]
    fn a_port_dump_must_be_the_golden_training_step() {
        let golden = dump(Some(1e-3));
        assert_eq!(not_the_step(&golden, &dump(Some(1e-3))), None);
        let other = not_the_step(&golden, &dump(Some(2e-3))).unwrap_or_default();
        assert!(other.contains("differs from the golden's"), "{other}");
        let prefill = not_the_step(&golden, &dump(None)).unwrap_or_default();
        assert!(prefill.contains(r#"not ["train"]"#), "{prefill}");
        // an inference golden asks nothing of the steps
        assert_eq!(not_the_step(&dump(None), &dump(Some(1e-3))), None);
    }

    #[test]
    fn a_missing_module_is_recognised() {
        assert_eq!(
            missing_module("ModuleNotFoundError: No module named 'mindspore'").as_deref(),
            Some("mindspore")
        );
        assert_eq!(missing_module("run.py: no such file: x"), None);
    }
}
