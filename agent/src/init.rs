//! Init mode: the agent as PID 1 of an image without an init
//! (`init=/usr/local/bin/banger-agent` on the kernel command line).
//!
//! Boot: mount the API file systems that are missing, set the hostname,
//! load `virtio_net`/`virtio_console` (and vsock), mount the work disk on
//! `/root`, configure the network, serve the transports and start sshd.
//! Then wait for SIGTERM/SIGINT (Ctrl-Alt-Del arrives as SIGINT) or a
//! `PowerOff` request, and shut down ([`power::pid1_shutdown`]).
//!
//! PID 1 must never exit or panic (the kernel would panic): every step
//! logs its failure and the boot carries on; a panic restarts the serving
//! loop; and if even the runtime cannot be built, the agent just reaps
//! zombies forever.

use crate::cli::Cli;
use crate::cmdline::BootConfig;
use crate::context::{AgentContext, PowerMode};
use crate::exec::{error_chain, DEFAULT_PATH};
use crate::power::{self, PowerAction};
use crate::{ext4, identity, modules, netconf, reaper, sshd, transport};
use std::ffi::CString;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Modules the agent needs; a failure is logged.
const REQUIRED_MODULES: [&str; 2] = ["virtio_net", "virtio_console"];
/// Loaded when the kernel has them as modules: Firecracker's vsock, and
/// the driver of QEMU's pvpanic device (probed by its ACPI id; udev loads
/// it in images with systemd), so a guest panic makes QEMU exit at once.
const OPTIONAL_MODULES: [&str; 2] = ["vmw_vsock_virtio_transport", "pvpanic_mmio"];
/// How long to wait for the NIC to appear.
const NIC_WAIT: Duration = Duration::from_secs(30);

