//! The `net.ipv4.ip_forward` sysctl. Guests reach the outside world only if
//! the host forwards their packets; banger turns forwarding on at start-up
//! and never turns it off (other software on the host may rely on it).
//!
//! `/proc/sys/net` belongs to the network namespace of the calling thread.

use std::fs;
use std::io;

/// Where the kernel exposes IPv4 forwarding.
pub const IP_FORWARD_PATH: &str = "/proc/sys/net/ipv4/ip_forward";

/// Whether IPv4 forwarding is on in the calling thread's network namespace.
pub fn ip_forward_enabled() -> io::Result<bool> {
    let value = fs::read_to_string(IP_FORWARD_PATH)?;
    Ok(value.trim() != "0")
}

/// Turns IPv4 forwarding on. Returns `true` if it was off (the host changed),
/// `false` if it was already on. Needs `CAP_NET_ADMIN`.
///
/// Note that turning it on also makes the kernel act as a router on every
/// interface (it stops accepting ICMP redirects, for instance); that is the
/// usual price of NAT for VMs and containers.
pub fn enable_ip_forward() -> io::Result<bool> {
    if ip_forward_enabled()? {
        return Ok(false);
    }
    fs::write(IP_FORWARD_PATH, b"1\n")?;
    tracing::info!(path = IP_FORWARD_PATH, "enabled IPv4 forwarding");
    Ok(true)
}
