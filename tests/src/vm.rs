//! Shared by the VM end-to-end tests and the VM benchmark: a daemon in a
//! network namespace of its own with the host kernel imported as `host`
//! and a busybox image (no init: the guest agent is PID 1) pulled from a
//! local registry, plus small request helpers.

use std::time::Duration;

use banger_image::testing::TestRegistry;
use banger_protocol::client::{Client, ClientError};
use banger_protocol::{
    ExitStatus, KernelImportRequest, NetworkStatus, OutputStream, Request, Response, VmExecRequest,
    VmInfo,
};

use crate::artifacts::{boot_kernel, busybox_layers, pull, pull_request, run};
use crate::oci::{config_json, push_list};
use crate::{error_chain, TestDaemon, TestDaemonBuilder};

pub const BOOT: Duration = Duration::from_secs(300);
pub const SHORT: Duration = Duration::from_secs(60);

pub fn vm_config() -> &'static str {
    "[vm]\naccel = \"tcg\"\ncpus = 1\nmemory_mib = 384\nboot_timeout_secs = 240\nstop_timeout_secs = 20\n"
}

/// A daemon in its own namespace with the host kernel imported as `host`
/// and a busybox image pulled from a local registry (returns its name).
pub async fn busybox_setup() -> (TestDaemon, TestRegistry, String) {
    busybox_setup_with_config(vm_config()).await
}

/// [`busybox_setup`] with another daemon config (e.g. [`vm_config`] plus
/// more `[vm]` keys).
pub async fn busybox_setup_with_config(config: &str) -> (TestDaemon, TestRegistry, String) {
    busybox_setup_with(TestDaemon::builder().config(config)).await
}

/// [`busybox_setup`] with a daemon from `builder` (which this puts in a
/// network namespace of its own).
pub async fn busybox_setup_with(builder: TestDaemonBuilder) -> (TestDaemon, TestRegistry, String) {
    let reg = TestRegistry::start();
    let blobs = busybox_layers("vm");
    reg.push_image(
        "tools/busyvm",
        "1.0",
        push_list(&blobs),
        &config_json("amd64"),
    )
    .await;
    let d = builder.netns().start();
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

pub async fn ask(
    c: &mut Client,
    request: Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let what = request.name();
    tokio::time::timeout(timeout, c.request(request))
        .await
        .unwrap_or_else(|_| panic!("{what} got no reply within {timeout:?}"))
}

pub async fn vm(c: &mut Client, request: Request, timeout: Duration) -> VmInfo {
    let what = format!("{request:?}");
    match ask(c, request, timeout).await {
        Ok(Response::Vm(info)) => info,
        other => panic!("{what}: {}", describe(other)),
    }
}

pub fn describe(r: Result<Response, ClientError>) -> String {
    match r {
        Ok(resp) => format!("unexpected {resp:?}"),
        Err(e) => error_chain(&e),
    }
}

/// Runs `argv` in the VM; returns (status, stdout, stderr). Panics on an
/// error.
pub async fn exec(c: &mut Client, name: &str, argv: &[&str]) -> (ExitStatus, String, String) {
    match try_exec(c, name, argv).await {
        Ok(done) => done,
        Err(e) => panic!("exec {argv:?}: {}", describe(Err::<Response, _>(e))),
    }
}

pub async fn network(c: &mut Client) -> NetworkStatus {
    match ask(c, Request::NetworkStatus, SHORT).await {
        Ok(Response::Network(s)) => s,
        other => panic!("network status: {}", describe(other)),
    }
}

pub fn dig(d: &TestDaemon, listen: std::net::SocketAddr, name: &str) -> String {
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

pub fn qemu_pids(d: &TestDaemon) -> Vec<u32> {
    d.processes_mentioning_root()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
                .unwrap_or(false)
        })
        .collect()
}

/// After a VM's delete: no VMM runs, no VM is listed, and no TAP in use,
/// lease, DNS record or VM directory is left.
pub async fn assert_nothing_left(d: &TestDaemon, c: &mut Client) {
    assert!(qemu_pids(d).is_empty(), "QEMU still running after delete");
    match ask(c, Request::VmList, SHORT).await {
        Ok(Response::Vms(v)) => assert!(v.is_empty(), "{v:?}"),
        other => panic!("list: {}", describe(other)),
    }
    let net = network(c).await;
    assert!(net.pool.in_use.is_empty(), "{:?}", net.pool);
    assert!(net.leases.is_empty(), "{:?}", net.leases);
    assert!(net.dns.records.is_empty(), "{:?}", net.dns.records);
    let vms_dir = d.paths().state_dir.join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms_dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM dirs left: {left:?}");
}

