//! [`NetConfig`]: the names and the subnet banger uses on the host. The
//! daemon reads it from its configuration file (`[network]`); every function
//! in this crate that touches the host takes its names from here.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ifname::{validate_ifname, IfNameError, IFNAME_MAX};
use crate::subnet::Ipv4Net;

/// Longest nftables table name banger accepts (the kernel allows 255).
pub const NFT_TABLE_MAX: usize = 64;

/// Digits kept free after the TAP prefix, so that `{prefix}{index}` fits in
/// an interface name for any index up to 99999.
const TAP_INDEX_DIGITS: usize = 5;

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("invalid bridge name")]
    Bridge(#[source] IfNameError),
    #[error("invalid TAP prefix")]
    TapPrefix(#[source] IfNameError),
    #[error(
        "TAP prefix {prefix:?} is too long: at most {} bytes, so that {TAP_INDEX_DIGITS} index digits fit",
        IFNAME_MAX - TAP_INDEX_DIGITS
    )]
    TapPrefixTooLong { prefix: String },
    #[error("bridge name {bridge:?} starts with the TAP prefix {prefix:?}; reconcile would treat it as a TAP")]
    BridgeLooksLikeTap { bridge: String, prefix: String },
    #[error("subnet {subnet} is too small: banger needs a gateway and at least one guest (/30 or larger)")]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error(
        "nftables table name {name:?} is invalid: 1..={NFT_TABLE_MAX} of letters, digits, '_' and '-', starting with a letter"
    )]
    TableName { name: String },
    #[error("TAP index {index} does not fit in an interface name after the prefix {prefix:?}")]
    TapIndex { prefix: String, index: u32 },
}

/// Host networking settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// The bridge every TAP joins (default `banger0`).
    pub bridge: String,
    /// The guest subnet (default `172.30.0.0/24`); the bridge takes its first
    /// host address, guests get the others.
    pub subnet: Ipv4Net,
    /// Prefix of the TAP device names (default `bgtap`, giving `bgtap0`, ...).
    pub tap_prefix: String,
    /// banger's own nftables table, family `ip` (default `banger`).
    pub nft_table: String,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            bridge: "banger0".to_owned(),
            subnet: Ipv4Net::new(Ipv4Addr::new(172, 30, 0, 0), 24)
                .unwrap_or_else(|_| unreachable!("172.30.0.0/24 is a network")),
            tap_prefix: "bgtap".to_owned(),
            nft_table: "banger".to_owned(),
        }
    }
}

impl NetConfig {
    /// Checks every name and the subnet size. Call once after loading.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_ifname(&self.bridge).map_err(ConfigError::Bridge)?;
        validate_ifname(&self.tap_prefix).map_err(ConfigError::TapPrefix)?;
        if self.tap_prefix.len() > IFNAME_MAX - TAP_INDEX_DIGITS {
            return Err(ConfigError::TapPrefixTooLong {
                prefix: self.tap_prefix.clone(),
            });
        }
        if self.bridge.starts_with(&self.tap_prefix) {
            return Err(ConfigError::BridgeLooksLikeTap {
                bridge: self.bridge.clone(),
                prefix: self.tap_prefix.clone(),
            });
        }
        if self.subnet.first_host().is_none() {
            return Err(ConfigError::SubnetTooSmall {
                subnet: self.subnet,
            });
        }
        validate_table_name(&self.nft_table)?;
        Ok(())
    }

    /// The bridge's own address and the guests' gateway: the subnet's first
    /// host address (`172.30.0.1`). `None` only for an invalid (/31, /32)
    /// subnet, which [`validate`](Self::validate) refuses.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.subnet.first_host()
    }

    /// The name of TAP number `index`: `{tap_prefix}{index}` (`bgtap3`).
    pub fn tap_name(&self, index: u32) -> Result<String, ConfigError> {
        let name = format!("{}{index}", self.tap_prefix);
        validate_ifname(&name).map_err(|_| ConfigError::TapIndex {
            prefix: self.tap_prefix.clone(),
            index,
        })?;
        Ok(name)
    }

    /// The index of a TAP name made by [`tap_name`](Self::tap_name), or
    /// `None` for any other name (`bgtapx`, `bgtap01`, `eth0`).
    pub fn tap_index(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix(&self.tap_prefix)?;
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (digits.len() > 1 && digits.starts_with('0'))
        {
            return None;
        }
        digits.parse().ok()
    }
}

