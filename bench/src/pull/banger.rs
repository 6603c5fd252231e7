//! banger's side of the pull benchmark: one `ImagePull` through the
//! daemon's socket, timed from just before the request is sent until the
//! final reply, with the progress frames it streamed, split into stages.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ImageInfo, ImagePullRequest, Progress, Request, Response};
use banger_tests::error_chain;

use crate::cpu;

/// How long one pull may take before the benchmark gives up.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long an untimed request (delete) may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(120);

/// Name of the row for the time before the first progress frame.
pub const SETUP: &str = "(before resolve)";
/// Name of the row for the time after the last progress frame.
pub const REPLY: &str = "(reply)";

/// One timed pull.
#[derive(Debug)]
pub struct Pulled {
    /// From sending the request to reading the final reply.
    pub total: Duration,
    /// Where the time went, in order (see [`stages`]).
    pub stages: Vec<(String, Duration)>,
    /// CPU time of the daemon and the children it ran meanwhile.
    pub cpu: Duration,
    pub image: ImageInfo,
    /// The last detail of the `extract` and `build` stages (they say how
    /// the tree was made and where the build's time went).
    pub details: String,
}

impl Pulled {
    /// The stages that took 10 ms or more, for a progress line.
    pub fn brief(&self) -> String {
        let long: Vec<String> = self
            .stages
            .iter()
            .filter(|(_, d)| *d >= Duration::from_millis(10))
            .map(|(name, d)| format!("{name} {}", crate::table::fmt_duration(*d)))
            .collect();
        long.join(", ")
    }
}

