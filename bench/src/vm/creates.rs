//! The create benchmark: `VmCreate` of a busybox image (the guest agent
//! is its PID 1), timed stage by stage, once alone and `--parallel` at
//! once, for `--runs` rounds.
//!
//! The daemon runs in a network namespace of its own with a warm TAP pool
//! of at least `--parallel` TAPs, the host's kernel imported as `host`
//! and the busybox image of `banger_tests::vm` pulled from a local
//! registry (`banger_tests::vm::busybox_setup`, with a larger pool). Before the timed rounds, one untimed create pays for what only
//! the first create of a daemon does (the kernel's modules disk, the KVM
//! probe with `--accel auto`). Every VM is deleted (`force`) after its
//! round, and the next create waits until the pool is full again, so
//! every create finds a warm TAP.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use banger_image::testing::TestRegistry;
use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ErrorKind, Request, Response, VmCreateRequest, VmInfo};
use banger_tests::vm::busybox_setup_with;
use banger_tests::{error_chain, TestDaemon};
use futures::FutureExt as _;
use tokio::task::JoinSet;

use super::stages::{Create, Event};
use super::{note, GRACE};
use crate::table::fmt_duration;

/// Longest a create (boot included) may take: TCG boots of many VMs at
/// once on a busy machine are slow.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(900);
/// Longest an untimed request (pull, import, delete) may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the TAP pool may take to fill up again.
const POOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The create daemon and what it was given.
#[derive(Debug)]
pub struct Setup {
    pub daemon: TestDaemon,
    /// Serves the busybox image; stops when dropped.
    _registry: TestRegistry,
    pub image: String,
    pub pool: u32,
}

/// The config of the create daemon: small VMs, a long boot timeout, a
/// pool of `pool` warm TAPs.
fn config(accel: &str, pool: u32) -> String {
    format!(
        "[vm]\naccel = \"{accel}\"\ncpus = 1\nmemory_mib = 384\nboot_timeout_secs = {}\n\
         stop_timeout_secs = 20\n\n[network]\npool_size = {pool}\n",
        CREATE_TIMEOUT.as_secs()
    )
}

/// Starts the daemon in a namespace, imports the host kernel and pulls
/// the busybox image (`banger_tests::vm::busybox_setup_with`; its
/// panics, with their messages already printed, become errors).
pub async fn setup(accel: &str, pool: u32) -> anyhow::Result<Setup> {
    let text = config(accel, pool);
    let (daemon, registry, image) = std::panic::AssertUnwindSafe(busybox_setup_with(
        // A session of its own, as the CLI's auto-start and systemd run it.
        TestDaemon::builder().own_session().config(text),
    ))
    .catch_unwind()
    .await
    .map_err(|_| {
        anyhow!("setting up the daemon and the busybox image failed (see the message above)")
    })?;
    Ok(Setup {
        daemon,
        _registry: registry,
        image,
        pool,
    })
}

/// Everything the rounds measured.
#[derive(Debug, Default)]
pub struct Rounds {
    /// One per round.
    pub single: Vec<Create>,
    /// `--parallel` per round.
    pub parallel: Vec<Vec<Create>>,
    /// The untimed first create's VM (what VMM and accelerator were used).
    pub warmup: Option<VmInfo>,
    /// Creates that did not get a TAP from the warm pool.
    pub pool_misses: usize,
}

/// The untimed create, then `runs` rounds of 1 and `parallel` creates.
pub async fn measure(
    setup: &Setup,
    runs: u32,
    parallel: u32,
    show_timeline: bool,
) -> anyhow::Result<Rounds> {
    let socket = setup.daemon.socket();
    let mut admin = connect(&socket).await?;
    let mut rounds = Rounds::default();
    wait_pool(&mut admin, setup.pool).await?;

    note("untimed first create (pays for one-time work: modules disk, KVM probe)".into());
    let name = "bench-warmup".to_string();
    let created = create(connect(&socket).await?, request(&name, &setup.image, None)).await;
    delete(&mut admin, &name).await?;
    let (first, info) = created?;
    note(format!("  {}", brief(&first)));
    rounds.warmup = Some(info);
    wait_pool(&mut admin, setup.pool).await?;

    for round in 1..=runs {
        let name = format!("bench-r{round}");
        let created = create(connect(&socket).await?, request(&name, &setup.image, None)).await;
        delete(&mut admin, &name).await?;
        let (one, _) = created?;
        note(format!("round {round}/{runs}, 1 create: {}", brief(&one)));
        if show_timeline {
            note(format!("  {}", one.timeline()));
        }
        rounds.single.push(one);
        wait_pool(&mut admin, setup.pool).await?;

        let names: Vec<String> = (1..=parallel)
            .map(|i| format!("bench-r{round}-p{i}"))
            .collect();
        // Connect first, so the requests leave together.
        let mut clients = Vec::new();
        for _ in &names {
            clients.push(connect(&socket).await?);
        }
        let mut set = JoinSet::new();
        for (client, name) in clients.into_iter().zip(&names) {
            let req = request(name, &setup.image, None);
            set.spawn(create(client, req));
        }
        let mut done = Vec::new();
        let mut failed = None;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok((c, _))) => done.push(c),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) => failed = failed.or(Some(anyhow!("a create task failed: {e}"))),
            }
        }
        for name in &names {
            delete(&mut admin, name).await?;
        }
        if let Some(e) = failed {
            return Err(e.context(format!("round {round}: {parallel} parallel creates")));
        }
        let launched = done
            .iter()
            .filter_map(|c| c.control_plane().map(|cp| cp.client))
            .max()
            .unwrap_or_default();
        let mut cps: Vec<u64> = done
            .iter()
            .filter_map(|c| c.control_plane().map(|cp| cp.daemon.as_millis() as u64))
            .collect();
        cps.sort_unstable();
        note(format!(
            "round {round}/{runs}, {parallel} parallel creates: control plane {cps:?} ms, \
             last VMM launched after {}, last create done after {}",
            fmt_duration(launched),
            fmt_duration(done.iter().map(|c| c.total).max().unwrap_or_default())
        ));
        if show_timeline {
            let mut lines: Vec<(u64, String)> = done
                .iter()
                .map(|c| {
                    let at = c
                        .control_plane()
                        .map_or(u64::MAX, |cp| cp.daemon.as_millis() as u64);
                    (at, c.timeline())
                })
                .collect();
            lines.sort();
            for (_, line) in lines {
                note(format!("  {line}"));
            }
        }
        rounds.parallel.push(done);
        wait_pool(&mut admin, setup.pool).await?;
    }
    rounds.pool_misses = rounds
        .single
        .iter()
        .chain(rounds.parallel.iter().flatten())
        .filter(|c| c.count("network", "from the warm pool") == 0)
        .count();
    Ok(rounds)
}

