//! VMM processes: starting them detached from bangerd, identifying them
//! across daemon restarts, waiting for and killing them.
//!
//! A pid alone is not an identity (pids are reused), so a VMM is recorded
//! as [`ProcessId`]: its pid plus its start time in clock ticks since boot
//! (field 22 of `/proc/<pid>/stat`). Waiting uses a pidfd, which works for
//! processes bangerd did not start itself (adopted after a restart); when
//! the process is bangerd's child it is also reaped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::spawn;
use crate::VmmError;

/// A process identity that survives pid reuse.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// How a process ended, as far as it can be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Exited, but it was not our child: the status went to its parent.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Unknown => f.write_str("exited"),
        }
    }
}

impl Exit {
    /// Exit code 0. Not proof of a guest power-off: under QEMU's
    /// `-no-reboot` a guest reset or panic exits 0 too (see
    /// [`crate::exit`] for telling them apart).
    pub fn is_clean(self) -> bool {
        matches!(self, Exit::Code(0))
    }
}

/// Reads the start time of `pid`, or `None` when there is no such process
/// (or it is a zombie that has already exited).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let (state, ticks) = stat_state_and_start(pid)?;
    if state == "Z" || state == "X" {
        return None;
    }
    Some(ticks)
}

/// The state letter and start time of `pid`, zombies included.
fn stat_state_and_start(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    Some((fields.first()?.to_string(), fields.get(19)?.parse().ok()?))
}

impl ProcessId {
    /// The identity of a live process.
    pub fn of(pid: u32) -> Option<Self> {
        Some(Self {
            pid,
            start_ticks: start_ticks(pid)?,
        })
    }

