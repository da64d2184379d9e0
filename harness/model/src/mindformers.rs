//! MindFormers' own Llama (`mindformers.models.llama.LlamaForCausalLM`, mindformers
//! 2.0.0), run by `fixtures/ports/mindformers/run.py` in a subprocess with the same
//! machinery as the MindSpore port ([`super::mindspore::run_port`]):
//! `python run.py --golden GOLDEN --out TMP [--dtype D] [--fault ID]... --device CPU|Ascend`.
//!
//! Where the interpreter and the runner are found is [`crate::ports`]' business
//! ([`MINDFORMERS`]).

use contract::error::Result;
use dump::Dump;

use crate::mindspore::run_port;
use crate::ports::MINDFORMERS;
pub use crate::run::Device;
use crate::run::{RunOptions, RunOutput};

/// Runs MindFormers' Llama on `golden`'s scenario on `device` and returns its dump
/// (held in memory). Each line the runner writes goes to the context's sink
/// ([`crate::RunEvent::PortLine`]).
pub fn run(golden: &Dump, opts: &RunOptions, device: Device) -> Result<RunOutput> {
    let extra = ["--device".to_string(), device.name().to_string()];
    run_port(&MINDFORMERS, "mindformers", golden, opts, &extra)
}
