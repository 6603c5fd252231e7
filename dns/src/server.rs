//! Serving: a [`DnsServer`] is a thread of its own (`dns`, a current-thread
//! tokio runtime) running our UDP loop (`udp.rs`) and our TCP acceptor,
//! both deciding through one [`Handler`]. The daemon's Dns actor starts it,
//! keeps the [`Records`] handle, and shuts it down (or drops it).
//!
//! What hickory-server does: TCP framing (its `TcpStream`), the idle
//! timeout of a TCP connection (its [`TimeoutStream`], the one
//! `Server::register_listener` uses), writing TCP responses, and encoding
//! every response (its `MessageResponse`). Decoding is hickory-proto's
//! (`answer::decode`).
//!
//! What is ours, and why:
//! - The UDP loop: hickory-server's `Server` cost about 13 µs of CPU per
//!   query at 50 000 q/s (a task, a channel hand-off, two copies and two
//!   system calls per datagram); see `udp.rs` and `docs/benchmarks.md`.
//! - The per-client token bucket (`limit.rs`): hickory-server has only
//!   static allow/deny networks. Over the rate a UDP datagram is dropped
//!   (before it is decoded), a TCP connection waits for its token.
//! - The TCP accept loop: `Server::register_listener` (hickory-server
//!   0.26) has no cap on open connections, in total or per client, and
//!   retries a failed `accept` (e.g. out of file descriptors) without a
//!   pause. Ours caps both and pauses; each accepted connection is then
//!   served with hickory-server's own pieces, as `register_listener` would.
//! - Counters ([`DnsStats`]) and rate-limited logging of what clients
//!   trigger ([`LogGate`]). hickory-server logs every TCP response at
//!   `info` under the `hickory_server` target; the daemon filters that
//!   target to `warn`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hickory_proto::op::{Edns, ResponseCode};
use hickory_server::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_server::net::tcp::TcpStream as DnsTcpStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{ResponseHandle, ResponseHandler, ResponseInfo, TimeoutStream};
use hickory_server::zone_handler::{MessageRequest, Queries};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, error, info, instrument, warn};

use crate::answer::{self, Context, Decision, Dropped, Outcome, Reply};
use crate::limit::{ClientLimiter, LogGate};
use crate::records::{Records, Snapshot, Zone};
use crate::udp;
use crate::{DnsConfig, DnsError, Limits};

/// How many ports to try when `listen` has port 0 and the port the kernel
/// gave UDP is taken for TCP.
const BIND_ATTEMPTS: usize = 16;
/// Receive buffer asked for on the UDP socket (the kernel caps it at
/// `net.core.rmem_max`): room for bursts while the server catches up.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Pause after a failed `accept` (e.g. out of file descriptors) so a
/// persistent error cannot spin a core.
pub(crate) const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Responses queued for writing on one TCP connection. Requests on a
/// connection are answered one after the other, so one is in flight.
const TCP_RESPONSE_QUEUE: usize = 4;
/// After the FORMERR for an oversized TCP message: how long the connection
/// may take to write it out before it is closed.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Client-triggerable log lines: at most this many per window and kind.
const LOG_WINDOW: Duration = Duration::from_secs(10);
const LOG_PER_WINDOW: u32 = 5;

