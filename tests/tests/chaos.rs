//! Chaos: several clients hammer the daemon while its actors are killed at
//! random. Every request must end with a final reply (a success, or an
//! error that says what went wrong) within a bound; no connection may be
//! dropped, not even by a router restart; afterwards everything runs again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ErrorKind, Request, Response};
use banger_tests::{all_running, error_chain, TestDaemon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLIENTS: usize = 5;
const RUN_FOR: Duration = Duration::from_secs(20);
/// Per-request bound: above the daemon's own `request_timeout_secs` below.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const VICTIMS: [&str; 3] = ["store", "events", "router"];

/// High restart budget so it never escalates; short timeouts and backoff
/// so requests fail fast and actors churn.
const CONFIG: &str = "request_timeout_secs = 5
[supervisor]
max_restarts = 1000
restart_window_secs = 60
backoff_initial_ms = 50
backoff_max_ms = 400
";

/// What one task saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// Daemon errors by kind.
    errors: BTreeMap<&'static str, u64>,
    /// Things that must not happen, described.
    failures: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.failures.extend(other.failures);
    }
}

/// Whether `response` is the right kind of answer to `request`.
fn answers(request: &Request, response: &Response) -> bool {
    matches!(
        (request, response),
        (Request::Ping, Response::Pong)
            | (Request::Status, Response::Status(_))
            | (Request::DebugActors, Response::Actors(_))
            | (Request::DebugProgress { .. }, Response::Done)
            | (Request::DebugKillActor { .. }, Response::ActorKilled { .. })
    )
}

/// Sends `request` and classifies the outcome into `tally`. Returns false
/// when the connection can no longer be trusted (it must be replaced).
async fn exchange(client: &mut Client, request: Request, who: &str, tally: &mut Tally) -> bool {
    let name = request.name();
    let mut steps = 0u32;
    let outcome = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.request_with_progress(request.clone(), |_| steps += 1),
    )
    .await;
    match outcome {
        Err(_) => {
            tally.failures.push(format!(
                "{who}: {name} got no reply within {REQUEST_TIMEOUT:?}"
            ));
            false
        }
        Ok(Ok(response)) => {
            if !answers(&request, &response) {
                tally
                    .failures
                    .push(format!("{who}: {name} answered {response:?}"));
            }
            if let Request::DebugProgress { steps: wanted, .. } = request {
                if steps != wanted {
                    tally
                        .failures
                        .push(format!("{who}: {name} streamed {steps}/{wanted} steps"));
                }
            }
            tally.ok += 1;
            true
        }
        Ok(Err(ClientError::Daemon(e))) => {
            *tally.errors.entry(e.kind.as_str()).or_default() += 1;
            if e.message.trim().is_empty() {
                tally
                    .failures
                    .push(format!("{who}: {name} failed without a message: {e:?}"));
            }
            // While an actor restarts, requests through it may be refused
            // as unavailable or time out inside the daemon; killing an actor
            // that is already restarting may be refused as well. Anything
            // else is a bug.
            let expected = matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
                || (name == "debug_kill_actor"
                    && matches!(e.kind, ErrorKind::InvalidState | ErrorKind::NotFound));
            if !expected {
                tally
                    .failures
                    .push(format!("{who}: {name} failed unexpectedly: {e:?}"));
            }
            true
        }
        Ok(Err(e)) => {
            tally.failures.push(format!(
                "{who}: {name} lost its connection: {}",
                error_chain(&e)
            ));
            false
        }
    }
}

async fn connect(socket: &Path, who: &str, tally: &mut Tally) -> Option<Client> {
    match tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(socket)).await {
        Ok(Ok(client)) => Some(client),
        Ok(Err(e)) => {
            tally
                .failures
                .push(format!("{who}: cannot connect: {}", error_chain(&e)));
            None
        }
        Err(_) => {
            tally.failures.push(format!(
                "{who}: handshake not answered in {REQUEST_TIMEOUT:?}"
            ));
            None
        }
    }
}

