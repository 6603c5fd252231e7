//! One `VmSupervisor` actor per VM (registered as `vm:<name>`): owns the
//! VM's VMM process, its agent connection, TAP and DNS record, and its
//! state machine. Slow work (boot, stop) runs in tasks that report back
//! with messages; the mailbox always answers (`vm show` during a boot).
//!
//! When the VMM dies unexpectedly the supervisor restarts it per the VM's
//! restart policy with exponential backoff; too many crashes in the window
//! leave the VM `failed` with the reason and the last console lines. The
//! VMM handle says why it exited ([`VmmExit`]): a power-off from inside
//! the guest is a clean stop (`stopped`, restarted only under `always`);
//! a guest panic or reset, a killed VMM or a VMM failure is a crash
//! (restarted under `on-failure` and `always`). A restart whose boot fails
//! counts as another crash.
//!
//! A new incarnation (after this actor was killed, or after a daemon
//! restart) rebuilds everything from the store and the host in
//! `pre_start`: it re-adopts a VMM that is still running (pid, start time
//! and run dir must all match) instead of booting a second one, and
//! removes whatever an interrupted operation left behind.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::{ErrorData, ErrorKind, RestartPolicy, VmInfo, VmState};
use banger_vmm::{StopOutcome, VmmExit, VmmHandle};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::agent::{AgentClient, AgentConn};
use super::boot::{self, BootFact, Booted};
use super::oplog::OpLog;
use super::record::{console_tail, VmRecord, VmSettings};
use super::VmsMsg;
use crate::names;
use crate::store::StoreClient;

