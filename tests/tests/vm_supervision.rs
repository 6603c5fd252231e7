//! VM supervision end to end, with real busybox guests under QEMU (TCG
//! here), each test's daemon in a network namespace of its own.
//!
//! The VMs use the default restart policy, `on-failure`: a VMM killed
//! from outside or a guest kernel panic is a crash, restarted with backoff
//! (a new QEMU, the same address, the DNS record back, exec working); one
//! crash more than `[vm] restart_max` within the window leaves the VM
//! `failed` with the reason and the console's last lines; a power-off from
//! inside the guest is a clean stop that is not restarted.
//!
//! Guest boots are the slow part (TCG), so each test boots as few as it
//! can and the two run side by side.

use std::time::{Duration, Instant};

use banger_protocol::{
    ExitStatus, Request, Response, RestartPolicy, VmCreateRequest, VmInfo, VmState,
};
use banger_tests::vm::{
    ask, busybox_setup_with_config, describe, dig, exec, exec_request, network, qemu_pids, vm,
    vm_config, BOOT, SHORT,
};
use banger_tests::TestDaemon;

/// At most 2 restarts within 10 minutes (the third crash fails the VM),
/// with short backoffs so the test does not wait on them.
fn config() -> String {
    format!(
        "{}restart_max = 2\nrestart_window_secs = 600\nrestart_backoff_initial_ms = 200\nrestart_backoff_max_ms = 1000\n",
        vm_config()
    )
}

async fn show(c: &mut banger_protocol::client::Client, name: &str) -> Option<VmInfo> {
    match ask(c, Request::VmShow { name: name.into() }, SHORT).await {
        Ok(Response::Vm(info)) => Some(info),
        // A supervisor between two states may briefly be unavailable.
        _ => None,
    }
}

