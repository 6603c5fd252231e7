//! Turns one request into messages to the actor that owns it and produces
//! the final reply (plus progress or event frames on the way).
//!
//! Every request ends with exactly one `Reply` frame: success, a domain
//! error from the owning actor, `Unavailable`/`Timeout` when that actor is
//! being restarted or stuck, or `Cancelled` when the client or a shutdown
//! cancelled it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::{
    ActorInfo, ActorStatus, DaemonStatus, ErrorData, ErrorKind, Event, Progress, Request, Response,
    ServerMessage, VersionInfo, BANGER_VERSION, FEATURES, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::RouterContext;
use crate::ask::ask;
use crate::events::EventsMsg;
use crate::names;
use crate::store::StoreClient;
use crate::supervisor::SupervisorMsg;
use crate::vms::VmsMsg;

/// One request's context: where its frames go and how it learns it is cancelled.
#[derive(Debug)]
pub struct RequestCtx {
    pub id: u64,
    pub ctx: Arc<RouterContext>,
    pub out: mpsc::Sender<ServerMessage>,
    pub cancel: CancellationToken,
    pub peer_uid: Option<u32>,
    pub started: Instant,
    /// Cancelled when the client's connection ends (as opposed to an
    /// explicit cancel of this request).
    pub connection: CancellationToken,
    /// Input the client streams to this request (exec stdin); taken once
    /// by the handler that reads it.
    pub input: std::sync::Mutex<Option<mpsc::Receiver<ClientInput>>>,
}

/// Client input for a running request.
#[derive(Debug)]
pub enum ClientInput {
    Data(Vec<u8>),
    Close,
    Resize(banger_protocol::TtySize),
}

/// A cloneable handle for streaming progress of one request, for work
/// that runs outside the request task (blocking threads).
#[derive(Debug, Clone)]
pub struct ProgressSink {
    id: u64,
    out: mpsc::Sender<ServerMessage>,
    started: Instant,
}

impl ProgressSink {
    /// Streams one progress event to the client.
    pub async fn progress(&self, stage: &str, detail: String, bytes: Option<(u64, u64)>) {
        let progress = Progress {
            stage: stage.to_string(),
            detail,
            bytes_done: bytes.map(|b| b.0),
            bytes_total: bytes.map(|b| b.1),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        };
        let _ = self
            .out
            .send(ServerMessage::Progress {
                id: self.id,
                progress,
            })
            .await;
    }
}

impl RequestCtx {
    pub fn sink(&self) -> ProgressSink {
        ProgressSink {
            id: self.id,
            out: self.out.clone(),
            started: self.started,
        }
    }

    /// Streams one progress event to the client.
    pub async fn progress(&self, stage: &str, detail: String, bytes: Option<(u64, u64)>) {
        self.sink().progress(stage, detail, bytes).await;
    }

    /// The client cancelled this request itself (not by going away).
    pub fn cancelled_explicitly(&self) -> bool {
        self.cancel.is_cancelled() && !self.connection.is_cancelled()
    }

    /// The input stream of this request (once).
    pub fn take_input(&self) -> Option<mpsc::Receiver<ClientInput>> {
        self.input.lock().ok().and_then(|mut i| i.take())
    }

    pub fn cancelled_error(&self) -> ErrorData {
        if self.ctx.shutdown.is_cancelled() {
            ErrorData::new(ErrorKind::Cancelled, "cancelled: bangerd is shutting down")
                .with_hint("run the command again once the daemon is back")
        } else {
            ErrorData::new(ErrorKind::Cancelled, "cancelled by the client")
        }
    }
}

