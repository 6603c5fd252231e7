//! Guest address allocation inside the subnet: pure logic, no I/O. The caller
//! (the VM manager) owns the set of addresses in use, kept in the store, and
//! asks a [`Pool`] for the next free one or to check a requested static one.
//!
//! Never handed out: the network address, the broadcast address, the gateway
//! (the bridge's own address, the subnet's first host) and any address the
//! pool was told to reserve.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use thiserror::Error;

use crate::subnet::Ipv4Net;

/// Why an address cannot be used, or none is left.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IpamError {
    #[error("subnet {subnet} is too small for a gateway and a guest (/30 or larger needed)")]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error("{ip} is outside the guest subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is the network address of {subnet}")]
    NetworkAddress { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is the broadcast address of {subnet}")]
    BroadcastAddress { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is the gateway (the host's address on the bridge)")]
    Gateway { ip: Ipv4Addr },
    #[error("{ip} is reserved")]
    Reserved { ip: Ipv4Addr },
    #[error("{ip} is already in use")]
    Taken { ip: Ipv4Addr },
    #[error("no free address left in {subnet}")]
    Exhausted { subnet: Ipv4Net },
}

/// The allocatable addresses of a guest subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    reserved: BTreeSet<Ipv4Addr>,
}

impl Pool {
    /// A pool for `subnet` whose gateway is the first host address
    /// (`172.30.0.1` in `172.30.0.0/24`), as [`crate::Host::ensure_bridge`]
    /// configures it.
    pub fn new(subnet: Ipv4Net) -> Result<Pool, IpamError> {
        let gateway = subnet
            .first_host()
            .ok_or(IpamError::SubnetTooSmall { subnet })?;
        Ok(Pool {
            subnet,
            gateway,
            reserved: BTreeSet::new(),
        })
    }

    /// Also never hand out these addresses (for instance a DNS forwarder's
    /// or a statically configured appliance's). Addresses outside the subnet
    /// are ignored.
    pub fn with_reserved(mut self, reserved: impl IntoIterator<Item = Ipv4Addr>) -> Pool {
        self.reserved
            .extend(reserved.into_iter().filter(|ip| self.subnet.contains(*ip)));
        self
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn reserved(&self) -> &BTreeSet<Ipv4Addr> {
        &self.reserved
    }

    /// How many addresses guests can get in total (ignoring `taken`).
    pub fn capacity(&self) -> u32 {
        let (first, last) = self.guest_range();
        let reserved = self
            .reserved
            .iter()
            .filter(|ip| (first..=last).contains(&u32::from(**ip)))
            .count() as u32;
        (last - first + 1) - reserved
    }

    /// First and last guest address as integers: after the gateway, before
    /// the broadcast address. `Pool::new` guarantees a /30 or larger, so the
    /// range holds at least one address.
    fn guest_range(&self) -> (u32, u32) {
        let first = u32::from(self.gateway) + 1;
        let last = u32::from(self.subnet.broadcast()) - 1;
        (first, last)
    }

    fn is_free(&self, ip: Ipv4Addr, taken: &BTreeSet<Ipv4Addr>) -> bool {
        !self.reserved.contains(&ip) && !taken.contains(&ip)
    }

    /// The lowest free guest address, or `None` if the subnet is full.
    pub fn next_free(&self, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, last) = self.guest_range();
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| self.is_free(*ip, taken))
    }

    /// The first free guest address after `after`, wrapping around once.
    /// Handing out addresses round-robin keeps a just-released address (and
    /// the host's ARP entry for its old MAC) out of use for as long as
    /// possible.
    pub fn next_free_after(&self, after: Ipv4Addr, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, last) = self.guest_range();
        let start = u32::from(after).saturating_add(1).clamp(first, last + 1);
        (start..=last)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|ip| self.is_free(*ip, taken))
    }

    /// [`next_free`](Self::next_free), with [`IpamError::Exhausted`] when
    /// the subnet is full.
    pub fn allocate(&self, taken: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        self.next_free(taken).ok_or(IpamError::Exhausted {
            subnet: self.subnet,
        })
    }

    /// Checks that a user-requested static address can be given to a guest:
    /// inside the subnet, not the network, broadcast or gateway address, not
    /// reserved and not in `taken`.
    pub fn validate_static(
        &self,
        ip: Ipv4Addr,
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), IpamError> {
        let subnet = self.subnet;
        if !subnet.contains(ip) {
            return Err(IpamError::OutsideSubnet { ip, subnet });
        }
        if ip == subnet.network() {
            return Err(IpamError::NetworkAddress { ip, subnet });
        }
        if ip == subnet.broadcast() {
            return Err(IpamError::BroadcastAddress { ip, subnet });
        }
        if ip == self.gateway {
            return Err(IpamError::Gateway { ip });
        }
        if self.reserved.contains(&ip) {
            return Err(IpamError::Reserved { ip });
        }
        if taken.contains(&ip) {
            return Err(IpamError::Taken { ip });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("valid test address")
    }

    fn pool(s: &str) -> Pool {
        Pool::new(s.parse().expect("valid test subnet")).expect("pool")
    }

    fn set(ips: &[&str]) -> BTreeSet<Ipv4Addr> {
        ips.iter().map(|s| ip(s)).collect()
    }

    #[test]
    fn first_allocation_skips_network_and_gateway() {
        let p = pool("172.30.0.0/24");
        assert_eq!(p.gateway(), ip("172.30.0.1"));
        assert_eq!(p.next_free(&BTreeSet::new()), Some(ip("172.30.0.2")));
        assert_eq!(p.capacity(), 253);
    }

    #[test]
    fn next_free_skips_taken_and_reserved() {
        let p = pool("172.30.0.0/24").with_reserved([ip("172.30.0.3"), ip("10.0.0.1")]);
        assert_eq!(
            p.reserved().len(),
            1,
            "out-of-subnet reservations are ignored"
        );
        let taken = set(&["172.30.0.2", "172.30.0.4"]);
        assert_eq!(p.next_free(&taken), Some(ip("172.30.0.5")));
        assert_eq!(p.capacity(), 252);
    }

    #[test]
    fn never_hands_out_broadcast_and_reports_exhaustion() {
        // /30: network .0, gateway .1, guest .2, broadcast .3.
        let p = pool("10.0.0.0/30");
        assert_eq!(p.capacity(), 1);
        assert_eq!(p.next_free(&BTreeSet::new()), Some(ip("10.0.0.2")));
        let taken = set(&["10.0.0.2"]);
        assert_eq!(p.next_free(&taken), None);
        assert_eq!(
            p.allocate(&taken),
            Err(IpamError::Exhausted { subnet: p.subnet() })
        );
        // A full /24 never yields .255.
        let p = pool("172.30.0.0/24");
        let all: BTreeSet<Ipv4Addr> = (2..=254).map(|i| Ipv4Addr::new(172, 30, 0, i)).collect();
        assert_eq!(p.next_free(&all), None);
        let mut almost = all.clone();
        almost.remove(&ip("172.30.0.254"));
        assert_eq!(p.next_free(&almost), Some(ip("172.30.0.254")));
    }

    #[test]
    fn round_robin_wraps() {
        let p = pool("10.0.0.0/29"); // guests .2 ..= .6
        let none = BTreeSet::new();
        assert_eq!(
            p.next_free_after(ip("10.0.0.2"), &none),
            Some(ip("10.0.0.3"))
        );
        assert_eq!(
            p.next_free_after(ip("10.0.0.6"), &none),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            p.next_free_after(ip("10.0.0.1"), &none),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            p.next_free_after(ip("255.255.255.255"), &none),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            p.next_free_after(ip("0.0.0.0"), &none),
            Some(ip("10.0.0.2"))
        );
        let taken = set(&["10.0.0.5", "10.0.0.6", "10.0.0.2"]);
        assert_eq!(
            p.next_free_after(ip("10.0.0.4"), &taken),
            Some(ip("10.0.0.3"))
        );
        let full = set(&["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        assert_eq!(p.next_free_after(ip("10.0.0.3"), &full), None);
    }

    #[test]
    fn static_validation_errors() {
        let p = pool("172.30.0.0/24").with_reserved([ip("172.30.0.53")]);
        let subnet = p.subnet();
        let taken = set(&["172.30.0.9"]);
        let check = |s: &str| p.validate_static(ip(s), &taken);
        assert_eq!(check("172.30.0.10"), Ok(()));
        assert_eq!(check("172.30.0.254"), Ok(()));
        assert_eq!(
            check("172.30.1.10"),
            Err(IpamError::OutsideSubnet {
                ip: ip("172.30.1.10"),
                subnet
            })
        );
        assert_eq!(
            check("172.30.0.0"),
            Err(IpamError::NetworkAddress {
                ip: ip("172.30.0.0"),
                subnet
            })
        );
        assert_eq!(
            check("172.30.0.255"),
            Err(IpamError::BroadcastAddress {
                ip: ip("172.30.0.255"),
                subnet
            })
        );
        assert_eq!(
            check("172.30.0.1"),
            Err(IpamError::Gateway {
                ip: ip("172.30.0.1")
            })
        );
        assert_eq!(
            check("172.30.0.53"),
            Err(IpamError::Reserved {
                ip: ip("172.30.0.53")
            })
        );
        assert_eq!(
            check("172.30.0.9"),
            Err(IpamError::Taken {
                ip: ip("172.30.0.9")
            })
        );
        // The messages say what is wrong.
        assert_eq!(
            check("172.30.0.255")
                .expect_err("must be refused")
                .to_string(),
            "172.30.0.255 is the broadcast address of 172.30.0.0/24"
        );
        assert_eq!(
            check("10.1.1.1").expect_err("must be refused").to_string(),
            "10.1.1.1 is outside the guest subnet 172.30.0.0/24"
        );
    }

    #[test]
    fn tiny_subnets_are_refused() {
        for s in ["10.0.0.0/31", "10.0.0.0/32"] {
            assert!(matches!(
                Pool::new(s.parse().expect("net")),
                Err(IpamError::SubnetTooSmall { .. })
            ));
        }
    }
}
