//! Listening sockets, for `Ports` and `Health`: parsed from
//! `/proc/net/{tcp,tcp6,udp,udp6}` (LISTEN for TCP, unconnected bound
//! sockets for UDP), with the owning process found by matching socket
//! inodes against the links in `/proc/<pid>/fd`.
//!
//! Addresses in those files are the kernel's `__be32` words printed as
//! native-endian hex, so each 32-bit group is turned back into bytes with
//! `to_ne_bytes`.

use banger_protocol::agent::ListeningPort;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// `TCP_LISTEN` in the `st` column.
const TCP_LISTEN: u8 = 0x0A;
/// `TCP_CLOSE`: how an unconnected (bound, "listening") UDP socket shows.
const UDP_UNCONNECTED: u8 = 0x07;

/// One line of a `/proc/net` socket table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEntry {
    pub local: IpAddr,
    pub port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub state: u8,
    pub inode: u64,
}

/// Parses the text of a `/proc/net/{tcp,udp}{,6}` file; the header and
/// malformed lines are skipped.
pub fn parse_table(text: &str) -> Vec<SocketEntry> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<SocketEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
    if fields.len() < 10 {
        return None;
    }
    let (local, port) = parse_endpoint(fields[1])?;
    let (remote, remote_port) = parse_endpoint(fields[2])?;
    let state = u8::from_str_radix(fields[3], 16).ok()?;
    let inode = fields[9].parse().ok()?;
    Some(SocketEntry {
        local,
        port,
        remote,
        remote_port,
        state,
        inode,
    })
}

fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => {
            let word = u32::from_str_radix(addr, 16).ok()?;
            IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The protocols, with the file each lives in.
pub const PROTOCOLS: [&str; 4] = ["tcp", "tcp6", "udp", "udp6"];

/// Whether `entry` of `proto` counts as listening.
pub fn is_listening(proto: &str, entry: &SocketEntry) -> bool {
    if proto.starts_with("tcp") {
        entry.state == TCP_LISTEN
    } else {
        entry.state == UDP_UNCONNECTED && entry.remote.is_unspecified() && entry.remote_port == 0
    }
}

/// Listening sockets of `proto` read from `proc_net` (`/proc/net`).
pub fn listening_in(proc_net: &Path, proto: &str) -> Vec<SocketEntry> {
    std::fs::read_to_string(proc_net.join(proto))
        .map(|t| parse_table(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|e| is_listening(proto, e))
        .collect()
}

/// Whether anything listens on TCP `port` (v4 or v6).
pub fn tcp_listening_on(port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|p| {
        listening_in(Path::new("/proc/net"), p)
            .iter()
            .any(|e| e.port == port)
    })
}

/// Every listening socket of this network namespace, with its owner.
pub fn listening_ports() -> Vec<ListeningPort> {
    let mut found = Vec::new();
    for proto in PROTOCOLS {
        for e in listening_in(Path::new("/proc/net"), proto) {
            found.push((proto, e));
        }
    }
    let inodes: HashSet<u64> = found
        .iter()
        .map(|(_, e)| e.inode)
        .filter(|i| *i != 0)
        .collect();
    let owners = socket_owners(Path::new("/proc"), &inodes);
    let mut ports: Vec<ListeningPort> = found
        .into_iter()
        .map(|(proto, e)| {
            let owner = owners.get(&e.inode);
            ListeningPort {
                proto: proto.to_string(),
                address: e.local.to_string(),
                port: e.port,
                pid: owner.map(|(pid, _)| *pid),
                process: owner.map(|(_, name)| name.clone()),
            }
        })
        .collect();
    ports.sort_by(|a, b| (a.port, &a.proto, &a.address).cmp(&(b.port, &b.proto, &b.address)));
    ports.dedup();
    ports
}

/// Maps socket inodes to (pid, command name) by scanning `/proc/*/fd`.
/// Processes that vanish or deny access are skipped; the lowest pid wins
/// when a socket is shared.
pub fn socket_owners(proc_dir: &Path, inodes: &HashSet<u64>) -> HashMap<u64, (u32, String)> {
    let mut owners = HashMap::new();
    if inodes.is_empty() {
        return owners;
    }
    let Ok(entries) = std::fs::read_dir(proc_dir) else {
        return owners;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let fd_dir = proc_dir.join(pid.to_string()).join("fd");
        let Ok(fds) = std::fs::read_dir(&fd_dir) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else {
                continue;
            };
            if inodes.contains(&inode) && !owners.contains_key(&inode) {
                let name = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("comm"))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_default();
                owners.insert(inode, (pid, name));
            }
        }
        if owners.len() == inodes.len() {
            break;
        }
    }
    owners
}

/// The inode of an fd link target `socket:[12345]`.
pub fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   2: 0500A8C0:0016 0100A8C0:D431 01 00000000:00000000 02:0000A1E3 00000000     0        0 7777 4 0000000000000000 20 4 29 10 -1
   3: garbage
";
    const TCP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4321 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4322 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 5555 2 0000000000000000 0
  101: 0F02000A:BEEF 08080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 5556 2 0000000000000000 0
";

    #[test]
    fn parses_tcp_v4() {
        let t = parse_table(TCP);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].local, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(t[0].port, 8080);
        assert_eq!(t[0].inode, 23456);
        assert!(is_listening("tcp", &t[0]));
        assert_eq!(t[1].local, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(t[1].port, 22);
        // An established connection is not a listener.
        assert_eq!(t[2].remote, IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(t[2].remote_port, 0xD431);
        assert!(!is_listening("tcp", &t[2]));
    }

    #[test]
    fn parses_tcp_v6() {
        let t = parse_table(TCP6);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].local, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(t[0].port, 22);
        assert_eq!(t[1].local, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(t[1].port, 631);
    }

    #[test]
    fn udp_counts_only_unconnected_sockets() {
        let t = parse_table(UDP);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].local, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)));
        assert!(is_listening("udp", &t[0]));
        assert!(!is_listening("udp", &t[1]));
    }

    #[test]
    fn socket_link_targets() {
        assert_eq!(socket_inode("socket:[98765]"), Some(98765));
        assert_eq!(socket_inode("pipe:[98765]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn finds_a_real_listener_and_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ports = listening_ports();
        let mine = ports
            .iter()
            .find(|p| p.port == port && p.proto == "tcp")
            .unwrap_or_else(|| panic!("port {port} not in {ports:?}"));
        assert_eq!(mine.address, "127.0.0.1");
        assert_eq!(mine.pid, Some(std::process::id()));
        assert!(mine.process.is_some());
    }
}
