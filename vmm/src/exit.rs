//! Why a VMM process ended ([`VmmExit`]): a guest power-off, a guest
//! reset or panic, a kill from outside, or a failure of the VMM itself.
//!
//! QEMU runs with `-no-reboot`, so a power-off, a reboot and a kernel
//! panic (which resets the machine after `panic=N` seconds) all end the
//! process with exit code 0: the status alone cannot tell a crash from a
//! clean stop. The evidence, strongest first:
//!
//! 1. QEMU's events ([`QemuEvents`], from a QMP monitor the handle keeps
//!    open): `GUEST_PANICKED` (a pvpanic device reported a panic; with
//!    `-action panic=exit-failure` QEMU then exits with code 1) and the
//!    `SHUTDOWN` event's `reason` (`guest-shutdown`, `guest-reset`,
//!    `guest-panic`, `host-signal`, `host-qmp-quit`...).
//! 2. The process status: killed by a signal, or a non-zero exit code.
//! 3. The guest's serial console since the VMM was launched
//!    ([`ConsoleHint`]): the kernel prints `Kernel panic - not syncing`
//!    before a panic's reset, `reboot: Power down` before a power-off and
//!    `reboot: Restarting system` before a reboot. This is what tells a
//!    panic's reset from a reboot when the guest has no pvpanic driver
//!    loaded, and what remains for a process banger did not start (its
//!    status goes to its real parent).

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::process::Exit;

/// Why the VMM exited, as far as banger can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI power-off, `poweroff`, the
    /// agent's power-off, or the power-off banger asked for). Under
    /// Firecracker, whose guests stop by resetting, also a guest reboot.
    PowerOff,
    /// The guest reset itself (a reboot, a triple fault) without a panic
    /// being seen; `-no-reboot` turns the reset into QEMU's exit.
    GuestReset,
    /// The guest kernel panicked (reported by pvpanic, or seen on the
    /// console before the reset).
    GuestPanic,
    /// The VMM was killed by a signal (`Some`), or stopped from outside
    /// banger without one being known (`None`: SIGTERM/SIGINT/SIGHUP that
    /// QEMU handled itself, a `quit` over QMP).
    Killed { signal: Option<i32> },
    /// The VMM failed on its own (a non-zero exit code, QEMU's
    /// `host-error`).
    VmmError { code: Option<i32> },
    /// It exited, and nothing says why (a process banger did not start,
    /// with no events and nothing on the console).
    Unknown,
}

/// How a VMM process ended: the typed reason, the raw process status and
/// the evidence (for humans: a console line, the QMP shutdown reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmExit {
    pub reason: ExitReason,
    pub status: Exit,
    pub detail: Option<String>,
}

impl VmmExit {
    /// Everything but a power-off: what a restart policy of `on-failure`
    /// restarts after.
    pub fn is_failure(&self) -> bool {
        self.reason != ExitReason::PowerOff
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => return None,
    })
}

impl fmt::Display for VmmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            ExitReason::PowerOff => f.write_str("the guest powered off")?,
            ExitReason::GuestReset => f.write_str("the guest reset itself (reboot)")?,
            ExitReason::GuestPanic => f.write_str("the guest kernel panicked")?,
            ExitReason::Killed { signal: Some(s) } => match signal_name(*s) {
                Some(name) => write!(f, "the VMM was killed by signal {s} ({name})")?,
                None => write!(f, "the VMM was killed by signal {s}")?,
            },
            ExitReason::Killed { signal: None } => {
                f.write_str("the VMM was stopped from outside banger")?
            }
            ExitReason::VmmError { code: Some(c) } => write!(f, "the VMM failed (exit code {c})")?,
            ExitReason::VmmError { code: None } => f.write_str("the VMM failed")?,
            ExitReason::Unknown => f.write_str("the VMM exited for an unknown reason")?,
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// What QEMU's event monitor saw before the process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuEvents {
    /// The `reason` of the last `SHUTDOWN` event.
    pub shutdown_reason: Option<String>,
    /// A `GUEST_PANICKED` event arrived.
    pub panicked: bool,
}

/// What the guest's console says about how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleHint {
    /// `Kernel panic - not syncing: ...` (the line, without its timestamp).
    Panic(String),
    /// `reboot: Power down`.
    PowerOff,
    /// `reboot: Restarting system`.
    Restart,
}

