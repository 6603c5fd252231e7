//! VMM processes: starting them detached from bangerd, identifying them
//! across daemon restarts, waiting for and killing them.
//!
//! A pid alone is not an identity (pids are reused), so a VMM is recorded
//! as [`ProcessId`]: its pid plus its start time in clock ticks since boot
//! (field 22 of `/proc/<pid>/stat`). Waiting uses a pidfd, which works for
//! processes bangerd did not start itself (adopted after a restart); when
//! the process is bangerd's child it is also reaped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

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
/// and bangerd's death do not reach it) at nice 0, with stdin from /dev/null and
/// stdout/stderr appended to `output`. Returns its identity.
pub fn spawn_detached(mut cmd: Command, output: &Path) -> Result<ProcessId, VmmError> {
    let binary = cmd.get_program().to_string_lossy().into_owned();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .map_err(|source| VmmError::Io {
            what: format!("opening {}", output.display()),
            source,
        })?;
    let err = out.try_clone().map_err(|source| VmmError::Io {
        what: format!("opening {}", output.display()),
        source,
    })?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: own_session only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(own_session);
    }
    let child = cmd.spawn().map_err(|source| VmmError::Spawn {
        binary: binary.clone(),
        source,
    })?;
    let pid = child.id();
    // The std Child is dropped without waiting: we reap through the pidfd.
    drop(child);
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
        assert!(id.matches("sleep 600"));
        assert!(!id.matches("qemu"));
        let other = ProcessId {
            pid: id.pid,
            start_ticks: id.start_ticks + 1,
        };
        assert!(!other.is_alive());
        assert_eq!(kill_and_wait(id).await, Exit::Signal(libc::SIGKILL));
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = find_binary("definitely-not-a-vmm-binary").unwrap_err();
        assert!(err.to_string().contains("not found on PATH"), "{err}");
    }
}