/// Runs a request to completion and sends its final reply.
pub async fn run(request: Request, rctx: RequestCtx) {
    let op = request.name();
    let result = tokio::select! {
        biased;
        _ = rctx.cancel.cancelled() => Err(rctx.cancelled_error()),
        result = handle(request, &rctx) => result,
    };
    let elapsed_ms = rctx.started.elapsed().as_millis() as u64;
    match &result {
        Ok(_) => debug!(op, elapsed_ms, "request done"),
        Err(err) if err.kind == ErrorKind::Cancelled => debug!(op, elapsed_ms, "request cancelled"),
        Err(err) => info!(op, elapsed_ms, error = %err, kind = err.kind.as_str(), "request failed"),
    }
    let _ = rctx
        .out
        .send(ServerMessage::Reply {
            id: rctx.id,
            result,
        })
        .await;
}

async fn handle(request: Request, rctx: &RequestCtx) -> Result<Response, ErrorData> {
    let ctx = &rctx.ctx;
    let timeout = ctx.request_timeout;
    match request {
        Request::Ping => Ok(Response::Pong),
        Request::Version => Ok(Response::Version(VersionInfo {
            daemon_version: BANGER_VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION,
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
        })),
        Request::Status => status(ctx).await,
        Request::Shutdown => {
            info!("shutdown requested by a client");
            ctx.stop_requested.cancel();
            Ok(Response::ShuttingDown)
        }
        Request::ConfigShow => Ok(Response::Config(ctx.info.config.clone())),
        Request::DebugActors => debug_actors(timeout).await.map(Response::Actors),
        Request::DebugKillActor { name } => {
            require_owner(rctx)?;
            // A VM's supervisor is a child of the VM manager, the rest are
            // the root supervisor's.
            let (name, id) = if name.starts_with("vm:") {
                ask(
                    names::VMS,
                    |reply| VmsMsg::KillChild { name, reply },
                    timeout,
                )
                .await??
            } else {
                ask(
                    names::SUPERVISOR,
                    |reply| SupervisorMsg::KillChild { name, reply },
                    timeout,
                )
                .await??
            };
            Ok(Response::ActorKilled { name, id })
        }
        Request::SubscribeEvents { since } => subscribe(rctx, since).await,
        Request::Doctor => Ok(Response::Doctor(ctx.host.doctor().await)),
        Request::ImageList
        | Request::ImageShow { .. }
        | Request::ImagePull(_)
        | Request::ImageRegister(_)
        | Request::ImagePromote { .. }
        | Request::ImageDelete { .. }
        | Request::ImagePrune
        | Request::ImageBuild(_)
        | Request::ImageCatalog
        | Request::KernelList
        | Request::KernelShow { .. }
        | Request::KernelImport(_)
        | Request::KernelPull { .. }
        | Request::KernelDelete { .. }
        | Request::KernelCatalog => super::artifacts::handle(request, rctx).await,
        Request::NetworkStatus
        | Request::NetworkDown
        | Request::LeaseReserve { .. }
        | Request::LeaseRelease { .. }
        | Request::DnsAdd { .. }
        | Request::DnsRemove { .. }
        | Request::DnsSetup
        | Request::TapAcquire { .. }
        | Request::TapRelease { .. } => super::network::handle(request, rctx).await,
        Request::VmCreate(_)
        | Request::VmWatch { .. }
        | Request::VmStart { .. }
        | Request::VmStop { .. }
        | Request::VmRestart { .. }
        | Request::VmDelete { .. }
        | Request::VmList
        | Request::VmShow { .. }
        | Request::VmLogs { .. }
        | Request::VmExec(_)
        | Request::VmPorts { .. }
        | Request::VmHealth { .. } => super::vms::handle(request, rctx).await,
        Request::DebugProgress { steps, interval_ms } => {
            let interval = Duration::from_millis(interval_ms.min(60_000));
            for step in 1..=steps {
                tokio::time::sleep(interval).await;
                rctx.progress(
                    "step",
                    format!("step {step}/{steps}"),
                    Some((step.into(), steps.into())),
                )
                .await;
            }
            Ok(Response::Done)
        }
    }
}

/// How long `debug actors` waits for the VM manager's list of VM
/// supervisors; without an answer (it is restarting, or busy recovering)
/// they are left out.
const VM_CHILDREN_TIMEOUT: Duration = Duration::from_secs(2);

