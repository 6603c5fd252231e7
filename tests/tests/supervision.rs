//! Supervision, end to end: actors killed through the real CLI come back
//! with a new id and a higher restart count while the daemon keeps
//! serving; an actor that dies too often makes the root supervisor
//! escalate and the daemon exit with code 3.

use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ActorInfo, ActorStatus, ErrorKind, Request, Response};
use banger_tests::{actors, error_chain, find_actor, wait, TestDaemon};

const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
const CHILDREN: [&str; 3] = ["store", "events", "router"];

/// `DebugActors`, tolerating `Unavailable` while the actor that answers it
/// restarts. A connection error is a failure: connections outlive restarts.
async fn try_actors(client: &mut Client) -> Option<Vec<ActorInfo>> {
    match client.request(Request::DebugActors).await {
        Ok(Response::Actors(list)) => Some(list),
        Ok(other) => panic!("DebugActors answered {other:?}"),
        Err(ClientError::Daemon(e)) if e.kind == ErrorKind::Unavailable => None,
        Err(e) => panic!("DebugActors failed: {}", error_chain(&e)),
    }
}

/// Polls until `name` runs again with `restart_count` and an id other than
/// `old_id`; returns the whole list at that point.
async fn wait_restarted(
    client: &mut Client,
    name: &str,
    old_id: &str,
    restart_count: u32,
) -> Vec<ActorInfo> {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut last = None;
    loop {
        if let Some(list) = try_actors(client).await {
            if find_actor(&list, name).is_some_and(|a| {
                a.status == ActorStatus::Running
                    && a.restart_count == restart_count
                    && a.id != old_id
                    && !a.id.is_empty()
            }) {
                return list;
            }
            last = Some(list);
        }
        assert!(
            Instant::now() < deadline,
            "{name} not running again (restart_count {restart_count}, id != {old_id}) within \
             {RECOVERY_TIMEOUT:?}; last seen: {last:#?}"
        );
        tokio::time::sleep(wait::POLL_INTERVAL).await;
    }
}

/// The actor tree of a fresh daemon: a root and its three children, all running.
fn assert_initial_tree(list: &[ActorInfo]) {
    let root = find_actor(list, "supervisor").unwrap_or_else(|| panic!("no supervisor: {list:#?}"));
    assert_eq!(root.parent, None, "{root:?}");
    for actor in ["supervisor"].iter().chain(CHILDREN.iter()) {
        let a = find_actor(list, actor).unwrap_or_else(|| panic!("no {actor}: {list:#?}"));
        assert_eq!(a.status, ActorStatus::Running, "{a:?}");
        assert_eq!(a.restart_count, 0, "{a:?}");
        assert!(!a.id.is_empty(), "{a:?}");
        if *actor != "supervisor" {
            assert_eq!(a.parent.as_deref(), Some("supervisor"), "{a:?}");
        }
    }
    let mut ids: Vec<&str> = list.iter().map(|a| a.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), list.len(), "actor ids are unique: {list:#?}");
}

