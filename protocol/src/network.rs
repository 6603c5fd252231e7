//! Host networking and DNS as they travel. Append-only.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NetworkStatus {
    pub bridge: BridgeStatus,
    pub pool: PoolStatus,
    pub nat: NatStatus,
    pub ip_forward: bool,
    pub leases: Vec<Lease>,
    pub dns: DnsStatus,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BridgeStatus {
    pub name: String,
    pub exists: bool,
    pub up: bool,
    /// Host address with prefix, e.g. `172.30.0.1/24`.
    pub address: Option<String>,
    pub subnet: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// How many warm TAPs the pool keeps.
    pub target: u32,
    /// TAPs ready to hand out.
    pub warm: Vec<String>,
    /// TAPs handed out, with their owner.
    pub in_use: Vec<TapLease>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TapLease {
    pub tap: String,
    pub owner: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NatStatus {
    pub table: String,
    pub present: bool,
    /// The uplink masqueraded out of, when one was found.
    pub uplink: Option<String>,
    /// The rules, one per line, as `nft list table` prints them,
    /// prefixed with their chain (`forward: iifname "banger0" accept`).
    pub rules: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub owner: String,
    /// Requested explicitly (`--ip`) rather than allocated.
    pub static_ip: bool,
    pub created_unix_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DnsStatus {
    pub listen: Option<SocketAddr>,
    pub zone: String,
    pub records: Vec<DnsRecord>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    pub name: String,
    pub ip: Ipv4Addr,
    /// `static` (added with `dns add`) or `vm`.
    pub source: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DnsSetupReport {
    /// True when banger configured the resolver itself.
    pub configured: bool,
    /// What was done, or the exact steps to do by hand.
    pub lines: Vec<String>,
}
