//! MindFormers' own Llama (`mindformers.models.llama.LlamaForCausalLM`, mindformers
//! 2.0.0), run by `fixtures/ports/mindformers/run.py` in a subprocess with the same
//! machinery as the MindSpore port ([`super::mindspore::run_port`]):
//! `python run.py --golden GOLDEN --out TMP [--dtype D] [--fault ID]... --device CPU|Ascend`.
//!
//! Where things are found:
//! - the interpreter: `$PARITY_MINDFORMERS_PYTHON`, else `<venv>/bin/python` with `<venv>`
//!   `$PARITY_MINDFORMERS_VENV` or `$HOME/.cache/llama-parity/mindformers-venv` (where
//!   `.ci/setup` creates it);
//! - the runner: `$PARITY_MINDFORMERS_PORT`, else `fixtures/ports/mindformers/run.py` in
//!   the source tree this binary was built from, else the same path under the current dir.

use super::mindspore::{run_port, Port};
use super::{RunOptions, RunOutput};
use contract::error::Result;
use dump::Dump;

/// MindFormers' subprocess settings.
pub const PORT: Port = Port {
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
};

/// Where MindFormers runs: MindSpore's `device_target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU: no KV cache (decode reruns the prefix), float32 and float16.
    #[default]
    Cpu,
    /// An Ascend NPU.
    Ascend,
}

impl Device {
    /// MindSpore's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "CPU",
            Device::Ascend => "Ascend",
        }
    }
}

/// The venv `.ci/setup` creates: `$PARITY_MINDFORMERS_VENV`, else
/// `$HOME/.cache/llama-parity/mindformers-venv`.
pub fn default_venv() -> std::path::PathBuf {
    PORT.default_venv()
}

/// The interpreter that runs MindFormers: `$PARITY_MINDFORMERS_PYTHON`, else
/// `<venv>/bin/python` with `<venv>` from [`default_venv`].
pub fn python() -> std::path::PathBuf {
    PORT.python()
}

/// Runs MindFormers' Llama on `golden`'s scenario on `device` and returns its dump
/// (held in memory). `progress` receives each line the runner writes.
pub fn run(
    golden: &Dump,
    opts: &RunOptions,
    device: Device,
    progress: &mut dyn FnMut(&str),
) -> Result<RunOutput> {
    let extra = ["--device".to_string(), device.name().to_string()];
    run_port(&PORT, "mindformers", golden, opts, &extra, progress)
}
