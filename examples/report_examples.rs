//! Writes the passing and the failing report of the synthetic comparison used by the
//! report tests, and screenshots of both pages with headless Chromium:
//!
//! ```text
//! cargo run --example report_examples -- OUT_DIR [SCREENSHOT_DIR]
//! ```
//!
//! `OUT_DIR/pass` and `OUT_DIR/fail` receive the report files; with SCREENSHOT_DIR,
//! `pass.png` and `fail.png` (1200x1600) go there (`reports/examples/` in the repo;
//! each stays under 300 KB as Chromium writes it).

#[path = "../tests/support/chromium.rs"]
mod chromium;
#[path = "../tests/support/synthetic.rs"]
mod synthetic;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: report_examples OUT_DIR [SCREENSHOT_DIR]");
        return ExitCode::from(2);
    };
    for (name, report) in [("pass", synthetic::pass_report()), ("fail", synthetic::fail_report())] {
        let dir = out.join(name);
        if let Err(e) = report.write(&dir) {
            eprintln!("report_examples: {e}");
            return ExitCode::from(2);
        }
        println!("{}", dir.display());
        if let Some(shots) = args.get(1) {
            let Some(browser) = chromium::find("report_examples") else { continue };
            if let Err(e) = std::fs::create_dir_all(shots) {
                eprintln!("report_examples: {}: {e}", shots.display());
                return ExitCode::from(2);
            }
            let png = shots.join(format!("{name}.png"));
            chromium::screenshot(&browser, &dir.join("report.html"), &png, 1200, 1600);
            println!("{}", png.display());
        }
    }
    ExitCode::SUCCESS
}
