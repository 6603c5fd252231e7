//! The `net` benchmark: host networking and DNS through real daemons.
//!
//! - TAP hand-out (see [`taps`]): `TapAcquire` + `TapRelease` round trips
//!   from the client, from the warm pool (target: acquire median <= 1 ms)
//!   and cold (`pool_size = 0`, a TAP created for every acquire). Each
//!   daemon runs in a network namespace of its own, so this needs root;
//!   nothing is created on the host.
//! - DNS: a daemon holding `--dns-records` records (`bench-000.vm`, ...),
//!   its `vm.` server on loopback asked for them, type A:
//!   - the load generator ([`loadgen`]): one thread, `--dns-sources`
//!     addresses (127.0.0.2, ...), paced at `--dns-rate` (50 000 q/s): the
//!     open-loop run; then unpaced with `--dns-window` queries
//!     outstanding from at least [`UNPACED_SOURCES`] addresses (closed
//!     loop, as dnsperf measures), for the server's capacity. Both are
//!     judged: >= [`DNS_QPS_TARGET`] correct answers/s with p99 <
//!     [`DNS_P99_TARGET`] and nothing lost;
//!   - for comparison, `dnsperf` ([`dnsperf`], if installed and not
//!     `--no-dnsperf`): one client address as fast as it goes (held back
//!     by the server's per-client token bucket, [`CLIENT_RATE_QPS`]), the
//!     same paced at [`PACED_QPS`], `--dns-sources` processes at once as
//!     fast as they go, and those paced to `--dns-rate` in all.
//!
//! Daemons and namespaces are removed at the end, also on error and Ctrl-C
//! (their `Drop`s).

mod dnsperf;
mod loadgen;
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
    dns: Vec<DnsRun>,
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

/// One DNS run, from the load generator or dnsperf, as the table shows it.
#[derive(Debug, Clone)]
pub struct DnsRun {
    what: String,
    sent: u64,
    answered: u64,
    lost: u64,
    /// Wrong answers (the generator's checks; dnsperf: not NOERROR).
    errors: u64,
    qps: f64,
    latency: Option<Summary>,
    /// The run the targets are judged on.
    target: bool,
    notes: Vec<String>,
}

/// A daemon with `--dns-records` records, then the load generator and
/// dnsperf against it.
async fn measure_dns(args: &NetArgs) -> anyhow::Result<(SocketAddr, Vec<DnsRun>, Stopped)> {
    let mut daemon = BenchDaemon::start()?;
    let measured = dns_runs(&daemon, args).await;
    let stopped = daemon.stop();
    let (addr, runs) = measured?;
    Ok((addr, runs, stopped))
}

