//! The command line, as clap structs and nothing else: every command's
//! behaviour lives in its `*_cmd` module, which receives these values.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::values::{parse_ipv4, parse_size};

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
    /// Pull, build, register and manage root filesystem images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Import, download and manage guest kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Inspect and manage the host network: bridge, TAP pool, NAT, address leases.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Manage the `<name>.vm` DNS records bangerd serves.
    #[command(subcommand)]
    Dns(DnsCommand),
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
    /// Take a TAP from the pool or give it back, as a VM start and stop do.
    #[command(subcommand)]
    Tap(TapCommand),
}

#[derive(Subcommand, Debug)]
pub enum TapCommand {
    /// Take a TAP for OWNER (from the warm pool, or created on demand).
    Acquire(OwnerJsonArgs),
    /// Give a TAP back (it returns to the pool or is deleted).
    Release(TapArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TapArgs {
    /// The TAP's name, as `acquire` or `banger network status` shows it.
    #[arg(value_name = "TAP", value_parser = non_empty)]
    pub tap: String,
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

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// List the local images.
    List(JsonFlag),
    /// Show everything about one image.
    Show(NameJsonArgs),
    /// Pull an OCI image from a registry and turn it into an ext4 rootfs.
    Pull(ImagePullArgs),
    /// Adopt an existing ext4 rootfs as an image (banger does not own the file).
    Register(ImageRegisterArgs),
    /// Copy a registered image's files into banger's managed storage.
    Promote(NameJsonArgs),
    /// Delete an image (refused while a VM uses it).
    Delete(NameArgs),
    /// Remove cached layers no image uses, and finished kernel downloads.
    Prune(JsonFlag),
    /// Build a Debian image from the Debian archive with mmdebstrap.
    Build(ImageBuildArgs),
    /// List the images banger knows how to get by name.
    Catalog(JsonFlag),
}

#[derive(Subcommand, Debug)]
pub enum KernelCommand {
    /// List the local kernels.
    List(JsonFlag),
    /// Show everything about one kernel.
    Show(NameJsonArgs),
    /// Copy a kernel (and optionally its initrd and modules) into banger's storage.
    Import(KernelImportArgs),
    /// Download a kernel from the catalog, check its sha256 and register it.
    Pull(NameJsonArgs),
    /// Delete a kernel (refused while an image uses it).
    Delete(NameArgs),
    /// List the kernels `kernel pull` can download.
    Catalog(JsonFlag),
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create and boot a VM (progress until it is up; --detach returns at once).
    Create(VmCreateCmd),
    /// Create a VM, wait until it is up and open a shell in it (or run CMD).
    Run(VmRunArgs),
    /// Boot a stopped VM.
    Start(VmNameJson),
    /// Power a VM off (--force kills it at once).
    Stop(VmStopArgs),
    /// Stop and start a VM.
    Restart(VmNameJson),
    /// Delete a VM: its disks, address, TAP and DNS record.
    #[command(alias = "rm")]
    Delete(VmStopArgs),
    /// List the VMs.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Show one VM.
    Show(VmNameJson),
    /// Follow the operation a VM is going through (e.g. a detached create).
    Watch(VmNameJson),
    /// Print a VM's serial console log.
    Logs(VmLogsArgs),
    /// Open an SSH session to a VM (extra arguments go to ssh).
    Ssh(VmSshArgs),
    /// Run a command in a VM through the guest agent.
    Exec(VmExecArgs),
    /// List the ports listening inside a VM.
    Ports(VmNameJson),
    /// Ask the guest agent how the VM is doing.
    Health(VmNameJson),
}

#[derive(Args, Debug, Clone, Default)]
pub struct VmCreateArgs {
    /// The VM's name (a DNS label); default: a generated one.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Image name or catalog entry; default: the catalog default (debian-bookworm).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Size of the work disk (/root), e.g. 8G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub disk: Option<u64>,
    /// A static guest address (must be free and in the guest subnet).
    #[arg(long, value_name = "A.B.C.D", value_parser = parse_ipv4)]
    pub ip: Option<Ipv4Addr>,
    /// auto, qemu or firecracker.
    #[arg(long, value_name = "VMM", value_parser = ["auto", "qemu", "firecracker"])]
    pub vmm: Option<String>,
    /// What happens when the VMM dies: no, on-failure (default) or always.
    #[arg(long, value_name = "POLICY", value_parser = ["no", "on-failure", "always"])]
    pub restart: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct VmCreateCmd {
    #[command(flatten)]
    pub create: VmCreateArgs,
    /// Return once the VM is reserved; follow the boot with `vm watch`.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Args, Debug, Clone)]
pub struct VmRunArgs {
    #[command(flatten)]
    pub create: VmCreateArgs,
    /// Delete the VM when the shell or command exits.
    #[arg(long)]
    pub rm: bool,
    /// Command to run instead of a shell; its exit code is banger's.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct VmNameJson {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct VmStopArgs {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Kill the VMM at once instead of a clean power-off.
    #[arg(long, short)]
    pub force: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct VmLogsArgs {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Keep printing new output.
    #[arg(long, short)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, short = 'n', value_name = "N")]
    pub lines: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct VmSshArgs {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Arguments for ssh (after --), e.g. a command.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct VmExecArgs {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Run on a pseudo-terminal (default: when stdin is a terminal).
    #[arg(long, short)]
    pub tty: bool,
    /// Never allocate a pseudo-terminal.
    #[arg(long, short = 'T', conflicts_with = "tty")]
    pub no_tty: bool,
    /// The command (after --).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Show the bridge, the TAP pool, NAT, IP forwarding, leases and DNS.
    Status(JsonFlag),
    /// Remove the bridge, the TAPs and the nft table (refused while TAPs are in use).
    Down,
    /// Reserve, release and list guest addresses.
    #[command(subcommand)]
    Lease(LeaseCommand),
}

#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Reserve a guest address for OWNER (the next free one, or --ip).
    Add(LeaseAddArgs),
    /// Release OWNER's address.
    Rm(OwnerArgs),
    /// List the reserved addresses.
    List(JsonFlag),
}

#[derive(Args, Debug, Clone)]
pub struct LeaseAddArgs {
    /// Who holds the address (a VM name, or any label).
    #[arg(value_name = "OWNER", value_parser = non_empty)]
    pub owner: String,
    /// This address instead of the next free one (it must be in the guest subnet).
    #[arg(long, value_name = "A.B.C.D", value_parser = parse_ipv4)]
    pub ip: Option<Ipv4Addr>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `OWNER` alone.
#[derive(Args, Debug, Clone)]
pub struct OwnerArgs {
    #[arg(value_name = "OWNER", value_parser = non_empty)]
    pub owner: String,
}

/// `OWNER [--json]`.
#[derive(Args, Debug, Clone)]
pub struct OwnerJsonArgs {
    #[arg(value_name = "OWNER", value_parser = non_empty)]
    pub owner: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DnsCommand {
    /// Add or replace the record NAME.vm → IP.
    Add(DnsAddArgs),
    /// Remove the record NAME.vm.
    Rm(DnsNameArgs),
    /// List the records bangerd serves.
    List(JsonFlag),
    /// Point the host's resolver at bangerd for `.vm` names (or say how to).
    Setup(JsonFlag),
}

#[derive(Args, Debug, Clone)]
pub struct DnsAddArgs {
    /// The name, one label (`web` or `web.vm`).
    #[arg(value_name = "NAME", value_parser = dns_name)]
    pub name: String,
    /// The IPv4 address it resolves to.
    #[arg(value_name = "IP", value_parser = parse_ipv4)]
    pub ip: Ipv4Addr,
}

#[derive(Args, Debug, Clone)]
pub struct DnsNameArgs {
    /// The name (`web` or `web.vm`).
    #[arg(value_name = "NAME", value_parser = dns_name)]
    pub name: String,
}

/// `NAME` alone.
#[derive(Args, Debug, Clone)]
pub struct NameArgs {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
}

/// `NAME [--json]`.
#[derive(Args, Debug, Clone)]
pub struct NameJsonArgs {
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ImagePullArgs {
    /// OCI reference, e.g. `debian:bookworm` or `ghcr.io/org/app@sha256:...`.
    #[arg(value_name = "REF", value_parser = non_empty)]
    pub reference: String,
    /// Name of the image (default: derived from the reference).
    #[arg(long, value_name = "NAME", value_parser = non_empty)]
    pub name: Option<String>,
    /// Size of the rootfs, e.g. 2G or 1.5G (default: 1.25 × the tree, at least 1 GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Platform to pull, `os/arch[/variant]` (default: linux/amd64).
    #[arg(long, value_name = "PLATFORM", value_parser = non_empty)]
    pub platform: Option<String>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    /// Kernel to pair with the image (default: the configured default kernel).
    #[arg(long, value_name = "KERNEL", value_parser = non_empty)]
    pub kernel: Option<String>,
    /// Print progress and the result as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("kernel_source").required(true).args(["kernel_ref", "kernel"])))]
pub struct ImageRegisterArgs {
    /// Name of the image.
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// The ext4 filesystem image to adopt (stays where it is).
    #[arg(long, value_name = "PATH")]
    pub rootfs: PathBuf,
    /// A registered kernel (pulled from the kernel catalog if it is not here).
    #[arg(
        long = "kernel-ref",
        value_name = "NAME",
        value_parser = non_empty,
        conflicts_with_all = ["kernel", "initrd", "modules"]
    )]
    pub kernel_ref: Option<String>,
    /// A kernel image file (bzImage or ELF), imported as a kernel named after the image.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The initrd that goes with --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The modules directory (`/lib/modules/VERSION`) that goes with --kernel.
    #[arg(long, value_name = "DIR", requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// Print progress and the result as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ImageBuildArgs {
    /// Name of the image; a catalog entry of that name supplies the defaults.
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// Debian suite (default: the catalog entry's, else bookworm).
    #[arg(long, value_name = "SUITE", value_parser = non_empty)]
    pub suite: Option<String>,
    /// Extra packages, comma-separated or repeated: --packages git,tmux.
    #[arg(long, value_name = "PKG,...", value_delimiter = ',', value_parser = non_empty)]
    pub packages: Vec<String>,
    /// Size of the rootfs, e.g. 4G (default: 1.25 × the tree, at least 1 GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Debian mirror (default: http://deb.debian.org/debian).
    #[arg(long, value_name = "URL", value_parser = non_empty)]
    pub mirror: Option<String>,
    /// Print progress and the result as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct KernelImportArgs {
    /// Name of the kernel.
    #[arg(value_name = "NAME", value_parser = non_empty)]
    pub name: String,
    /// The kernel image file (bzImage, e.g. /boot/vmlinuz-*, or an ELF vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Its initrd.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Its modules directory (`/lib/modules/VERSION`).
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// Print progress and the result as JSON lines.
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

/// A DNS name relative to the `vm` zone: `web.vm`, `web.vm.` and `web` all
/// mean `web`. The daemon checks the rest (one label, allowed characters).
fn dns_name(s: &str) -> Result<String, String> {
    let name = s.trim().trim_end_matches('.');
    let lower = name.to_ascii_lowercase();
    let name = match lower.strip_suffix(".vm") {
        Some(stem) => &name[..stem.len()],
        None => name,
    };
    non_empty(name)
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
            &["banger", "image", "pull", "debian", "--size", "12Q"],
            &["banger", "image", "pull", "debian", "--size", "0"],
            &["banger", "image", "build", "x", "--size", "-1G"],
            &["banger", "image", "show"],
            &["banger", "kernel", "import", "k1"],
            &["banger", "kernel", "delete", ""],
            &[
                "banger", "network", "lease", "add", "web", "--ip", "172.30.0",
            ],
            &[
                "banger",
                "network",
                "lease",
                "add",
                "web",
                "--ip",
                "172.30.0.300",
            ],
            &[
                "banger",
                "network",
                "lease",
                "add",
                "web",
                "--ip",
                "172.30.0.5/24",
            ],
            &["banger", "network", "lease", "add", ""],
            &["banger", "network", "lease", "add"],
            &["banger", "network", "lease", "rm"],
            &["banger", "network", "lease", "list", "extra"],
            &["banger", "network", "down", "--json"],
            &["banger", "network"],
            &["banger", "dns", "add", "web", "not-an-ip"],
            &["banger", "dns", "add", "web", "::1"],
            &["banger", "dns", "add", "web"],
            &["banger", "dns", "add", ".vm", "10.0.0.1"],
            &["banger", "dns", "rm", ""],
            &["banger", "debug", "tap", "acquire"],
            &["banger", "debug", "tap", "acquire", " "],
            &["banger", "debug", "tap", "release"],
        ] {
            let err = Cli::try_parse_from(argv).expect_err("must be refused");
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }

    fn register(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["banger", "image", "register", "img", "--rootfs", "img.ext4"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
    }

    #[test]
    fn register_takes_one_kind_of_kernel() {
        for ok in [
            &["--kernel-ref", "k1"][..],
            &["--kernel", "vmlinuz"],
            &["--kernel", "vmlinuz", "--initrd", "i", "--modules", "m"],
        ] {
            register(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for (bad, kind) in [
            (&[][..], clap::error::ErrorKind::MissingRequiredArgument),
            (
                &["--kernel-ref", "k1", "--kernel", "v"],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["--kernel-ref", "k1", "--initrd", "i"],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["--kernel-ref", "k1", "--modules", "m"],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["--initrd", "i"],
                clap::error::ErrorKind::MissingRequiredArgument,
            ),
            (
                &["--kernel", "v", "--kernel-ref", ""],
                clap::error::ErrorKind::ValueValidation,
            ),
        ] {
            let err = register(bad).expect_err("must be refused");
            assert_eq!((err.kind(), err.exit_code()), (kind, 2), "{bad:?}: {err}");
        }
        let err = Cli::try_parse_from(["banger", "image", "register", "img", "--kernel-ref", "k"])
            .expect_err("no rootfs");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn image_pull_and_build_values() {
        let cli = Cli::try_parse_from([
            "banger",
            "image",
            "pull",
            "debian:bookworm",
            "--size",
            "1.5G",
            "--name",
            "deb",
            "--insecure",
        ])
        .expect("parses");
        match cli.command {
            Command::Image(ImageCommand::Pull(p)) => {
                assert_eq!(p.size, Some(3 << 29));
                assert_eq!(p.name.as_deref(), Some("deb"));
                assert!(p.insecure && !p.json);
                assert_eq!((p.platform, p.kernel), (None, None));
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "banger",
            "image",
            "build",
            "dev",
            "--packages",
            "git,tmux",
            "--packages",
            "vim",
        ])
        .expect("parses");
        match cli.command {
            Command::Image(ImageCommand::Build(b)) => {
                assert_eq!(b.packages, ["git", "tmux", "vim"]);
                assert_eq!(b.size, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = Cli::try_parse_from(["banger", "image", "pull", "x", "--size", "2X"])
            .expect_err("bad size");
        assert!(err.to_string().contains("unknown unit `X`"), "{err}");
    }

    #[test]
    fn network_and_dns_values() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).expect("parses").command;
        match parse(&[
            "banger",
            "network",
            "lease",
            "add",
            "web",
            "--ip",
            "172.30.0.10",
        ]) {
            Command::Network(NetworkCommand::Lease(LeaseCommand::Add(a))) => {
                assert_eq!(a.owner, "web");
                assert_eq!(a.ip, Some(Ipv4Addr::new(172, 30, 0, 10)));
                assert!(!a.json);
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["banger", "network", "lease", "add", "db", "--json"]) {
            Command::Network(NetworkCommand::Lease(LeaseCommand::Add(a))) => {
                assert_eq!((a.owner.as_str(), a.ip, a.json), ("db", None, true));
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["banger", "network", "status", "--json"]) {
            Command::Network(NetworkCommand::Status(f)) => assert!(f.json),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse(&["banger", "network", "down"]),
            Command::Network(NetworkCommand::Down)
        ));
        match parse(&["banger", "network", "lease", "rm", "web"]) {
            Command::Network(NetworkCommand::Lease(LeaseCommand::Rm(a))) => {
                assert_eq!(a.owner, "web")
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["banger", "dns", "add", "Web.VM.", "10.0.0.53"]) {
            Command::Dns(DnsCommand::Add(a)) => {
                assert_eq!(
                    (a.name.as_str(), a.ip),
                    ("Web", Ipv4Addr::new(10, 0, 0, 53))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        for (given, name) in [
            ("web", "web"),
            ("web.vm", "web"),
            ("a.b", "a.b"),
            ("vm", "vm"),
        ] {
            match parse(&["banger", "dns", "rm", given]) {
                Command::Dns(DnsCommand::Rm(a)) => assert_eq!(a.name, name, "{given}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(matches!(
            parse(&["banger", "dns", "setup"]),
            Command::Dns(DnsCommand::Setup(JsonFlag { json: false }))
        ));
        assert!(matches!(
            parse(&["banger", "dns", "list", "--json"]),
            Command::Dns(DnsCommand::List(JsonFlag { json: true }))
        ));
        match parse(&["banger", "debug", "tap", "acquire", "bench-1", "--json"]) {
            Command::Debug(DebugCommand::Tap(TapCommand::Acquire(a))) => {
                assert_eq!((a.owner.as_str(), a.json), ("bench-1", true));
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["banger", "debug", "tap", "release", "bgtap3"]) {
            Command::Debug(DebugCommand::Tap(TapCommand::Release(a))) => {
                assert_eq!(a.tap, "bgtap3")
            }
            other => panic!("unexpected {other:?}"),
        }
        let err =
            Cli::try_parse_from(["banger", "dns", "add", "web", "10.0.0"]).expect_err("bad ip");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("A.B.C.D"), "{err}");
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
