//! Powering the guest off or rebooting it.
//!
//! In service mode the init system does it (`systemctl poweroff`, or the
//! system's `poweroff`/`reboot`). As PID 1 the agent does it itself
//! ([`pid1_shutdown`]): SIGTERM to every process, up to 3 s for them to go,
//! SIGKILL for the rest, `sync`, unmount (or remount read-only) every file
//! system, then `reboot(2)`.

use crate::reaper;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

/// How long processes get between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// Service mode: asks the init system.
pub async fn service_power(action: PowerAction) {
    let verb = match action {
        PowerAction::PowerOff => "poweroff",
        PowerAction::Reboot => "reboot",
    };
    let systemd = Path::new("/run/systemd/system").is_dir();
    let attempts: Vec<Vec<&str>> = if systemd {
        vec![vec!["systemctl", verb], vec![verb]]
    } else {
        vec![vec![verb]]
    };
    for argv in attempts {
        match reaper::run(&argv, Duration::from_secs(30)).await {
            Ok(out) if out.status.shell_code() == 0 => {
                info!(
                    command = argv.join(" "),
                    "power request handed to the system"
                );
                return;
            }
            Ok(out) => {
                warn!(command = argv.join(" "), status = ?out.status, "power command failed")
            }
            Err(e) => warn!(command = argv.join(" "), "cannot run power command: {e}"),
        }
    }
    error!(?action, "no way to carry out the power request");
}

/// PID 1: stops everything and powers off or reboots. Never returns; if
/// `reboot(2)` itself fails it sleeps forever (exiting would panic the
/// kernel).
pub fn pid1_shutdown(action: PowerAction) -> ! {
    info!(?action, "stopping all processes");
    // SAFETY: plain syscalls; -1 is every process but init itself.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
        libc::kill(-1, libc::SIGCONT);
    }
    if !wait_for_processes(TERM_GRACE) {
        warn!("processes left after {TERM_GRACE:?}; sending SIGKILL");
        // SAFETY: as above.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        wait_for_processes(Duration::from_secs(1));
    }
    // SAFETY: sync(2) cannot fail.
    unsafe { libc::sync() };
    unmount_all();
    // SAFETY: as above.
    unsafe { libc::sync() };
    let cmd = match action {
        PowerAction::PowerOff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    info!(?action, "calling reboot(2)");
    // SAFETY: reboot(2) as root; returns only on failure.
    unsafe { libc::reboot(cmd) };
    error!("reboot(2) failed: {}", std::io::Error::last_os_error());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reaps children and waits until no user-space process but this one is
/// left; false on timeout.
fn wait_for_processes(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        reaper::reap_now();
        if other_processes() == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `PF_KTHREAD` in the flags field of `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// How many processes exist besides this one and kernel threads.
pub fn other_processes() -> usize {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_flags(&s))
                .is_some_and(|f| f & PF_KTHREAD == 0)
        })
        .count()
}

/// The `flags` field (9th) of a `/proc/<pid>/stat` line.
pub fn stat_flags(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'. There, field 3 (state) is the first.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(6)?.parse().ok()
}

/// File systems whose unmount is pointless or harmful at the end.
const KEEP: [&str; 4] = ["/", "/proc", "/sys", "/dev"];

/// Unmounts everything in reverse mount order; what cannot be unmounted
/// (the root, busy mounts) is remounted read-only.
fn unmount_all() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .collect();
    for target in targets.iter().rev() {
        let keep = KEEP.contains(&target.as_str())
            || target.starts_with("/proc/")
            || target.starts_with("/sys/")
            || target.starts_with("/dev/");
        if keep {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(target.as_str()) else {
            continue;
        };
        // SAFETY: NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            remount_ro(&c);
        }
    }
    remount_ro(c"/");
}

fn remount_ro(target: &std::ffi::CStr) {
    // SAFETY: NUL-terminated path; null source/type/data are allowed for
    // a remount.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        warn!(
            target = %target.to_string_lossy(),
            "cannot remount read-only: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_flags_survive_odd_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 2129984 100 0 0 0";
        assert_eq!(stat_flags(stat), Some(2_129_984));
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0";
        assert_ne!(stat_flags(kthread).expect("flags") & PF_KTHREAD, 0);
        let own = std::fs::read_to_string("/proc/self/stat").expect("stat");
        assert_eq!(stat_flags(&own).expect("flags") & PF_KTHREAD, 0);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/end\\04"), "/end\\04");
    }
}
