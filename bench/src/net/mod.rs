//! The `net` benchmark: host networking and DNS through real daemons.
//!
//! - TAP hand-out (see [`taps`]): `TapAcquire` + `TapRelease` round trips
//!   from the client, from the warm pool (target: acquire median <= 1 ms)
//!   and cold (`pool_size = 0`, a TAP created for every acquire). Each
//!   daemon runs in a network namespace of its own, so this needs root;
//!   nothing is created on the host.
//! - DNS (see [`dnsperf`]): `dnsperf` for `--dns-secs` against the daemon's
//!   `vm.` server on loopback, holding `--dns-records` records: from one
//!   client address (as a resolver would ask) as fast as it goes, from the
//!   same address paced at [`PACED_QPS`], and from `--dns-sources`
//!   addresses at once (127.0.0.2, ...), first as fast as they go, then
//!   paced to 50 000 queries/s in all. Targets: >= 50 000 answered
//!   queries/s and p99 < 1 ms (the one-address paced run: p99 only); the
//!   last run is the two together. The server limits
//!   each client address
//!   ([`dnsperf::CLIENT_RATE_QPS`]); a run held back by that limit is
//!   reported as throttled, the server is not changed for the benchmark.
//!
//! Daemons and namespaces are removed at the end, also on error and Ctrl-C
//! (their `Drop`s).

mod dnsperf;
mod taps;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use banger_protocol::client::Client;
use banger_protocol::{Request, Response};
use banger_tests::error_chain;

use crate::args::NetArgs;
use crate::daemon::{BenchDaemon, Stopped};
use crate::stats::Summary;
use crate::table::{self, fmt_duration, Columns, Row, Target, Value};

use self::dnsperf::{Run, CLIENT_RATE_BURST, CLIENT_RATE_QPS};
use self::taps::{Pool, Samples};

/// Target for the median `TapAcquire` round trip from the warm pool.
const WARM_ACQUIRE_TARGET: Duration = Duration::from_millis(1);
/// DNS targets: answered queries per second, and the p99 latency.
const DNS_QPS_TARGET: f64 = 50_000.0;
const DNS_P99_TARGET: Duration = Duration::from_millis(1);
/// The paced run's rate: under the per-client limit, so nothing is
/// dropped and the latency is that of a server that keeps up.
const PACED_QPS: u32 = 5_000;

/// Everything that was measured.
#[derive(Debug)]
pub struct Report {
    bin_dir: PathBuf,
    args: NetArgs,
    warm: Samples,
    cold: Samples,
    dns_addr: SocketAddr,
    dns: Vec<Run>,
    /// The TAP rows of the table.
    tap_rows: Vec<Row>,
    /// Every verdict, TAP and DNS, for `--fail-on-miss`.
    pub rows: Vec<Row>,
    stopped: Stopped,
}

pub fn run(args: &NetArgs) -> anyhow::Result<Report> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the net benchmark creates network namespaces: run it as root");
    }
    let (bin_dir, (warm, cold, dns_addr, dns, stopped)) =
        crate::run_bench(args.common.bin_dir.as_deref(), |_| async {
            let (warmup, runs) = (args.warmup as usize, args.runs as usize);
            let warm = taps::measure(Pool::Warm, warmup, runs).await?;
            let cold = taps::measure(Pool::Cold, warmup, runs).await?;
            let (dns_addr, dns, stopped) = measure_dns(args).await?;
            Ok((warm, cold, dns_addr, dns, stopped))
        })?;
    let tap_rows = tap_rows(&warm, &cold)?;
    let mut rows = tap_rows.clone();
    rows.extend(dns.iter().flat_map(dns_verdicts));
    Ok(Report {
        bin_dir,
        args: args.clone(),
        warm,
        cold,
        dns_addr,
        dns,
        tap_rows,
        rows,
        stopped,
    })
}

fn tap_rows(warm: &Samples, cold: &Samples) -> anyhow::Result<Vec<Row>> {
    let summary =
        |samples: &[Duration]| Summary::of(samples).ok_or_else(|| anyhow!("no samples were taken"));
    let mut rows = Vec::new();
    for (pool, samples, label) in [
        (Pool::Warm, warm, "warm pool"),
        (Pool::Cold, cold, "cold, pool_size = 0"),
    ] {
        rows.push(Row {
            what: format!("TapAcquire, {label}"),
            value: Value::Timing(summary(&samples.acquire)?),
            target: (pool == Pool::Warm).then_some(Target::MedianAtMost(WARM_ACQUIRE_TARGET)),
        });
        rows.push(Row {
            what: format!("TapRelease, {label}"),
            value: Value::Timing(summary(&samples.release)?),
            target: None,
        });
        rows.push(Row {
            what: format!("TapAcquire+TapRelease, {label}"),
            value: Value::Timing(summary(&samples.cycle)?),
            target: None,
        });
    }
    Ok(rows)
}

