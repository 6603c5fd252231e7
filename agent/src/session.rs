//! One session of the agent protocol: what a connection (vsock, Unix) or
//! the serial port between two `Hello`s carries.
//!
//! The transport decodes frames and hands each [`HostToAgent`] to
//! [`Session::handle`]; everything the agent says goes through the
//! session's [`Outbox`] to a single writer task of that transport, so the
//! output of many processes never interleaves inside a frame. Slow work
//! (health, ports, process output) runs in tasks of its own; the reader
//! never waits for it.
//!
//! The outbox is bounded: when the host stops reading, process output
//! stops being read too and the processes block on their pipes, instead
//! of the agent buffering without end.

use crate::context::{AgentContext, PowerMode};
use crate::exec::{self, Running};
use crate::limited;
use crate::log::{HOST_INPUT, REQUESTS};
use crate::power::PowerAction;
use crate::{health, ports, AGENT_VERSION};
use banger_protocol::agent::{AgentToHost, HostToAgent, AGENT_PROTOCOL_VERSION};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How many messages may wait for the writer.
pub const OUTBOX_CAPACITY: usize = 64;

/// What the writer task of a transport receives.
#[derive(Debug)]
pub enum WriterCmd {
    Msg(AgentToHost),
    /// Answered once everything queued before it was written.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Outgoing {
    generation: u64,
    cmd: WriterCmd,
}

/// The sending side of a session's writer queue. Each message is tagged
/// with the session generation it belongs to; when a new `Hello` starts a
/// new session on the same stream (the serial port), messages still
/// queued for the old one are dropped instead of reaching the new host.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    current: Arc<AtomicU64>,
}

/// The writer task's end of an [`Outbox`].
#[derive(Debug)]
pub struct OutboxRx {
    rx: mpsc::Receiver<Outgoing>,
    current: Arc<AtomicU64>,
}

/// The outbox is gone: the transport's writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session's writer has stopped")]
pub struct WriterGone;

impl Outbox {
    pub fn channel(capacity: usize) -> (Outbox, OutboxRx) {
        let (tx, rx) = mpsc::channel(capacity);
        let current = Arc::new(AtomicU64::new(0));
        (
            Outbox {
                tx,
                current: current.clone(),
            },
            OutboxRx { rx, current },
        )
    }

