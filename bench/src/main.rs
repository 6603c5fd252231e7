//! `banger-bench`: runs a benchmark against real banger binaries and
//! prints a table of results against banger's targets.
//!
//! - `cli` (the default): wall time of the real `banger version` process
//!   and the daemon's idle memory (see [`cli`]);
//! - `pull`: `ImagePull` of a generated multi-layer image from a local
//!   registry, cold and with a warm layer cache, against `skopeo copy` +
//!   `umoci raw unpack` + `mkfs.ext4 -d` (see [`pull`]);
//! - `net`: TAP hand-out from the warm pool and cold, in network
//!   namespaces, and DNS queries per second with dnsperf (see [`net`]);
//! - `vm`: VM create stage by stage, alone and in parallel, and `vm run`
//!   to SSH-ready against a bare QEMU (see [`vm`]).
//!
//! The binaries are taken from the directory of this executable (so
//! `target/release/banger-bench` measures `target/release/banger{,d}`) or
//! from `--bin-dir`. See `docs/benchmarks.md`.

mod args;
mod cli;
mod cpu;
mod daemon;
mod measure;
mod net;
mod pull;
mod stats;
mod table;
mod vm;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;

use crate::args::{Args, Command};
use crate::table::Row;

fn main() -> ExitCode {
    let command = Args::parse().command();
    let fail_on_miss = command.common().fail_on_miss;
    let outcome = match &command {
        Command::Cli(args) => cli::run(args).map(|r| (cli::render(&r), r.rows)),
        Command::Pull(args) => pull::run(args).map(|r| (pull::render(&r), r.rows)),
        Command::Net(args) => net::run(args).map(|r| (net::render(&r), r.rows)),
        Command::Vm(args) => vm::run(args).map(|r| (vm::render(&r), r.rows)),
    };
    match outcome {
        Ok((text, rows)) => {
            print!("{text}");
            if fail_on_miss && rows.iter().any(Row::missed) {
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

/// Finds the binaries (see [`resolve_bin_dir`]), points the `banger-tests`
/// harness at them and runs `bench` on a single-threaded runtime. Ctrl-C
/// drops `bench`, so everything it owns is cleaned up by its `Drop`s.
fn run_bench<T, F>(
    bin_dir: Option<&Path>,
    bench: impl FnOnce(PathBuf) -> F,
) -> anyhow::Result<(PathBuf, T)>
where
    F: Future<Output = anyhow::Result<T>>,
{
    let bin_dir = resolve_bin_dir(bin_dir)?;
    // The harness finds `bangerd` and `banger` through this variable. Set
    // before the runtime exists, while this process has a single thread.
    std::env::set_var("BANGER_BIN_DIR", &bin_dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let out = runtime.block_on(async {
        tokio::select! {
            r = bench(bin_dir.clone()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    })?;
    Ok((bin_dir, out))
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

/// The 1, 5 and 15 minute load averages: timings are only comparable on
/// an otherwise idle machine.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A progress line on stderr (the table goes to stdout).
pub(crate) fn note(text: String) {
    eprintln!("banger-bench: {text}");
}
