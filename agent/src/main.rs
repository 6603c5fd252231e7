//! `banger-agent`: picks init mode (PID 1) or service mode; everything else
//! lives in the library.

use banger_agent::cli::Cli;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::process::id() == 1 {
        // The kernel passes unknown boot words to init as arguments: never
        // let a parse error (or --help) end PID 1.
        let cli = Cli::try_parse().unwrap_or_else(|_| Cli::pid1_default());
        banger_agent::init::run(cli)
    }
    let cli = Cli::parse();
    banger_agent::log::init(&cli.log, false);
    if cli.mount_work_disk {
        return banger_agent::service::mount_work_disk();
    }
    banger_agent::service::run(cli)
}
