//! The golden image, built and then used the way the README's first
//! command uses it.
//!
//! 1. `ImageBuild` through a real `bangerd`, which runs mmdebstrap against
//!    Debian's archive (deb.debian.org; the one test that leaves loopback)
//!    and turns the tree into a kernel, an ext4 rootfs and a work seed.
//!    The daemon runs in the host namespace with networking disabled.
//! 2. The same state directory is then served by a daemon inside a
//!    namespace of the test's own, with networking on (the archive is not
//!    reachable from there, and building twice would be too slow), and the
//!    real CLI, run inside that namespace, drives a systemd guest: `vm run`
//!    with a command, `vm ssh` (exit codes pass through), plain `ssh` to
//!    the address `<name>.vm` resolves to with strict host key checking
//!    against the VM's known-hosts file, `vm exec` (the agent is a systemd
//!    service), stop, start, ssh again, delete and nothing left behind.
//!
//! Two guest boots under TCG; the whole test takes a few minutes.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use banger_protocol::{ExitStatus, ImageBuildRequest, Request, Response, VmState};
use banger_tests::artifacts::{
    ask, image_staging, images_dir, kernel_show, managed_public_key, run,
};
use banger_tests::ext4::Ext4Image;
use banger_tests::vm::{self, assert_nothing_left, dig, exec, network, qemu_pids, BOOT, SHORT};
use banger_tests::TestDaemon;

