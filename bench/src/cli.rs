//! The `cli` benchmark (the default): starts a real `bangerd` in temporary
//! XDG directories and measures
//!
//! - wall time of the real `banger version` process (spawn, connect,
//!   handshake, `Version` request, reply, exit): median <= 10 ms;
//! - for comparison, the same exchange in-process with the protocol client;
//! - the daemon's idle resident memory after the runs: <= 30 MiB.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;

use crate::args::CliArgs;
use crate::daemon::{BenchDaemon, Stopped};
use crate::measure;
use crate::stats::Summary;
use crate::table::{self, Columns, Row, Target, Value, MIB};

/// Target for the median wall time of `banger version`.
const CLI_MEDIAN_TARGET: Duration = Duration::from_millis(10);
/// Target for the daemon's idle resident memory.
const IDLE_RSS_TARGET: u64 = 30 * MIB;
/// How long the daemon is left alone before its memory is read.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Everything that was measured.
#[derive(Debug)]
pub struct Report {
    bin_dir: PathBuf,
    daemon_pid: u32,
    daemon_version: String,
    runs: u32,
    warmup: u32,
    pub rows: Vec<Row>,
    stopped: Stopped,
}

pub fn run(args: &CliArgs) -> anyhow::Result<Report> {
    let (bin_dir, (rows, daemon_version, daemon_pid, stopped)) =
        crate::run_bench(args.common.bin_dir.as_deref(), |_| async {
            let mut daemon = BenchDaemon::start()?;
            let measured = measure(&daemon, args).await;
            let stopped = daemon.stop();
            let (rows, version) = measured?;
            Ok((rows, version, daemon.pid(), stopped))
        })?;
    Ok(Report {
        bin_dir,
        daemon_pid,
        daemon_version,
        runs: args.runs,
        warmup: args.warmup,
        rows,
        stopped,
    })
}

async fn measure(daemon: &BenchDaemon, args: &CliArgs) -> anyhow::Result<(Vec<Row>, String)> {
    let harness = daemon.harness()?;
    let (runs, warmup) = (args.runs as usize, args.warmup as usize);

    let cli = measure::cli_version(harness, warmup, runs).await?;
    let (in_process, version) =
        measure::in_process_version(&harness.socket(), warmup, runs).await?;

    tokio::time::sleep(IDLE_WAIT).await;
    let memory = measure::memory(daemon.pid())?;

    let summary =
        |samples: &[Duration]| Summary::of(samples).ok_or_else(|| anyhow!("no samples were taken"));
    let rows = vec![
        Row {
            what: "banger version, process wall time".into(),
            value: Value::Timing(summary(&cli)?),
            target: Some(Target::MedianAtMost(CLI_MEDIAN_TARGET)),
        },
        Row {
            what: "connect+handshake+Version, in-process".into(),
            value: Value::Timing(summary(&in_process)?),
            target: None,
        },
        Row {
            what: format!("bangerd idle RSS (VmRSS, {} s idle)", IDLE_WAIT.as_secs()),
            value: Value::Bytes(memory.rss),
            target: Some(Target::BytesAtMost(IDLE_RSS_TARGET)),
        },
        Row {
            what: "bangerd peak RSS (VmHWM)".into(),
            value: Value::Bytes(memory.peak),
            target: None,
        },
    ];
    Ok((rows, version))
}

pub fn render(report: &Report) -> String {
    format!(
        "banger-bench: {} timed runs each (+{} warm-up); binaries from {}\n\
         bangerd {} (pid {}) in temporary XDG dirs\n\n{}\nbangerd {}\n",
        report.runs,
        report.warmup,
        report.bin_dir.display(),
        report.daemon_version,
        report.daemon_pid,
        table::render(&report.rows, Columns::WithP99),
        report.stopped,
    )
}
