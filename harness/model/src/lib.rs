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
//! [`kv_cache`], [`attention`], [`mlp`], each step's sites gathered in [`step_output`].
//! [`runner`] runs a golden's scenario step by step on a loaded model for every
//! in-process implementation.
//!
//! What a run is asked for and gives back is in [`mod@run`] ([`RunOptions`],
//! [`RunOutput`]); what it takes from its caller (where the ports are, [`ports`];
//! whether checkpoints are hashed; who hears of progress and warnings) in [`context`].
//! The library prints nothing and reads no environment variable: progress and warnings
//! are [`RunEvent`]s for the caller's sink, and the settings the `parity` binary takes
//! from its environment are handed in as a [`RunContext`] ([`RunContext::from_vars`]).
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
pub mod context;
pub mod decoder_layer;
pub mod embedding;
mod fma_product;
mod fma_product64;
mod fma_tiles;
pub mod heads;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod mask;
pub mod mindformers;
pub mod mindspore;
pub mod mlp;
pub mod numerics;
pub mod plan;
pub mod ports;
pub mod reference;
pub mod rms_norm;
pub mod rng;
pub mod rope;
mod rowdot;
pub mod run;
pub mod runner;
pub mod step_output;
pub mod train;
pub mod weights;

pub use context::{EventSink, RunContext, RunEvent, Sha256Check};
pub use ports::{PortPaths, Ports};
pub use run::{Device, Implementation, RunOptions, RunOutput};

use contract::error::Result;
use dump::Dump;

/// Runs `golden`'s scenario on its weights with the chosen implementation.
pub fn run(golden: &Dump, opts: &RunOptions) -> Result<RunOutput> {
    let ctx = &opts.context;
    plan::check_scopes(
        &opts.faults,
        golden.manifest.model.num_hidden_layers,
        &golden.manifest.steps,
    )
    .map_err(|what| contract::error::Error::Usage { flag: "--fault".into(), what })?;
    if golden.manifest.train.is_none() {
        if let Some(f) = opts.faults.iter().find(|f| f.fault.is_train()) {
            return Err(contract::error::Error::Usage {
                flag: "--fault".into(),
                what: format!(
                    "{f}: the golden is not a training step (no `train` in its manifest, \
                     CONTRACT §6)"
                ),
            });
        }
    }
    if golden.manifest.train.is_some()
        && matches!(opts.implementation, Implementation::Reference | Implementation::Ascend)
    {
        return train::run(golden, opts);
    }
    match opts.implementation {
        Implementation::MindSpore => mindspore::run(golden, opts),
        Implementation::MindFormers(device) => mindformers::run(golden, opts, device),
        Implementation::Reference => {
            let plan = plan::Plan::scoped(&opts.faults);
            reference::run(golden, opts.precision, &plan, opts.teacher_force, ctx)
        }
        Implementation::Ascend => {
            let plan = plan::Plan::scoped(&opts.faults);
            let precision = opts.precision.unwrap_or(golden.manifest.dtype);
            let ascend = ascend::AscendOptions::mindformers(precision);
            ascend::run(golden, &ascend, &plan, opts.teacher_force, ctx)
        }
    }
}
