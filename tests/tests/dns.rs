//! The daemon's `vm.` DNS server, asked with Debian's `dig` and with raw
//! datagrams on loopback: records added and removed through the protocol,
//! what is answered how, records surviving an actor kill and a daemon
//! restart, invalid names, hostile packets, and `DnsSetup` on a host
//! without systemd-resolved. Each daemon's DNS listens on 127.0.0.1 on a
//! free port (the harness's default), read back from `NetworkStatus`.
//! Needs `dig` (`apt-get install -y bind9-dnsutils`).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::{ActorStatus, ErrorData, ErrorKind, Request, Response};
use banger_tests::{actors, error_chain, find_actor, wait, TestDaemon};
use rand::{Rng, SeedableRng};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(15);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);

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

async fn refused(client: &mut Client, req: Request, kind: ErrorKind) -> ErrorData {
    let what = format!("{req:?}");
    match request(client, req).await {
        Err(ClientError::Daemon(e)) if e.kind == kind => e,
        other => panic!("{what}: expected a {kind:?} error, got {other:?}"),
    }
}

async fn add(client: &mut Client, name: &str, ip: Ipv4Addr) {
    match ok(
        client,
        Request::DnsAdd {
            name: name.into(),
            ip,
        },
    )
    .await
    {
        Response::Done => {}
        other => panic!("DnsAdd answered {other:?}"),
    }
}

/// Where the daemon's DNS server listens now (it may move when the Dns
/// actor restarts on port 0).
async fn dns_addr(client: &mut Client) -> SocketAddr {
    match ok(client, Request::NetworkStatus).await {
        Response::Network(s) => {
            let addr = s.dns.listen.expect("DNS is enabled");
            assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST, "{addr}");
            assert_ne!(addr.port(), 0, "the real port is reported");
            assert_eq!(s.dns.zone.trim_end_matches('.'), "vm");
            addr
        }
        other => panic!("NetworkStatus answered {other:?}"),
    }
}

// ---- dig ----

/// What `dig` printed, parsed.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    /// Answer records: name, TTL, class, type, data.
    answers: Vec<(String, u32, String, String, String)>,
    output: String,
}

/// `dig @addr -p port <args> +tries=1 +time=2`, parsed. Panics if dig
/// gets no answer at all.
fn dig(addr: SocketAddr, args: &[&str]) -> Dig {
    try_dig(addr, args).unwrap_or_else(|out| panic!("dig {args:?} got no answer:\n{out}"))
}

