//! Chaos with real guests: while three busybox VMs are created in
//! parallel (and clients keep listing and showing them), `debug
//! kill-actor` kills random actors: the VM manager, the VMs' supervisors,
//! the router, the store, DNS, the TAP pool, the registries, events.
//!
//! Every request must get its final answer (a success, or an error that
//! says what went wrong) within a bound, and no VM may be lost or
//! duplicated: afterwards each name is listed at most once, each VM whose
//! create succeeded runs with exactly one QEMU, no QEMU runs without a VM,
//! and a create that failed left nothing behind (no record, TAP, lease,
//! DNS record, directory or process). Then the running VMs go through a
//! second round of kills (their supervisors re-adopt them) and are deleted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ErrorKind, ExitStatus, Request, Response, VmCreateRequest, VmInfo, VmState};
use banger_tests::vm::{
    assert_holds_only, busybox_setup, exec_eventually, list_vms, nft_ruleset, qemu_pids, try_ask,
    wait_actors_running, BOOT, SHORT,
};
use banger_tests::{error_chain, TestDaemon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NAMES: [&str; 3] = ["c1", "c2", "c3"];
/// Bound on a create's final answer under chaos.
const CREATE_BOUND: Duration = BOOT;
/// Bound on a short request's final answer (list, show, kill-actor): above
/// the daemon's own 30 s waits for an actor.
const SHORT_BOUND: Duration = Duration::from_secs(90);
/// Bound for everything to run again after the chaos.
const SETTLE: Duration = Duration::from_secs(120);

/// High restart budget so that the root supervisor never escalates.
const SUPERVISOR: &str = "
[supervisor]
max_restarts = 1000
restart_window_secs = 60
backoff_initial_ms = 50
backoff_max_ms = 400
";

/// What the clients saw; `failures` are things that must not happen.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    failures: Vec<String>,
}

