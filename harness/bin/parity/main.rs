//! `parity`: the command line over the `llama_parity` library.
//!
//! Exit status: 0 every checked site within tolerance, 1 divergence, 2 bad input or
//! usage (the message names the file, tensor or flag).

mod args;
mod commands;
mod import;
mod suite;

use std::error::Error as _;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("parity: error: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(&format!(": {text}"));
                }
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}