fn try_dig(addr: SocketAddr, args: &[&str]) -> Result<Dig, String> {
    let out = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string()])
        .args(args)
        .args(["+tries=1", "+time=2"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run dig ({e}): apt-get install -y bind9-dnsutils"));
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(status) = output
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
    else {
        return Err(format!("{output}{}", String::from_utf8_lossy(&out.stderr)));
    };
    let flags = output
        .split(";; flags: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();
    let answers = output
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    assert_eq!(f.len(), 5, "answer line {l:?}");
                    (
                        f[0].to_string(),
                        f[1].parse().expect("TTL"),
                        f[2].to_string(),
                        f[3].to_string(),
                        f[4].to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Dig {
        status: status.to_string(),
        flags,
        answers,
        output,
    })
}

impl Dig {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn assert_a(&self, name: &str, ip: Ipv4Addr) {
        assert_eq!(self.status, "NOERROR", "{}", self.output);
        assert!(self.has_flag("aa"), "authoritative: {}", self.output);
        assert_eq!(
            self.answers,
            vec![(
                name.to_string(),
                5,
                "IN".to_string(),
                "A".to_string(),
                ip.to_string()
            )],
            "{}",
            self.output
        );
    }
}

/// Polls dig until `name` answers with `ip` (after a restart).
async fn wait_answers(addr: SocketAddr, name: &str, ip: Ipv4Addr) {
    let wanted = ip.to_string();
    wait::until(RECOVERY_TIMEOUT, &format!("{name} to resolve"), || {
        let found = try_dig(addr, &[name, "A"])
            .ok()
            .is_some_and(|d| d.answers.iter().any(|a| a.4 == wanted));
        async move { found.then_some(()) }
    })
    .await;
}

// ---- tests ----

#[tokio::test]
async fn added_records_are_served_authoritatively() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let addr = dns_addr(&mut client).await;
    add(&mut client, "web", WEB_IP).await;

    dig(addr, &["web.vm", "A"]).assert_a("web.vm.", WEB_IP);
    dig(addr, &["+tcp", "web.vm", "A"]).assert_a("web.vm.", WEB_IP);
    // Any case in, the same spelling back.
    dig(addr, &["WeB.vM", "A"]).assert_a("WeB.vM.", WEB_IP);

    let missing = dig(addr, &["nope.vm", "A"]);
    assert_eq!(missing.status, "NXDOMAIN", "{}", missing.output);
    assert!(missing.has_flag("aa"), "{}", missing.output);
    assert!(missing.answers.is_empty(), "{}", missing.output);

    let outside = dig(addr, &["example.com", "A"]);
    assert_eq!(outside.status, "REFUSED", "{}", outside.output);
    assert!(!outside.has_flag("aa"), "{}", outside.output);
    assert!(outside.answers.is_empty(), "{}", outside.output);

    // A record added later is served at once; replacing one changes it.
    add(&mut client, "db", Ipv4Addr::new(172, 30, 0, 11)).await;
    dig(addr, &["db.vm", "A"]).assert_a("db.vm.", Ipv4Addr::new(172, 30, 0, 11));
    add(&mut client, "db", Ipv4Addr::new(172, 30, 0, 12)).await;
    dig(addr, &["db.vm", "A"]).assert_a("db.vm.", Ipv4Addr::new(172, 30, 0, 12));

    match ok(&mut client, Request::DnsRemove { name: "web".into() }).await {
        Response::Deleted { name } => assert_eq!(name, "web"),
        other => panic!("DnsRemove answered {other:?}"),
    }
    let gone = dig(addr, &["web.vm", "A"]);
    assert_eq!(gone.status, "NXDOMAIN", "{}", gone.output);
    refused(
        &mut client,
        Request::DnsRemove { name: "web".into() },
        ErrorKind::NotFound,
    )
    .await;
    dig(addr, &["db.vm", "A"]).assert_a("db.vm.", Ipv4Addr::new(172, 30, 0, 12));
}

#[tokio::test]
async fn records_survive_a_dns_actor_kill_and_a_daemon_restart() {
    let mut d = TestDaemon::start();
    let mut client = d.client().await;
    add(&mut client, "web", WEB_IP).await;
    add(&mut client, "MiXeD", Ipv4Addr::new(172, 30, 0, 20)).await;
    let addr = dns_addr(&mut client).await;
    dig(addr, &["web.vm"]).assert_a("web.vm.", WEB_IP);
    let old = find_actor(&actors(&mut client).await, "dns")
        .expect("a dns actor")
        .clone();

    match ok(&mut client, Request::DebugKillActor { name: "dns".into() }).await {
        Response::ActorKilled { name, .. } => assert_eq!(name, "dns"),
        other => panic!("DebugKillActor answered {other:?}"),
    }
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        if let Ok(Response::Actors(list)) = request(&mut client, Request::DebugActors).await {
            if find_actor(&list, "dns").is_some_and(|a| {
                a.status == ActorStatus::Running && a.restart_count == 1 && a.id != old.id
            }) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "dns did not come back within {RECOVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(wait::POLL_INTERVAL).await;
    }
    let addr = dns_addr(&mut client).await;
    wait_answers(addr, "web.vm", WEB_IP).await;
    dig(addr, &["web.vm"]).assert_a("web.vm.", WEB_IP);
    dig(addr, &["mixed.vm"]).assert_a("mixed.vm.", Ipv4Addr::new(172, 30, 0, 20));

    drop(client);
    d.sigterm();
    d.wait_exit(Duration::from_secs(20))
        .expect("the daemon exits on SIGTERM");
    d.restart();
    let mut client = d.client().await;
    let addr = dns_addr(&mut client).await;
    dig(addr, &["web.vm"]).assert_a("web.vm.", WEB_IP);
    dig(addr, &["+tcp", "mixed.vm"]).assert_a("mixed.vm.", Ipv4Addr::new(172, 30, 0, 20));
    match ok(&mut client, Request::NetworkStatus).await {
        Response::Network(s) => {
            let mut names: Vec<&str> = s.dns.records.iter().map(|r| r.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["mixed", "web"], "{:#?}", s.dns.records);
            assert!(s.dns.records.iter().all(|r| r.source == "static"));
        }
        other => panic!("NetworkStatus answered {other:?}"),
    }
}

#[tokio::test]
async fn invalid_names_are_refused() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let long = "a".repeat(64);
    for bad in ["a.b", "-x", long.as_str(), "", "a_b", "a b", "web.vm", "ü"] {
        let e = refused(
            &mut client,
            Request::DnsAdd {
                name: bad.into(),
                ip: WEB_IP,
            },
            ErrorKind::InvalidRequest,
        )
        .await;
        assert!(!e.message.is_empty(), "{bad:?}: {e:?}");
    }
    // The longest label is fine.
    let longest = "b".repeat(63);
    add(&mut client, &longest, WEB_IP).await;
    let addr = dns_addr(&mut client).await;
    dig(addr, &[&format!("{longest}.vm")]).assert_a(&format!("{longest}.vm."), WEB_IP);
    match ok(&mut client, Request::NetworkStatus).await {
        Response::Network(s) => {
            assert_eq!(s.dns.records.len(), 1, "{:#?}", s.dns.records);
        }
        other => panic!("NetworkStatus answered {other:?}"),
    }
}

