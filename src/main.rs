//! `baton`: the supervisor and its CLI.
//!
//! This is the skeleton the supervisor issue fills in: today it answers
//! `--help` and `--version` so packaging and tests have a stable entry point.

use clap::Parser;

/// Restart Linux services without dropping a connection.
///
/// Baton holds your service's listening sockets, starts the new generation,
/// waits for its `READY=1`, and only then retires the old one.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("baton: no command yet; see `baton --help`");
    std::process::exit(2);
}
