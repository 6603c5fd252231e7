//! The progress of one VM operation (create, start, stop), kept so that
//! any number of clients can follow it: the client that asked, and later
//! ones (`vm watch`), which first get the backlog. A `watch` channel
//! carries the growing log; the operation's body is its only writer.

use std::sync::Arc;
use std::time::Instant;

use banger_protocol::{ErrorData, ErrorKind, Progress, VmInfo};
use tokio::sync::watch;

#[derive(Debug, Clone, Default)]
pub struct OpState {
    /// `create`, `start`, `stop`, `restart`.
    pub op: String,
    pub events: Vec<Progress>,
    pub done: Option<Result<VmInfo, ErrorData>>,
}

/// The writer side; cheap to clone.
#[derive(Debug, Clone)]
pub struct OpLog {
    tx: Arc<watch::Sender<OpState>>,
    started: Instant,
}

impl OpLog {
    pub fn new(op: &str) -> Self {
        let (tx, _) = watch::channel(OpState {
            op: op.to_string(),
            ..OpState::default()
        });
        Self {
            tx: Arc::new(tx),
            started: Instant::now(),
        }
    }

    pub fn op(&self) -> String {
        self.tx.borrow().op.clone()
    }

    /// Appends one progress event.
    pub fn progress(&self, stage: &str, detail: impl Into<String>) {
        self.progress_bytes(stage, detail, None);
    }

    pub fn progress_bytes(
        &self,
        stage: &str,
        detail: impl Into<String>,
        bytes: Option<(u64, u64)>,
    ) {
        let event = Progress {
            stage: stage.to_string(),
            detail: detail.into(),
            bytes_done: bytes.map(|b| b.0),
            bytes_total: bytes.map(|b| b.1),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        };
        self.tx.send_modify(|s| s.events.push(event));
    }

    /// Appends an event of another operation's log that this one follows,
    /// stamped with when it happened there rather than when it is copied:
    /// `other` is that log; its events' `elapsed_ms` count from its start.
    pub fn copy_from(&self, other: &OpLog, event: Progress) {
        let offset = other.started.saturating_duration_since(self.started);
        let event = Progress {
            elapsed_ms: event.elapsed_ms + offset.as_millis() as u64,
            ..event
        };
        self.tx.send_modify(|s| s.events.push(event));
    }

    /// Appends an event carrying the stage's own duration.
    pub fn stage_done(&self, stage: &str, detail: impl AsRef<str>, since: Instant) {
        self.progress(
            stage,
            format!("{} ({} ms)", detail.as_ref(), since.elapsed().as_millis()),
        );
    }

    /// Ends the operation (only the first call counts).
    pub fn finish(&self, result: Result<VmInfo, ErrorData>) {
        self.tx.send_if_modified(|s| {
            if s.done.is_some() {
                return false;
            }
            s.done = Some(result);
            true
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<OpState> {
        self.tx.subscribe()
    }
}

/// A reader of an operation's log from its first event: each event is
/// handed out once.
#[derive(Debug)]
pub struct Follower {
    rx: watch::Receiver<OpState>,
    seen: usize,
}

impl Follower {
    pub fn new(log: &OpLog) -> Self {
        Self {
            rx: log.subscribe(),
            seen: 0,
        }
    }

    /// Hands the events not seen yet to `on_progress`; the result once
    /// the operation has ended.
    pub fn drain(
        &mut self,
        mut on_progress: impl FnMut(Progress),
    ) -> Option<Result<VmInfo, ErrorData>> {
        let state = self.rx.borrow_and_update();
        for event in &state.events[self.seen.min(state.events.len())..] {
            on_progress(event.clone());
        }
        self.seen = state.events.len();
        state.done.clone()
    }

    /// Waits for the log to change. An error means the writer is gone.
    pub async fn changed(&mut self) -> Result<(), ErrorData> {
        self.rx.changed().await.map_err(|_| {
            ErrorData::new(
                ErrorKind::Internal,
                "the operation ended without a result (its owner stopped)",
            )
            .with_hint("see `banger vm show` and `banger daemon logs`")
        })
    }
}

/// Follows an operation from its first event: hands each event to
/// `on_progress` once, and returns its result.
pub async fn follow(
    log: &OpLog,
    mut on_progress: impl FnMut(Progress),
) -> Result<VmInfo, ErrorData> {
    let mut follower = Follower::new(log);
    loop {
        if let Some(result) = follower.drain(&mut on_progress) {
            return result;
        }
        follower.changed().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_followers_get_the_backlog_and_the_result() {
        let log = OpLog::new("create");
        log.progress("resolve", "image x");
        let reader = log.clone();
        let writer = log.clone();
        tokio::spawn(async move {
            writer.progress("boot", "waiting");
            writer.finish(Err(ErrorData::new(ErrorKind::Cancelled, "stop")));
            writer.finish(Err(ErrorData::new(ErrorKind::Internal, "ignored")));
        });
        let mut stages = Vec::new();
        let result = follow(&reader, |p| stages.push(p.stage)).await;
        assert_eq!(stages, ["resolve", "boot"]);
        assert_eq!(result.unwrap_err().kind, ErrorKind::Cancelled);
    }

    #[tokio::test]
    async fn copied_events_keep_when_they_happened() {
        let outer = OpLog::new("create");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let inner = OpLog::new("create");
        inner.progress("network", "TAP x");
        let event = inner.tx.borrow().events[0].clone();
        // Copied much later: still stamped with the time it happened.
        std::thread::sleep(std::time::Duration::from_millis(200));
        outer.copy_from(&inner, event.clone());
        let copied = outer.tx.borrow().events[0].clone();
        assert_eq!(
            (copied.stage.as_str(), copied.detail.as_str()),
            ("network", "TAP x")
        );
        assert!(copied.elapsed_ms >= 30, "{copied:?}");
        assert!(
            copied.elapsed_ms < 30 + 200,
            "stamped when copied: {copied:?}"
        );
        assert!(copied.elapsed_ms >= event.elapsed_ms);
    }
}