    /// Whether this very process is still alive.
    pub fn is_alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// The process's command line, NUL-separated arguments joined by spaces.
    pub fn cmdline(&self) -> Option<String> {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.pid)).ok()?;
        Some(
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    /// Whether it is alive and its command line mentions `needle` (e.g. the
    /// VM's run dir): the check before adopting a recorded process.
    pub fn matches(&self, needle: &str) -> bool {
        self.is_alive() && self.cmdline().is_some_and(|c| c.contains(needle))
    }

    /// Sends SIGKILL (no-op when the process is already gone).
    pub fn sigkill(&self) {
        if self.is_alive() {
            // SAFETY: plain syscall on a pid we just checked is this process.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Finds `binary` on `PATH` (or accepts an explicit path).
pub fn find_binary(binary: &str) -> Result<std::path::PathBuf, VmmError> {
    if binary.contains('/') {
        let p = std::path::PathBuf::from(binary);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(VmmError::BinaryNotFound {
                binary: binary.to_string(),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(binary);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(VmmError::BinaryNotFound {
        binary: binary.to_string(),
    })
}

/// Starts `cmd` in a new session (so signals to bangerd's process group
/// and bangerd's death do not reach it; its own process group for killing
/// it whole; its own autogroup) at nice 0, with stdin from /dev/null and
/// stdout/stderr appended to `output`. Returns its identity.
///
/// The process is made with `posix_spawn` (`POSIX_SPAWN_SETSID`), which
/// glibc implements with `clone(CLONE_VM | CLONE_VFORK)`: bangerd's page
/// tables are not copied and nothing of bangerd runs in the child, so a
/// VMM launch costs a fraction of a millisecond rather than a `fork` of
/// the whole daemon (several milliseconds here, more while other VMMs
/// start). A child takes its nice value from the thread that spawns it
/// and bangerd's own threads run at the configured `nice` (-10 by
/// default), so the calling thread carries the kernel's reset-on-fork
/// flag for the moment of the spawn, which starts the child at nice 0 (a
/// positive nice value, or a thread where the flag cannot be set, spawns
/// from a short-lived thread set to nice 0 instead). `cmd`'s program,
/// arguments and environment changes are used; stdio set on it is
/// replaced as above, and a working directory set on it is refused (an
/// error).
pub fn spawn_detached(cmd: Command, output: &Path) -> Result<ProcessId, VmmError> {
    let binary = cmd.get_program().to_string_lossy().into_owned();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .map_err(|source| VmmError::Io {
            what: format!("opening {}", output.display()),
            source,
        })?;
    let pid =
        spawn::in_new_session(&cmd, &out).map_err(|source| VmmError::Spawn { binary, source })?;
    // The start time is readable as soon as the process exists. It is our
    // unreaped child, so even if it has already exited (a zombie) the pid
    // is still its own: `wait_exit` then reports its real status.
    match stat_state_and_start(pid) {
        Some((_, start_ticks)) => Ok(ProcessId { pid, start_ticks }),
        None => {
            reap(pid);
            Err(VmmError::EarlyExit {
                status: "exited immediately".into(),
                output: tail_of(output, 2000),
            })
        }
    }
}

/// [`spawn_detached`] on the blocking pool. `posix_spawn` suspends the
/// calling thread until the child has exec'd, and the child (at nice 0)
/// may wait for a CPU behind busier threads first: on a runtime worker
/// that would stall every task queued on it, such as the other creates
/// of a burst. If the caller stops waiting (a cancelled launch), the
/// child is killed and reaped rather than left running with no owner.
pub async fn spawn_detached_off_runtime(
    cmd: Command,
    output: PathBuf,
) -> Result<ProcessId, VmmError> {
    let binary = cmd.get_program().to_string_lossy().into_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || deliver_or_kill(tx, spawn_detached(cmd, &output)));
    rx.await.map_err(|_| VmmError::Spawn {
        binary,
        source: std::io::Error::other("the spawning thread stopped"),
    })?
}

type Spawned = Result<ProcessId, VmmError>;

/// Hands a spawned process to the launch waiting for it; when nobody waits
/// any more, kills and reaps it (blocking: a SIGKILLed child exits at once).
fn deliver_or_kill(tx: tokio::sync::oneshot::Sender<Spawned>, spawned: Spawned) {
    if let Err(Ok(id)) = tx.send(spawned) {
        tracing::warn!(
            pid = id.pid,
            "the launch was cancelled while its VMM was spawned; killing it"
        );
        id.sigkill();
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(id.pid as i32, std::ptr::null_mut(), 0) };
    }
}

/// For `pre_exec` of a child that must outlive and ignore bangerd: a
/// session of its own (so signals to bangerd's process group and
/// bangerd's death do not reach it; its own process group for killing it
/// whole; its own autogroup) at nice 0, the default priority, whatever
/// bangerd runs at (its `nice`). Raising a nice value is always allowed.
/// Only async-signal-safe calls.
pub fn own_session() -> std::io::Result<()> {
    // SAFETY: setsid and setpriority touch no Rust state.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::setpriority(libc::PRIO_PROCESS, 0, 0);
    }
    Ok(())
}

/// The last `max` bytes of a log file, lossily decoded (for error messages).
pub fn tail_of(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).trim().to_string()
        }
        Err(_) => String::new(),
    }
}

/// Reaps `pid` if it is our exited child; returns its status when it was.
fn reap(pid: u32) -> Option<Exit> {
    match try_reap(pid) {
        Reap::Exited(exit) => Some(exit),
        Reap::NotYet | Reap::NotOurs => None,
    }
}

enum Reap {
    Exited(Exit),
    /// Our child, not (fully) exited yet.
    NotYet,
    /// Not our child (or already reaped).
    NotOurs,
}