impl Tally {
    fn error(&mut self, who: &str, what: &str, e: &banger_protocol::ErrorData, expected: bool) {
        *self
            .errors
            .entry(format!("{what}: {}", e.kind.as_str()))
            .or_default() += 1;
        if e.message.trim().is_empty() {
            self.failures
                .push(format!("{who}: {what} failed without a message: {e:?}"));
        }
        if !expected {
            self.failures
                .push(format!("{who}: {what} failed unexpectedly: {e:?}"));
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.failures.extend(other.failures);
    }
}

/// One create; `Some(info)` when it succeeded. A failure must be a daemon
/// error with a message; a lost connection or no answer is a failure.
async fn creator(d: &TestDaemon, image: &str, name: &str, tally: &mut Tally) -> Option<VmInfo> {
    let who = format!("create {name}");
    let mut c = d.client().await;
    let request = Request::VmCreate(VmCreateRequest {
        name: Some(name.into()),
        image: Some(image.into()),
        ..VmCreateRequest::default()
    });
    let mut stages: Vec<String> = Vec::new();
    let result = tokio::time::timeout(
        CREATE_BOUND,
        c.request_with_progress(request, |p| {
            if stages.last() != Some(&p.stage) {
                stages.push(p.stage.clone());
            }
        }),
    )
    .await;
    match result {
        Err(_) => {
            tally.failures.push(format!(
                "{who}: no answer within {CREATE_BOUND:?}; stages {stages:?}"
            ));
            None
        }
        Ok(Ok(Response::Vm(info))) => {
            eprintln!("{who}: created ({stages:?})");
            tally.ok += 1;
            if info.state != VmState::Running {
                tally
                    .failures
                    .push(format!("{who}: created but {}: {info:#?}", info.state));
            }
            Some(info)
        }
        Ok(Ok(other)) => {
            tally.failures.push(format!("{who}: answered {other:?}"));
            None
        }
        Ok(Err(ClientError::Daemon(e))) => {
            eprintln!("{who}: failed: {e} ({stages:?})");
            // Anything the daemon explains is acceptable for a create whose
            // actors are being killed; a name clash is not (names are unique).
            tally.error(&who, "create", &e, e.kind != ErrorKind::AlreadyExists);
            None
        }
        Ok(Err(e)) => {
            tally.failures.push(format!(
                "{who}: lost its connection: {}; stages {stages:?}",
                error_chain(&e)
            ));
            None
        }
    }
}

/// Lists and shows until `done`; every answer within [`SHORT_BOUND`].
async fn reader(d: &TestDaemon, n: usize, done: &tokio::sync::watch::Receiver<bool>) -> Tally {
    let who = format!("reader {n}");
    let mut tally = Tally::default();
    let mut c = d.client().await;
    let mut i = n;
    while !*done.borrow() {
        let request = match i % 5 {
            0 => Request::VmList,
            4 => Request::DebugActors,
            k => Request::VmShow {
                name: NAMES[k - 1].into(),
            },
        };
        i += 1;
        let what = request.name();
        match try_ask(&mut c, request.clone(), SHORT_BOUND).await {
            None => tally.failures.push(format!(
                "{who}: {what} got no answer within {SHORT_BOUND:?}"
            )),
            Some(Ok(Response::Vms(list))) => {
                tally.ok += 1;
                let mut names: Vec<&str> = list.iter().map(|v| v.name.as_str()).collect();
                let all = names.len();
                names.sort_unstable();
                names.dedup();
                if names.len() != all {
                    tally
                        .failures
                        .push(format!("{who}: a name listed twice: {list:#?}"));
                }
            }
            Some(Ok(Response::Vm(_))) | Some(Ok(Response::Actors(_))) => tally.ok += 1,
            Some(Ok(other)) => tally
                .failures
                .push(format!("{who}: {what} answered {other:?}")),
            Some(Err(ClientError::Daemon(e))) => {
                // While actors restart: unavailable or timed out; a VM not
                // reserved yet (or removed after a failed create): not
                // found, or still being created.
                let expected = matches!(
                    e.kind,
                    ErrorKind::Unavailable
                        | ErrorKind::Timeout
                        | ErrorKind::NotFound
                        | ErrorKind::InvalidState
                );
                tally.error(&who, what, &e, expected);
            }
            Some(Err(e)) => {
                tally.failures.push(format!(
                    "{who}: {what} lost its connection: {}",
                    error_chain(&e)
                ));
                c = d.client().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tally
}

/// Kills a random actor every 1.5–4 s until `done`.
async fn killer(
    d: &TestDaemon,
    victims: &[&str],
    done: &tokio::sync::watch::Receiver<bool>,
) -> (Tally, BTreeMap<String, u32>) {
    let who = "killer";
    let mut tally = Tally::default();
    let mut killed: BTreeMap<String, u32> = BTreeMap::new();
    let mut rng = StdRng::from_entropy();
    let mut c = d.client().await;
    let mut done = done.clone();
    loop {
        let pause = Duration::from_millis(rng.gen_range(1500..=4000));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = done.changed() => {}
        }
        if *done.borrow() {
            break;
        }
        let victim = victims[rng.gen_range(0..victims.len())];
        let request = Request::DebugKillActor {
            name: victim.into(),
        };
        match try_ask(&mut c, request, SHORT_BOUND).await {
            None => tally.failures.push(format!(
                "{who}: kill {victim} got no answer within {SHORT_BOUND:?}"
            )),
            Some(Ok(Response::ActorKilled { .. })) => {
                eprintln!("killed {victim}");
                *killed.entry(victim.to_string()).or_default() += 1;
                tally.ok += 1;
            }
            Some(Ok(other)) => tally
                .failures
                .push(format!("{who}: kill {victim} answered {other:?}")),
            Some(Err(ClientError::Daemon(e))) => {
                // A VM not made yet (or removed), an actor still restarting,
                // the VM manager restarting.
                let expected = matches!(
                    e.kind,
                    ErrorKind::NotFound
                        | ErrorKind::InvalidState
                        | ErrorKind::Unavailable
                        | ErrorKind::Timeout
                );
                tally.error(who, "kill", &e, expected);
            }
            Some(Err(e)) => {
                tally.failures.push(format!(
                    "{who}: kill {victim} lost its connection: {}",
                    error_chain(&e)
                ));
                c = d.client().await;
            }
        }
    }
    (tally, killed)
}

fn check(tally: &Tally, phase: &str) {
    eprintln!(
        "{phase}: {} answers ok, errors {:#?}",
        tally.ok, tally.errors
    );
    assert!(
        tally.failures.is_empty(),
        "{phase}: {} failures:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
}

/// Waits until no VM is `starting` (a crash restart may be under way) and
/// returns the list.
async fn settled(c: &mut Client) -> Vec<VmInfo> {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(Ok(Response::Vms(list))) = try_ask(c, Request::VmList, SHORT).await {
            if list
                .iter()
                .all(|v| !matches!(v.state, VmState::Starting | VmState::Crashed))
            {
                return list;
            }
            assert!(Instant::now() < deadline, "VMs not settled: {list:#?}");
        }
        assert!(Instant::now() < deadline, "vm list does not answer");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_actor_kills_during_parallel_creates() {
    let (mut d, _reg, image) = busybox_setup().await;
    // A restart budget for the chaos.
    let config = d.paths().config_file();
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(SUPERVISOR);
    std::fs::write(&config, text).expect("config");
    d.sigterm();
    assert!(
        d.wait_exit(Duration::from_secs(30)).is_some(),
        "bangerd did not stop"
    );
    d.restart();
    let nft = nft_ruleset(&d);

    // Round 1: three creates in parallel, readers, and random kills. A kill
    // of `vms` or of a VM's supervisor during a boot fails that create (a
    // new supervisor does not resume a boot); the other actors are listed
    // twice so that some creates get through.
    let victims = [
        "vms", "vm:c1", "vm:c2", "vm:c3", "router", "store", "dns", "taps", "images", "kernels",
        "events", "router", "store", "dns", "taps", "images", "kernels", "events",
    ];
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let creates = async {
        let mut tallies = Vec::new();
        let results = futures::future::join_all(NAMES.iter().map(|name| {
            let d = &d;
            let image = image.as_str();
            async move {
                let mut tally = Tally::default();
                let info = creator(d, image, name, &mut tally).await;
                (name.to_string(), info, tally)
            }
        }))
        .await;
        let _ = done_tx.send(true);
        let mut created = BTreeMap::new();
        for (name, info, tally) in results {
            tallies.push(tally);
            created.insert(name, info);
        }
        (created, tallies)
    };
    let readers = futures::future::join_all((0..2).map(|n| reader(&d, n, &done_rx)));
    let kills = killer(&d, &victims, &done_rx);
    let ((created, create_tallies), reader_tallies, (killer_tally, killed)) =
        tokio::join!(creates, readers, kills);
    let mut total = Tally::default();
    for t in create_tallies.into_iter().chain(reader_tallies) {
        total.merge(t);
    }
    total.merge(killer_tally);
    eprintln!("round 1 kills: {killed:?}");
    check(&total, "round 1");

    // Afterwards: every actor runs again; the VMs that were created run,
    // with one QEMU each; the failed ones left nothing behind.
    let mut c = d.client().await;
    wait_actors_running(&mut c, SETTLE).await;
    let listed = settled(&mut c).await;
    let ok: Vec<&str> = created
        .iter()
        .filter(|(_, info)| info.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    eprintln!(
        "created: {ok:?}; listed: {:?}",
        listed
            .iter()
            .map(|v| (&v.name, v.state))
            .collect::<Vec<_>>()
    );
    let held = assert_holds_only(&d, &mut c, &ok, &nft).await;
    for vm in &held {
        let before = created[&vm.name].as_ref().expect("created");
        assert_eq!(vm.id, before.id, "{} was replaced: {vm:#?}", vm.name);
        let (status, out, _) =
            exec_eventually(&mut c, &vm.name, &["busybox", "hostname"], SETTLE).await;
        assert_eq!(
            (status, out.trim()),
            (ExitStatus::Code(0), vm.name.as_str())
        );
    }

    // Round 2: the names of failed creates are free again (created with
    // lighter chaos: no kills of VM actors during the boots), then every
    // VM goes through kills of the VM actors while clients read.
    let failed: Vec<&str> = NAMES.iter().copied().filter(|n| !ok.contains(n)).collect();
    if !failed.is_empty() {
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let creates = async {
            let results = futures::future::join_all(failed.iter().map(|name| {
                let d = &d;
                let image = image.as_str();
                async move {
                    let mut tally = Tally::default();
                    let info = creator(d, image, name, &mut tally).await;
                    (info, tally)
                }
            }))
            .await;
            let _ = done_tx.send(true);
            results
        };
        let light = ["router", "events", "images"];
        let (results, (killer_tally, killed)) = tokio::join!(creates, killer(&d, &light, &done_rx));
        let mut total = Tally::default();
        total.merge(killer_tally);
        eprintln!("round 2 creates, kills: {killed:?}");
        for (name, (info, tally)) in failed.iter().zip(results) {
            total.merge(tally);
            assert!(
                info.is_some(),
                "create {name} failed again without VM actor kills"
            );
        }
        check(&total, "round 2 creates");
    }
    let before = list_vms(&mut c).await;
    assert_eq!(before.len(), NAMES.len(), "{before:#?}");

    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let vm_victims = ["vms", "vm:c1", "vm:c2", "vm:c3", "taps", "dns", "store"];
    let timer = async {
        tokio::time::sleep(Duration::from_secs(25)).await;
        let _ = done_tx.send(true);
    };
    let readers = futures::future::join_all((0..2).map(|n| reader(&d, n, &done_rx)));
    let ((), reader_tallies, (killer_tally, killed)) =
        tokio::join!(timer, readers, killer(&d, &vm_victims, &done_rx));
    let mut total = Tally::default();
    for t in reader_tallies {
        total.merge(t);
    }
    total.merge(killer_tally);
    eprintln!("round 3 kills: {killed:?}");
    check(&total, "round 3");
    wait_actors_running(&mut c, SETTLE).await;
    settled(&mut c).await;
    let held = assert_holds_only(&d, &mut c, &NAMES, &nft).await;
    for vm in &held {
        let was = before
            .iter()
            .find(|b| b.name == vm.name)
            .expect("listed before");
        assert_eq!(
            (vm.id.as_str(), vm.pid),
            (was.id.as_str(), was.pid),
            "{} was not re-adopted: {vm:#?}",
            vm.name
        );
        let (status, _, _) = exec_eventually(&mut c, &vm.name, &["busybox", "true"], SETTLE).await;
        assert_eq!(status, ExitStatus::Code(0));
    }

    for name in NAMES {
        match try_ask(
            &mut c,
            Request::VmDelete {
                name: name.into(),
                force: true,
            },
            SHORT * 2,
        )
        .await
        {
            Some(Ok(Response::Deleted { .. })) => {}
            other => panic!("delete {name}: {other:?}"),
        }
    }
    assert!(qemu_pids(&d).is_empty());
    assert_holds_only(&d, &mut c, &[], &nft).await;
}
