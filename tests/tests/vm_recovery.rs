//! Recovery, end to end, with real busybox guests under QEMU (TCG here),
//! each daemon in a network namespace of its own:
//!
//! - killing a VM's supervisor (`vm:<name>`) or the VM manager (`vms`)
//!   with `debug kill-actor` respawns them, and they re-adopt the running
//!   VMM (same QEMU pid, still one QEMU) instead of booting another;
//! - `kill -9` of bangerd in the middle of a create, at several stages,
//!   then a restart: the interrupted create leaves nothing behind (TAP,
//!   QEMU, nft rule, lease, DNS record, directories), the store agrees
//!   with the host, and a VM that was running before the kill is
//!   re-adopted and still works.

use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ExitStatus, Progress, Request, Response, VmCreateRequest, VmInfo, VmState};
use banger_tests::artifacts::run;
use banger_tests::vm::{
    assert_holds_only, busybox_setup, describe, exec_eventually, list_vms, nft_ruleset, qemu_pids,
    try_ask, wait_actors_running, BOOT, SHORT,
};
use banger_tests::{find_actor, TestDaemon};

/// How long a restarted supervisor, manager or daemon may take to be back.
const RECOVERY: Duration = Duration::from_secs(60);

fn create(image: &str, name: &str) -> Request {
    Request::VmCreate(VmCreateRequest {
        name: Some(name.into()),
        image: Some(image.into()),
        ..VmCreateRequest::default()
    })
}

/// Creates `name` and waits for it to run.
async fn create_running(c: &mut Client, image: &str, name: &str) -> VmInfo {
    let outcome = run(c, create(image, name), BOOT).await;
    match outcome.result {
        Ok(Response::Vm(info)) => {
            assert_eq!(info.state, VmState::Running, "{info:#?}");
            info
        }
        other => panic!(
            "create {name}: {}; progress: {:#?}",
            describe(other),
            outcome.progress
        ),
    }
}