/// A running DNS server, on a thread of its own. Dropping it stops that
/// thread (closing the sockets shortly after); [`shutdown`](Self::shutdown)
/// also waits for that.
pub struct DnsServer {
    local_addr: SocketAddr,
    zone: String,
    records: Records,
    handler: Arc<Handler>,
    /// Stops the DNS thread (so does dropping it).
    stop: Option<oneshot::Sender<()>>,
    /// Fires when the DNS thread has closed the sockets.
    stopped: oneshot::Receiver<()>,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("zone", &self.zone)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// Counters since the server started (for `debug` output and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Every TCP message and every UDP datagram received, answered or
    /// not (those dropped by the rate limit included).
    pub requests: u64,
    /// Responses built (of every code).
    pub responses: u64,
    pub nxdomain: u64,
    pub refused: u64,
    pub formerr: u64,
    /// Requests that got no response: too short, not a query, a source
    /// that cannot be answered, over the rate, a panic.
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
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) responses: AtomicU64,
    pub(crate) nxdomain: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) formerr: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) tcp_rejected: AtomicU64,
    pub(crate) panics: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
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
    /// Binds UDP and TCP on `cfg.listen` and starts serving on a thread of
    /// its own. Must be called inside a tokio runtime (it binds there). The
    /// returned [`Records`] starts empty.
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

        let handler = Arc::new(Handler::new(zone, &records, cfg.limits));
        let (stop, stop_rx) = oneshot::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DnsError::Thread)?;
        // Move the sockets to the new runtime's reactor.
        let (udp, tcp) = {
            let _in_runtime = runtime.enter();
            let udp = udp.into_std().and_then(UdpSocket::from_std);
            let tcp = tcp.into_std().and_then(TcpListener::from_std);
            (
                udp.map_err(DnsError::Thread)?,
                tcp.map_err(DnsError::Thread)?,
            )
        };
        let serving = handler.clone();
        std::thread::Builder::new()
            .name("dns".to_string())
            .spawn(move || {
                runtime.block_on(serve(udp, tcp, serving, stop_rx));
                drop(runtime);
                let _ = stopped_tx.send(());
            })
            .map_err(DnsError::Thread)?;

        let zone = handler.zone.name.to_string();
        info!(%local_addr, %zone, ttl = cfg.ttl, "DNS server listening");
        let server = DnsServer {
            local_addr,
            zone,
            records: records.clone(),
            handler,
            stop: Some(stop),
            stopped,
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
        self.handler.stats()
    }

    /// Stops serving: stops the UDP loop where it waits (for datagrams,
    /// or for room to send; replies not sent by then are dropped), aborts
    /// the TCP acceptor and every open connection, and returns once the
    /// sockets are closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.stopped).await;
        info!(local_addr = %self.local_addr, zone = %self.zone, "DNS server stopped");
    }
}

/// The DNS thread's work: our UDP loop (`udp.rs`) and our TCP acceptor,
/// on a current-thread runtime of their own, until `stop` fires or its
/// sender is dropped. One thread: no cross-thread wake-ups per query (on
/// the daemon's multi-thread runtime they halved hickory-server's
/// throughput, see `docs/benchmarks.md`).
async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    handler: Arc<Handler>,
    stop: oneshot::Receiver<()>,
) {
    let mut tcp_tasks = JoinSet::new();
    tcp_tasks.spawn(tcp_acceptor(tcp, handler.clone()));
    tokio::select! {
        () = udp::serve(udp, &handler) => {}
        _ = stop => {}
    }
    tcp_tasks.shutdown().await;
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

/// What every request shares, UDP and TCP.
#[derive(Debug)]
pub(crate) struct Handler {
    pub(crate) zone: Arc<Zone>,
    /// The current records; read (an `Arc` clone under a read lock) once
    /// per TCP request and once per UDP batch.
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Our OPT record.
    pub(crate) edns: Edns,
    limits: Limits,
    limiter: Option<ClientLimiter>,
    pub(crate) gates: Gates,
    pub(crate) counters: Counters,
    connections: Mutex<ConnectionTable>,
}

/// One gate per kind of client-triggerable log line.
#[derive(Debug)]
pub(crate) struct Gates {
    malformed: LogGate,
    dropped: LogGate,
    over_rate: LogGate,
    tcp_full: LogGate,
    tcp_error: LogGate,
    pub(crate) io: LogGate,
    panicked: LogGate,
    pub(crate) encode: LogGate,
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
            encode: gate(),
        }
    }
}

impl Handler {
    pub(crate) fn new(zone: Arc<Zone>, records: &Records, limits: Limits) -> Self {
        Self {
            zone,
            snapshots: records.subscribe(),
            edns: answer::server_edns(),
            limiter: limits.client_rate.map(ClientLimiter::new),
            limits,
            gates: Gates::default(),
            counters: Counters::default(),
            connections: Mutex::new(ConnectionTable::default()),
        }
    }

    /// Counters since start.
    pub(crate) fn stats(&self) -> DnsStats {
        self.counters.snapshot()
    }

    /// Takes a token for `ip`, or says how long to wait. Logs (gated) when
    /// a client is over its rate.
    fn admit(&self, ip: IpAddr) -> Result<(), Duration> {
        self.admit_at(ip, Instant::now())
    }

