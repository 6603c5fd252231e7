//! The QEMU backend against a real `qemu-system-x86_64` under TCG, booting
//! the host's Debian cloud kernel (`/boot/vmlinuz-*`, from
//! `linux-image-cloud-amd64`). No networking: no host device is created.
//!
//! Guests here have no root file system, which is enough to observe what
//! the backend controls: the kernel boots to the initramfs (or panics
//! when it has none), QEMU reports its state over QMP, and the process
//! exits or is killed. Every QEMU is SIGKILLed by a guard if a test fails
//! half-way.

#![allow(clippy::unwrap_used)]

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_vmm::process::{self, Exit, ProcessId};
use banger_vmm::qemu::{QemuBackend, RunPaths};
use banger_vmm::{
    Accel, DiskFormat, DiskSpec, ExitReason, MachineSpec, StopOutcome, VmmBackend, VmmError,
    VmmHandle,
};

/// Bound on how long a guest takes to reach a point we wait for. A TCG
/// boot to the panic takes ~5 s on an idle core; tests run in parallel.
const BOOT_BOUND: Duration = Duration::from_secs(120);

struct Kernel {
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// Compares `6.1.0-56-cloud-amd64`-style versions number by number.
fn version_cmp(a: &str, b: &str) -> Ordering {
    let nums = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    nums(a).cmp(&nums(b)).then_with(|| a.cmp(b))
}

/// The newest kernel in /boot that has an initrd.
fn kernel() -> Kernel {
    let mut versions: Vec<String> = std::fs::read_dir("/boot")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("vmlinuz-")
                        .map(String::from)
                })
                .filter(|v| Path::new(&format!("/boot/initrd.img-{v}")).is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by(|a, b| version_cmp(a, b));
    let version = versions.pop().unwrap_or_else(|| {
        panic!(
            "no /boot/vmlinuz-* with a matching /boot/initrd.img-* found: \
             these tests boot the host's kernel; run `apt-get install linux-image-cloud-amd64`"
        )
    });
    Kernel {
        vmlinuz: format!("/boot/vmlinuz-{version}").into(),
        initrd: format!("/boot/initrd.img-{version}").into(),
    }
}

fn backend() -> QemuBackend {
    QemuBackend::new()
        .expect("qemu-system-x86_64 is needed for these tests: `apt-get install qemu-system-x86`")
}

/// SIGKILLs the processes it holds when dropped (also on panic).
#[derive(Default)]
struct Reaper(Vec<ProcessId>);

impl Reaper {
    fn watch(&mut self, pid: ProcessId) {
        self.0.push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            pid.sigkill();
        }
    }
}

/// A VM's temp dir (short, for the 107-byte socket limit) and spec.
struct Vm {
    dir: tempfile::TempDir,
    spec: MachineSpec,
}

fn vm(name: &str, with_initrd: bool, cmdline: &str) -> Vm {
    let k = kernel();
    let dir = tempfile::Builder::new()
        .prefix("bgq-")
        .tempdir_in("/tmp")
        .unwrap();
    let spec = MachineSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: k.vmlinuz,
        initrd: with_initrd.then_some(k.initrd),
        cmdline: cmdline.into(),
        disks: vec![],
        net: None,
        run_dir: dir.path().join("run"),
        console_log: dir.path().join("console.log"),
        accel: Accel::Tcg,
    };
    Vm { dir, spec }
}

impl Vm {
    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.spec.console_log).unwrap_or_default())
            .into_owned()
    }

    /// Live processes (not zombies) whose command line mentions this VM's
    /// temp dir.
    fn processes(&self) -> Vec<u32> {
        let needle = self.dir.path().to_str().unwrap().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| ProcessId::of(*pid).is_some_and(|p| p.matches(&needle)))
            .collect()
    }
}