/// Checks an nftables table name: it is only ever passed inside JSON, but a
/// plain name keeps `nft list table ip <name>` copy-pasteable.
pub(crate) fn validate_table_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= NFT_TABLE_MAX
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::TableName {
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let cfg = NetConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.bridge, "banger0");
        assert_eq!(cfg.subnet.to_string(), "172.30.0.0/24");
        assert_eq!(cfg.gateway(), Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(cfg.tap_prefix, "bgtap");
        assert_eq!(cfg.nft_table, "banger");
    }

    #[test]
    fn tap_names_round_trip() {
        let cfg = NetConfig::default();
        assert_eq!(cfg.tap_name(0).as_deref(), Ok("bgtap0"));
        assert_eq!(
            cfg.tap_name(4_294_967_295).as_deref(),
            Ok("bgtap4294967295")
        );
        assert_eq!(cfg.tap_index("bgtap17"), Some(17));
        assert_eq!(cfg.tap_index("bgtap0"), Some(0));
        for other in ["bgtap", "bgtap01", "bgtapx", "bgtap1x", "eth0", "banger0"] {
            assert_eq!(cfg.tap_index(other), None, "{other}");
        }
        let long = NetConfig {
            tap_prefix: "abcdefghij".to_owned(),
            ..NetConfig::default()
        };
        assert_eq!(long.validate(), Ok(()));
        assert!(long.tap_name(99_999).is_ok());
        assert!(matches!(
            long.tap_name(100_000),
            Err(ConfigError::TapIndex { .. })
        ));
    }

    #[test]
    fn rejects_bad_settings() {
        let bad = |f: fn(&mut NetConfig)| {
            let mut cfg = NetConfig::default();
            f(&mut cfg);
            cfg.validate().expect_err("must be refused")
        };
        assert!(matches!(
            bad(|c| c.bridge = "a b".into()),
            ConfigError::Bridge(_)
        ));
        assert!(matches!(
            bad(|c| c.bridge = String::new()),
            ConfigError::Bridge(_)
        ));
        assert!(matches!(
            bad(|c| c.tap_prefix = "../".into()),
            ConfigError::TapPrefix(_)
        ));
        assert!(matches!(
            bad(|c| c.tap_prefix = "abcdefghijk".into()),
            ConfigError::TapPrefixTooLong { .. }
        ));
        assert!(matches!(
            bad(|c| c.bridge = "bgtapbr".into()),
            ConfigError::BridgeLooksLikeTap { .. }
        ));
        assert!(matches!(
            bad(|c| c.subnet = "10.0.0.0/31".parse().expect("net")),
            ConfigError::SubnetTooSmall { .. }
        ));
        for name in ["", "1abc", "a b", "a;b", &"x".repeat(65)] {
            let name = name.to_owned();
            let cfg = NetConfig {
                nft_table: name.clone(),
                ..NetConfig::default()
            };
            assert!(
                matches!(cfg.validate(), Err(ConfigError::TableName { .. })),
                "{name:?}"
            );
        }
    }

    #[test]
    fn deserialises_with_defaults() {
        let cfg: NetConfig = toml::from_str("subnet = \"10.9.0.0/16\"").expect("parse");
        assert_eq!(cfg.subnet.to_string(), "10.9.0.0/16");
        assert_eq!(cfg.bridge, "banger0");
        assert!(toml::from_str::<NetConfig>("bridgee = \"x\"").is_err());
        assert!(toml::from_str::<NetConfig>("subnet = \"10.9.0.1/16\"").is_err());
    }
}
