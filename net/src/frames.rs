//! Raw Ethernet/ARP/IPv4/ICMP frames, for exchanging real packets with a
//! TAP the way a guest's NIC would (tests of banger's own network code
//! and of the daemon's TAP pool use them).

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Instant;

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo message (type `kind`: 8 request, 0 reply), header and payload.
pub fn icmp_echo(kind: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut pkt = vec![kind, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(payload);
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    pkt
}

pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV4: u16 = 0x0800;

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP packet (Ethernet/IPv4): op 1 request, 2 reply.
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0x00, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    p
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// Reads one frame, waiting until `deadline`.
pub fn read_frame(tap: &mut File, deadline: Instant) -> Option<Vec<u8>> {
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
        if n <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 2048];
        match tap.read(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Some(buf);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => panic!("read TAP: {e}"),
        }
    }
}

pub fn ethertype(frame: &[u8]) -> Option<u16> {
    (frame.len() >= 14).then(|| u16::from_be_bytes([frame[12], frame[13]]))
}

/// If `frame` is an ARP request for `ip`, the reply claiming `ip` for `mac`.
pub fn answer_arp(frame: &[u8], mac: [u8; 6], ip: Ipv4Addr) -> Option<Vec<u8>> {
    if ethertype(frame) != Some(ETH_ARP) || frame.len() < 42 {
        return None;
    }
    let a = &frame[14..];
    let op = u16::from_be_bytes([a[6], a[7]]);
    let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
    if op != 1 || tpa != ip {
        return None;
    }
    let sha: [u8; 6] = a[8..14].try_into().ok()?;
    let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    Some(ethernet(sha, mac, ETH_ARP, &arp(2, mac, ip, sha, spa)))
}
