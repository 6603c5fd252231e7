//! End to end: real guests under QEMU (TCG here), each test's daemon in a
//! network namespace of its own, images served from a local registry.
//!
//! A busybox image has no init, so the guest agent is its PID 1: it mounts
//! the kernel's modules disk, configures the NIC by MAC, and serves exec.
//! The tests check the VM through the agent, by ping from the namespace,
//! through banger's DNS, and that stop/start/delete leave nothing behind.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_protocol::client::ClientError;
use banger_protocol::{ExitStatus, Request, Response, VmCreateRequest, VmState};
use banger_tests::artifacts::{images_dir, run};
use banger_tests::vm::{
    ask, assert_nothing_left, busybox_setup, describe, dig, exec, network, qemu_pids, vm, BOOT,
    SHORT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_vm_runs_with_the_agent_as_init_and_leaves_nothing_behind() {
    let (d, _reg, image) = busybox_setup().await;
    let mut c = d.client().await;

    // Detached: the CLI returns while the daemon boots the VM, and a
    // watcher follows the create from its first stage.
    let detached = d.banger([
        "vm", "create", "--detach", "--name", "bb", "--image", &image, "--json",
    ]);
    assert!(
        detached.status.success(),
        "vm create --detach: {}",
        String::from_utf8_lossy(&detached.stderr)
    );
    let created: serde_json::Value = String::from_utf8_lossy(&detached.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("vm").is_some())
        .unwrap_or_else(|| {
            panic!(
                "no vm line in {}",
                String::from_utf8_lossy(&detached.stdout)
            )
        });
    let early = created["vm"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(early, "running", "--detach waited for the boot: {created}");
    // Ctrl-C in a `vm watch` stops that watcher, not the create.
    let mut watcher = d
        .banger_command(["vm", "watch", "bb"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vm watch");
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watcher.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT the watcher");
    let waited = Instant::now();
    let code = loop {
        if let Some(status) = watcher.try_wait().expect("wait for vm watch") {
            break status.code();
        }
        assert!(
            waited.elapsed() < SHORT,
            "vm watch did not end on Ctrl-C within {SHORT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut watch_err = String::new();
    if let Some(mut e) = watcher.stderr.take() {
        let _ = e.read_to_string(&mut watch_err);
    }
    assert_eq!(code, Some(130), "vm watch after Ctrl-C: {watch_err}");
    let outcome = run(&mut c, Request::VmWatch { name: "bb".into() }, BOOT).await;
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
    // The pool is warm by now (the image pull took longer than filling
    // it): the TAP came with the reservation, in its one durable write.
    let tap_event = outcome
        .progress
        .iter()
        .find(|p| p.stage == "network")
        .expect("a network event");
    assert!(
        tap_event.detail.contains("with the reservation"),
        "the TAP was not handed out with the reservation: {tap_event:?}"
    );
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.vmm, "qemu");
    assert_eq!(info.accel.as_deref(), Some("tcg"));
    let ip: Ipv4Addr = info.ip.expect("an address");
    assert!(info.agent_ready, "{info:?}");
    assert_eq!(qemu_pids(&d).len(), 1, "one QEMU for one VM");
    // bangerd runs at nice -10; its guest does not inherit that.
    let (threads, group) = banger_tests::nice_values(qemu_pids(&d)[0]);
    assert!(
        !threads.is_empty() && threads.iter().all(|&n| n == 0),
        "QEMU's threads at nice 0: {threads:?}"
    );
    assert!(group.is_none_or(|g| g == 0), "QEMU's autogroup: {group:?}");
    assert!(banger_tests::nice_values(d.pid())
        .0
        .iter()
        .all(|&n| n == -10));

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

    // /root is the work disk, grown to the VM's disk size (a clone of the
    // image's per-size template), and what is written there is the VM's.
    let (_, df, _) = exec(&mut c, "bb", &["busybox", "df", "-k", "/root"]).await;
    let total_kib: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df /root: {df}"));
    let disk_kib = info.disk_bytes >> 10;
    assert!(
        total_kib > disk_kib * 9 / 10 && total_kib <= disk_kib,
        "/root has {total_kib} KiB, the VM's disk is {disk_kib} KiB:\n{df}"
    );
    let (status, _, _) = exec(
        &mut c,
        "bb",
        &["sh", "-c", "echo kept > /root/mark && busybox sync"],
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));

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

    // `vm watch` on a VM with nothing going on returns its state at once.
    let watched = d.banger(["vm", "watch", "bb"]);
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(
        String::from_utf8_lossy(&watched.stdout).contains("running"),
        "{}",
        String::from_utf8_lossy(&watched.stdout)
    );

    // An interactive shell through the agent: the CLI on a terminal gets a
    // PTY in the guest of the terminal's size, and the shell's exit code.
    let (code, screen) = pty_session(
        d.banger_command(["vm", "exec", "-t", "bb", "--", "/bin/sh"]),
        (33, 101),
        &[
            ("busybox stty size; echo $((6*7))\n", "42"),
            ("exit 3\n", ""),
        ],
    );
    assert_eq!(code, Some(3), "screen:\n{screen}");
    assert!(screen.contains("33 101"), "no guest tty size in:\n{screen}");

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
    let (_, mark, _) = exec(&mut c, "bb", &["busybox", "cat", "/root/mark"]).await;
    assert_eq!(mark.trim(), "kept", "the work disk survives stop/start");
    // The per-image templates are unchanged by the VM's writes.
    let templates = std::fs::read_dir(images_dir(&d))
        .expect("images dir")
        .map(|e| e.expect("entry").path().join("templates"))
        .find(|p| p.is_dir())
        .expect("the image has a templates directory");
    let work_template = templates.join(format!("work-{}.ext4", info.disk_bytes));
    let dump = Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(&work_template)
        .output()
        .expect("debugfs");
    let listing = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.status.success() && !listing.contains("mark"),
        "{}: {listing}",
        work_template.display()
    );
    assert!(templates.join("root.qcow2").is_file());

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
    assert_nothing_left(&d, &mut c).await;
}

/// Runs `cmd` on a new pseudo-terminal of `size` (rows, cols), typing each
/// step's input once the previous step's expected text has appeared on the
/// screen. Returns the exit code and everything the terminal showed.
fn pty_session(
    mut cmd: Command,
    size: (u16, u16),
    steps: &[(&str, &str)],
) -> (Option<i32>, String) {
    let winsize = nix::pty::Winsize {
        ws_row: size.0,
        ws_col: size.1,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&winsize), None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    cmd.stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    let mut child = cmd.spawn().expect("spawn the CLI on a pty");
    drop(cmd); // closes our copies of the slave
    let mut master = std::fs::File::from(pty.master);
    let screen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let reader = {
        let mut m = master.try_clone().expect("dup master");
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last slave holder exits.
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        })
    };
    let shown =
        |s: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&s.lock().expect("screen")).into_owned();
    let deadline = Instant::now() + SHORT;
    let mut expected_after = 0;
    for (input, expect) in steps {
        master
            .write_all(input.as_bytes())
            .expect("type into the pty");
        if expect.is_empty() {
            continue;
        }
        loop {
            let text = shown(&screen);
            if text[expected_after.min(text.len())..].contains(expect) {
                expected_after = text.len();
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{expect:?} never appeared on the terminal:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the session did not end:\n{}", shown(&screen));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(master);
    let _ = reader.join();
    (status.code(), shown(&screen))
}
