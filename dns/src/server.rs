//! The transports: UDP workers and a TCP acceptor with one task per
//! connection, all owned by a [`DnsServer`]. The daemon's Dns actor starts
//! it, keeps the [`Records`] handle, and shuts it down (or drops it).
//!
//! Per-query work is bounded per client: a token bucket per source IP
//! (UDP: over the rate is dropped before parsing; TCP: waits), a cap on TCP
//! connections in total and per IP, and a timeout on every TCP read and
//! write. Nothing a client sends is logged above `debug` unless it is
//! about the server's own health, and every such line goes through a
//! [`LogGate`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, error, info, instrument, warn};

use crate::answer::{self, Context, Outcome, Transport, HEADER_LEN, SERVER_UDP_PAYLOAD};
use crate::limit::{ClientLimiter, LogGate};
use crate::records::{Records, Snapshot, Zone};
use crate::{DnsConfig, DnsError, Limits};

/// How many ports to try when `listen` has port 0 and the port the kernel
/// gave UDP is taken for TCP.
const BIND_ATTEMPTS: usize = 16;
/// Receive buffer asked for on the UDP socket (the kernel caps it at
/// `net.core.rmem_max`): room for bursts while the workers catch up.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Pause after a failed `accept` or `recv` (e.g. out of file descriptors)
/// so a persistent error cannot spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Client-triggerable log lines: at most this many per window and kind.
const LOG_WINDOW: Duration = Duration::from_secs(10);
const LOG_PER_WINDOW: u32 = 5;

/// A running DNS server. Dropping it aborts its tasks (closing the sockets
/// shortly after); [`shutdown`](Self::shutdown) also waits for that.
#[derive(Debug)]
pub struct DnsServer {
    local_addr: SocketAddr,
    zone: String,
    records: Records,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

/// Counters since the server started (for `debug` output and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Requests read (UDP datagrams and TCP messages), including the ones
    /// dropped by the rate limit.
    pub requests: u64,
    /// Responses built (of every code).
    pub responses: u64,
    pub nxdomain: u64,
    pub refused: u64,
    pub formerr: u64,
    /// Requests that got no response: too short, not a query, over the rate.
    pub dropped: u64,
    /// UDP requests dropped, or TCP requests delayed, by the client rate.
    pub rate_limited: u64,
    /// TCP connections closed at once because of the connection caps.
    pub tcp_rejected: u64,
    /// Requests whose handling panicked (a bug; the request is dropped and
    /// serving goes on).
    pub panics: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    responses: AtomicU64,
    nxdomain: AtomicU64,
    refused: AtomicU64,
    formerr: AtomicU64,
    dropped: AtomicU64,
    rate_limited: AtomicU64,
    tcp_rejected: AtomicU64,
    panics: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> DnsStats {
        DnsStats {
            requests: self.requests.load(Relaxed),
            responses: self.responses.load(Relaxed),
            nxdomain: self.nxdomain.load(Relaxed),
            refused: self.refused.load(Relaxed),
            formerr: self.formerr.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            tcp_rejected: self.tcp_rejected.load(Relaxed),
            panics: self.panics.load(Relaxed),
        }
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `cfg.listen` and starts serving. Must be called
    /// inside a tokio runtime. The returned [`Records`] starts empty.
    #[instrument(skip_all, fields(listen = %cfg.listen, zone = %cfg.zone))]
    pub async fn start(cfg: DnsConfig) -> Result<(DnsServer, Records), DnsError> {
        cfg.limits.validate()?;
        let zone = Arc::new(Zone::new(&cfg.zone, cfg.ttl)?);
        let records = Records::new(zone.clone());
        let (udp, tcp) = bind(cfg.listen).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            transport: "UDP",
            addr: cfg.listen,
            source,
        })?;

        let shared = Arc::new(Shared {
            zone,
            limiter: cfg.limits.client_rate.map(ClientLimiter::new),
            limits: cfg.limits,
            gates: Gates::default(),
            counters: Counters::default(),
            connections: Mutex::new(ConnectionTable::default()),
        });
        let udp = Arc::new(udp);
        let mut tasks = JoinSet::new();
        for _ in 0..shared.limits.udp_workers {
            tasks.spawn(udp_worker(udp.clone(), shared.clone(), records.subscribe()));
        }
        tasks.spawn(tcp_acceptor(tcp, shared.clone(), records.subscribe()));