// Recovery and chaos checks (tests `vm_recovery` and `vm_chaos`).

/// Like [`ask`], but `None` instead of a panic when no reply comes in time.
pub async fn try_ask(
    c: &mut Client,
    request: Request,
    timeout: Duration,
) -> Option<Result<Response, ClientError>> {
    tokio::time::timeout(timeout, c.request(request)).await.ok()
}

/// `vm list`; panics on an error.
pub async fn list_vms(c: &mut Client) -> Vec<VmInfo> {
    match ask(c, Request::VmList, SHORT).await {
        Ok(Response::Vms(v)) => v,
        other => panic!("vm list: {}", describe(other)),
    }
}

/// A plain `VmExec` of `argv` (no stdin, no terminal).
pub fn exec_request(name: &str, argv: &[&str]) -> Request {
    Request::VmExec(VmExecRequest {
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        tty: None,
        stdin: false,
    })
}

/// Runs `argv` in the VM; returns (status, stdout, stderr) or the error.
pub async fn try_exec(
    c: &mut Client,
    name: &str,
    argv: &[&str],
) -> Result<(ExitStatus, String, String), ClientError> {
    let id = c.send(exec_request(name, argv)).await?;
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
    .unwrap_or_else(|_| panic!("exec {argv:?} in {name} got no reply within {SHORT:?}"));
    match result? {
        Response::Exited(status) => Ok((
            status,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )),
        other => panic!("exec {argv:?} in {name}: unexpected {other:?}"),
    }
}

/// [`try_exec`], retried while the daemon says the VM or its agent is
/// unavailable (a restarted supervisor or daemon reconnects to the agent
/// within moments). Panics on any other error or after `patience`.
pub async fn exec_eventually(
    c: &mut Client,
    name: &str,
    argv: &[&str],
    patience: Duration,
) -> (ExitStatus, String, String) {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match try_exec(c, name, argv).await {
            Ok(done) => return done,
            Err(ClientError::Daemon(e))
                if matches!(
                    e.kind,
                    banger_protocol::ErrorKind::Unavailable | banger_protocol::ErrorKind::Timeout
                ) && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("exec {argv:?} in {name}: {}", error_chain(&e)),
        }
    }
}

