//! Host networking for banger: the bridge, the TAP devices on it, NAT for the
//! guest subnet, IP forwarding and guest address allocation.
//!
//! This crate is a library of idempotent building blocks; it keeps no state of
//! its own. The daemon's `TapPool` actor owns the host resources and drives
//! these functions: it reconciles at start-up (bridge, NAT table, leftover
//! TAPs), keeps a warm pool of TAPs and hands them to VMs.
//!
//! - [`Host`]: one rtnetlink connection; bridge, TAP and link operations and
//!   the default-route lookup. Never shells out to `ip`.
//! - [`NatRules`]: banger's own nftables table (through the `nftables`
//!   crate's JSON schema and the `nft -j` binary), rebuilt atomically.
//! - [`enable_ip_forward`]: the `net.ipv4.ip_forward` sysctl.
//! - [`ipam`]: pure address allocation inside the subnet.
//! - [`validate_ifname`]: checks every interface name before it reaches the
//!   kernel.
//!
//! Everything acts on the network namespace of the calling thread (netlink
//! sockets, `/dev/net/tun`, `/proc/sys/net`, and `nft` children all bind to
//! it), which is how the tests run it inside namespaces of their own.
//!
//! See `docs/networking.md` for what ends up on the host.

mod config;
mod error;
pub mod frames;
mod host;
mod ifname;
pub mod ipam;
mod nat;
mod subnet;
mod sysctl;
mod tun;

pub use config::{ConfigError, NetConfig};
pub use error::NetError;
pub use host::{stable_bridge_mac, BridgeState, Host, LinkInfo, TapInfo};
pub use ifname::{validate_ifname, IfNameError, IFNAME_MAX};
pub use nat::{NatError, NatRules, NftMessage, FORWARD_CHAIN, NAT_CHAIN};
pub use subnet::{Ipv4Net, SubnetError};
pub use sysctl::{enable_ip_forward, ip_forward_enabled, IP_FORWARD_PATH};
pub use tun::{open_tap, MacAddr, TapOptions};