        let zone = shared.zone.name.to_string();
        info!(%local_addr, %zone, ttl = cfg.ttl, "DNS server listening");
        let server = DnsServer {
            local_addr,
            zone,
            records: records.clone(),
            shared,
            tasks,
        };
        Ok((server, records))
    }

    /// The address UDP and TCP are bound to (the real port if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Another handle to the records this server answers from.
    pub fn records(&self) -> Records {
        self.records.clone()
    }

    /// Counters since start.
    pub fn stats(&self) -> DnsStats {
        self.shared.counters.snapshot()
    }

    /// Stops serving: aborts the UDP workers, the TCP acceptor and every
    /// open connection, and returns once the sockets are closed.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
        info!(local_addr = %self.local_addr, zone = %self.zone, "DNS server stopped");
    }
}

/// Binds UDP, then TCP on the same address and port.
async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let udp_error = |source| DnsError::Bind {
        transport: "UDP",
        addr,
        source,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr).await.map_err(udp_error)?;
        if let Err(error) = setsockopt(&udp, sockopt::RcvBuf, &UDP_RECV_BUFFER) {
            debug!(%error, "cannot enlarge the DNS UDP receive buffer");
        }
        let bound = udp.local_addr().map_err(udp_error)?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < BIND_ATTEMPTS =>
            {
                continue
            }
            Err(source) => {
                return Err(DnsError::Bind {
                    transport: "TCP",
                    addr: bound,
                    source,
                })
            }
        }
    }
}

/// What every serving task shares.
#[derive(Debug)]
struct Shared {
    zone: Arc<Zone>,
    limits: Limits,
    limiter: Option<ClientLimiter>,
    gates: Gates,
    counters: Counters,
    connections: Mutex<ConnectionTable>,
}

/// One gate per kind of client-triggerable log line.
#[derive(Debug)]
struct Gates {
    malformed: LogGate,
    dropped: LogGate,
    over_rate: LogGate,
    tcp_full: LogGate,
    tcp_error: LogGate,
    io: LogGate,
    panicked: LogGate,
}

impl Default for Gates {
    fn default() -> Self {
        let gate = || LogGate::new(LOG_WINDOW, LOG_PER_WINDOW);
        Self {
            malformed: gate(),
            dropped: gate(),
            over_rate: gate(),
            tcp_full: gate(),
            tcp_error: gate(),
            io: gate(),
            panicked: gate(),
        }
    }
}

impl Shared {
    /// Takes a token for `ip`, or says how long to wait. Logs (gated) when
    /// a client is over its rate.
    fn admit(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check(ip, Instant::now()).inspect_err(|_| {
            Counters::bump(&self.counters.rate_limited);
            if let Some(suppressed) = self.gates.over_rate.allow() {
                warn!(client = %ip, suppressed, "DNS client over its query rate");
            }
        })
    }

    /// Answers one request into `out`; `true` if there is something to send.
    /// A panic in here (a bug, maybe in the decoder) costs one request, not
    /// the worker.
    fn answer(
        &self,
        records: &Snapshot,
        transport: Transport,
        request: &[u8],
        out: &mut Vec<u8>,
        peer: SocketAddr,
    ) -> bool {
        let cx = Context {
            zone: &self.zone,
            records,
            max_request: self.limits.max_request_size,
            transport,
        };
        match catch_unwind(AssertUnwindSafe(|| answer::respond(&cx, request, out))) {
            Ok(outcome) => self.log_outcome(outcome, peer, transport),
            Err(_) => {
                out.clear();
                Counters::bump(&self.counters.dropped);
                Counters::bump(&self.counters.panics);
                if let Some(suppressed) = self.gates.panicked.allow() {
                    error!(client = %peer, ?transport, suppressed, "DNS request handling panicked; request dropped");
                }
                false
            }
        }
    }

    fn log_outcome(&self, outcome: Outcome, peer: SocketAddr, transport: Transport) -> bool {
        let c = &self.counters;
        match outcome {
            Outcome::Answered(code) => {
                Counters::bump(&c.responses);
                match code {
                    ResponseCode::NXDomain => Counters::bump(&c.nxdomain),
                    ResponseCode::Refused => Counters::bump(&c.refused),
                    _ => {}
                }
                true
            }
            Outcome::Malformed(why) => {
                Counters::bump(&c.responses);
                Counters::bump(&c.formerr);
                if let Some(suppressed) = self.gates.malformed.allow() {
                    debug!(client = %peer, ?transport, suppressed, error = ?why, "malformed DNS request; answered FORMERR");
                }
                true
            }
            Outcome::Dropped(why) => {
                Counters::bump(&c.dropped);
                if let Some(suppressed) = self.gates.dropped.allow() {
                    debug!(client = %peer, ?transport, suppressed, reason = ?why, "DNS request dropped");
                }
                false
            }
        }
    }
}