/// A short account of one create for a progress line.
pub fn brief(c: &Create) -> String {
    let cp = c
        .control_plane()
        .map(|cp| format!("{} ms", cp.daemon.as_millis()))
        .unwrap_or_else(|| "-".into());
    let stages: Vec<String> = c
        .stages()
        .iter()
        .map(|(n, d)| format!("{n} {}", d.as_millis()))
        .collect();
    format!(
        "control plane {cp}, total {} (stages, ms: {})",
        fmt_duration(c.total),
        stages.join(", ")
    )
}

pub fn request(name: &str, image: &str, ip: Option<Ipv4Addr>) -> VmCreateRequest {
    VmCreateRequest {
        name: Some(name.to_string()),
        image: Some(image.to_string()),
        ip,
        ..Default::default()
    }
}

pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    Client::connect(socket)
        .await
        .map_err(|e| anyhow!("cannot connect to bangerd: {}", error_chain(&e)))
}

/// Sends `req` on `client` (connected beforehand) and collects its
/// progress until the final reply, timed from just before the send.
pub async fn create(mut client: Client, req: VmCreateRequest) -> anyhow::Result<(Create, VmInfo)> {
    let name = req.name.clone().unwrap_or_default();
    let mut events = Vec::new();
    let sent = Instant::now();
    let reply = tokio::time::timeout(
        CREATE_TIMEOUT,
        client.request_with_progress(Request::VmCreate(req), |p| {
            events.push(Event {
                stage: p.stage,
                detail: p.detail,
                elapsed_ms: p.elapsed_ms,
                received: sent.elapsed(),
            })
        }),
    )
    .await;
    let created = Create {
        events,
        total: sent.elapsed(),
    };
    match reply {
        Err(_) => bail!(
            "VmCreate {name} did not finish within {CREATE_TIMEOUT:?} (last progress: {})",
            created.last()
        ),
        Ok(Err(e)) => bail!(
            "VmCreate {name} failed after {}: {} (last progress: {})",
            fmt_duration(created.total),
            error_chain(&e),
            created.last()
        ),
        Ok(Ok(Response::Vm(info))) => Ok((created, info)),
        Ok(Ok(other)) => bail!("VmCreate {name} answered {other:?}"),
    }
}

/// Deletes VM `name` (stopping it hard); a VM that does not exist is fine.
pub async fn delete(client: &mut Client, name: &str) -> anyhow::Result<()> {
    let req = Request::VmDelete {
        name: name.to_string(),
        force: true,
    };
    match tokio::time::timeout(ASK_TIMEOUT, client.request(req)).await {
        Err(_) => bail!("VmDelete {name} did not answer within {ASK_TIMEOUT:?}"),
        Ok(Ok(Response::Deleted { .. })) => Ok(()),
        Ok(Err(ClientError::Daemon(e))) if e.kind == ErrorKind::NotFound => Ok(()),
        Ok(Ok(other)) => bail!("VmDelete {name} answered {other:?}"),
        Ok(Err(e)) => bail!("VmDelete {name} failed: {}", error_chain(&e)),
    }
}

/// Sends a request without progress; a daemon error is an error.
pub async fn ask(client: &mut Client, req: Request, timeout: Duration) -> anyhow::Result<Response> {
    let what = req.name();
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => bail!("{what} did not answer within {timeout:?}"),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => bail!("{what} failed: {}", error_chain(&e)),
    }
}

/// Polls `NetworkStatus` until `target` TAPs are warm and none is in use.
pub async fn wait_pool(client: &mut Client, target: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + POOL_TIMEOUT;
    loop {
        let status = match ask(client, Request::NetworkStatus, ASK_TIMEOUT).await? {
            Response::Network(s) => s,
            other => bail!("NetworkStatus answered {other:?}"),
        };
        if status.pool.warm.len() as u32 >= target && status.pool.in_use.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the warm TAP pool did not fill up within {POOL_TIMEOUT:?}: {} of {target} warm, \
                 {} in use",
                status.pool.warm.len(),
                status.pool.in_use.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops `daemon` (SIGTERM, then SIGKILL after [`GRACE`]).
pub fn stop(daemon: &mut TestDaemon) {
    if daemon.is_running() {
        daemon.sigterm();
        if daemon.wait_exit(GRACE).is_none() {
            daemon.sigkill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_config_has_the_pool_and_accel() {
        let text = config("tcg", 8);
        assert!(text.contains("accel = \"tcg\""), "{text}");
        assert!(text.contains("[network]\npool_size = 8\n"), "{text}");
        assert!(text.contains("boot_timeout_secs = 900"), "{text}");
    }
}
