//! Logging: JSON lines to a file in the state dir (read back by `banger
//! daemon logs`) and human-readable lines on stderr.

use std::io::IsTerminal;
use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

/// Installs the global subscriber. Keep the guard until exit: dropping it
/// flushes the file writer.
pub fn init(log_file: &Path, level: &str) -> anyhow::Result<WorkerGuard> {
    let dir = log_file
        .parent()
        .ok_or_else(|| anyhow::anyhow!("log path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    let name = log_file
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("log path has no file name"))?;
    let appender = tracing_appender::rolling::never(dir, name);
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = || {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        quiet_hickory(filter)
    };
    tracing_subscriber::registry()
        .with(
            fmt::layer()
                .json()
                .with_writer(writer)
                .with_current_span(true)
                .with_span_list(false)
                .with_filter(filter()),
        )
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_filter(filter()),
        )
        .try_init()?;
    Ok(guard)
}

/// hickory-server (the DNS server, `banger-dns`) logs every response at
/// `info` and every request at `debug`: keep its target at `warn` unless
/// the filter names it.
fn quiet_hickory(filter: EnvFilter) -> EnvFilter {
    if filter.to_string().contains("hickory") {
        return filter;
    }
    match "hickory_server=warn".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}
