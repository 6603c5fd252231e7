//! Host networking through a real daemon, each test in a network namespace
//! of its own (`TestDaemon::builder().netns()`): the bridge, the warm TAP
//! pool, NAT and forwarding are made inside it, real Ethernet frames go
//! through a pool TAP, leases are handed out concurrently and survive
//! restarts, and a daemon killed with SIGKILL finds and repairs what changed
//! behind its back. Needs root, `ip` and `nft`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Output;
use std::time::{Duration, Instant};

use banger_net::frames::{
    answer_arp, arp, checksum, ethernet, ethertype, icmp_echo, ipv4, read_frame, ETH_ARP, ETH_IPV4,
};
use banger_protocol::client::{Client, ClientError};
use banger_protocol::{
    ActorStatus, ErrorData, ErrorKind, Lease, NetworkStatus, Request, Response, TapLease,
};
use banger_tests::{actors, error_chain, find_actor, wait, TestDaemon};
use serde_json::Value;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const POOL_TIMEOUT: Duration = Duration::from_secs(15);
const POOL_SIZE: usize = 4;
const BRIDGE: &str = "banger0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);

// ---- requests ----

async fn request(client: &mut Client, req: Request) -> Result<Response, ClientError> {
    let what = req.name();
    tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{what} got no reply within {REQUEST_TIMEOUT:?}"))
}

async fn ok(client: &mut Client, req: Request) -> Response {
    let what = req.name();
    request(client, req)
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {}", error_chain(&e)))
}

/// The daemon's error for `req`, which must be of `kind`.
async fn refused(client: &mut Client, req: Request, kind: ErrorKind) -> ErrorData {
    let what = format!("{req:?}");
    match request(client, req).await {
        Err(ClientError::Daemon(e)) if e.kind == kind => e,
        other => panic!("{what}: expected a {kind:?} error, got {other:?}"),
    }
}

async fn status(client: &mut Client) -> NetworkStatus {
    match ok(client, Request::NetworkStatus).await {
        Response::Network(s) => s,
        other => panic!("NetworkStatus answered {other:?}"),
    }
}

/// Polls until the warm pool holds `n` TAPs; returns that status.
async fn wait_warm(client: &mut Client, n: usize) -> NetworkStatus {
    let deadline = Instant::now() + POOL_TIMEOUT;
    loop {
        let s = status(client).await;
        if s.pool.warm.len() == n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the warm pool did not reach {n} within {POOL_TIMEOUT:?}: {s:#?}"
        );
        tokio::time::sleep(wait::POLL_INTERVAL).await;
    }
}

async fn acquire(client: &mut Client, owner: &str) -> (String, bool) {
    match ok(
        client,
        Request::TapAcquire {
            owner: owner.into(),
        },
    )
    .await
    {
        Response::Tap { tap, from_pool } => (tap, from_pool),
        other => panic!("TapAcquire answered {other:?}"),
    }
}

async fn release(client: &mut Client, tap: &str) {
    match ok(client, Request::TapRelease { tap: tap.into() }).await {
        Response::Done => {}
        other => panic!("TapRelease answered {other:?}"),
    }
}

async fn reserve(client: &mut Client, owner: &str, ip: Option<Ipv4Addr>) -> Lease {
    match ok(
        client,
        Request::LeaseReserve {
            owner: owner.into(),
            ip,
        },
    )
    .await
    {
        Response::Lease(l) => l,
        other => panic!("LeaseReserve answered {other:?}"),
    }
}

/// A daemon in its own namespace, its network up with a full warm pool.
async fn network_daemon() -> (TestDaemon, Client, NetworkStatus) {
    let d = TestDaemon::builder().netns().start();
    let mut client = d.client().await;
    let s = wait_warm(&mut client, POOL_SIZE).await;
    (d, client, s)
}

