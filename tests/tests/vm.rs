//! End to end: real guests under QEMU (TCG here), each test's daemon in a
//! network namespace of its own, images served from a local registry.
//!
//! A busybox image has no init, so the guest agent is its PID 1: it mounts
//! the kernel's modules disk, configures the NIC by MAC, and serves exec.
//! The tests check the VM through the agent, by ping from the namespace,
//! through banger's DNS, and that stop/start/delete leave nothing behind.

use std::net::Ipv4Addr;

use banger_protocol::client::ClientError;
use banger_protocol::{ExitStatus, Request, Response, VmCreateRequest, VmState};
use banger_tests::artifacts::run;
use banger_tests::vm::{
    ask, busybox_setup, describe, dig, exec, network, qemu_pids, vm, BOOT, SHORT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_vm_runs_with_the_agent_as_init_and_leaves_nothing_behind() {
    let (d, _reg, image) = busybox_setup().await;
    let mut c = d.client().await;

    let outcome = run(
        &mut c,
        Request::VmCreate(VmCreateRequest {
            name: Some("bb".into()),
            image: Some(image.clone()),
            ..VmCreateRequest::default()
        }),
        BOOT,
    )
    .await;
    let stages = outcome.stages();
    let info = match outcome.result {
        Ok(Response::Vm(info)) => info,
        other => panic!(
            "create failed: {}; progress: {:#?}",
            describe(other),
            outcome.progress
        ),
    };
    for stage in [
        "resolve", "reserve", "disks", "network", "launch", "boot", "dns",
    ] {
        assert!(
            stages.iter().any(|s| s == stage),
            "no {stage} stage in {stages:?}"
        );
    }
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.vmm, "qemu");
    assert_eq!(info.accel.as_deref(), Some("tcg"));
    let ip: Ipv4Addr = info.ip.expect("an address");
    assert!(info.agent_ready, "{info:?}");
    assert_eq!(qemu_pids(&d).len(), 1, "one QEMU for one VM");

    // The agent is init, and exec reports output and exit codes.
    let (status, out, _) = exec(&mut c, "bb", &["busybox", "cat", "/proc/1/comm"]).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out.trim(), "banger-agent");
    let (status, out, err) = exec(
        &mut c,
        "bb",
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
    )
    .await;
    assert_eq!(
        (status, out.as_str(), err.as_str()),
        (ExitStatus::Code(7), "out\n", "err\n")
    );
    let (_, hostname, _) = exec(&mut c, "bb", &["busybox", "hostname"]).await;
    assert_eq!(hostname.trim(), "bb");
    let (_, addr, _) = exec(&mut c, "bb", &["busybox", "ip", "-4", "addr"]).await;
    assert!(addr.contains(&ip.to_string()), "guest addresses: {addr}");

    // The guest answers on its address, from the namespace, and by name.
    let ping = d.exec_in_ns(["ping", "-c", "1", "-W", "5", &ip.to_string()]);
    assert!(
        ping.status.success(),
        "ping {ip}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let net = network(&mut c).await;
    let listen = net.dns.listen.expect("dns listens");
    assert_eq!(dig(&d, listen, "bb.vm"), ip.to_string());
    assert_eq!(dig(&d, listen, "BB.VM"), ip.to_string());
    assert_eq!(net.pool.in_use.len(), 1, "{:?}", net.pool);

    // A second create of the name is refused.
    let dup = ask(
        &mut c,
        Request::VmCreate(VmCreateRequest {
            name: Some("bb".into()),
            image: Some(image.clone()),
            ..Default::default()
        }),
        SHORT,
    )
    .await;
    assert!(
        matches!(&dup, Err(ClientError::Daemon(e)) if e.message.contains("name taken")),
        "{dup:?}"
    );
    // The image cannot be deleted while the VM uses it.
    let del = ask(
        &mut c,
        Request::ImageDelete {
            name: image.clone(),
        },
        SHORT,
    )
    .await;
    assert!(
        matches!(&del, Err(ClientError::Daemon(e)) if e.message.contains("bb")),
        "{del:?}"
    );

    // Stop: the VMM is gone, the TAP and DNS record are released.
    let stopped = vm(
        &mut c,
        Request::VmStop {
            name: "bb".into(),
            force: false,
        },
        SHORT * 2,
    )
    .await;
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(qemu_pids(&d).is_empty(), "QEMU still running after stop");
    assert_eq!(dig(&d, listen, "bb.vm"), "");
    assert!(network(&mut c).await.pool.in_use.is_empty());
    // Stopping twice is an InvalidState error naming the state.
    let again = ask(
        &mut c,
        Request::VmStop {
            name: "bb".into(),
            force: false,
        },
        SHORT,
    )
    .await;
    assert!(
        matches!(&again, Err(ClientError::Daemon(e)) if e.message.contains("stopped")),
        "{again:?}"
    );

    // Start again: same address.
    let started = vm(&mut c, Request::VmStart { name: "bb".into() }, BOOT).await;
    assert_eq!(started.state, VmState::Running);
    assert_eq!(started.ip, Some(ip));
    let (status, _, _) = exec(&mut c, "bb", &["busybox", "true"]).await;
    assert_eq!(status, ExitStatus::Code(0));

    // Delete: nothing is left.
    match ask(
        &mut c,
        Request::VmDelete {
            name: "bb".into(),
            force: true,
        },
        SHORT * 2,
    )
    .await
    {
        Ok(Response::Deleted { name }) => assert_eq!(name, "bb"),
        other => panic!("delete: {}", describe(other)),
    }
    assert!(qemu_pids(&d).is_empty(), "QEMU still running after delete");
    match ask(&mut c, Request::VmList, SHORT).await {
        Ok(Response::Vms(v)) => assert!(v.is_empty(), "{v:?}"),
        other => panic!("list: {}", describe(other)),
    }
    let net = network(&mut c).await;
    assert!(net.pool.in_use.is_empty(), "{:?}", net.pool);
    assert!(net.leases.is_empty(), "{:?}", net.leases);
    assert!(net.dns.records.is_empty(), "{:?}", net.dns.records);
    let vms_dir = d.paths().state_dir.join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms_dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM dirs left: {left:?}");
}
