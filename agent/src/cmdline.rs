//! The kernel command line: splitting it like the kernel does and reading
//! banger's keys ([`banger_protocol::agent::cmdline`]) into a
//! [`BootConfig`]. Init mode applies all of it; under systemd the network
//! and the running hostname come from `ip=`/`nameserver=`/`systemd.hostname=`
//! and the agent only writes the name and resolvers into `/etc`
//! ([`crate::identity`]).

use banger_protocol::agent::cmdline as keys;
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// What banger asked of this boot. Every field is optional: a missing or
/// malformed value is reported in `problems` and the rest still applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootConfig {
    pub hostname: Option<String>,
    /// Address and prefix length.
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    /// One line per value that could not be used.
    pub problems: Vec<String>,
}

/// Splits a command line into `key → value` (a bare word maps to `""`).
/// Double quotes group spaces, as the kernel's `next_arg` allows
/// (`key="a b"`); the last occurrence of a key wins.
pub fn parse(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for word in split_words(text) {
        match word.split_once('=') {
            Some((k, v)) => out.insert(k.to_string(), v.to_string()),
            None => out.insert(word, String::new()),
        };
    }
    out
}

fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(cur);
    }
    words
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case, `-` also accepted).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((addr.parse().ok()?, len))
}

/// Formats a MAC address the way `ip link` does.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl BootConfig {
    /// Reads banger's keys from a command line.
    pub fn from_cmdline(text: &str) -> Self {
        let map = parse(text);
        let mut cfg = BootConfig::default();
        let bad = |key: &str, value: &str| format!("ignoring {key}={value:?}: not a valid value");
        let mut problems = Vec::new();
        if let Some(h) = map.get(keys::HOSTNAME) {
            if valid_hostname(h) {
                cfg.hostname = Some(h.clone());
            } else {
                problems.push(bad(keys::HOSTNAME, h));
            }
        }
        if let Some(v) = map.get(keys::IP) {
            match parse_cidr(v) {
                Some(ip) => cfg.ip = Some(ip),
                None => problems.push(bad(keys::IP, v)),
            }
        }
        if let Some(v) = map.get(keys::GATEWAY) {
            match v.parse() {
                Ok(gw) => cfg.gateway = Some(gw),
                Err(_) => problems.push(bad(keys::GATEWAY, v)),
            }
        }
        if let Some(v) = map.get(keys::DNS) {
            for part in v.split(',').filter(|p| !p.is_empty()) {
                match part.parse() {
                    Ok(a) => cfg.dns.push(a),
                    Err(_) => problems.push(bad(keys::DNS, part)),
                }
            }
        }
        if let Some(v) = map.get(keys::MAC) {
            match parse_mac(v) {
                Some(m) => cfg.mac = Some(m),
                None => problems.push(bad(keys::MAC, v)),
            }
        }
        cfg.problems = problems;
        cfg
    }
}

/// A hostname the kernel accepts and that is sane: 1-64 bytes of letters,
/// digits, `-` and `.`.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "BOOT_IMAGE=/vmlinuz console=ttyS0 root=/dev/vda rw \
        init=/usr/local/bin/banger-agent banger.ip=172.30.0.5/24 banger.gw=172.30.0.1 \
        banger.dns=172.30.0.1,9.9.9.9 banger.mac=52:54:00:AB:cd:01 banger.hostname=web-1 quiet";

    #[test]
    fn reads_all_banger_keys() {
        let cfg = BootConfig::from_cmdline(LINE);
        assert_eq!(cfg.hostname.as_deref(), Some("web-1"));
        assert_eq!(cfg.ip, Some((Ipv4Addr::new(172, 30, 0, 5), 24)));
        assert_eq!(cfg.gateway, Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(
            cfg.dns,
            vec![Ipv4Addr::new(172, 30, 0, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        assert_eq!(cfg.mac, Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]));
        assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
    }

    #[test]
    fn bad_values_are_reported_and_the_rest_applies() {
        let cfg = BootConfig::from_cmdline(
            "banger.ip=172.30.0.5 banger.mac=52:54:00 banger.gw=172.30.0.1 banger.hostname=a_b",
        );
        assert_eq!(cfg.ip, None);
        assert_eq!(cfg.mac, None);
        assert_eq!(cfg.hostname, None);
        assert_eq!(cfg.gateway, Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(cfg.problems.len(), 3, "{:?}", cfg.problems);
        assert!(cfg.problems[0].contains("banger.hostname"));
    }

    #[test]
    fn quotes_and_bare_words() {
        let map = parse("a=1 b=\"x y\"  flag  a=2\n");
        assert_eq!(map.get("a").map(String::as_str), Some("2"));
        assert_eq!(map.get("b").map(String::as_str), Some("x y"));
        assert_eq!(map.get("flag").map(String::as_str), Some(""));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn mac_and_cidr_edges() {
        assert_eq!(
            parse_mac("52-54-00-00-00-0A"),
            Some([0x52, 0x54, 0, 0, 0, 10])
        );
        assert_eq!(parse_mac("52:54:00:00:00:0a:ff"), None);
        assert_eq!(parse_mac("5:54:00:00:00:0a"), None);
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
        assert_eq!(
            parse_cidr("10.0.0.1/32"),
            Some((Ipv4Addr::new(10, 0, 0, 1), 32))
        );
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0, 1]),
            "52:54:00:ab:00:01"
        );
    }

    #[test]
    fn real_proc_cmdline_parses() {
        let text = std::fs::read_to_string("/proc/cmdline").expect("read /proc/cmdline");
        let map = parse(&text);
        // Every real command line has at least one word.
        assert!(!map.is_empty() || text.trim().is_empty());
    }
}
