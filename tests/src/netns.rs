//! Network namespaces for tests of the daemon's host networking.
//!
//! `TestDaemon::builder().netns()` gives the daemon a namespace of its own
//! ([`NetNs`]): it runs under `ip netns exec`, so the bridge, the TAPs, the
//! `banger` nft table and the `ip_forward` sysctl it makes all live in that
//! namespace, never on the host. Its Unix socket is a file, so clients in the
//! host namespace reach it as usual. `Drop` of the `TestDaemon` kills the
//! daemon first, then `ip netns del`s the namespace, also when the test
//! panics.
//!
//! - [`NetNs`]: `ip netns add bgt-<created>-<random>` with `lo` up; `ip -n`,
//!   `ip netns exec`, [`NetNs::run_in`] (a closure on a thread `setns`-ed into
//!   the namespace) and [`NetNs::open_tap`] (attach to a TAP as a VMM does).
//!   Namespaces of killed test runs (`bgt-*` created over an hour ago) are
//!   swept the first time one is made.
//! - The `TestDaemon` side: [`TestDaemon::ns`], [`TestDaemon::netns`],
//!   [`TestDaemon::exec_in_ns`], [`TestDaemon::ip`].

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use crate::{TestDaemon, TestDaemonBuilder};

/// Where `ip netns add` puts the namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// Every namespace made here is called `bgt-<unix seconds>-<random>`.
pub const PREFIX: &str = "bgt-";

/// A namespace older than this whose name has [`PREFIX`] is left over from
/// a killed test run, and is deleted.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

/// A network namespace owned by one test; `ip netns del` on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a uniquely named namespace with its loopback up. Panics
    /// (with `ip`'s message) if that fails, e.g. when not run as root.
    pub fn create() -> NetNs {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let random: u32 = rand::thread_rng().gen();
        let name = format!("{PREFIX}{created}-{random:08x}");
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip_ok(["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file `setns(2)` opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec <ns> <program>`: a command to customise and run.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args[0] args[1..]` inside the namespace and returns its output
    /// (whatever the exit status).
    pub fn exec<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args.next().expect("a program to run");
        let mut cmd = self.command(program);
        cmd.args(args);
        output(&mut cmd)
    }

    /// `ip -n <ns> <args>`, whatever the exit status.
    pub fn ip<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        output(&mut cmd)
    }

    /// `ip -n <ns> <args>`, which must succeed; its stdout.
    pub fn ip_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run_ok(&mut cmd)
    }

    /// `ip -n <ns> -j link show`, parsed: one JSON object per link.
    pub fn links(&self) -> Vec<serde_json::Value> {
        let text = self.ip_ok(["-j", "link", "show"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j link: {e}: {text}"))
    }

    /// Runs `f` on a new thread that has `setns(2)`-ed into this namespace;
    /// panics in `f` propagate. Netlink sockets, `/dev/net/tun`,
    /// `/proc/sys/net` and child processes all follow the thread.
    pub fn run_in<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Makes `target` (e.g. a registry on the host's loopback) reachable
    /// from inside this namespace: a listener on the namespace's
    /// 127.0.0.1 whose connections are relayed to `target` from the host
    /// namespace. Returns the address to use inside. The relay threads end
    /// with the test process.
    pub fn forward_to_host(&self, target: std::net::SocketAddr) -> std::net::SocketAddr {
        let listener =
            self.run_in(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind in netns"));
        let addr = listener.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                let Ok(outbound) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let (mut a, mut b) = (
                    inbound.try_clone().expect("clone"),
                    outbound.try_clone().expect("clone"),
                );
                let (mut c, mut d) = (inbound, outbound);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut d, &mut c);
                    let _ = c.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        addr
    }

    /// Attaches to the existing TAP `tap` in this namespace the way a VMM
    /// does (`TUNSETIFF` on `/dev/net/tun` with `IFF_TAP | IFF_NO_PI`, no
    /// vnet header, so frames are plain Ethernet), non-blocking. The
    /// descriptor works from any thread once attached.
    pub fn open_tap(&self, tap: &str) -> io::Result<File> {
        let tap = tap.to_string();
        self.run_in(move || attach_tap(&tap))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not run ip netns del {}: {e}", self.name),
        }
    }
}

/// Deletes `bgt-<secs>-*` namespaces created more than [`STALE_AFTER`]
/// ago: a test run that was killed before its guards could drop.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(created) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|secs| secs.parse::<u64>().ok())
        else {
            continue;
        };
        if now.saturating_sub(created) > STALE_AFTER.as_secs() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, panicking with its stderr if it fails; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &PathBuf) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: `file` is an open namespace file; setns only affects this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` with the `ifr_flags` member of its union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn attach_tap(tap: &str) -> io::Result<File> {
    if tap.is_empty() || tap.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {tap:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..tap.len()].copy_from_slice(tap.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
    // is laid out as and outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl TestDaemonBuilder {
    /// Runs the daemon in a network namespace of its own (see the module
    /// docs). `[network]` is then left at the daemon's defaults unless the
    /// config sets it: the bridge, the TAP pool and the nft table are made
    /// inside the namespace.
    pub fn netns(mut self) -> Self {
        self.netns = true;
        self
    }
}

impl TestDaemon {
    /// The daemon's network namespace, if it was started with `netns()`.
    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    /// The name of the daemon's namespace. Panics without `netns()`.
    pub fn ns(&self) -> &str {
        self.expect_netns().name()
    }

    fn expect_netns(&self) -> &NetNs {
        self.netns
            .as_ref()
            .expect("this daemon has no namespace: use TestDaemon::builder().netns()")
    }

    /// Runs `args[0] args[1..]` inside the daemon's namespace (`ip netns
    /// exec`), e.g. `exec_in_ns(["dig", "@127.0.0.1", ...])`, and returns its
    /// output whatever the exit status.
    pub fn exec_in_ns<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.expect_netns().exec(args)
    }

    /// `ip -n <ns> <args>`, which must succeed; its stdout.
    pub fn ip<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.expect_netns().ip_ok(args)
    }
}
