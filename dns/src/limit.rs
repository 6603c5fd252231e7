//! Per-client fairness and log hygiene: a token bucket per source IP (GCRA:
//! one `Instant` per client) and a gate that rate-limits the log lines a
//! client can trigger. Both are behind `std::sync::Mutex`es held for a few
//! instructions, never across an `.await`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ClientRate;

/// Clients tracked at once. Past this, idle clients are forgotten and, if
/// all are busy, newcomers share one bucket: a spoofed-source flood cannot
/// grow the map without bound.
const MAX_TRACKED_CLIENTS: usize = 4096;

/// One client's bucket, as the time at which it would be full again
/// ("theoretical arrival time").
#[derive(Debug, Clone, Copy)]
struct Bucket {
    full_at: Instant,
}

impl Bucket {
    /// Takes one token at `now`: `Ok` or how long until one is available.
    fn take(
        &mut self,
        now: Instant,
        interval: Duration,
        tolerance: Duration,
    ) -> Result<(), Duration> {
        let start = self.full_at.max(now);
        let debt = start - now;
        if debt > tolerance {
            return Err(debt - tolerance);
        }
        self.full_at = start + interval;
        Ok(())
    }
}

#[derive(Debug)]
struct LimiterState {
    clients: HashMap<IpAddr, Bucket>,
    /// Shared by clients that arrive while the map is full.
    overflow: Bucket,
}

/// A token bucket per source IP.
#[derive(Debug)]
pub(crate) struct ClientLimiter {
    /// Time one token takes to come back.
    interval: Duration,
    /// How far into the future a client may borrow: `(burst - 1) × interval`.
    tolerance: Duration,
    max_clients: usize,
    state: Mutex<LimiterState>,
}

impl ClientLimiter {
    pub(crate) fn new(rate: ClientRate) -> Self {
        Self::with_capacity(rate, MAX_TRACKED_CLIENTS)
    }

    fn with_capacity(rate: ClientRate, max_clients: usize) -> Self {
        let interval = Duration::from_secs(1) / rate.queries_per_second.max(1);
        let tolerance = interval * rate.burst.max(1).saturating_sub(1);
        let now = Instant::now();
        Self {
            interval,
            tolerance,
            max_clients,
            state: Mutex::new(LimiterState {
                clients: HashMap::new(),
                overflow: Bucket { full_at: now },
            }),
        }
    }

    /// Takes a token for `ip`: `Ok`, or how long until it may ask again.
    pub(crate) fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let LimiterState { clients, overflow } = &mut *state;
        if let Some(bucket) = clients.get_mut(&ip) {
            return bucket.take(now, self.interval, self.tolerance);
        }
        if clients.len() >= self.max_clients {
            // A bucket that is full again is the same as no bucket.
            clients.retain(|_, b| b.full_at > now);
            if clients.len() >= self.max_clients {
                return overflow.take(now, self.interval, self.tolerance);
            }
        }
        let mut bucket = Bucket { full_at: now };
        let verdict = bucket.take(now, self.interval, self.tolerance);
        clients.insert(ip, bucket);
        verdict
    }
}

/// Lets through at most `per_window` events per window and counts the rest,
/// so a client cannot flood the log. Usage:
/// `if let Some(suppressed) = gate.allow() { warn!(suppressed, …) }`.
#[derive(Debug)]
pub(crate) struct LogGate {
    window: Duration,
    per_window: u32,
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    window_start: Option<Instant>,
    allowed: u32,
    suppressed: u64,
}

impl LogGate {
    pub(crate) const fn new(window: Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            state: Mutex::new(GateState {
                window_start: None,
                allowed: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)`: log now; `n` similar lines were dropped since the last one.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            s.window_start = Some(now);
            s.allowed = 0;
        }
        if s.allowed < self.per_window {
            s.allowed += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let limiter = ClientLimiter::new(ClientRate {
            queries_per_second: 10,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(ip(1), t0), Ok(()));
        }
        let wait = limiter.check(ip(1), t0).expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another client is unaffected.
        assert_eq!(limiter.check(ip(2), t0), Ok(()));
        // One token back after 100 ms, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limiter.check(ip(1), t1), Ok(()));
        assert!(limiter.check(ip(1), t1).is_err());
        // Full again after a long pause.
        let t2 = t0 + Duration::from_secs(5);
        for _ in 0..3 {
            assert_eq!(limiter.check(ip(1), t2), Ok(()));
        }
    }

    #[test]
    fn tracked_clients_are_bounded() {
        let rate = ClientRate {
            queries_per_second: 1,
            burst: 1,
        };
        let limiter = ClientLimiter::with_capacity(rate, 2);
        let t0 = Instant::now();
        assert_eq!(limiter.check(ip(1), t0), Ok(()));
        assert_eq!(limiter.check(ip(2), t0), Ok(()));
        // Map full of busy clients: newcomers share the overflow bucket.
        assert_eq!(limiter.check(ip(3), t0), Ok(()));
        assert!(limiter.check(ip(4), t0).is_err());
        // Once the tracked ones are idle they are forgotten.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(limiter.check(ip(4), t1), Ok(()));
        let tracked = limiter.state.lock().expect("lock").clients.len();
        assert_eq!(tracked, 1);
    }

    #[test]
    fn log_gate_counts_what_it_drops() {
        let gate = LogGate::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(gate.allow_at(t0), Some(0));
        assert_eq!(gate.allow_at(t0), Some(0));
        assert_eq!(gate.allow_at(t0), None);
        assert_eq!(gate.allow_at(t0), None);
        assert_eq!(gate.allow_at(t0 + Duration::from_secs(11)), Some(2));
    }
}
