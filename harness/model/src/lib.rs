//! Stage 3, the model: uses the contract, the dump and the weights stages; knows
//! nothing of comparison, diagnosis or reports.
//!
//! Implementations that run a golden's scenario and produce a dump of every site:
//! the float64 reference, the simulated Ascend port, the real MindSpore port, and
//! MindFormers' own Llama.
//!
//! One building block a file, composed by [`llama`]:
//! [`weights`] (HF names) → [`embedding`] → [`rope`] (frequencies, tables, rotation) →
//! [`mask`] → per layer ([`decoder_layer`]) [`rms_norm`], [`linear`], [`heads`],
//! [`kv_cache`], [`attention`], [`mlp`]. [`runner`] runs a golden's scenario step by step
//! on a loaded model for every in-process implementation.
//!
//! Two seams are threaded through every block so that the reference and a simulated
//! port share the model code:
//! - [`numerics::Numerics`] says how values are rounded at each named point
//!   ([`numerics::RoundAt`]); the reference uses [`numerics::Exact`] (float64, nothing
//!   rounded), the ascend implementation ([`ascend`]) supplies its own (bf16/fp16
//!   storage, fp32 accumulation, MindFormers' conventions as named options);
//! - [`plan::Plan`] maps the planted faults (`--fault ID[@scope]`) to the variant each block
//!   runs (positions bookkeeping, layout, cache write, key mapping...).

pub mod ascend;
pub mod attention;
pub mod decoder_layer;
pub mod embedding;
mod fma_product;
pub mod heads;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mask;
pub mod mlp;
pub mod numerics;
pub mod plan;
pub mod progress;
pub mod reference;
pub mod rms_norm;
pub mod rope;
mod rowdot;
pub mod runner;
pub mod weights;

use contract::error::{Error, Feature, Result};
use contract::fault::ScopedFault;
use dump::{Dump, Precision};

pub mod mindformers;
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
    /// MindFormers' own Llama (`fixtures/ports/mindformers`), run in a subprocess on a device.
    MindFormers(mindformers::Device),
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

/// What to run.
#[derive(Debug, Clone)]
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
    if let Implementation::MindFormers(device) = opts.implementation {
        return mindformers::run(golden, opts, device, &mut |line| {
            eprintln!("parity: mindformers: {line}")
        });
    }
    let plan = plan::Plan::scoped(&opts.faults);
    match opts.implementation {
        Implementation::Reference => {
            reference::run(golden, opts.precision, &plan, opts.teacher_force)
        }
        Implementation::Ascend => {
            let precision = opts.precision.unwrap_or(golden.manifest.dtype);
            ascend::run(
                golden,
                &ascend::AscendOptions::mindformers(precision),
                &plan,
                opts.teacher_force,
            )
        }
        other => Err(Error::unsupported(
            Feature::Implementation,
            format!("the {} implementation is not built yet", other.name()),
        )),
    }
}

/// The MindSpore port in a subprocess; its output lines become progress on stderr.
fn run_mindspore(golden: &Dump, opts: &RunOptions) -> Result<RunOutput> {
    mindspore::run(golden, opts, &mut |line| eprintln!("parity: mindspore: {line}"))
}
