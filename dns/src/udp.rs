//! The UDP side of the server: our own loop on the socket, on the `dns`
//! thread's runtime next to the TCP acceptor (`server.rs`).
//!
//! Why ours and not hickory-server's `Server`: measured cost per query.
//! At 50 000 q/s hickory-server's UDP path cost bangerd about 13 µs of CPU
//! per query (`docs/benchmarks.md`): a `recvfrom` and a `sendto` per
//! datagram, a task spawned per datagram, the request copied into a `Vec`
//! and its question section again, a response `Vec` per answer handed back
//! through a channel, and an `info!` line built per response. This loop
//! reads up to [`BATCH`] datagrams with one `recvmmsg`, decodes each in
//! place with hickory-proto (`answer::decode`), decides with
//! `answer::respond`, encodes with hickory-server's `MessageResponse` into
//! a buffer kept from batch to batch, and sends every reply of the batch
//! with one `sendmmsg`. No task, no channel, no copy of the request.
//!
//! What a datagram gets, in order (the same rules as before, see
//! `docs/dns.md`): under 12 bytes nothing; from an address that cannot be
//! answered (port 0, unspecified, broadcast) nothing; over the client's
//! rate nothing; over the size limit FORMERR from the header alone;
//! undecodable FORMERR (nothing if QR is set); otherwise the decision of
//! `answer::respond`, encoded in at most 512 bytes, or 1232 with EDNS
//! (records that do not fit are left out and TC is set). A panic while
//! handling one datagram drops that datagram only.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use hickory_proto::op::Header;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::net::xfer::Protocol;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, error, warn};

use crate::answer::{self, Context, Decision, Dropped, HEADER_LEN, SERVER_UDP_PAYLOAD};
use crate::records::Snapshot;
use crate::server::{Counters, Handler, ERROR_PAUSE};

/// Datagrams read (and replies sent) per system call.
pub(crate) const BATCH: usize = 64;
/// Bytes kept of one datagram. A longer one is cut; its real length is
/// still known (`MSG_TRUNC`), and it is over the size limit anyway.
pub(crate) const RECV_BUF: usize = 4096;
/// Largest response without EDNS (RFC 1035 §4.2.1).
const PLAIN_UDP_PAYLOAD: u16 = 512;

/// One datagram of a batch.
#[derive(Clone, Copy)]
struct Received {
    /// Its length on the wire (may exceed [`RECV_BUF`]).
    len: usize,
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
}

/// Buffers for one batch, reused from batch to batch.
struct Batch {
    /// [`BATCH`] × [`RECV_BUF`] bytes.
    data: Box<[u8]>,
    received: Box<[Received]>,
    /// The reply to datagram `i`, when `replies[i]`.
    out: Vec<Vec<u8>>,
    replies: [bool; BATCH],
}

impl Batch {
    fn new() -> Self {
        // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
        let empty = Received {
            len: 0,
            addr: unsafe { mem::zeroed() },
            addr_len: 0,
        };
        Self {
            data: vec![0; BATCH * RECV_BUF].into_boxed_slice(),
            received: vec![empty; BATCH].into_boxed_slice(),
            out: (0..BATCH)
                .map(|_| Vec::with_capacity(usize::from(SERVER_UDP_PAYLOAD)))
                .collect(),
            replies: [false; BATCH],
        }
    }