/// One API file system.
struct ApiMount {
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const API_MOUNTS: [ApiMount; 7] = [
    ApiMount {
        target: "/proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    ApiMount {
        target: "/sys",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    ApiMount {
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    ApiMount {
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=620,ptmxmode=0666",
    },
    ApiMount {
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    ApiMount {
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
    ApiMount {
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
];

/// Whether `target` is a mount point according to `mountinfo` text.
pub fn is_mount_point_in(mountinfo: &str, target: &str) -> bool {
    mountinfo.lines().any(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|mp| power::unescape_mount_path(mp) == target)
    })
}

fn is_mount_point(target: &str) -> bool {
    if target == "/proc" {
        return Path::new("/proc/self/stat").exists();
    }
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| is_mount_point_in(&m, target))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target_c, fstype) = (c(source)?, c(target)?, c(fstype)?);
    let data = c(data)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts the API file systems that are not mounted yet. Runs before
/// logging works (no `/dev/kmsg` yet): returns its problems instead.
fn mount_api_filesystems() -> Vec<String> {
    let mut problems = Vec::new();
    for m in &API_MOUNTS {
        if is_mount_point(m.target) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(m.target) {
            problems.push(format!("cannot create {}: {e}", m.target));
            continue;
        }
        if let Err(e) = mount(m.fstype, m.target, m.fstype, m.flags, m.data) {
            problems.push(format!("cannot mount {} on {}: {e}", m.fstype, m.target));
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    problems
}

/// Runs as PID 1. Never returns.
pub fn run(cli: Cli) -> ! {
    // The kernel gives init no PATH; children (sshd, ssh-keygen) need one.
    std::env::set_var("PATH", DEFAULT_PATH);
    let problems = mount_api_filesystems();
    crate::log::init(&cli.log, true);
    for p in problems {
        warn!("{p}");
    }
    info!(
        version = crate::AGENT_VERSION,
        "banger-agent starting as init"
    );
    reaper::reap_orphans_too();
    loop {
        let attempt =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> io::Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let action = rt.block_on(boot_and_serve(&cli))?;
                // Shutting down is blocking work; the runtime keeps serving
                // meanwhile (the host may still be reading its `Done`).
                power::pid1_shutdown(action)
            }));
        match attempt {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("init loop failed: {}", error_chain(&e)),
            Err(_) => error!("init loop panicked; restarting it"),
        }
        reap_blocking_for(Duration::from_secs(1));
    }
}

/// Reaps zombies for `d` without a runtime.
fn reap_blocking_for(d: Duration) {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        reaper::reap_now();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Boots the guest, serves, and returns what to do at the end.
async fn boot_and_serve(cli: &Cli) -> io::Result<PowerAction> {
    reaper::start()?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // Ctrl-Alt-Del becomes SIGINT to init instead of an instant reboot.
    // SAFETY: plain syscall.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = BootConfig::from_cmdline(&cmdline);
    for p in &cfg.problems {
        warn!("kernel command line: {p}");
    }
    if let Some(name) = &cfg.hostname {
        if let Err(e) = nix::unistd::sethostname(name) {
            warn!(hostname = %name, "cannot set hostname: {e}");
        }
    }
    // /etc/hostname and /etc/hosts; resolv.conf follows the network below.
    identity::apply(&cfg, Path::new("/etc"), false);

    let loaded = tokio::task::spawn_blocking(load_modules).await;
    if let Err(e) = loaded {
        warn!("module loading crashed: {e}");
    }
    match tokio::task::spawn_blocking(mount_work_disk).await {
        Ok(Ok(Some(dev))) => info!(device = %dev, "work disk mounted on /root"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => warn!("cannot mount the work disk: {e}"),
        Err(e) => warn!("work disk step crashed: {e}"),
    }

    // The network is configured before the agent answers: the host takes
    // the agent's first answer as "the guest is up", and a user's first
    // command (or ping, or ssh) must find the address in place. The NIC is
    // there at once in practice; without one the wait ends after
    // NIC_WAIT and the agent serves anyway, so the failure can be seen.
    match netconf::configure(&cfg, NIC_WAIT).await {
        Ok(done) => {
            if let Some(ifname) = done.interface {
                info!(interface = %ifname, ip = ?cfg.ip, gateway = ?cfg.gateway, "network configured");
            }
        }
        Err(e) => error!("network setup failed: {}", error_chain(&e)),
    }
    if !cfg.dns.is_empty() {
        if let Err(e) = netconf::write_resolv_conf(Path::new("/etc/resolv.conf"), &cfg.dns) {
            warn!("cannot write /etc/resolv.conf: {e}");
        }
    }

    let (power_tx, mut power_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(AgentContext {
        pid1: true,
        power: if cli.fake_poweroff {
            PowerMode::Fake
        } else {
            PowerMode::Init(power_tx)
        },
    });
    let transports = cli.transports(Path::new("/dev/vsock").exists());
    if let Err(e) = transport::start(ctx, &transports, !cli.explicit_transports()) {
        error!("{}", error_chain(&e));
    }

    tokio::spawn(sshd::supervise());

    let action = tokio::select! {
        Some(a) = power_rx.recv() => a,
        _ = sigterm.recv() => PowerAction::PowerOff,
        _ = sigint.recv() => PowerAction::PowerOff,
    };
    info!(?action, "shutting down");
    Ok(action)
}

/// Label of the read-only disk banger attaches with the kernel's modules.
const MODULES_LABEL: &str = "banger-modules";

/// Mounts banger's modules disk on `/lib/modules/<release>` when the image
/// has no modules of its own for the running kernel (most OCI images).
fn mount_modules_disk(dir: &Path) {
    if dir.join("modules.dep").is_file() {
        return;
    }
    let Some(dev) = ext4::find_by_label(
        MODULES_LABEL,
        Path::new("/sys/class/block"),
        Path::new("/dev"),
    ) else {
        return;
    };
    if std::fs::create_dir_all(dir).is_err() {
        // A read-only /lib: put a tmpfs on /lib/modules to hold the mount point.
        let _ = std::fs::create_dir_all("/lib/modules");
        let _ = mount("tmpfs", "/lib/modules", "tmpfs", 0, "mode=0755");
        let _ = std::fs::create_dir_all(dir);
    }
    let dev = dev.to_string_lossy().into_owned();
    match mount(
        &dev,
        &dir.to_string_lossy(),
        "ext4",
        libc::MS_RDONLY | libc::MS_NOATIME,
        "",
    ) {
        Ok(()) => info!(device = %dev, dir = %dir.display(), "kernel modules disk mounted"),
        Err(e) => warn!(device = %dev, "cannot mount the modules disk: {e}"),
    }
}

fn load_modules() {
    let dir = modules::modules_dir();
    mount_modules_disk(&dir);
    if !dir.is_dir() {
        info!(dir = %dir.display(), "no kernel modules directory; assuming built-in drivers");
        return;
    }
    for name in REQUIRED_MODULES {
        match modules::load(&dir, &[name]) {
            Ok(done) => {
                for m in done {
                    if let modules::Loaded::Inserted(m) = m {
                        info!(module = %m, "module loaded");
                    }
                }
            }
            Err(e) => warn!("cannot load {name}: {}", error_chain(&e)),
        }
    }
    let deps = modules::ModuleDeps::read(&dir).ok();
    for name in OPTIONAL_MODULES {
        if deps.as_ref().is_some_and(|d| d.path_of(name).is_some()) {
            if let Err(e) = modules::load(&dir, &[name]) {
                warn!("cannot load {name}: {}", error_chain(&e));
            }
        }
    }
}

/// Mounts the `banger-work` disk on `/root` unless something is there.
/// The disk may still be probing: a few short retries.
/// Mounts the work disk on `/root` unless `/root` is a mount point
/// already; the device, or `None` when no work disk is attached.
pub fn mount_work_disk() -> io::Result<Option<String>> {
    if is_mount_point("/root") {
        return Ok(None);
    }
    for attempt in 0..4 {
        if let Some(dev) = ext4::find_by_label(
            ext4::WORK_LABEL,
            Path::new("/sys/class/block"),
            Path::new("/dev"),
        ) {
            std::fs::create_dir_all("/root")?;
            let dev = dev.to_string_lossy().into_owned();
            mount(&dev, "/root", "ext4", libc::MS_NOATIME, "")?;
            return Ok(Some(dev));
        }
        if attempt < 3 {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_from_mountinfo() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
24 22 0:5 / /mnt/with\\040space rw shared:3 - tmpfs tmpfs rw
";
        assert!(is_mount_point_in(info, "/proc"));
        assert!(is_mount_point_in(info, "/"));
        assert!(is_mount_point_in(info, "/mnt/with space"));
        assert!(!is_mount_point_in(info, "/sys"));
        // The real one: /proc is always mounted where tests run.
        let real = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(is_mount_point_in(&real, "/proc"));
    }

    #[test]
    fn api_mounts_are_ordered_parents_first() {
        for (i, m) in API_MOUNTS.iter().enumerate() {
            for later in &API_MOUNTS[i + 1..] {
                assert!(
                    !m.target.starts_with(&format!("{}/", later.target)),
                    "{} is mounted before its parent {}",
                    m.target,
                    later.target
                );
            }
        }
    }
}
