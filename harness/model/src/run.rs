//! What a run is asked for and what it gives back: the [`Implementation`], the
//! [`RunOptions`] (built one way: [`RunOptions::new`] and its `with_` methods), and the
//! [`RunOutput`]. `model::run` runs them.

use contract::fault::ScopedFault;
use dump::{Dump, Precision};

use crate::context::RunContext;

/// Which implementation runs the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// Float64 everywhere, written from the formulas.
    Reference,
    /// The port's numerics on Ascend simulated on the CPU.
    Ascend,
    /// The real MindSpore port under `fixtures/ports/mindspore`, run in a subprocess.
    MindSpore,
    /// MindFormers' own Llama (`fixtures/ports/mindformers`), run in a subprocess on a device.
    MindFormers(Device),
}

impl Implementation {
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Reference => "reference",
            Implementation::Ascend => "ascend",
            Implementation::MindSpore => "mindspore",
            Implementation::MindFormers(_) => "mindformers",
        }
    }
}

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

/// What to run. Built with [`RunOptions::new`] and the `with_` methods (outside this
/// crate there is no other way), e.g.
///
/// ```
/// # use model::{Implementation, RunOptions};
/// # use dump::Precision;
/// let opts = RunOptions::new(Implementation::Ascend)
///     .with_precision(Precision::Bf16)
///     .with_teacher_force(true);
/// assert_eq!(opts.precision, Some(Precision::Bf16));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOptions {
    pub implementation: Implementation,
    /// Compute precision; `None` means the golden's dtype. The reference always computes
    /// in float64 and uses this only as the dtype its dump declares (which picks the
    /// tolerance the comparison applies).
    pub precision: Option<Precision>,
    /// Faults planted where each lives in a real port, each within its scope.
    pub faults: Vec<ScopedFault>,
    /// Also run each layer from the golden's input to that layer.
    pub teacher_force: bool,
    /// Where the ports are, whether checkpoints are hashed, who is told of progress.
    pub context: RunContext,
}

impl RunOptions {
    /// `implementation` at the golden's dtype, no fault, no teacher forcing, the
    /// default [`RunContext`].
    pub fn new(implementation: Implementation) -> RunOptions {
        RunOptions {
            implementation,
            precision: None,
            faults: Vec::new(),
            teacher_force: false,
            context: RunContext::new(),
        }
    }

    /// Computes at `precision` (`None`: the golden's dtype).
    pub fn with_precision(mut self, precision: impl Into<Option<Precision>>) -> RunOptions {
        self.precision = precision.into();
        self
    }

    /// Plants `faults`.
    pub fn with_faults(mut self, faults: Vec<ScopedFault>) -> RunOptions {
        self.faults = faults;
        self
    }

    /// Also runs the teacher-forced variant when `on`.
    pub fn with_teacher_force(mut self, on: bool) -> RunOptions {
        self.teacher_force = on;
        self
    }

    /// Runs within `context`.
    pub fn with_context(mut self, context: RunContext) -> RunOptions {
        self.context = context;
        self
    }
}

/// What a run produced.
pub struct RunOutput {
    /// The free-running dump.
    pub dump: Dump,
    /// With `teacher_force`: the dump where each layer started from the golden's input.
    pub teacher_forced: Option<Dump>,
    /// What the caller should know about the run's inputs (a referenced checkpoint not
    /// verified, say), in order; each was also shown to the context's sink as it arose.
    pub warnings: Vec<String>,
}
