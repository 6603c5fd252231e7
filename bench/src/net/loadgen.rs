//! A light DNS load generator: one thread, open-loop, paced.
//!
//! dnsperf needs one process per source address (the server limits each
//! address), and eight of them busy on the same two cores as the server
//! measure their own queueing. This generator does the same work from one
//! thread with few system calls:
//!
//! - one non-blocking UDP socket per source address (127.0.0.2, ...),
//!   connected to the server; batches go to the sockets in turn, so each
//!   address carries `rate / sources` queries/s;
//! - the queries (every record, lower case and mixed case) are built once;
//!   each send only writes a fresh ID, distinct among the socket's
//!   outstanding queries;
//! - paced: query `k` is due at `start + k / rate`. The thread sleeps
//!   [`Config::tick`] at a time (absolute deadlines, 1 µs timer slack) and
//!   then sends everything that has come due in `sendmmsg` batches of at
//!   most [`MAX_BATCH`]: 10 queries every 200 µs at 50 000 q/s. Falling behind
//!   is caught up by the schedule (the next wake sends more), and the
//!   largest lag behind the schedule is reported;
//! - answers are read with `recvmmsg`, with the kernel's receive timestamp
//!   of each datagram (`SO_TIMESTAMPNS`): a query's latency is from just
//!   before the `sendmmsg` that carried it to the moment its answer reached
//!   the socket, so the generator sleeping between ticks adds nothing;
//! - an answer is matched by socket and ID and must be a correct answer:
//!   QR set, NOERROR, not truncated, the question echoed (case aside), an
//!   A record with the record's address. Anything else is an error;
//!   answers to queries already given up on are counted as late;
//! - queries with no answer within [`Config::timeout`] are lost;
//! - unpaced ("max") mode keeps [`Config::window`] queries outstanding and
//!   sends whenever answers free a slot: the server's capacity, with the
//!   latency of that queue.
//!
//! Everything sent during the warm-up is answered but not counted; the
//! counted queries are those due (paced) or sent (max) in the timed window,
//! and the run waits for all of them to be answered or time out.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::cpu;

/// Most queries in one `sendmmsg`, and answers in one `recvmmsg`.
const MAX_BATCH: usize = 32;
/// The largest datagram read; longer answers are errors (truncated read).
const RECV_BUF: usize = 512;
/// Room for one `SCM_TIMESTAMPNS` control message.
const CMSG_BUF: usize = 64;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: SocketAddrV4,
    /// One socket per address.
    pub sources: Vec<Ipv4Addr>,
    /// `(name, address)`: the queries ask for `<name>.vm` type A and expect
    /// this address.
    pub records: Vec<(String, Ipv4Addr)>,
    /// Queries per second in all; `None`: as fast as `window` allows.
    pub rate: Option<u32>,
    /// Queries outstanding at most in unpaced mode.
    pub window: usize,
    /// The pacing period: the thread wakes this often to send what is due.
    pub tick: Duration,
    pub warmup: Duration,
    pub duration: Duration,
    /// A query not answered within this long is lost.
    pub timeout: Duration,
    /// A process whose CPU time over the timed window is reported (the
    /// daemon).
    pub observe: Option<u32>,
}

/// The timed window's results.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub sent: u64,
    /// Correct answers.
    pub answered: u64,
    /// No answer within the timeout (or never sent: a send that failed
    /// other than by a full buffer).
    pub lost: u64,
    /// Answers that were wrong.
    pub errors: u64,
    /// Answers that came after their query was counted lost.
    pub late: u64,
    /// Answered queries per second over the timed window.
    pub qps: f64,
    /// One per correct answer.
    pub latencies: Vec<Duration>,
    /// Paced mode: how far the sends fell behind the schedule at most.
    pub max_lag: Duration,
    /// CPU time of this generator thread and of [`Config::observe`] over
    /// the timed window, and the window's length.
    pub own_cpu: Duration,
    pub observed_cpu: Option<Duration>,
    pub wall: Duration,
    pub first_error: Option<String>,
}