    /// The generation messages sent now belong to.
    pub fn generation(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    fn next_generation(&self) -> u64 {
        self.current.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Queues `msg` as part of `generation` (waits while the queue is full).
    pub async fn send_as(&self, generation: u64, msg: AgentToHost) -> Result<(), WriterGone> {
        self.tx
            .send(Outgoing {
                generation,
                cmd: WriterCmd::Msg(msg),
            })
            .await
            .map_err(|_| WriterGone)
    }

    /// Queues `msg` for the current generation.
    pub async fn send(&self, msg: AgentToHost) -> Result<(), WriterGone> {
        self.send_as(self.generation(), msg).await
    }

    /// Waits until everything queued so far was written (or `timeout`).
    pub async fn flush(&self, timeout: Duration) {
        let (ack, done) = oneshot::channel();
        let queued = self.tx.send(Outgoing {
            generation: self.generation(),
            cmd: WriterCmd::Flush(ack),
        });
        let _ = tokio::time::timeout(timeout, async {
            if queued.await.is_ok() {
                let _ = done.await;
            }
        })
        .await;
    }
}

impl OutboxRx {
    /// The next command for the writer, skipping messages of earlier
    /// generations; `None` once every [`Outbox`] is dropped.
    pub async fn recv(&mut self) -> Option<WriterCmd> {
        loop {
            let out = self.rx.recv().await?;
            if out.generation >= self.current.load(Ordering::SeqCst) {
                return Some(out.cmd);
            }
            if let WriterCmd::Flush(ack) = out.cmd {
                let _ = ack.send(());
            }
        }
    }
}

/// The processes a session started, by request id.
pub type ProcessTable = Arc<Mutex<HashMap<u64, Running>>>;

/// One session: its `Hello` state, its outbox and its processes.
#[derive(Debug)]
pub struct Session {
    ctx: Arc<AgentContext>,
    transport: &'static str,
    /// The session id of the last `Hello`.
    hello: Option<u64>,
    out: Outbox,
    procs: ProcessTable,
}

impl Session {
    pub fn new(ctx: Arc<AgentContext>, transport: &'static str, out: Outbox) -> Self {
        Session {
            ctx,
            transport,
            hello: None,
            out,
            procs: Arc::default(),
        }
    }

    /// The session id of the last `Hello`, if any.
    pub fn hello(&self) -> Option<u64> {
        self.hello
    }

    /// Handles one request. Never fails: problems become `Failed` replies
    /// or (rate-limited) log lines.
    pub async fn handle(&mut self, msg: HostToAgent) {
        match msg {
            HostToAgent::Hello { version, session } => self.on_hello(version, session).await,
            HostToAgent::Health { id } => {
                let (out, ctx) = (self.out.clone(), self.ctx.clone());
                let generation = out.generation();
                tokio::spawn(async move {
                    let health = health::collect(&ctx).await;
                    let _ = out
                        .send_as(generation, AgentToHost::Health { id, health })
                        .await;
                });
            }
            HostToAgent::Ports { id } => {
                let out = self.out.clone();
                let generation = out.generation();
                tokio::spawn(async move {
                    let ports = tokio::task::spawn_blocking(ports::listening_ports)
                        .await
                        .unwrap_or_default();
                    let _ = out
                        .send_as(generation, AgentToHost::Ports { id, ports })
                        .await;
                });
            }
            HostToAgent::Exec { id, request } => self.on_exec(id, request).await,
            HostToAgent::Stdin { id, data } => {
                self.with_process(id, "stdin", |p| p.write_stdin(data))
            }
            HostToAgent::StdinClose { id } => {
                self.with_process(id, "stdin close", |p| p.close_stdin())
            }
            HostToAgent::Resize { id, size } => {
                self.with_process(id, "resize", |p| p.resize(size).map_err(|e| e.to_string()))
            }
            HostToAgent::Signal { id, signal } => self.with_process(id, "signal", |p| {
                p.signal(signal).map_err(|e| e.to_string())
            }),
            HostToAgent::PowerOff { id, reboot } => self.on_power_off(id, reboot).await,
        }
    }

    async fn on_hello(&mut self, version: u32, session: u64) {
        if self.hello != Some(session) {
            let killed = self.kill_all();
            if self.hello.is_some() || killed > 0 {
                // A host can send Hellos at will: rate-limited.
                limited!(
                    REQUESTS,
                    info!(
                        transport = self.transport,
                        old = ?self.hello,
                        new = session,
                        killed,
                        "new session replaces the old one"
                    )
                );
            }
            self.out.next_generation();
            self.hello = Some(session);
        }
        if version != AGENT_PROTOCOL_VERSION {
            limited!(
                HOST_INPUT,
                warn!(
                    host = version,
                    agent = AGENT_PROTOCOL_VERSION,
                    "host speaks another protocol version"
                )
            );
        }
        let _ = self
            .out
            .send(AgentToHost::Hello {
                version: AGENT_PROTOCOL_VERSION,
                session,
                agent_version: AGENT_VERSION.to_string(),
                pid1: self.ctx.pid1,
            })
            .await;
    }

    async fn on_exec(&mut self, id: u64, request: banger_protocol::agent::ExecRequest) {
        let busy = self.lock_procs().contains_key(&id);
        if busy {
            let message = format!("request id {id} already has a running process");
            let _ = self.out.send(AgentToHost::Failed { id, message }).await;
            return;
        }
        let generation = self.out.generation();
        let spawned = match exec::spawn(id, &request) {
            Ok(s) => s,
            Err(e) => {
                let message = exec::error_chain(&e);
                limited!(
                    REQUESTS,
                    warn!(id, argv = ?request.argv, "exec failed: {message}")
                );
                let _ = self.out.send(AgentToHost::Failed { id, message }).await;
                return;
            }
        };
        let (running, launcher) = spawned;
        let pid = running.pid;
        let token = running.token;
        self.lock_procs().insert(id, running);
        let _ = self
            .out
            .send_as(generation, AgentToHost::Started { id, pid })
            .await;
        let procs = self.procs.clone();
        launcher.launch(self.out.clone(), generation, move || {
            let mut table = procs.lock().unwrap_or_else(|p| p.into_inner());
            if table.get(&id).is_some_and(|r| r.token == token) {
                table.remove(&id);
            }
        });
    }

    fn with_process(&self, id: u64, what: &str, f: impl FnOnce(&Running) -> Result<(), String>) {
        let table = self.lock_procs();
        match table.get(&id) {
            Some(p) => {
                if let Err(e) = f(p) {
                    limited!(REQUESTS, warn!(id, "{what} for process failed: {e}"));
                }
            }
            // Usually a race with the process's exit; nothing to answer.
            None => limited!(
                HOST_INPUT,
                info!(id, "{what} for a request with no running process")
            ),
        }
    }

    async fn on_power_off(&mut self, id: u64, reboot: bool) {
        let action = if reboot {
            PowerAction::Reboot
        } else {
            PowerAction::PowerOff
        };
        info!(
            transport = self.transport,
            ?action,
            "power request from the host"
        );
        let _ = self.out.send(AgentToHost::Done { id }).await;
        self.out.flush(Duration::from_secs(2)).await;
        match &self.ctx.power {
            PowerMode::Fake => info!(?action, "--fake-poweroff: not acting on it"),
            PowerMode::Service => {
                tokio::spawn(crate::power::service_power(action));
            }
            PowerMode::Init(tx) => {
                let _ = tx.send(action);
            }
        }
    }

    fn lock_procs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Running>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills every process of this session (with its process group);
    /// returns how many there were.
    pub fn kill_all(&self) -> usize {
        let mut table = self.lock_procs();
        let n = table.len();
        for (_, p) in table.drain() {
            p.kill();
        }
        n
    }
}

impl Drop for Session {
    /// The host side is gone: so are the processes it started.
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_generation_drops_queued_messages() {
        let (out, mut rx) = Outbox::channel(8);
        out.send(AgentToHost::Done { id: 1 }).await.expect("send");
        let old = out.generation();
        out.next_generation();
        out.send_as(old, AgentToHost::Done { id: 2 })
            .await
            .expect("send");
        out.send(AgentToHost::Done { id: 3 }).await.expect("send");
        drop(out);
        let mut got = Vec::new();
        while let Some(cmd) = rx.recv().await {
            if let WriterCmd::Msg(AgentToHost::Done { id }) = cmd {
                got.push(id);
            }
        }
        assert_eq!(got, vec![3]);
    }

    #[tokio::test]
    async fn hello_is_answered_and_a_new_session_kills_old_processes() {
        crate::reaper::start().expect("reaper");
        let ctx = Arc::new(AgentContext {
            pid1: false,
            power: PowerMode::Fake,
        });
        let (out, mut rx) = Outbox::channel(64);
        let mut s = Session::new(ctx, "test", out);
        s.handle(HostToAgent::Hello {
            version: AGENT_PROTOCOL_VERSION,
            session: 1,
        })
        .await;
        match rx.recv().await {
            Some(WriterCmd::Msg(AgentToHost::Hello { session, pid1, .. })) => {
                assert_eq!(session, 1);
                assert!(!pid1);
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        let request = banger_protocol::agent::ExecRequest {
            argv: vec!["sleep".into(), "100".into()],
            env: vec![],
            cwd: Some("/".into()),
            tty: None,
            stdin: false,
        };
        s.handle(HostToAgent::Exec { id: 5, request }).await;
        let pid = match rx.recv().await {
            Some(WriterCmd::Msg(AgentToHost::Started { id: 5, pid })) => pid,
            other => panic!("expected Started, got {other:?}"),
        };
        // Same session again: nothing is killed.
        s.handle(HostToAgent::Hello {
            version: AGENT_PROTOCOL_VERSION,
            session: 1,
        })
        .await;
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        s.handle(HostToAgent::Hello {
            version: AGENT_PROTOCOL_VERSION,
            session: 2,
        })
        .await;
        // The old session's Exited is dropped; the new Hello arrives.
        match rx.recv().await {
            Some(WriterCmd::Msg(AgentToHost::Hello { session: 2, .. })) => {}
            other => panic!("expected Hello 2, got {other:?}"),
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while proc_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} survived the new session"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Alive and not a zombie.
    fn proc_alive(pid: u32) -> bool {
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
}
