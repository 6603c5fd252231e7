//! The host side of the guest agent connection: one I/O task per VM owns
//! the byte stream (virtio-serial socket or vsock) and multiplexes
//! requests by id; [`AgentClient`] is a cheap, cloneable handle to it.
//! Dropping the last [`AgentConn`] (held by the VM's supervisor) stops the
//! task, also when the supervisor actor is killed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use banger_protocol::agent::{
    AgentToHost, ExecRequest, GuestHealth, HostCodec, HostToAgent, ListeningPort, TtySize,
    AGENT_PROTOCOL_VERSION,
};
use banger_protocol::{ErrorData, ErrorKind};
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tracing::debug;

enum Cmd {
    /// Send `msg`; route answers carrying `id` to `replies`.
    Request {
        id: u64,
        msg: HostToAgent,
        replies: mpsc::Sender<AgentToHost>,
    },
    /// Send without expecting answers.
    Send(HostToAgent),
    Forget(u64),
}

/// A handle for talking to one VM's agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    tx: mpsc::Sender<Cmd>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Request { id, .. } => write!(f, "Request({id})"),
            Cmd::Send(m) => write!(f, "Send({m:?})"),
            Cmd::Forget(id) => write!(f, "Forget({id})"),
        }
    }
}

/// Owns the I/O task; aborts it when dropped.
#[derive(Debug)]
pub struct AgentConn {
    pub client: AgentClient,
    task: JoinHandle<()>,
}

impl Drop for AgentConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AgentConn {
    pub fn start(stream: UnixStream) -> Self {
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(io_loop(Framed::new(stream, HostCodec::default()), rx));
        Self {
            client: AgentClient {
                tx,
                next_id: Arc::new(AtomicU64::new(1)),
            },
            task,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }
}

async fn io_loop(mut framed: Framed<UnixStream, HostCodec>, mut rx: mpsc::Receiver<Cmd>) {
    let mut routes: HashMap<u64, mpsc::Sender<AgentToHost>> = HashMap::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Request { id, msg, replies }) => {
                    routes.insert(id, replies);
                    if framed.send(msg).await.is_err() {
                        return;
                    }
                }
                Some(Cmd::Send(msg)) => {
                    if framed.send(msg).await.is_err() {
                        return;
                    }
                }
                Some(Cmd::Forget(id)) => {
                    routes.remove(&id);
                }
            },
            frame = framed.next() => match frame {
                None | Some(Err(_)) => return,
                Some(Ok(msg)) => {
                    let id = reply_id(&msg);
                    let last = matches!(
                        msg,
                        AgentToHost::Exited { .. } | AgentToHost::Failed { .. }
                            | AgentToHost::Health { .. } | AgentToHost::Ports { .. }
                            | AgentToHost::Done { .. }
                    );
                    if let Some(route) = routes.get(&id) {
                        // A slow consumer applies backpressure to this VM's agent only.
                        if route.send(msg).await.is_err() || last {
                            routes.remove(&id);
                        }
                    } else {
                        debug!(id, "agent message for no pending request");
                    }
                }
            }
        }
    }
}

fn reply_id(msg: &AgentToHost) -> u64 {
    match msg {
        AgentToHost::Hello { session, .. } => *session,
        AgentToHost::Health { id, .. }
        | AgentToHost::Ports { id, .. }
        | AgentToHost::Started { id, .. }
        | AgentToHost::Output { id, .. }
        | AgentToHost::Exited { id, .. }
        | AgentToHost::Failed { id, .. }
        | AgentToHost::Done { id } => *id,
    }
}

fn gone() -> ErrorData {
    ErrorData::new(
        ErrorKind::Unavailable,
        "the connection to the guest agent is closed",
    )
    .with_hint("the VM may be shutting down; see `banger vm show`")
}

fn timeout(what: &str, after: Duration) -> ErrorData {
    ErrorData::new(
        ErrorKind::Timeout,
        format!(
            "the guest agent did not answer {what} within {}s",
            after.as_secs_f32()
        ),
    )
    .with_hint("the guest may be overloaded or hung: see `banger vm logs`")
}