#[derive(Debug)]
pub enum VmMsg {
    Info(RpcReplyPort<VmInfo>),
    /// Starts the VM; the reply says whether the start was accepted, the
    /// outcome goes to `log`.
    Start {
        log: OpLog,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    Stop {
        force: bool,
        log: OpLog,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    /// The operation in progress, if any.
    CurrentOp(RpcReplyPort<Option<OpLog>>),
    /// Cancels a start in progress.
    CancelStart,
    /// A handle to the guest agent (the VM must be running).
    Agent(RpcReplyPort<Result<AgentClient, ErrorData>>),
    /// For `vm delete`: stops everything and removes the VM's files. The
    /// manager removes the record and this actor afterwards.
    Teardown(RpcReplyPort<Result<(), ErrorData>>),
    // Internal.
    Fact {
        generation: u64,
        fact: BootFact,
    },
    BootDone {
        generation: u64,
        result: Result<Booted, ErrorData>,
    },
    StopDone {
        generation: u64,
        outcome: Result<StopOutcome, ErrorData>,
    },
    VmmExited {
        generation: u64,
        exit: VmmExit,
    },
    RestartDue {
        generation: u64,
    },
    AgentConnected {
        generation: u64,
        conn: AgentConn,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct VmSupervisor;

#[derive(Debug, Clone)]
pub struct VmArgs {
    pub name: String,
    pub settings: VmSettings,
    pub store_timeout: Duration,
    /// The record a create has just written (a new id, never launched):
    /// the supervisor starts from it without reading it back, and there is
    /// nothing of it on the host to recover, so the scan of every process
    /// for its run dir is skipped.
    pub fresh: Option<Box<VmRecord>>,
}

/// Aborts a task when dropped (also when the actor is killed).
#[derive(Debug)]
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
struct Op {
    log: OpLog,
    cancel: CancellationToken,
    _task: Option<Task>,
}

impl Drop for Op {
    /// Watchers never wait forever: an operation dropped unfinished (its
    /// actor was killed) ends with an error.
    fn drop(&mut self) {
        self.log.finish(Err(ErrorData::new(
            ErrorKind::Unavailable,
            format!(
                "the {} was interrupted: the VM's supervisor restarted",
                self.log.op()
            ),
        )
        .with_hint("see `banger vm show`; run the command again")));
    }
}

#[derive(Debug)]
pub struct VmActorState {
    rec: VmRecord,
    settings: VmSettings,
    store: StoreClient,
    handle: Option<Arc<dyn VmmHandle>>,
    agent: Option<AgentConn>,
    /// Bumped by every launch, so that late messages about an earlier VMM
    /// process are ignored.
    generation: u64,
    op: Option<Op>,
    watcher: Option<Task>,
    restart_timer: Option<Task>,
    crashes: VecDeque<Instant>,
    /// The current stop was asked for (an exit is then not a crash).
    stopping: bool,
    /// The current start is a restart after a crash: its failure is
    /// another crash, not the end.
    restarting: bool,
    /// Stops asked for while booting: they end with the boot.
    stop_waiters: Vec<OpLog>,
    /// Teardown has begun: nothing is written to the store any more.
    deleted: bool,
}

/// How long a state change waits out a restart of the Store actor before
/// it is only logged (recovery reconciles the record with the VMM later).
const STORE_PATIENCE: Duration = Duration::from_secs(10);

fn invalid_state(from: VmState, op: &str, name: &str) -> ErrorData {
    ErrorData::new(
        ErrorKind::InvalidState,
        format!("cannot {op} VM `{name}`: it is {from}"),
    )
    .with_cause(format!("InvalidState{{from: {from}, op: {op}}}"))
}

impl VmActorState {
    fn info(&self) -> VmInfo {
        let mut info = self.rec.info(&self.settings);
        info.agent_ready = self.agent.as_ref().is_some_and(|a| !a.is_closed());
        info
    }

    async fn persist(&self) {
        if self.deleted {
            // The record is gone (or going): a late write must not bring it back.
            return;
        }
        if let Err(e) = self
            .store
            .put_patiently(
                super::record::TREE,
                self.rec.name.as_bytes(),
                &self.rec,
                STORE_PATIENCE,
            )
            .await
        {
            warn!(vm = %self.rec.name, error = %e, "persisting the VM record failed");
        }
        if let Ok(manager) = crate::ask::lookup::<VmsMsg>(names::VMS) {
            let _ = manager.cast(VmsMsg::Updated(Box::new(self.info())));
        }
    }

    /// Moves to `to`, enforcing the state machine.
    fn transition(&mut self, to: VmState, op: &str) -> Result<(), ErrorData> {
        if self.rec.state == to {
            return Ok(());
        }
        if !self.rec.state.can_transition(to) {
            return Err(invalid_state(self.rec.state, op, &self.rec.name));
        }
        info!(vm = %self.rec.name, from = %self.rec.state, to = %to, "VM state");
        self.rec.state = to;
        Ok(())
    }

    fn watch_exit(&mut self, myself: &ActorRef<VmMsg>, handle: Arc<dyn VmmHandle>) {
        let generation = self.generation;
        let me = myself.clone();
        self.watcher = Some(Task(tokio::spawn(async move {
            let exit = handle.wait_exit_reason().await;
            let _ = me.cast(VmMsg::VmmExited { generation, exit });
        })));
    }

    /// Starts a boot. A `restart` keeps the last crash's reason and
    /// console lines in the record (`vm show` says why it restarted).
    fn start(
        &mut self,
        myself: &ActorRef<VmMsg>,
        log: OpLog,
        restart: bool,
    ) -> Result<(), ErrorData> {
        if self.op.is_some() {
            return Err(ErrorData::new(
                ErrorKind::InvalidState,
                format!(
                    "VM `{}` is busy with a {}",
                    self.rec.name,
                    self.op.as_ref().map(|o| o.log.op()).unwrap_or_default()
                ),
            )
            .with_hint(format!(
                "follow it with `banger vm watch {}`",
                self.rec.name
            )));
        }
        self.transition(VmState::Starting, "start")?;
        self.restart_timer = None;
        self.generation += 1;
        self.stopping = false;
        self.restarting = restart;
        if !restart {
            self.rec.last_error = None;
            self.rec.console_tail.clear();
        }
        let generation = self.generation;
        let cancel = CancellationToken::new();
        let me = myself.clone();
        let report_to = myself.clone();
        let (rec, settings, log2, cancel2) = (
            self.rec.clone(),
            self.settings.clone(),
            log.clone(),
            cancel.clone(),
        );
        let task = tokio::spawn(async move {
            let result = boot::boot(rec, settings, log2, cancel2, move |fact| {
                let _ = report_to.cast(VmMsg::Fact { generation, fact });
            })
            .await;
            let _ = me.cast(VmMsg::BootDone { generation, result });
        });
        self.op = Some(Op {
            log,
            cancel,
            _task: Some(Task(task)),
        });
        Ok(())
    }

    fn stop(&mut self, myself: &ActorRef<VmMsg>, force: bool, log: OpLog) -> Result<(), ErrorData> {
        if self.stopping {
            return Err(ErrorData::new(
                ErrorKind::InvalidState,
                format!("VM `{}` is already stopping", self.rec.name),
            ));
        }
        if let Some(op) = &self.op {
            // Stopping a VM that is still booting cancels the boot.
            op.cancel.cancel();
        }
        match self.rec.state {
            VmState::Running | VmState::Starting => {}
            VmState::Crashed => {
                // Waiting for a restart: just don't.
                self.restart_timer = None;
                self.transition(VmState::Stopped, "stop")?;
                log.finish(Ok(self.info()));
                return Ok(());
            }
            other => return Err(invalid_state(other, "stop", &self.rec.name)),
        }
        if self.rec.state == VmState::Starting {
            // The boot task owns the pieces: its cancellation (above) undoes
            // them, and its BootDone completes this stop too.
            self.stopping = true;
            self.stop_waiters.push(log);
            return Ok(());
        }
        self.transition(VmState::Stopping, "stop")?;
        self.stopping = true;
        let generation = self.generation;
        let handle = self.handle.clone();
        let agent = self.agent.as_ref().map(|a| a.client.clone());
        let timeout = self.settings.stop_timeout;
        let me = myself.clone();
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            let outcome = match handle {
                None => Ok(StopOutcome::AlreadyExited),
                Some(handle) => stop_vmm(&*handle, agent, force, timeout, &log2).await,
            };
            let _ = me.cast(VmMsg::StopDone {
                generation,
                outcome,
            });
        });
        self.op = Some(Op {
            log,
            cancel: CancellationToken::new(),
            _task: Some(Task(task)),
        });
        Ok(())
    }

    /// Releases what a running VM holds on the host (TAP, DNS) and forgets
    /// the VMM; the VM is then stopped, crashed or failed.
    async fn release_runtime(&mut self) {
        self.watcher = None;
        self.agent = None;
        self.handle = None;
        self.rec.process = None;
        let tap = self.rec.tap.take();
        boot::undo_network(&self.rec.name, tap, true).await;
    }

    fn finish_op(&mut self, result: Result<(), ErrorData>) {
        let result = result.map(|()| self.info());
        if let Some(op) = self.op.take() {
            op.log.finish(result.clone());
        }
        for log in self.stop_waiters.drain(..) {
            log.finish(result.clone());
        }
    }
}

/// Clean stop: ask the agent to power off, then the VMM (ACPI / Ctrl-Alt-Del),
/// then kill.
async fn stop_vmm(
    handle: &dyn VmmHandle,
    agent: Option<AgentClient>,
    force: bool,
    timeout: Duration,
    log: &OpLog,
) -> Result<StopOutcome, ErrorData> {
    let t = Instant::now();
    if force {
        handle
            .kill()
            .await
            .map_err(|e| boot::vmm_error(&e, "killing the VMM"))?;
        log.stage_done("stop", "VMM killed", t);
        return Ok(StopOutcome::Killed);
    }
    if let Some(agent) = agent {
        if agent.power_off(false, Duration::from_secs(3)).await.is_ok() {
            log.progress("stop", "guest is powering off");
            if tokio::time::timeout(timeout, handle.wait_exit())
                .await
                .is_ok()
            {
                log.stage_done("stop", "guest powered off", t);
                return Ok(StopOutcome::Clean);
            }
        }
    }
    let outcome = handle
        .stop(timeout)
        .await
        .map_err(|e| boot::vmm_error(&e, "stopping the VMM"))?;
    log.stage_done(
        "stop",
        match outcome {
            StopOutcome::Clean => "guest powered off",
            StopOutcome::Killed => "guest did not power off in time: VMM killed",
            StopOutcome::AlreadyExited => "VMM had already exited",
        },
        t,
    );
    Ok(outcome)
}

impl Actor for VmSupervisor {
    type Msg = VmMsg;
    type State = VmActorState;
    type Arguments = VmArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<VmMsg>,
        args: VmArgs,
    ) -> Result<VmActorState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let fresh = args
            .fresh
            .filter(|r| r.state == VmState::Created && r.process.is_none());
        let is_fresh = fresh.is_some();
        let rec: VmRecord = match fresh {
            Some(rec) => *rec,
            None => store
                .get(super::record::TREE, args.name.as_bytes())
                .await
                .map_err(|e| format!("loading VM {}: {e}", args.name))?
                .ok_or_else(|| format!("VM {} has no record", args.name))?,
        };
        let mut state = VmActorState {
            rec,
            settings: args.settings,
            store,
            handle: None,
            agent: None,
            generation: 0,
            op: None,
            watcher: None,
            restart_timer: None,
            crashes: VecDeque::new(),
            stopping: false,
            deleted: false,
            restarting: false,
            stop_waiters: Vec::new(),
        };
        let stored = state.rec.clone();
        if !is_fresh {
            state.handle = super::recover::recover(&mut state.rec, &state.settings).await;
        }
        if state.rec.state == VmState::Crashed && state.rec.restart == RestartPolicy::No {
            state.rec.state = VmState::Stopped;
        }
        if let Some(handle) = state.handle.clone() {
            state.watch_exit(&myself, handle.clone());
            // Reconnect to the agent in the background.
            let me = myself.clone();
            let generation = state.generation;
            tokio::spawn(async move {
                if let Ok(stream) = handle.connect_agent().await {
                    let conn = AgentConn::start(stream);
                    if conn.client.hello(Duration::from_secs(5)).await.is_ok() {
                        let _ = me.cast(VmMsg::AgentConnected { generation, conn });
                    }
                }
            });
        }
        if state.rec.state == VmState::Crashed {
            schedule_restart(&mut state, &myself);
        }
        // Only a record that recovery changed is written back.
        if state.rec != stored {
            state.persist().await;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<VmMsg>,
        msg: VmMsg,
        state: &mut VmActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VmMsg::Info(reply) => {
                let _ = reply.send(state.info());
            }
            VmMsg::CurrentOp(reply) => {
                let _ = reply.send(state.op.as_ref().map(|o| o.log.clone()));
            }
            VmMsg::Start { log, reply } => {
                let r = state.start(&myself, log, false);
                if r.is_ok() {
                    state.rec.restarts = 0;
                    state.crashes.clear();
                    state.persist().await;
                }
                let _ = reply.send(r);
            }
            VmMsg::Stop { force, log, reply } => {
                let r = state.stop(&myself, force, log);
                if r.is_ok() {
                    state.persist().await;
                }
                let _ = reply.send(r);
            }
            VmMsg::CancelStart => {
                if let Some(op) = &state.op {
                    op.cancel.cancel();
                }
            }
            VmMsg::Agent(reply) => {
                let r = match (&state.agent, state.rec.state) {
                    (Some(conn), VmState::Running) if !conn.is_closed() => Ok(conn.client.clone()),
                    (_, VmState::Running) => Err(ErrorData::new(
                        ErrorKind::Unavailable,
                        format!("the guest agent of `{}` is not connected", state.rec.name),
                    )
                    .with_hint(if state.rec.has_agent {
                        "it reconnects within moments after a daemon restart; retry"
                    } else {
                        "this image has no banger agent (registered images do not): use `banger vm ssh`"
                    })),
                    (_, other) => Err(invalid_state(other, "exec in", &state.rec.name)),
                };
                let _ = reply.send(r);
            }
            VmMsg::Teardown(reply) => {
                // Late facts, boot results and exits of this VMM are void,
                // and no write may resurrect the record being removed.
                state.generation += 1;
                state.deleted = true;
                if let Some(op) = state.op.take() {
                    op.cancel.cancel();
                    op.log.finish(Err(ErrorData::new(
                        ErrorKind::Cancelled,
                        "the VM is being deleted",
                    )));
                }
                state.restart_timer = None;
                state.watcher = None;
                state.agent = None;
                state.stopping = true;
                let handle = state.handle.take();
                let (mut rec, settings) = (state.rec.clone(), state.settings.clone());
                tokio::spawn(async move {
                    if let Some(handle) = handle {
                        let _ = handle.kill().await;
                    }
                    // The same sweep as recovery: whatever an interrupted
                    // boot launched or took (VMM, TAP, DNS record) goes.
                    rec.state = VmState::Stopped;
                    super::recover::recover(&mut rec, &settings).await;
                    let _ = reply.send(super::recover::remove_files(&rec, &settings).await);
                });
            }
            VmMsg::Fact { generation, fact } if generation == state.generation => {
                match fact {
                    BootFact::Tap(tap) => state.rec.tap = Some(tap),
                    BootFact::Launched(process) => {
                        state.rec.process = Some(process);
                    }
                }
                state.persist().await;
            }
            VmMsg::BootDone { generation, result } if generation == state.generation => {
                // The outcome is told (the create or start answered) only
                // once the record saying so is on disk: a create that was
                // answered must survive a crash of the daemon right after.
                let done = match result {
                    Ok(booted) => {
                        if state.stopping {
                            // A stop arrived while booting: stop what just came up.
                            let _ = booted.handle.kill().await;
                            state.rec.tap = booted.tap;
                            state.release_runtime().await;
                            let _ = state.transition(VmState::Stopping, "stop");
                            let _ = state.transition(VmState::Stopped, "stop");
                            Ok(())
                        } else {
                            state.rec.process = Some(booted.handle.process());
                            state.rec.tap = booted.tap;
                            state.rec.started_unix_ms = Some(crate::unix_ms());
                            state.rec.ever_running = true;
                            state.handle = Some(booted.handle.clone());
                            state.agent = booted.agent;
                            let _ = state.transition(VmState::Running, "start");
                            state.watch_exit(&myself, booted.handle);
                            Ok(())
                        }
                    }
                    Err(err) => {
                        state.rec.process = None;
                        state.rec.tap = None;
                        state.handle = None;
                        if state.stopping || err.kind == ErrorKind::Cancelled {
                            let _ = state.transition(VmState::Stopping, "stop");
                            let _ = state.transition(VmState::Stopped, "stop");
                            if state.stopping {
                                Ok(())
                            } else {
                                Err(err)
                            }
                        } else if state.restarting {
                            // A restart that does not come up is another crash.
                            warn!(vm = %state.rec.name, error = %err, "restart failed");
                            state.rec.last_error =
                                Some(format!("restart {} failed: {err}", state.rec.restarts));
                            state.rec.console_tail =
                                console_tail(&state.settings.console_log(&state.rec.id), 20);
                            let _ = state.transition(VmState::Crashed, "crash");
                            schedule_restart(state, &myself);
                            Err(err)
                        } else {
                            state.rec.last_error = Some(err.to_string());
                            state.rec.console_tail =
                                console_tail(&state.settings.console_log(&state.rec.id), 20);
                            let _ = state.transition(VmState::Failed, "start");
                            Err(err)
                        }
                    }
                };
                state.stopping = false;
                state.restarting = false;
                state.persist().await;
                state.finish_op(done);
            }
            VmMsg::StopDone {
                generation,
                outcome,
            } if generation == state.generation => {
                state.release_runtime().await;
                let _ = state.transition(VmState::Stopped, "stop");
                state.stopping = false;
                let done = match outcome {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        state.rec.last_error = Some(e.to_string());
                        Err(e)
                    }
                };
                // As for a boot: told once the `stopped` record is on disk.
                state.persist().await;
                state.finish_op(done);
            }
            VmMsg::VmmExited { generation, exit } if generation == state.generation => {
                if state.stopping || state.rec.state == VmState::Stopping {
                    // StopDone handles it.
                    return Ok(());
                }
                if state.rec.state != VmState::Running {
                    return Ok(());
                }
                let failure = exit.is_failure();
                if failure {
                    warn!(vm = %state.rec.name, reason = %exit, status = %exit.status, "VMM exited unexpectedly");
                } else {
                    info!(vm = %state.rec.name, reason = %exit, "the guest powered off");
                }
                state.rec.console_tail =
                    console_tail(&state.settings.console_log(&state.rec.id), 20);
                state.release_runtime().await;
                let restart = restart_after(state.rec.restart, &exit);
                if !failure && !restart {
                    state.rec.last_error = None;
                    let _ = state.transition(VmState::Stopped, "power off");
                } else {
                    state.rec.last_error = Some(exit.to_string());
                    let _ = state.transition(VmState::Crashed, "crash");
                    if restart {
                        schedule_restart(state, &myself);
                    }
                }
                state.persist().await;
            }
            VmMsg::RestartDue { generation } if generation == state.generation => {
                if state.rec.state == VmState::Crashed {
                    state.rec.restarts += 1;
                    let log = OpLog::new("restart");
                    log.progress(
                        "restart",
                        format!("restart {} after a crash", state.rec.restarts),
                    );
                    if let Err(e) = state.start(&myself, log, true) {
                        warn!(vm = %state.rec.name, error = %e, "restart failed");
                    }
                    state.persist().await;
                }
            }
            VmMsg::AgentConnected { generation, conn } if generation == state.generation => {
                if state.agent.as_ref().is_none_or(|a| a.is_closed()) {
                    state.agent = Some(conn);
                }
            }
            // Stale messages about an earlier launch.
            VmMsg::Fact { .. }
            | VmMsg::BootDone { .. }
            | VmMsg::StopDone { .. }
            | VmMsg::VmmExited { .. }
            | VmMsg::RestartDue { .. }
            | VmMsg::AgentConnected { .. } => {}
        }
        Ok(())
    }
}

