//! The measurements: wall time of the real `banger version` process, the
//! same exchange done in-process with the protocol client, and the
//! daemon's resident memory.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use banger_protocol::client::Client;
use banger_protocol::{Request, Response};
use banger_tests::{error_chain, TestDaemon};

/// How long one `banger version` or one in-process exchange may take
/// before the benchmark gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// Times `runs` executions of `banger version` against `daemon`, from just
/// before the process is spawned until it has exited and been reaped,
/// after `warmup` untimed ones. Every run's output is checked.
pub async fn cli_version(
    daemon: &TestDaemon,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let mut cmd = tokio::process::Command::from(daemon.banger_command(["version"]));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let output = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("`banger version` did not finish within {RUN_TIMEOUT:?}"))?
            .context("cannot run `banger version`")?;
        let elapsed = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !stdout.contains("bangerd") {
            bail!(
                "`banger version` (run {}) failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
                i + 1,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// Times `runs` in-process exchanges: connect to the socket, handshake,
/// one `Version` request, close (the client is dropped inside the timed
/// span), after `warmup` untimed ones. Returns the samples and the
/// daemon's version.
pub async fn in_process_version(
    socket: &Path,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, String)> {
    let mut samples = Vec::with_capacity(runs);
    let mut version = String::new();
    for _ in 0..warmup + runs {
        let started = Instant::now();
        let reply = tokio::time::timeout(RUN_TIMEOUT, async {
            let mut client = Client::connect(socket).await?;
            client.request(Request::Version).await
        })
        .await
        .map_err(|_| anyhow!("an in-process Version exchange took over {RUN_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("in-process Version exchange failed: {}", error_chain(&e)))?;
        let elapsed = started.elapsed();
        match reply {
            Response::Version(info) => version = info.daemon_version,
            other => bail!("bangerd answered Version with {other:?}"),
        }
        samples.push(elapsed);
    }
    let samples = samples.split_off(warmup.min(samples.len()));
    Ok((samples, version))
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most it was ever resident.
    pub peak: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |key| {
        status_kib(&status, key)
            .map(|kib| kib * 1024)
            .ok_or_else(|| anyhow!("no {key} in {path}"))
    };
    Ok(Memory {
        rss: field("VmRSS")?,
        peak: field("VmHWM")?,
    })
}

/// A `Key:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tbangerd\nVmHWM:\t   14336 kB\nVmRSS:\t   12288 kB\nThreads:\t5\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(12288));
        assert_eq!(status_kib(status, "VmHWM"), Some(14336));
        assert_eq!(status_kib(status, "VmSwap"), None);
        assert_eq!(status_kib(status, "Threads"), None, "not a kB field");
        // `VmRSS` must not match a longer key that starts with it.
        assert_eq!(status_kib("VmRSSx:\t1 kB\n", "VmRSS"), None);
    }

    #[test]
    fn own_memory_is_plausible() {
        let m = memory(std::process::id()).expect("own /proc status");
        assert!(m.rss > 0);
        assert!(m.peak >= m.rss);
    }
}
