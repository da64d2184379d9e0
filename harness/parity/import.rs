//! `parity import msprobe DUMP --out DIR`, and `parity compare GOLDEN MSPROBE_DUMP`:
//! msprobe dumps read through the site map into a contract dump (tensor mode) or a
//! statistics-only comparison (statistics mode).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use llama_parity::compare::statistics::compare_statistics;
use llama_parity::dump::guard::{self, Output};
use llama_parity::dump::msprobe::{Mode, MsprobeDump, SiteMap};
use llama_parity::dump::{Dump, Manifest};
use llama_parity::pipeline::{self, Options};
use llama_parity::report::Report;
use llama_parity::{Error, Result};

use crate::args::{CompareArgs, ImportArgs, ImportTool};
use crate::output::{finish, progress};

/// The site map a `--msprobe-map` value names: `hf` (default), `mindformers`, or a file.
fn site_map(arg: Option<&str>) -> Result<SiteMap> {
    match arg {
        None | Some("hf") => Ok(SiteMap::hf()),
        Some("mindformers") => Ok(SiteMap::mindformers()),
        Some(p) => {
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
/// root, else `fallback` (the golden's).
fn model_manifest(
    root: &Path,
    explicit: Option<&PathBuf>,
    fallback: Option<&Manifest>,
) -> Result<Manifest> {
    if let Some(p) = explicit {
        return Manifest::load(p);
    }
    let beside = root.join("manifest.json");
    if beside.is_file() {
        return Manifest::load(&beside);
    }
    fallback.cloned().ok_or_else(|| Error::Usage {
        flag: "--manifest".into(),
        what: format!(
            "{} has no manifest.json; give the golden's manifest.json for the model and scenario",
            root.display()
        ),
    })
}

/// A golden given as an msprobe tensor dump of HF transformers' run: read with the
/// `hf` map, its model and scenario from the `manifest.json` beside its step folders.
pub fn open_msprobe_golden(root: &Path) -> Result<Dump> {
    let beside = root.join("manifest.json");
    if !beside.is_file() {
        return Err(Error::Format {
            path: root.to_path_buf(),
            what: "an msprobe dump given as the golden needs the run's manifest.json beside its step folders".into(),
        });
    }
    let like = Manifest::load(&beside)?;
    let map = SiteMap::hf();
    let ms = MsprobeDump::open(root, &map)?;
    if ms.mode() == Mode::Statistics {
        return Err(Error::Format {
            path: root.to_path_buf(),
            what: "a statistics-mode msprobe dump cannot be the golden: it holds no tensors".into(),
        });
    }
    ms.to_dump(&map, &like)
}

pub fn cmd_import(a: ImportArgs) -> Result<ExitCode> {
    match a.tool {
        ImportTool::Msprobe => {}
    }
    guard::check_outputs(
        &[a.dump.as_path()],
        &[Output { label: "--out", dir: &a.out, files: guard::DUMP_FILES }],
    )?;
    let map = site_map(a.msprobe_map.as_deref())?;
    let like = model_manifest(&a.dump, a.manifest.as_ref(), None)?;
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

/// `compare` with an msprobe dump as the candidate: a tensor-mode dump goes through
/// the pipeline like any dump; a statistics-mode dump is judged on its statistics.
pub fn compare_msprobe(a: &CompareArgs, golden: &Dump, opts: &Options) -> Result<ExitCode> {
    if a.map.is_some() {
        return Err(Error::Usage {
            flag: "--map".into(),
            what: "an msprobe candidate is mapped with --msprobe-map, not a key map".into(),
        });
    }
    let map = site_map(a.msprobe_map.as_deref())?;
    let like = model_manifest(&a.candidate, None, Some(&golden.manifest))?;
    let ms = MsprobeDump::open(&a.candidate, &map)?;
    match ms.mode() {
        Mode::Tensor => {
            let candidate = ms.to_dump(&map, &like)?;
            let report = pipeline::check(golden, &candidate, None, opts)?;
            finish(report, &a.common)
        }
        Mode::Statistics => {
            let stats = ms.statistics(&map, &like)?;
            progress(
                "statistics-mode msprobe dump: each site is judged on Max/Min/Mean/Norm alone",
            );
            let manifest = ms.statistics_manifest(&map, &like);
            let label = format!("msprobe statistics dump {}", a.candidate.display());
            let cmp = compare_statistics(golden, &manifest, &label, &stats, opts.policy)?;
            let mut report = Report::new(&cmp, Vec::new());
            if cmp.first_divergence().is_some() {
                report.diagnosis_note = Some(
                    "not made: a statistics-only dump has no tensors to test fault hypotheses against"
                        .into(),
                );
            }
            finish(report, &a.common)
        }
    }
}
