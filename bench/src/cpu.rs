//! CPU time (user + system) of processes, from `/proc/<pid>/stat`: of a
//! process's own threads, and of the children it has waited for. The pull
//! benchmark uses it to tell work from waiting: the daemon's (with the
//! `mkfs.ext4` and `debugfs` it runs) and the peer tools' (children of this
//! process).

use std::time::Duration;

use anyhow::{anyhow, Context as _};

/// CPU time consumed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// The process's own threads.
    pub own: Duration,
    /// Its children that have exited and been waited for.
    pub children: Duration,
}

impl CpuTimes {
    pub fn total(&self) -> Duration {
        self.own + self.children
    }

    /// The time consumed since `earlier`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            own: self.own.saturating_sub(earlier.own),
            children: self.children.saturating_sub(earlier.children),
        }
    }
}

/// The CPU times of process `pid`.
pub fn of(pid: u32) -> anyhow::Result<CpuTimes> {
    read(&format!("/proc/{pid}/stat"))
}

/// The CPU times of this process (`children`: the tools it has run).
pub fn of_self() -> anyhow::Result<CpuTimes> {
    read("/proc/self/stat")
}

fn read(path: &str) -> anyhow::Result<CpuTimes> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let [utime, stime, cutime, cstime] =
        parse_ticks(&stat).ok_or_else(|| anyhow!("cannot parse {path}: {stat}"))?;
    let ns = tick_ns();
    Ok(CpuTimes {
        own: Duration::from_nanos((utime + stime).saturating_mul(ns)),
        children: Duration::from_nanos((cutime + cstime).saturating_mul(ns)),
    })
}

/// `utime`, `stime`, `cutime`, `cstime` (fields 14-17), in clock ticks.
fn parse_ticks(stat: &str) -> Option<[u64; 4]> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: count fields from the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some([field(14)?, field(15)?, field(16)?, field(17)?])
}

/// One clock tick in nanoseconds (`sysconf(_SC_CLK_TCK)`: 100 Hz on Linux).
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    1_000_000_000 / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_from_the_command_name() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    150 30 7 3 20 0 12 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_ticks(stat), Some([150, 30, 7, 3]));
        assert_eq!(parse_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_ticks("no parenthesis"), None);
    }

    #[test]
    fn own_cpu_time_grows_and_children_are_counted() {
        let before = of_self().expect("own stat");
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let after = of_self().expect("own stat");
        assert!(
            after.since(&before).own > Duration::ZERO,
            "{before:?} {after:?}"
        );
        assert_eq!(
            of(std::process::id()).map(|c| c.own > Duration::ZERO).ok(),
            Some(true)
        );
        let d = CpuTimes {
            own: Duration::from_millis(5),
            children: Duration::from_millis(7),
        };
        assert_eq!(d.total(), Duration::from_millis(12));
        assert_eq!(d.since(&d), CpuTimes::default());
    }
}
