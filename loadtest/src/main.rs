//! `pigeon-load`: the load-test harness (a skeleton until its own issue lands).

use clap::Parser;

/// Pigeon's load-test harness.
#[derive(Parser, Debug)]
#[command(version, about)]
enum Command {}

fn main() -> anyhow::Result<()> {
    match Command::parse() {}
}