async fn wait_for(bound: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn launch(vm: &Vm, reaper: &mut Reaper) -> (Arc<dyn VmmHandle>, Duration) {
    let start = Instant::now();
    let handle = backend().launch(&vm.spec).await.unwrap();
    reaper.watch(handle.process());
    (handle, start.elapsed())
}

#[tokio::test]
async fn boots_reports_running_and_stops() {
    let vm = vm("boot", true, "banger.test=boot");
    let mut reaper = Reaper::default();
    let (handle, launched) = launch(&vm, &mut reaper).await;
    let pid = handle.process();
    eprintln!("launch returned after {launched:?}");

    let status = handle.status().await.unwrap();
    assert!(status.running, "{status:?}");
    assert_eq!(status.detail, "running");
    let paths = RunPaths::of(&vm.spec.run_dir);
    assert_eq!(
        std::fs::read_to_string(&paths.pid).unwrap().trim(),
        pid.pid.to_string()
    );
    assert_eq!(vm.processes(), [pid.pid]);
    // The agent port's socket accepts a connection.
    drop(handle.connect_agent().await.unwrap());

    let seen = wait_for(BOOT_BOUND, || vm.console().contains("Linux version")).await;
    assert!(
        seen.is_some(),
        "no kernel banner; console:\n{}",
        vm.console()
    );
    eprintln!("\"Linux version\" on the console after {:?}", seen.unwrap());
    // The backend appended the serial console to the given command line.
    let expected = "Command line: banger.test=boot console=ttyS0";
    let seen = wait_for(BOOT_BOUND, || vm.console().contains(expected)).await;
    assert!(
        seen.is_some(),
        "{expected:?} not on the console:\n{}",
        vm.console()
    );

    let start = Instant::now();
    let outcome = handle.stop(Duration::from_secs(3)).await.unwrap();
    eprintln!("stop: {outcome:?} after {:?}", start.elapsed());
    assert!(
        matches!(outcome, StopOutcome::Killed | StopOutcome::Clean),
        "{outcome:?}"
    );
    assert!(!pid.is_alive());
    assert!(vm.processes().is_empty());
    let expected = match outcome {
        StopOutcome::Clean => Exit::Code(0),
        _ => Exit::Signal(libc::SIGKILL),
    };
    assert_eq!(handle.wait_exit().await, expected);

    // Afterwards: not running, no agent, a second stop is a no-op.
    let status = handle.status().await.unwrap();
    assert!(!status.running, "{status:?}");
    assert!(matches!(
        handle.connect_agent().await.unwrap_err(),
        VmmError::Agent(_)
    ));
    assert_eq!(
        handle.stop(Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyExited
    );
}

#[tokio::test]
async fn a_guest_panic_ends_qemu_with_exit_code_0_and_is_told_from_a_power_off() {
    // No initrd and no root disk: the kernel cannot mount a root, panics,
    // and with panic=1 resets after a second; -no-reboot turns the reset
    // into QEMU's exit.
    let vm = vm("panic", false, "panic=1");
    let mut reaper = Reaper::default();
    let (handle, _) = launch(&vm, &mut reaper).await;
    let start = Instant::now();
    let exit = tokio::time::timeout(BOOT_BOUND, handle.wait_exit())
        .await
        .unwrap_or_else(|_| panic!("QEMU still runs; console:\n{}", vm.console()));
    eprintln!("QEMU exited ({exit}) {:?} after launch", start.elapsed());
    assert_eq!(exit, Exit::Code(0));
    let console = vm.console();
    assert!(console.contains("Kernel panic"), "{console}");
    assert!(console.contains("Rebooting in 1 seconds"), "{console}");
    assert!(!handle.process().is_alive());
    // The status is remembered; wait_exit can be asked again.
    assert_eq!(handle.wait_exit().await, Exit::Code(0));
    // QEMU saw a reset (SHUTDOWN reason guest-reset); the console says it
    // was a panic.
    let reason = handle.wait_exit_reason().await;
    assert_eq!(reason.reason, ExitReason::GuestPanic, "{reason}");
    assert!(reason.is_failure());
    let text = reason.to_string();
    assert!(
        text.starts_with("the guest kernel panicked: Kernel panic - not syncing: VFS"),
        "{text}"
    );
    let status = handle.status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.detail, "exited (exit code 0)");
    assert_eq!(
        handle.stop(Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyExited
    );
}

#[tokio::test]
async fn a_guest_poweroff_within_the_timeout_is_a_clean_stop() {
    // The initramfs's `poweroff -f` as init powers the guest off (ACPI S5)
    // a few seconds into the boot; init's arguments follow `--`. The
    // guest ignores the ACPI power button (no userspace handles it), so
    // what stop() observes is the guest powering off before the timeout.
    let vm = vm("poweroff", true, "rdinit=/usr/sbin/poweroff -- -f");
    let mut reaper = Reaper::default();
    let (handle, _) = launch(&vm, &mut reaper).await;
    let start = Instant::now();
    let outcome = handle.stop(BOOT_BOUND).await.unwrap();
    eprintln!("stop: {outcome:?} after {:?}", start.elapsed());
    let console = vm.console();
    assert_eq!(outcome, StopOutcome::Clean, "console:\n{console}");
    assert!(console.contains("reboot: Power down"), "{console}");
    assert_eq!(handle.wait_exit().await, Exit::Code(0));
    let reason = handle.wait_exit_reason().await;
    assert_eq!(reason.reason, ExitReason::PowerOff, "{reason}");
    assert!(!reason.is_failure());
    assert!(vm.processes().is_empty());
}

#[tokio::test]
async fn kill_ends_qemu_with_sigkill() {
    // Panics without rebooting (panic=0): the VM stays up until killed.
    let vm = vm("kill", false, "panic=0");
    let mut reaper = Reaper::default();
    let (handle, _) = launch(&vm, &mut reaper).await;
    let pid = handle.process();

    // A second launch on the same run dir is refused, and leaves the
    // running VM's sockets alone.
    let err = backend().launch(&vm.spec).await.err().unwrap();
    assert!(err.to_string().contains("is in use"), "{err}");
    assert!(handle.status().await.unwrap().running);
    assert_eq!(vm.processes(), [pid.pid]);

    handle.kill().await.unwrap();
    assert!(!pid.is_alive());
    assert!(
        !Path::new(&format!("/proc/{}", pid.pid)).exists(),
        "not reaped"
    );
    assert!(vm.processes().is_empty());
    assert_eq!(handle.wait_exit().await, Exit::Signal(libc::SIGKILL));
    assert_eq!(handle.wait_exit().await, Exit::Signal(libc::SIGKILL));
    let reason = handle.wait_exit_reason().await;
    assert_eq!(
        reason.reason,
        ExitReason::Killed {
            signal: Some(libc::SIGKILL)
        }
    );
    assert_eq!(
        reason.to_string(),
        "the VMM was killed by signal 9 (SIGKILL)"
    );
}

#[tokio::test]
async fn adopt_reattaches_and_rejects_other_processes() {
    let vm = vm("adopt", false, "panic=0");
    let mut reaper = Reaper::default();
    let (handle, _) = launch(&vm, &mut reaper).await;
    let pid = handle.process();
    // The first owner goes away (as after a daemon restart), closing its
    // QMP connection: QEMU serves one client at a time.
    drop(handle);

    let start = Instant::now();
    let adopted = backend().adopt(&vm.spec, pid).await.unwrap();
    eprintln!("adopt took {:?}", start.elapsed());
    assert_eq!(adopted.process(), pid);
    let status = adopted.status().await.unwrap();
    assert!(status.running, "{status:?}");
    drop(adopted.connect_agent().await.unwrap());

    let not_adoptable = |r: Result<Arc<dyn VmmHandle>, VmmError>, expected_pid: u32| match r {
        Err(VmmError::NotAdoptable { pid }) => assert_eq!(pid, expected_pid),
        other => panic!("expected NotAdoptable, got {other:?}"),
    };
    // The right process, but another VM's run dir.
    let other = self::vm("other", false, "");
    not_adoptable(backend().adopt(&other.spec, pid).await, pid.pid);
    // A run dir that is a prefix of the real one ("<dir>/ru" of "<dir>/run").
    let mut prefix = vm.spec.clone();
    prefix.run_dir = vm.dir.path().join("ru");
    not_adoptable(backend().adopt(&prefix, pid).await, pid.pid);
    // A live process whose command line lacks the run dir (this test).
    let me = ProcessId::of(std::process::id()).unwrap();
    not_adoptable(backend().adopt(&vm.spec, me).await, me.pid);
    // The pid, with another start time: a reused pid.
    let reused = ProcessId {
        pid: pid.pid,
        start_ticks: pid.start_ticks + 1,
    };
    not_adoptable(backend().adopt(&vm.spec, reused).await, pid.pid);
    // A process that has exited.
    let mut sleep = Command::new("sleep");
    sleep.arg("0.1");
    let dead = process::spawn_detached(sleep, &vm.dir.path().join("sleep.log")).unwrap();
    process::wait_exit(dead).await;
    not_adoptable(backend().adopt(&vm.spec, dead).await, dead.pid);

    // SIGTERM: QEMU shuts down by itself (exit code 0) and says why in
    // its SHUTDOWN event, which the adopted handle's event watcher gets
    // (the first owner's watcher went with it). Without the event, the
    // exit would pass for a power-off or (from the console) a panic.
    // SAFETY: a plain kill(2) of the live QEMU this test started.
    unsafe { libc::kill(pid.pid as i32, libc::SIGTERM) };
    let exit = tokio::time::timeout(BOOT_BOUND, adopted.wait_exit_reason())
        .await
        .expect("QEMU exits on SIGTERM");
    assert!(!pid.is_alive());
    // Our child, so the status is known even through the adopted handle.
    assert_eq!(exit.status, Exit::Code(0));
    assert_eq!(exit.reason, ExitReason::Killed { signal: None }, "{exit}");
    assert_eq!(
        exit.to_string(),
        "the VMM was stopped from outside banger: QEMU got SIGTERM, SIGINT or SIGHUP"
    );
}

/// Writes a newc cpio archive of `files` (path in the archive, mode,
/// contents); directories have no contents.
fn cpio(files: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, mode: u32, data: &[u8], ino: usize| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(name, *mode, data, i + 1);
    }
    entry("TRAILER!!!", 0, &[], 0);
    out
}

/// An initramfs whose init (busybox sh) powers off, reboots or panics as
/// `t=` on the kernel command line says; `t=pvpanic` loads the pvpanic
/// driver first. Needs `busybox-static` and the kernel's modules tree.
fn test_initramfs(dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox is needed for these tests: `apt-get install busybox-static`");
    let version = kernel()
        .vmlinuz
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_prefix("vmlinuz-")
        .unwrap()
        .to_string();
    let module = |name: &str| {
        let path = format!("/lib/modules/{version}/kernel/drivers/misc/pvpanic/{name}.ko");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let init = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
for w in $(/bin/busybox cat /proc/cmdline); do case $w in t=*) T=${w#t=};; esac; done
echo "banger test: $T"
case $T in
  poweroff) /bin/busybox poweroff -f;;
  reboot) /bin/busybox reboot -f;;
  pvpanic)
    /bin/busybox insmod /pvpanic.ko && /bin/busybox insmod /pvpanic-mmio.ko
    echo c > /proc/sysrq-trigger;;
