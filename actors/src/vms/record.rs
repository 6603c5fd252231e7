//! The durable record of one VM (store tree `vms`, keyed by name) and the
//! settings every VM operation reads.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_protocol::{RestartPolicy, VmInfo, VmState};
use banger_vmm::{Accel, ProcessId, VmmKind};
use serde::{Deserialize, Serialize};

use crate::records::Record;

/// Everything the daemon remembers about a VM. Append-only fields (postcard).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub state: VmState,
    pub image: String,
    pub rootfs: PathBuf,
    pub work_seed: Option<PathBuf>,
    pub kernel: String,
    /// The kernel file this VM boots (bzImage for QEMU, ELF for Firecracker).
    pub kernel_path: PathBuf,
    pub initrd_path: Option<PathBuf>,
    /// The kernel's modules tree, offered to the guest as a read-only disk.
    pub modules_path: Option<PathBuf>,
    pub vmm: VmmKind,
    pub accel: Accel,
    pub accel_reason: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub ip: Option<Ipv4Addr>,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
    pub mac: String,
    pub tap: Option<String>,
    pub process: Option<ProcessId>,
    pub restart: RestartPolicy,
    pub restarts: u32,
    pub created_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub console_tail: Vec<String>,
    /// Reached `running` at least once (a create that never did is undone
    /// on recovery rather than kept).
    pub ever_running: bool,
    /// The image runs systemd (else the agent is its init).
    pub systemd: bool,
    pub has_sshd: bool,
    pub has_agent: bool,
}

/// Store tree of VM records.
pub const TREE: &str = "vms";

impl Record for VmRecord {
    const TREE: &'static str = TREE;
    const KIND: &'static str = "VM";
    fn name(&self) -> &str {
        &self.name
    }
}

/// Settings of the VM subsystem (`[vm]` in the config, plus facts the
/// daemon works out at start-up).
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// `auto`, `qemu` or `firecracker`.
    pub vmm: String,
    /// `auto`, `kvm` or `tcg` (QEMU).
    pub accel: String,
    pub default_cpus: u32,
    pub default_memory_mib: u32,
    pub default_disk_bytes: u64,
    pub default_image: String,
    pub boot_timeout: Duration,
    pub stop_timeout: Duration,
    pub restart_max: u32,
    pub restart_window: Duration,
    pub restart_backoff_initial: Duration,
    pub restart_backoff_max: Duration,
    /// Where the guest agent binary is (resolved at start-up).
    pub agent_path: Option<PathBuf>,
    pub qemu_binary: String,
    pub firecracker_binary: String,
    /// `<state>/vms`: disks and console logs.
    pub vms_dir: PathBuf,
    /// `<runtime>/vms`: VMM sockets (short paths).
    pub run_dir: PathBuf,
    pub config_dir: PathBuf,
    /// Guest network: enabled, the bridge's address is the gateway.
    pub network: bool,
    pub gateway: Option<Ipv4Addr>,
    pub prefix_len: u8,
    /// The resolver guests use.
    pub guest_dns: Option<Ipv4Addr>,
    pub dns_zone: String,
}

impl VmSettings {
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir.join(id)
    }

    pub fn vm_run_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join(&id[..id.len().min(12)])
    }

    pub fn known_hosts(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("known_hosts")
    }

    pub fn console_log(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    pub fn ssh_key(&self) -> PathBuf {
        self.config_dir.join("ssh").join("id_ed25519")
    }
}

impl VmRecord {
    pub fn info(&self, settings: &VmSettings) -> VmInfo {
        VmInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            image: self.image.clone(),
            kernel: self.kernel.clone(),
            vmm: self.vmm.as_str().to_string(),
            accel: (self.vmm == VmmKind::Qemu).then(|| self.accel.as_str().to_string()),
            accel_reason: (self.vmm == VmmKind::Qemu).then(|| self.accel_reason.clone()),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_bytes: self.disk_bytes,
            ip: self.ip,
            gateway: self.gateway,
            mac: self.mac.clone(),
            tap: self.tap.clone(),
            fqdn: format!("{}.{}", self.name, settings.dns_zone.trim_end_matches('.')),
            pid: self.process.map(|p| p.pid),
            restart: self.restart,
            restarts: self.restarts,
            created_unix_ms: self.created_unix_ms,
            started_unix_ms: self.started_unix_ms,
            last_error: self.last_error.clone(),
            console_tail: self.console_tail.clone(),
            console_log: settings.console_log(&self.id).display().to_string(),
            ssh_key: settings.ssh_key().display().to_string(),
            known_hosts: settings.known_hosts(&self.id).display().to_string(),
            has_sshd: self.has_sshd,
            agent_ready: false,
        }
    }
}

/// A locally administered, unicast MAC derived from the VM id.
pub fn mac_for(id: &str) -> String {
    let bytes: Vec<u8> = (0..5)
        .map(|i| u8::from_str_radix(id.get(i * 2..i * 2 + 2).unwrap_or("00"), 16).unwrap_or(0))
        .collect();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]
    )
}

/// The last `lines` lines of a console log, control characters stripped.
pub fn console_tail(path: &Path, lines: usize) -> Vec<String> {
    let text = banger_vmm::process::tail_of(path, 16 * 1024);
    let mut out: Vec<String> = text
        .lines()
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect::<String>()
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = out.len().saturating_sub(lines);
    out.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_local_unicast_and_stable() {
        let mac = mac_for("a1b2c3d4e5f60708");
        assert_eq!(mac, "02:a1:b2:c3:d4:e5");
        assert_eq!(mac_for("a1b2c3d4e5f60708"), mac);
    }

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        std::fs::write(&p, "one\r\ntwo\n\x1b[0mthree\n\n").unwrap();
        assert_eq!(console_tail(&p, 2), ["two", "[0mthree"]);
    }
}