    /// One `recvmmsg`: up to [`BATCH`] datagrams, or `WouldBlock`.
    fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: all-zero iovecs and mmsghdrs are valid (empty) values.
        let mut iov: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, (chunk, r)) in self
            .data
            .chunks_exact_mut(RECV_BUF)
            .zip(self.received.iter_mut())
            .enumerate()
        {
            iov[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut r.addr as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every header points at live buffers of the sizes given
        // (`iov`, `hdrs`, `self.data`, `self.received` outlive the call).
        // MSG_TRUNC: `msg_len` is a datagram's real length, also when it
        // was longer than its buffer.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (r, h) in self.received.iter_mut().zip(&hdrs).take(n) {
            r.len = h.msg_len as usize;
            r.addr_len = h.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// One `sendmmsg` of the replies among datagrams `from..n`: how many
    /// datagrams (replies or not) are done, or an error for the first
    /// reply if none went out.
    fn send(&mut self, fd: RawFd, from: usize, n: usize) -> io::Result<usize> {
        // SAFETY: all-zero iovecs and mmsghdrs are valid (empty) values.
        let mut iov: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        let mut which = [0usize; BATCH];
        let mut count = 0;
        for i in (from..n).filter(|&i| self.replies[i]) {
            iov[count] = libc::iovec {
                iov_base: self.out[i].as_mut_ptr().cast(),
                iov_len: self.out[i].len(),
            };
            let h = &mut hdrs[count].msg_hdr;
            h.msg_iov = &mut iov[count];
            h.msg_iovlen = 1;
            h.msg_name = (&mut self.received[i].addr as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.received[i].addr_len;
            which[count] = i;
            count += 1;
        }
        if count == 0 {
            return Ok(n - from);
        }
        // SAFETY: `count` headers, each pointing at a live iovec over a
        // reply buffer and at the datagram's source address.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let sent = sent as usize;
        Ok(if sent == count {
            n - from
        } else {
            which[sent] - from
        })
    }
}

/// The source address of a datagram; `None` for a family we do not serve.
fn peer(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(addr.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (family and length
            // checked); sockaddr_storage is aligned for it.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into())
        }
        _ => None,
    }
}

/// Whether a response can go to `peer` (hickory-server's `Server` checks
/// the same before it handles a datagram).
fn answerable(peer: SocketAddr) -> bool {
    peer.port() != 0
        && match peer.ip() {
            IpAddr::V4(ip) => !ip.is_unspecified() && !ip.is_broadcast(),
            IpAddr::V6(ip) => !ip.is_unspecified(),
        }
}

/// Serves `socket` until the future is dropped (the server's shutdown).
pub(crate) async fn serve(socket: UdpSocket, handler: &Handler) {
    let fd = socket.as_raw_fd();
    let mut batch = Batch::new();
    loop {
        let n = match socket
            .async_io(Interest::READABLE, || batch.receive(fd))
            .await
        {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                if let Some(suppressed) = handler.gates.io.allow() {
                    warn!(%error, suppressed, "DNS UDP receive failed");
                }
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        handler.answer_batch(&mut batch, n);
        send_all(&socket, handler, &mut batch, n).await;
    }
}

/// Sends the batch's replies, waiting while the socket's buffer is full.
/// A reply the kernel refuses (e.g. no route back) is given up on.
async fn send_all(socket: &UdpSocket, handler: &Handler, batch: &mut Batch, n: usize) {
    let fd = socket.as_raw_fd();
    let mut done = 0;
    while done < n {
        match socket
            .async_io(Interest::WRITABLE, || batch.send(fd, done, n))
            .await
        {
            Ok(k) => done += k,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                // The first reply from `done` on failed: skip it.
                let Some(i) = (done..n).find(|&i| batch.replies[i]) else {
                    break;
                };
                if let Some(suppressed) = handler.gates.io.allow() {
                    let client = peer(&batch.received[i].addr, batch.received[i].addr_len);
                    debug!(?client, protocol = %Protocol::Udp, %error, suppressed, "DNS response not sent");
                }
                done = i + 1;
            }
        }
    }
}

impl Handler {
    /// Decides and encodes the reply to each of the batch's `n`
    /// datagrams (`batch.replies[i]`: one to send). One clock reading and
    /// one records snapshot serve the whole batch; the snapshot is taken
    /// after the datagrams arrived, so a change published before a query
    /// arrived is in its answer.
    fn answer_batch(&self, batch: &mut Batch, n: usize) {
        let now = Instant::now();
        let records = self.snapshots.borrow().clone();
        for i in 0..n {
            let Received {
                len,
                addr,
                addr_len,
            } = batch.received[i];
            let Some(peer) = peer(&addr, addr_len) else {
                batch.replies[i] = false;
                continue;
            };
            let data = &batch.data[i * RECV_BUF..i * RECV_BUF + len.min(RECV_BUF)];
            batch.replies[i] =
                self.answer_datagram(data, len, peer, now, &records, &mut batch.out[i]);
        }
    }

    /// One datagram of `size` bytes (`data` is what was kept of it): true
    /// if `out` now holds the reply to send.
    fn answer_datagram(
        &self,
        data: &[u8],
        size: usize,
        peer: SocketAddr,
        now: Instant,
        records: &Snapshot,
        out: &mut Vec<u8>,
    ) -> bool {
        let protocol = Protocol::Udp;
        Counters::bump(&self.counters.requests);
        let early = if size < HEADER_LEN {
            Some(Dropped::TooShort(size))
        } else if !answerable(peer) {
            Some(Dropped::Unanswerable)
        } else if self.admit_at(peer.ip(), now).is_err() {
            Some(Dropped::OverRate)
        } else {
            None
        };
        if let Some(why) = early {
            self.dropped(why, peer, protocol);
            return false;
        }
        let handled = catch_unwind(AssertUnwindSafe(|| {
            self.decide_and_encode(data, size, records, out)
        }));
        match handled {
            Ok((Decision::Reply(reply), encoded)) => {
                self.replied(&reply, peer, protocol);
                if let Err(error) = encoded {
                    if let Some(suppressed) = self.gates.encode.allow() {
                        error!(client = %peer, %error, suppressed, "cannot encode a DNS response; sent SERVFAIL");
                    }
                }
                true
            }
            Ok((Decision::Drop(why), _)) => {
                self.dropped(why, peer, protocol);
                false
            }
            Err(_) => {
                self.dropped(Dropped::Panicked, peer, protocol);
                false
            }
        }
    }

    /// Decodes, decides and (if there is a reply) encodes into `out`.
    fn decide_and_encode(
        &self,
        data: &[u8],
        size: usize,
        records: &Snapshot,
        out: &mut Vec<u8>,
    ) -> (Decision, Result<(), hickory_proto::ProtoError>) {
        let max_request = self.max_request(Protocol::Udp);
        let request;
        let (decision, question) = if size > max_request {
            // Only the header matters (and the rest may have been cut).
            let header = Header::read(&mut BinDecoder::new(data))
                .unwrap_or_else(|_| unreachable!("at least a header's bytes"));
            (
                answer::too_large(&header.metadata, size),
                answer::no_question(),
            )
        } else {
            match answer::decode(data) {
                Ok(decoded) => {
                    request = decoded;
                    let cx = Context {
                        zone: &self.zone,
                        records,
                        max_request,
                    };
                    (answer::respond(&cx, &request, size), &request.queries)
                }
                Err(decision) => (decision, answer::no_question()),
            }
        };
        let Decision::Reply(reply) = &decision else {
            return (decision, Ok(()));
        };
        let max = if reply.edns {
            self.edns.max_payload()
        } else {
            PLAIN_UDP_PAYLOAD
        };
        let encoded = answer::encode(reply, question, &self.edns, &self.zone, records, max, out);
        (decision, encoded)
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket as StdUdpSocket;
    use std::sync::Arc;
    use std::time::Duration;

    use hickory_proto::op::{Edns, Message, MessageType, Metadata, Query, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, RecordType};
    use hickory_server::net::runtime::Time;
    use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
    use hickory_server::Server;

    use super::*;
    use crate::records::{Records, Zone};
    use crate::{ClientRate, Limits};

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn zone_and_records() -> (Arc<Zone>, Records) {
        let zone = Arc::new(Zone::new("vm.", 5).expect("zone"));
        let records = Records::new(zone.clone());
        records.set("web", WEB).expect("set web");
        records
            .set("db", Ipv4Addr::new(10, 0, 0, 3))
            .expect("set db");
        (zone, records)
    }

    fn query(id: u16, name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().expect("encode query")
    }

    /// A bare socket for the batch to read, and clients that send to it.
    struct Rig {
        server: StdUdpSocket,
        handler: Handler,
        batch: Batch,
    }

    impl Rig {
        fn new(limits: Limits) -> (Self, Records) {
            let (zone, records) = zone_and_records();
            let server = StdUdpSocket::bind("127.0.0.1:0").expect("bind server");
            server.set_nonblocking(true).expect("nonblocking");
            let handler = Handler::new(zone, &records, limits);
            let rig = Self {
                server,
                handler,
                batch: Batch::new(),
            };
            (rig, records)
        }

        fn addr(&self) -> SocketAddr {
            self.server.local_addr().expect("addr")
        }

        /// Reads everything queued in one `recvmmsg`, answers it and sends
        /// the replies with `sendmmsg`, as the loop does. Returns how many
        /// datagrams the batch held.
        fn one_batch(&mut self) -> usize {
            let fd = self.server.as_raw_fd();
            let n = self.batch.receive(fd).expect("recvmmsg");
            self.handler.answer_batch(&mut self.batch, n);
            let mut done = 0;
            while done < n {
                done += self.batch.send(fd, done, n).expect("sendmmsg");
            }
            n
        }
    }

    fn client(ip: [u8; 4]) -> StdUdpSocket {
        let sock = StdUdpSocket::bind((Ipv4Addr::from(ip), 0)).expect("bind client");
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        sock
    }

    /// Every response waiting on `sock`, decoded, by id.
    fn responses(sock: &StdUdpSocket) -> Vec<Message> {
        let mut buf = [0u8; 65536];
        let mut out = Vec::new();
        while let Ok(len) = sock.recv(&mut buf) {
            out.push(Message::from_vec(&buf[..len]).expect("a decodable response"));
        }
        out
    }

    fn by_id(responses: &[Message], id: u16) -> Option<&Message> {
        responses.iter().find(|m| m.metadata.id == id)
    }

    #[test]
    fn a_mixed_burst_is_answered_datagram_by_datagram() {
        let (mut rig, _records) = Rig::new(Limits::default());
        let to = rig.addr();
        let a = client([127, 0, 0, 1]);
        let b = client([127, 0, 0, 2]);

        let good = query(1, "web.vm.", RecordType::A, false);
        let mut oversized = query(4, "web.vm.", RecordType::A, true);
        oversized.resize(5000, 0);
        let mut reflected = query(5, "web.vm.", RecordType::A, false);
        reflected[2] |= 0x80;
        let mut two = query(6, "web.vm.", RecordType::A, false);
        two[5] = 2;
        two.extend_from_slice(&good[12..]);
        let mut prefix = query(3, "web.vm.", RecordType::A, false);
        prefix.truncate(20);
        let burst: Vec<(&StdUdpSocket, Vec<u8>)> = vec![
            (&a, good.clone()),
            (&b, vec![0xAB; 5]), // shorter than a header
            (&a, prefix),        // cannot be decoded
            (&b, query(10, "db.vm.", RecordType::A, true)),
            (&a, oversized),
            (&a, reflected),
            (&b, vec![]), // empty
            (&a, two),
            (&b, query(11, "NoPe.vm.", RecordType::A, false)),
            (&a, query(7, "WeB.Vm.", RecordType::A, true)),
            (&b, query(12, "example.com.", RecordType::A, false)),
        ];
        for (sock, bytes) in &burst {
            sock.send_to(bytes, to).expect("send");
        }
        assert_eq!(rig.one_batch(), burst.len(), "one recvmmsg read the burst");

        let from_a = responses(&a);
        let from_b = responses(&b);
        // Answered: 1, 3, 4, 6, 7 for a; 10, 11, 12 for b. Nothing else.
        let mut ids_a: Vec<u16> = from_a.iter().map(|m| m.metadata.id).collect();
        ids_a.sort_unstable();
        assert_eq!(ids_a, [1, 3, 4, 6, 7]);
        let mut ids_b: Vec<u16> = from_b.iter().map(|m| m.metadata.id).collect();
        ids_b.sort_unstable();
        assert_eq!(ids_b, [10, 11, 12]);

        let r = by_id(&from_a, 1).expect("1");
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers[0].data, RData::A(A(WEB)));
        assert!(r.edns.is_none(), "no EDNS asked, none given");
        for id in [3, 4, 6] {
            let r = by_id(&from_a, id).expect("FORMERR");
            assert_eq!(r.metadata.response_code, ResponseCode::FormErr, "{id}");
            assert!(r.queries.is_empty() && r.answers.is_empty(), "{id}");
        }
        let r = by_id(&from_a, 7).expect("7");
        assert!(r.queries[0]
            .name
            .eq_case(&Name::from_ascii("WeB.Vm.").expect("name")));
        assert!(r.answers[0]
            .name
            .eq_case(&Name::from_ascii("WeB.Vm.").expect("name")));
        assert_eq!(r.edns.as_ref().map(Edns::max_payload), Some(1232));
        let r = by_id(&from_b, 10).expect("10");
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(10, 0, 0, 3))));
        assert_eq!(
            by_id(&from_b, 11).expect("11").metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            by_id(&from_b, 12).expect("12").metadata.response_code,
            ResponseCode::Refused
        );

        let stats = rig.handler.stats();
        assert_eq!(stats.requests, burst.len() as u64, "{stats:?}");
        assert_eq!(stats.responses, 8, "{stats:?}");
        assert_eq!(stats.formerr, 3, "{stats:?}");
        assert_eq!(stats.dropped, 3, "{stats:?}");
        assert_eq!(stats.nxdomain, 1, "{stats:?}");
        assert_eq!(stats.refused, 1, "{stats:?}");

        // And the next batch is served normally.
        a.send_to(&query(99, "web.vm.", RecordType::A, false), to)
            .expect("send");
        assert_eq!(rig.one_batch(), 1);
        assert!(by_id(&responses(&a), 99).is_some());
    }

    #[test]
    fn a_client_over_its_rate_is_dropped_while_another_is_answered() {
        let limits = Limits {
            client_rate: Some(ClientRate {
                queries_per_second: 1,
                burst: 2,
            }),
            ..Limits::default()
        };
        let (mut rig, _records) = Rig::new(limits);
        let to = rig.addr();
        let greedy = client([127, 0, 0, 1]);
        let modest = client([127, 0, 0, 2]);
        for id in 0..6 {
            greedy
                .send_to(&query(id, "web.vm.", RecordType::A, false), to)
                .expect("send");
            if id % 3 == 0 {
                modest
                    .send_to(&query(100 + id, "web.vm.", RecordType::A, false), to)
                    .expect("send");
            }
        }
        assert_eq!(rig.one_batch(), 8);
        let ids = |sock| {
            let mut ids: Vec<u16> = responses(sock).iter().map(|m| m.metadata.id).collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(ids(&greedy), [0, 1], "the burst of 2, then nothing");
        assert_eq!(ids(&modest), [100, 103]);
        let stats = rig.handler.stats();
        assert_eq!(stats.rate_limited, 4, "{stats:?}");
        assert_eq!(stats.dropped, 4, "{stats:?}");
        assert_eq!(stats.responses, 4, "{stats:?}");
    }

    #[test]
    fn source_addresses_are_read_back() {
        let v4 = SocketAddr::from(([127, 0, 0, 9], 5353));
        let v6: SocketAddr = "[::1]:53".parse().expect("v6");
        for addr in [v4, v6] {
            let sock = StdUdpSocket::bind(SocketAddr::new(addr.ip(), 0));
            let Ok(sock) = sock else {
                continue; // no IPv6 on this host
            };
            let from = sock.local_addr().expect("addr");
            let server = StdUdpSocket::bind(SocketAddr::new(addr.ip(), 0)).expect("bind");
            server.set_nonblocking(true).expect("nonblocking");
            sock.send_to(
                b"hello, this is not DNS",
                server.local_addr().expect("addr"),
            )
            .expect("send");
            let mut batch = Batch::new();
            let mut n = 0;
            for _ in 0..100 {
                match batch.receive(server.as_raw_fd()) {
                    Ok(k) => {
                        n = k;
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            assert_eq!(n, 1);
            let r = batch.received[0];
            assert_eq!(r.len, 22);
            assert_eq!(peer(&r.addr, r.addr_len), Some(from));
        }
        assert!(!answerable("127.0.0.1:0".parse().expect("addr")));
        assert!(!answerable("0.0.0.0:53".parse().expect("addr")));
        assert!(!answerable("255.255.255.255:53".parse().expect("addr")));
        assert!(answerable("127.0.0.1:53".parse().expect("addr")));
    }

    /// The UDP path as it was before this loop: hickory-server's `Server`
    /// decoding and encoding, with the same decision in its handler.
    struct OldPath {
        zone: Arc<Zone>,
        records: Records,
        edns: Edns,
    }

    #[async_trait::async_trait]
    impl RequestHandler for OldPath {
        async fn handle_request<R: ResponseHandler, T: Time>(
            &self,
            request: &Request,
            mut response: R,
        ) -> ResponseInfo {
            let snapshot = self.records.subscribe().borrow().clone();
            let cx = Context {
                zone: &self.zone,
                records: &snapshot,
                max_request: RECV_BUF - 1,
            };
            let size = request.as_slice().len();
            let Decision::Reply(reply) = answer::respond(&cx, request, size) else {
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::Refused;
                return ResponseInfo::from(Header {
                    metadata,
                    counts: Default::default(),
                });
            };
            let message = reply.message(&request.queries, &self.edns, &self.zone, &snapshot);
            response
                .send_response(message)
                .await
                .expect("old path sends")
        }
    }

    async fn ask(server: SocketAddr, request: &[u8]) -> Message {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        sock.send_to(request, server).await.expect("send");
        let mut buf = [0u8; 65536];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("recv");
        Message::from_vec(&buf[..len]).expect("decode")
    }

    #[tokio::test]
    async fn answers_match_what_hickory_servers_udp_path_sent() {
        // The old path, on a socket of its own.
        let (zone, old_records) = zone_and_records();
        let mut old = Server::new(OldPath {
            zone,
            records: old_records,
            edns: answer::server_edns(),
        });
        let old_socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let old_addr = old_socket.local_addr().expect("addr");
        old.register_socket(old_socket);
        // The new one, with the same records set in the same order (so the
        // same SOA serial).
        let cfg = crate::DnsConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ..crate::DnsConfig::default()
        };
        let (new, records) = crate::DnsServer::start(cfg).await.expect("start");
        records.set("web", WEB).expect("set web");
        records
            .set("db", Ipv4Addr::new(10, 0, 0, 3))
            .expect("set db");

        let mut bad_version =
            Message::from_vec(&query(9, "web.vm.", RecordType::A, true)).expect("decode");
        bad_version.edns.as_mut().expect("edns").set_version(1);
        let mut prefix = query(10, "web.vm.", RecordType::A, false);
        prefix.truncate(20);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("A", query(1, "web.vm.", RecordType::A, false)),
            ("A, EDNS", query(2, "web.vm.", RecordType::A, true)),
            ("A, mixed case", query(3, "wEb.VM.", RecordType::A, false)),
            (
                "A, mixed case, EDNS",
                query(4, "WEB.vm.", RecordType::A, true),
            ),
            ("NXDOMAIN", query(5, "nope.vm.", RecordType::A, false)),
            (
                "NXDOMAIN, EDNS",
                query(6, "NoPe.Vm.", RecordType::AAAA, true),
            ),
            ("REFUSED", query(7, "example.com.", RecordType::A, false)),
            ("NODATA, EDNS", query(8, "web.vm.", RecordType::MX, true)),
            ("BADVERS", bad_version.to_vec().expect("encode")),
            ("undecodable", prefix),
            ("apex ANY", query(11, "vm.", RecordType::ANY, true)),
        ];
        for (what, request) in &cases {
            let was = ask(old_addr, request).await;
            let now = ask(new.local_addr(), request).await;
            assert_eq!(now.metadata, was.metadata, "{what}: header");
            assert_eq!(now.metadata.message_type, MessageType::Response, "{what}");
            assert_eq!(now.queries.len(), was.queries.len(), "{what}: questions");
            for (n, w) in now.queries.iter().zip(&was.queries) {
                assert!(n.name.eq_case(&w.name), "{what}: {} vs {}", n.name, w.name);
                assert_eq!(n, w, "{what}: question");
            }
            assert_eq!(now.answers, was.answers, "{what}: answers");
            for (n, w) in now.answers.iter().zip(&was.answers) {
                assert!(n.name.eq_case(&w.name), "{what}: {} vs {}", n.name, w.name);
            }
            assert_eq!(now.authorities, was.authorities, "{what}: authority");
            assert_eq!(now.additionals, was.additionals, "{what}: additional");
            assert_eq!(now.edns, was.edns, "{what}: EDNS");
        }
        // The cases cover what they say.
        let codes: Vec<ResponseCode> = {
            let mut v = Vec::new();
            for (_, request) in &cases {
                v.push(ask(new.local_addr(), request).await.metadata.response_code);
            }
            v
        };
        for code in [
            ResponseCode::NoError,
            ResponseCode::NXDomain,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            assert!(codes.contains(&code), "{code:?} in {codes:?}");
        }
        old.shutdown_gracefully().await.expect("old server stops");
        new.shutdown().await;
    }
}