/// `vm show`, retried while the VM's supervisor is being respawned.
async fn show_eventually(c: &mut Client, name: &str) -> VmInfo {
    let deadline = Instant::now() + RECOVERY;
    loop {
        match try_ask(c, Request::VmShow { name: name.into() }, SHORT).await {
            Some(Ok(Response::Vm(info))) => return info,
            Some(Err(ClientError::Daemon(e)))
                if e.kind == banger_protocol::ErrorKind::Unavailable =>
            {
                assert!(
                    Instant::now() < deadline,
                    "{name} unavailable for {RECOVERY:?}: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("vm show {name}: {other:?}"),
        }
    }
}

/// The VM runs on, re-adopted: the same QEMU (pid), the only one, and the
/// guest answers through its agent.
async fn assert_readopted(d: &TestDaemon, c: &mut Client, before: &VmInfo) {
    let now = show_eventually(c, &before.name).await;
    assert_eq!(now.state, VmState::Running, "{now:#?}");
    assert_eq!(now.pid, before.pid, "a different VMM: {now:#?}");
    assert_eq!(now.id, before.id);
    assert_eq!(
        qemu_pids(d),
        vec![before.pid.expect("a pid")],
        "exactly one QEMU"
    );
    let (status, out, _) =
        exec_eventually(c, &before.name, &["busybox", "hostname"], RECOVERY).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out.trim(), before.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vm_supervisor_and_vm_manager_readopt_the_running_vmm() {
    let (d, _reg, image) = busybox_setup().await;
    let mut c = d.client().await;
    let vm = create_running(&mut c, &image, "keep").await;
    let nft = nft_ruleset(&d);
    let (status, _, _) = exec_eventually(&mut c, "keep", &["busybox", "true"], SHORT).await;
    assert_eq!(status, ExitStatus::Code(0));

    let actors = wait_actors_running(&mut c, RECOVERY).await;
    let child = find_actor(&actors, "vm:keep")
        .unwrap_or_else(|| panic!("no vm:keep in {actors:#?}"))
        .clone();
    assert_eq!(child.parent.as_deref(), Some("vms"), "{child:?}");
    assert_eq!(child.restart_count, 0);

    // The VM's supervisor, through the real CLI.
    let out = d.banger(["debug", "kill-actor", "vm:keep"]);
    assert!(
        out.status.success(),
        "kill-actor vm:keep: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_readopted(&d, &mut c, &vm).await;
    let actors = wait_actors_running(&mut c, RECOVERY).await;
    let reborn = find_actor(&actors, "vm:keep").expect("vm:keep listed");
    assert_ne!(reborn.id, child.id, "{reborn:?}");
    assert_eq!(reborn.restart_count, 1, "{reborn:?}");
    assert_eq!(
        find_actor(&actors, "vms").map(|a| a.restart_count),
        Some(0),
        "killing vm:keep must not restart vms"
    );

    // Twice more in a row, quickly: still the one VMM.
    for _ in 0..2 {
        match try_ask(
            &mut c,
            Request::DebugKillActor {
                name: "vm:keep".into(),
            },
            SHORT,
        )
        .await
        {
            Some(Ok(Response::ActorKilled { .. })) => {}
            // Still being respawned from the kill before.
            Some(Err(ClientError::Daemon(e)))
                if e.kind == banger_protocol::ErrorKind::InvalidState => {}
            other => panic!("kill vm:keep: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_readopted(&d, &mut c, &vm).await;

    // The VM manager: its children die with it and are started again.
    let out = d.banger(["debug", "kill-actor", "vms"]);
    assert!(
        out.status.success(),
        "kill-actor vms: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_readopted(&d, &mut c, &vm).await;
    let actors = wait_actors_running(&mut c, RECOVERY).await;
    assert_eq!(
        find_actor(&actors, "vms").map(|a| a.restart_count),
        Some(1),
        "{actors:#?}"
    );
    assert!(find_actor(&actors, "vm:keep").is_some(), "{actors:#?}");

    // Unknown VM supervisors are a clear error.
    match try_ask(
        &mut c,
        Request::DebugKillActor {
            name: "vm:nope".into(),
        },
        SHORT,
    )
    .await
    {
        Some(Err(ClientError::Daemon(e))) => {
            assert_eq!(e.kind, banger_protocol::ErrorKind::NotFound, "{e:?}");
            assert!(e.hint.as_deref().unwrap_or("").contains("vm:keep"), "{e:?}");
        }
        other => panic!("kill vm:nope: {other:?}"),
    }

    // Stop and start still work with the re-adopted VMM, and nothing leaks.
    assert_holds_only(&d, &mut c, &["keep"], &nft).await;
    match try_ask(
        &mut c,
        Request::VmStop {
            name: "keep".into(),
            force: false,
        },
        SHORT * 2,
    )
    .await
    {
        Some(Ok(Response::Vm(info))) => assert_eq!(info.state, VmState::Stopped),
        other => panic!("stop after re-adoption: {other:?}"),
    }
    assert!(qemu_pids(&d).is_empty(), "QEMU still running after stop");
    delete_all(&mut c).await;
    assert_holds_only(&d, &mut c, &[], &nft).await;
}

/// Sends a create of `name` and SIGKILLs the daemon as soon as a progress
/// event of `stage` whose detail contains `needle` arrives. Returns the
/// progress seen.
async fn create_and_kill_at(
    d: &mut TestDaemon,
    image: &str,
    name: &str,
    stage: &str,
    needle: &str,
) -> Vec<Progress> {
    let pid = d.pid() as i32;
    let mut c = d.client().await;
    let mut seen = Vec::new();
    let mut killed = false;
    let result = tokio::time::timeout(
        BOOT,
        c.request_with_progress(create(image, name), |p| {
            if !killed && p.stage == stage && p.detail.contains(needle) {
                // SAFETY: plain kill(2) of the daemon this test started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed = true;
            }
            seen.push(p);
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("create {name}: no end within {BOOT:?}; progress {seen:#?}"));
    assert!(
        killed,
        "create {name} never reached stage {stage} ({needle}): {result:?}; progress {seen:#?}"
    );
    // After the agent's hello only the DNS record and the `running`
    // record are left: the daemon may finish (and answer) before the
    // SIGKILL lands. Before that stage it cannot.
    assert!(
        stage == "boot" || !matches!(result, Ok(Response::Vm(_))),
        "create {name} finished although the daemon was killed at {stage}: {result:?}"
    );
    assert!(d.sigkill().is_some(), "bangerd did not die");
    seen
}

async fn delete_all(c: &mut Client) {
    for vm in list_vms(c).await {
        match try_ask(
            c,
            Request::VmDelete {
                name: vm.name.clone(),
                force: true,
            },
            SHORT * 2,
        )
        .await
        {
            Some(Ok(Response::Deleted { .. })) => {}
            other => panic!("delete {}: {other:?}", vm.name),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_during_creates_leaves_nothing_behind_and_readopts() {
    let (mut d, _reg, image) = busybox_setup().await;
    let mut c = d.client().await;
    let keep = create_running(&mut c, &image, "keep").await;
    let nft = nft_ruleset(&d);
    drop(c);

    // Each stage: kill, restart, check. The running VM survives every kill.
    let stages = [
        // The reservation is made; the disks are being made.
        ("a", "reserve", "reserved"),
        // The VMM runs; the guest is booting, its agent not up yet.
        ("b", "launch", "started"),
        // The guest agent answered: the DNS record and the `running`
        // record follow within moments (the kill lands before or after).
        ("c", "boot", "agent is up"),
    ];
    let mut kept = vec!["keep".to_string()];
    for (name, stage, needle) in stages {
        let seen = create_and_kill_at(&mut d, &image, name, stage, needle).await;
        let last = seen.last().map(|p| p.stage.clone()).unwrap_or_default();
        d.restart();
        let mut c = d.client().await;
        assert_readopted_one(&d, &mut c, &keep).await;
        let listed = list_vms(&mut c).await;
        match listed.iter().find(|v| v.name == name) {
            None => eprintln!("{name}: killed at {stage} (last event {last}): undone"),
            Some(vm) => {
                // Only a create that had finished may survive, and then it
                // runs and answers.
                assert_eq!(
                    stage, "boot",
                    "the create killed at {stage} was kept: {vm:#?}"
                );
                eprintln!(
                    "{name}: killed at {stage} (last event {last}): kept, {}",
                    vm.state
                );
                let (status, out, _) =
                    exec_eventually(&mut c, name, &["busybox", "hostname"], RECOVERY).await;
                assert_eq!((status, out.trim()), (ExitStatus::Code(0), name));
                kept.push(name.to_string());
            }
        }
        let names: Vec<&str> = kept.iter().map(String::as_str).collect();
        assert_holds_only(&d, &mut c, &names, &nft).await;
        // Nothing half-made among the images and kernels either.
        for dir in ["images", "kernels"] {
            let staging: Vec<String> =
                banger_tests::vm::dir_entries(&d.paths().state_dir.join(dir))
                    .into_iter()
                    .filter(|e| e.ends_with(".staging"))
                    .collect();
            assert!(staging.is_empty(), "{dir}: {staging:?}");
        }
    }

    // A kill of the daemon right after a create was answered: the answer
    // came only once the `running` record was on disk, so that VM is kept
    // and, like the others, re-adopted.
    let mut c = d.client().await;
    let mut before = list_vms(&mut c).await;
    let answered = create_running(&mut c, &image, "d").await;
    assert!(d.sigkill().is_some());
    drop(c);
    d.restart();
    before.push(answered);
    kept.push("d".to_string());
    let mut c = d.client().await;
    for vm in &before {
        assert_readopted_one(&d, &mut c, vm).await;
    }
    let names: Vec<&str> = kept.iter().map(String::as_str).collect();
    assert_holds_only(&d, &mut c, &names, &nft).await;

    // The interrupted names are free again.
    let again = create_running(&mut c, &image, "a").await;
    assert_eq!(again.name, "a");
    delete_all(&mut c).await;
    assert_holds_only(&d, &mut c, &[], &nft).await;
}

/// Like [`assert_readopted`] for one VM among several.
async fn assert_readopted_one(d: &TestDaemon, c: &mut Client, before: &VmInfo) {
    let now = show_eventually(c, &before.name).await;
    assert_eq!(now.state, VmState::Running, "{now:#?}");
    assert_eq!(now.pid, before.pid, "a different VMM: {now:#?}");
    assert!(qemu_pids(d).contains(&before.pid.expect("a pid")));
    let (status, _, _) = exec_eventually(c, &before.name, &["busybox", "true"], RECOVERY).await;
    assert_eq!(status, ExitStatus::Code(0));
}