/// Pulls `reference` as `name` on a fresh connection (connecting is not
/// timed) to the daemon on `socket`, whose pid is `pid`. A failed pull is
/// an error carrying the daemon's whole message.
pub async fn pull(socket: &Path, pid: u32, reference: &str, name: &str) -> anyhow::Result<Pulled> {
    let mut client = connect(socket).await?;
    let cpu_before = cpu::of(pid)?;
    let request = Request::ImagePull(ImagePullRequest {
        reference: reference.to_string(),
        name: Some(name.to_string()),
        size: None,
        platform: None,
        insecure: false,
        kernel: None,
    });
    let mut progress = Vec::new();
    let started = Instant::now();
    let reply = tokio::time::timeout(
        PULL_TIMEOUT,
        client.request_with_progress(request, |p| progress.push(p)),
    )
    .await;
    let total = started.elapsed();
    let cpu = cpu::of(pid)?.since(&cpu_before).total();
    let last = || {
        progress
            .last()
            .map(|p| format!("{}: {}", p.stage, p.detail))
            .unwrap_or_else(|| "none".into())
    };
    let image = match reply {
        Err(_) => bail!(
            "ImagePull of {reference} did not finish within {PULL_TIMEOUT:?} (last progress: {})",
            last()
        ),
        Ok(Err(e)) => bail!(
            "ImagePull of {reference} failed after {:.1} s: {} (last progress: {})",
            total.as_secs_f64(),
            describe(&e),
            last()
        ),
        Ok(Ok(Response::Image(image))) => image,
        Ok(Ok(other)) => bail!("bangerd answered ImagePull with {other:?}"),
    };
    let details = ["extract", "build"]
        .iter()
        .filter_map(|stage| {
            progress
                .iter()
                .rev()
                .find(|p| p.stage == *stage)
                .map(|p| format!("{stage}: {}", p.detail))
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Pulled {
        total,
        stages: stages(&progress, total),
        cpu,
        image,
        details,
    })
}

/// Deletes image `name` (untimed; keeps the disk from filling up).
pub async fn delete(socket: &Path, name: &str) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    let request = Request::ImageDelete {
        name: name.to_string(),
    };
    match tokio::time::timeout(ASK_TIMEOUT, client.request(request)).await {
        Err(_) => bail!("ImageDelete {name} did not answer within {ASK_TIMEOUT:?}"),
        Ok(Ok(Response::Deleted { .. })) => Ok(()),
        Ok(Ok(other)) => bail!("bangerd answered ImageDelete with {other:?}"),
        Ok(Err(e)) => bail!("ImageDelete {name} failed: {}", describe(&e)),
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Client> {
    Client::connect(socket)
        .await
        .map_err(|e| anyhow!("cannot connect to bangerd: {}", error_chain(&e)))
}

/// The error with its causes and the daemon's hint.
fn describe(err: &ClientError) -> String {
    let hint = err
        .daemon_error()
        .and_then(|d| d.hint.as_deref())
        .map(|h| format!(" (hint: {h})"))
        .unwrap_or_default();
    format!("{}{hint}", error_chain(err))
}

/// Splits a pull's `total` into stages from its progress frames.
///
/// Every stage sends a frame when it ends, and `elapsed_ms` counts from
/// the start of the request in the daemon. So a stage is timed from the
/// last frame of the stage before it (or its own first frame, for the
/// first one) to its own last frame. The time before the first frame is
/// [`SETUP`] (name check, kernel lookup); from the last frame to the
/// client reading the reply is [`REPLY`]. A stage that comes back after
/// another is added to its first appearance.
pub fn stages(progress: &[Progress], total: Duration) -> Vec<(String, Duration)> {
    let ms = Duration::from_millis;
    let Some(first) = progress.first() else {
        return vec![(REPLY.to_string(), total)];
    };
    let mut out: Vec<(String, Duration)> = vec![(SETUP.to_string(), ms(first.elapsed_ms))];
    let mut start = first.elapsed_ms;
    let mut i = 0;
    while i < progress.len() {
        let stage = &progress[i].stage;
        let mut end = progress[i].elapsed_ms;
        while i < progress.len() && &progress[i].stage == stage {
            end = end.max(progress[i].elapsed_ms);
            i += 1;
        }
        let took = ms(end.saturating_sub(start));
        match out.iter_mut().find(|(name, _)| name == stage) {
            Some((_, d)) => *d += took,
            None => out.push((stage.clone(), took)),
        }
        start = end;
    }
    out.push((REPLY.to_string(), total.saturating_sub(ms(start))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stage: &str, elapsed_ms: u64) -> Progress {
        Progress {
            stage: stage.into(),
            detail: String::new(),
            bytes_done: None,
            bytes_total: None,
            elapsed_ms,
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn stages_run_from_one_last_frame_to_the_next() {
        let progress = [
            frame("resolve", 5),
            frame("resolve", 40),
            frame("download", 41),
            frame("download", 900),
            frame("extract", 901),
            frame("extract", 2000),
            frame("build", 3000),
            frame("publish", 3010),
        ];
        let got = stages(&progress, ms(3015));
        let want: Vec<(String, Duration)> = [
            (SETUP, 5),
            ("resolve", 35),
            ("download", 860),
            ("extract", 1100),
            ("build", 1000),
            ("publish", 10),
            (REPLY, 5),
        ]
        .iter()
        .map(|&(s, d)| (s.to_string(), ms(d)))
        .collect();
        assert_eq!(got, want);
        let sum: Duration = got.iter().map(|(_, d)| *d).sum();
        assert_eq!(sum, ms(3015));
    }

    #[test]
    fn a_stage_that_comes_back_is_added_up() {
        let progress = [frame("a", 0), frame("b", 10), frame("a", 30)];
        let got = stages(&progress, ms(30));
        assert_eq!(
            got,
            vec![
                (SETUP.to_string(), ms(0)),
                ("a".to_string(), ms(20)),
                ("b".to_string(), ms(10)),
                (REPLY.to_string(), ms(0)),
            ]
        );
    }

    #[test]
    fn no_frames_is_all_reply() {
        assert_eq!(stages(&[], ms(7)), vec![(REPLY.to_string(), ms(7))]);
    }
}