/// The latest snapshot, re-read only when a writer published a new one.
fn refresh(rx: &mut watch::Receiver<Arc<Snapshot>>, current: &mut Arc<Snapshot>) {
    if rx.has_changed().unwrap_or(false) {
        *current = rx.borrow_and_update().clone();
    }
}

async fn udp_worker(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Arc<Snapshot>>,
) {
    // The largest datagram there is; anything over `max_request_size` still
    // gets its FORMERR.
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    let mut out = Vec::with_capacity(usize::from(SERVER_UDP_PAYLOAD));
    let mut records = rx.borrow_and_update().clone();
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                if let Some(suppressed) = shared.gates.io.allow() {
                    warn!(%error, suppressed, "DNS UDP receive failed");
                }
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        Counters::bump(&shared.counters.requests);
        // Nothing can be sent to port 0; a reply would be an error anyway.
        if peer.port() == 0 || shared.admit(peer.ip()).is_err() {
            Counters::bump(&shared.counters.dropped);
            continue;
        }
        refresh(&mut rx, &mut records);
        if !shared.answer(&records, Transport::Udp, &buf[..len], &mut out, peer) {
            continue;
        }
        // Never wait on a full send buffer: UDP is lossy, the client retries,
        // and waiting would stop us reading everyone else's queries.
        match socket.try_send_to(&out, peer) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => {
                if let Some(suppressed) = shared.gates.io.allow() {
                    debug!(client = %peer, %error, suppressed, "DNS UDP send failed");
                }
            }
        }
    }
}

/// Open TCP connections, in total and per client IP.
#[derive(Debug, Default)]
struct ConnectionTable {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// A place in the [`ConnectionTable`], given back on drop (also when the
/// connection task is aborted or panics).
#[derive(Debug)]
struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let mut table = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
        let mine = table.per_client.get(&ip).copied().unwrap_or(0);
        if table.total >= shared.limits.max_tcp_connections
            || mine >= shared.limits.max_tcp_connections_per_client
        {
            return None;
        }
        table.total += 1;
        table.per_client.insert(ip, mine + 1);
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut table = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        table.total = table.total.saturating_sub(1);
        if let Some(n) = table.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.per_client.remove(&self.ip);
            }
        }
    }
}

async fn tcp_acceptor(
    listener: TcpListener,
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<Snapshot>>,
) {
    // Owned here: when this task is aborted, every connection goes with it.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if let Some(suppressed) = shared.gates.io.allow() {
                    warn!(%error, suppressed, "DNS TCP accept failed");
                }
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::take(&shared, peer.ip()) else {
            Counters::bump(&shared.counters.tcp_rejected);
            if let Some(suppressed) = shared.gates.tcp_full.allow() {
                warn!(client = %peer, suppressed, "too many DNS TCP connections; closing the new one");
            }
            continue;
        };
        connections.spawn(tcp_connection(
            stream,
            peer,
            shared.clone(),
            rx.clone(),
            slot,
        ));
    }
}

/// What [`read_frame`] found.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// The peer closed between messages.
    Closed,
    /// A whole message is in the buffer.
    Message,
    /// The length prefix is over the limit; the buffer holds the header.
    TooLarge(usize),
}

/// Reads one length-prefixed message (RFC 1035 §4.2.2) into `buf`. EOF
/// before the first byte is a clean close; EOF inside a message is an
/// `UnexpectedEof` error.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Frame> {
    let mut prefix = [0u8; 2];
    if reader.read(&mut prefix[..1]).await? == 0 {
        return Ok(Frame::Closed);
    }
    reader.read_exact(&mut prefix[1..]).await?;
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > max {
        buf.resize(HEADER_LEN, 0);
        reader.read_exact(buf).await?;
        return Ok(Frame::TooLarge(len));
    }
    buf.resize(len, 0);
    reader.read_exact(buf).await?;
    Ok(Frame::Message)
}

