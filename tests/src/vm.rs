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
use crate::{error_chain, TestDaemon};

pub const BOOT: Duration = Duration::from_secs(300);
pub const SHORT: Duration = Duration::from_secs(60);

pub fn vm_config() -> &'static str {
    "[vm]\naccel = \"tcg\"\ncpus = 1\nmemory_mib = 384\nboot_timeout_secs = 240\nstop_timeout_secs = 20\n"
}

/// A daemon in its own namespace with the host kernel imported as `host`
/// and a busybox image pulled from a local registry (returns its name).
pub async fn busybox_setup() -> (TestDaemon, TestRegistry, String) {
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

/// Runs `argv` in the VM; returns (status, stdout, stderr).
pub async fn exec(c: &mut Client, name: &str, argv: &[&str]) -> (ExitStatus, String, String) {
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
