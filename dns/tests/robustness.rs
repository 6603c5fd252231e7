//! Hostile and broken clients over raw sockets: after each, a normal query
//! from another socket must still be answered.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_dns::{ClientRate, DnsError, DnsServer, Limits};
use common::{
    assert_serving, bytes, config, query, start, tcp_ask, tcp_ask_on, udp_ask, udp_ask_from,
};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;

/// A query for `web.vm.` whose first name is replaced by `name_wire`.
fn raw_query(id: u16, name_wire: &[u8]) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend(name_wire);
    q.extend([0, 1, 0, 1]);
    q
}

fn assert_formerr(response: Option<Message>, id: u16, what: &str) {
    let response = response.unwrap_or_else(|| panic!("no response to {what}"));
    assert_eq!(response.metadata.id, id, "{what}");
    assert_eq!(
        response.metadata.response_code,
        ResponseCode::FormErr,
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mangled_packets() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    let mut rng = StdRng::seed_from_u64(0x0D15_EA5E);
    let valid = bytes(&query("web.vm.", RecordType::A));

    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for i in 0..6000 {
        let packet: Vec<u8> = if i % 2 == 0 {
            let len = rng.gen_range(0..=600);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            // A valid query with a few bytes flipped and maybe cut or padded.
            let mut p = valid.clone();
            for _ in 0..rng.gen_range(1..=4) {
                let at = rng.gen_range(0..p.len());
                p[at] = rng.gen();
            }
            match rng.gen_range(0..3) {
                0 => p.truncate(rng.gen_range(0..p.len())),
                1 => p.extend((0..rng.gen_range(0..64)).map(|_| rng.gen::<u8>())),
                _ => {}
            }
            p
        };
        let _ = socket.send_to(&packet, addr).await;
        if i % 500 == 0 {
            // Let the server keep up; this is about content, not volume.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let len = rng.gen_range(0..300);
        let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let _ = stream.write_all(&junk).await;
        drop(stream);
    }

    assert_serving(addr).await;
    let stats = server.stats();
    // Most of these do not decode: hickory-server answers those FORMERR
    // itself (see `truncated_queries`), before our handler and its counters.
    assert!(stats.requests > 0, "{stats:?}");
    assert_eq!(stats.panics, 0, "{stats:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_queries() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    let full = bytes(&query("web.vm.", RecordType::A));
    let id = u16::from_be_bytes([full[0], full[1]]);
    let local = Ipv4Addr::LOCALHOST.into();
    for len in 0..full.len() {
        if len < 12 {
            // No header, no response.
            let response =
                udp_ask_from(addr, local, &full[..len], 1, Duration::from_millis(100)).await;
            assert!(response.is_none(), "{len}: {response:?}");
        } else {
            let response = udp_ask_from(addr, local, &full[..len], 3, Duration::from_secs(1)).await;
            assert_formerr(response, id, &format!("{len}-byte prefix"));
        }
    }

    // Over TCP: the length says more than is sent, then the client leaves.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&(full.len() as u16).to_be_bytes())
        .await
        .expect("prefix");
    stream
        .write_all(&full[..full.len() / 2])
        .await
        .expect("half");
    drop(stream);
    // A complete but truncated message in a correct frame: FORMERR.
    assert_formerr(tcp_ask(addr, &full[..20]).await, id, "TCP 20-byte prefix");

    assert_serving(addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    let mut big = bytes(&query("web.vm.", RecordType::A));
    let id = u16::from_be_bytes([big[0], big[1]]);
    // The largest UDP payload IPv4 carries.
    big.resize(65_507, 0);
    assert_formerr(udp_ask(addr, &big).await, id, "65507-byte datagram");

    big.resize(65_535, 0);
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    assert_formerr(
        tcp_ask_on(&mut stream, &big).await,
        id,
        "65535-byte TCP message",
    );
    // And the server hangs up after the FORMERR.
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    assert_serving(addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_labels_and_names() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();

    let mut label64 = vec![64];
    label64.extend([b'a'; 64]);
    label64.extend(b"\x02vm\x00");
    let q = raw_query(0x4040, &label64);
    assert_formerr(udp_ask(addr, &q).await, 0x4040, "64-byte label over UDP");
    assert_formerr(tcp_ask(addr, &q).await, 0x4040, "64-byte label over TCP");

    let mut long_name = Vec::new();
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend([b'a'; 63]);
    }
    long_name.extend(b"\x02vm\x00");
    let q = raw_query(0x0100, &long_name);
    assert_formerr(udp_ask(addr, &q).await, 0x0100, "321-byte name");

    // A compression pointer pointing at itself.
    let q = raw_query(0x0101, &[0xC0, 12]);
    assert_formerr(udp_ask(addr, &q).await, 0x0101, "pointer loop");

    assert_serving(addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_length_prefix_then_close() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    for prefix in [&[0u8, 40][..], &[0u8][..], &[0xFF, 0xFF][..]] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(prefix).await.expect("prefix");
        stream.shutdown().await.expect("shutdown");
        let mut buf = [0u8; 16];
        let read = timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{prefix:?}: {read:?}");
    }
    assert_serving(addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_are_closed_and_capped() {
    let limits = Limits {
        tcp_idle_timeout: Duration::from_secs(1),
        max_tcp_connections_per_client: 2,
        ..Limits::default()
    };
    let (server, _records) = start(config(limits)).await;
    let addr = server.local_addr();

    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Over the per-client cap: closed at once.
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(server.stats().tcp_rejected >= 1);
    // UDP does not care.
    assert!(udp_ask(addr, &bytes(&query("web.vm.", RecordType::A)))
        .await
        .is_some());

    // The idle ones are closed by the server after the timeout…
    for mut stream in idle {
        let read = timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    // …which frees their slots. (The server notices the close a moment
    // after the client does, so allow a retry.)
    let request = bytes(&query("web.vm.", RecordType::A));
    let mut answered = None;
    for _ in 0..50 {
        answered = tcp_ask(addr, &request).await;
        if answered.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered.is_some(), "slots were not freed");
    assert_serving(addr).await;
    server.shutdown().await;
}

/// One client sends as fast as it can from 127.0.0.2 while another asks
/// from 127.0.0.1; the second must keep getting answers.
async fn flood(limits: Limits) -> DnsServer {
    const FLOOD: usize = 20_000;
    let (server, _records) = start(config(limits)).await;
    let addr = server.local_addr();

    let done = Arc::new(AtomicBool::new(false));
    let flooder = std::thread::spawn({
        let done = done.clone();
        move || {
            let socket = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
            let mut request = bytes(&query("web.vm.", RecordType::A));
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut sent = 0;
            while sent < FLOOD && Instant::now() < deadline {
                request[..2].copy_from_slice(&(sent as u16).to_be_bytes());
                if socket.send_to(&request, addr).is_ok() {
                    sent += 1;
                }
            }
            done.store(true, Ordering::SeqCst);
            sent
        }
    });

    let victim = Ipv4Addr::LOCALHOST.into();
    let mut asked = 0;
    while asked < 20 || !done.load(Ordering::SeqCst) {
        let mut q = query("web.vm.", RecordType::A);
        q.metadata.id = asked as u16;
        let response = udp_ask_from(addr, victim, &bytes(&q), 10, Duration::from_millis(500)).await;
        let response =
            response.unwrap_or_else(|| panic!("query {asked} unanswered during the flood"));
        assert_eq!(response.answers.len(), 1);
        asked += 1;
        assert!(asked < 100_000, "flood never ended");
    }
    let sent = flooder.join().expect("flooder");
    assert_eq!(sent, FLOOD, "the flood was cut short by the deadline");
    assert_serving(addr).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_with_default_limits() {
    let server = flood(Limits::default()).await;
    assert!(server.stats().requests > 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_with_a_tight_client_rate() {
    let limits = Limits {
        client_rate: Some(ClientRate {
            queries_per_second: 1000,
            burst: 100,
        }),
        ..Limits::default()
    };
    let server = flood(limits).await;
    let stats = server.stats();
    assert!(stats.rate_limited > 0, "{stats:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_release_the_port() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    server.shutdown().await;
    UdpSocket::bind(addr)
        .await
        .expect("UDP port free after shutdown");
    TcpListener::bind(addr)
        .await
        .expect("TCP port free after shutdown");

    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    drop(server);
    let mut rebound = false;
    for _ in 0..100 {
        if UdpSocket::bind(addr).await.is_ok() && TcpListener::bind(addr).await.is_ok() {
            rebound = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rebound, "port still held after drop");
}

#[tokio::test]
async fn start_reports_a_taken_port() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let cfg = banger_dns::DnsConfig {
        listen: taken.local_addr().expect("addr"),
        ..config(Limits::default())
    };
    let err = DnsServer::start(cfg).await.expect_err("port taken");
    assert!(
        matches!(
            err,
            DnsError::Bind {
                transport: "UDP",
                ..
            }
        ),
        "{err:?}"
    );

    let err = DnsServer::start(banger_dns::DnsConfig {
        zone: "bad zone".into(),
        ..config(Limits::default())
    })
    .await
    .expect_err("bad zone");
    assert!(matches!(err, DnsError::InvalidZone { .. }), "{err:?}");
    let _: SocketAddr = taken.local_addr().expect("still ours");
}