async fn tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    _slot: ConnectionSlot,
) {
    let _ = stream.set_nodelay(true);
    let idle = shared.limits.tcp_idle_timeout;
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::with_capacity(4096, reader);
    let mut records = rx.borrow_and_update().clone();
    let mut request = Vec::new();
    let mut out = Vec::new();
    let mut frame = Vec::new();
    loop {
        let read = timeout(
            idle,
            read_frame(&mut reader, &mut request, shared.limits.max_request_size),
        )
        .await;
        let reply = match read {
            Err(_) => {
                if let Some(suppressed) = shared.gates.tcp_error.allow() {
                    debug!(client = %peer, suppressed, "DNS TCP connection idle; closing");
                }
                return;
            }
            Ok(Ok(Frame::Closed)) => return,
            Ok(Err(error)) => {
                if let Some(suppressed) = shared.gates.tcp_error.allow() {
                    debug!(client = %peer, %error, suppressed, "DNS TCP connection broke off mid-message");
                }
                return;
            }
            Ok(Ok(Frame::TooLarge(len))) => {
                Counters::bump(&shared.counters.requests);
                // The rest of the message is not worth reading: answer
                // FORMERR from its header, then close.
                let outcome = answer::too_large(&request, len, Transport::Tcp, &mut out);
                if shared.log_outcome(outcome, peer, Transport::Tcp) {
                    send(&mut writer, &mut frame, &out, idle).await;
                }
                return;
            }
            Ok(Ok(Frame::Message)) => {
                Counters::bump(&shared.counters.requests);
                while let Err(wait) = shared.admit(peer.ip()) {
                    tokio::time::sleep(wait).await;
                }
                refresh(&mut rx, &mut records);
                shared.answer(&records, Transport::Tcp, &request, &mut out, peer)
            }
        };
        if reply && !send(&mut writer, &mut frame, &out, idle).await {
            return;
        }
    }
}

/// Writes one length-prefixed message; `false` if the connection is done.
async fn send<W: AsyncWriteExt + Unpin>(
    writer: &mut W,
    frame: &mut Vec<u8>,
    message: &[u8],
    idle: Duration,
) -> bool {
    let Ok(len) = u16::try_from(message.len()) else {
        return false;
    };
    frame.clear();
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    matches!(timeout(idle, writer.write_all(frame)).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_distinguish_clean_close_from_truncation() {
        let mut buf = Vec::new();
        let mut empty: &[u8] = &[];
        assert_eq!(
            read_frame(&mut empty, &mut buf, 512).await.expect("eof"),
            Frame::Closed
        );

        let mut half_prefix: &[u8] = &[0];
        let err = read_frame(&mut half_prefix, &mut buf, 512)
            .await
            .expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut short_body: &[u8] = &[0, 5, 1, 2];
        let err = read_frame(&mut short_body, &mut buf, 512)
            .await
            .expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut two: &[u8] = &[0, 2, 7, 8, 0, 0];
        assert_eq!(
            read_frame(&mut two, &mut buf, 512).await.expect("one"),
            Frame::Message
        );
        assert_eq!(buf, [7, 8]);
        assert_eq!(
            read_frame(&mut two, &mut buf, 512).await.expect("empty"),
            Frame::Message
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_frame(&mut two, &mut buf, 512).await.expect("eof"),
            Frame::Closed
        );

        let mut big = vec![0x10, 0x00];
        big.extend([0xAB; 20]);
        let mut big: &[u8] = &big;
        assert_eq!(
            read_frame(&mut big, &mut buf, 512).await.expect("big"),
            Frame::TooLarge(4096)
        );
        assert_eq!(buf.len(), HEADER_LEN);
    }

    #[tokio::test]
    async fn connection_slots_are_bounded_and_given_back() {
        let shared = Arc::new(Shared {
            zone: Arc::new(Zone::new("vm.", 5).expect("zone")),
            limits: Limits {
                max_tcp_connections: 3,
                max_tcp_connections_per_client: 2,
                ..Limits::default()
            },
            limiter: None,
            gates: Gates::default(),
            counters: Counters::default(),
            connections: Mutex::new(ConnectionTable::default()),
        });
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let a1 = ConnectionSlot::take(&shared, a).expect("a1");
        let a2 = ConnectionSlot::take(&shared, a).expect("a2");
        assert!(ConnectionSlot::take(&shared, a).is_none(), "per client");
        let b1 = ConnectionSlot::take(&shared, b).expect("b1");
        assert!(ConnectionSlot::take(&shared, b).is_none(), "in total");
        drop(a1);
        let a3 = ConnectionSlot::take(&shared, a).expect("a3 after a1 left");
        drop((a2, a3, b1));
        let table = shared.connections.lock().expect("lock");
        assert_eq!(table.total, 0);
        assert!(table.per_client.is_empty());
    }
}
