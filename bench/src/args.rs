//! Command-line arguments. `banger-bench` without a subcommand runs the
//! `cli` benchmark, so `banger-bench --runs 50` keeps working.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "banger-bench",
    about = "Measures banger against its performance targets",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The `cli` benchmark's flags, for when no subcommand is given.
    #[command(flatten)]
    cli: CliArgs,
}

impl Args {
    /// The benchmark to run: `cli` unless another was named.
    pub fn command(self) -> Command {
        self.command.unwrap_or(Command::Cli(self.cli))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// `banger version` wall time and the daemon's idle memory (the default).
    Cli(CliArgs),
    /// Image pull from a local registry against skopeo + umoci + mkfs.ext4.
    Pull(PullArgs),
    /// TAP hand-out latency (warm pool, cold) in network namespaces, and
    /// DNS throughput and latency with dnsperf.
    Net(NetArgs),
}

impl Command {
    pub fn common(&self) -> &Common {
        match self {
            Command::Cli(a) => &a.common,
            Command::Pull(a) => &a.common,
            Command::Net(a) => &a.common,
        }
    }
}

/// Flags every benchmark takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Directory holding `banger` and `bangerd` [default: this executable's directory].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub fail_on_miss: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CliArgs {
    /// Timed runs of each measurement.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Untimed runs before each measurement (page cache, socket paths).
    #[arg(long, default_value_t = 5)]
    pub warmup: u32,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PullArgs {
    /// Timed runs of each measurement (cold and warm, banger and peers).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// File data in the generated image, in MiB (the layers' tars are a
    /// little larger). The pull target is stated for 200 MB or more.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub image_mb: u64,
    /// Seed of the generated image; the same seed and size give the same image.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// Timed TapAcquire/TapRelease cycles per pool (warm and cold).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Untimed cycles before the timed ones.
    #[arg(long, default_value_t = 20)]
    pub warmup: u32,
    /// How long each dnsperf run lasts, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub dns_secs: u32,
    /// DNS records the daemon holds (the queries ask for each in turn).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub dns_records: u32,
    /// Source addresses (127.0.0.2, ...) of the multi-client dnsperf run.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub dns_sources: u32,
    #[command(flatten)]
    pub common: Common,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Args::try_parse_from(std::iter::once("banger-bench").chain(args.iter().copied()))
            .expect("valid arguments")
            .command()
    }

    #[test]
    fn no_subcommand_is_cli_with_its_flags() {
        match parse(&["--runs", "7", "--fail-on-miss"]) {
            Command::Cli(a) => {
                assert_eq!((a.runs, a.warmup), (7, 5));
                assert!(a.common.fail_on_miss);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&[]), Command::Cli(a) if a.runs == 200));
        assert!(matches!(parse(&["cli", "--runs", "3"]), Command::Cli(a) if a.runs == 3));
    }

    #[test]
    fn pull_has_its_own_defaults() {
        match parse(&["pull"]) {
            Command::Pull(a) => {
                assert_eq!((a.runs, a.image_mb, a.seed), (3, 256, 1));
                assert!(!a.common.fail_on_miss && a.common.bin_dir.is_none());
            }
            other => panic!("{other:?}"),
        }
        match parse(&["pull", "--image-mb", "64", "--runs", "1", "--bin-dir", "/x"]) {
            Command::Pull(a) => {
                assert_eq!((a.runs, a.image_mb), (1, 64));
                assert_eq!(
                    a.common.bin_dir.as_deref(),
                    Some(std::path::Path::new("/x"))
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn top_level_flags_do_not_mix_with_a_subcommand() {
        let err = Args::try_parse_from(["banger-bench", "--runs", "5", "pull"]);
        assert!(err.is_err());
        assert!(Args::try_parse_from(["banger-bench", "pull", "--warmup", "1"]).is_err());
    }
}
