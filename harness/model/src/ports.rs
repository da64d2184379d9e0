//! Where the ports run in a subprocess are found: each [`Port`]'s fixed settings
//! ([`MINDSPORE`], [`MINDFORMERS`]) and the paths its caller gives ([`Ports`]).
//!
//! For each port:
//! - the interpreter: the given `python`, else `<venv>/bin/python` with `<venv>` the given
//!   `venv` or `<home>/.cache/llama-parity/<venv_name>` (where `.ci/setup` creates it);
//! - the runner script: the given `script`, else `port_rel` in the source tree this crate
//!   was built from, else the same path under the current dir.
//!
//! The `parity` binary gives what its environment says ([`Ports::from_vars`]:
//! `$PARITY_MINDSPORE_PYTHON`, `$PARITY_MINDSPORE_VENV`, `$PARITY_MINDSPORE_PORT`, the same
//! with `MINDFORMERS`, and `$HOME`); nothing here reads the environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use contract::error::Error;

/// Where one port is found, as the caller says; `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPaths {
    /// The interpreter that runs the port.
    pub python: Option<PathBuf>,
    /// The venv whose `bin/python` is the interpreter when `python` is `None`.
    pub venv: Option<PathBuf>,
    /// The port's runner script.
    pub script: Option<PathBuf>,
}

/// Where the ports are found, as the caller says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports {
    /// The home directory: the default venvs are `<home>/.cache/llama-parity/<name>`
    /// (under the current directory when `None`).
    pub home: Option<PathBuf>,
    /// The MindSpore port ([`MINDSPORE`]).
    pub mindspore: PortPaths,
    /// MindFormers' Llama ([`MINDFORMERS`]).
    pub mindformers: PortPaths,
}

impl Ports {
    /// Nothing given: every default.
    pub const fn new() -> Ports {
        Ports {
            home: None,
            mindspore: PortPaths { python: None, venv: None, script: None },
            mindformers: PortPaths { python: None, venv: None, script: None },
        }
    }

    /// The ports as the environment variables `var` gives say: `HOME`, and each port's
    /// interpreter, venv and script variables ([`Port::python_env`], [`Port::venv_env`],
    /// [`Port::port_env`]); an empty port variable counts as unset. The `parity` binary
    /// passes its environment (`|k| std::env::var_os(k)`).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Ports {
        let path = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let port = |p: &Port| PortPaths {
            python: path(p.python_env),
            venv: path(p.venv_env),
            script: path(p.port_env),
        };
        Ports {
            // Taken as it is: an empty HOME is the current directory, as before.
            home: var("HOME").map(PathBuf::from),
            mindspore: port(&MINDSPORE),
            mindformers: port(&MINDFORMERS),
        }
    }
}

/// A port run in a subprocess by a Python interpreter from a venv: where each piece is
/// found and what to say when one is missing.
#[derive(Debug, Clone, Copy)]
pub struct Port {
    /// How messages name the subprocess, e.g. "mindspore port".
    pub program: &'static str,
    /// Environment variable naming the interpreter (read by [`Ports::from_vars`], named
    /// in messages).
    pub python_env: &'static str,
    /// Environment variable naming the venv.
    pub venv_env: &'static str,
    /// Environment variable naming the runner script.
    pub port_env: &'static str,
    /// The venv's directory under `<home>/.cache/llama-parity/`.
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
    /// Whether the script runs one training step (CONTRACT §6) on a golden whose
    /// manifest has `train`; a port that does not is refused such a golden.
    pub trains: bool,
    /// This port's paths among the given ones.
    pub given: fn(&Ports) -> &PortPaths,
}

/// The MindSpore port (`fixtures/ports/mindspore/run.py`).
pub const MINDSPORE: Port = Port {
    program: "mindspore port",
    python_env: "PARITY_MINDSPORE_PYTHON",
    venv_env: "PARITY_MINDSPORE_VENV",
    port_env: "PARITY_MINDSPORE_PORT",
    venv_name: "mindspore-venv",
    port_rel: "fixtures/ports/mindspore/run.py",
    install: "python3 -m venv {venv} && {venv}/bin/pip install -r fixtures/ports/mindspore/requirements.txt",
    needs: "mindspore 2.10",
    layer_scopes: true,
    trains: true,
    given: |p| &p.mindspore,
};

/// MindFormers' Llama (`mindformers.models.llama.LlamaForCausalLM`, mindformers 2.0.0)
/// run by `fixtures/ports/mindformers/run.py`.
pub const MINDFORMERS: Port = Port {
    program: "mindformers",
    python_env: "PARITY_MINDFORMERS_PYTHON",
    venv_env: "PARITY_MINDFORMERS_VENV",
    port_env: "PARITY_MINDFORMERS_PORT",
    venv_name: "mindformers-venv",
    port_rel: "fixtures/ports/mindformers/run.py",
    install: "python3 -m venv {venv} && {venv}/bin/pip install -r fixtures/ports/mindformers/requirements.txt \
              && {venv}/bin/pip install --no-deps mindformers==2.0.0",
    needs: "mindformers 2.0.0 on mindspore 2.10",
    layer_scopes: false,
    trains: false,
    given: |p| &p.mindformers,
};

impl Port {
    /// The venv: the given one, else `<home>/.cache/llama-parity/<venv_name>` (where
    /// `.ci/setup` creates it).
    pub fn venv(&self, ports: &Ports) -> PathBuf {
        if let Some(v) = &(self.given)(ports).venv {
            return v.clone();
        }
        let home = ports.home.clone().unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache/llama-parity").join(self.venv_name)
    }

    /// The interpreter that runs the port: the given one, else the venv's `bin/python`.
    pub fn python(&self, ports: &Ports) -> PathBuf {
        match &(self.given)(ports).python {
            Some(p) => p.clone(),
            None => self.venv(ports).join("bin/python"),
        }
    }

    /// The port's runner script: the given one, else `port_rel` in the source tree this
    /// crate was built from, else the same path under the current dir.
    pub fn script(&self, ports: &Ports) -> PathBuf {
        if let Some(p) = &(self.given)(ports).script {
            return p.clone();
        }
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(self.port_rel);
        if built.is_file() {
            built
        } else {
            PathBuf::from(self.port_rel)
        }
    }

    /// The error for an interpreter `python` that cannot run the port (`problem`), saying
    /// how to install it.
    pub fn install_hint(&self, ports: &Ports, python: &Path, problem: &str) -> Error {
        let venv = self.venv(ports);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_port_variables_count_as_unset_and_home_is_taken_as_given() {
        let ports = Ports::from_vars(|k| match k {
            "HOME" => Some("/home/u".into()),
            "PARITY_MINDSPORE_PYTHON" => Some("".into()),
            "PARITY_MINDSPORE_VENV" => Some("/venv".into()),
            "PARITY_MINDFORMERS_PORT" => Some("/run.py".into()),
            _ => None,
        });
        assert_eq!(ports.home, Some(PathBuf::from("/home/u")));
        assert_eq!(MINDSPORE.python(&ports), PathBuf::from("/venv/bin/python"));
        assert_eq!(MINDFORMERS.script(&ports), PathBuf::from("/run.py"));
        assert_eq!(
            MINDFORMERS.python(&ports),
            PathBuf::from("/home/u/.cache/llama-parity/mindformers-venv/bin/python")
        );
    }

    #[test]
    fn with_nothing_given_the_venv_is_under_the_current_directory() {
        let ports = Ports::new();
        assert_eq!(
            MINDSPORE.python(&ports),
            PathBuf::from("./.cache/llama-parity/mindspore-venv/bin/python")
        );
    }
}
