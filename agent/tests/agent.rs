//! End-to-end tests of the built `banger-agent` binary on the host: it is
//! started with `--listen-unix` (or `--serial-device` on a PTY) in a temp
//! dir, and each test speaks the agent protocol to it exactly as bangerd
//! does, with `HostCodec` over `Framed`.

use banger_agent::fdio::FdStream;
use banger_protocol::agent::{
    AgentToHost, ExecRequest, ExitStatus, HostCodec, HostToAgent, OutputStream, TtySize,
    AGENT_PROTOCOL_VERSION,
};
use futures::{SinkExt, StreamExt};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

const STEP: Duration = Duration::from_secs(5);

/// A running agent, killed (and its log shown on failure) on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_banger-agent"));
        if extra.is_empty() {
            cmd.arg("--listen-unix").arg(&sock);
        }
        let child = cmd
            .args(extra)
            .args(["--fake-poweroff", "--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start banger-agent");
        let agent = Agent { child, dir, sock };
        if extra.is_empty() {
            let deadline = Instant::now() + STEP;
            while !agent.sock.exists() {
                assert!(
                    Instant::now() < deadline,
                    "agent socket never appeared:\n{}",
                    agent.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    async fn connect(&self) -> Conn {
        let stream = UnixStream::connect(&self.sock).await.expect("connect");
        Conn {
            framed: Framed::new(stream, HostCodec::default()),
            pending: Vec::new(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM lets the agent kill what it started for us.
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// One host-side connection, with messages set aside while waiting for
/// a specific one.
struct Conn<S = UnixStream> {
    framed: Framed<S, HostCodec>,
    pending: Vec<AgentToHost>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Conn<S> {
    async fn send(&mut self, msg: HostToAgent) {
        self.framed.send(msg).await.expect("send");
    }

    async fn next(&mut self) -> AgentToHost {
        if !self.pending.is_empty() {
            return self.pending.remove(0);
        }
        match tokio::time::timeout(STEP, self.framed.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(other) => panic!("connection ended: {other:?}"),
            Err(_) => panic!("no message from the agent within {STEP:?}"),
        }
    }

    /// The next message matching `pred`; others are kept for later.
    async fn next_where(&mut self, pred: impl Fn(&AgentToHost) -> bool) -> AgentToHost {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i);
        }
        loop {
            let msg = match tokio::time::timeout(STEP, self.framed.next()).await {
                Ok(Some(Ok(msg))) => msg,
                Ok(other) => panic!("connection ended: {other:?}"),
                Err(_) => panic!(
                    "no matching message within {STEP:?}; kept {:?}",
                    self.pending
                ),
            };
            if pred(&msg) {
                return msg;
            }
            self.pending.push(msg);
        }
    }

    async fn hello(&mut self, session: u64) -> AgentToHost {
        self.send(HostToAgent::Hello {
            version: AGENT_PROTOCOL_VERSION,
            session,
        })
        .await;
        self.next_where(|m| matches!(m, AgentToHost::Hello { session: s, .. } if *s == session))
            .await
    }

    /// Starts `request` as `id` and returns the pid from `Started`.
    async fn start(&mut self, id: u64, request: ExecRequest) -> u32 {
        self.send(HostToAgent::Exec { id, request }).await;
        match self.next_where(|m| for_id(m, id)).await {
            AgentToHost::Started { pid, .. } => pid,
            other => panic!("expected Started for {id}, got {other:?}"),
        }
    }

    /// Collects output of `id` until `Exited`.
    async fn finish(&mut self, id: u64) -> Finished {
        let mut f = Finished::default();
        loop {
            match self.next_where(|m| for_id(m, id)).await {
                AgentToHost::Output { stream, data, .. } => match stream {
                    OutputStream::Stdout => f.stdout.extend(data),
                    OutputStream::Stderr => f.stderr.extend(data),
                },
                AgentToHost::Exited { status, .. } => {
                    f.status = Some(status);
                    return f;
                }
                other => panic!("unexpected message for {id}: {other:?}"),
            }
        }
    }

    /// Reads output of `id` until it contains `needle`.
    async fn output_until(&mut self, id: u64, needle: &str) -> String {
        let mut text = String::new();
        while !text.contains(needle) {
            match self.next_where(|m| for_id(m, id)).await {
                AgentToHost::Output { data, .. } => text.push_str(&String::from_utf8_lossy(&data)),
                other => panic!("waiting for {needle:?} in {text:?}, got {other:?}"),
            }
        }
        text
    }
}

fn for_id(m: &AgentToHost, want: u64) -> bool {
    match m {
        AgentToHost::Started { id, .. }
        | AgentToHost::Output { id, .. }
        | AgentToHost::Exited { id, .. }
        | AgentToHost::Failed { id, .. }
        | AgentToHost::Done { id } => *id == want,
        _ => false,
    }
}

#[derive(Debug, Default)]
struct Finished {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        tty: None,
        stdin: false,
    }
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

async fn wait_dead(pid: u32) {
    let deadline = Instant::now() + STEP;
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hello_health_and_ports() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    match c.hello(41).await {
        AgentToHost::Hello {
            version,
            session,
            agent_version,
            pid1,
        } => {
            assert_eq!(version, AGENT_PROTOCOL_VERSION);
            assert_eq!(session, 41);
            assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
            assert!(!pid1);
        }
        other => panic!("{other:?}"),
    }

    c.send(HostToAgent::Health { id: 1 }).await;
    let health = match c.next().await {
        AgentToHost::Health { id: 1, health } => health,
        other => panic!("expected Health, got {other:?}"),
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(health.hostname, hostname.trim());
    assert!(health.uptime_ms > 0);
    assert!(health.mem_total_kib > 0);
    assert!(!health.pid1);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    c.send(HostToAgent::Ports { id: 2 }).await;
    let ports = match c.next().await {
        AgentToHost::Ports { id: 2, ports } => ports,
        other => panic!("expected Ports, got {other:?}"),
    };
    let mine = ports
        .iter()
        .find(|p| p.port == port && p.proto == "tcp")
        .unwrap_or_else(|| panic!("port {port} missing from {ports:?}"));
    assert_eq!(mine.address, "127.0.0.1");
    assert_eq!(mine.pid, Some(std::process::id()));
    drop(listener);
}

#[tokio::test]
async fn exec_streams_output_then_exit_code() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    let pid = c
        .start(7, exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await;
    assert!(pid > 0);
    let f = c.finish(7).await;
    assert_eq!(String::from_utf8_lossy(&f.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&f.stderr), "err\n");
    assert_eq!(f.status, Some(ExitStatus::Code(3)));
    // Nothing of request 7 follows its Exited.
    c.send(HostToAgent::Health { id: 8 }).await;
    c.next_where(|m| matches!(m, AgentToHost::Health { id: 8, .. }))
        .await;
    assert!(c.pending.iter().all(|m| !for_id(m, 7)), "{:?}", c.pending);
}

#[tokio::test]
async fn exec_environment_and_cwd() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    let mut req = exec(&["sh", "-c", "echo $HOME:$TERM:$FOO:$(pwd)"]);
    req.env = vec![("FOO".into(), "bar".into())];
    req.cwd = Some("/tmp".into());
    c.start(1, req).await;
    let f = c.finish(1).await;
    assert_eq!(String::from_utf8_lossy(&f.stdout), "/root:xterm:bar:/tmp\n");
    assert_eq!(f.status, Some(ExitStatus::Code(0)));
}

#[tokio::test]
async fn exec_stdin_round_trip() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    let mut req = exec(&["cat"]);
    req.stdin = true;
    c.start(3, req).await;
    c.send(HostToAgent::Stdin {
        id: 3,
        data: b"hello\n".to_vec(),
    })
    .await;
    assert_eq!(c.output_until(3, "hello\n").await, "hello\n");
    c.send(HostToAgent::Stdin {
        id: 3,
        data: vec![0, 1, 2, 255],
    })
    .await;
    c.send(HostToAgent::StdinClose { id: 3 }).await;
    let f = c.finish(3).await;
    assert_eq!(f.stdout, vec![0, 1, 2, 255]);
    assert_eq!(f.status, Some(ExitStatus::Code(0)));
}

#[tokio::test]
async fn exec_on_a_tty_and_resize() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    let mut req = exec(&["sh", "-c", "tty; stty size; read line; stty size"]);
    req.tty = Some(TtySize { rows: 24, cols: 80 });
    req.stdin = true;
    c.start(4, req).await;
    let text = c.output_until(4, "24 80").await;
    assert!(text.contains("/dev/pts/"), "{text:?}");
    c.send(HostToAgent::Resize {
        id: 4,
        size: TtySize {
            rows: 40,
            cols: 100,
        },
    })
    .await;
    c.send(HostToAgent::Stdin {
        id: 4,
        data: b"\n".to_vec(),
    })
    .await;
    let f = c.finish(4).await;
    let rest = String::from_utf8_lossy(&f.stdout);
    assert!(rest.contains("40 100"), "{rest:?}");
    // On a terminal everything arrives as stdout.
    assert!(f.stderr.is_empty());
    assert_eq!(f.status, Some(ExitStatus::Code(0)));
}

#[tokio::test]
async fn signal_stops_a_process() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    let pid = c.start(5, exec(&["sleep", "100"])).await;
    assert!(alive(pid));
    c.send(HostToAgent::Signal { id: 5, signal: 15 }).await;
    let f = c.finish(5).await;
    assert!(
        matches!(f.status, Some(ExitStatus::Signal(15 | 9))),
        "{:?}",
        f.status
    );
    assert!(!alive(pid));
}

#[tokio::test]
async fn missing_program_fails_clearly() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    c.send(HostToAgent::Exec {
        id: 6,
        request: exec(&["banger-no-such-program", "x"]),
    })
    .await;
    match c.next().await {
        AgentToHost::Failed { id: 6, message } => {
            assert!(message.contains("banger-no-such-program"), "{message}");
            assert!(message.contains("not found"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    c.send(HostToAgent::Exec {
        id: 7,
        request: exec(&[]),
    })
    .await;
    match c.next().await {
        AgentToHost::Failed { id: 7, message } => assert!(message.contains("empty"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_before_a_frame_is_survived() {
    let agent = Agent::start();
    let mut raw = UnixStream::connect(&agent.sock).await.expect("connect");
    // A torn frame, an undecodable frame (variant 200), line noise.
    raw.write_all(&[0x13, 0x37, 0xff, 0xfe, 0])
        .await
        .expect("write");
    raw.write_all(&[0x02, 200, 0]).await.expect("write");
    raw.write_all(&[0, 0, 0]).await.expect("write");
    let mut c = Conn {
        framed: Framed::new(raw, HostCodec::default()),
        pending: Vec::new(),
    };
    match c.hello(9).await {
        AgentToHost::Hello { session: 9, .. } => {}
        other => panic!("{other:?}"),
    }
    c.send(HostToAgent::Health { id: 1 }).await;
    assert!(matches!(c.next().await, AgentToHost::Health { id: 1, .. }));
}

#[tokio::test]
async fn two_sessions_at_once() {
    let agent = Agent::start();
    let mut a = agent.connect().await;
    let mut b = agent.connect().await;
    a.hello(100).await;
    b.hello(200).await;
    let mut req = exec(&["sh", "-c", "read x; echo A$x"]);
    req.stdin = true;
    let pid_a = a.start(1, req).await;
    // B's Hello and B's work leave A's process alone.
    b.start(1, exec(&["echo", "B"])).await;
    let fb = b.finish(1).await;
    assert_eq!(fb.stdout, b"B\n");
    assert!(alive(pid_a));
    a.send(HostToAgent::Stdin {
        id: 1,
        data: b"ok\n".to_vec(),
    })
    .await;
    let fa = a.finish(1).await;
    assert_eq!(fa.stdout, b"Aok\n");
    assert_eq!(fa.status, Some(ExitStatus::Code(0)));
}

#[tokio::test]
async fn closing_the_connection_kills_its_processes() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    let pid = c.start(1, exec(&["sleep", "100"])).await;
    assert!(alive(pid));
    drop(c);
    wait_dead(pid).await;
    // The agent still serves new connections.
    let mut c = agent.connect().await;
    c.hello(2).await;
}

#[tokio::test]
async fn power_off_is_acknowledged() {
    // --fake-poweroff: the agent answers and only logs.
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.hello(1).await;
    c.send(HostToAgent::PowerOff {
        id: 77,
        reboot: false,
    })
    .await;
    assert_eq!(c.next().await, AgentToHost::Done { id: 77 });
    // And keeps running.
    c.send(HostToAgent::Health { id: 78 }).await;
    assert!(matches!(c.next().await, AgentToHost::Health { id: 78, .. }));
}

/// Opens a PTY pair for the test; returns the master and the slave path.
fn open_pty() -> (OwnedFd, PathBuf) {
    // SAFETY: plain libc PTY calls; the fd is owned by the returned value.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        (OwnedFd::from_raw_fd(m), PathBuf::from(path))
    }
}

#[tokio::test]
async fn serial_transport_on_a_pty() {
    let (master, slave) = open_pty();
    let slave_str = slave.to_string_lossy().into_owned();
    let agent = Agent::start_with(&["--serial-device", &slave_str]);
    let stream = FdStream::new(master).expect("master");
    let mut c = Conn {
        framed: Framed::new(stream, HostCodec::default()),
        pending: Vec::new(),
    };
    // The agent opens the device asynchronously: retry Hello until answered.
    let deadline = Instant::now() + STEP;
    loop {
        c.send(HostToAgent::Hello {
            version: AGENT_PROTOCOL_VERSION,
            session: 1,
        })
        .await;
        let got = tokio::time::timeout(Duration::from_millis(300), c.framed.next()).await;
        if let Ok(Some(Ok(AgentToHost::Hello { session: 1, .. }))) = got {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Hello over the serial PTY:\n{}",
            agent.log()
        );
    }
    let pid = c.start(1, exec(&["sleep", "100"])).await;
    c.start(2, exec(&["printf", "a\\0b"])).await;
    let f = c.finish(2).await;
    // Binary output survives the raw-mode PTY untouched.
    assert_eq!(f.stdout, b"a\0b");
    // A new host (another session id) replaces the old one: its process dies.
    match c.hello(2).await {
        AgentToHost::Hello { session: 2, .. } => {}
        other => panic!("{other:?}"),
    }
    wait_dead(pid).await;
    assert!(Path::new(&slave).exists());
}
