//! The benchmark's results as rows with targets, and their rendering as a
//! plain-text table.

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::Summary;

pub const MIB: u64 = 1 << 20;

/// What a row measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Timing(Summary),
    Bytes(u64),
}

/// The bound a row must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    MedianAtMost(Duration),
    BytesAtMost(u64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::MedianAtMost(d) => format!("median <= {}", fmt_duration(d)),
            Target::BytesAtMost(b) => format!("<= {}", fmt_bytes(b)),
        }
    }

    /// Whether `value` meets this target (`None` if they do not fit together).
    pub fn met_by(self, value: &Value) -> Option<bool> {
        match (self, value) {
            (Target::MedianAtMost(max), Value::Timing(s)) => Some(s.median <= max),
            (Target::BytesAtMost(max), Value::Bytes(b)) => Some(*b <= max),
            _ => None,
        }
    }
}

/// One line of the table. A row without a target is shown for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub what: String,
    pub value: Value,
    pub target: Option<Target>,
}

impl Row {
    /// `PASS`, `MISS`, or `-` for a comparison row.
    pub fn result(&self) -> &'static str {
        match self.target.and_then(|t| t.met_by(&self.value)) {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "-",
        }
    }

    pub fn missed(&self) -> bool {
        self.result() == "MISS"
    }
}

const HEADER: [&str; 7] = ["what", "min", "median", "p99", "max", "target", "result"];

/// Renders rows as an aligned table with a header line.
pub fn render(rows: &[Row]) -> String {
    let lines: Vec<[String; 7]> = rows.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADER.map(String::from);
    for line in std::iter::once(&header).chain(&lines) {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            // Text columns align left, numbers right.
            let _ = match i {
                0 | 5 | 6 => write!(text, "{cell:<w$}  "),
                _ => write!(text, "{cell:>w$}  "),
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn cells(row: &Row) -> [String; 7] {
    let (min, median, p99, max) = match &row.value {
        Value::Timing(s) => (
            fmt_duration(s.min),
            fmt_duration(s.median),
            fmt_duration(s.p99),
            fmt_duration(s.max),
        ),
        Value::Bytes(b) => (String::new(), fmt_bytes(*b), String::new(), String::new()),
    };
    let target = row
        .target
        .map(Target::describe)
        .unwrap_or_else(|| "(comparison)".into());
    [
        row.what.clone(),
        min,
        median,
        p99,
        max,
        target,
        row.result().into(),
    ]
}

pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

pub fn fmt_bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(median_us: u64) -> Value {
        let d = Duration::from_micros(median_us);
        Value::Timing(Summary {
            runs: 1,
            min: d,
            median: d,
            p99: d,
            max: d,
        })
    }

    #[test]
    fn targets_decide_pass_and_miss() {
        let ten_ms = Target::MedianAtMost(Duration::from_millis(10));
        let row = |value, target| Row {
            what: "x".into(),
            value,
            target,
        };
        assert_eq!(row(timing(9_999), Some(ten_ms)).result(), "PASS");
        assert_eq!(row(timing(10_000), Some(ten_ms)).result(), "PASS");
        assert_eq!(row(timing(10_001), Some(ten_ms)).result(), "MISS");
        assert!(row(timing(10_001), Some(ten_ms)).missed());
        let rss = Target::BytesAtMost(30 * MIB);
        assert_eq!(row(Value::Bytes(12 * MIB), Some(rss)).result(), "PASS");
        assert_eq!(row(Value::Bytes(31 * MIB), Some(rss)).result(), "MISS");
        assert_eq!(row(timing(1), None).result(), "-");
        // A target of the wrong kind is not a verdict.
        assert_eq!(row(Value::Bytes(1), Some(ten_ms)).result(), "-");
    }

    #[test]
    fn table_is_aligned() {
        let ms = Duration::from_micros;
        let rows = vec![
            Row {
                what: "banger version".into(),
                value: Value::Timing(Summary {
                    runs: 3,
                    min: ms(1_000),
                    median: ms(1_234),
                    p99: ms(2_000),
                    max: ms(3_000),
                }),
                target: Some(Target::MedianAtMost(Duration::from_millis(10))),
            },
            Row {
                what: "idle RSS".into(),
                value: Value::Bytes(12 * MIB),
                target: None,
            },
        ];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("what"));
        assert!(
            lines[1].contains("1.23 ms") && lines[1].ends_with("PASS"),
            "{text}"
        );
        assert!(lines[1].contains("median <= 10.0 ms"), "{text}");
        assert!(
            lines[2].contains("12.0 MiB") && lines[2].ends_with('-'),
            "{text}"
        );
        // The median column ends at the same place on every line.
        let end = |l: &str, s: &str| l.find(s).map(|i| i + s.len());
        assert_eq!(end(lines[0], "median"), end(lines[1], "1.23 ms"));
        assert_eq!(end(lines[0], "median"), end(lines[2], "12.0 MiB"));
    }
}
