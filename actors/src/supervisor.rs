//! The root supervisor: spawns the subsystem actors linked to itself and
//! restarts any that fails or is killed, with exponential backoff and a
//! restart-intensity limit.
//!
//! Restart intensity follows OTP: if one child needs more than
//! `max_restarts` restarts within `window`, restarting is not helping; the
//! supervisor gives up on it, logs that it escalates, and cancels the
//! escalation token it was given, on which the daemon shuts down with a
//! distinct exit code (a service manager or the next CLI command starts a
//! fresh daemon).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::{ActorInfo, ActorStatus, ErrorData, ErrorKind, EventKind};
use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{events, names};

type SpawnFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;

/// How to (re)spawn one child, linked to the given supervisor.
#[derive(Clone)]
pub struct ChildSpec {
    pub name: &'static str,
    spawn: Arc<dyn Fn(ActorCell) -> SpawnFuture + Send + Sync>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .finish()
    }
}

impl ChildSpec {
    /// A child registered as `name`, spawned from a fresh copy of `actor`
    /// and `args` each time.
    pub fn new<A>(name: &'static str, actor: A, args: A::Arguments) -> Self
    where
        A: Actor + Clone,
        A::Arguments: Clone + Sync,
    {
        let spawn = move |supervisor: ActorCell| -> SpawnFuture {
            let actor = actor.clone();
            let args = args.clone();
            Box::pin(async move {
                let (actor_ref, _) =
                    Actor::spawn_linked(Some(name.to_string()), actor, args, supervisor).await?;
                Ok(actor_ref.get_cell())
            })
        };
        Self {
            name,
            spawn: Arc::new(spawn),
        }
    }
}

/// Backoff and restart intensity.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// Delay before the `n`-th restart within the window (n ≥ 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

#[derive(Debug)]
pub struct SupervisorArgs {
    pub children: Vec<ChildSpec>,
    pub policy: RestartPolicy,
    /// Cancelled when a child exceeds the restart intensity.
    pub escalation: CancellationToken,
}

#[derive(Debug)]
pub enum SupervisorMsg {
    ListActors(RpcReplyPort<Vec<ActorInfo>>),
    /// Kills a child by name; answers its name and the id it had.
    KillChild {
        name: String,
        reply: RpcReplyPort<Result<(String, String), ErrorData>>,
    },
    /// Timer: the backoff of a child ended. `generation` guards against stale timers.
    Restart {
        index: usize,
        generation: u64,
    },
    /// Stops every child, last spawned first (graceful shutdown).
    StopChildren(RpcReplyPort<()>),
}

#[derive(Debug, Clone, Copy)]
pub struct Supervisor;

#[derive(Debug)]
struct Child {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    status: ActorStatus,
    started_at: Instant,
    restart_count: u32,
    recent_restarts: VecDeque<Instant>,
    generation: u64,
}

#[derive(Debug)]
pub struct SupervisorState {
    children: Vec<Child>,
    policy: RestartPolicy,
    escalation: CancellationToken,
    started_at: Instant,
    stopping: bool,
    /// Events that could not be published while the Events actor was down.
    pending_events: VecDeque<EventKind>,
}

impl SupervisorState {
    fn emit(&mut self, kind: EventKind) {
        if !self.pending_events.is_empty() || !events::publish(kind.clone()) {
            if self.pending_events.len() >= 256 {
                self.pending_events.pop_front();
            }
            self.pending_events.push_back(kind);
            self.flush_events();
        }
    }

