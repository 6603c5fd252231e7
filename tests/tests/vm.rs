//! End to end: real guests under QEMU (TCG here), each test's daemon in a
//! network namespace of its own, images served from a local registry.
//!
//! A busybox image has no init, so the guest agent is its PID 1: it mounts
//! the kernel's modules disk, configures the NIC by MAC, and serves exec.
//! The tests check the VM through the agent, by ping from the namespace,
//! through banger's DNS, and that stop/start/delete leave nothing behind.

use std::net::Ipv4Addr;
use std::time::Duration;

use banger_image::testing::TestRegistry;
use banger_protocol::client::{Client, ClientError};
use banger_protocol::{
    ExitStatus, KernelImportRequest, NetworkStatus, OutputStream, Request, Response,
    VmCreateRequest, VmExecRequest, VmInfo, VmState,
};
use banger_tests::artifacts::{boot_kernel, busybox_layers, pull, pull_request, run};
use banger_tests::oci::{config_json, push_list};
use banger_tests::{error_chain, TestDaemon};

const BOOT: Duration = Duration::from_secs(300);
const SHORT: Duration = Duration::from_secs(60);

fn vm_config() -> &'static str {
    "[vm]\naccel = \"tcg\"\ncpus = 1\nmemory_mib = 384\nboot_timeout_secs = 240\nstop_timeout_secs = 20\n"
}

/// A daemon in its own namespace with the host kernel imported as `host`
/// and a busybox image pulled from a local registry (returns its name).
async fn busybox_setup() -> (TestDaemon, TestRegistry, String) {
    let reg = TestRegistry::start();
    let blobs = busybox_layers("vm");
    reg.push_image(
        "tools/busyvm",
        "1.0",
        push_list(&blobs),
        &config_json("amd64"),
    )
    .await;
    let d = TestDaemon::builder().netns().config(vm_config()).start();
    let inside = d.netns().expect("netns").forward_to_host(reg.addr());
    let reference = format!("{inside}/tools/busyvm:1.0");
    let mut c = d.client().await;
    let (kernel, initrd, version) = boot_kernel();
    let imported = run(
        &mut c,
        Request::KernelImport(KernelImportRequest {
            name: "host".into(),
            kernel: kernel.display().to_string(),
            initrd: Some(initrd.display().to_string()),
            modules: Some(format!("/lib/modules/{version}")),
        }),
        SHORT,
    )
    .await;
    imported.kernel();
    let mut req = pull_request(&reference, Some("busy"));
    req.kernel = Some("host".into());
    let image = pull(&d, req).await.image();
    assert!(image.has_agent, "the image must carry the agent: {image:?}");
    assert!(!image.has_systemd);
    (d, reg, image.name)
}

async fn ask(c: &mut Client, request: Request, timeout: Duration) -> Result<Response, ClientError> {
    let what = request.name();
    tokio::time::timeout(timeout, c.request(request))
        .await
        .unwrap_or_else(|_| panic!("{what} got no reply within {timeout:?}"))
}

async fn vm(c: &mut Client, request: Request, timeout: Duration) -> VmInfo {
    let what = format!("{request:?}");
    match ask(c, request, timeout).await {
        Ok(Response::Vm(info)) => info,
        other => panic!("{what}: {}", describe(other)),
    }
}

fn describe(r: Result<Response, ClientError>) -> String {
    match r {
        Ok(resp) => format!("unexpected {resp:?}"),
        Err(e) => error_chain(&e),
    }
}

/// Runs `argv` in the VM; returns (status, stdout, stderr).
async fn exec(c: &mut Client, name: &str, argv: &[&str]) -> (ExitStatus, String, String) {
    let request = Request::VmExec(VmExecRequest {
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        tty: None,
        stdin: false,
    });
    let id = c.send(request).await.expect("send exec");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = tokio::time::timeout(
        SHORT,
        c.wait_reply_with_output(
            id,
            &mut |_| {},
            &mut |_| {},
            &mut |stream, data| match stream {
                OutputStream::Stdout => out.extend(data),
                OutputStream::Stderr => err.extend(data),
            },
        ),
    )
    .await
    .expect("exec answered in time");
    match result {
        Ok(Response::Exited(status)) => (
            status,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        ),
        other => panic!("exec {argv:?}: {}", describe(other)),
    }
}

async fn network(c: &mut Client) -> NetworkStatus {
    match ask(c, Request::NetworkStatus, SHORT).await {
        Ok(Response::Network(s)) => s,
        other => panic!("network status: {}", describe(other)),
    }
}

fn dig(d: &TestDaemon, listen: std::net::SocketAddr, name: &str) -> String {
    let out = d.exec_in_ns([
        "dig",
        "+short",
        "+time=2",
        "+tries=2",
        &format!("@{}", listen.ip()),
        "-p",
        &listen.port().to_string(),
        name,
        "A",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn qemu_pids(d: &TestDaemon) -> Vec<u32> {
    d.processes_mentioning_root()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
                .unwrap_or(false)
        })
        .collect()
}

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