const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// systemd wants more memory than the busybox guests of `vm.rs`. The
/// guests' resolver is an address of TEST-NET-1 (never queried), to see
/// that it reaches their `/etc/resolv.conf`.
const GOLDEN_VM_CONFIG: &str = "[vm]\naccel = \"tcg\"\ncpus = 2\nmemory_mib = 1024\n\
boot_timeout_secs = 280\nstop_timeout_secs = 60\nguest_dns = \"192.0.2.53\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_debian_bookworm_then_boot_it_with_systemd_and_ssh() {
    assert!(
        Path::new("/usr/bin/mmdebstrap").exists(),
        "mmdebstrap is missing: apt-get install mmdebstrap"
    );
    let mut d = TestDaemon::start();
    let mut client = d.client().await;
    let started = Instant::now();
    let req = ImageBuildRequest {
        name: "debian-bookworm".into(),
        suite: None,
        packages: vec!["less".into()],
        size: None,
        mirror: None,
    };
    let outcome = run(&mut client, Request::ImageBuild(req), BUILD_TIMEOUT).await;
    let took = started.elapsed();
    eprintln!("image build took {took:?}");

    // Progress streamed all along, not only at the end.
    let stages = outcome.stages();
    assert_eq!(
        stages.first().map(String::as_str),
        Some("build"),
        "{stages:?}"
    );
    assert_eq!(
        stages.last().map(String::as_str),
        Some("publish"),
        "{stages:?}"
    );
    assert!(stages.iter().any(|s| s == "inject"), "{stages:?}");
    let build_lines = outcome.of_stage("build").len();
    assert!(build_lines > 10, "only {build_lines} build progress lines");
    let first_ms = outcome
        .progress
        .first()
        .map(|p| p.elapsed_ms)
        .unwrap_or(u64::MAX);
    assert!(
        u128::from(first_ms) * 4 < took.as_millis(),
        "the first progress frame came late ({first_ms} ms of {took:?})"
    );
    let image = match outcome.result {
        Ok(Response::Image(image)) => image,
        other => panic!(
            "the build failed: {other:?}\nlast progress: {:?}",
            outcome.progress.iter().rev().take(20).collect::<Vec<_>>()
        ),
    };

    assert_eq!(image.name, "debian-bookworm");
    assert!(image.managed);
    assert!(image.has_init && image.has_sshd, "{image:?}");
    assert!(image.layers.is_empty());
    assert!(image.source.contains("less"), "{}", image.source);

    // The kernel that came with the tree.
    let kernel_name = image.kernel.clone().expect("the image has a kernel");
    let version = kernel_name
        .strip_prefix("debian-bookworm-")
        .unwrap_or_else(|| panic!("kernel name {kernel_name}"));
    let k = kernel_show(&mut client, &kernel_name)
        .await
        .expect("the kernel is registered");
    assert_eq!(k.version.as_deref(), Some(version));
    assert_eq!(k.format, "bzimage");
    assert!(k.backends.iter().any(|b| b == "qemu"), "{:?}", k.backends);
    let initrd = k.initrd_path.as_deref().expect("an initrd");
    assert!(std::fs::metadata(initrd).expect("initrd").len() > 1 << 20);
    let modules = Path::new(k.modules_path.as_deref().expect("modules"));
    assert!(
        modules.join("modules.dep").is_file(),
        "{}",
        modules.display()
    );
    assert!(modules.join("kernel").is_dir(), "{}", modules.display());

    // The rootfs.
    let rootfs = Path::new(&image.rootfs_path);
    assert!(rootfs.starts_with(images_dir(&d).join(&image.id)));
    let fs = Ext4Image::new(rootfs);
    assert!(fs.is_ext4());
    assert_eq!(
        fs.stat("/usr/bin/less").expect("/usr/bin/less").kind,
        "regular"
    );
    let generator = fs
        .stat("/etc/systemd/system/sysinit.target.wants/systemd-network-generator.service")
        .expect("systemd-network-generator is enabled");
    assert_eq!(generator.kind, "symlink");
    assert!(fs.exists("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"));
    assert!(fs.exists("/usr/sbin/sshd"));
    // No host keys in the image: each VM makes its own before sshd starts.
    assert!(fs.exists("/etc/ssh/sshd_config"));
    for kind in ["rsa", "ecdsa", "ed25519"] {
        let key = format!("/etc/ssh/ssh_host_{kind}_key");
        assert!(!fs.exists(&key), "{key} is in the image");
    }
    assert!(fs.exists("/etc/systemd/system/ssh.service.wants/banger-ssh-host-keys.service"));
    // The agent, as a systemd service.
    assert!(image.has_agent && image.has_systemd, "{image:?}");
    assert_eq!(
        fs.stat("/usr/local/bin/banger-agent")
            .expect("the agent")
            .kind,
        "regular"
    );
    assert!(fs.exists("/etc/systemd/system/sysinit.target.wants/banger-agent.service"));
    let unit = fs.read_string("/etc/systemd/system/banger-agent.service");
    assert!(unit.contains("--mount-work-disk"), "{unit}");
    // ...which mounts the work disk, not fstab.
    let fstab = fs.read_string("/etc/fstab");
    assert!(!fstab.contains("banger-work"), "/etc/fstab: {fstab}");
    assert_eq!(fs.read_string("/etc/hostname"), "debian-bookworm\n");
    let keys = fs
        .stat("/root/.ssh/authorized_keys")
        .expect("authorized_keys");
    assert_eq!((keys.mode, keys.uid), (0o600, 0));
    assert!(fs
        .read_string("/root/.ssh/authorized_keys")
        .contains(&managed_public_key(&d)));
    assert!(
        fs.exists(&format!("/lib/modules/{version}/modules.dep"))
            || fs.exists(&format!("/usr/lib/modules/{version}/modules.dep"))
    );

    let seed = Ext4Image::new(image.work_seed_path.as_deref().expect("a work seed"));
    assert!(seed
        .read_string("/.ssh/authorized_keys")
        .contains(&managed_public_key(&d)));

    match ask(&mut client, Request::ImageCatalog).await {
        Ok(Response::ImageCatalog(entries)) => {
            let e = entries
                .iter()
                .find(|e| e.name == "debian-bookworm")
                .expect("entry");
            assert!(e.present && e.default, "{e:?}");
        }
        other => panic!("ImageCatalog: {other:?}"),
    }
    assert!(image_staging(&d).is_empty());

    let image_id = image.id.clone();
    drop(client);

    // Phase 2: the same state, now in a namespace with networking.
    d.sigterm();
    assert!(
        d.wait_exit(Duration::from_secs(30)).is_some(),
        "bangerd did not stop on SIGTERM"
    );
    d.move_into_netns(GOLDEN_VM_CONFIG);
    boot_the_golden_image(&d, &image_id).await;
}