esac
/bin/busybox sleep 1000
"#;
    let archive = cpio(&[
        ("bin", 0o040755, vec![]),
        ("proc", 0o040755, vec![]),
        ("bin/busybox", 0o100755, busybox),
        ("init", 0o100755, init.as_bytes().to_vec()),
        ("pvpanic.ko", 0o100644, module("pvpanic")),
        ("pvpanic-mmio.ko", 0o100644, module("pvpanic-mmio")),
    ]);
    let path = dir.join("test-initramfs.cpio");
    std::fs::write(&path, archive).unwrap();
    path
}

#[tokio::test]
async fn a_guest_reboot_is_a_reset_and_a_pvpanic_panic_exits_with_failure() {
    // Two guests side by side: one reboots, one panics with the pvpanic
    // driver loaded and panic=0 (the kernel would wait forever: only
    // pvpanic can end QEMU, with -action panic=exit-failure's code 1).
    let mut reboot = vm("reboot", false, "t=reboot panic=0");
    let mut pvpanic = vm("pvpanic", false, "t=pvpanic panic=0");
    reboot.spec.initrd = Some(test_initramfs(reboot.dir.path()));
    pvpanic.spec.initrd = Some(test_initramfs(pvpanic.dir.path()));
    let mut reaper = Reaper::default();
    let (reboot_handle, _) = launch(&reboot, &mut reaper).await;
    let (pvpanic_handle, _) = launch(&pvpanic, &mut reaper).await;

    let exit = tokio::time::timeout(BOOT_BOUND, reboot_handle.wait_exit_reason())
        .await
        .unwrap_or_else(|_| panic!("the rebooting guest still runs:\n{}", reboot.console()));
    let console = reboot.console();
    assert!(console.contains("banger test: reboot"), "{console}");
    assert_eq!(
        exit.reason,
        ExitReason::GuestReset,
        "{exit}; console:\n{console}"
    );
    assert_eq!(exit.status, Exit::Code(0));
    assert!(exit.is_failure());

    let exit = tokio::time::timeout(BOOT_BOUND, pvpanic_handle.wait_exit_reason())
        .await
        .unwrap_or_else(|_| panic!("the panicked guest still runs:\n{}", pvpanic.console()));
    let console = pvpanic.console();
    assert_eq!(
        exit.reason,
        ExitReason::GuestPanic,
        "{exit}; console:\n{console}"
    );
    assert_eq!(exit.status, Exit::Code(1), "{exit}");
    assert_eq!(
        exit.detail.as_deref(),
        Some("Kernel panic - not syncing: sysrq triggered crash"),
        "console:\n{console}"
    );
    assert!(reboot.processes().is_empty() && pvpanic.processes().is_empty());
}

#[tokio::test]
async fn a_missing_disk_fails_the_launch_and_leaves_nothing() {
    let mut vm = vm("nodisk", false, "");
    let missing = vm.dir.path().join("missing-root.ext4");
    vm.spec.disks.push(DiskSpec {
        id: "root".into(),
        path: missing.clone(),
        format: DiskFormat::Raw,
        read_only: false,
    });
    let mut reaper = Reaper::default();
    let start = Instant::now();
    let result = backend().launch(&vm.spec).await;
    if let Ok(handle) = &result {
        reaper.watch(handle.process());
    }
    let err = result.err().unwrap();
    eprintln!("launch failed after {:?}: {err}", start.elapsed());
    assert!(matches!(err, VmmError::EarlyExit { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(missing.to_str().unwrap()), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(vm.processes().is_empty(), "QEMU left running");
}

#[test]
fn kernel_versions_sort_numerically() {
    let mut v = vec![
        "6.1.0-9-cloud-amd64",
        "6.1.0-56-cloud-amd64",
        "5.10.0-30-amd64",
    ];
    v.sort_by(|a, b| version_cmp(a, b));
    assert_eq!(
        v,
        [
            "5.10.0-30-amd64",
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64"
        ]
    );
}
