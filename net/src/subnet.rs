//! [`Ipv4Net`]: an IPv4 network in CIDR form (`172.30.0.0/24`), used for the
//! guest subnet in the configuration, the bridge address, the NAT rules and
//! address allocation.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Why a string or an (address, prefix) pair is not a network.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubnetError {
    #[error("{input:?} is not in CIDR form (like 172.30.0.0/24)")]
    Syntax { input: String },
    #[error("prefix length /{prefix} is out of range (0..=32)")]
    PrefixRange { prefix: u8 },
    #[error("{addr}/{prefix} has host bits set; did you mean {network}/{prefix}?")]
    HostBits {
        addr: Ipv4Addr,
        prefix: u8,
        network: Ipv4Addr,
    },
}

/// An IPv4 network: a network address with no host bits set, and a prefix
/// length. Serialised as the string `"a.b.c.d/len"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// A network from its address and prefix length. Refuses host bits, so
    /// `172.30.0.1/24` (an interface address, not a network) is an error.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, SubnetError> {
        if prefix > 32 {
            return Err(SubnetError::PrefixRange { prefix });
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(SubnetError::HostBits {
                addr,
                prefix,
                network,
            });
        }
        Ok(Self { addr, prefix })
    }

    /// The network address (`172.30.0.0` for `172.30.0.0/24`).
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length (`24` for `172.30.0.0/24`).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask (`255.255.255.0` for a /24).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// The broadcast address (`172.30.0.255` for `172.30.0.0/24`).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }

    /// Whether `ip` lies inside the network (network and broadcast included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// The first usable host address (`172.30.0.1` for `172.30.0.0/24`):
    /// banger gives it to the bridge and guests use it as their gateway.
    /// `None` for /31 and /32, which have no room for a gateway and a guest.
    pub fn first_host(&self) -> Option<Ipv4Addr> {
        (self.prefix <= 30).then(|| Ipv4Addr::from(u32::from(self.addr) + 1))
    }

    /// The last usable host address (`172.30.0.254` for `172.30.0.0/24`).
    pub fn last_host(&self) -> Option<Ipv4Addr> {
        (self.prefix <= 30).then(|| Ipv4Addr::from(u32::from(self.broadcast()) - 1))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SubnetError::Syntax {
            input: s.to_owned(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Self::new(addr, prefix)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("valid test network")
    }

    #[test]
    fn parses_and_prints() {
        let n = net("172.30.0.0/24");
        assert_eq!(n.network(), Ipv4Addr::new(172, 30, 0, 0));
        assert_eq!(n.prefix(), 24);
        assert_eq!(n.to_string(), "172.30.0.0/24");
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(172, 30, 0, 255));
        assert_eq!(n.first_host(), Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(n.last_host(), Some(Ipv4Addr::new(172, 30, 0, 254)));
        assert!(n.contains(Ipv4Addr::new(172, 30, 0, 77)));
        assert!(!n.contains(Ipv4Addr::new(172, 30, 1, 1)));
    }

    #[test]
    fn edges() {
        assert_eq!(net("0.0.0.0/0").broadcast(), Ipv4Addr::BROADCAST);
        assert!(net("0.0.0.0/0").contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(
            net("10.0.0.4/30").last_host(),
            Some(Ipv4Addr::new(10, 0, 0, 6))
        );
        assert_eq!(net("10.0.0.4/31").first_host(), None);
        assert_eq!(net("10.0.0.4/32").broadcast(), Ipv4Addr::new(10, 0, 0, 4));
    }

    #[test]
    fn rejects_bad_input() {
        for s in [
            "",
            "172.30.0.0",
            "172.30.0.0/",
            "/24",
            "172.30.0/24",
            "172.30.0.0/+4",
            "172.30.0.0/024",
        ] {
            assert!(
                matches!(s.parse::<Ipv4Net>(), Err(SubnetError::Syntax { .. })),
                "{s:?}"
            );
        }
        assert_eq!(
            "172.30.0.0/33".parse::<Ipv4Net>(),
            Err(SubnetError::PrefixRange { prefix: 33 })
        );
        let err = "172.30.0.1/24"
            .parse::<Ipv4Net>()
            .expect_err("must be refused");
        assert!(
            err.to_string().contains("did you mean 172.30.0.0/24"),
            "{err}"
        );
    }

    #[test]
    fn serde_as_string() {
        let n = net("192.168.7.0/24");
        let json = serde_json::to_string(&n).expect("serialise");
        assert_eq!(json, "\"192.168.7.0/24\"");
        let back: Ipv4Net = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, n);
        assert!(serde_json::from_str::<Ipv4Net>("\"192.168.7.1/24\"").is_err());
    }
}