// ---- what is inside the namespace ----

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `bgtap*` links in the daemon's namespace: name → master.
fn taps_in_ns(d: &TestDaemon) -> BTreeMap<String, Option<String>> {
    let links: Vec<Value> =
        serde_json::from_str(&d.ip(["-d", "-j", "link", "show"])).expect("ip -j link prints JSON");
    links
        .iter()
        .filter_map(|l| {
            let name = l["ifname"].as_str()?;
            name.starts_with("bgtap").then(|| {
                assert_eq!(
                    l["linkinfo"]["info_kind"], "tun",
                    "{name} is a TAP (tun kind): {l}"
                );
                (name.to_string(), l["master"].as_str().map(String::from))
            })
        })
        .collect()
}

/// Every link name in the daemon's namespace.
fn links_in_ns(d: &TestDaemon) -> BTreeSet<String> {
    d.netns()
        .expect("netns")
        .links()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect()
}

fn link_json(d: &TestDaemon, name: &str) -> Value {
    let out: Vec<Value> = serde_json::from_str(&d.ip(["-j", "link", "show", "dev", name]))
        .expect("ip -j link prints JSON");
    out.into_iter().next().expect("one link")
}

/// `nft -j list table ip banger` inside the namespace: the rules as
/// (chain, expression JSON), or `None` when the table does not exist.
fn nft_rules(d: &TestDaemon) -> Option<Vec<(String, String)>> {
    let out = d.exec_in_ns(["nft", "-j", "list", "table", "ip", "banger"]);
    if !out.status.success() {
        return None;
    }
    let json: Value = serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
    Some(
        json["nftables"]
            .as_array()
            .expect("nftables array")
            .iter()
            .filter_map(|o| o.get("rule"))
            .map(|r| {
                (
                    r["chain"].as_str().unwrap_or("?").to_string(),
                    r["expr"].to_string(),
                )
            })
            .collect(),
    )
}

