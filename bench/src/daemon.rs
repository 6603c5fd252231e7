//! The daemon under measurement: a real `bangerd` in its own temporary XDG
//! directories, started with the `banger-tests` harness. It is stopped at
//! the end with SIGTERM and, if it has not exited after a grace period,
//! SIGKILL, also when the benchmark fails or panics (`Drop`).

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use banger_tests::TestDaemon;

/// How long the daemon gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited on SIGTERM after `after`.
    Terminated { status: ExitStatus, after: Duration },
    /// It ignored SIGTERM for [`GRACE`] and was SIGKILLed.
    Killed,
    /// It was no longer running when the benchmark stopped it.
    AlreadyGone,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Terminated { status, after } => {
                write!(
                    f,
                    "exited on SIGTERM in {} ms ({status})",
                    after.as_millis()
                )
            }
            Stopped::Killed => {
                write!(
                    f,
                    "ignored SIGTERM for {} s and was SIGKILLed",
                    GRACE.as_secs()
                )
            }
            Stopped::AlreadyGone => write!(f, "had already exited"),
        }
    }
}

#[derive(Debug)]
pub struct BenchDaemon {
    /// `None` once stopped.
    inner: Option<TestDaemon>,
    pid: u32,
}

impl BenchDaemon {
    /// Starts `bangerd` (found through `BANGER_BIN_DIR`) and waits until it
    /// accepts a handshake.
    pub fn start() -> anyhow::Result<Self> {
        // The harness panics (with the daemon's stderr) when the daemon
        // does not come up; the hook has printed the message already.
        let daemon = std::panic::catch_unwind(TestDaemon::start)
            .map_err(|_| anyhow!("bangerd did not start (see the message above)"))?;
        let pid = daemon.pid();
        Ok(Self {
            inner: Some(daemon),
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The harness, for building commands and finding the socket.
    pub fn harness(&self) -> anyhow::Result<&TestDaemon> {
        self.inner
            .as_ref()
            .ok_or_else(|| anyhow!("bangerd was already stopped"))
    }

    /// SIGTERM, then SIGKILL after [`GRACE`]. Dropping the harness
    /// afterwards removes the temporary directories.
    pub fn stop(&mut self) -> Stopped {
        let Some(mut daemon) = self.inner.take() else {
            return Stopped::AlreadyGone;
        };
        if !daemon.is_running() {
            return Stopped::AlreadyGone;
        }
        let started = Instant::now();
        daemon.sigterm();
        match daemon.wait_exit(GRACE) {
            Some(status) => Stopped::Terminated {
                status,
                after: started.elapsed(),
            },
            None => {
                daemon.sigkill();
                Stopped::Killed
            }
        }
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let stopped = self.stop();
            eprintln!("banger-bench: bangerd {stopped}");
        }
    }
}