/// Agent facts learnt from its hello.
#[derive(Debug, Clone)]
pub struct AgentHello {
    pub version: String,
    pub pid1: bool,
}

impl AgentClient {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn request(
        &self,
        build: impl FnOnce(u64) -> HostToAgent,
        capacity: usize,
    ) -> Result<(u64, mpsc::Receiver<AgentToHost>), ErrorData> {
        let id = self.id();
        let (tx, rx) = mpsc::channel(capacity);
        self.tx
            .send(Cmd::Request {
                id,
                msg: build(id),
                replies: tx,
            })
            .await
            .map_err(|_| gone())?;
        Ok((id, rx))
    }

    async fn one(
        &self,
        what: &str,
        build: impl FnOnce(u64) -> HostToAgent,
        after: Duration,
    ) -> Result<AgentToHost, ErrorData> {
        let (id, mut rx) = self.request(build, 1).await?;
        match tokio::time::timeout(after, rx.recv()).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(gone()),
            Err(_) => {
                let _ = self.tx.send(Cmd::Forget(id)).await;
                Err(timeout(what, after))
            }
        }
    }

    /// Starts a session; the answer proves the agent is up.
    pub async fn hello(&self, after: Duration) -> Result<AgentHello, ErrorData> {
        match self
            .one(
                "hello",
                |session| HostToAgent::Hello {
                    version: AGENT_PROTOCOL_VERSION,
                    session,
                },
                after,
            )
            .await?
        {
            AgentToHost::Hello {
                agent_version,
                pid1,
                ..
            } => Ok(AgentHello {
                version: agent_version,
                pid1,
            }),
            other => Err(unexpected(other)),
        }
    }

    pub async fn health(&self, after: Duration) -> Result<GuestHealth, ErrorData> {
        match self
            .one("health", |id| HostToAgent::Health { id }, after)
            .await?
        {
            AgentToHost::Health { health, .. } => Ok(health),
            other => Err(unexpected(other)),
        }
    }

    pub async fn ports(&self, after: Duration) -> Result<Vec<ListeningPort>, ErrorData> {
        match self
            .one("ports", |id| HostToAgent::Ports { id }, after)
            .await?
        {
            AgentToHost::Ports { ports, .. } => Ok(ports),
            other => Err(unexpected(other)),
        }
    }

    pub async fn power_off(&self, reboot: bool, after: Duration) -> Result<(), ErrorData> {
        match self
            .one(
                "power-off",
                |id| HostToAgent::PowerOff { id, reboot },
                after,
            )
            .await?
        {
            AgentToHost::Done { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Starts a process; its messages arrive on the returned stream.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecStream, ErrorData> {
        let (id, rx) = self
            .request(|id| HostToAgent::Exec { id, request }, 64)
            .await?;
        Ok(ExecStream {
            id,
            rx,
            client: self.clone(),
        })
    }

    /// Runs a command to completion, collecting its output (small outputs only).
    pub async fn run(
        &self,
        argv: &[&str],
        after: Duration,
    ) -> Result<(banger_protocol::agent::ExitStatus, Vec<u8>, Vec<u8>), ErrorData> {
        let mut exec = self
            .exec(ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: Vec::new(),
                cwd: None,
                tty: None,
                stdin: false,
            })
            .await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = tokio::time::timeout(after, async {
            loop {
                match exec.next().await {
                    None => return Err(gone()),
                    Some(AgentToHost::Output { stream, data, .. }) => match stream {
                        banger_protocol::agent::OutputStream::Stdout => out.extend(data),
                        banger_protocol::agent::OutputStream::Stderr => err.extend(data),
                    },
                    Some(AgentToHost::Exited { status, .. }) => return Ok(status),
                    Some(AgentToHost::Failed { message, .. }) => {
                        return Err(ErrorData::new(ErrorKind::InvalidRequest, message))
                    }
                    Some(_) => {}
                }
            }
        })
        .await;
        match result {
            Ok(Ok(status)) => Ok((status, out, err)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                exec.signal(libc::SIGKILL).await;
                Err(timeout(&format!("`{}`", argv.join(" ")), after))
            }
        }
    }

    async fn send(&self, msg: HostToAgent) -> bool {
        self.tx.send(Cmd::Send(msg)).await.is_ok()
    }
}

fn unexpected(msg: AgentToHost) -> ErrorData {
    match msg {
        AgentToHost::Failed { message, .. } => ErrorData::new(ErrorKind::Internal, message),
        other => ErrorData::new(
            ErrorKind::Internal,
            format!("unexpected answer from the guest agent: {other:?}"),
        ),
    }
}

/// One process started through the agent.
#[derive(Debug)]
pub struct ExecStream {
    pub id: u64,
    rx: mpsc::Receiver<AgentToHost>,
    client: AgentClient,
}

impl ExecStream {
    /// The next message about this process; `None` when the agent
    /// connection is gone.
    pub async fn next(&mut self) -> Option<AgentToHost> {
        self.rx.recv().await
    }

    pub async fn stdin(&self, data: Vec<u8>) -> bool {
        self.client
            .send(HostToAgent::Stdin { id: self.id, data })
            .await
    }

    pub async fn close_stdin(&self) -> bool {
        self.client
            .send(HostToAgent::StdinClose { id: self.id })
            .await
    }

    pub async fn resize(&self, size: TtySize) -> bool {
        self.client
            .send(HostToAgent::Resize { id: self.id, size })
            .await
    }

    pub async fn signal(&self, signal: i32) -> bool {
        self.client
            .send(HostToAgent::Signal {
                id: self.id,
                signal,
            })
            .await
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        let _ = self.client.tx.try_send(Cmd::Forget(self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::agent::GuestCodec;

    /// A scripted agent on the other end of a socket pair.
    async fn fake_agent(stream: UnixStream) {
        let mut framed = Framed::new(stream, GuestCodec::default());
        while let Some(Ok(msg)) = framed.next().await {
            let reply = match msg {
                HostToAgent::Hello { session, .. } => vec![AgentToHost::Hello {
                    version: 1,
                    session,
                    agent_version: "test".into(),
                    pid1: false,
                }],
                HostToAgent::Health { id } => vec![AgentToHost::Health {
                    id,
                    health: GuestHealth {
                        hostname: "guest".into(),
                        ..GuestHealth::default()
                    },
                }],
                HostToAgent::Exec { id, request } => vec![
                    AgentToHost::Started { id, pid: 42 },
                    AgentToHost::Output {
                        id,
                        stream: banger_protocol::agent::OutputStream::Stdout,
                        data: request.argv.join(" ").into_bytes(),
                    },
                    AgentToHost::Exited {
                        id,
                        status: banger_protocol::agent::ExitStatus::Code(3),
                    },
                ],
                _ => vec![],
            };
            for r in reply {
                framed.send(r).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn requests_are_multiplexed_and_answered() {
        let (a, b) = UnixStream::pair().unwrap();
        tokio::spawn(fake_agent(b));
        let conn = AgentConn::start(a);
        let c = conn.client.clone();
        let hello = c.hello(Duration::from_secs(2)).await.unwrap();
        assert_eq!(hello.version, "test");
        let (h, r) = tokio::join!(
            c.health(Duration::from_secs(2)),
            c.run(&["echo", "hi"], Duration::from_secs(2))
        );
        assert_eq!(h.unwrap().hostname, "guest");
        let (status, out, _) = r.unwrap();
        assert_eq!(status.shell_code(), 3);
        assert_eq!(out, b"echo hi");
    }

    #[tokio::test]
    async fn a_silent_agent_times_out_and_a_closed_one_is_unavailable() {
        let (a, b) = UnixStream::pair().unwrap();
        let conn = AgentConn::start(a);
        let err = conn
            .client
            .health(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Timeout);
        drop(b);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = conn
            .client
            .health(Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    }
}