fn ip_forward_in_ns(d: &TestDaemon) -> String {
    let out = d.exec_in_ns(["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("read the host's ip_forward")
        .trim()
        .to_string()
}

/// The expected content of banger's table: one masquerade rule in
/// `postrouting`, two accepts in `forward` (out of the bridge; replies back
/// into it), nothing else.
fn assert_expected_rules(rules: &[(String, String)]) {
    assert_eq!(rules.len(), 3, "exactly three rules: {rules:#?}");
    let chain = |c: &str| -> Vec<&String> {
        rules
            .iter()
            .filter(|(ch, _)| ch == c)
            .map(|(_, e)| e)
            .collect()
    };
    let nat = chain("postrouting");
    assert_eq!(nat.len(), 1, "{rules:#?}");
    assert!(
        nat[0].contains("masquerade") && nat[0].contains("172.30.0.0"),
        "{rules:#?}"
    );
    let forward = chain("forward");
    assert_eq!(forward.len(), 2, "{rules:#?}");
    assert!(
        forward
            .iter()
            .any(|e| e.contains("iifname") && e.contains(BRIDGE) && e.contains("accept")),
        "{rules:#?}"
    );
    assert!(
        forward
            .iter()
            .any(|e| e.contains("oifname") && e.contains("established") && e.contains("accept")),
        "{rules:#?}"
    );
}

// ---- tests ----

#[tokio::test]
async fn status_shows_bridge_pool_nat_and_forwarding_inside_the_namespace() {
    let host_forward = host_ip_forward();
    let mut d = TestDaemon::builder().netns().prepare();
    // Forwarding off in the fresh namespace, so turning it on is observable.
    let out = d.exec_in_ns(["sysctl", "-w", "net.ipv4.ip_forward=0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ip_forward_in_ns(&d), "0");
    assert_eq!(links_in_ns(&d), BTreeSet::from(["lo".to_string()]));
    d.restart();
    let mut client = d.client().await;

    let s = wait_warm(&mut client, POOL_SIZE).await;
    assert_eq!(s.bridge.name, BRIDGE);
    assert!(s.bridge.exists && s.bridge.up, "{:#?}", s.bridge);
    assert_eq!(s.bridge.address.as_deref(), Some("172.30.0.1/24"));
    assert_eq!(s.bridge.subnet, "172.30.0.0/24");
    assert_eq!(s.pool.target, POOL_SIZE as u32);
    assert!(s.pool.in_use.is_empty(), "{:#?}", s.pool);
    assert!(s.nat.present, "{:#?}", s.nat);
    assert_eq!(s.nat.table, "banger");
    assert_eq!(s.nat.rules.len(), 3, "{:#?}", s.nat.rules);
    assert!(
        s.nat
            .rules
            .iter()
            .any(|r| r.starts_with("postrouting:") && r.contains("masquerade")),
        "{:#?}",
        s.nat.rules
    );
    assert_eq!(
        s.nat
            .rules
            .iter()
            .filter(|r| r.starts_with("forward:") && r.contains("accept"))
            .count(),
        2,
        "{:#?}",
        s.nat.rules
    );
    assert!(s.ip_forward, "NetworkStatus.ip_forward");
    assert!(s.leases.is_empty());

    // What the namespace really holds.
    assert_eq!(ip_forward_in_ns(&d), "1", "the daemon enabled forwarding");
    assert_eq!(
        host_ip_forward(),
        host_forward,
        "the host's ip_forward must not change"
    );
    let bridge = link_json(&d, BRIDGE);
    assert!(
        bridge["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        "{bridge}"
    );
    let addrs = d.ip(["-4", "-o", "addr", "show", "dev", BRIDGE]);
    assert_eq!(
        addrs.matches("inet 172.30.0.1/24").count(),
        1,
        "exactly one gateway address: {addrs}"
    );
    let taps = taps_in_ns(&d);
    let warm: BTreeSet<String> = s.pool.warm.iter().cloned().collect();
    assert_eq!(warm.len(), POOL_SIZE, "warm TAPs are distinct: {warm:?}");
    assert_eq!(
        taps.keys().cloned().collect::<BTreeSet<_>>(),
        warm,
        "the namespace holds exactly the warm TAPs"
    );
    for (tap, master) in &taps {
        assert_eq!(master.as_deref(), Some(BRIDGE), "{tap} is on the bridge");
    }
    assert_expected_rules(&nft_rules(&d).expect("the banger table exists in the namespace"));
}

// Ethernet, ARP, IPv4 and ICMP by hand, as a guest would send them.

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xbe, 0xef, 0x01];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 50);
fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte"))
        .collect();
    bytes.try_into().expect("6-byte MAC")
}

/// ARP for the gateway through `tap` (repeated while the port comes up);
/// returns the MAC that answered.
fn arp_gateway(tap: &mut File) -> [u8; 6] {
    let request = ethernet(
        [0xff; 6],
        GUEST_MAC,
        ETH_ARP,
        &arp(1, GUEST_MAC, GUEST_IP, [0; 6], GATEWAY),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        tap.write_all(&request).expect("write ARP request");
        let round = Instant::now() + Duration::from_millis(300);
        while let Some(frame) = read_frame(tap, round) {
            if ethertype(&frame) == Some(ETH_ARP) && frame.len() >= 42 {
                let a = &frame[14..];
                let op = u16::from_be_bytes([a[6], a[7]]);
                let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
                if op == 2 && spa == GATEWAY && frame[..6] == GUEST_MAC {
                    return a[8..14].try_into().expect("6 bytes");
                }
            }
        }
    }
    panic!("no ARP reply for {GATEWAY} came back through the TAP");
}

/// One ICMP echo to the gateway through `tap`; whether the reply came back.
fn ping_gateway(tap: &mut File, gateway_mac: [u8; 6]) -> bool {
    let id = 0xb4e7;
    let payload = b"through a pool TAP";
    let echo = ipv4(GUEST_IP, GATEWAY, 1, &icmp_echo(8, id, 1, payload));
    tap.write_all(&ethernet(gateway_mac, GUEST_MAC, ETH_IPV4, &echo))
        .expect("write echo request");
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(frame) = read_frame(tap, deadline) {
        if let Some(reply) = answer_arp(&frame, GUEST_MAC, GUEST_IP) {
            tap.write_all(&reply).expect("write ARP reply");
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
            assert_eq!(&icmp[8..], payload);
            assert_eq!(checksum(icmp), 0, "reply ICMP checksum");
            assert_eq!(frame[..6], GUEST_MAC, "reply addressed to the guest MAC");
            return true;
        }
    }
    false
}

#[tokio::test]
async fn frames_through_a_pool_tap_are_answered_by_the_bridge() {
    let (d, mut client, before) = network_daemon().await;
    let (tap, from_pool) = acquire(&mut client, "vm-frames").await;
    assert!(from_pool, "a full pool hands out a warm TAP");
    assert!(
        before.pool.warm.contains(&tap),
        "{tap} was warm: {before:#?}"
    );
    let s = status(&mut client).await;
    assert!(
        s.pool.in_use.contains(&TapLease {
            tap: tap.clone(),
            owner: "vm-frames".into()
        }),
        "{:#?}",
        s.pool
    );
    assert!(!s.pool.warm.contains(&tap), "{:#?}", s.pool);

    let mut fd = d
        .netns()
        .expect("netns")
        .open_tap(&tap)
        .unwrap_or_else(|e| panic!("attach to {tap} as a VMM: {e}"));
    let bridge_mac = parse_mac(
        link_json(&d, BRIDGE)["address"]
            .as_str()
            .expect("bridge MAC"),
    );
    let answered_by = arp_gateway(&mut fd);
    assert_eq!(answered_by, bridge_mac, "the bridge answered ARP");
    assert!(
        ping_gateway(&mut fd, answered_by),
        "no ICMP echo reply came back through {tap}"
    );
    drop(fd);

    release(&mut client, &tap).await;
    let s = wait_warm(&mut client, POOL_SIZE).await;
    assert!(s.pool.in_use.is_empty(), "{:#?}", s.pool);
    let e = refused(
        &mut client,
        Request::TapRelease { tap: tap.clone() },
        ErrorKind::NotFound,
    )
    .await;
    assert!(e.message.contains(&tap), "{e:?}");
    assert_eq!(taps_in_ns(&d).len(), POOL_SIZE, "no TAP leaked");
}

#[tokio::test]
async fn more_acquires_than_warm_taps_get_distinct_taps_and_the_pool_refills() {
    let (d, _client, _) = network_daemon().await;
    // Five acquires at once on separate connections: the pool holds four.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(d.client().await);
    }
    let acquired: Vec<(String, bool)> = futures::future::join_all(
        clients
            .iter_mut()
            .enumerate()
            .map(|(i, c)| async move { acquire(c, &format!("vm-{i}")).await }),
    )
    .await;
    let names: BTreeSet<&String> = acquired.iter().map(|(t, _)| t).collect();
    assert_eq!(names.len(), 5, "five distinct TAPs: {acquired:?}");
    // The pool held four: at most one was made on demand, or none when
    // the background refill had already made a fifth by the time the last
    // request was taken (the requests leave together but are served one
    // after another; a busy machine spreads them). Every acquire on demand
    // is checked where there is no pool at all
    // (`without_a_pool_every_acquire_creates_a_tap_even_right_after_a_release`).
    let warm = acquired.iter().filter(|(_, from_pool)| *from_pool).count();
    assert!(
        warm >= 4,
        "with 4 warm TAPs, at most one of 5 acquires is created on demand: {acquired:?}"
    );

    let mut client = d.client().await;
    let s = wait_warm(&mut client, POOL_SIZE).await;
    let in_use: BTreeSet<&String> = s.pool.in_use.iter().map(|l| &l.tap).collect();
    assert_eq!(in_use, names, "{:#?}", s.pool);
    assert!(
        s.pool.warm.iter().all(|t| !names.contains(t)),
        "warm and in-use TAPs are disjoint: {:#?}",
        s.pool
    );
    let taps = taps_in_ns(&d);
    assert_eq!(taps.len(), 5 + POOL_SIZE, "{taps:?}");
    assert!(
        taps.values().all(|m| m.as_deref() == Some(BRIDGE)),
        "every TAP is on the bridge: {taps:?}"
    );

    for (tap, _) in &acquired {
        release(&mut client, tap).await;
    }
    let s = status(&mut client).await;
    assert!(s.pool.in_use.is_empty(), "{:#?}", s.pool);
    assert_eq!(s.pool.warm.len(), POOL_SIZE, "{:#?}", s.pool);
    // Released TAPs beyond the pool's target are deleted (in the background).
    wait::until(POOL_TIMEOUT, "surplus TAPs to be deleted", || async {
        (taps_in_ns(&d).len() == POOL_SIZE).then_some(())
    })
    .await;
}

/// Polls `NetworkStatus` until the pool has settled: the same warm and
/// in-use TAPs for 10 polls in a row (250 ms), and the namespace holds
/// exactly those TAPs (nothing being created or deleted).
async fn wait_settled(d: &TestDaemon, client: &mut Client) -> NetworkStatus {
    let deadline = Instant::now() + POOL_TIMEOUT;
    let mut last: Option<NetworkStatus> = None;
    let mut same = 0;
    loop {
        let s = status(client).await;
        let listed: BTreeSet<String> = s
            .pool
            .warm
            .iter()
            .cloned()
            .chain(s.pool.in_use.iter().map(|l| l.tap.clone()))
            .collect();
        let on_host: BTreeSet<String> = taps_in_ns(d).into_keys().collect();
        let stable = last.as_ref().is_some_and(|l| l.pool == s.pool) && listed == on_host;
        same = if stable { same + 1 } else { 0 };
        if same >= 10 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not settle within {POOL_TIMEOUT:?}: {s:#?}, TAPs in the namespace: {on_host:?}"
        );
        last = Some(s);
        tokio::time::sleep(wait::POLL_INTERVAL).await;
    }
}

#[tokio::test]
async fn quick_acquire_and_release_keep_the_pool_at_its_target() {
    let (d, mut client, _) = network_daemon().await;
    // Each release comes back while the refill started by its acquire is
    // still creating a TAP.
    for i in 0..3 {
        let (tap, from_pool) = acquire(&mut client, &format!("vm-{i}")).await;
        assert!(from_pool);
        release(&mut client, &tap).await;
    }
    let s = wait_settled(&d, &mut client).await;
    assert_eq!(
        s.pool.warm.len(),
        POOL_SIZE,
        "the warm pool holds its target, not more: {:#?}",
        s.pool
    );
    assert_eq!(taps_in_ns(&d).len(), POOL_SIZE, "{:#?}", s.pool);
}

#[tokio::test]
async fn without_a_pool_every_acquire_creates_a_tap_even_right_after_a_release() {
    let d = TestDaemon::builder()
        .netns()
        .config("[network]\npool_size = 0\n")
        .start();
    let mut client = d.client().await;
    let s = status(&mut client).await;
    assert_eq!(s.pool.target, 0);
    assert!(s.pool.warm.is_empty(), "{:#?}", s.pool);
    let (tap, from_pool) = acquire(&mut client, "vm-first").await;
    assert!(!from_pool, "no pool, so {tap} is created");
    assert_eq!(
        taps_in_ns(&d).get(&tap),
        Some(&Some(BRIDGE.to_string())),
        "{tap} exists on the bridge once handed out"
    );
    release(&mut client, &tap).await;
    // Each acquire is sent together with the release of the TAP before it
    // (on another connection), so its name may be free again while that
    // TAP's deletion still runs.
    let mut other = d.client().await;
    let (mut tap, _) = acquire(&mut client, "vm-0").await;
    for i in 1..=100 {
        let owner = format!("vm-{i}");
        let ((), (next, from_pool)) =
            tokio::join!(release(&mut client, &tap), acquire(&mut other, &owner));
        assert!(!from_pool, "acquire {i}: no pool, so {next} is created");
        std::mem::swap(&mut client, &mut other);
        tap = next;
    }
    release(&mut client, &tap).await;
    wait::until(POOL_TIMEOUT, "released TAPs to be deleted", || async {
        taps_in_ns(&d).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn sixty_four_concurrent_reservations_get_distinct_addresses() {
    let (d, _client, _) = network_daemon().await;
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(d.client().await);
    }
    let leases: Vec<Lease> = futures::future::join_all(
        clients
            .iter_mut()
            .enumerate()
            .map(|(i, c)| async move { reserve(c, &format!("vm-{i}"), None).await }),
    )
    .await;
    let ips: BTreeSet<Ipv4Addr> = leases.iter().map(|l| l.ip).collect();
    assert_eq!(ips.len(), 64, "64 distinct addresses: {leases:#?}");
    for l in &leases {
        let o = l.ip.octets();
        assert_eq!(&o[..3], &[172, 30, 0], "{l:?} is in the subnet");
        assert!(![0, 1, 255].contains(&o[3]), "{l:?}");
        assert!(!l.static_ip, "{l:?}");
    }
    let owners: BTreeSet<&String> = leases.iter().map(|l| &l.owner).collect();
    assert_eq!(owners.len(), 64);

    let mut client = d.client().await;
    let s = status(&mut client).await;
    let listed: BTreeSet<Ipv4Addr> = s.leases.iter().map(|l| l.ip).collect();
    assert_eq!(listed, ips, "NetworkStatus lists every lease");
}

#[tokio::test]
async fn static_addresses_are_checked_and_leases_survive_a_restart() {
    let (mut d, mut client, _) = network_daemon().await;
    let wanted = Ipv4Addr::new(172, 30, 0, 77);
    let lease = reserve(&mut client, "web", Some(wanted)).await;
    assert_eq!((lease.ip, lease.static_ip), (wanted, true), "{lease:?}");
    assert_eq!(lease.owner, "web");

    let e = refused(
        &mut client,
        Request::LeaseReserve {
            owner: "db".into(),
            ip: Some(wanted),
        },
        ErrorKind::AlreadyExists,
    )
    .await;
    assert!(e.message.contains("172.30.0.77"), "{e:?}");
    refused(
        &mut client,
        Request::LeaseReserve {
            owner: "web".into(),
            ip: None,
        },
        ErrorKind::AlreadyExists,
    )
    .await;
    for bad in [
        Ipv4Addr::new(10, 0, 0, 5),
        Ipv4Addr::new(172, 30, 1, 5),
        GATEWAY,
        Ipv4Addr::new(172, 30, 0, 0),
        Ipv4Addr::new(172, 30, 0, 255),
    ] {
        let e = refused(
            &mut client,
            Request::LeaseReserve {
                owner: "db".into(),
                ip: Some(bad),
            },
            ErrorKind::InvalidRequest,
        )
        .await;
        assert!(!e.message.is_empty(), "{bad}: {e:?}");
    }
    let auto = reserve(&mut client, "db", None).await;
    assert_ne!(auto.ip, wanted);
    let before = status(&mut client).await.leases;
    assert_eq!(before.len(), 2, "{before:#?}");

    d.sigterm();
    d.wait_exit(Duration::from_secs(20))
        .expect("the daemon exits on SIGTERM");
    d.restart();
    let mut client = d.client().await;
    let after = status(&mut client).await.leases;
    assert_eq!(after, before, "leases survive a restart");
    refused(
        &mut client,
        Request::LeaseReserve {
            owner: "other".into(),
            ip: Some(wanted),
        },
        ErrorKind::AlreadyExists,
    )
    .await;

    match ok(
        &mut client,
        Request::LeaseRelease {
            owner: "web".into(),
        },
    )
    .await
    {
        Response::Lease(l) => assert_eq!(l.ip, wanted),
        other => panic!("LeaseRelease answered {other:?}"),
    }
    refused(
        &mut client,
        Request::LeaseRelease {
            owner: "web".into(),
        },
        ErrorKind::NotFound,
    )
    .await;
    let again = reserve(&mut client, "other", Some(wanted)).await;
    assert_eq!(again.ip, wanted, "a released address can be taken again");
}

#[tokio::test]
async fn after_sigkill_a_restart_repairs_the_namespace() {
    let (mut d, mut client, _) = network_daemon().await;
    let (kept, _) = acquire(&mut client, "vm-keep").await;
    let before = wait_warm(&mut client, POOL_SIZE).await;
    let warm_before: BTreeSet<String> = before.pool.warm.iter().cloned().collect();
    let ifindex = |d: &TestDaemon, tap: &str| link_json(d, tap)["ifindex"].as_u64();
    let kept_ifindex = ifindex(&d, &kept);
    drop(client);

    d.sigkill().expect("the daemon dies on SIGKILL");
    // Behind the dead daemon's back: an orphan TAP off the bridge, and a
    // stray rule in banger's table.
    d.ip(["tuntap", "add", "bgtap7", "mode", "tap"]);
    assert!(taps_in_ns(&d).contains_key("bgtap7"));
    let out = d.exec_in_ns(["nft", "add", "rule", "ip", "banger", "forward", "accept"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        nft_rules(&d).expect("table").len(),
        4,
        "the stray rule is in"
    );

    d.restart();
    let mut client = d.client().await;
    let s = wait_warm(&mut client, POOL_SIZE).await;
    let taps = taps_in_ns(&d);
    assert!(
        !taps.contains_key("bgtap7"),
        "the orphan TAP is deleted: {taps:?}"
    );
    assert_expected_rules(&nft_rules(&d).expect("the banger table exists"));
    assert_eq!(s.nat.rules, before.nat.rules, "no stray rule is reported");
    assert!(
        s.pool.in_use.contains(&TapLease {
            tap: kept.clone(),
            owner: "vm-keep".into()
        }),
        "the TAP handed out before the kill is still in use: {:#?}",
        s.pool
    );
    assert_eq!(taps.get(&kept), Some(&Some(BRIDGE.to_string())), "{taps:?}");
    assert_eq!(
        ifindex(&d, &kept),
        kept_ifindex,
        "{kept} is the same device"
    );
    assert!(!s.pool.warm.contains(&kept), "{:#?}", s.pool);
    assert_eq!(
        s.pool.warm.iter().cloned().collect::<BTreeSet<_>>(),
        warm_before,
        "idle TAPs on the bridge are adopted, not recreated"
    );
    assert_eq!(taps.len(), POOL_SIZE + 1, "{taps:?}");
    assert!(s.bridge.exists && s.bridge.up, "{:#?}", s.bridge);
}

#[tokio::test]
async fn a_restart_puts_a_handed_out_tap_back_on_the_bridge() {
    let (mut d, mut client, _) = network_daemon().await;
    let (kept, _) = acquire(&mut client, "vm-keep").await;
    wait_warm(&mut client, POOL_SIZE).await;
    drop(client);
    d.sigkill().expect("the daemon dies on SIGKILL");
    // Behind the dead daemon's back, the VM's TAP leaves the bridge.
    d.ip(["link", "set", "dev", &kept, "nomaster"]);
    assert_eq!(taps_in_ns(&d).get(&kept), Some(&None));

    d.restart();
    let mut client = d.client().await;
    let s = wait_warm(&mut client, POOL_SIZE).await;
    assert!(
        s.pool.in_use.iter().any(|l| l.tap == kept),
        "{kept} is still handed out: {:#?}",
        s.pool
    );
    assert_eq!(
        taps_in_ns(&d).get(&kept),
        Some(&Some(BRIDGE.to_string())),
        "reconcile brings the handed-out {kept} back onto {BRIDGE}"
    );
}

#[tokio::test]
async fn a_killed_taps_actor_restarts_with_a_consistent_state() {
    let (d, mut client, _) = network_daemon().await;
    let (tap, _) = acquire(&mut client, "vm-a").await;
    reserve(&mut client, "vm-a", None).await;
    let before = wait_warm(&mut client, POOL_SIZE).await;
    let old = find_actor(&actors(&mut client).await, "taps")
        .expect("a taps actor")
        .clone();

    let out = d.banger(["debug", "kill-actor", "taps"]);
    assert!(out.status.success(), "{}", text(&out));

    let deadline = Instant::now() + POOL_TIMEOUT;
    loop {
        if let Ok(Response::Actors(list)) = request(&mut client, Request::DebugActors).await {
            if find_actor(&list, "taps").is_some_and(|a| {
                a.status == ActorStatus::Running && a.restart_count == 1 && a.id != old.id
            }) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "taps did not come back within {POOL_TIMEOUT:?}"
        );
        tokio::time::sleep(wait::POLL_INTERVAL).await;
    }
    let after = wait_warm(&mut client, POOL_SIZE).await;
    assert_eq!(
        after.pool.in_use, before.pool.in_use,
        "{tap} still handed out"
    );
    assert_eq!(after.leases, before.leases);
    assert_eq!(
        after.pool.warm.iter().collect::<BTreeSet<_>>(),
        before.pool.warm.iter().collect::<BTreeSet<_>>(),
        "the warm TAPs are adopted again"
    );
    assert_eq!(after.nat.rules, before.nat.rules);
    assert_eq!(after.bridge, before.bridge);
    assert_eq!(taps_in_ns(&d).len(), POOL_SIZE + 1, "no TAP leaked or lost");
    assert_expected_rules(&nft_rules(&d).expect("table"));
}

#[tokio::test]
async fn network_down_is_refused_while_a_tap_is_in_use_then_removes_everything_until_the_next_acquire(
) {
    let (d, mut client, _) = network_daemon().await;
    let (tap, _) = acquire(&mut client, "vm-busy").await;
    let e = refused(&mut client, Request::NetworkDown, ErrorKind::InvalidState).await;
    assert!(e.message.contains(&tap), "{e:?}");
    assert!(links_in_ns(&d).contains(BRIDGE), "nothing removed yet");
    assert!(nft_rules(&d).is_some());

    release(&mut client, &tap).await;
    match ok(&mut client, Request::NetworkDown).await {
        Response::Done => {}
        other => panic!("NetworkDown answered {other:?}"),
    }
    assert_eq!(
        links_in_ns(&d),
        BTreeSet::from(["lo".to_string()]),
        "bridge and TAPs are gone"
    );
    assert_eq!(nft_rules(&d), None, "the nft table is gone");
    let s = status(&mut client).await;
    assert!(!s.bridge.exists, "{:#?}", s.bridge);
    assert!(!s.nat.present, "{:#?}", s.nat);
    assert!(s.pool.warm.is_empty(), "{:#?}", s.pool);

    // The next acquire sets the network up again.
    let (late, _) = acquire(&mut client, "late").await;
    let s = wait_warm(&mut client, POOL_SIZE).await;
    assert!(s.bridge.exists && s.bridge.up, "{:#?}", s.bridge);
    assert_eq!(taps_in_ns(&d).get(&late), Some(&Some(BRIDGE.to_string())));
    assert_expected_rules(&nft_rules(&d).expect("the table is back"));
}

#[tokio::test]
async fn a_bad_bridge_name_stops_the_daemon_before_it_touches_the_network() {
    let d = TestDaemon::builder()
        .netns()
        .config("[network]\nbridge = \"bad/name\"\n")
        .prepare();
    let out = d.run_second_instance(Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr.contains("bridge") && stderr.contains("bad/name"),
        "the error names the setting and the value: {}",
        text(&out)
    );
    assert_eq!(
        links_in_ns(&d),
        BTreeSet::from(["lo".to_string()]),
        "nothing was created"
    );
    assert_eq!(nft_rules(&d), None);
    assert!(!d.socket().exists(), "no socket left behind");
}