async fn client_task(socket: PathBuf, n: usize, until: Instant) -> Tally {
    let who = format!("client {n}");
    let mut tally = Tally::default();
    let mut client = connect(&socket, &who, &mut tally).await;
    let mut i = n;
    while Instant::now() < until {
        let Some(c) = client.as_mut() else {
            client = connect(&socket, &who, &mut tally).await;
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };
        let request = match i % 4 {
            0 => Request::Status,
            1 => Request::Ping,
            2 => Request::DebugActors,
            _ => Request::DebugProgress {
                steps: 3,
                interval_ms: 10,
            },
        };
        i += 1;
        if !exchange(c, request, &who, &mut tally).await {
            client = None;
        }
    }
    tally
}

async fn killer_task(socket: PathBuf, until: Instant) -> (Tally, u64) {
    let who = "killer";
    let mut tally = Tally::default();
    let mut rng = StdRng::from_entropy();
    let mut client = connect(&socket, who, &mut tally).await;
    let mut killed = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..=700))).await;
        let Some(c) = client.as_mut() else {
            client = connect(&socket, who, &mut tally).await;
            continue;
        };
        let name = VICTIMS[rng.gen_range(0..VICTIMS.len())];
        let before = tally.ok;
        if !exchange(
            c,
            Request::DebugKillActor { name: name.into() },
            who,
            &mut tally,
        )
        .await
        {
            client = None;
        }
        killed += tally.ok - before;
    }
    (tally, killed)
}

#[tokio::test]
async fn requests_always_end_while_actors_die() {
    let mut d = TestDaemon::builder().config(CONFIG).start();
    let socket = d.socket();
    let until = Instant::now() + RUN_FOR;

    // `Client::request` futures are not `Send` (its callbacks are
    // `&mut dyn FnMut`), so the tasks run concurrently on this thread
    // rather than through `tokio::spawn`; they are all I/O-bound.
    let clients =
        futures::future::join_all((0..CLIENTS).map(|n| client_task(socket.clone(), n, until)));
    let killer = killer_task(socket.clone(), until);
    let (tallies, (killer_tally, killed)) = tokio::join!(clients, killer);

    let mut total = Tally::default();
    let mut per_client_ok = Vec::new();
    for tally in tallies {
        per_client_ok.push(tally.ok);
        total.merge(tally);
    }
    total.merge(killer_tally);

    eprintln!(
        "chaos: {} requests ok, {killed} kills, errors by kind {:?}, per client {per_client_ok:?}",
        total.ok, total.errors
    );
    assert!(
        d.is_running(),
        "bangerd died under chaos; stderr:\n{}",
        d.stderr_log()
    );
    assert!(
        total.failures.is_empty(),
        "{} failures (errors by kind: {:?}):\n{}",
        total.failures.len(),
        total.errors,
        total.failures.join("\n")
    );
    assert!(
        killed >= 10,
        "only {killed} kills succeeded (errors by kind: {:?})",
        total.errors
    );
    for (n, ok) in per_client_ok.iter().enumerate() {
        assert!(
            *ok >= 20,
            "client {n} completed only {ok} requests: the daemon barely served"
        );
    }

    // Afterwards: everything runs again, every kill was one restart, and
    // the daemon answers.
    let mut client = d.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let list = loop {
        match client.request(Request::DebugActors).await {
            Ok(Response::Actors(list)) if all_running(&list) => break list,
            Ok(Response::Actors(_)) | Err(ClientError::Daemon(_)) => {}
            other => panic!("DebugActors after the chaos: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "actors not all running 15 s after the chaos"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let restarts: u64 = list
        .iter()
        .filter(|a| VICTIMS.contains(&a.name.as_str()))
        .map(|a| u64::from(a.restart_count))
        .sum();
    assert_eq!(
        restarts, killed,
        "restart counts vs successful kills: {list:#?}"
    );
    match client.request(Request::Status).await {
        Ok(Response::Status(s)) => assert_eq!(s.pid, d.pid()),
        other => panic!("Status after the chaos: {other:?}"),
    }
}
