//! Waiting for a condition by polling it until a deadline, so tests never
//! sleep for a fixed time and hope.

use std::future::Future;
use std::time::{Duration, Instant};

/// The pause between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Calls `probe` until it returns `Some`, and returns that value. Panics
/// with `what` if `timeout` passes first.
pub async fn until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Blocking version of [`until`], for code outside a runtime.
pub fn until_blocking<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}
