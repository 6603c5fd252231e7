//! TAP hand-out latency: `TapAcquire` then `TapRelease`, back to back on
//! one connection, timed from the client, against a daemon running in a
//! network namespace of its own (`TestDaemon::builder().netns()`), so the
//! bridge and every TAP it makes are created and deleted inside it.
//!
//! - warm: the default pool (4 TAPs kept ready); every acquire must come
//!   from the pool (`from_pool: true`), otherwise the run is counted as a
//!   pool miss;
//! - cold: `[network] pool_size = 0`, so every acquire creates a TAP
//!   (`from_pool: false`) and every release deletes it.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use banger_protocol::client::Client;
use banger_protocol::{Request, Response};
use banger_tests::{error_chain, TestDaemon};

/// How long one request may take before the benchmark gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the warm pool may take to fill after the daemon starts.
const FILL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// The two pools measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The default pool size.
    Warm,
    /// `pool_size = 0`.
    Cold,
}

impl Pool {
    fn config(self) -> &'static str {
        match self {
            Pool::Warm => "",
            Pool::Cold => "[network]\npool_size = 0\n",
        }
    }

    fn expect_from_pool(self) -> bool {
        self == Pool::Warm
    }

    pub fn label(self) -> &'static str {
        match self {
            Pool::Warm => "warm pool",
            Pool::Cold => "cold, pool_size = 0",
        }
    }
}

/// The timed runs of one pool.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// `TapAcquire` round trips.
    pub acquire: Vec<Duration>,
    /// `TapRelease` round trips.
    pub release: Vec<Duration>,
    /// Both, one after the other.
    pub cycle: Vec<Duration>,
    /// Acquires whose `from_pool` was not what the pool should give.
    pub unexpected_source: usize,
    /// Failed requests (the first few messages).
    pub errors: Vec<String>,
    pub failed: usize,
}

/// Starts a daemon in its own namespace with `pool`'s configuration, runs
/// `warmup` untimed and `runs` timed acquire/release cycles, and stops it.
pub async fn measure(pool: Pool, warmup: usize, runs: usize) -> anyhow::Result<Samples> {
    let builder = TestDaemon::builder().netns().config(pool.config());
    // The harness panics (with the daemon's stderr) when the daemon does
    // not come up; the hook has printed the message already.
    let mut daemon = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.start()))
        .map_err(|_| anyhow!("bangerd did not start in a namespace (see the message above)"))?;
    let measured = cycles(&daemon, pool, warmup, runs).await;
    daemon.sigterm();
    if daemon.wait_exit(GRACE).is_none() {
        daemon.sigkill();
    }
    // Dropping the harness deletes the namespace with everything in it.
    drop(daemon);
    measured
}

async fn cycles(
    daemon: &TestDaemon,
    pool: Pool,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<Samples> {
    let mut client = daemon
        .try_client()
        .await
        .map_err(|e| anyhow!("cannot connect: {}", error_chain(&e)))?;
    if pool == Pool::Warm {
        wait_full(&mut client).await?;
    }
    let mut samples = Samples::default();
    for i in 0..warmup + runs {
        let owner = format!("bench-{i}");
        let started = Instant::now();
        let acquired = request(&mut client, Request::TapAcquire { owner }).await;
        let acquired_at = Instant::now();
        let (tap, from_pool) = match acquired {
            Ok(Response::Tap { tap, from_pool }) => (tap, from_pool),
            Ok(other) => bail!("TapAcquire answered {other:?}"),
            Err(e) => {
                samples.failed += 1;
                if samples.errors.len() < 3 {
                    samples.errors.push(format!("TapAcquire: {e}"));
                }
                continue;
            }
        };
        let released = request(&mut client, Request::TapRelease { tap: tap.clone() }).await;
        let released_at = Instant::now();
        match released {
            Ok(Response::Done) => {}
            Ok(other) => bail!("TapRelease {tap} answered {other:?}"),
            Err(e) => {
                samples.failed += 1;
                if samples.errors.len() < 3 {
                    samples.errors.push(format!("TapRelease {tap}: {e}"));
                }
                continue;
            }
        }
        if i < warmup {
            continue;
        }
        if from_pool != pool.expect_from_pool() {
            samples.unexpected_source += 1;
        }
        samples.acquire.push(acquired_at - started);
        samples.release.push(released_at - acquired_at);
        samples.cycle.push(released_at - started);
    }
    if samples.cycle.is_empty() {
        bail!(
            "every TAP cycle failed ({}): {}",
            pool.label(),
            samples.errors.join("; ")
        );
    }
    Ok(samples)
}

async fn request(client: &mut Client, req: Request) -> Result<Response, String> {
    let what = req.name();
    match tokio::time::timeout(REQUEST_TIMEOUT, client.request(req)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("{what}: no reply within {REQUEST_TIMEOUT:?}")),
    }
}

/// Polls `NetworkStatus` until the warm pool is at its target.
async fn wait_full(client: &mut Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        match request(client, Request::NetworkStatus).await {
            Ok(Response::Network(s))
                if s.pool.target > 0 && s.pool.warm.len() as u32 >= s.pool.target =>
            {
                return Ok(())
            }
            Ok(Response::Network(_)) => {}
            Ok(other) => bail!("NetworkStatus answered {other:?}"),
            Err(e) => bail!("NetworkStatus failed: {e}"),
        }
        if Instant::now() >= deadline {
            bail!("the warm TAP pool did not fill within {FILL_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
