//! `parity check-weights HF.safetensors PORT.ckpt`: check a port's converted checkpoint
//! against the HF weights.

use std::process::ExitCode;

use llama_parity::dump::guard::{self, Output};
use llama_parity::weights::check::check_weights;
use llama_parity::weights::checkpoint::HfCheckpoint;
use llama_parity::weights::ckpt::Checkpoint;
use llama_parity::weights::keymap::KeyMap;
use llama_parity::Result;

use crate::args::CheckWeightsArgs;
use crate::output::precision;

pub fn cmd_check_weights(a: CheckWeightsArgs) -> Result<ExitCode> {
    let report = a.report.as_deref().map(|dir| Output {
        label: "--report",
        dir,
        files: guard::WEIGHTS_REPORT_FILES,
    });
    guard::check_outputs(
        &[Some(a.hf.as_path()), Some(&a.port), a.map.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &report.into_iter().collect::<Vec<_>>(),
    )?;
    let map = match &a.map {
        Some(p) => KeyMap::load(p)?,
        None => KeyMap::mindspore(),
    };
    let dtype = a.dtype.map(|d| precision(d).dtype());
    let hf = HfCheckpoint::open(&a.hf)?;
    let port = Checkpoint::open(&a.port)?;
    let check = check_weights(&hf, &port, &map, dtype)?;
    print!("{}", check.render());
    if let Some(dir) = &a.report {
        check.write(dir)?;
        println!("report: {}", dir.join("weights.json").display());
    }
    Ok(if check.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
