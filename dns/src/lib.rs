//! banger's authoritative DNS server for the `vm.` zone: `<name>.vm.` → the
//! VM's IPv4 address. The daemon's Dns actor owns one [`DnsServer`] and
//! keeps its [`Records`] in step with the VMs; everything else is in here.
//!
//! - `answer`: decoding a request, deciding the response (what is answered
//!   how), encoding it.
//! - `records`: the record map; writers publish immutable snapshots.
//! - `server`: the `dns` thread, what UDP and TCP share (per-client limits,
//!   counters, logging), the capped TCP acceptor on hickory-server's TCP
//!   pieces, shutdown.
//! - `udp`: our UDP loop, batched with `recvmmsg`/`sendmmsg` (why ours:
//!   measured cost per query, see there).
//! - `limit`: per-client token buckets and rate-limited logging.
//! - `name`: name validation and case-insensitive keys.
//!
//! See `docs/dns.md` for the behaviour on the wire.

mod answer;
mod limit;
mod name;
mod records;
mod server;
mod udp;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use name::NameError;
pub use records::Records;
pub use server::{DnsServer, DnsStats};

/// Where and what the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP both bind here; port 0 picks a free port (the same for
    /// both), see [`DnsServer::local_addr`].
    pub listen: SocketAddr,
    /// The zone served authoritatively, `"vm."` (the trailing dot is optional).
    pub zone: String,
    /// TTL of every record, and the negative-caching TTL (SOA MINIMUM).
    pub ttl: u32,
    pub limits: Limits,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 42069)),
            zone: "vm.".to_string(),
            ttl: 5,
            limits: Limits::default(),
        }
    }
}

/// Bounds on what one client can make the server do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Token bucket per source IP, shared by UDP and TCP. Over the rate, UDP
    /// queries are dropped and TCP queries wait. `None` disables it (e.g.
    /// for a benchmark that sends everything from one address).
    pub client_rate: Option<ClientRate>,
    /// Open TCP connections, all clients together. Past it, new
    /// connections are closed at once.
    pub max_tcp_connections: usize,
    /// Open TCP connections from one source IP.
    pub max_tcp_connections_per_client: usize,
    /// A TCP connection is closed when no whole request arrives within this
    /// long of the previous one (or of the connect), handling and writing
    /// included: hickory-server's per-connection timeout.
    pub tcp_idle_timeout: Duration,
    /// Larger requests get FORMERR (bytes; DNS queries are well under 512).
    /// Over UDP the limit is at most 4095: the UDP loop keeps 4096 bytes of
    /// a datagram.
    pub max_request_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            client_rate: Some(ClientRate {
                queries_per_second: 10_000,
                burst: 20_000,
            }),
            max_tcp_connections: 128,
            max_tcp_connections_per_client: 16,
            tcp_idle_timeout: Duration::from_secs(10),
            max_request_size: 4096,
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<(), DnsError> {
        let check =
            |ok: bool, what: &'static str| ok.then_some(()).ok_or(DnsError::InvalidLimit(what));
        check(
            self.max_tcp_connections > 0,
            "max_tcp_connections must be at least 1",
        )?;
        check(
            self.max_tcp_connections_per_client > 0,
            "max_tcp_connections_per_client must be at least 1",
        )?;
        check(
            !self.tcp_idle_timeout.is_zero(),
            "tcp_idle_timeout must not be zero",
        )?;
        check(
            self.max_request_size >= answer::HEADER_LEN,
            "max_request_size must be at least 12 bytes",
        )?;
        if let Some(rate) = self.client_rate {
            check(
                rate.queries_per_second > 0,
                "client_rate.queries_per_second must be at least 1",
            )?;
            check(rate.burst > 0, "client_rate.burst must be at least 1")?;
        }
        Ok(())
    }
}

/// A token bucket: `burst` queries at once, refilled at `queries_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRate {
    pub queries_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot bind DNS {transport} socket on {addr}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("invalid DNS zone `{zone}`")]
    InvalidZone {
        zone: String,
        #[source]
        source: NameError,
    },
    #[error("invalid DNS record name `{name}`")]
    InvalidName {
        name: String,
        #[source]
        source: NameError,
    },
    #[error("invalid DNS limits: {0}")]
    InvalidLimit(&'static str),
    #[error("cannot start the DNS server thread")]
    Thread(#[source] io::Error),
}
