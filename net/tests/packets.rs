//! Real packets through what the library builds, inside throw-away network
//! namespaces (see `common`). Needs root and `nft`.
//!
//! - A veth pair stands in for a guest NIC: one end on the bridge, the other
//!   in a second namespace. The "guest" pings the bridge address; then,
//!   through a third namespace standing in for the outside world (which has
//!   no route back to the guest subnet), it reaches the outside only once
//!   forwarding and banger's NAT table are in place.
//! - A TAP made by `create_tap` is opened the way a VMM opens it, and raw
//!   Ethernet frames (ARP, then ICMP echo) written into it are answered by the
//!   host through the bridge.

mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use banger_net::frames::{
    answer_arp, arp, checksum, ethernet, ethertype, icmp_echo, ipv4, read_frame, ETH_ARP, ETH_IPV4,
};
use banger_net::{enable_ip_forward, open_tap, Host, MacAddr, NatRules, NetConfig};
use common::{in_netns, in_netns_sync, ping, require_root, NetNs};
use serde_json::Value;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

#[test]
fn a_guest_on_the_bridge_reaches_the_host_and_through_nat_the_outside() {
    if !require_root() {
        return;
    }
    let host = NetNs::new("host");
    let guest = NetNs::new("guest");
    let outside = NetNs::new("out");

    in_netns(&host, || async {
        let h = Host::connect().await.expect("connect");
        h.ensure_bridge(&NetConfig::default())
            .await
            .expect("bridge");
    });
    host.ip(&[
        "link",
        "add",
        "vhost",
        "type",
        "veth",
        "peer",
        "name",
        "vguest",
        "netns",
        &guest.name,
    ]);
    host.ip(&["link", "set", "vhost", "master", "banger0", "up"]);
    guest.ip(&["addr", "add", "172.30.0.2/24", "dev", "vguest"]);
    guest.ip(&["link", "set", "vguest", "up"]);
    guest.ip(&["route", "add", "default", "via", "172.30.0.1"]);

    assert!(
        in_netns_sync(&guest, || ping(GATEWAY, Duration::from_secs(5))),
        "guest must reach the bridge address"
    );
    assert!(
        in_netns_sync(&host, || ping(
            Ipv4Addr::new(172, 30, 0, 2),
            Duration::from_secs(5)
        )),
        "host must reach the guest"
    );

    // The outside world: reachable from the host, with no route back to
    // 172.30.0.0/24, so only masqueraded guest traffic gets answers.
    host.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "out0",
        "netns",
        &outside.name,
    ]);
    host.ip(&["addr", "add", "10.99.0.1/24", "dev", "up0"]);
    host.ip(&["link", "set", "up0", "up"]);
    outside.ip(&["addr", "add", "10.99.0.2/24", "dev", "out0"]);
    outside.ip(&["link", "set", "out0", "up"]);
    host.ip(&["route", "add", "default", "via", "10.99.0.2", "dev", "up0"]);
    assert!(in_netns_sync(&host, || ping(
        OUTSIDE,
        Duration::from_secs(5)
    )));

    let uplink = in_netns(&host, || async {
        let h = Host::connect().await.expect("connect");
        h.default_uplink().await.expect("route lookup")
    });
    assert_eq!(uplink.as_deref(), Some("up0"));

    let short = Duration::from_millis(1500);
    assert!(
        !in_netns_sync(&guest, move || ping(OUTSIDE, short)),
        "without forwarding the guest must not get out"
    );
    let changed = in_netns_sync(&host, || enable_ip_forward().expect("ip_forward"));
    assert!(changed);
    assert!(
        !in_netns_sync(&guest, move || ping(OUTSIDE, short)),
        "forwarding without NAT: the outside has no route back"
    );

    let rules = NatRules::new(&NetConfig::default(), uplink);
    let host_inode = host.inode();
    in_netns_sync(&host, move || {
        assert_eq!(
            common::child_netns_inode(),
            host_inode,
            "nft must run in the test netns"
        );
        rules.apply().expect("apply NAT");
    });
    assert!(
        in_netns_sync(&guest, || ping(OUTSIDE, Duration::from_secs(5))),
        "with banger's NAT table the guest must reach the outside"
    );

    // The masquerade rule counted the packets.
    let listing = in_netns_sync(&host, || {
        NatRules::current("banger")
            .expect("current")
            .expect("table exists")
    });
    let packets = listing["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["chain"] == "postrouting")
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .find_map(|e| {
            e.get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(Value::as_u64)
        })
        .expect("masquerade counter");
    assert!(packets >= 1, "{listing}");
}

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xbe, 0xef, 0x01];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 50);
#[test]
fn frames_written_into_a_tap_are_answered_through_the_bridge() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("tapio");
    let (tap_mac, bridge_mac, echo_ok) = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        let bridge = host
            .ensure_bridge(&NetConfig::default())
            .await
            .expect("bridge");
        let tap = host
            .create_tap("bgtap0", "banger0")
            .await
            .expect("create TAP");

        // Attach like a VMM (without the virtio-net header, so frames are
        // plain Ethernet), non-blocking.
        let mut fd = open_tap("bgtap0", false).expect("open TAP");
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }

        // 1. ARP: who has 172.30.0.1? Repeated until the port forwards
        //    (carrier comes up when the fd attaches; linkwatch may lag).
        let request = ethernet(
            [0xff; 6],
            GUEST_MAC,
            ETH_ARP,
            &arp(1, GUEST_MAC, GUEST_IP, [0; 6], GATEWAY),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut bridge_mac = None;
        'arp: while Instant::now() < deadline {
            fd.write_all(&request).expect("write ARP request");
            let round = Instant::now() + Duration::from_millis(300);
            while let Some(frame) = read_frame(&mut fd, round) {
                if ethertype(&frame) == Some(ETH_ARP) && frame.len() >= 42 {
                    let a = &frame[14..];
                    let op = u16::from_be_bytes([a[6], a[7]]);
                    let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
                    if op == 2 && spa == GATEWAY && frame[..6] == GUEST_MAC {
                        bridge_mac = Some(MacAddr(a[8..14].try_into().expect("6 bytes")));
                        break 'arp;
                    }
                }
            }
        }
        let bridge_mac = bridge_mac.expect("ARP reply from the bridge address");

        // 2. ICMP echo to 172.30.0.1, answering the host's ARP for us if it
        //    asks.
        let id = 0xbeef;
        let echo = ipv4(
            GUEST_IP,
            GATEWAY,
            1,
            &icmp_echo(8, id, 1, b"through the TAP"),
        );
        fd.write_all(&ethernet(bridge_mac.0, GUEST_MAC, ETH_IPV4, &echo))
            .expect("write echo request");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut echo_ok = false;
        while let Some(frame) = read_frame(&mut fd, deadline) {
            if let Some(reply) = answer_arp(&frame, GUEST_MAC, GUEST_IP) {
                fd.write_all(&reply).expect("write ARP reply");
                continue;
            }
            if ethertype(&frame) != Some(ETH_IPV4) || frame.len() < 14 + 20 + 8 {
                continue;
            }
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let icmp = &ip[ihl..total];
            if ip[9] == 1 && src == GATEWAY && dst == GUEST_IP && icmp[0] == 0 {
                assert_eq!(u16::from_be_bytes([icmp[4], icmp[5]]), id);
                assert_eq!(&icmp[8..], b"through the TAP");
                assert_eq!(checksum(icmp), 0, "reply ICMP checksum");
                assert_eq!(frame[..6], GUEST_MAC, "reply addressed to the guest MAC");
                echo_ok = true;
                break;
            }
        }
        assert_eq!(
            Some(bridge_mac),
            bridge.mac,
            "the bridge answered with its own MAC"
        );
        (tap.mac, bridge_mac, echo_ok)
    });
    assert!(echo_ok, "no ICMP echo reply came back through the TAP");
    assert_ne!(tap_mac, bridge_mac);
}