/// The root supervisor's children, with the VM manager's children (one
/// `vm:<name>` per VM) listed right after it.
async fn debug_actors(timeout: Duration) -> Result<Vec<ActorInfo>, ErrorData> {
    let mut list = ask(names::SUPERVISOR, SupervisorMsg::ListActors, timeout).await?;
    let vms_running = list
        .iter()
        .any(|a| a.name == names::VMS && a.status == ActorStatus::Running);
    if vms_running {
        if let Ok(children) = ask(
            names::VMS,
            VmsMsg::Children,
            VM_CHILDREN_TIMEOUT.min(timeout),
        )
        .await
        {
            let at = list
                .iter()
                .position(|a| a.name == names::VMS)
                .map_or(list.len(), |i| i + 1);
            list.splice(at..at, children);
        }
    }
    Ok(list)
}

fn require_owner(rctx: &RequestCtx) -> Result<(), ErrorData> {
    match rctx.peer_uid {
        Some(uid) if uid == rctx.ctx.owner_uid || uid == 0 => Ok(()),
        other => Err(ErrorData::new(
            ErrorKind::PermissionDenied,
            format!(
                "only the daemon's owner (uid {}) may do this; you are uid {}",
                rctx.ctx.owner_uid,
                other.map_or("unknown".to_string(), |u| u.to_string())
            ),
        )),
    }
}

async fn status(ctx: &RouterContext) -> Result<Response, ErrorData> {
    let timeout = ctx.request_timeout;
    let store = StoreClient::new(timeout).stats().await?;
    let events = ask(names::EVENTS, |reply| EventsMsg::Stats { reply }, timeout).await?;
    let info = &ctx.info;
    Ok(Response::Status(DaemonStatus {
        pid: info.pid,
        version: BANGER_VERSION.to_string(),
        uptime_ms: info.started_at.elapsed().as_millis() as u64,
        socket_path: info.socket_path.display().to_string(),
        state_dir: info.state_dir.display().to_string(),
        config_path: info.config.path.clone(),
        log_path: info.log_path.display().to_string(),
        store,
        open_connections: ctx
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed),
        events_published: events.last_seq,
    }))
}

/// Streams events until the client cancels or the daemon stops. When the
/// Events actor is restarted the channel closes; resubscribe from the last
/// sequence seen so nothing is missed.
async fn subscribe(rctx: &RequestCtx, since: Option<u64>) -> Result<Response, ErrorData> {
    let timeout = rctx.ctx.request_timeout;
    let mut last = since;
    let mut first = true;
    loop {
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        let subscribed = ask(
            names::EVENTS,
            |reply| EventsMsg::Subscribe {
                since: last,
                tx,
                reply,
            },
            timeout,
        )
        .await;
        match subscribed {
            Ok(current) => {
                first = false;
                // Without a `since`, only events after this moment are wanted,
                // also across resubscriptions.
                if last.is_none() {
                    last = Some(current);
                }
            }
            // The first subscription must succeed; later ones wait out a restart.
            Err(err) if first => return Err(err),
            Err(err) => {
                warn!(error = %err, "events unavailable; resubscribing");
                tokio::select! {
                    _ = rctx.ctx.shutdown.cancelled() => return Ok(Response::SubscriptionEnded),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        }
        loop {
            tokio::select! {
                _ = rctx.ctx.shutdown.cancelled() => return Ok(Response::SubscriptionEnded),
                event = rx.recv() => match event {
                    Some(event) => {
                        if last.is_some_and(|l| event.seq <= l) {
                            continue;
                        }
                        last = Some(event.seq);
                        if rctx.out.send(ServerMessage::Event { id: rctx.id, event }).await.is_err() {
                            return Ok(Response::SubscriptionEnded);
                        }
                    }
                    None => break,
                }
            }
        }
    }
}
