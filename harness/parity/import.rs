//! `parity import msprobe DUMP --out DIR`: an msprobe tensor dump read through the site
//! map into a contract dump. (`parity compare` reads msprobe dumps through
//! `pipeline::Candidate`.)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use llama_parity::dump::guard::{self, Output};
use llama_parity::dump::msprobe::{MsprobeDump, SiteMap};
use llama_parity::dump::Manifest;
use llama_parity::pipeline::candidate::manifest_beside;
use llama_parity::{Error, Result};

use crate::args::{ImportArgs, ImportTool};

/// The site map a `--msprobe-map` value names: `hf`, `mindformers`, or a map file.
pub fn site_map(arg: &str) -> Result<SiteMap> {
    match arg {
        "hf" => Ok(SiteMap::hf()),
        "mindformers" => Ok(SiteMap::mindformers()),
        p => {
            let path = Path::new(p);
            if !path.is_file() {
                return Err(Error::Usage {
                    flag: "--msprobe-map".into(),
                    what: format!("{p:?} is neither hf, mindformers nor a map file"),
                });
            }
            SiteMap::load(path)
        }
    }
}

/// The manifest giving model and scenario: `explicit`, else `manifest.json` in the dump
/// root.
fn model_manifest(root: &Path, explicit: Option<&PathBuf>) -> Result<Manifest> {
    if let Some(p) = explicit {
        return Manifest::load(p);
    }
    manifest_beside(root)?.ok_or_else(|| Error::Usage {
        flag: "--manifest".into(),
        what: format!(
            "{} has no manifest.json; give the golden's manifest.json for the model and scenario",
            root.display()
        ),
    })
}

pub fn cmd_import(a: ImportArgs) -> Result<ExitCode> {
    match a.tool {
        ImportTool::Msprobe => {}
    }
    guard::check_outputs(
        &[a.dump.as_path()],
        &[Output { label: "--out", dir: &a.out, files: guard::DUMP_FILES }],
    )?;
    let map = site_map(a.msprobe_map.as_deref().unwrap_or("hf"))?;
    let like = model_manifest(&a.dump, a.manifest.as_ref())?;
    let ms = MsprobeDump::open(&a.dump, &map)?;
    let dump = ms.to_dump(&map, &like)?;
    dump.write(&a.out)?;
    let n: usize = dump.manifest.steps.iter().map(|&s| dump.sites(s).len()).sum();
    println!(
        "imported {} tensors over {} steps from {} into {}",
        n,
        dump.manifest.steps.len(),
        a.dump.display(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