/// Whether `policy` restarts a VM after `exit`: `on-failure` after
/// anything but a power-off from inside the guest, `always` after anything.
fn restart_after(policy: RestartPolicy, exit: &VmmExit) -> bool {
    match policy {
        RestartPolicy::No => false,
        RestartPolicy::OnFailure => exit.is_failure(),
        RestartPolicy::Always => true,
    }
}

/// The delay before restart number `n` (1-based) within the window:
/// `initial × 2^(n-1)`, at most `max`.
fn backoff(initial: Duration, max: Duration, n: u32) -> Duration {
    initial
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(max)
}

/// Restarts a crashed VM after a backoff, or gives up (`failed`) when it
/// crashed too often within the window.
fn schedule_restart(state: &mut VmActorState, myself: &ActorRef<VmMsg>) {
    let now = Instant::now();
    let window = state.settings.restart_window;
    state.crashes.push_back(now);
    while state
        .crashes
        .front()
        .is_some_and(|t| now.duration_since(*t) > window)
    {
        state.crashes.pop_front();
    }
    if state.crashes.len() as u32 > state.settings.restart_max {
        let reason = format!(
            "crashed {} times within {}s; giving up (last: {})",
            state.crashes.len(),
            window.as_secs(),
            state.rec.last_error.clone().unwrap_or_default()
        );
        warn!(vm = %state.rec.name, %reason, "VM failed");
        state.rec.last_error = Some(reason);
        let _ = state.transition(VmState::Failed, "restart");
        return;
    }
    let n = state.crashes.len() as u32;
    let backoff = backoff(
        state.settings.restart_backoff_initial,
        state.settings.restart_backoff_max,
        n,
    );
    let generation = state.generation;
    let me = myself.clone();
    info!(vm = %state.rec.name, backoff_ms = backoff.as_millis() as u64, "restarting VM after a crash");
    state.restart_timer = Some(Task(tokio::spawn(async move {
        tokio::time::sleep(backoff).await;
        let _ = me.cast(VmMsg::RestartDue { generation });
    })));
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_vmm::process::Exit;
    use banger_vmm::ExitReason;

    fn exit(reason: ExitReason) -> VmmExit {
        VmmExit {
            reason,
            status: Exit::Code(0),
            detail: None,
        }
    }

    #[test]
    fn policies_tell_a_power_off_from_a_crash() {
        let power_off = exit(ExitReason::PowerOff);
        let crashes = [
            exit(ExitReason::GuestPanic),
            exit(ExitReason::GuestReset),
            exit(ExitReason::Killed {
                signal: Some(libc::SIGKILL),
            }),
            exit(ExitReason::Killed { signal: None }),
            exit(ExitReason::VmmError { code: Some(1) }),
            exit(ExitReason::Unknown),
        ];
        assert!(!restart_after(RestartPolicy::OnFailure, &power_off));
        assert!(!restart_after(RestartPolicy::No, &power_off));
        assert!(restart_after(RestartPolicy::Always, &power_off));
        for crash in &crashes {
            assert!(restart_after(RestartPolicy::OnFailure, crash), "{crash}");
            assert!(restart_after(RestartPolicy::Always, crash), "{crash}");
            assert!(!restart_after(RestartPolicy::No, crash), "{crash}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let ms = Duration::from_millis;
        let delays: Vec<_> = (1..=6).map(|n| backoff(ms(100), ms(1000), n)).collect();
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(backoff(ms(100), ms(1000), 0), ms(100));
        assert_eq!(backoff(ms(100), Duration::MAX, 40), ms(100) * 65536);
    }
}
