//! The benchmark's results as rows with targets, and their rendering as a
//! plain-text table.

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::Summary;

pub const MIB: u64 = 1 << 20;

/// What a row measured.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Timing(Summary),
    Bytes(u64),
    /// A ratio of two medians, shown in the median column.
    Ratio(f64),
    /// A relative difference of two medians in percent (`+4.2 %` means
    /// 4.2 % slower), shown in the median column.
    Percent(f64),
}

/// The bound a row must meet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    MedianAtMost(Duration),
    BytesAtMost(u64),
    RatioAtLeast(f64),
    RatioAtMost(f64),
    PercentAtMost(f64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::MedianAtMost(d) => format!("median <= {}", fmt_duration(d)),
            Target::BytesAtMost(b) => format!("<= {}", fmt_bytes(b)),
            Target::RatioAtLeast(r) => format!(">= {}", fmt_ratio(r)),
            Target::RatioAtMost(r) => format!("<= {}", fmt_ratio(r)),
            Target::PercentAtMost(p) => format!("<= {}", fmt_percent(p)),
        }
    }

    /// Whether `value` meets this target (`None` if they do not fit together).
    pub fn met_by(self, value: &Value) -> Option<bool> {
        match (self, value) {
            (Target::MedianAtMost(max), Value::Timing(s)) => Some(s.median <= max),
            (Target::BytesAtMost(max), Value::Bytes(b)) => Some(*b <= max),
            (Target::RatioAtLeast(min), Value::Ratio(r)) => Some(*r >= min),
            (Target::RatioAtMost(max), Value::Ratio(r)) => Some(*r <= max),
            (Target::PercentAtMost(max), Value::Percent(p)) => Some(*p <= max),
            _ => None,
        }
    }
}

/// One line of the table. A row without a target is shown for comparison.
#[derive(Debug, Clone, PartialEq)]
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
/// The tail column: p99, or p90 with [`Columns::WithP90`].
const TAIL: usize = 3;

/// Which columns a table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    WithP99,
    /// p90 in place of p99: for tens of runs, where p99 is the max.
    WithP90,
    /// For a handful of runs, where p99 is just the max.
    WithoutP99,
}

/// Renders rows as an aligned table with a header line.
pub fn render(rows: &[Row], columns: Columns) -> String {
    let lines: Vec<[String; 7]> = rows.iter().map(|r| cells(r, columns)).collect();
    let mut header = HEADER.map(String::from);
    if columns == Columns::WithP90 {
        header[TAIL] = "p90".into();
    }
    let mut widths = header.each_ref().map(|h| h.len());
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&lines) {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            if i == TAIL && columns == Columns::WithoutP99 {
                continue;
            }
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

fn cells(row: &Row, columns: Columns) -> [String; 7] {
    let (min, median, tail, max) = match &row.value {
        Value::Timing(s) => (
            fmt_duration(s.min),
            fmt_duration(s.median),
            fmt_duration(if columns == Columns::WithP90 {
                s.p90
            } else {
                s.p99
            }),
            fmt_duration(s.max),
        ),
        Value::Bytes(b) => (String::new(), fmt_bytes(*b), String::new(), String::new()),
        Value::Ratio(r) => (String::new(), fmt_ratio(*r), String::new(), String::new()),
        Value::Percent(p) => (String::new(), fmt_percent(*p), String::new(), String::new()),
    };
    let target = row
        .target
        .map(Target::describe)
        .unwrap_or_else(|| "(comparison)".into());
    [
        row.what.clone(),
        min,
        median,
        tail,
        max,
        target,
        row.result().into(),
    ]
}

pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

pub fn fmt_bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

pub fn fmt_ratio(r: f64) -> String {
    format!("{r:.2}x")
}

/// A signed percentage: `+4.2 %`, `-0.8 %`.
pub fn fmt_percent(p: f64) -> String {
    format!("{p:+.1} %")
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
            p90: d,
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
        let faster = Target::RatioAtLeast(1.5);
        assert_eq!(row(Value::Ratio(1.5), Some(faster)).result(), "PASS");
        assert_eq!(row(Value::Ratio(1.49), Some(faster)).result(), "MISS");
        let slower = Target::RatioAtMost(1.2);
        assert_eq!(row(Value::Ratio(1.2), Some(slower)).result(), "PASS");
        assert_eq!(row(Value::Ratio(1.21), Some(slower)).result(), "MISS");
        assert_eq!(row(timing(1), Some(slower)).result(), "-");
        let overhead = Target::PercentAtMost(5.0);
        assert_eq!(row(Value::Percent(5.0), Some(overhead)).result(), "PASS");
        assert_eq!(row(Value::Percent(-3.0), Some(overhead)).result(), "PASS");
        assert_eq!(row(Value::Percent(5.1), Some(overhead)).result(), "MISS");
        assert_eq!(row(Value::Ratio(1.0), Some(overhead)).result(), "-");
    }

    #[test]
    fn durations_switch_units() {
        assert_eq!(fmt_duration(Duration::from_micros(2_440)), "2.44 ms");
        assert_eq!(fmt_duration(Duration::from_micros(123_450)), "123.5 ms");
        assert_eq!(fmt_duration(Duration::from_millis(4_321)), "4.32 s");
        assert_eq!(fmt_ratio(1.5), "1.50x");
        assert_eq!(fmt_percent(4.24), "+4.2 %");
        assert_eq!(fmt_percent(-0.84), "-0.8 %");
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
                    p90: ms(1_500),
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
        let text = render(&rows, Columns::WithP99);
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

        let text = render(&rows, Columns::WithoutP99);
        assert!(!text.contains("p99") && !text.contains("2.00 ms"), "{text}");
        assert!(
            text.lines().nth(1).is_some_and(|l| l.contains("3.00 ms")),
            "{text}"
        );

        // p90 in place of p99, under its own header.
        let text = render(&rows, Columns::WithP90);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("p90") && !lines[0].contains("p99"),
            "{text}"
        );
        assert!(
            lines[1].contains("1.50 ms") && !lines[1].contains("2.00 ms"),
            "{text}"
        );
        assert_eq!(end(lines[0], "p90"), end(lines[1], "1.50 ms"));
    }
}
