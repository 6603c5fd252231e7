//! Test helpers: throw-away network namespaces and a way to run code inside
//! them. Every link, address, nft table and sysctl a test touches lives in a
//! namespace created here, so the host's own interfaces are never touched.
//!
//! - [`NetNs`]: `ip netns add` on creation, `ip netns del` on drop (even when
//!   the test panics); namespaces left by killed test runs are swept.
//! - [`in_netns`] / [`in_netns_sync`]: run a closure on a fresh thread that
//!   has `setns(2)`-ed into the namespace (with its own current-thread tokio
//!   runtime for the async one). Netlink sockets, `/dev/net/tun`,
//!   `/proc/sys/net` and child processes such as `nft` all follow the
//!   thread's namespace.
//! - [`ping`]: one ICMP echo over a raw socket, so tests need no `ping`
//!   binary.

#![allow(dead_code)] // each test file uses a different subset

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

const NETNS_DIR: &str = "/var/run/netns";
const PREFIX: &str = "bgtest-";

/// `true` if the tests can run (root); otherwise prints why they are skipped.
/// Under CI (`CI` set) not being root is a failure, not a skip.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("banger-net's namespace tests need root, and CI runs as root");
    }
    eprintln!("skipping: needs root (creates network namespaces)");
    false
}

/// A network namespace owned by one test; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `bgtest-<pid>-<n>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> NetNs {
        static SWEEP: Once = Once::new();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(sweep_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        run_ok("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// The namespace's inode, as `/proc/<pid>/ns/net` shows it.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path())
            .expect("stat the netns file")
            .ino()
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// `ip netns exec <ns> <program> <args>`, returning its output.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        Command::new("ip")
            .args(&all)
            .output()
            .expect("run ip netns exec")
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

/// Deletes test namespaces whose creating process is gone (a run killed
/// before its guards could drop).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Runs `program args`, panicking with its stderr if it fails; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
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

/// Runs `f` on a new thread inside `ns`; panics in `f` propagate.
pub fn in_netns_sync<F, T>(ns: &NetNs, f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = ns.path();
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs the future made by `f` on a new thread inside `ns`, on its own
/// current-thread tokio runtime; panics propagate.
pub fn in_netns<F, Fut, T>(ns: &NetNs, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    in_netns_sync(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(f())
    })
}

/// The network namespace inode a child process of the calling thread sees.
pub fn child_netns_inode() -> u64 {
    let link = run_ok("readlink", &["/proc/self/ns/net"]);
    // "net:[4026532xxx]"
    link.trim()
        .trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap_or_else(|_| panic!("unexpected ns link {link:?}"))
}

/// The network namespace inode of the calling thread.
pub fn thread_netns_inode() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat own netns")
        .ino()
}

/// The host's `net.ipv4.ip_forward` as seen from a thread that never left
/// the initial namespace.
pub fn host_ip_forward() -> String {
    std::thread::spawn(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read ip_forward")
    })
    .join()
    .expect("reader thread")
}

use banger_net::frames::icmp_echo;

/// Sends ICMP echo requests to `dst` from the calling thread's namespace
/// (one per second of `timeout`, at least one) and returns whether a reply
/// came back from `dst` in time.
pub fn ping(dst: Ipv4Addr, timeout: Duration) -> bool {
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(raw >= 0, "raw ICMP socket: {}", io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // A new ICMP id per call: conntrack keys echo flows by id (not by
    // sequence number), so a call made after the rules changed must not
    // reuse a flow that an earlier call created.
    static NEXT_ID: AtomicU32 = AtomicU32::new(0);
    let id = (std::process::id() as u16)
        ^ (NEXT_ID.fetch_add(1, Ordering::Relaxed) as u16).wrapping_mul(7919);
    let deadline = Instant::now() + timeout;
    let mut seq: u16 = 0;
    while Instant::now() < deadline {
        seq += 1;
        let pkt = icmp_echo(8, id, seq, b"banger-net test!");
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `pkt` and `addr` are valid for the given lengths.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            // ENETUNREACH and friends: no route yet; wait and retry.
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let round_end = (Instant::now() + Duration::from_secs(1)).min(deadline);
        while let Some(left) = round_end.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if n <= 0 {
                break;
            }
            let mut buf = [0u8; 1500];
            // SAFETY: `buf` is valid for its length.
            let len =
                unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if len <= 0 {
                break;
            }
            let pkt = &buf[..len as usize];
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if pkt.len() < ihl + 8 {
                continue;
            }
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let icmp = &pkt[ihl..];
            if src == dst && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                return true;
            }
        }
    }
    false
}
