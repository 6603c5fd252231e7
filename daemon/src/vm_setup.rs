//! Start-up facts for the VM subsystem: where the guest agent binary is,
//! which resolver guests get, whether KVM can run guests, and the
//! [`VmSettings`] built from the config.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_actors::vms::record::VmSettings;
use banger_protocol::paths::Paths;
use tracing::warn;

use crate::config::Config;
use crate::doctor::KvmProbeOutcome;

/// Whether a probe outcome means KVM runs stock guests, and why.
pub fn accel_verdict(outcome: &KvmProbeOutcome) -> (bool, String) {
    match outcome {
        KvmProbeOutcome::Ran(detail) => (
            true,
            format!("KVM probe ran a guest at native speed ({detail})"),
        ),
        KvmProbeOutcome::NoDevice => (
            false,
            "no /dev/kvm on this host: using TCG (software emulation)".into(),
        ),
        KvmProbeOutcome::Failed { message, .. } => (
            false,
            format!("the KVM probe failed ({message}): using TCG (software emulation)"),
        ),
        KvmProbeOutcome::TimedOut { stage, after } => (
            false,
            format!(
                "the KVM probe hung for {}s{}: using TCG (software emulation)",
                after.as_secs(),
                stage
                    .as_deref()
                    .map(|s| format!(" at `{s}`"))
                    .unwrap_or_default()
            ),
        ),
        KvmProbeOutcome::Broken(why) => (
            false,
            format!("the KVM probe could not run ({why}): using TCG"),
        ),
    }
}

/// Whether the ELF at `path` is statically linked (has no interpreter).
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return Ok(false);
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (entsize, num) = (u16_at(0x36), u16_at(0x38));
    for i in 0..num {
        let at = phoff + i * entsize;
        if at + 4 > bytes.len() {
            return Ok(false);
        }
        // PT_INTERP: a dynamic loader is needed.
        if u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4])) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The guest agent to inject into images: the configured path, else
/// `banger-agent` next to bangerd, else the static build in the cargo
/// target dir. `None` (with a warning) when there is none or it is not
/// static: images then get no agent.
pub fn agent_path(configured: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if !configured.is_empty() {
        candidates.push(PathBuf::from(configured));
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("banger-agent"));
            if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
                candidates.push(
                    target
                        .join("x86_64-unknown-linux-gnu")
                        .join(profile)
                        .join("banger-agent"),
                );
            }
        }
    }
    for c in &candidates {
        match is_static_elf(c) {
            Ok(true) => return Some(c.clone()),
            Ok(false) => warn!(
                path = %c.display(),
                "the guest agent is not a static binary; build it with RUSTFLAGS='-C target-feature=+crt-static' cargo build -p banger-agent --target x86_64-unknown-linux-gnu"
            ),
            Err(_) => {}
        }
    }
    warn!(
        looked_in = ?candidates,
        "no guest agent found: new images get none, and VMs are reached by SSH only"
    );
    None
}

/// Where the host's resolvers are listed: `/etc/resolv.conf`, then
/// systemd-resolved's list of its upstream servers (a host running
/// resolved has only its loopback stub, 127.0.0.53, in the first, which a
/// guest cannot reach), as Docker does.
const RESOLV_FILES: [&str; 2] = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// The host's first non-loopback IPv4 nameserver.
pub fn host_resolver() -> Option<Ipv4Addr> {
    resolver_of(
        RESOLV_FILES
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok()),
    )
}

/// The first non-loopback nameserver of the first file that has one.
fn resolver_of(files: impl IntoIterator<Item = String>) -> Option<Ipv4Addr> {
    files.into_iter().find_map(|text| first_nameserver(&text))
}

fn first_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

pub fn settings(
    config: &Config,
    paths: &Paths,
    agent_path: Option<PathBuf>,
) -> anyhow::Result<VmSettings> {
    let net = config.network.to_net().map_err(anyhow::Error::msg)?;
    let vm = &config.vm;
    let guest_dns = if vm.guest_dns.is_empty() {
        host_resolver()
    } else {
        Some(vm.guest_dns.parse().map_err(|_| {
            anyhow::anyhow!("[vm] guest_dns `{}` is not an IPv4 address", vm.guest_dns)
        })?)
    };
    for (key, value, allowed) in [
        ("vmm", &vm.vmm, &["auto", "qemu", "firecracker"][..]),
        ("accel", &vm.accel, &["auto", "kvm", "tcg"][..]),
    ] {
        if !allowed.contains(&value.as_str()) {
            anyhow::bail!(
                "[vm] {key} = \"{value}\" is not one of {}",
                allowed.join(", ")
            );
        }
    }
    Ok(VmSettings {
        vmm: vm.vmm.clone(),
        accel: vm.accel.clone(),
        default_cpus: vm.cpus.max(1),
        default_memory_mib: vm.memory_mib.max(64),
        default_disk_bytes: vm.disk_bytes,
        default_image: vm.default_image.clone(),
        boot_timeout: Duration::from_secs(vm.boot_timeout_secs),
        stop_timeout: Duration::from_secs(vm.stop_timeout_secs),
        restart_max: vm.restart_max,
        restart_window: Duration::from_secs(vm.restart_window_secs),
        restart_backoff_initial: Duration::from_millis(vm.restart_backoff_initial_ms),
        restart_backoff_max: Duration::from_millis(vm.restart_backoff_max_ms),
        agent_path,
        qemu_binary: vm.qemu_binary.clone(),
        firecracker_binary: vm.firecracker_binary.clone(),
        vms_dir: paths.state_dir.join("vms"),
        run_dir: paths.runtime_dir.join("vms"),
        config_dir: paths.config_dir.clone(),
        network: config.network.enabled,
        gateway: config.network.enabled.then(|| net.gateway()).flatten(),
        prefix_len: net.subnet.prefix(),
        guest_dns,
        dns_zone: "vm.".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_behind_systemd_resolved_stub_is_used() {
        let stub =
            "# managed by resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";
        let upstream = "nameserver 10.0.2.3\nnameserver 10.0.2.4\n";
        assert_eq!(
            resolver_of([stub.to_string(), upstream.to_string()]),
            Some(Ipv4Addr::new(10, 0, 2, 3))
        );
        // A plain resolv.conf wins; loopback-only everywhere gives none.
        assert_eq!(
            resolver_of([
                "nameserver ::1\nnameserver 192.0.2.1\n".to_string(),
                upstream.to_string()
            ]),
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(resolver_of([stub.to_string()]), None);
        assert_eq!(resolver_of(Vec::new()), None);
    }

    #[test]
    fn static_detection() {
        // This test binary is dynamically linked (glibc, no crt-static).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("x");
        std::fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&not_elf).unwrap());
    }
}