    fn flush_events(&mut self) {
        while let Some(kind) = self.pending_events.front() {
            if !events::publish(kind.clone()) {
                break;
            }
            self.pending_events.pop_front();
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut children = Vec::with_capacity(args.children.len());
        for spec in args.children {
            let cell = (spec.spawn)(myself.get_cell())
                .await
                .map_err(|e| format!("starting the {} actor failed: {e}", spec.name))?;
            info!(actor = spec.name, id = %cell.get_id(), "actor started");
            children.push(Child {
                spec,
                cell: Some(cell),
                status: ActorStatus::Running,
                started_at: Instant::now(),
                restart_count: 0,
                recent_restarts: VecDeque::new(),
                generation: 0,
            });
        }
        let mut state = SupervisorState {
            children,
            policy: args.policy,
            escalation: args.escalation,
            started_at: Instant::now(),
            stopping: false,
            pending_events: VecDeque::new(),
        };
        for child in 0..state.children.len() {
            let name = state.children[child].spec.name.to_string();
            state.emit(EventKind::ActorStarted { name });
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::ListActors(reply) => {
                let _ = reply.send(list(&myself, state));
            }
            SupervisorMsg::KillChild { name, reply } => {
                let _ = reply.send(kill_child(state, &name));
            }
            SupervisorMsg::Restart { index, generation } => {
                let child = &state.children[index];
                if state.stopping || child.generation != generation || child.cell.is_some() {
                    return Ok(());
                }
                let spawned = (child.spec.spawn)(myself.get_cell()).await;
                let child = &mut state.children[index];
                match spawned {
                    Ok(cell) => {
                        child.restart_count += 1;
                        child.status = ActorStatus::Running;
                        child.started_at = Instant::now();
                        info!(actor = child.spec.name, id = %cell.get_id(), restart_count = child.restart_count, "actor restarted");
                        child.cell = Some(cell);
                        let kind = EventKind::ActorRestarted {
                            name: child.spec.name.to_string(),
                            restart_count: child.restart_count,
                        };
                        state.emit(kind);
                    }
                    Err(err) => {
                        warn!(actor = child.spec.name, error = %err, "restarting actor failed");
                        child_down(&myself, state, index, format!("restart failed: {err}"));
                    }
                }
            }
            SupervisorMsg::StopChildren(reply) => {
                state.stopping = true;
                for child in state.children.iter_mut().rev() {
                    if let Some(cell) = child.cell.take() {
                        if let Err(err) = cell
                            .stop_and_wait(
                                Some("daemon shutdown".into()),
                                Some(Duration::from_secs(10)),
                            )
                            .await
                        {
                            warn!(actor = child.spec.name, error = %err, "actor did not stop in time; killing it");
                            cell.kill();
                        }
                    }
                    child.status = ActorStatus::Stopped;
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            _ => return Ok(()),
        };
        let Some(index) = state.children.iter().position(|c| {
            c.cell
                .as_ref()
                .is_some_and(|own| own.get_id() == cell.get_id())
        }) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        state.children[index].cell = None;
        warn!(actor = state.children[index].spec.name, %reason, "actor exited");
        child_down(&myself, state, index, reason);
        Ok(())
    }
}

/// A child is down (exited, killed, or failed to restart): schedule its
/// restart after a backoff, or escalate when it restarts too often.
fn child_down(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    index: usize,
    reason: String,
) {
    let policy = state.policy;
    let now = Instant::now();
    let child = &mut state.children[index];
    let name = child.spec.name.to_string();
    child.cell = None;
    child.generation += 1;
    while child
        .recent_restarts
        .front()
        .is_some_and(|t| now.duration_since(*t) > policy.window)
    {
        child.recent_restarts.pop_front();
    }
    child.recent_restarts.push_back(now);
    let restarts = child.recent_restarts.len() as u32;
    if restarts > policy.max_restarts {
        child.status = ActorStatus::Escalated;
        error!(
            actor = %name,
            restarts,
            window_secs = policy.window.as_secs(),
            "restart intensity exceeded: the {name} actor needed more than {} restarts in {}s; escalating, bangerd stops",
            policy.max_restarts,
            policy.window.as_secs()
        );
        state.emit(EventKind::RestartIntensityExceeded {
            name,
            restarts,
            window_ms: policy.window.as_millis() as u64,
        });
        state.escalation.cancel();
        return;
    }
    child.status = ActorStatus::Restarting;
    let delay = policy.backoff(restarts);
    let generation = child.generation;
    info!(actor = %name, delay_ms = delay.as_millis() as u64, "restarting actor after backoff");
    state.emit(EventKind::ActorFailed { name, reason });
    myself.send_after(delay, move || SupervisorMsg::Restart { index, generation });
}

fn list(myself: &ActorRef<SupervisorMsg>, state: &SupervisorState) -> Vec<ActorInfo> {
    let mut out = vec![ActorInfo {
        name: names::SUPERVISOR.to_string(),
        id: myself.get_id().to_string(),
        status: if state.stopping {
            ActorStatus::Stopped
        } else {
            ActorStatus::Running
        },
        parent: None,
        restart_count: 0,
        uptime_ms: state.started_at.elapsed().as_millis() as u64,
    }];
    out.extend(state.children.iter().map(|c| {
        ActorInfo {
            name: c.spec.name.to_string(),
            id: c
                .cell
                .as_ref()
                .map(|cell| cell.get_id().to_string())
                .unwrap_or_default(),
            status: c.status,
            parent: Some(names::SUPERVISOR.to_string()),
            restart_count: c.restart_count,
            uptime_ms: if c.cell.is_some() {
                c.started_at.elapsed().as_millis() as u64
            } else {
                0
            },
        }
    }));
    out
}

fn kill_child(state: &SupervisorState, name: &str) -> Result<(String, String), ErrorData> {
    if name == names::SUPERVISOR {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            "the root supervisor cannot be killed through the API",
        )
        .with_hint("use `banger daemon stop` to stop the daemon"));
    }
    let Some(child) = state.children.iter().find(|c| c.spec.name == name) else {
        let known: Vec<_> = state.children.iter().map(|c| c.spec.name).collect();
        return Err(
            ErrorData::new(ErrorKind::NotFound, format!("no actor named `{name}`")).with_hint(
                format!(
                    "actors that can be killed: {}, and vm:<name> for a VM's supervisor",
                    known.join(", ")
                ),
            ),
        );
    };
    let Some(cell) = &child.cell else {
        return Err(ErrorData::new(
            ErrorKind::InvalidState,
            format!(
                "the {name} actor is {} and not running",
                child.status.as_str()
            ),
        )
        .with_hint("wait for its supervisor to restart it (see `banger debug actors`)"));
    };
    let id = cell.get_id().to_string();
    warn!(actor = name, %id, "killing actor on request");
    cell.kill();
    Ok((name.to_string(), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_millis(1000));
        assert_eq!(p.backoff(60), Duration::from_millis(1000));
    }
}