/// The README's first command on a machine with nothing built: `banger vm
/// run -- uname -a` (its branch without a terminal) gets the default image
/// from the catalog, which means building it from Debian's archive, boots
/// it and runs the command in it. Guest networking is off here (the
/// daemon is in the host's namespace, where the archive is reachable), so
/// the command goes through the guest agent rather than SSH; the test
/// above covers networking and SSH on the same kind of image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_vm_run_builds_the_default_image_and_runs_a_command() {
    let d = TestDaemon::builder()
        .config(format!("[network]\nenabled = false\n{GOLDEN_VM_CONFIG}"))
        .start();
    let mut cmd = d.banger_command(["vm", "run", "--rm", "--name", "readme", "--", "uname", "-a"]);
    cmd.env_remove("TERM");
    let out = d.run_command(cmd, BUILD_TIMEOUT + BOOT);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{}",
        show_output("banger vm run -- uname -a", &out)
    );
    // uname -a in the guest: its kernel, its hostname.
    assert!(
        stdout.starts_with("Linux readme ") && stdout.contains("cloud-amd64"),
        "stdout: {stdout}"
    );
    assert!(
        stderr.contains("getting it from the catalog"),
        "the image was not built on demand: {stderr}"
    );
    assert!(stderr.contains("readme is up"), "stderr: {stderr}");

    // --rm: the VM is gone; the image stays for the next run.
    let list = d.banger(["vm", "list", "--json"]);
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout).expect("vm list JSON");
    assert_eq!(vms.as_array().map(Vec::len), Some(0), "{vms}");
    let list = d.banger(["image", "list", "--json"]);
    assert!(
        text(&list.stdout).contains("\"debian-bookworm\""),
        "{}",
        text(&list.stdout)
    );
    assert!(qemu_pids(&d).is_empty(), "QEMU still running after --rm");
    assert!(image_staging(&d).is_empty());
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show_output(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs the CLI in the daemon's namespace; it must succeed.
fn banger_ok(d: &TestDaemon, args: &[&str], timeout: Duration) -> Output {
    let out = d.banger_in_netns(args, timeout);
    assert!(
        out.status.success(),
        "{}",
        show_output(&format!("banger {}", args.join(" ")), &out)
    );
    out
}

/// The system ssh, run in the namespace, as a user would run it by hand:
/// the managed key, the VM's known-hosts file and strict checking.
fn plain_ssh(d: &TestDaemon, key: &str, known_hosts: &str, target: &str, command: &str) -> Output {
    let ns = d.netns().expect("the daemon has a namespace");
    let mut cmd = ns.command("ssh");
    cmd.args(["-i", key])
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", "ConnectTimeout=15", "-o", "LogLevel=ERROR"])
        .args(["-o", &format!("UserKnownHostsFile={known_hosts}")])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "HostKeyAlias=gold"])
        .arg(format!("root@{target}"))
        .arg(command);
    d.run_command(cmd, SHORT)
}

