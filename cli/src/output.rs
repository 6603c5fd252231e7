//! Printing: aligned text tables, JSON documents, and the human forms of
//! durations, sizes and timestamps that every command shares.

use serde::Serialize;

use crate::error::CliError;
use crate::outln;

/// Prints `value` as one pretty JSON document on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::with_source("cannot encode JSON output", &e))?;
    outln!("{text}")
}

/// Prints `value` as one compact JSON line on stdout (for streams).
pub fn print_json_line<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string(value)
        .map_err(|e| CliError::with_source("cannot encode JSON output", &e))?;
    outln!("{text}")
}

/// A text table: a header row and left-aligned columns two spaces apart.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().take(columns).enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) -> Result<(), CliError> {
        let text = self.render();
        outln!("{}", text.trim_end_matches('\n'))
    }
}

/// A duration for people, to the second past one minute: `850ms`, `42s`,
/// `3m12s`, `2h5m`, `3d4h`.
pub fn human_duration_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, hours, mins, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{mins}m")
    } else if mins > 0 {
        format!("{mins}m{s}s")
    } else if secs > 0 {
        format!("{secs}s")
    } else {
        format!("{ms}ms")
    }
}

/// A short elapsed time with tenths of a second under a minute: `200ms`,
/// `1.2s`, then as [`human_duration_ms`].
pub fn human_elapsed_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, ms % 1000 / 100)
    } else {
        human_duration_ms(ms)
    }
}

/// A size in binary units: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_utc_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm for the proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration_ms(0), "0ms");
        assert_eq!(human_duration_ms(850), "850ms");
        assert_eq!(human_duration_ms(42_300), "42s");
        assert_eq!(human_duration_ms(192_000), "3m12s");
        assert_eq!(
            human_duration_ms(3_600_000 * 2 + 5 * 60_000 + 7_000),
            "2h5m"
        );
        assert_eq!(human_duration_ms(86_400_000 * 3 + 3_600_000 * 4), "3d4h");
    }

    #[test]
    fn elapsed() {
        assert_eq!(human_elapsed_ms(200), "200ms");
        assert_eq!(human_elapsed_ms(1_249), "1.2s");
        assert_eq!(human_elapsed_ms(59_999), "59.9s");
        assert_eq!(human_elapsed_ms(61_000), "1m1s");
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 * 1024 * 1024), "20.0 MiB");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_utc_ms(1_714_565_045_007),
            "2024-05-01T12:04:05.007Z"
        );
    }

    #[test]
    fn table_aligns_columns_and_trims() {
        let mut t = Table::new(&["NAME", "ID", "STATUS"]);
        t.row(vec!["supervisor".into(), "0.1".into(), "running".into()]);
        t.row(vec!["vm".into(), "-".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME        ID   STATUS\nsupervisor  0.1  running\nvm          -\n"
        );
    }

    #[test]
    fn empty_table_is_just_the_header() {
        assert_eq!(Table::new(&["A", "BB"]).render(), "A  BB\n");
    }
}