/// A query sent and not yet answered.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// CLOCK_REALTIME ns; 0: free.
    sent: i64,
    query: u32,
    measured: bool,
}

/// One prepared query: the wire bytes (ID zero) and what answers it.
#[derive(Debug)]
struct Query {
    wire: Vec<u8>,
    ip: Ipv4Addr,
}

/// Runs the load and returns the timed window's results.
pub fn run(cfg: &Config) -> anyhow::Result<Outcome> {
    if cfg.sources.is_empty() || cfg.records.is_empty() {
        bail!("the load generator needs at least one source and one record");
    }
    if cfg.rate == Some(0) {
        bail!("the rate must be at least 1 query/s");
    }
    let queries = build_queries(&cfg.records);
    let sockets = cfg
        .sources
        .iter()
        .map(|&src| open(src, cfg.server))
        .collect::<anyhow::Result<Vec<_>>>()?;
    set_timer_slack();
    match_daemon_priority();
    Gen::new(cfg, queries, sockets).run()
}

/// bangerd runs at nice -10 by default (`nice` in config.toml), on its
/// threads and its autogroup. A client at 0 loses the CPU to it whenever
/// both want the same core, so the generator would measure its own waits:
/// it runs at the daemon's priority instead (this thread and this
/// process's autogroup; the benchmark runs as root). Best effort.
fn match_daemon_priority() {
    const DAEMON_NICE: i32 = -10;
    // SAFETY: setpriority of the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, DAEMON_NICE);
    }
    let _ = std::fs::write("/proc/self/autogroup", DAEMON_NICE.to_string());
}

/// Every record asked for in lower case and in mixed case, alternately.
fn build_queries(records: &[(String, Ipv4Addr)]) -> Vec<Query> {
    let mut out = Vec::with_capacity(records.len() * 2);
    for (i, (name, ip)) in records.iter().enumerate() {
        let lower = format!("{}.vm", name.to_ascii_lowercase());
        let mixed: String = lower
            .chars()
            .enumerate()
            .map(|(j, c)| {
                if (i + j) % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        for qname in [lower, mixed] {
            out.push(Query {
                wire: query_wire(&qname),
                ip: *ip,
            });
        }
    }
    out
}

/// A standard query (RD set, as stub resolvers send), type A, class IN,
/// ID 0.
fn query_wire(name: &str) -> Vec<u8> {
    let mut w = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        w.push(label.len() as u8);
        w.extend_from_slice(label.as_bytes());
    }
    w.extend_from_slice(&[0, 0, 1, 0, 1]);
    w
}

fn open(src: Ipv4Addr, server: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddrV4::new(src, 0))
        .with_context(|| format!("cannot bind a UDP socket to {src}"))?;
    sock.connect(server)
        .with_context(|| format!("cannot connect a UDP socket to {server}"))?;
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    setsockopt(fd, libc::SO_TIMESTAMPNS, 1).context("SO_TIMESTAMPNS")?;
    // Room for a scheduling hiccup's worth of answers (root may exceed
    // rmem_max; if not, the default stays).
    let _ = setsockopt(fd, libc::SO_RCVBUFFORCE, 4 << 20);
    let _ = setsockopt(fd, libc::SO_SNDBUFFORCE, 1 << 20);
    Ok(sock)
}