async fn dns_runs(
    daemon: &BenchDaemon,
    args: &NetArgs,
) -> anyhow::Result<(SocketAddr, Vec<DnsRun>)> {
    let harness = daemon.harness()?;
    let mut client = Client::connect(&harness.socket())
        .await
        .map_err(|e| anyhow!("cannot connect: {}", error_chain(&e)))?;
    let records: Vec<(String, Ipv4Addr)> = (0..args.dns_records)
        .map(|i| {
            let ip = Ipv4Addr::new(172, 30, (i / 250) as u8, (i % 250 + 2) as u8);
            (format!("bench-{i:03}"), ip)
        })
        .collect();
    for (name, ip) in &records {
        match client
            .request(Request::DnsAdd {
                name: name.clone(),
                ip: *ip,
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
    let SocketAddr::V4(addr4) = addr else {
        bail!("the DNS server listens on {addr}, not IPv4");
    };
    let sources: Vec<Ipv4Addr> = (0..args.dns_sources)
        .map(|i| Ipv4Addr::new(127, 0, 0, (i + 2) as u8))
        .collect();
    let last = sources.len() + 1;
    let mut runs = Vec::new();

    // The load generator: the target rate, then as fast as it goes (from
    // more addresses, so that the per-client limit stays out of the way).
    let unpaced_sources: Vec<Ipv4Addr> = (0..sources.len().max(UNPACED_SOURCES))
        .map(|i| Ipv4Addr::new(127, 0, 0, (i + 2) as u8))
        .collect();
    for rate in [Some(args.dns_rate), None] {
        let srcs = if rate.is_some() {
            &sources
        } else {
            &unpaced_sources
        };
        let cfg = loadgen::Config {
            server: addr4,
            sources: srcs.clone(),
            records: records.clone(),
            rate,
            window: args.dns_window as usize,
            tick: Duration::from_micros(args.dns_tick_us.into()),
            warmup: Duration::from_secs(args.dns_warmup_secs.into()),
            duration: Duration::from_secs(args.dns_secs.into()),
            timeout: LOADGEN_TIMEOUT,
            observe: Some(daemon.pid()),
        };
        crate::note(format!(
            "DNS load generator, {}, {} s (+{} s warm-up)",
            match rate {
                Some(r) => format!("{r} q/s"),
                None => format!("unpaced, {} outstanding", args.dns_window),
            },
            args.dns_secs,
            args.dns_warmup_secs
        ));
        let out = tokio::task::spawn_blocking(move || loadgen::run(&cfg))
            .await
            .map_err(|e| anyhow!("the load generator failed: {e}"))??;
        let what = match rate {
            Some(r) => format!(
                "loadgen, {} sources (127.0.0.2-{last}), {r} q/s",
                sources.len()
            ),
            None => format!(
                "loadgen, {} sources (127.0.0.2-{}), unpaced, {} outstanding",
                srcs.len(),
                srcs.len() + 1,
                args.dns_window
            ),
        };
        // Both are judged: paced (open loop: queries go out on schedule
        // whatever the answers do, the stricter test) and unpaced with a
        // fixed number outstanding (closed loop, how dnsperf measures).
        runs.push(loadgen_run(what, true, &out));
    }

    if args.no_dnsperf {
        return Ok((addr, runs));
    }
    if which_dnsperf().is_none() {
        crate::note(
            "dnsperf is not installed: no comparison runs (apt-get install -y dnsperf)".into(),
        );
        return Ok((addr, runs));
    }
    let dir = tempfile::tempdir().context("temp dir")?;
    let queries = dir.path().join("queries.txt");
    let names: Vec<String> = records.iter().map(|(n, _)| n.clone()).collect();
    std::fs::write(&queries, dnsperf::query_file(&names)).context("write the query file")?;
    let one = ["127.0.0.1".to_string()];
    let many: Vec<String> = sources.iter().map(Ipv4Addr::to_string).collect();
    let secs = args.dns_secs;
    let mut perf = Vec::new();
    crate::note("dnsperf comparison runs".into());
    perf.push(
        dnsperf::run(
            "dnsperf, 1 client (127.0.0.1)",
            addr,
            &queries,
            &one,
            secs,
            None,
        )
        .await?,
    );
    let paced = format!("dnsperf, 1 client (127.0.0.1), {PACED_QPS} q/s");
    perf.push(dnsperf::run(&paced, addr, &queries, &one, secs, Some(PACED_QPS)).await?);
    let what = format!("dnsperf, {} clients (127.0.0.2-{last})", many.len());
    perf.push(dnsperf::run(&what, addr, &queries, &many, secs, None).await?);
    // The target rate offered by all the sources together (a little over,
    // as dnsperf holds each to its -Q).
    let n = many.len().max(1) as u32;
    let per_source = args.dns_rate.div_ceil(n) + 50;
    let what = format!(
        "dnsperf, {} clients, {} q/s in all",
        many.len(),
        per_source * n
    );
    perf.push(dnsperf::run(&what, addr, &queries, &many, secs, Some(per_source)).await?);
    runs.extend(perf.iter().map(|r| dnsperf_run(r, secs)));
    Ok((addr, runs))
}

/// Source addresses of the unpaced load-generator run at least: their
/// token buckets together (10 000 q/s each) allow far more than the server
/// answers.
const UNPACED_SOURCES: usize = 32;

/// How long the load generator waits for an answer before counting the
/// query lost.
const LOADGEN_TIMEOUT: Duration = Duration::from_secs(1);

fn which_dnsperf() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("dnsperf"))
            .find(|p| p.is_file())
    })
}

fn loadgen_run(what: String, target: bool, o: &loadgen::Outcome) -> DnsRun {
    let mut notes = Vec::new();
    let wall = o.wall.as_secs_f64().max(1e-9);
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / wall;
    let mut cpu = format!("generator thread {:.0} % of a core", pct(o.own_cpu));
    if let Some(d) = o.observed_cpu {
        let _ = write!(cpu, ", bangerd {:.0} %", pct(d));
    }
    if target {
        let _ = write!(
            cpu,
            "; sends at most {} behind the schedule",
            fmt_duration(o.max_lag)
        );
    }
    notes.push(cpu);
    notes.push(format!(
        "load average after the run: {}",
        crate::load_average()
    ));
    if o.late > 0 {
        notes.push(format!(
            "{} answers came after their query was counted lost",
            o.late
        ));
    }
    if let Some(e) = &o.first_error {
        notes.push(format!("first error: {e}"));
    }
    DnsRun {
        what,
        sent: o.sent,
        answered: o.answered,
        lost: o.lost,
        errors: o.errors,
        qps: o.qps,
        latency: Summary::of(&o.latencies),
        target,
        notes,
    }
}