    /// [`admit`](Self::admit) at `now` (the UDP loop reads the clock once
    /// per batch).
    pub(crate) fn admit_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check(ip, now).inspect_err(|_| {
            Counters::bump(&self.counters.rate_limited);
            if let Some(suppressed) = self.gates.over_rate.allow() {
                warn!(client = %ip, suppressed, "DNS client over its query rate");
            }
        })
    }

    /// Largest request answered normally. Over UDP the loop keeps
    /// `udp::RECV_BUF` (4096) bytes of a datagram: one that long or longer
    /// counts as too large, as it did when hickory-server read the socket.
    pub(crate) fn max_request(&self, protocol: Protocol) -> usize {
        match protocol {
            Protocol::Udp => self.limits.max_request_size.min(udp::RECV_BUF - 1),
            _ => self.limits.max_request_size,
        }
    }

    /// Answers one decoded TCP request of `size` bytes: the client's
    /// rate first (over it, this connection's next answer waits for a
    /// token; hickory-server answers a connection's requests in order),
    /// then the decision, then the response through `response`.
    async fn answer_tcp<R: ResponseHandler>(
        &self,
        request: &MessageRequest,
        size: usize,
        peer: SocketAddr,
        response: R,
    ) -> Option<ResponseInfo> {
        let protocol = Protocol::Tcp;
        if let Err(mut wait) = self.admit(peer.ip()) {
            loop {
                tokio::time::sleep(wait).await;
                match self.admit(peer.ip()) {
                    Ok(()) => break,
                    Err(next) => wait = next,
                }
            }
        }
        let records = self.snapshots.borrow().clone();
        let cx = Context {
            zone: &self.zone,
            records: &records,
            max_request: self.max_request(protocol),
        };
        let decision = catch_unwind(AssertUnwindSafe(|| answer::respond(&cx, request, size)))
            .unwrap_or(Decision::Drop(Dropped::Panicked));
        self.finish(
            decision,
            &request.queries,
            &records,
            peer,
            protocol,
            response,
        )
        .await
    }

    /// Counts and logs `decision` and sends its reply, if it has one.
    async fn finish<R: ResponseHandler>(
        &self,
        decision: Decision,
        question: &Queries,
        records: &Snapshot,
        peer: SocketAddr,
        protocol: Protocol,
        mut response: R,
    ) -> Option<ResponseInfo> {
        let reply = match decision {
            Decision::Reply(reply) => reply,
            Decision::Drop(why) => {
                self.dropped(why, peer, protocol);
                return None;
            }
        };
        self.replied(&reply, peer, protocol);
        let message = reply.message(question, &self.edns, &self.zone, records);
        match response.send_response(message).await {
            Ok(info) => Some(info),
            Err(error) => {
                if let Some(suppressed) = self.gates.io.allow() {
                    debug!(client = %peer, %protocol, %error, suppressed, "DNS response not sent");
                }
                None
            }
        }
    }

    /// One message read from a TCP connection: decoded as hickory-server's
    /// `Server` would, then answered.
    async fn serve_tcp_message(&self, raw: Vec<u8>, peer: SocketAddr, response: ResponseHandle) {
        Counters::bump(&self.counters.requests);
        let protocol = Protocol::Tcp;
        #[allow(clippy::result_large_err)] // see `answer::decode`
        let decoded = catch_unwind(AssertUnwindSafe(|| answer::decode(&raw)));
        match decoded {
            Ok(Ok(request)) => {
                self.answer_tcp(&request, raw.len(), peer, response).await;
            }
            Ok(Err(decision)) => {
                let records = self.snapshots.borrow().clone();
                let question = answer::no_question();
                self.finish(decision, question, &records, peer, protocol, response)
                    .await;
            }
            Err(_) => self.dropped(Dropped::Panicked, peer, protocol),
        }
    }

    pub(crate) fn replied(&self, reply: &Reply, peer: SocketAddr, protocol: Protocol) {
        let c = &self.counters;
        Counters::bump(&c.responses);
        match &reply.outcome {
            Outcome::Answered(ResponseCode::NXDomain) => Counters::bump(&c.nxdomain),
            Outcome::Answered(ResponseCode::Refused) => Counters::bump(&c.refused),
            Outcome::Answered(_) => {}
            Outcome::Malformed(why) => {
                Counters::bump(&c.formerr);
                if let Some(suppressed) = self.gates.malformed.allow() {
                    debug!(client = %peer, %protocol, suppressed, error = ?why, "malformed DNS request; answered FORMERR");
                }
            }
        }
    }

    pub(crate) fn dropped(&self, why: Dropped, peer: SocketAddr, protocol: Protocol) {
        Counters::bump(&self.counters.dropped);
        match why {
            // Counted and logged by `admit`.
            Dropped::OverRate => {}
            Dropped::Panicked => {
                Counters::bump(&self.counters.panics);
                if let Some(suppressed) = self.gates.panicked.allow() {
                    error!(client = %peer, %protocol, suppressed, "DNS request handling panicked; request dropped");
                }
            }
            Dropped::TooShort(_) | Dropped::NotAQuery | Dropped::Unanswerable => {
                if let Some(suppressed) = self.gates.dropped.allow() {
                    debug!(client = %peer, %protocol, suppressed, reason = ?why, "DNS request dropped");
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
    handler: Arc<Handler>,
    ip: IpAddr,
}

impl ConnectionSlot {
    fn take(handler: &Arc<Handler>, ip: IpAddr) -> Option<Self> {
        let mut table = handler
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mine = table.per_client.get(&ip).copied().unwrap_or(0);
        if table.total >= handler.limits.max_tcp_connections
            || mine >= handler.limits.max_tcp_connections_per_client
        {
            return None;
        }
        table.total += 1;
        table.per_client.insert(ip, mine + 1);
        Some(Self {
            handler: handler.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut table = self
            .handler
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

/// Accepts TCP connections within the caps (see the module docs for why
/// this is not `Server::register_listener`).
async fn tcp_acceptor(listener: TcpListener, handler: Arc<Handler>) {
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
                if let Some(suppressed) = handler.gates.io.allow() {
                    warn!(%error, suppressed, "DNS TCP accept failed");
                }
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::take(&handler, peer.ip()) else {
            Counters::bump(&handler.counters.tcp_rejected);
            if let Some(suppressed) = handler.gates.tcp_full.allow() {
                warn!(client = %peer, suppressed, "too many DNS TCP connections; closing the new one");
            }
            continue;
        };
        connections.spawn(tcp_connection(stream, peer, handler.clone(), slot));
    }
}

/// One TCP connection, served as hickory-server's `register_listener`
/// serves one: its framing, its idle timeout (reading a whole message,
/// waiting included, and writing a response), requests answered in order.
/// In addition, after the FORMERR for a message over `max_request_size`
/// the connection is closed.
async fn tcp_connection(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<Handler>,
    _slot: ConnectionSlot,
) {
    let _ = stream.set_nodelay(true);
    let (messages, responses) = DnsTcpStream::from_stream_with_buffer_size(
        AsyncIoTokioAsStd(stream),
        peer,
        TCP_RESPONSE_QUEUE,
    );
    let mut messages = TimeoutStream::new(messages, handler.limits.tcp_idle_timeout);
    while let Some(message) = messages.next().await {
        let raw = match message {
            Ok(message) => message.into_parts().0,
            Err(error) => {
                // Idle too long, or closed in the middle of a message (a
                // clean close between messages ends the loop instead).
                if let Some(suppressed) = handler.gates.tcp_error.allow() {
                    debug!(client = %peer, %error, suppressed, "closing DNS TCP connection");
                }
                return;
            }
        };
        let oversized = raw.len() > handler.limits.max_request_size;
        let response = ResponseHandle::new(peer, responses.clone(), Protocol::Tcp);
        handler.serve_tcp_message(raw, peer, response).await;
        if oversized {
            // Polling the stream writes the queued FORMERR out; whatever
            // the client sends meanwhile is not answered.
            let _ = timeout(CLOSE_GRACE, messages.next()).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_slots_are_bounded_and_given_back() {
        let zone = Arc::new(Zone::new("vm.", 5).expect("zone"));
        let records = Records::new(zone.clone());
        let limits = Limits {
            max_tcp_connections: 3,
            max_tcp_connections_per_client: 2,
            ..Limits::default()
        };
        let handler = Arc::new(Handler::new(zone, &records, limits));
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let a1 = ConnectionSlot::take(&handler, a).expect("a1");
        let a2 = ConnectionSlot::take(&handler, a).expect("a2");
        assert!(ConnectionSlot::take(&handler, a).is_none(), "per client");
        let b1 = ConnectionSlot::take(&handler, b).expect("b1");
        assert!(ConnectionSlot::take(&handler, b).is_none(), "in total");
        drop(a1);
        let a3 = ConnectionSlot::take(&handler, a).expect("a3 after a1 left");
        drop((a2, a3, b1));
        let table = handler.connections.lock().expect("lock");
        assert_eq!(table.total, 0);
        assert!(table.per_client.is_empty());
    }
}
