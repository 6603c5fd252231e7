//! DNS throughput and latency with `dnsperf` (Debian's `dnsperf`) against
//! the daemon's `vm.` server on loopback.
//!
//! The daemon gets `records` static records (`bench-000` ... through
//! `DnsAdd`); the query file asks for each of them, type A. `dnsperf` runs
//! with `-v`, which prints one line per answered query with its latency:
//! the percentiles come from those lines, the counts and the rate from
//! dnsperf's own statistics. Queries the server never answers (dropped)
//! have no latency; they are counted as lost, and dnsperf waits `-t 1` s
//! for each before reusing its slot.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

use crate::stats::Summary;

/// The per-client token bucket the daemon's DNS server runs with:
/// `banger_dns::Limits::default().client_rate` (`dns/src/lib.rs`); the
/// daemon's config does not change it.
pub const CLIENT_RATE_QPS: u32 = 10_000;
pub const CLIENT_RATE_BURST: u32 = 20_000;

/// What one `dnsperf` process reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub noerror: u64,
    pub run_time: Duration,
    /// One per answered query.
    pub latencies: Vec<Duration>,
}

/// Several `dnsperf` processes run at once, added up.
#[derive(Debug, Clone)]
pub struct Run {
    pub what: String,
    pub sources: usize,
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub noerror: u64,
    /// Answered queries per second, all processes together.
    pub qps: f64,
    pub latency: Option<Summary>,
}

/// The query file: every record, type A.
pub fn query_file(names: &[String]) -> String {
    let mut out = String::new();
    for n in names {
        let _ = writeln!(out, "{n}.vm A");
    }
    out
}

/// Runs one `dnsperf` per source address in `sources` at once, each for
/// `secs` seconds, as fast as it goes or at `paced` queries/s, and adds
/// their results up.
pub async fn run(
    what: &str,
    server: SocketAddr,
    queries: &Path,
    sources: &[String],
    secs: u32,
    paced: Option<u32>,
) -> anyhow::Result<Run> {
    // One task per process, so they all run at once.
    let tasks: Vec<_> = sources
        .iter()
        .map(|src| tokio::spawn(one(server, queries.to_path_buf(), src.clone(), secs, paced)))
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(
            task.await
                .map_err(|e| anyhow!("a dnsperf task failed: {e}"))??,
        );
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let (mut sent, mut completed, mut lost, mut noerror) = (0, 0, 0, 0);
    let mut qps = 0.0;
    for o in &outcomes {
        sent += o.sent;
        completed += o.completed;
        lost += o.lost;
        noerror += o.noerror;
        if !o.run_time.is_zero() {
            qps += o.completed as f64 / o.run_time.as_secs_f64();
        }
        latencies.extend_from_slice(&o.latencies);
    }
    Ok(Run {
        what: what.to_string(),
        sources: sources.len(),
        sent,
        completed,
        lost,
        noerror,
        qps,
        latency: Summary::of(&latencies),
    })
}

async fn one(
    server: SocketAddr,
    queries: PathBuf,
    source: String,
    secs: u32,
    paced: Option<u32>,
) -> anyhow::Result<Outcome> {
    let mut cmd = tokio::process::Command::new("dnsperf");
    if let Some(qps) = paced {
        cmd.args(["-Q", &qps.to_string()]);
    }
    cmd.args(["-s", &server.ip().to_string()])
        .args(["-p", &server.port().to_string()])
        .args(["-a", &source])
        .arg("-d")
        .arg(&queries)
        .args(["-l", &secs.to_string()])
        .args(["-t", "1", "-q", "100", "-v"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(u64::from(secs) + 30), cmd.output())
        .await
        .map_err(|_| anyhow!("dnsperf did not finish"))?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("dnsperf is not installed: apt-get install -y dnsperf")
            } else {
                anyhow!(e).context("cannot run dnsperf")
            }
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dnsperf failed ({}): {}{}",
            out.status,
            stdout.lines().rev().take(10).collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("reading dnsperf's output (source {source})"))
}

/// Reads dnsperf's `-v` lines (`> NOERROR name A 0.000123`) and its
/// `Statistics:` block.
pub fn parse(text: &str) -> anyhow::Result<Outcome> {
    let mut o = Outcome::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("> ") {
            if let Some(secs) = rest
                .split_whitespace()
                .last()
                .and_then(|s| s.parse::<f64>().ok())
            {
                o.latencies.push(Duration::from_secs_f64(secs));
            }
            continue;
        }
        let line = line.trim();
        let field = |key: &str| -> Option<&str> {
            line.strip_prefix(key)
                .map(str::trim)
                .and_then(|v| v.split_whitespace().next())
        };
        if let Some(v) = field("Queries sent:") {
            o.sent = v.parse()?;
        } else if let Some(v) = field("Queries completed:") {
            o.completed = v.parse()?;
        } else if let Some(v) = field("Queries lost:") {
            o.lost = v.parse()?;
        } else if let Some(v) = field("Run time (s):") {
            o.run_time = Duration::from_secs_f64(v.parse()?);
        } else if let Some(rest) = line.strip_prefix("Response codes:") {
            o.noerror = rest
                .split(',')
                .find_map(|c| {
                    let mut w = c.split_whitespace();
                    (w.next() == Some("NOERROR")).then(|| w.next()?.parse().ok())?
                })
                .unwrap_or(0);
        }
    }
    if o.run_time.is_zero() {
        bail!("no statistics in dnsperf's output");
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsperf_output_is_read() {
        let text = "\
[Status] Sending queries (to 127.0.0.1:60471)
> NOERROR bench-001.vm A 0.000517
> NOERROR bench-002.vm A 0.000432
[Timeout] Query timed out: msg id 33068

Statistics:

  Queries sent:         35663
  Queries completed:    35565 (99.73%)
  Queries lost:         98 (0.27%)

  Response codes:       NOERROR 35560 (99.99%), NXDOMAIN 5 (0.01%)
  Average packet size:  request 27, response 43
  Run time (s):         3.003991
  Queries per second:   11839.249851
";
        let o = parse(text).expect("parse");
        assert_eq!(
            (o.sent, o.completed, o.lost, o.noerror),
            (35663, 35565, 98, 35560)
        );
        assert_eq!(o.latencies.len(), 2);
        assert_eq!(o.latencies[0], Duration::from_micros(517));
        assert_eq!(o.run_time, Duration::from_secs_f64(3.003991));
        assert!(parse("nothing").is_err());
    }

    #[test]
    fn query_file_names_every_record() {
        let names = vec!["a".to_string(), "b".to_string()];
        assert_eq!(query_file(&names), "a.vm A\nb.vm A\n");
    }
}