async fn boot_the_golden_image(d: &TestDaemon, image_id: &str) {
    let mut c = d.client().await;
    let started = Instant::now();

    // The README's first command (the default image is the catalog's
    // default, debian-bookworm), with a command instead of a shell.
    // stdin is not a terminal: it must never prompt.
    let out = d.banger_in_netns(
        ["vm", "run", "--name", "gold", "--", "cat", "/etc/hostname"],
        BOOT + SHORT,
    );
    let boot_took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        show_output("banger vm run", &out)
    );
    assert_eq!(
        text(&out.stdout),
        "gold\n",
        "{}",
        show_output("vm run", &out)
    );
    let stderr = text(&out.stderr);
    for stage in [
        "[resolve]",
        "[disks]",
        "[network]",
        "[launch]",
        "[boot]",
        "[ssh]",
        "[dns]",
    ] {
        assert!(stderr.contains(stage), "no {stage} progress: {stderr}");
    }
    assert!(stderr.contains("gold is up at"), "{stderr}");
    eprintln!("vm run (create, boot, ssh) took {boot_took:?}");

    let info = vm::vm(
        &mut c,
        Request::VmShow {
            name: "gold".into(),
        },
        SHORT,
    )
    .await;
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.image, "debian-bookworm");
    assert_eq!(info.accel.as_deref(), Some("tcg"));
    assert!(info.has_sshd && info.agent_ready, "{info:?}");
    let ip = info.ip.expect("an address");
    assert_eq!(qemu_pids(d).len(), 1, "one QEMU for one VM");
    // The kernel came from this image's /boot, so the image has its
    // modules: no modules disk is attached.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", qemu_pids(d)[0])).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("id=work"), "QEMU: {cmdline}");
    assert!(!cmdline.contains("id=modules"), "QEMU: {cmdline}");
    // The host keys were learnt through the agent, for every name of the VM.
    let known = std::fs::read_to_string(&info.known_hosts)
        .unwrap_or_else(|e| panic!("{}: {e}", info.known_hosts));
    let first = known.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("gold,gold.vm,{ip} ")),
        "known_hosts: {known}"
    );
    assert!(known.contains(" ssh-ed25519 "), "known_hosts: {known}");

    // vm ssh: a command's output and exit code pass through.
    let out = banger_ok(d, &["vm", "ssh", "gold", "--", "hostname"], SHORT);
    assert_eq!(text(&out.stdout), "gold\n");
    let out = d.banger_in_netns(["vm", "ssh", "gold", "--", "exit", "3"], SHORT);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        show_output("exit 3", &out)
    );

    // <name>.vm resolves through banger's DNS, and the guest answers on
    // that address: plain ssh, strict host key checking against the
    // VM's known-hosts file.
    let net = network(&mut c).await;
    let listen = net.dns.listen.expect("dns listens");
    let resolved = dig(d, listen, "gold.vm");
    assert_eq!(resolved, ip.to_string());
    let out = plain_ssh(
        d,
        &info.ssh_key,
        &info.known_hosts,
        &resolved,
        "cat /proc/1/comm",
    );
    assert!(out.status.success(), "{}", show_output("ssh", &out));
    assert_eq!(text(&out.stdout), "systemd\n");
    // ...and the check is real: without the recorded keys ssh refuses.
    let empty = d.root().join("empty_known_hosts");
    std::fs::write(&empty, "").expect("write empty known_hosts");
    let out = plain_ssh(
        d,
        &info.ssh_key,
        &empty.display().to_string(),
        &resolved,
        "true",
    );
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        show_output("ssh, no keys", &out)
    );

    // The agent runs as a systemd service, not as init.
    let out = banger_ok(
        d,
        &[
            "vm",
            "exec",
            "gold",
            "--",
            "systemctl",
            "is-active",
            "banger-agent.service",
            "ssh.service",
        ],
        SHORT,
    );
    assert_eq!(text(&out.stdout), "active\nactive\n");
    let out = d.banger_in_netns(["vm", "exec", "gold", "--", "sh", "-c", "exit 4"], SHORT);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        show_output("exec exit 4", &out)
    );
    let (status, comm, _) = exec(&mut c, "gold", &["cat", "/proc/1/comm"]).await;
    assert_eq!((status, comm.as_str()), (ExitStatus::Code(0), "systemd\n"));
    // ... and modules load from the image's own /lib/modules.
    let (status, out, err) = exec(
        &mut c,
        "gold",
        &[
            "sh",
            "-c",
            "test -f /lib/modules/$(uname -r)/modules.dep && modprobe -n -v ext4",
        ],
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0), "modules: {out} {err}");
    // /root is the VM's work disk, mounted by fstab.
    let (status, root, err) = exec(
        &mut c,
        "gold",
        &["findmnt", "-n", "-o", "SOURCE,FSTYPE", "/root"],
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0), "findmnt /root: {root} {err}");
    assert!(root.trim().ends_with("ext4"), "/root: {root}");
    // The VM's name and resolver are in /etc, not the image's or the
    // build host's.
    let (_, hosts, _) = exec(&mut c, "gold", &["cat", "/etc/hosts"]).await;
    assert!(hosts.contains("127.0.1.1\tgold\n"), "/etc/hosts: {hosts}");
    assert!(!hosts.contains("debian-bookworm"), "/etc/hosts: {hosts}");
    let (_, resolv, _) = exec(&mut c, "gold", &["cat", "/etc/resolv.conf"]).await;
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(servers, ["192.0.2.53"], "/etc/resolv.conf: {resolv}");
    // Host keys made by this VM, the ones in its known-hosts file.
    let (_, host_key, _) = exec(
        &mut c,
        "gold",
        &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
    )
    .await;
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    assert!(
        known.contains(&format!(" {} {}\n", host_key[0], host_key[1])),
        "{host_key:?} not in {known}"
    );
    let (_, addr, _) = exec(&mut c, "gold", &["ip", "-4", "-o", "addr", "show"]).await;
    assert!(addr.contains(&format!("{ip}/")), "guest addresses: {addr}");
    // A file in /root survives the restart below.
    let (status, _, _) = exec(&mut c, "gold", &["sh", "-c", "echo kept > /root/marker"]).await;
    assert_eq!(status, ExitStatus::Code(0));

    // Stop: the VMM is gone, the TAP and the DNS record are released.
    let out = banger_ok(d, &["vm", "stop", "gold"], SHORT * 2);
    assert!(
        text(&out.stdout).contains("stopped"),
        "{}",
        show_output("stop", &out)
    );
    let stopped = vm::vm(
        &mut c,
        Request::VmShow {
            name: "gold".into(),
        },
        SHORT,
    )
    .await;
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(qemu_pids(d).is_empty(), "QEMU still running after stop");
    assert_eq!(dig(d, listen, "gold.vm"), "");
    assert!(network(&mut c).await.pool.in_use.is_empty());

    // Start: same address, same host keys (strict checking still passes).
    let started = Instant::now();
    let out = banger_ok(d, &["vm", "start", "gold"], BOOT + SHORT);
    eprintln!("vm start took {:?}", started.elapsed());
    assert!(
        text(&out.stdout).contains("running"),
        "{}",
        show_output("start", &out)
    );
    let again = vm::vm(
        &mut c,
        Request::VmShow {
            name: "gold".into(),
        },
        SHORT,
    )
    .await;
    assert_eq!(again.state, VmState::Running);
    assert_eq!(again.ip, Some(ip));
    assert_eq!(dig(d, listen, "gold.vm"), ip.to_string());
    let out = banger_ok(
        d,
        &[
            "vm",
            "ssh",
            "gold",
            "--",
            "cat",
            "/root/marker",
            "/etc/hostname",
        ],
        SHORT,
    );
    assert_eq!(text(&out.stdout), "kept\ngold\n");
    let out = plain_ssh(
        d,
        &info.ssh_key,
        &info.known_hosts,
        &ip.to_string(),
        "hostname",
    );
    assert!(
        out.status.success(),
        "{}",
        show_output("ssh after start", &out)
    );
    assert_eq!(text(&out.stdout), "gold\n");

    // Delete: nothing is left.
    let out = banger_ok(d, &["vm", "delete", "gold"], SHORT * 2);
    assert!(
        text(&out.stdout).contains("deleted gold"),
        "{}",
        show_output("delete", &out)
    );
    assert_nothing_left(d, &mut c).await;
    assert_eq!(dig(d, listen, "gold.vm"), "");
    assert!(!Path::new(&info.known_hosts).exists());
    // The image stays.
    assert!(images_dir(d).join(image_id).is_dir());
}
