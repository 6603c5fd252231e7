//! Logging: `tracing` to stderr (the journal, in service mode) or to
//! `/dev/kmsg` when the agent is PID 1, and a [`RateLimiter`] for every log
//! line the guest (or the host) can trigger at will.
//!
//! Log lines are plain text without colours; in init mode each event is one
//! `write` to `/dev/kmsg`, which makes it one kernel log record on the
//! console.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `kmsg`: write to `/dev/kmsg` (falling
/// back to `/dev/console`, then stderr). Safe to call more than once.
pub fn init(filter: &str, kmsg: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .without_time();
    let result = if kmsg {
        builder.with_writer(KmsgMakeWriter::new()).try_init()
    } else {
        builder.with_writer(io::stderr).try_init()
    };
    // Already installed (a second init after a restart of the init loop).
    drop(result);
}

/// Writes each event as one record to the kernel log.
#[derive(Debug)]
struct KmsgMakeWriter {
    sink: Mutex<Option<File>>,
}

impl KmsgMakeWriter {
    fn new() -> Self {
        KmsgMakeWriter {
            sink: Mutex::new(None),
        }
    }
}

/// One event's text, written on drop.
#[derive(Debug)]
struct KmsgEvent<'a> {
    owner: &'a KmsgMakeWriter,
    buf: Vec<u8>,
}

impl Write for KmsgEvent<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for KmsgEvent<'_> {
    fn drop(&mut self) {
        let mut record = b"banger-agent: ".to_vec();
        record.extend_from_slice(&self.buf);
        if !record.ends_with(b"\n") {
            record.push(b'\n');
        }
        let mut sink = self
            .owner
            .sink
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if sink.is_none() {
            // Reopened each time it is missing: /dev may be mounted after
            // the first log line.
            *sink = OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .or_else(|_| OpenOptions::new().write(true).open("/dev/console"))
                .ok();
        }
        let written = match sink.as_mut() {
            Some(file) => file.write_all(&record).is_ok(),
            None => false,
        };
        if !written {
            *sink = None;
            let _ = io::stderr().write_all(&record);
        }
    }
}

impl<'a> MakeWriter<'a> for KmsgMakeWriter {
    type Writer = KmsgEvent<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        KmsgEvent {
            owner: self,
            buf: Vec::with_capacity(128),
        }
    }
}

/// A fixed-window limiter: at most `burst` lines per `window`; the next
/// allowed line learns how many were suppressed in between.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimiter {
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateLimiter {
            burst,
            window,
            state: Mutex::new(LimiterState {
                window_start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(suppressed)` when a line may be logged now, `None` otherwise.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = match s.window_start {
            Some(start) => now.duration_since(start) >= self.window,
            None => true,
        };
        if fresh {
            s.window_start = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// Logs through a [`RateLimiter`]: `limited!(LIMITER, warn!(...))`.
#[macro_export]
macro_rules! limited {
    ($limiter:expr, $($event:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            if suppressed > 0 {
                ::tracing::warn!(suppressed, "similar log lines were suppressed");
            }
            $($event)+;
        }
    };
}

/// Limiter for lines about malformed or unexpected host input.
pub static HOST_INPUT: RateLimiter = RateLimiter::new(10, Duration::from_secs(10));
/// Limiter for per-request failures (exec, stdin, health).
pub static REQUESTS: RateLimiter = RateLimiter::new(20, Duration::from_secs(10));
/// Limiter for transport trouble (serial reconnects, accept errors).
pub static TRANSPORT: RateLimiter = RateLimiter::new(5, Duration::from_secs(30));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_counts_what_it_drops() {
        let lim = RateLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(lim.allow_at(t0), Some(0));
        assert_eq!(lim.allow_at(t0), Some(0));
        assert_eq!(lim.allow_at(t0), None);
        assert_eq!(lim.allow_at(t0 + Duration::from_secs(1)), None);
        // A new window: the first line learns of the two it replaced.
        assert_eq!(lim.allow_at(t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(lim.allow_at(t0 + Duration::from_secs(11)), Some(0));
    }
}