/// Polls `vm show` until `done` holds; panics with the last view after
/// `timeout`.
async fn wait_vm(
    c: &mut banger_protocol::client::Client,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&VmInfo) -> bool,
) -> VmInfo {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(info) = show(c, name).await {
            if done(&info) {
                eprintln!("{name}: {what} after {:?}", start.elapsed());
                return info;
            }
            last = Some(info);
        }
        assert!(
            start.elapsed() < timeout,
            "{name}: not {what} after {timeout:?}; last seen: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sigkill(pid: u32) {
    // SAFETY: plain kill(2) of a QEMU this test's daemon started (the
    // caller checked it is one of its QEMU processes).
    let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

/// Runs `argv` in the VM through the agent, on a connection of its own,
/// for a command that takes the guest down (so no reply may come): the
/// outcome is ignored.
async fn exec_and_forget(d: &TestDaemon, name: &str, argv: &[&str]) {
    let mut c = d.client().await;
    let id = c.send(exec_request(name, argv)).await.expect("send exec");
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        c.wait_reply_with_output(id, &mut |_| {}, &mut |_| {}, &mut |_, _| {}),
    )
    .await;
    eprintln!("{name}: exec {argv:?} ended with {outcome:?}");
}

async fn create(c: &mut banger_protocol::client::Client, name: &str, image: &str) -> VmInfo {
    let info = vm(
        c,
        Request::VmCreate(VmCreateRequest {
            name: Some(name.into()),
            image: Some(image.into()),
            ..Default::default()
        }),
        BOOT,
    )
    .await;
    assert_eq!(info.state, VmState::Running, "{info:#?}");
    assert_eq!(info.restart, RestartPolicy::OnFailure);
    info
}

/// The VM runs as `pid`, answers exec, and `<name>.vm` resolves to `ip`.
async fn assert_serving(
    d: &TestDaemon,
    c: &mut banger_protocol::client::Client,
    info: &VmInfo,
    listen: std::net::SocketAddr,
) {
    let pid = info.pid.expect("a running VM has a pid");
    assert_eq!(qemu_pids(d), [pid], "one QEMU, the VM's: {info:#?}");
    let (status, out, _) = exec(c, &info.name, &["busybox", "hostname"]).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out.trim(), info.name);
    let ip = info.ip.expect("an address").to_string();
    assert_eq!(dig(d, listen, &format!("{}.vm", info.name)), ip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_panicked_vm_is_restarted_and_a_crash_loop_ends_failed() {
    let (d, _reg, image) = busybox_setup_with_config(&config()).await;
    let mut c = d.client().await;
    let first = create(&mut c, "sup", &image).await;
    let ip = first.ip.expect("an address");
    let listen = network(&mut c).await.dns.listen.expect("dns listens");
    assert_serving(&d, &mut c, &first, listen).await;
    let pid1 = first.pid.expect("pid");

    // Crash 1: QEMU killed from outside. Restarted: a new QEMU, the same
    // address, the DNS record back, the agent answering.
    sigkill(pid1);
    let second = wait_vm(&mut c, "sup", "restarted after kill -9", BOOT, |v| {
        v.state == VmState::Running && v.pid.is_some_and(|p| p != pid1)
    })
    .await;
    assert_eq!(second.restarts, 1, "{second:#?}");
    assert_eq!(second.ip, Some(ip));
    let reason = second.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("the VMM was killed by signal 9 (SIGKILL)"),
        "the restarted VM does not say why: {second:#?}"
    );
    assert_serving(&d, &mut c, &second, listen).await;
    let pid2 = second.pid.expect("pid");

    // Crash 2: a guest kernel panic. The agent as init has loaded the
    // pvpanic driver, so QEMU reports it (GUEST_PANICKED) and exits at
    // once; without it QEMU exits 0 after the reset, as after a power-off,
    // and the console tells them apart. Restarted either way.
    let (_, modules, _) = exec(&mut c, "sup", &["busybox", "cat", "/proc/modules"]).await;
    assert!(
        modules.lines().any(|l| l.starts_with("pvpanic_mmio ")),
        "the agent did not load pvpanic_mmio: {modules}"
    );
    exec_and_forget(&d, "sup", &["sh", "-c", "echo c > /proc/sysrq-trigger"]).await;
    let third = wait_vm(&mut c, "sup", "restarted after a panic", BOOT, |v| {
        v.state == VmState::Running && v.pid.is_some_and(|p| p != pid2)
    })
    .await;
    assert_eq!(third.restarts, 2, "{third:#?}");
    assert_eq!(third.ip, Some(ip));
    let reason = third.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("the guest kernel panicked")
            && reason.contains("Kernel panic - not syncing: sysrq triggered crash"),
        "the restarted VM does not say it panicked: {third:#?}"
    );
    assert_serving(&d, &mut c, &third, listen).await;
    let pid3 = third.pid.expect("pid");

    // Crash 3 within the window, with restart_max = 2: failed, with the
    // reason and the console's last lines, and nothing left running.
    sigkill(pid3);
    let failed = wait_vm(&mut c, "sup", "failed", SHORT, |v| {
        v.state == VmState::Failed
    })
    .await;
    let reason = failed.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("crashed 3 times within 600s; giving up")
            && reason.contains("the VMM was killed by signal 9 (SIGKILL)"),
        "{failed:#?}"
    );
    assert!(
        !failed.console_tail.is_empty(),
        "no console lines: {failed:#?}"
    );
    let console = std::fs::read_to_string(&failed.console_log).expect("the console log");
    let last_line = failed.console_tail.last().expect("a console line");
    assert!(
        console.contains(last_line.as_str()),
        "{last_line:?} is not from the console log"
    );
    assert_eq!(failed.pid, None);
    assert!(qemu_pids(&d).is_empty(), "QEMU left running: {failed:#?}");
    assert_eq!(dig(&d, listen, "sup.vm"), "");
    assert!(network(&mut c).await.pool.in_use.is_empty());
    // Failed is final: no restart comes later (backoffs are at most 1 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = show(&mut c, "sup").await.expect("vm show");
    assert_eq!(later.state, VmState::Failed, "{later:#?}");
    assert_eq!(later.restarts, 2);
    assert!(qemu_pids(&d).is_empty(), "a QEMU came back: {later:#?}");
    // `banger vm show` prints both.
    let shown = d.banger(["vm", "show", "sup"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("crashed 3 times"), "{text}");
    assert!(text.contains(last_line.trim()), "{text}");

    match ask(
        &mut c,
        Request::VmDelete {
            name: "sup".into(),
            force: true,
        },
        SHORT,
    )
    .await
    {
        Ok(Response::Deleted { name }) => assert_eq!(name, "sup"),
        other => panic!("delete: {}", describe(other)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_off_from_inside_the_guest_stops_the_vm_for_good() {
    let (d, _reg, image) = busybox_setup_with_config(&config()).await;
    let mut c = d.client().await;
    let info = create(&mut c, "off", &image).await;
    let listen = network(&mut c).await.dns.listen.expect("dns listens");
    assert_serving(&d, &mut c, &info, listen).await;

    exec_and_forget(&d, "off", &["busybox", "poweroff", "-f"]).await;
    let stopped = wait_vm(&mut c, "off", "stopped", SHORT, |v| {
        v.state != VmState::Running
    })
    .await;
    assert_eq!(stopped.state, VmState::Stopped, "{stopped:#?}");
    assert_eq!(stopped.last_error, None, "{stopped:#?}");
    assert_eq!(stopped.restarts, 0);
    assert_eq!(stopped.pid, None);
    assert!(qemu_pids(&d).is_empty(), "QEMU still running");
    assert_eq!(dig(&d, listen, "off.vm"), "");
    assert!(network(&mut c).await.pool.in_use.is_empty());
    // And it stays stopped: no restart after the (1 s at most) backoff.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = show(&mut c, "off").await.expect("vm show");
    assert_eq!(later.state, VmState::Stopped, "{later:#?}");
    assert_eq!(later.restarts, 0);
    assert!(qemu_pids(&d).is_empty(), "a QEMU came back");

    match ask(
        &mut c,
        Request::VmDelete {
            name: "off".into(),
            force: true,
        },
        SHORT,
    )
    .await
    {
        Ok(Response::Deleted { name }) => assert_eq!(name, "off"),
        other => panic!("delete: {}", describe(other)),
    }
}
