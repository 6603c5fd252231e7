//! `Health`: a snapshot of the guest from `/proc`, `getifaddrs` and (under
//! systemd) `systemctl is-system-running`.

use crate::context::AgentContext;
use crate::{ports, reaper, AGENT_VERSION};
use banger_protocol::agent::GuestHealth;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// How long `systemctl is-system-running` may take.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything, the blocking part on a blocking thread.
pub async fn collect(ctx: &AgentContext) -> GuestHealth {
    let mut health = tokio::task::spawn_blocking(collect_local)
        .await
        .unwrap_or_default();
    health.pid1 = ctx.pid1;
    if systemd_is_init() {
        health.system_state = system_state().await;
    }
    health
}

/// The parts that only read files and the kernel.
pub fn collect_local() -> GuestHealth {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (mem_total_kib, mem_available_kib) = parse_meminfo(&read("/proc/meminfo"));
    GuestHealth {
        agent_version: AGENT_VERSION.to_string(),
        pid1: false,
        hostname: hostname(),
        uptime_ms: parse_uptime(&read("/proc/uptime")).unwrap_or(0),
        load_centi: parse_loadavg(&read("/proc/loadavg")).unwrap_or([0; 3]),
        mem_total_kib,
        mem_available_kib,
        addresses: ipv4_addresses(),
        system_state: None,
        sshd_listening: ports::tcp_listening_on(22),
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `/proc/uptime` → milliseconds since boot.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// `/proc/loadavg` → the three averages in hundredths.
pub fn parse_loadavg(text: &str) -> Option<[u32; 3]> {
    let mut it = text.split_whitespace();
    let mut out = [0u32; 3];
    for v in &mut out {
        let f: f64 = it.next()?.parse().ok()?;
        *v = (f * 100.0).round() as u32;
    }
    Some(out)
}

/// `/proc/meminfo` → (MemTotal, MemAvailable) in KiB.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// `name addr/prefix` for each IPv4 address of a non-loopback interface.
pub fn ipv4_addresses() -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifa in addrs {
        if ifa
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        {
            continue;
        }
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let prefix = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .map(|m| m.ip().to_bits().count_ones())
            .unwrap_or(32);
        let ip = IpAddr::V4(addr.ip());
        if ip.is_loopback() {
            continue;
        }
        out.push(format!("{} {ip}/{prefix}", ifa.interface_name));
    }
    out
}

/// Whether systemd is the guest's init.
pub fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// `systemctl is-system-running` (its output, whatever the exit code).
pub async fn system_state() -> Option<String> {
    let out = reaper::run(&["systemctl", "is-system-running"], SYSTEMCTL_TIMEOUT)
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_uptime("12345.67 2345.10\n"), Some(12_345_670));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(
            parse_loadavg("0.50 1.25 10.00 2/345 6789\n"),
            Some([50, 125, 1000])
        );
        assert_eq!(parse_loadavg("0.50"), None);
        let meminfo =
            "MemTotal:        2035720 kB\nMemFree:          100 kB\nMemAvailable:    1500000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (2_035_720, 1_500_000));
        assert_eq!(parse_meminfo("nothing"), (0, 0));
    }

    #[test]
    fn real_health_is_plausible() {
        let h = collect_local();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        assert_eq!(h.hostname, host.trim());
        assert!(h.uptime_ms > 0);
        assert!(h.mem_total_kib > 0);
        assert!(h.mem_available_kib > 0 && h.mem_available_kib <= h.mem_total_kib);
        assert_eq!(h.agent_version, AGENT_VERSION);
        for a in &h.addresses {
            let (name, cidr) = a.split_once(' ').expect("name addr/prefix");
            assert!(!name.is_empty());
            assert!(!cidr.starts_with("127."), "{a}");
            let (ip, prefix) = cidr.split_once('/').expect("prefix");
            assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{a}");
            assert!(prefix.parse::<u8>().is_ok_and(|p| p <= 32), "{a}");
        }
        // sshd_listening agrees with /proc/net directly.
        assert_eq!(h.sshd_listening, ports::tcp_listening_on(22));
    }
}