/// A daemon with `--dns-records` records, then dnsperf from one address and
/// from several.
async fn measure_dns(args: &NetArgs) -> anyhow::Result<(SocketAddr, Vec<Run>, Stopped)> {
    let mut daemon = BenchDaemon::start()?;
    let measured = dns_runs(&daemon, args).await;
    let stopped = daemon.stop();
    let (addr, runs) = measured?;
    Ok((addr, runs, stopped))
}

async fn dns_runs(daemon: &BenchDaemon, args: &NetArgs) -> anyhow::Result<(SocketAddr, Vec<Run>)> {
    let harness = daemon.harness()?;
    let mut client = Client::connect(&harness.socket())
        .await
        .map_err(|e| anyhow!("cannot connect: {}", error_chain(&e)))?;
    let names: Vec<String> = (0..args.dns_records)
        .map(|i| format!("bench-{i:03}"))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let ip = Ipv4Addr::new(172, 30, (i / 250) as u8, (i % 250 + 2) as u8);
        match client
            .request(Request::DnsAdd {
                name: name.clone(),
                ip,
            })
            .await
        {
            Ok(Response::Done) => {}
            Ok(other) => bail!("DnsAdd answered {other:?}"),
            Err(e) => bail!("DnsAdd {name} failed: {}", error_chain(&e)),
        }
    }
    let addr = match client.request(Request::NetworkStatus).await {
        Ok(Response::Network(s)) => s
            .dns
            .listen
            .ok_or_else(|| anyhow!("the daemon's DNS server is disabled"))?,
        Ok(other) => bail!("NetworkStatus answered {other:?}"),
        Err(e) => bail!("NetworkStatus failed: {}", error_chain(&e)),
    };
    let dir = tempfile::tempdir().context("temp dir")?;
    let queries = dir.path().join("queries.txt");
    std::fs::write(&queries, dnsperf::query_file(&names)).context("write the query file")?;

    let one = ["127.0.0.1".to_string()];
    let many: Vec<String> = (0..args.dns_sources)
        .map(|i| format!("127.0.0.{}", i + 2))
        .collect();
    let mut runs = Vec::new();
    runs.push(
        dnsperf::run(
            "1 client (127.0.0.1)",
            addr,
            &queries,
            &one,
            args.dns_secs,
            None,
        )
        .await?,
    );
    let paced = format!("1 client (127.0.0.1), {PACED_QPS} q/s");
    runs.push(dnsperf::run(&paced, addr, &queries, &one, args.dns_secs, Some(PACED_QPS)).await?);
    let what = format!("{} clients (127.0.0.2-{})", many.len(), many.len() + 1);
    runs.push(dnsperf::run(&what, addr, &queries, &many, args.dns_secs, None).await?);
    // The target as one run: the target rate, offered by all the sources
    // together (a little over, as dnsperf holds each to its -Q), and the
    // p99 of a server that keeps up with it, not of dnsperf's own queue.
    let sources = many.len().max(1) as u32;
    let per_source = (DNS_QPS_TARGET as u32).div_ceil(sources) + 50;
    let what = format!(
        "{} clients, {} q/s in all",
        many.len(),
        per_source * sources
    );
    runs.push(
        dnsperf::run(
            &what,
            addr,
            &queries,
            &many,
            args.dns_secs,
            Some(per_source),
        )
        .await?,
    );
    for run in &runs {
        if run.noerror != run.completed {
            bail!(
                "{}: {} of {} answers were not NOERROR",
                run.what,
                run.completed - run.noerror,
                run.completed
            );
        }
    }
    Ok((addr, runs))
}

/// Whether a run was held back by the per-client limit: queries were
/// dropped and no address got more than the bucket allows.
fn throttled(run: &Run, secs: u32) -> bool {
    let allowed =
        f64::from(CLIENT_RATE_QPS) + f64::from(CLIENT_RATE_BURST) / f64::from(secs.max(1));
    run.lost > 0 && run.qps / run.sources.max(1) as f64 <= allowed * 1.05
}