// ---- raw datagrams ----

/// A query for `name` (dotted, no trailing dot needed) type A, id `id`, RD set.
fn query(id: u16, labels: &[&[u8]]) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in labels {
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// Waits for one datagram on `sock` until `timeout`.
fn recv(sock: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// The response to `id` (skipping others), or `None` within `timeout`.
fn recv_id(sock: &UdpSocket, id: u16, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let r = recv(sock, left.max(Duration::from_millis(1)))?;
        if r.len() >= 12 && r[..2] == id.to_be_bytes() {
            return Some(r);
        }
    }
    None
}

fn rcode(response: &[u8]) -> u8 {
    response[3] & 0x0f
}

fn is_response(response: &[u8]) -> bool {
    response[2] & 0x80 != 0
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_serving_goes_on() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    add(&mut client, "web", WEB_IP).await;
    let addr = dns_addr(&mut client).await;
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(addr).expect("connect");
    let short = Duration::from_secs(2);

    // A well-formed query by hand is answered (so the checks below mean something).
    let good = query(0x1000, &[b"web", b"vm"]);
    sock.send(&good).expect("send");
    let r = recv_id(&sock, 0x1000, short).expect("an answer to a valid query");
    assert!(is_response(&r) && rcode(&r) == 0, "{r:?}");
    assert!(
        r.windows(4).any(|w| w == WEB_IP.octets()),
        "the address is in the answer: {r:?}"
    );

    // Every strict prefix: none shorter than a header, FORMERR otherwise.
    for len in 0..good.len() {
        let mut q = good[..len].to_vec();
        if len >= 2 {
            q[..2].copy_from_slice(&(0x2000 + len as u16).to_be_bytes());
        }
        sock.send(&q).expect("send prefix");
        if len >= 12 {
            let r = recv_id(&sock, 0x2000 + len as u16, short)
                .unwrap_or_else(|| panic!("no FORMERR for a {len}-byte prefix"));
            assert!(is_response(&r), "{len}: {r:?}");
            assert_eq!(rcode(&r), 1, "FORMERR for a {len}-byte prefix: {r:?}");
        }
    }
    // Prefixes under 12 bytes got no response: the next one is the valid query's.
    sock.send(&query(0x1001, &[b"web", b"vm"])).expect("send");
    let r = recv(&sock, short).expect("an answer");
    assert_eq!(
        r[..2],
        0x1001u16.to_be_bytes(),
        "nothing answered the short prefixes"
    );

    // A 64-byte label, and a name over 255 bytes.
    let long_label = vec![b'a'; 64];
    sock.send(&query(0x3001, &[&long_label, b"vm"]))
        .expect("send");
    let r = recv_id(&sock, 0x3001, short).expect("FORMERR for a 64-byte label");
    assert_eq!(rcode(&r), 1, "{r:?}");
    let label = vec![b'b'; 63];
    let labels: Vec<&[u8]> = vec![&label, &label, &label, &label, b"vm"];
    sock.send(&query(0x3002, &labels)).expect("send");
    let r = recv_id(&sock, 0x3002, short).expect("FORMERR for a name over 255 bytes");
    assert_eq!(rcode(&r), 1, "{r:?}");
    // Two questions.
    let mut two = query(0x3003, &[b"web", b"vm"]);
    two[5] = 2;
    two.extend_from_slice(&good[12..]);
    sock.send(&two).expect("send");
    let r = recv_id(&sock, 0x3003, short).expect("FORMERR for two questions");
    assert_eq!(rcode(&r), 1, "{r:?}");
    // A response (QR set) is never answered: the next answer is the valid query's.
    let mut reflected = query(0x3004, &[b"web", b"vm"]);
    reflected[2] |= 0x80;
    sock.send(&reflected).expect("send");
    sock.send(&query(0x3005, &[b"web", b"vm"])).expect("send");
    let r = recv(&sock, short).expect("an answer");
    assert_eq!(
        r[..2],
        0x3005u16.to_be_bytes(),
        "a datagram with QR set was answered"
    );
    // Oversized.
    sock.send(&vec![0u8; 8000]).expect("send");

    // Random garbage, seeded.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd45);
    for _ in 0..500 {
        let len = rng.gen_range(0..700);
        let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        sock.send(&junk).expect("send junk");
    }

    // Still serving, on a fresh socket and with dig.
    let fresh = UdpSocket::bind("127.0.0.1:0").expect("bind");
    fresh.connect(addr).expect("connect");
    fresh.send(&query(0x4000, &[b"web", b"vm"])).expect("send");
    let r = recv_id(&fresh, 0x4000, short).expect("still answering");
    assert_eq!(rcode(&r), 0);
    dig(addr, &["web.vm"]).assert_a("web.vm.", WEB_IP);
    dig(addr, &["+tcp", "web.vm"]).assert_a("web.vm.", WEB_IP);
    assert!(
        d.stderr_log().find("panicked").is_none(),
        "{}",
        d.stderr_log()
    );
}

#[tokio::test]
async fn dns_setup_without_systemd_resolved_says_what_to_configure() {
    assert!(
        !std::path::Path::new("/run/systemd/resolve").exists(),
        "this test expects a host without systemd-resolved (DnsSetup would \
         rewrite the host's resolver)"
    );
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let addr = dns_addr(&mut client).await;
    let report = match ok(&mut client, Request::DnsSetup).await {
        Response::DnsSetup(r) => r,
        other => panic!("DnsSetup answered {other:?}"),
    };
    assert!(!report.configured, "{report:#?}");
    let all = report.lines.join("\n");
    assert!(
        all.contains(&format!("server=/vm/{}#{}", addr.ip(), addr.port())),
        "a dnsmasq line for the listen address: {all}"
    );
    assert!(all.contains("dnsmasq"), "{all}");
    assert!(all.contains(&addr.to_string()), "{all}");
    assert!(
        !std::path::Path::new("/etc/systemd/resolved.conf.d/banger.conf").exists(),
        "nothing was written"
    );
}