const PANIC_MARK: &str = "Kernel panic - not syncing";
const POWER_DOWN_MARK: &str = "reboot: Power down";
const RESTART_MARK: &str = "reboot: Restarting system";
/// Where a kernel's boot log starts on the console.
const BOOT_MARK: &str = "Linux version ";
/// How much of a console log is searched.
const CONSOLE_SCAN: u64 = 256 * 1024;

/// Reads what the console got since byte `from`, or (`None`) since the
/// last kernel boot banner in its tail; at most the last 256 KiB.
pub fn console_since(path: &Path, from: Option<u64>) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = match from {
        Some(from) if from <= len => from.max(len.saturating_sub(CONSOLE_SCAN)),
        // Truncated or replaced since: all of it.
        Some(_) => len.saturating_sub(CONSOLE_SCAN),
        None => len.saturating_sub(CONSOLE_SCAN),
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if from.is_none() {
        // This boot only: from the line of the last kernel banner on.
        if let Some(pos) = text.rfind(BOOT_MARK) {
            let line_start = text[..pos].rfind('\n').map_or(0, |n| n + 1);
            return text[line_start..].to_string();
        }
    }
    text
}

/// The console's evidence: a panic wins over a power-off or a restart
/// (a panic while shutting down is still a panic).
pub fn console_hint(text: &str) -> Option<ConsoleHint> {
    if let Some(line) = text.lines().rev().find(|l| l.contains(PANIC_MARK)) {
        let from = line.find(PANIC_MARK).unwrap_or(0);
        let line: String = line[from..].chars().filter(|c| !c.is_control()).collect();
        return Some(ConsoleHint::Panic(line.trim().to_string()));
    }
    // The last of the two, should a guest print both.
    let power = text.rfind(POWER_DOWN_MARK);
    let restart = text.rfind(RESTART_MARK);
    match (power, restart) {
        (Some(p), Some(r)) if r > p => Some(ConsoleHint::Restart),
        (Some(_), _) => Some(ConsoleHint::PowerOff),
        (None, Some(_)) => Some(ConsoleHint::Restart),
        (None, None) => None,
    }
}

fn exit(reason: ExitReason, status: Exit, detail: impl Into<Option<String>>) -> VmmExit {
    VmmExit {
        reason,
        status,
        detail: detail.into(),
    }
}

/// How a QEMU process ended, from its status, its events and its console.
pub fn classify_qemu(status: Exit, events: &QemuEvents, console: Option<ConsoleHint>) -> VmmExit {
    let panic_line = match &console {
        Some(ConsoleHint::Panic(line)) => Some(line.clone()),
        _ => None,
    };
    let reason = events.shutdown_reason.as_deref();
    if events.panicked || reason == Some("guest-panic") {
        let detail = panic_line.unwrap_or_else(|| "reported by pvpanic".to_string());
        return exit(ExitReason::GuestPanic, status, detail);
    }
    if let Exit::Signal(signal) = status {
        return exit(
            ExitReason::Killed {
                signal: Some(signal),
            },
            status,
            None,
        );
    }
    match reason {
        Some("guest-shutdown") => return exit(ExitReason::PowerOff, status, None),
        Some("guest-reset") => {
            return match panic_line {
                Some(line) => exit(ExitReason::GuestPanic, status, line),
                None => exit(ExitReason::GuestReset, status, None),
            }
        }
        Some("host-qmp-system-reset") => {
            return exit(
                ExitReason::GuestReset,
                status,
                "reset by a QMP system_reset".to_string(),
            )
        }
        Some("host-signal") => {
            return exit(
                ExitReason::Killed { signal: None },
                status,
                "QEMU got SIGTERM, SIGINT or SIGHUP".to_string(),
            )
        }
        Some(r @ ("host-qmp-quit" | "host-ui")) => {
            return exit(
                ExitReason::Killed { signal: None },
                status,
                format!("QEMU was told to quit ({r})"),
            )
        }
        Some("host-error") => {
            let code = match status {
                Exit::Code(c) => Some(c),
                _ => None,
            };
            return exit(
                ExitReason::VmmError { code },
                status,
                "QEMU reported a host error".to_string(),
            );
        }
        _ => {}
    }
    // No (usable) shutdown event: the status, then the console.
    match (status, console) {
        (_, Some(ConsoleHint::Panic(line))) => exit(ExitReason::GuestPanic, status, line),
        (Exit::Code(0), Some(ConsoleHint::Restart)) => exit(ExitReason::GuestReset, status, None),
        // QEMU exits 0 only when something asked it to shut down.
        (Exit::Code(0), _) => exit(ExitReason::PowerOff, status, None),
        (Exit::Code(c), _) => exit(ExitReason::VmmError { code: Some(c) }, status, None),
        (_, Some(ConsoleHint::PowerOff)) => exit(ExitReason::PowerOff, status, None),
        (_, Some(ConsoleHint::Restart)) => exit(ExitReason::GuestReset, status, None),
        _ => exit(ExitReason::Unknown, status, None),
    }
}

