//! `hpmapper`: the command-line interface to a pool of thin-provisioned block devices.
//!
//! This file owns the process: parsing, logging, and turning a failure into exactly one
//! line on stderr and exit status 1 (usage errors exit 2, from clap). The commands live in
//! `cli`, one module per noun; they never print errors or exit themselves.

mod cli;
mod control;
mod daemon;
mod logging;
mod pieces;
mod size;
mod sparse;

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logging::init(args.log_level);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain: "what failed: why: deeper why".
            let line = format!("{e:#}").replace('\n', " ");
            // Nothing more can be done if stderr itself is gone.
            let _ = writeln!(std::io::stderr(), "hpmapper: {line}");
            ExitCode::FAILURE
        }
    }
}
