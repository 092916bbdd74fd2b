//! `pigeon-load`: Pigeon's load-test harness.
//!
//! This is the crate's skeleton: the scenarios (idle, unicast, broadcast, reconnect storm)
//! arrive with the load-test harness issue. Until then the binary only says so.

use std::process::ExitCode;

use clap::Parser;

/// Pigeon's load-test harness (scenarios not yet implemented).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {}

fn main() -> ExitCode {
    let Cli {} = Cli::parse();
    eprintln!("pigeon-load: no scenarios yet; see the load-test harness issue");
    ExitCode::from(2)
}
