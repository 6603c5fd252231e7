//! `banger`: the command-line client of bangerd. This file only parses the
//! command line, runs the chosen command on a single-threaded runtime and
//! turns its outcome into an exit status; each command group has a module.

mod args;
mod config_cmd;
mod connect;
mod daemon_cmd;
mod debug_cmd;
mod dns_cmd;
mod doctor_cmd;
mod error;
mod image_cmd;
mod kernel_cmd;
mod logs_cmd;
mod network_cmd;
mod output;
mod progress;
mod values;
mod version_cmd;
mod vm_cmd;

use std::process::ExitCode;

use clap::{CommandFactory, Parser as _};

use crate::args::{Cli, Command, CompletionShell};
use crate::error::{CliError, Exit};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are "errors" that go to stdout and succeed.
            let exit = if err.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
            if let Err(e) = err.print() {
                CliError::stdout(e).report();
            }
            return exit.into();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            CliError::with_source("cannot start the async runtime", &e).report();
            return Exit::Failed.into();
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(exit) => exit.into(),
        Err(err) => {
            err.report();
            err.exit().into()
        }
    }
}

async fn run(command: Command) -> Result<Exit, CliError> {
    match command {
        Command::Daemon(cmd) => daemon_cmd::run(cmd).await,
        Command::Version(flags) => version_cmd::run(flags).await,
        Command::Config(cmd) => config_cmd::run(cmd).await,
        Command::Debug(cmd) => debug_cmd::run(cmd).await,
        Command::Doctor(flags) => doctor_cmd::run(flags).await,
        Command::Image(cmd) => image_cmd::run(cmd).await,
        Command::Kernel(cmd) => kernel_cmd::run(cmd).await,
        Command::Network(cmd) => network_cmd::run(cmd).await,
        Command::Vm(cmd) => vm_cmd::run(cmd).await,
        Command::Dns(cmd) => dns_cmd::run(cmd).await,
        Command::Completion(args) => completion(args.shell),
    }
}

fn completion(shell: CompletionShell) -> Result<Exit, CliError> {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "banger", &mut script);
    use std::io::Write as _;
    std::io::stdout()
        .write_all(&script)
        .map_err(CliError::stdout)?;
    Ok(Exit::Ok)
}
