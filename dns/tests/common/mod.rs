//! Helpers shared by the integration tests: start a server on a loopback
//! port, build queries, ask over UDP and TCP.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use banger_dns::{DnsConfig, DnsServer, Limits, Records};
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

pub const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

pub fn config(limits: Limits) -> DnsConfig {
    DnsConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        zone: "vm.".to_string(),
        ttl: 5,
        limits,
    }
}

/// A server on a free loopback port with `web.vm.` → 10.0.0.2.
pub async fn start(cfg: DnsConfig) -> (DnsServer, Records) {
    let (server, records) = DnsServer::start(cfg).await.expect("start DNS server");
    records.set("web", WEB).expect("set web");
    (server, records)
}

pub fn query(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    m
}

pub fn bytes(m: &Message) -> Vec<u8> {
    m.to_vec().expect("encode query")
}

/// Sends `request` from a fresh socket bound to `from` and waits up to
/// `wait` for a response with the same id (retrying `tries` times).
pub async fn udp_ask_from(
    server: SocketAddr,
    from: IpAddr,
    request: &[u8],
    tries: usize,
    wait: Duration,
) -> Option<Message> {
    let socket = UdpSocket::bind((from, 0))
        .await
        .expect("bind client socket");
    // Requests shorter than an id accept any response (there should be none).
    let id = request.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let mut buf = vec![0u8; 65536];
    for _ in 0..tries {
        socket.send_to(request, server).await.expect("send");
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok((len, _))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            if let Ok(m) = Message::from_vec(&buf[..len]) {
                if id.is_none_or(|id| id == m.metadata.id) {
                    return Some(m);
                }
            }
        }
    }
    None
}

pub async fn udp_ask(server: SocketAddr, request: &[u8]) -> Option<Message> {
    udp_ask_from(
        server,
        Ipv4Addr::LOCALHOST.into(),
        request,
        3,
        Duration::from_secs(1),
    )
    .await
}

/// One request over a fresh TCP connection.
pub async fn tcp_ask(server: SocketAddr, request: &[u8]) -> Option<Message> {
    let mut stream = TcpStream::connect(server).await.expect("connect");
    tcp_ask_on(&mut stream, request).await
}

pub async fn tcp_ask_on(stream: &mut TcpStream, request: &[u8]) -> Option<Message> {
    let exchange = async {
        let len = u16::try_from(request.len()).expect("request fits a frame");
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(request).await?;
        let len = stream.read_u16().await?;
        let mut body = vec![0u8; usize::from(len)];
        stream.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = timeout(Duration::from_secs(5), exchange).await.ok()?.ok()?;
    Message::from_vec(&body).ok()
}

/// A normal query over both transports, from new sockets, still gets its
/// answer.
pub async fn assert_serving(server: SocketAddr) {
    let request = bytes(&query("web.vm.", RecordType::A));
    for (transport, response) in [
        ("UDP", udp_ask(server, &request).await),
        ("TCP", tcp_ask(server, &request).await),
    ] {
        let response = response.unwrap_or_else(|| panic!("no {transport} answer"));
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{transport}"
        );
        assert_eq!(response.answers.len(), 1, "{transport}");
        assert_eq!(response.answers[0].data, RData::A(A(WEB)), "{transport}");
    }
}
