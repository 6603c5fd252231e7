//! The command line, as clap structs and nothing else: every command's
//! behaviour lives in its `*_cmd` module, which receives these values.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run and inspect banger microVMs through the bangerd daemon.
///
/// Most commands start bangerd on demand; `banger daemon ...` manages it
/// explicitly. Paths follow XDG_CONFIG_HOME, XDG_STATE_HOME and
/// XDG_RUNTIME_DIR.
#[derive(Parser, Debug)]
#[command(name = "banger", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start, stop and inspect the bangerd daemon.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Print the client's and the daemon's versions.
    Version(JsonFlag),
    /// Inspect banger's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Look inside the daemon (actors, events, synthetic operations).
    #[command(subcommand)]
    Debug(DebugCommand),
    /// Check that this host can run banger and say how to fix what is missing.
    Doctor(JsonFlag),
    /// Print a shell completion script to stdout.
    Completion(CompletionArgs),
}

/// `--json` alone.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DaemonCommand {
    /// Start bangerd in the background (nothing to do if it is running).
    Start,
    /// Ask bangerd to shut down gracefully and wait until it has exited.
    Stop,
    /// Show whether bangerd is running and what it is doing (never starts it).
    Status(JsonFlag),
    /// Print bangerd's log (read from the log file; works without the daemon).
    Logs(LogsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    /// Keep printing lines as they are written, until Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print first.
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 50)]
    pub lines: usize,
    /// Print the raw JSON lines instead of formatting them.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective configuration (the file merged over the defaults).
    Show(JsonFlag),
}

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// List the daemon's actors and their supervision state.
    Actors(JsonFlag),
    /// Kill one actor so its supervisor restarts it (chaos testing).
    KillActor(KillActorArgs),
    /// Stream the daemon's lifecycle events until Ctrl-C.
    Events(EventsArgs),
    /// Run a synthetic long operation that reports progress (Ctrl-C cancels it).
    Progress(ProgressArgs),
}

#[derive(Args, Debug, Clone)]
pub struct KillActorArgs {
    /// The actor's name, as `banger debug actors` shows it.
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct EventsArgs {
    /// Replay the retained events after this sequence number first.
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ProgressArgs {
    /// How many progress steps to report.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub steps: u32,
    /// Time between two steps, in milliseconds.
    #[arg(
        long = "interval-ms",
        value_name = "MS",
        default_value_t = 200,
        value_parser = clap::value_parser!(u64).range(0..=3_600_000)
    )]
    pub interval_ms: u64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct CompletionArgs {
    /// The shell to generate the script for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".to_string())
    } else {
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_exit_with_2() {
        for argv in [
            &["banger", "nope"][..],
            &["banger", "debug", "kill-actor", ""],
            &["banger", "debug", "progress", "--steps", "0"],
            &["banger", "daemon", "logs", "-n", "x"],
            &["banger", "completion", "powershell"],
        ] {
            let err = Cli::try_parse_from(argv).expect_err("must be refused");
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["banger", "debug", "progress"]).expect("parses");
        match cli.command {
            Command::Debug(DebugCommand::Progress(p)) => {
                assert_eq!((p.steps, p.interval_ms, p.json), (5, 200, false));
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["banger", "daemon", "logs", "-f"]).expect("parses");
        match cli.command {
            Command::Daemon(DaemonCommand::Logs(l)) => assert_eq!((l.follow, l.lines), (true, 50)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
