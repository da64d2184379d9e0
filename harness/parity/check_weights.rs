//! `parity check-weights HF PORT.ckpt`: check a port's converted checkpoint against the
//! HF weights, or a port's LoRA adapter checkpoint against the PEFT adapter.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use llama_parity::contract::error::Error;
use llama_parity::dump::guard::{self, Output};
use llama_parity::weights::check::check_weights;
use llama_parity::weights::check_adapter::{
    adapter_files, check_adapter, mindpet_keymap, open_peft, Declaration, PortScaling,
};
use llama_parity::weights::checkpoint::HfCheckpoint;
use llama_parity::weights::ckpt::Checkpoint;
use llama_parity::weights::keymap::KeyMap;
use llama_parity::Result;

use crate::args::CheckWeightsArgs;
use crate::output::precision;

pub fn cmd_check_weights(a: CheckWeightsArgs) -> Result<ExitCode> {
    let adapter = adapter_files(&a.hf)?;
    let declaration = match (&a.port_config, &adapter) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(_)) if a.lora_alpha.is_none() => {
            let beside = sidecar(&a.port);
            beside.is_file().then_some(beside)
        }
        _ => None,
    };
    let report = a.report.as_deref().map(|dir| Output {
        label: "--report",
        dir,
        files: guard::WEIGHTS_REPORT_FILES,
    });
    guard::check_outputs(
        &[Some(a.hf.as_path()), Some(&a.port), a.map.as_deref(), declaration.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &report.into_iter().collect::<Vec<_>>(),
    )?;
    let dtype = a.dtype.map(|d| precision(d).dtype());
    let Some((config, weights)) = adapter else {
        for (set, flag) in
            [(a.port_config.is_some(), "--port-config"), (a.lora_alpha.is_some(), "--lora-alpha")]
        {
            if set {
                return Err(Error::Usage {
                    flag: flag.into(),
                    what: format!(
                        "is for a LoRA adapter, and {} is not one (a directory with \
                         adapter_config.json, a dump with an adapter, or \
                         adapter_model.safetensors)",
                        a.hf.display()
                    ),
                });
            }
        }
        let map = match &a.map {
            Some(p) => KeyMap::load(p)?,
            None => KeyMap::mindspore(),
        };
        let hf = HfCheckpoint::open(&a.hf)?;
        let port = Checkpoint::open(&a.port)?;
        let check = check_weights(&hf, &port, &map, dtype)?;
        print!("{}", check.render());
        if let Some(dir) = &a.report {
            check.write(dir)?;
            println!("report: {}", dir.join("weights.json").display());
        }
        return Ok(if check.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    };
    let map = match &a.map {
        Some(p) => KeyMap::load(p)?,
        None => mindpet_keymap(),
    };
    let scaling = match (declaration, a.lora_alpha) {
        (Some(p), _) => PortScaling::Declared(Declaration::load(&p)?),
        (None, Some(alpha)) if alpha.is_finite() => PortScaling::MindpetAlpha(alpha),
        (None, Some(alpha)) => {
            return Err(Error::Usage {
                flag: "--lora-alpha".into(),
                what: format!("{alpha} is not a finite number"),
            })
        }
        (None, None) => PortScaling::Undeclared,
    };
    let peft = open_peft(&config, &weights)?;
    let port = Checkpoint::open(&a.port)?;
    let check = check_adapter(&peft, &port, &map, &scaling, dtype)?;
    print!("{}", check.render());
    if let Some(dir) = &a.report {
        check.write(dir)?;
        println!("report: {}", dir.join("weights.json").display());
    }
    Ok(if check.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `PORT.json` beside the checkpoint `PORT` (what the converter writes).
fn sidecar(port: &Path) -> PathBuf {
    let mut s = port.as_os_str().to_os_string();
    s.push(".json");
    PathBuf::from(s)
}