fn try_reap(pid: u32) -> Reap {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with WNOHANG.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    if r == pid as i32 {
        Reap::Exited(if libc::WIFEXITED(status) {
            Exit::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Unknown
        })
    } else if r == 0 {
        Reap::NotYet
    } else {
        Reap::NotOurs
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `id` has exited (reaping it when it is our child).
///
/// A multi-threaded process (QEMU, Firecracker) shows as a zombie as soon
/// as its main thread exits, but can be reaped only once all its threads
/// are gone; the pidfd becomes readable at that point. So the wait is on
/// the pidfd whenever the pid is still this process, zombie or not.
pub async fn wait_exit(id: ProcessId) -> Exit {
    let is_this = || stat_state_and_start(id.pid).is_some_and(|(_, t)| t == id.start_ticks);
    if is_this() {
        // SAFETY: the pidfd was just opened and is owned by the AsyncFd from
        // here on; nothing else closes or replaces it.
        match pidfd_open(id.pid).and_then(|fd| Ok(unsafe { AsyncFd::register(fd) }?)) {
            Ok(fd) => {
                // Re-check after opening: the pid may have been reused in between.
                if is_this() {
                    let _ = fd.readable().await;
                }
                let _ = fd.as_raw_fd();
            }
            Err(_) => {
                // No pidfd (very old kernel): poll.
                while id.is_alive() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    // Reap it if ours. `NotYet` lasts only while its threads finish exiting.
    for _ in 0..500 {
        if !is_this() {
            // Gone: reaped by its parent (it was not our child).
            return Exit::Unknown;
        }
        match try_reap(id.pid) {
            Reap::Exited(exit) => return exit,
            Reap::NotOurs => return Exit::Unknown,
            Reap::NotYet => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    Exit::Unknown
}

/// SIGKILLs `id` and waits (bounded) until it is gone.
pub async fn kill_and_wait(id: ProcessId) -> Exit {
    id.sigkill();
    match tokio::time::timeout(Duration::from_secs(10), wait_exit(id)).await {
        Ok(exit) => exit,
        Err(_) => Exit::Unknown,
    }
}

/// Test support: waits (up to 5 s) until `id`'s command line mentions
/// `needle`. The parent resumes once the child's exec has replaced its
/// memory, a moment before the kernel shows the new command line, and a
/// shell that `exec`s its program takes longer still.
#[cfg(test)]
pub(crate) async fn wait_for_cmdline(id: ProcessId, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !id.matches(needle) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        id.matches(needle),
        "{:?} never named {needle}",
        id.cmdline()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_wait_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; exit 7"]);
        let id = spawn_detached(cmd, &log).unwrap();
        assert_eq!(wait_exit(id).await, Exit::Code(7));
        assert!(!id.is_alive());
        assert_eq!(tail_of(&log, 100), "hello");
    }

    #[tokio::test]
    async fn kill_reports_the_signal_and_a_reused_pid_is_not_alive() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let id = spawn_detached(cmd, &dir.path().join("o")).unwrap();
        assert!(id.is_alive());
        wait_for_cmdline(id, "sleep 600").await;
        assert!(!id.matches("qemu"));
        let other = ProcessId {
            pid: id.pid,
            start_ticks: id.start_ticks + 1,
        };
        assert!(!other.is_alive());
        assert_eq!(kill_and_wait(id).await, Exit::Signal(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_spawn_off_the_runtime_is_handed_over_or_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("601");
        let id = spawn_detached_off_runtime(cmd, dir.path().join("o"))
            .await
            .unwrap();
        wait_for_cmdline(id, "sleep 601").await;
        assert_eq!(kill_and_wait(id).await, Exit::Signal(libc::SIGKILL));

        // Nobody waits any more (the launch was cancelled): killed and
        // reaped, not left running.
        let mut cmd = Command::new("sleep");
        cmd.arg("602");
        let id = spawn_detached(cmd, &dir.path().join("o")).unwrap();
        assert!(id.is_alive());
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(rx);
        deliver_or_kill(tx, Ok(id));
        assert!(!id.is_alive(), "the orphaned VMM still runs");
        assert!(matches!(try_reap(id.pid), Reap::NotOurs), "not reaped");
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = find_binary("definitely-not-a-vmm-binary").unwrap_err();
        assert!(err.to_string().contains("not found on PATH"), "{err}");
    }

    /// A `/proc/<pid>/status` line's value.
    fn status_field(pid: u32, name: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_string()
    }

    /// Field 19 (nice) of `/proc/<pid>/stat`.
    fn stat_nice(pid: u32) -> String {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        fields[19 - 3].to_string()
    }

    #[tokio::test]
    async fn a_child_of_a_thread_at_negative_nice_starts_at_0_and_the_thread_is_unchanged() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: lowering a nice value needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o");
        // As bangerd's threads: at a negative nice, spawning from
        // themselves with reset-on-fork set for the moment.
        let (id, before, after, policy, grandchild) = std::thread::spawn(move || {
            // SAFETY: scheduling calls on this thread only.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -5) };
            let before = spawn::thread_nice();
            let mut cmd = Command::new("sleep");
            cmd.arg("600");
            let id = spawn_detached(cmd, &out).unwrap();
            let after = spawn::thread_nice();
            let policy = unsafe { libc::sched_getscheduler(0) };
            // A thread this one starts afterwards keeps its nice value.
            let grandchild = std::thread::spawn(spawn::thread_nice).join().unwrap();
            (id, before, after, policy, grandchild)
        })
        .join()
        .unwrap();
        assert_eq!(before, -5);
        assert_eq!((after, grandchild), (-5, -5), "the spawning thread changed");
        assert_eq!(policy, libc::SCHED_OTHER, "reset-on-fork left set");
        assert_eq!(stat_nice(id.pid), "0");
        assert_eq!(kill_and_wait(id).await, Exit::Signal(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_detached_child_leads_its_own_session_at_nice_0_with_default_signals() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o");
        // Spawned from a thread at nice 3, as bangerd's threads are at
        // their configured nice: the child still starts at 0 where this
        // may lower a nice value (root), and at 3 where it may not.
        // SAFETY: geteuid has no preconditions.
        let may_lower = unsafe { libc::geteuid() } == 0;
        let (id, thread_nice) = std::thread::spawn({
            let out = out.clone();
            move || {
                // SAFETY: setpriority/getpriority on this thread only.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) };
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                let mut cmd = Command::new("sh");
                cmd.args([
                    "-c",
                    "echo \"$BANGER_SPAWN_TEST\" \"${HOME-unset}\"; exec sleep 600",
                ])
                .env("BANGER_SPAWN_TEST", "set by the command")
                .env_remove("HOME");
                (spawn_detached(cmd, &out).unwrap(), nice)
            }
        })
        .join()
        .unwrap();
        assert_eq!(thread_nice, 3);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", id.pid)).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // Fields 5 (pgrp), 6 (session) and 19 (nice), counted from 1.
        assert_eq!(fields[5 - 3], id.pid.to_string(), "process group: {stat}");
        assert_eq!(fields[6 - 3], id.pid.to_string(), "session: {stat}");
        let expected_nice = if may_lower { "0" } else { "3" };
        assert_eq!(stat_nice(id.pid), expected_nice, "nice: {stat}");
        // The signals this process ignores (Rust ignores SIGPIPE) are back
        // to their defaults; whatever else it ignores was ignored before it
        // started and carries on. glibc's two internal signals (32 and 33,
        // below SIGRTMIN) are left out: posix_spawn ignores them in the
        // child, as for std's spawn, and glibc in the new program sets
        // them up again. Nothing is blocked.
        let mask =
            |pid: u32, field: &str| u64::from_str_radix(&status_field(pid, field), 16).unwrap();
        let ours = mask(std::process::id(), "SigIgn");
        let pipe = 1u64 << (libc::SIGPIPE - 1);
        assert_ne!(ours & pipe, 0, "this test process ignores SIGPIPE");
        let reset = spawn::DEFAULT_SIGNALS
            .iter()
            .fold(0u64, |m, &s| m | 1 << (s - 1));
        let internal = (32..libc::SIGRTMIN()).fold(0u64, |m, s| m | 1 << (s - 1));
        assert_eq!(
            mask(id.pid, "SigIgn") & !internal,
            ours & !reset & !internal,
            "ignored signals"
        );
        assert_eq!(mask(id.pid, "SigBlk"), 0, "blocked signals");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tail_of(&out, 200).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tail_of(&out, 200), "set by the command unset");
        assert_eq!(kill_and_wait(id).await, Exit::Signal(libc::SIGKILL));
    }

    #[test]
    fn a_program_that_cannot_be_executed_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = spawn_detached(
            Command::new("/nonexistent/banger-vmm"),
            &dir.path().join("o"),
        )
        .unwrap_err();
        assert!(matches!(err, VmmError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/banger-vmm"), "{err}");
        let mut cmd = Command::new("true");
        cmd.current_dir("/");
        let err = spawn_detached(cmd, &dir.path().join("o")).unwrap_err();
        assert!(format!("{err:?}").contains("working directory"), "{err:?}");
    }
}