fn dns_verdicts(run: &Run) -> Vec<Row> {
    let mut rows = Vec::new();
    if run.paced.is_none() || run.sources > 1 {
        rows.push(Row {
            what: format!("DNS q/s / target, {}", run.what),
            value: Value::Ratio(run.qps / DNS_QPS_TARGET),
            target: Some(Target::RatioAtLeast(1.0)),
        });
    }
    if let Some(latency) = run.latency {
        rows.push(Row {
            what: format!("DNS p99 / target, {}", run.what),
            value: Value::Ratio(latency.p99.as_secs_f64() / DNS_P99_TARGET.as_secs_f64()),
            target: Some(Target::RatioAtMost(1.0)),
        });
    }
    rows
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn render_dns(runs: &[Run]) -> String {
    let header = [
        "what", "sent", "answered", "lost", "q/s", "median", "p99", "max", "target", "result",
    ];
    let lines: Vec<[String; 10]> = runs
        .iter()
        .map(|r| {
            let (median, p99, max) = match r.latency {
                Some(s) => (
                    fmt_duration(s.median),
                    fmt_duration(s.p99),
                    fmt_duration(s.max),
                ),
                None => Default::default(),
            };
            let latency_ok = r.latency.is_some_and(|s| s.p99 < DNS_P99_TARGET);
            let p99_target = format!("p99 < {}", fmt_duration(DNS_P99_TARGET));
            let (ok, target) = match r.paced {
                // One paced source, under the limit: only the latency has
                // a target.
                Some(_) if r.sources <= 1 => (latency_ok, p99_target),
                _ => (
                    r.qps >= DNS_QPS_TARGET && latency_ok,
                    format!(">= {DNS_QPS_TARGET:.0} q/s, {p99_target}"),
                ),
            };
            [
                r.what.clone(),
                r.sent.to_string(),
                r.completed.to_string(),
                r.lost.to_string(),
                format!("{:.0}", r.qps),
                median,
                p99,
                max,
                target,
                pass(ok).to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(header.map(String::from)).chain(lines) {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            let _ = match i {
                0 | 8 | 9 => write!(text, "{cell:<w$}  "),
                _ => write!(text, "{cell:>w$}  "),
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn tap_notes(out: &mut String, label: &str, s: &Samples, expected: &str) {
    if s.unexpected_source > 0 {
        let _ = writeln!(
            out,
            "note: {label}: {} of {} acquires were not {expected}",
            s.unexpected_source,
            s.acquire.len()
        );
    }
    if s.failed > 0 {
        let _ = writeln!(
            out,
            "note: {label}: {} requests failed, e.g. {}",
            s.failed,
            s.errors.join("; ")
        );
    }
}

pub fn render(report: &Report) -> String {
    let a = &report.args;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "banger-bench net: binaries from {}\n\nTAP hand-out: {} timed acquire/release cycles per pool (+{} warm-up), \
         round trips from the client, each daemon in its own network namespace\n",
        report.bin_dir.display(),
        a.runs,
        a.warmup
    );
    out.push_str(&table::render(&report.tap_rows, Columns::WithP99));
    tap_notes(&mut out, "warm pool", &report.warm, "from the pool");
    tap_notes(&mut out, "cold", &report.cold, "created on demand");
    let _ = writeln!(
        out,
        "\nDNS: dnsperf -l {} -q 100 -t 1 over UDP against bangerd's vm. server on {}, {} records, \
         A queries for each in turn; latencies of the answered queries\n",
        a.dns_secs, report.dns_addr, a.dns_records
    );
    out.push_str(&render_dns(&report.dns));
    for run in &report.dns {
        if throttled(run, a.dns_secs) {
            let _ = writeln!(
                out,
                "note: {}: throttled by the server's per-client token bucket ({} q/s, burst {} \
                 per source address; banger_dns::Limits::client_rate, not configurable in \
                 config.toml): {} queries dropped",
                run.what, CLIENT_RATE_QPS, CLIENT_RATE_BURST, run.lost
            );
        } else if run.lost > 0 {
            let _ = writeln!(out, "note: {}: {} queries lost", run.what, run.lost);
        }
    }
    let _ = writeln!(out, "\nDNS daemon {}", report.stopped);
    out
}