fn dnsperf_run(run: &Run, secs: u32) -> DnsRun {
    let mut notes = Vec::new();
    if throttled(run, secs) {
        notes.push(format!(
            "throttled by the server's per-client token bucket ({CLIENT_RATE_QPS} q/s, burst \
             {CLIENT_RATE_BURST} per source address; banger_dns::Limits::client_rate, not \
             configurable in config.toml): {} queries dropped",
            run.lost
        ));
    }
    DnsRun {
        what: run.what.clone(),
        sent: run.sent,
        answered: run.noerror,
        lost: run.lost,
        errors: run.completed - run.noerror.min(run.completed),
        qps: run.qps,
        latency: run.latency,
        target: false,
        notes,
    }
}

/// Whether a run was held back by the per-client limit: queries were
/// dropped and no address got more than the bucket allows.
fn throttled(run: &Run, secs: u32) -> bool {
    let allowed =
        f64::from(CLIENT_RATE_QPS) + f64::from(CLIENT_RATE_BURST) / f64::from(secs.max(1));
    run.lost > 0 && run.qps / run.sources.max(1) as f64 <= allowed * 1.05
}

/// Verdicts of the target run: the rate, the p99, and nothing lost or
/// wrong.
fn dns_verdicts(run: &DnsRun) -> Vec<Row> {
    if !run.target {
        return Vec::new();
    }
    let mut rows = vec![Row {
        what: format!("DNS q/s / target, {}", run.what),
        value: Value::Ratio(run.qps / DNS_QPS_TARGET),
        target: Some(Target::RatioAtLeast(1.0)),
    }];
    rows.push(Row {
        what: format!("DNS p99 / target, {}", run.what),
        value: Value::Ratio(run.latency.map_or(f64::INFINITY, |l| {
            l.p99.as_secs_f64() / DNS_P99_TARGET.as_secs_f64()
        })),
        target: Some(Target::RatioAtMost(1.0)),
    });
    rows.push(Row {
        what: format!("DNS lost+wrong / sent, {}", run.what),
        value: Value::Ratio((run.lost + run.errors) as f64 / run.sent.max(1) as f64),
        target: Some(Target::RatioAtMost(0.0)),
    });
    rows
}

fn met(run: &DnsRun) -> bool {
    run.qps >= DNS_QPS_TARGET
        && run.latency.is_some_and(|s| s.p99 < DNS_P99_TARGET)
        && run.lost == 0
        && run.errors == 0
        && run.sent > 0
}

fn render_dns(runs: &[DnsRun]) -> String {
    let header = [
        "what", "sent", "answered", "lost", "errors", "q/s", "median", "p99", "max", "target",
        "result",
    ];
    let lines: Vec<[String; 11]> = runs
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
            let (target, result) = if r.target {
                (
                    format!(
                        ">= {DNS_QPS_TARGET:.0} q/s, p99 < {}, none lost",
                        fmt_duration(DNS_P99_TARGET)
                    ),
                    if met(r) { "PASS" } else { "MISS" },
                )
            } else {
                ("(comparison)".to_string(), "-")
            };
            [
                r.what.clone(),
                r.sent.to_string(),
                r.answered.to_string(),
                r.lost.to_string(),
                r.errors.to_string(),
                format!("{:.0}", r.qps),
                median,
                p99,
                max,
                target,
                result.to_string(),
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
                0 | 9 | 10 => write!(text, "{cell:<w$}  "),
                _ => write!(text, "{cell:>w$}  "),
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn note_says_throttled(run: &DnsRun) -> bool {
    run.notes.iter().any(|n| n.starts_with("throttled"))
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
        "\nDNS: bangerd's vm. server on {}, {} records; A queries for each in turn over UDP. \
         loadgen: one thread, {} source addresses, paced in {} µs steps, {} s timed after {} s \
         warm-up, lost after {}; \
         dnsperf -l {} -q 100 -t 1 for comparison\n",
        report.dns_addr,
        a.dns_records,
        a.dns_sources,
        a.dns_tick_us,
        a.dns_secs,
        a.dns_warmup_secs,
        fmt_duration(LOADGEN_TIMEOUT),
        a.dns_secs,
    );
    out.push_str(&render_dns(&report.dns));
    for run in &report.dns {
        for note in &run.notes {
            let _ = writeln!(out, "note: {}: {note}", run.what);
        }
        if run.lost > 0 && !note_says_throttled(run) {
            let _ = writeln!(out, "note: {}: {} queries lost", run.what, run.lost);
        }
    }
    let _ = writeln!(out, "\nDNS daemon {}", report.stopped);
    out
}