fn setsockopt(fd: i32, opt: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&value as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sleeps of this thread end within about 1 µs of their deadline (the
/// default slack is 50 µs, half a tick).
fn set_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
}

fn clock(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// CLOCK_REALTIME, the clock of `SO_TIMESTAMPNS`, in ns.
fn now() -> i64 {
    clock(libc::CLOCK_REALTIME)
}

fn sleep_until(deadline: i64) {
    let ts = libc::timespec {
        tv_sec: deadline / 1_000_000_000,
        tv_nsec: deadline % 1_000_000_000,
    };
    // SAFETY: `ts` is a valid timespec; no remainder is asked for.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_REALTIME,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        );
    }
}

fn ns(d: Duration) -> i64 {
    d.as_nanos() as i64
}

/// Receive buffers for one `recvmmsg`, reused.
struct RecvBufs {
    data: Vec<[u8; RECV_BUF]>,
    cmsg: Vec<[u64; CMSG_BUF / 8]>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBufs {
    fn new() -> Self {
        Self {
            data: vec![[0; RECV_BUF]; MAX_BATCH],
            cmsg: vec![[0; CMSG_BUF / 8]; MAX_BATCH],
            iov: Vec::with_capacity(MAX_BATCH),
            hdrs: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Reads up to [`MAX_BATCH`] datagrams; returns how many, or
    /// `WouldBlock`.
    fn recv(&mut self, fd: i32) -> io::Result<usize> {
        self.iov.clear();
        self.hdrs.clear();
        for buf in &mut self.data {
            self.iov.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            });
        }
        for (i, c) in self.cmsg.iter_mut().enumerate() {
            // SAFETY: an all-zero mmsghdr is a valid (empty) value.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = c.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_BUF as _;
            self.hdrs.push(h);
        }
        // SAFETY: every header points at live buffers of the sizes given,
        // which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                MAX_BATCH as _,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Datagram `i` of the last `recv`: its bytes, whether it was cut, and
    /// its kernel receive time (ns, CLOCK_REALTIME).
    fn get(&self, i: usize) -> (&[u8], bool, Option<i64>) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(RECV_BUF);
        let cut = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let mut stamp = None;
        // SAFETY: the header's control buffer was filled by the kernel;
        // the CMSG_* macros walk it within `msg_controllen`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    stamp = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        (&self.data[i][..len], cut, stamp)
    }
}

/// The generator's state.
struct Gen<'a> {
    cfg: &'a Config,
    queries: Vec<Query>,
    sockets: Vec<UdpSocket>,
    /// Per socket, indexed by DNS ID.
    slots: Vec<Vec<Slot>>,
    next_id: Vec<u16>,
    /// `(socket, id, sent)` in send order, for the timeouts.
    pending: VecDeque<(u16, u16, i64)>,
    outstanding: usize,
    /// Queries sent in all (every phase); the next query is `sent_total`.
    sent_total: u64,
    next_socket: usize,
    out: Outcome,
    bufs: RecvBufs,
    send_buf: Vec<u8>,
    pollfds: Vec<libc::pollfd>,
}

impl<'a> Gen<'a> {
    fn new(cfg: &'a Config, queries: Vec<Query>, sockets: Vec<UdpSocket>) -> Self {
        let n = sockets.len();
        let pollfds = sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        Self {
            cfg,
            queries,
            slots: vec![vec![Slot::default(); 1 << 16]; n],
            // Different starting IDs per socket, so that no two sockets'
            // queries look alike.
            next_id: (0..n).map(|i| (i as u16).wrapping_mul(7919)).collect(),
            sockets,
            pending: VecDeque::new(),
            outstanding: 0,
            sent_total: 0,
            next_socket: 0,
            out: Outcome::default(),
            bufs: RecvBufs::new(),
            send_buf: Vec::new(),
            pollfds,
        }
    }

    fn run(mut self) -> anyhow::Result<Outcome> {
        let cfg = self.cfg;
        // A moment for everything above to settle.
        let start = now() + 1_000_000;
        let window_start = start + ns(cfg.warmup);
        let window_end = window_start + ns(cfg.duration);
        // Paced: which queries are due when, and which are counted.
        let rate = cfg.rate.map(i64::from);
        let due_at = |k: u64| start + (k as i64 * 1_000_000_000) / rate.unwrap_or(1);
        let (first_counted, end_k) = match rate {
            Some(r) => (
                (ns(cfg.warmup) as i128 * r as i128 / 1_000_000_000) as u64,
                ((ns(cfg.warmup) + ns(cfg.duration)) as i128 * r as i128 / 1_000_000_000) as u64,
            ),
            None => (0, u64::MAX),
        };
        sleep_until(start);
        let mut cpu_start: Option<(i64, Option<cpu::CpuTimes>)> = None;
        let mut first_counted_sent: Option<i64> = None;
        let mut last_counted_sent = 0;
        loop {
            let t = now();
            if cpu_start.is_none() && t >= window_start {
                cpu_start = Some((clock(libc::CLOCK_THREAD_CPUTIME_ID), self.observe()));
            }
            self.receive()?;
            self.expire(t);
            let sending = match rate {
                Some(_) => self.sent_total < end_k,
                None => t < window_end,
            };
            if !sending {
                if self.outstanding == 0 || self.pending.is_empty() {
                    break;
                }
                // Drain: wait for the rest or their timeouts.
                self.wait(Some(t + ns(Duration::from_millis(1))));
                continue;
            }
            // How many to send now.
            let want = match rate {
                Some(r) => {
                    let elapsed = (t - start).max(0) as i128;
                    let due = ((elapsed * r as i128 / 1_000_000_000) as u64 + 1).min(end_k);
                    let want = due.saturating_sub(self.sent_total);
                    if want > 0 && self.sent_total >= first_counted {
                        let lag = Duration::from_nanos((t - due_at(self.sent_total)).max(0) as u64);
                        self.out.max_lag = self.out.max_lag.max(lag);
                    }
                    want
                }
                None => cfg.window.saturating_sub(self.outstanding) as u64,
            };
            // At most a few batches before reading again.
            let mut left = want.min(4 * MAX_BATCH as u64);
            while left > 0 {
                let batch = left.min(MAX_BATCH as u64) as usize;
                let measured = |k: u64, sent: i64| match rate {
                    Some(_) => k >= first_counted,
                    None => sent >= window_start,
                };
                let (n, sent_at) = self.send_batch(batch, &measured)?;
                if n == 0 {
                    break;
                }
                for k in (self.sent_total - n as u64)..self.sent_total {
                    if measured(k, sent_at) {
                        first_counted_sent.get_or_insert(sent_at);
                        last_counted_sent = sent_at;
                    }
                }
                left -= n as u64;
            }
            match rate {
                Some(_) => {
                    // Next wake: a tick on, or the next query's due time
                    // if later (low rates).
                    let tick = ns(cfg.tick).max(1_000);
                    let next = due_at(self.sent_total).max(t + tick);
                    sleep_until(next.min(window_end + tick));
                }
                None => {
                    if self.outstanding >= cfg.window {
                        self.wait(Some(t + ns(Duration::from_millis(1))));
                    }
                }
            }
        }
        let (cpu0, obs0) = cpu_start.unwrap_or((clock(libc::CLOCK_THREAD_CPUTIME_ID), None));
        self.out.own_cpu =
            Duration::from_nanos((clock(libc::CLOCK_THREAD_CPUTIME_ID) - cpu0).max(0) as u64);
        if let (Some(a), Some(b)) = (obs0, self.observe()) {
            self.out.observed_cpu = Some(b.since(&a).total());
        }
        // The timed window: nominal, or the actual span of the counted
        // sends if the generator fell behind by more than one step (so lag
        // lowers the rate; a send up to one step after its due time is
        // the pacing, not a lag).
        let actual = match (first_counted_sent, rate) {
            (Some(first), Some(r)) => {
                // The span the sends took, plus one interval for the last.
                (last_counted_sent - first) + 1_000_000_000 / r.max(1) - ns(cfg.tick)
            }
            (Some(first), None) => last_counted_sent - first,
            _ => 0,
        };
        let window = ns(cfg.duration).max(actual).max(1);
        self.out.wall = Duration::from_nanos(window as u64);
        self.out.qps = self.out.answered as f64 / (window as f64 / 1e9);
        Ok(self.out)
    }

    fn observe(&self) -> Option<cpu::CpuTimes> {
        self.cfg.observe.and_then(|pid| cpu::of(pid).ok())
    }

    /// Sends up to `n` queries on the next socket in one `sendmmsg`;
    /// returns how many went out and the time taken just before.
    fn send_batch(
        &mut self,
        n: usize,
        measured: &dyn Fn(u64, i64) -> bool,
    ) -> anyhow::Result<(usize, i64)> {
        let s = self.next_socket;
        self.next_socket = (self.next_socket + 1) % self.sockets.len();
        let nq = self.queries.len() as u64;
        // Lay the batch out in one buffer, with fresh IDs.
        self.send_buf.clear();
        let mut spans = [(0usize, 0usize, 0u16, 0u32); MAX_BATCH];
        for (i, span) in spans.iter_mut().enumerate().take(n) {
            let q = ((self.sent_total + i as u64) % nq) as u32;
            let id = self.next_id[s].wrapping_add(i as u16);
            let off = self.send_buf.len();
            self.send_buf
                .extend_from_slice(&self.queries[q as usize].wire);
            self.send_buf[off..off + 2].copy_from_slice(&id.to_be_bytes());
            *span = (off, self.send_buf.len() - off, id, q);
        }
        let mut iov: [libc::iovec; MAX_BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_BATCH];
        // SAFETY: an all-zero mmsghdr is a valid (empty) value.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
        let base = self.send_buf.as_mut_ptr();
        for i in 0..n {
            // SAFETY: the span lies within `send_buf`.
            iov[i].iov_base = unsafe { base.add(spans[i].0) }.cast();
            iov[i].iov_len = spans[i].1;
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let sent_at = now();
        // SAFETY: `n` headers, each pointing at a live iovec over
        // `send_buf`; the socket is connected, so no address is needed.
        let rc = unsafe {
            libc::sendmmsg(
                self.sockets[s].as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as _,
                libc::MSG_DONTWAIT,
            )
        };
        let sent = if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR) => 0,
                // An ICMP error from an earlier datagram (nothing
                // listening): the queries are given up on.
                _ => {
                    self.out.first_error.get_or_insert(format!("send: {e}"));
                    for i in 0..n {
                        if measured(self.sent_total + i as u64, sent_at) {
                            self.out.sent += 1;
                            self.out.lost += 1;
                        }
                    }
                    self.sent_total += n as u64;
                    return Ok((n, sent_at));
                }
            }
        } else {
            rc as usize
        };
        for span in spans.iter().take(sent) {
            let (_, _, id, q) = *span;
            let k = self.sent_total;
            let is_measured = measured(k, sent_at);
            let slot = &mut self.slots[s][id as usize];
            if slot.sent != 0 {
                // The ID came round while still unanswered.
                if slot.measured {
                    self.out.lost += 1;
                }
                self.outstanding -= 1;
            }
            *slot = Slot {
                sent: sent_at,
                query: q,
                measured: is_measured,
            };
            if is_measured {
                self.out.sent += 1;
            }
            self.outstanding += 1;
            self.pending.push_back((s as u16, id, sent_at));
            self.sent_total += 1;
        }
        self.next_id[s] = self.next_id[s].wrapping_add(sent as u16);
        Ok((sent, sent_at))
    }

    /// Reads every readable socket until it is empty (one `poll` finds
    /// them, rather than a `recvmmsg` per socket).
    fn receive(&mut self) -> anyhow::Result<()> {
        // SAFETY: `pollfds` is a live array of its length.
        let ready = unsafe { libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as _, 0) };
        if ready <= 0 {
            return Ok(());
        }
        for s in 0..self.sockets.len() {
            if self.pollfds[s].revents == 0 {
                continue;
            }
            loop {
                let fd = self.sockets[s].as_raw_fd();
                let n = match self.bufs.recv(fd) {
                    Ok(n) => n,
                    Err(e) => match e.raw_os_error() {
                        Some(libc::EAGAIN) => break,
                        Some(libc::EINTR) => continue,
                        Some(libc::ECONNREFUSED) => {
                            self.out.first_error.get_or_insert(format!("receive: {e}"));
                            continue;
                        }
                        _ => return Err(e).context("recvmmsg"),
                    },
                };
                let fallback = now();
                for i in 0..n {
                    let (data, cut, stamp) = self.bufs.get(i);
                    let at = stamp.unwrap_or(fallback);
                    let verdict = check(data, cut, &self.slots[s], &self.queries);
                    match verdict {
                        Answer::Unknown => self.out.late += 1,
                        Answer::Correct(id) | Answer::Wrong(id, _) => {
                            let slot = mem::take(&mut self.slots[s][id as usize]);
                            self.outstanding -= 1;
                            if slot.measured {
                                match verdict {
                                    Answer::Correct(_) => {
                                        self.out.answered += 1;
                                        self.out.latencies.push(Duration::from_nanos(
                                            (at - slot.sent).max(0) as u64,
                                        ));
                                    }
                                    Answer::Wrong(_, why) => {
                                        self.out.errors += 1;
                                        self.out.first_error.get_or_insert(why);
                                    }
                                    Answer::Unknown => {}
                                }
                            }
                        }
                    }
                }
                if n < MAX_BATCH {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Gives up on queries older than the timeout.
    fn expire(&mut self, t: i64) {
        let limit = t - ns(self.cfg.timeout);
        while let Some(&(s, id, sent)) = self.pending.front() {
            if sent > limit {
                break;
            }
            self.pending.pop_front();
            let slot = &mut self.slots[s as usize][id as usize];
            if slot.sent == sent {
                if slot.measured {
                    self.out.lost += 1;
                }
                *slot = Slot::default();
                self.outstanding -= 1;
            }
        }
    }

    /// Waits until a socket is readable or `deadline`.
    fn wait(&mut self, deadline: Option<i64>) {
        let ts = deadline.map(|d| {
            let left = (d - now()).max(0);
            libc::timespec {
                tv_sec: left / 1_000_000_000,
                tv_nsec: left % 1_000_000_000,
            }
        });
        // SAFETY: `pollfds` is a live array of its length; `ts` lives
        // across the call.
        unsafe {
            libc::ppoll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as _,
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                std::ptr::null(),
            );
        }
    }
}

#[derive(Debug)]
enum Answer {
    Correct(u16),
    Wrong(u16, String),
    /// No query outstanding with this ID (late, or not ours).
    Unknown,
}

/// Judges one answer against the outstanding queries of its socket.
fn check(data: &[u8], cut: bool, slots: &[Slot], queries: &[Query]) -> Answer {
    if data.len() < 12 {
        return Answer::Unknown;
    }
    let id = u16::from_be_bytes([data[0], data[1]]);
    let slot = slots[id as usize];
    if slot.sent == 0 {
        return Answer::Unknown;
    }
    let q = &queries[slot.query as usize];
    match judge(data, cut, q) {
        Ok(()) => Answer::Correct(id),
        Err(why) => Answer::Wrong(id, why),
    }
}

fn judge(data: &[u8], cut: bool, q: &Query) -> Result<(), String> {
    if cut {
        return Err("answer longer than 512 bytes".into());
    }
    let flags = u16::from_be_bytes([data[2], data[3]]);
    let rcode = flags & 0xf;
    if flags & 0x8000 == 0 {
        return Err("answer without QR".into());
    }
    if flags & 0x0200 != 0 {
        return Err("answer truncated (TC)".into());
    }
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let count = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
    if count(4) != 1 || count(6) < 1 {
        return Err(format!("{} questions, {} answers", count(4), count(6)));
    }
    // The question as asked (the name's case may differ).
    let question = &q.wire[12..];
    let end = 12 + question.len();
    if data.len() < end || !data[12..end].eq_ignore_ascii_case(question) {
        return Err("question not echoed".into());
    }
    // The first answer: owner name (a pointer or labels), then
    // type, class, TTL, length, address.
    let mut at = end;
    loop {
        let Some(&len) = data.get(at) else {
            return Err("answer cut short".into());
        };
        if len & 0xc0 == 0xc0 {
            at += 2;
            break;
        }
        at += 1 + len as usize;
        if len == 0 {
            break;
        }
    }
    let Some(rr) = data.get(at..at + 14) else {
        return Err("answer cut short".into());
    };
    let (rtype, class, rdlen) = (
        u16::from_be_bytes([rr[0], rr[1]]),
        u16::from_be_bytes([rr[2], rr[3]]),
        u16::from_be_bytes([rr[8], rr[9]]),
    );
    if rtype != 1 || class != 1 || rdlen != 4 {
        return Err(format!("answer type {rtype} class {class} length {rdlen}"));
    }
    let ip = Ipv4Addr::new(rr[10], rr[11], rr[12], rr[13]);
    if ip != q.ip {
        return Err(format!("answered {ip}, expected {}", q.ip));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(q: &Query, id: u16, ip: [u8; 4]) -> Vec<u8> {
        let mut a = q.wire.clone();
        a[0..2].copy_from_slice(&id.to_be_bytes());
        a[2] = 0x85; // QR, AA, RD
        a[3] = 0x00;
        a[7] = 1; // ANCOUNT
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        a.extend_from_slice(&ip);
        a
    }

    #[test]
    fn queries_alternate_lower_and_mixed_case() {
        let qs = build_queries(&[("bench-001".into(), Ipv4Addr::new(10, 0, 0, 2))]);
        assert_eq!(qs.len(), 2);
        assert_eq!(
            &qs[0].wire[12..],
            b"\x09bench-001\x02vm\x00\x00\x01\x00\x01"
        );
        assert_eq!(
            &qs[1].wire[12..],
            b"\x09BeNcH-001\x02Vm\x00\x00\x01\x00\x01"
        );
    }

    #[test]
    fn answers_are_judged() {
        let qs = build_queries(&[("web".into(), Ipv4Addr::new(10, 0, 0, 2))]);
        let mut slots = vec![Slot::default(); 1 << 16];
        slots[7] = Slot {
            sent: 1,
            query: 1,
            measured: true,
        };
        let good = answer(&qs[1], 7, [10, 0, 0, 2]);
        assert!(matches!(
            check(&good, false, &slots, &qs),
            Answer::Correct(7)
        ));
        // Lower case back for a mixed-case question is still the question.
        let mut lower = answer(&qs[0], 7, [10, 0, 0, 2]);
        lower[2] = 0x85;
        assert!(matches!(
            check(&lower, false, &slots, &qs),
            Answer::Correct(7)
        ));
        let wrong_ip = answer(&qs[1], 7, [10, 0, 0, 3]);
        assert!(matches!(
            check(&wrong_ip, false, &slots, &qs),
            Answer::Wrong(7, _)
        ));
        let mut nx = good.clone();
        nx[3] = 3;
        assert!(matches!(
            check(&nx, false, &slots, &qs),
            Answer::Wrong(7, _)
        ));
        assert!(matches!(
            check(&good, true, &slots, &qs),
            Answer::Wrong(7, _)
        ));
        let other = answer(&qs[1], 8, [10, 0, 0, 2]);
        assert!(matches!(check(&other, false, &slots, &qs), Answer::Unknown));
        assert!(matches!(
            check(&good[..5], false, &slots, &qs),
            Answer::Unknown
        ));
        assert!(matches!(
            check(&good[..good.len() - 2], false, &slots, &qs),
            Answer::Wrong(7, _)
        ));
    }
}
