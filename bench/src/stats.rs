//! Order statistics over a set of timed runs.

use std::time::Duration;

/// min / median / p90 / p99 / max of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub runs: usize,
    pub min: Duration,
    pub median: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples`; `None` if there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        Some(Self {
            runs: sorted.len(),
            min,
            median: median(&sorted),
            p90: percentile(&sorted, 90),
            p99: percentile(&sorted, 99),
            max,
        })
    }
}

/// The median of sorted samples (the mean of the middle two for an even count).
fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

/// The `p`th percentile of non-empty sorted samples, nearest-rank method:
/// the smallest sample with at least `p`% of the samples at or below it.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn odd_and_even_medians() {
        let s = Summary::of(&ms(&[5, 1, 3])).expect("samples");
        assert_eq!(s.median, Duration::from_millis(3));
        assert_eq!(
            (s.min, s.max),
            (Duration::from_millis(1), Duration::from_millis(5))
        );
        let s = Summary::of(&ms(&[4, 1, 2, 3])).expect("samples");
        assert_eq!(s.median, Duration::from_micros(2500));
        assert_eq!(s.runs, 4);
    }

    #[test]
    fn p99_is_nearest_rank() {
        // 1..=200 ms: the 99th percentile by nearest rank is the 198th value.
        let samples: Vec<u64> = (1..=200).rev().collect();
        let s = Summary::of(&ms(&samples)).expect("samples");
        assert_eq!(s.p99, Duration::from_millis(198));
        assert_eq!(s.p90, Duration::from_millis(180));
        // With fewer than 100 samples p99 is the maximum.
        let s = Summary::of(&ms(&[1, 2, 3, 50])).expect("samples");
        assert_eq!(s.p99, Duration::from_millis(50));
        // p90 of 10 samples is the 9th, of 3 it is the max.
        let s = Summary::of(&ms(&[10, 9, 8, 7, 6, 5, 4, 3, 2, 1])).expect("samples");
        assert_eq!(s.p90, Duration::from_millis(9));
        let s = Summary::of(&ms(&[3, 1, 2])).expect("samples");
        assert_eq!(s.p90, Duration::from_millis(3));
        // One sample is every percentile.
        let s = Summary::of(&ms(&[7])).expect("samples");
        assert_eq!(
            (s.min, s.median, s.p90, s.p99, s.max),
            (s.min, s.min, s.min, s.min, s.min)
        );
        assert_eq!(s.median, Duration::from_millis(7));
    }
}
