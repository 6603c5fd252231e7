//! Every child of the agent is started here and reaped here.
//!
//! One task waits for `SIGCHLD` and reaps with `waitpid(.., WNOHANG)`: as
//! PID 1 with `waitpid(-1)`, which also reaps the orphans the kernel hands
//! to init; otherwise only the pids registered here. The status of a
//! process the agent started goes to its waiter (a oneshot registered by
//! [`spawn`]); any other status is dropped.
//!
//! In init mode nothing else may wait for children (no `tokio::process`,
//! no `std::process::Child::wait`/`output`): statuses would be stolen.
//! [`spawn`] holds the registry lock across `fork`/`exec` and the reaper
//! holds it across `waitpid`, so a child can neither be reaped before its
//! waiter is registered nor inside `std`'s own wait after a failed `exec`.

use crate::fdio::AsyncFdIo;
use banger_protocol::agent::ExitStatus;
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

#[derive(Debug, Default)]
struct Registry {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A child started through [`spawn`].
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// Resolves with the exit status once the child is reaped.
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// Spawns `cmd` and registers a waiter for it.
pub fn spawn(cmd: &mut Command) -> io::Result<Spawned> {
    let mut reg = registry();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (tx, exit) = oneshot::channel();
    reg.waiters.insert(pid as i32, tx);
    drop(reg);
    Ok(Spawned {
        pid,
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        exit,
    })
    // Dropping `child` neither waits for nor kills it.
}

/// Whether [`reap_now`] waits for any child (`waitpid(-1)`): set as PID 1,
/// where orphans must be reaped too. Otherwise it waits only for the
/// registered pids, so code that waits for its own children (tests,
/// libraries) keeps working.
static REAP_ANY: AtomicBool = AtomicBool::new(false);

/// Makes [`reap_now`] reap every child, orphans included (init mode).
pub fn reap_orphans_too() {
    REAP_ANY.store(true, Ordering::SeqCst);
}

/// Reaps every child that has exited, routing statuses to their waiters.
/// Returns how many were reaped.
pub fn reap_now() -> usize {
    let mut reg = registry();
    let mut reaped = 0;
    if REAP_ANY.load(Ordering::SeqCst) {
        while let Some((pid, exit)) = wait_one(-1) {
            reaped += 1;
            if let Some(waiter) = reg.waiters.remove(&pid) {
                let _ = waiter.send(exit);
            }
        }
    } else {
        let pids: Vec<i32> = reg.waiters.keys().copied().collect();
        for pid in pids {
            if let Some((pid, exit)) = wait_one(pid) {
                reaped += 1;
                if let Some(waiter) = reg.waiters.remove(&pid) {
                    let _ = waiter.send(exit);
                }
            }
        }
    }
    reaped
}

/// One `waitpid(target, WNOHANG)`: `None` when nothing (more) has exited.
fn wait_one(target: i32) -> Option<(i32, ExitStatus)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: plain syscall with a valid out-pointer.
        let pid = unsafe { libc::waitpid(target, &mut status, libc::WNOHANG) };
        if pid == 0 {
            return None;
        }
        if pid < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: no such child (any more).
            return None;
        }
        let exit = if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        };
        return Some((pid, exit));
    }
}

/// Starts the reaping task (once per runtime). Must run before the first
/// [`spawn`]. Besides `SIGCHLD` it polls every few seconds, in case a
/// signal raced with the handler's installation.
pub fn start() -> io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_now();
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    Ok(())
}

/// Sends `signal` to the process group of every child still registered
/// (each was started as a group leader), e.g. when the agent stops.
pub fn signal_all_groups(signal: libc::c_int) {
    let reg = registry();
    for pid in reg.waiters.keys() {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(-*pid, signal);
            libc::kill(*pid, signal);
        }
    }
}

/// What [`run`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
}

/// Runs a helper program to completion with stdin from `/dev/null`,
/// capturing up to 64 KiB of stdout, killing it after `timeout`.
pub async fn run(argv: &[&str], timeout: Duration) -> io::Result<RunOutput> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let spawned = spawn(&mut cmd)?;
    let pid = spawned.pid as i32;
    let stdout = spawned.stdout;
    let mut exit = spawned.exit;
    let collect = async move {
        let mut out = Vec::new();
        if let Some(fd) = stdout {
            let io = AsyncFdIo::new(fd)?;
            let mut buf = [0u8; 4096];
            loop {
                let n = io.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if out.len() < 64 * 1024 {
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
        Ok::<_, io::Error>(out)
    };
    let result = tokio::time::timeout(timeout, async {
        let out = collect.await?;
        let status = (&mut exit)
            .await
            .map_err(|_| io::Error::other("child status lost"))?;
        Ok::<_, io::Error>(RunOutput {
            status,
            stdout: out,
        })
    })
    .await;
    match result {
        Ok(r) => r,
        Err(_) => {
            // SAFETY: plain syscall on the group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{program} did not finish within {timeout:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn statuses_reach_their_waiters() {
        start().expect("reaper");
        let out = run(&["sh", "-c", "echo hi; exit 7"], Duration::from_secs(5))
            .await
            .expect("run");
        assert_eq!(out.status, ExitStatus::Code(7));
        assert_eq!(out.stdout, b"hi\n");

        let out = run(&["sh", "-c", "kill -9 $$"], Duration::from_secs(5))
            .await
            .expect("run");
        assert_eq!(out.status, ExitStatus::Signal(9));

        let err = run(&["sleep", "10"], Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn failed_exec_is_an_error_not_a_hang() {
        start().expect("reaper");
        let mut cmd = Command::new("/nonexistent/banger-test-program");
        cmd.process_group(0);
        let err = spawn(&mut cmd).expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
