//! Makes the report screenshots under `reports/examples/` again: the two reports the
//! README shows, written as `parity` writes them and photographed by headless Chromium.
//!
//! - `pass.png`: `parity run golden/gqa_pad_f32 --impl ascend --dtype bfloat16
//!   --teacher-force --report ...`, a correct port's rounding, with local errors;
//! - `fail.png`: `parity compare golden/gqa_pad_f32
//!   fixtures/candidates/gqa_pad_f32__rope_pos_reset --report ...`, a divergence and
//!   its diagnosis.
//!
//! Run: `cargo run --release --example report_examples [-- OUT_DIR]` from anywhere. The
//! report sets go to `target/report-examples/{pass,fail}/` and the screenshots to
//! `OUT_DIR` (default `reports/examples/`; relative to the repository root). Needs
//! Chromium at `/usr/bin/chromium` or `$PARITY_CHROMIUM` (`.ci/install-chromium`).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use llama_parity::compare::tolerance::Policy;
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunOptions};
use llama_parity::pipeline::{self, Options};
use llama_parity::report::Report;

const GOLDEN: &str = "golden/gqa_pad_f32";
const CANDIDATE: &str = "fixtures/candidates/gqa_pad_f32__rope_pos_reset";
/// The window the screenshots are taken at (as `reports/README.md` has it).
const WINDOW: (u32, u32) = (1200, 1600);

fn main() -> ExitCode {
    match make() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("report_examples: {e}");
            ExitCode::from(2)
        }
    }
}

fn make() -> Result<(), Box<dyn Error>> {
    // Paths in the reports read as the CLI's do when run from the repository root.
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let shots = std::env::args_os().nth(1).map_or_else(|| "reports/examples".into(), PathBuf::from);
    let browser = chromium()?;
    let sets = Path::new("target/report-examples");
    let policy = Policy::default();
    let opts = Options::new(&policy);
    let golden = Dump::open(Path::new(GOLDEN))?;

    // As `parity run GOLDEN --impl ascend --dtype bfloat16 --teacher-force` does it.
    let run = RunOptions::new(Implementation::Ascend)
        .with_precision(Precision::Bf16)
        .with_teacher_force(true);
    let mut out = model::run(&golden, &run)?;
    out.dump.set_name(format!("{} run", run.implementation.name()));
    let pass = pipeline::check(&golden, &out.dump, out.teacher_forced.as_ref(), &opts)?;

    // As `parity compare GOLDEN CANDIDATE` does it.
    let candidate = Dump::open(Path::new(CANDIDATE))?;
    let fail = pipeline::check(&golden, &candidate, None, &opts)?;

    std::fs::create_dir_all(&shots)?;
    for (name, report) in [("pass", &pass), ("fail", &fail)] {
        let png = shots.join(format!("{name}.png"));
        photograph(&browser, report, &sets.join(name), &png)?;
        println!("{}", png.display());
    }
    Ok(())
}

/// The browser: `$PARITY_CHROMIUM`, else `/usr/bin/chromium`.
fn chromium() -> Result<PathBuf, Box<dyn Error>> {
    let path = std::env::var_os("PARITY_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !path.is_file() {
        return Err(format!(
            "no Chromium at {}: install it (`apt-get install -y chromium`, or \
             .ci/install-chromium) or point PARITY_CHROMIUM at one",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// Writes `report` into `dir` and takes a screenshot of its page into `png`, with a
/// throwaway profile and the browser's network services off.
fn photograph(
    browser: &Path,
    report: &Report,
    dir: &Path,
    png: &Path,
) -> Result<(), Box<dyn Error>> {
    report.write(dir)?;
    let page = std::path::absolute(dir.join("report.html"))?;
    let png = std::path::absolute(png)?;
    let profile = tempfile::tempdir()?;
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() || !png.is_file() {
        return Err(format!(
            "{} gave no screenshot of {} ({}): {}",
            browser.display(),
            page.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}
