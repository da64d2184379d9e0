//! Implementations that run a golden's scenario and produce a dump of every site:
//! the float64 reference, the simulated Ascend port, and the real MindSpore port.

use crate::dump::{Dump, Precision};
use crate::error::{Error, Result};
use crate::fault::Fault;

pub mod mindspore;

/// Which implementation runs the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// Float64 everywhere, written from the formulas.
    Reference,
    /// The port's numerics on Ascend simulated on the CPU.
    Ascend,
    /// The real MindSpore port under `fixtures/ports/mindspore`, run in a subprocess.
    MindSpore,
}

impl Implementation {
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Reference => "reference",
            Implementation::Ascend => "ascend",
            Implementation::MindSpore => "mindspore",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub implementation: Implementation,
    /// Compute precision; `None` means the golden's dtype (float64 for the reference).
    pub precision: Option<Precision>,
    /// Faults planted where each lives in a real port.
    pub faults: Vec<Fault>,
    /// Also run each layer from the golden's input to that layer.
    pub teacher_force: bool,
}

/// What a run produced.
pub struct RunOutput {
    /// The free-running dump.
    pub dump: Dump,
    /// With `teacher_force`: the dump where each layer started from the golden's input.
    pub teacher_forced: Option<Dump>,
}

/// Runs `golden`'s scenario on its weights with the chosen implementation.
pub fn run(golden: &Dump, opts: &RunOptions) -> Result<RunOutput> {
    if opts.implementation == Implementation::MindSpore {
        return run_mindspore(golden, opts);
    }
    Err(Error::usage("--impl", format!("the {} implementation is not built yet", opts.implementation.name())))
}

/// The MindSpore port in a subprocess; its output lines become progress on stderr.
fn run_mindspore(golden: &Dump, opts: &RunOptions) -> Result<RunOutput> {
    mindspore::run(golden, opts, &mut |line| eprintln!("parity: mindspore: {line}"))
}
