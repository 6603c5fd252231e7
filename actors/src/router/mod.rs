//! The Router actor: owns the daemon's listening socket. Its accept loop
//! spawns one task per connection ([`connection`]); each request on a
//! connection runs in its own task that turns it into messages to the
//! actor owning it ([`dispatch`]) and streams progress and the final reply
//! back.
//!
//! Connection tasks are tracked by the daemon's `TaskTracker`, not by this
//! actor's state, so killing and restarting the Router only restarts the
//! accept loop: established connections and their requests carry on, and
//! clients connecting meanwhile wait in the listen backlog.

mod artifacts;
pub mod connection;
pub mod dispatch;
mod network;
mod vms;

use std::future::Future;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::{ConfigDump, DoctorReport};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Host-side services the daemon binary provides to request handlers.
pub trait HostServices: Send + Sync + std::fmt::Debug {
    fn doctor(&self) -> Pin<Box<dyn Future<Output = DoctorReport> + Send>>;
    /// Whether KVM can run stock guest kernels here (probed once, then
    /// remembered), with the reason shown to users.
    fn kvm_usable(&self) -> Pin<Box<dyn Future<Output = (bool, String)> + Send>>;
}

/// Facts about the running daemon, fixed at start-up.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub pid: u32,
    pub started_at: Instant,
    pub socket_path: PathBuf,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    pub config: ConfigDump,
}

/// Everything connection tasks need; immutable apart from the counters
/// and the tokens, and shared by all incarnations of the Router.
#[derive(Debug)]
pub struct RouterContext {
    pub info: DaemonInfo,
    pub request_timeout: Duration,
    /// How long in-flight requests get to finish once shutdown starts.
    pub shutdown_grace: Duration,
    /// Cancelled when the daemon starts shutting down.
    pub shutdown: CancellationToken,
    /// Cancelled by a `Shutdown` request; the daemon's main loop watches it.
    pub stop_requested: CancellationToken,
    /// Tracks every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The uid that owns the daemon; only it may use owner-only operations.
    pub owner_uid: u32,
    pub host: Arc<dyn HostServices>,
    pub open_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub images: crate::images::ImageSettings,
    pub vms: crate::vms::record::VmSettings,
}

#[derive(Debug, Clone)]
pub struct RouterArgs {
    pub listener: Arc<StdUnixListener>,
    pub ctx: Arc<RouterContext>,
}

#[derive(Debug, Clone, Copy)]
pub struct Router;

#[derive(Debug)]
pub enum RouterMsg {}

/// Aborts the accept loop when the state is dropped, which also happens
/// when the actor is killed (when `post_stop` does not run).
#[derive(Debug)]
pub struct RouterState {
    accept_loop: JoinHandle<()>,
}

impl Drop for RouterState {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        let std_listener = args.listener.try_clone()?;
        std_listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std_listener)?;
        let accept_loop = tokio::spawn(accept_loop(listener, args.ctx));
        info!("router accepting connections");
        Ok(RouterState { accept_loop })
    }
}

async fn accept_loop(listener: UnixListener, ctx: Arc<RouterContext>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                ctx.open_connections.fetch_add(1, Ordering::Relaxed);
                let conn = ctx.total_connections.fetch_add(1, Ordering::Relaxed) + 1;
                debug!(conn, "connection accepted");
                let ctx2 = ctx.clone();
                ctx.tracker.spawn(async move {
                    connection::serve(stream, ctx2.clone(), conn).await;
                    ctx2.open_connections.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    debug!("accept loop stopped");
}
