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
    /// VM create stage by stage (1 and N parallel creates, busybox) and
    /// `vm run` to SSH-ready against a bare QEMU (Debian golden image).
    Vm(VmArgs),
}

impl Command {
    pub fn common(&self) -> &Common {
        match self {
            Command::Cli(a) => &a.common,
            Command::Pull(a) => &a.common,
            Command::Net(a) => &a.common,
            Command::Vm(a) => &a.common,
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
    /// How long each DNS run lasts (timed part), in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub dns_secs: u32,
    /// Untimed seconds of load before each load-generator run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=60))]
    pub dns_warmup_secs: u32,
    /// The load generator's paced rate (the target run), queries/s in all.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    pub dns_rate: u32,
    /// The paced load generator wakes this often (µs) to send what is due.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=10_000))]
    pub dns_tick_us: u32,
    /// Queries the load generator keeps outstanding in its unpaced run.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub dns_window: u32,
    /// Skip the dnsperf comparison runs.
    #[arg(long)]
    pub no_dnsperf: bool,
    /// DNS records the daemon holds (the queries ask for each in turn).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub dns_records: u32,
    /// Source addresses (127.0.0.2, ...) of the load generator and of the
    /// multi-client dnsperf runs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub dns_sources: u32,
    #[command(flatten)]
    pub common: Common,
}

/// QEMU acceleration of the benchmark's daemons (`[vm] accel`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// The daemon's probe boot decides (paid once, by an untimed create).
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Timed rounds of the create benchmark; each round is 1 create, then
    /// `--parallel` creates at once (the VMs are deleted in between).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Creates sent at once in the parallel part of each round (the warm
    /// TAP pool is made at least this large).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub parallel: u32,
    /// Timed pairs of the SSH-ready comparison: one `vm run` of the Debian
    /// golden image, one bare QEMU boot of the same kernel and rootfs
    /// (each a full boot to sshd: 15-60 s under TCG).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub image_runs: u32,
    /// Only the create benchmark: no golden image build, no SSH-ready comparison.
    #[arg(long)]
    pub skip_ssh: bool,
    /// Print each create's control-plane events (stage, when it ended by
    /// the daemon's clock, its own time) as it finishes.
    #[arg(long)]
    pub timeline: bool,
    /// `[vm] accel` of the daemons. `auto` is resolved by the first
    /// daemon's probe boot, and the second daemon is given the result.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
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
    fn vm_has_its_own_defaults() {
        match parse(&["vm"]) {
            Command::Vm(a) => {
                assert_eq!((a.runs, a.parallel, a.image_runs), (3, 8, 3));
                assert!(!a.skip_ssh && !a.common.fail_on_miss);
                assert_eq!(a.accel, Accel::Auto);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "vm",
            "--runs",
            "5",
            "--parallel",
            "4",
            "--skip-ssh",
            "--accel",
            "tcg",
            "--fail-on-miss",
        ]) {
            Command::Vm(a) => {
                assert_eq!((a.runs, a.parallel), (5, 4));
                assert!(a.skip_ssh && a.common.fail_on_miss);
                assert_eq!(a.accel.as_str(), "tcg");
            }
            other => panic!("{other:?}"),
        }
        assert!(Args::try_parse_from(["banger-bench", "vm", "--parallel", "1"]).is_err());
        assert!(Args::try_parse_from(["banger-bench", "vm", "--accel", "hvf"]).is_err());
    }

    #[test]
    fn top_level_flags_do_not_mix_with_a_subcommand() {
        let err = Args::try_parse_from(["banger-bench", "--runs", "5", "pull"]);
        assert!(err.is_err());
        assert!(Args::try_parse_from(["banger-bench", "pull", "--warmup", "1"]).is_err());
    }
}