async fn kill_with_cli_and_recover(name: &str) {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let before = actors(&mut client).await;
    assert_initial_tree(&before);
    let old = find_actor(&before, name).expect("listed").clone();

    let out = d.banger(["debug", "kill-actor", name]);
    assert!(
        out.status.success(),
        "banger debug kill-actor {name}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The same connection, opened before the kill, sees the restart.
    let after = wait_restarted(&mut client, name, &old.id, 1).await;
    for other in CHILDREN.iter().filter(|n| **n != name) {
        let was = find_actor(&before, other).expect("listed");
        let now = find_actor(&after, other).expect("still listed");
        assert_eq!(
            (now.status, now.restart_count, &now.id),
            (ActorStatus::Running, 0, &was.id),
            "killing {name} must not restart {other}"
        );
    }
    let root = find_actor(&after, "supervisor").expect("supervisor");
    assert_eq!((root.status, root.restart_count), (ActorStatus::Running, 0));
    let reborn = find_actor(&after, name).expect("listed");
    assert!(
        reborn.uptime_ms < root.uptime_ms,
        "a restarted actor's uptime starts again: {reborn:?} vs {root:?}"
    );

    match client.request(Request::Status).await {
        Ok(Response::Status(s)) => assert_eq!(s.pid, d.pid()),
        other => panic!("Status after {name} restarted: {other:?}"),
    }
    match d.client().await.request(Request::Ping).await {
        Ok(Response::Pong) => {}
        other => panic!("Ping from a new client after {name} restarted: {other:?}"),
    }
}

#[tokio::test]
async fn killed_store_is_restarted() {
    kill_with_cli_and_recover("store").await;
}

#[tokio::test]
async fn killed_events_is_restarted() {
    kill_with_cli_and_recover("events").await;
}

#[tokio::test]
async fn killed_router_is_restarted() {
    kill_with_cli_and_recover("router").await;
}

#[tokio::test]
async fn kill_answers_with_the_killed_actor_and_counts_accumulate() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let mut id = find_actor(&actors(&mut client).await, "events")
        .expect("events")
        .id
        .clone();
    for count in 1..=3 {
        match client
            .request(Request::DebugKillActor {
                name: "events".into(),
            })
            .await
        {
            Ok(Response::ActorKilled { name, id: killed }) => {
                assert_eq!(name, "events");
                assert_eq!(killed, id, "the reply names the instance that was killed");
            }
            other => panic!("DebugKillActor answered {other:?}"),
        }
        let list = wait_restarted(&mut client, "events", &id, count).await;
        id = find_actor(&list, "events").expect("events").id.clone();
    }
}

#[tokio::test]
async fn killing_the_root_or_an_unknown_actor_is_refused() {
    let mut d = TestDaemon::start();
    let mut client = d.client().await;
    match client
        .request(Request::DebugKillActor {
            name: "supervisor".into(),
        })
        .await
    {
        Err(ClientError::Daemon(e)) => assert!(
            matches!(e.kind, ErrorKind::InvalidRequest | ErrorKind::NotFound),
            "killing the supervisor: {e:?}"
        ),
        other => panic!("killing the supervisor answered {other:?}"),
    }
    match client
        .request(Request::DebugKillActor {
            name: "no-such-actor".into(),
        })
        .await
    {
        Err(ClientError::Daemon(e)) => {
            assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}");
            assert!(
                e.to_string().contains("no-such-actor"),
                "the error names the actor: {e:?}"
            );
        }
        other => panic!("killing an unknown actor answered {other:?}"),
    }
    let out = d.banger(["debug", "kill-actor", "no-such-actor"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "CLI exit status for an unknown actor"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-actor"));

    // Nothing was harmed.
    let list = actors(&mut client).await;
    assert_initial_tree(&list);
    assert!(d.is_running(), "bangerd exited");
}

#[tokio::test]
async fn restart_intensity_exceeded_escalates_and_exits_3() {
    let mut d = TestDaemon::builder()
        .config("[supervisor]\nmax_restarts = 2\nrestart_window_secs = 60\n")
        .start();
    let mut client = d.client().await;
    let mut id = find_actor(&actors(&mut client).await, "store")
        .expect("store")
        .id
        .clone();

    // Two deaths are within the budget: the actor comes back each time.
    for count in 1..=2 {
        match client
            .request(Request::DebugKillActor {
                name: "store".into(),
            })
            .await
        {
            Ok(Response::ActorKilled { .. }) => {}
            other => panic!("kill #{count} answered {other:?}"),
        }
        let list = wait_restarted(&mut client, "store", &id, count).await;
        id = find_actor(&list, "store").expect("store").id.clone();
    }

    // The third exceeds it. The reply may or may not make it out before
    // the daemon goes down; what matters is how it goes down.
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(Request::DebugKillActor {
            name: "store".into(),
        }),
    )
    .await;
    let status = d.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "bangerd still runs after the restart intensity was exceeded; stderr:\n{}",
            d.stderr_log()
        )
    });
    assert_eq!(
        status.code(),
        Some(3),
        "exit status; stderr:\n{}",
        d.stderr_log()
    );

    let records = d.log_records();
    let escalation = records
        .iter()
        .find(|r| r.to_string().contains("restart intensity exceeded"));
    let escalation = escalation.unwrap_or_else(|| {
        panic!(
            "no log record mentions \"restart intensity exceeded\"; log:\n{}",
            d.log_file_contents()
        )
    });
    assert_eq!(escalation["level"], "ERROR", "{escalation}");
}