/// How a Firecracker process ended. Firecracker exits 0 when its guest
/// resets (which is how its guests stop: there is no ACPI power-off), so
/// a 0 is a power-off unless the console shows a panic.
pub fn classify_firecracker(status: Exit, console: Option<ConsoleHint>) -> VmmExit {
    match (status, console) {
        (Exit::Signal(signal), _) => exit(
            ExitReason::Killed {
                signal: Some(signal),
            },
            status,
            None,
        ),
        (_, Some(ConsoleHint::Panic(line))) => exit(ExitReason::GuestPanic, status, line),
        (Exit::Code(0), _) => exit(ExitReason::PowerOff, status, None),
        (Exit::Code(c), _) => exit(ExitReason::VmmError { code: Some(c) }, status, None),
        (Exit::Unknown, Some(_)) => exit(ExitReason::PowerOff, status, None),
        (Exit::Unknown, None) => exit(ExitReason::Unknown, status, None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn events(reason: &str) -> QemuEvents {
        QemuEvents {
            shutdown_reason: Some(reason.into()),
            panicked: false,
        }
    }

    const PANIC_CONSOLE: &str = "[    8.08] sysrq: Trigger a crash\r\n\
        [    8.08] Kernel panic - not syncing: sysrq triggered crash\r\n\
        [    8.09] Rebooting in 5 seconds..\r\n";

    #[test]
    fn console_hints() {
        assert_eq!(
            console_hint(PANIC_CONSOLE),
            Some(ConsoleHint::Panic(
                "Kernel panic - not syncing: sysrq triggered crash".into()
            ))
        );
        assert_eq!(
            console_hint("[ 9.0] reboot: Power down\n"),
            Some(ConsoleHint::PowerOff)
        );
        assert_eq!(
            console_hint("[ 9.0] reboot: Restarting system\n[ 9.1] reboot: machine restart\n"),
            Some(ConsoleHint::Restart)
        );
        assert_eq!(console_hint("booting\n"), None);
        // A panic while powering off is a panic.
        assert!(matches!(
            console_hint("reboot: Power down\nKernel panic - not syncing: x\n"),
            Some(ConsoleHint::Panic(_))
        ));
    }

    #[test]
    fn qemu_events_decide_first() {
        let c = classify_qemu(Exit::Code(0), &events("guest-shutdown"), None);
        assert_eq!(c.reason, ExitReason::PowerOff);
        assert!(!c.is_failure());
        assert_eq!(c.to_string(), "the guest powered off");

        let c = classify_qemu(Exit::Code(0), &events("guest-reset"), None);
        assert_eq!(c.reason, ExitReason::GuestReset);
        assert!(c.is_failure());

        // A reset after a panic on the console (panic=N, no pvpanic).
        let hint = console_hint(PANIC_CONSOLE);
        let c = classify_qemu(Exit::Code(0), &events("guest-reset"), hint.clone());
        assert_eq!(c.reason, ExitReason::GuestPanic);
        assert_eq!(
            c.to_string(),
            "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash"
        );
        // But a power-off event is believed over the console.
        let c = classify_qemu(Exit::Code(0), &events("guest-shutdown"), hint);
        assert_eq!(c.reason, ExitReason::PowerOff);

        // pvpanic with -action panic=exit-failure.
        let ev = QemuEvents {
            shutdown_reason: Some("guest-panic".into()),
            panicked: true,
        };
        let c = classify_qemu(Exit::Code(1), &ev, None);
        assert_eq!(c.reason, ExitReason::GuestPanic);
        assert_eq!(c.detail.as_deref(), Some("reported by pvpanic"));

        let c = classify_qemu(Exit::Code(0), &events("host-signal"), None);
        assert_eq!(c.reason, ExitReason::Killed { signal: None });
        assert!(c.is_failure());
        let c = classify_qemu(Exit::Code(0), &events("host-qmp-quit"), None);
        assert_eq!(c.reason, ExitReason::Killed { signal: None });
        let c = classify_qemu(Exit::Code(1), &events("host-error"), None);
        assert_eq!(c.reason, ExitReason::VmmError { code: Some(1) });
    }

    #[test]
    fn qemu_without_events() {
        let none = QemuEvents::default();
        let c = classify_qemu(Exit::Signal(libc::SIGKILL), &none, None);
        assert_eq!(
            c.reason,
            ExitReason::Killed {
                signal: Some(libc::SIGKILL)
            }
        );
        assert_eq!(c.to_string(), "the VMM was killed by signal 9 (SIGKILL)");
        // A kill wins over a panic seen earlier on the console...
        let c = classify_qemu(
            Exit::Signal(libc::SIGKILL),
            &none,
            console_hint(PANIC_CONSOLE),
        );
        assert!(matches!(c.reason, ExitReason::Killed { .. }));
        // ...but not over a pvpanic report.
        let ev = QemuEvents {
            shutdown_reason: None,
            panicked: true,
        };
        let c = classify_qemu(Exit::Signal(libc::SIGKILL), &ev, None);
        assert_eq!(c.reason, ExitReason::GuestPanic);

        let c = classify_qemu(Exit::Code(0), &none, console_hint(PANIC_CONSOLE));
        assert_eq!(c.reason, ExitReason::GuestPanic);
        let c = classify_qemu(Exit::Code(0), &none, Some(ConsoleHint::Restart));
        assert_eq!(c.reason, ExitReason::GuestReset);
        let c = classify_qemu(Exit::Code(0), &none, None);
        assert_eq!(c.reason, ExitReason::PowerOff);
        let c = classify_qemu(Exit::Code(1), &none, None);
        assert_eq!(c.reason, ExitReason::VmmError { code: Some(1) });
        assert_eq!(c.to_string(), "the VMM failed (exit code 1)");
        // Not our child: the console decides, else unknown.
        let c = classify_qemu(Exit::Unknown, &none, Some(ConsoleHint::PowerOff));
        assert_eq!(c.reason, ExitReason::PowerOff);
        let c = classify_qemu(Exit::Unknown, &none, None);
        assert_eq!(c.reason, ExitReason::Unknown);
        assert!(c.is_failure());
    }

    #[test]
    fn firecracker() {
        let c = classify_firecracker(Exit::Code(0), Some(ConsoleHint::Restart));
        assert_eq!(c.reason, ExitReason::PowerOff);
        let c = classify_firecracker(Exit::Code(0), console_hint(PANIC_CONSOLE));
        assert_eq!(c.reason, ExitReason::GuestPanic);
        let c = classify_firecracker(Exit::Signal(libc::SIGKILL), None);
        assert!(matches!(c.reason, ExitReason::Killed { signal: Some(9) }));
        let c = classify_firecracker(Exit::Code(1), None);
        assert_eq!(c.reason, ExitReason::VmmError { code: Some(1) });
        let c = classify_firecracker(Exit::Unknown, None);
        assert_eq!(c.reason, ExitReason::Unknown);
    }

    #[test]
    fn console_since_a_launch_or_the_last_boot() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            "[0.0] Linux version 6.1\nKernel panic - not syncing: old\n[0.0] Linux version 6.1\nbooting\n",
        )
        .unwrap();
        // Adopted (no offset): the last boot only, so the old panic is not seen.
        let text = console_since(&log, None);
        assert!(text.starts_with("[0.0] Linux version"), "{text:?}");
        assert_eq!(console_hint(&text), None);
        // From a launch offset.
        let len = std::fs::metadata(&log).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"reboot: Power down\n").unwrap();
        assert_eq!(console_since(&log, Some(len)), "reboot: Power down\n");
        // An offset past the end (the file was replaced): all of it.
        assert!(console_since(&log, Some(len * 10)).contains("Linux version"));
        assert_eq!(console_since(&dir.path().join("missing"), None), "");
    }
}
