//! `banger-bench`: starts a real `bangerd` in temporary XDG directories,
//! measures it and prints a table of results against banger's targets:
//!
//! - wall time of the real `banger version` process (spawn, connect,
//!   handshake, `Version` request, reply, exit): median <= 10 ms;
//! - for comparison, the same exchange in-process with the protocol client;
//! - the daemon's idle resident memory after the runs: <= 30 MiB.
//!
//! The binaries are taken from the directory of this executable (so
//! `target/release/banger-bench` measures `target/release/banger{,d}`) or
//! from `--bin-dir`. See `docs/benchmarks.md`.

mod daemon;
mod measure;
mod stats;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;

use crate::daemon::{BenchDaemon, Stopped};
use crate::stats::Summary;
use crate::table::{Row, Target, Value, MIB};

/// Target for the median wall time of `banger version`.
const CLI_MEDIAN_TARGET: Duration = Duration::from_millis(10);
/// Target for the daemon's idle resident memory.
const IDLE_RSS_TARGET: u64 = 30 * MIB;
/// How long the daemon is left alone before its memory is read.
const IDLE_WAIT: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(
    name = "banger-bench",
    about = "Measures banger against its performance targets"
)]
struct Args {
    /// Timed runs of each measurement.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Untimed runs before each measurement (page cache, socket paths).
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Directory holding `banger` and `bangerd` [default: this executable's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    fail_on_miss: bool,
}

/// Everything that was measured.
#[derive(Debug)]
struct Report {
    bin_dir: PathBuf,
    daemon_pid: u32,
    daemon_version: String,
    runs: u32,
    warmup: u32,
    rows: Vec<Row>,
    stopped: Stopped,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            print!("{}", render(&report));
            if args.fail_on_miss && report.rows.iter().any(Row::missed) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("banger-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    let bin_dir = resolve_bin_dir(args.bin_dir.as_deref())?;
    // The harness finds `bangerd` and `banger` through this variable. Set
    // before the runtime exists, while this process has a single thread.
    std::env::set_var("BANGER_BIN_DIR", &bin_dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut daemon = BenchDaemon::start()?;
        let measured = tokio::select! {
            r = measure(&daemon, args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        let stopped = daemon.stop();
        let (rows, daemon_version) = measured?;
        Ok(Report {
            bin_dir,
            daemon_pid: daemon.pid(),
            daemon_version,
            runs: args.runs,
            warmup: args.warmup,
            rows,
            stopped,
        })
    })
}

/// `--bin-dir`, or the directory of this executable; it must hold both binaries.
fn resolve_bin_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match flag {
        Some(dir) => dir.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .ok_or_else(|| anyhow!("this executable has no parent directory"))?
            .to_path_buf(),
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("bin dir {}", dir.display()))?;
    for bin in ["banger", "bangerd"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{bin} not found in {}: build it first (cargo build --release --workspace) \
                 or pass --bin-dir",
                dir.display()
            );
        }
    }
    Ok(dir)
}

async fn measure(daemon: &BenchDaemon, args: &Args) -> anyhow::Result<(Vec<Row>, String)> {
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

fn render(report: &Report) -> String {
    format!(
        "banger-bench: {} timed runs each (+{} warm-up); binaries from {}\n\
         bangerd {} (pid {}) in temporary XDG dirs\n\n{}\nbangerd {}\n",
        report.runs,
        report.warmup,
        report.bin_dir.display(),
        report.daemon_version,
        report.daemon_pid,
        table::render(&report.rows),
        report.stopped,
    )
}