/// Polls `debug actors` until every actor, the `vm:<name>` supervisors
/// included, runs; returns that list. Panics after `timeout`.
pub async fn wait_actors_running(
    c: &mut Client,
    timeout: Duration,
) -> Vec<banger_protocol::ActorInfo> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(Ok(Response::Actors(list))) = try_ask(c, Request::DebugActors, SHORT).await {
            if crate::all_running(&list) {
                return list;
            }
            last = Some(list);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "actors not all running after {timeout:?}: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nft -s list ruleset` inside the daemon's namespace (no counters).
pub fn nft_ruleset(d: &TestDaemon) -> String {
    let out = d.exec_in_ns(["nft", "-s", "list", "ruleset"]);
    assert!(
        out.status.success(),
        "nft list ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The TAP devices (`bgtap*`) in the daemon's namespace.
pub fn taps_in_ns(d: &TestDaemon) -> Vec<String> {
    let links = d.ip(["-br", "link"]);
    links
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("bgtap"))
        .collect()
}

/// Entries of `dir` (file names), empty when it does not exist.
pub fn dir_entries(dir: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Asserts that the daemon holds exactly what the VMs in `running` need,
/// all of them running, and nothing of any other VM: `vm list` shows them
/// (each name once) and no other; each has one live QEMU (its pid) and no
/// other QEMU runs; the TAPs handed out, the address leases and the `vm`
/// DNS records are theirs (DNS records may be missing, never extra); every
/// TAP in the namespace is handed out to them or warm in the pool; the
/// nft ruleset is `nft_baseline`; the VM and run directories are theirs.
/// Returns the VMs as listed.
pub async fn assert_holds_only(
    d: &TestDaemon,
    c: &mut Client,
    running: &[&str],
    nft_baseline: &str,
) -> Vec<VmInfo> {
    use std::collections::BTreeSet;
    let listed = list_vms(c).await;
    let names: Vec<&str> = listed.iter().map(|v| v.name.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "a name listed twice: {names:?}");
    let wanted: BTreeSet<&str> = running.iter().copied().collect();
    assert_eq!(unique, wanted, "listed VMs: {listed:#?}");
    let mut pids = Vec::new();
    for vm in &listed {
        assert_eq!(
            vm.state,
            banger_protocol::VmState::Running,
            "{} is not running: {vm:#?}",
            vm.name
        );
        let pid = vm
            .pid
            .unwrap_or_else(|| panic!("{} has no pid: {vm:#?}", vm.name));
        pids.push(pid);
    }
    pids.sort_unstable();
    let mut qemus = qemu_pids(d);
    qemus.sort_unstable();
    assert_eq!(
        qemus, pids,
        "QEMU processes vs the pids of the running VMs {listed:#?}"
    );
    let owners: BTreeSet<String> = running.iter().map(|n| format!("vm:{n}")).collect();
    let net = network(c).await;
    let in_use: BTreeSet<String> = net.pool.in_use.iter().map(|l| l.owner.clone()).collect();
    assert_eq!(in_use, owners, "TAPs handed out: {:?}", net.pool);
    assert_eq!(net.pool.in_use.len(), running.len(), "{:?}", net.pool);
    for vm in &listed {
        let tap = vm
            .tap
            .clone()
            .unwrap_or_else(|| panic!("{} has no TAP", vm.name));
        assert!(
            net.pool
                .in_use
                .iter()
                .any(|l| l.tap == tap && l.owner == format!("vm:{}", vm.name)),
            "{}'s TAP {tap} is not handed to it: {:?}",
            vm.name,
            net.pool
        );
    }
    let leases: BTreeSet<String> = net.leases.iter().map(|l| l.owner.clone()).collect();
    assert_eq!(leases, owners, "leases: {:?}", net.leases);
    assert_eq!(net.leases.len(), running.len(), "{:?}", net.leases);
    for record in net.dns.records.iter().filter(|r| r.source == "vm") {
        let vm = listed.iter().find(|v| v.name == record.name);
        assert!(
            vm.is_some_and(|v| v.ip == Some(record.ip)),
            "DNS record {record:?} of no running VM: {listed:#?}"
        );
    }
    // And every running VM has its name (a restarted daemon or
    // supervisor publishes it again within moments).
    if net.dns.listen.is_some() {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut records = net.dns.records.clone();
        loop {
            let missing: Vec<&str> = listed
                .iter()
                .filter(|v| {
                    !records
                        .iter()
                        .any(|r| r.source == "vm" && r.name == v.name && Some(r.ip) == v.ip)
                })
                .map(|v| v.name.as_str())
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "running VMs without their DNS record: {missing:?}; records {records:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            records = network(c).await.dns.records;
        }
    }
    let pooled: BTreeSet<String> = net
        .pool
        .warm
        .iter()
        .cloned()
        .chain(net.pool.in_use.iter().map(|l| l.tap.clone()))
        .collect();
    for tap in taps_in_ns(d) {
        assert!(
            pooled.contains(&tap),
            "TAP {tap} in the namespace is neither warm nor handed out: {:?}",
            net.pool
        );
    }
    assert_eq!(nft_ruleset(d), nft_baseline, "the nft ruleset changed");
    let paths = d.paths();
    let mut ids: Vec<String> = listed.iter().map(|v| v.id.clone()).collect();
    ids.sort();
    assert_eq!(
        dir_entries(&paths.state_dir.join("vms")),
        ids,
        "VM directories"
    );
    let mut run_ids: Vec<String> = ids
        .iter()
        .map(|id| id[..id.len().min(12)].to_string())
        .collect();
    run_ids.sort();
    let runs = dir_entries(&paths.runtime_dir.join("vms"));
    assert!(
        runs.iter().all(|r| run_ids.contains(r)),
        "run directories {runs:?} vs VMs {run_ids:?}"
    );
    listed
}
