//! `parity`: the command line over the `llama_parity` library, one file a command.
//! `args` holds the clap types; each command turns them into library options, runs the
//! library's pipeline and prints; `output` holds what they share.
//!
//! Exit status: 0 every checked site within tolerance, 1 divergence, 2 bad input or
//! usage (the message names the file, tensor or flag).

mod args;
mod check_golden;
mod check_weights;
mod compare;
mod import;
mod output;
mod progress;
mod run;
mod suite;

use std::error::Error as _;
use std::process::ExitCode;

use clap::Parser;
use llama_parity::contract::error::Feature;
use llama_parity::{Error, Result};

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    llama_parity::dump::mapped::exit_on_truncation();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("parity: error: {}", describe(&e));
            let mut src = e.source();
            while let Some(s) = src {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(&format!(": {text}"));
                }
                src = s.source();
            }
            // One line, whatever the names in it hold (a tensor key with a line break).
            eprintln!("{}", llama_parity::contract::error::escape_controls(&msg));
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Compare(a) => compare::cmd_compare(a),
        Command::Run(a) => run::cmd_run(a),
        Command::Suite(a) => suite::cmd_suite(a),
        Command::CheckWeights(a) => check_weights::cmd_check_weights(a),
        Command::CheckGolden(a) => check_golden::cmd_check_golden(a),
        Command::Import(a) => import::cmd_import(a),
    }
}

/// The library's error in the command line's terms: what an implementation cannot do
/// is said of the flag that asked for it.
fn describe(e: &Error) -> String {
    match e {
        Error::Unsupported { feature, what } => {
            let flag = match feature {
                Feature::TeacherForcing => "--teacher-force",
                Feature::Implementation => "--impl",
                Feature::FaultScope => "--fault",
                Feature::KeyMap => "--map",
                Feature::SiteMap => "--msprobe-map",
                Feature::SummaryOnly => "--summary-only",
                Feature::NoiseFloor => "--floor-cache",
            };
            format!("{flag}: {what}")
        }
        other => other.to_string(),
    }
}
