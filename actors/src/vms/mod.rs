//! VMs: the `VmManager` actor (registered as `vms`) owns the set of VM
//! names and the create reservation window; each VM has its own
//! [`supervisor::VmSupervisor`] (registered as `vm:<name>`), a linked
//! child of the manager that respawns it when it dies.
//!
//! A create is claimed by name first (so `vm watch` can follow it and a
//! second create of the name is refused at once), resolves its image and
//! kernel outside any window, then reserves: name, guest address lease
//! and the `created` record in one short step here. The boot itself runs
//! in the VM's supervisor.
//!
//! The manager publishes which VMs use which image (a `watch` channel read
//! by the ImageRegistry's delete check) and, on start, removes what no VM
//! owns: creates a daemon crash interrupted, VMM processes, TAPs, leases
//! and DNS records of VMs that do not exist, and their directories.
//!
//! Its `pre_start` only reads the records, so the root supervisor (which
//! waits for it) is never held up; the recovery work (undoing interrupted
//! creates, the sweep, starting one supervisor per VM, each of which
//! re-adopts its running VMM) runs in `post_start`, before the first
//! request is served. When the manager itself is killed its children die
//! with it; the next incarnation does the same recovery, so running VMMs
//! are re-adopted, never booted twice. A supervisor that dies is respawned
//! from a task (the manager's mailbox keeps answering meanwhile; requests
//! for that VM get `Unavailable` until it is back).

pub mod agent;
pub mod boot;
pub mod disks;
pub mod oplog;
pub mod record;
pub mod recover;
pub mod supervisor;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::{ActorInfo, ActorStatus, ErrorData, ErrorKind, VmInfo, VmState};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ask::{ask, ask_patiently};
use crate::images::ImageUsers;
use crate::names;
use crate::network::dns::DnsMsg;
use crate::network::taps::{TapsMsg, WithLease};
use crate::store::{decode_record, encode_record, StoreClient};
use oplog::OpLog;
use record::{VmRecord, VmSettings};
use supervisor::{VmArgs, VmMsg, VmSupervisor};

/// Where the agent lives inside images.
pub const AGENT_GUEST_PATH: &str = "/usr/local/bin/banger-agent";

/// Image name -> names of the VMs using it.
pub type ImageUse = BTreeMap<String, Vec<String>>;

/// The ImageRegistry's view of which VMs use an image.
#[derive(Debug)]
pub struct VmImageUsers(pub watch::Receiver<ImageUse>);

impl ImageUsers for VmImageUsers {
    fn users(&self, image: &str) -> Vec<String> {
        self.0.borrow().get(image).cloned().unwrap_or_default()
    }
}

/// How long the manager waits for a freshly started supervisor's view.
const ASK_CHILD: Duration = Duration::from_secs(10);

pub fn registered_name(vm: &str) -> String {
    format!("vm:{vm}")
}

#[derive(Debug)]
pub enum VmsMsg {
    List(RpcReplyPort<Vec<VmInfo>>),
    Get {
        name: String,
        reply: RpcReplyPort<Result<ActorRef<VmMsg>, ErrorData>>,
    },
    /// Claims `name` for a create in progress.
    Claim {
        name: String,
        log: OpLog,
        cancel: CancellationToken,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    Unclaim {
        name: String,
    },
    /// The create in progress for `name`, if any.
    Pending {
        name: String,
        reply: RpcReplyPort<Option<(OpLog, CancellationToken)>>,
    },
    /// The reservation window: lease, record, supervisor.
    Reserve {
        record: Box<VmRecord>,
        requested_ip: Option<Ipv4Addr>,
        reply: RpcReplyPort<Result<ActorRef<VmMsg>, ErrorData>>,
    },
    /// A reservation's durable part is done (or failed): start the
    /// supervisor and answer `Reserve`'s caller.
    Reserved {
        name: String,
        result: Result<Box<VmRecord>, ErrorData>,
        reply: RpcReplyPort<Result<ActorRef<VmMsg>, ErrorData>>,
    },
    /// Forgets a torn-down VM: record, lease, supervisor. With `id`, only
    /// the VM of that id (a failed create cleans up its own VM, never a
    /// later one of the same name); a VM that is already gone is no error.
    Remove {
        name: String,
        id: Option<String>,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    /// A supervisor's latest view of its VM.
    Updated(Box<VmInfo>),
    /// A respawn task's outcome: the new supervisor (after its recovery)
    /// and its view of the VM.
    Spawned {
        name: String,
        result: Result<(ActorRef<VmMsg>, Option<Box<VmInfo>>), ErrorData>,
    },
    /// The VM supervisors, for `banger debug actors`.
    Children(RpcReplyPort<Vec<ActorInfo>>),
    /// Kills the supervisor registered as `vm:<name>` (`banger debug
    /// kill-actor`); answers its registered name and the id it had.
    KillChild {
        name: String,
        reply: RpcReplyPort<Result<(String, String), ErrorData>>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct VmManager;

#[derive(Debug, Clone)]
pub struct VmsArgs {
    pub settings: VmSettings,
    pub store_timeout: Duration,
    pub image_use: Arc<watch::Sender<ImageUse>>,
    /// When this daemon started: a never-booted VM created earlier belongs
    /// to a create that a crash interrupted.
    pub daemon_started_unix_ms: u64,
}

#[derive(Debug)]
pub struct VmsState {
    settings: VmSettings,
    store: StoreClient,
    store_timeout: Duration,
    infos: BTreeMap<String, VmInfo>,
    /// Live supervisors. A VM in `infos` but not here has its supervisor
    /// being respawned.
    actors: HashMap<String, ActorRef<VmMsg>>,
    /// Respawns in flight (a task is spawning the supervisor).
    spawning: HashSet<String>,
    /// Per VM: how often its supervisor was respawned, and since when the
    /// current one runs (for `banger debug actors`).
    lives: HashMap<String, (u32, Instant)>,
    pending: HashMap<String, (OpLog, CancellationToken)>,
    /// Names whose reservation (lease and record) is being written.
    reserving: HashSet<String>,
    /// The tasks writing them. Dropped with this state, so a killed
    /// manager's reservations stop at their next step instead of writing
    /// records its successor has not loaded.
    reservations: tokio::task::JoinSet<()>,
    image_use: Arc<watch::Sender<ImageUse>>,
    /// Records of creates a daemon crash interrupted, undone in `post_start`.
    interrupted: Vec<VmRecord>,
}

fn lease_owner(name: &str) -> String {
    format!("vm:{name}")
}

impl VmsState {
    fn publish_image_use(&self) {
        let mut map = ImageUse::new();
        for info in self.infos.values() {
            map.entry(info.image.clone())
                .or_default()
                .push(info.name.clone());
        }
        self.image_use.send_replace(map);
    }

    fn vm_args(&self, name: &str) -> VmArgs {
        VmArgs {
            name: name.to_string(),
            settings: self.settings.clone(),
            store_timeout: self.store_timeout,
            fresh: None,
        }
    }

    /// Starts the supervisor of `name`; `fresh` is the record a create has
    /// just written (see [`VmArgs::fresh`]).
    async fn spawn_vm(
        &mut self,
        myself: &ActorRef<VmsMsg>,
        name: &str,
        fresh: Option<Box<VmRecord>>,
    ) -> Result<ActorRef<VmMsg>, ErrorData> {
        let args = VmArgs {
            fresh,
            ..self.vm_args(name)
        };
        let actor = spawn_supervisor(myself, args).await?;
        self.adopt_child(name, actor.clone(), false);
        Ok(actor)
    }

    /// Records a freshly started supervisor of `name`.
    fn adopt_child(&mut self, name: &str, actor: ActorRef<VmMsg>, respawned: bool) {
        self.actors.insert(name.to_string(), actor);
        let life = self
            .lives
            .entry(name.to_string())
            .or_insert((0, Instant::now()));
        if respawned {
            life.0 += 1;
        }
        life.1 = Instant::now();
    }

    /// Starts the supervisor of `name` from a task: its recovery (which may
    /// kill a process or wait for a guest agent) never blocks this mailbox.
    /// The outcome comes back as `Spawned`.
    fn respawn(&mut self, myself: &ActorRef<VmsMsg>, name: String, delay: Duration) {
        if !self.infos.contains_key(&name)
            || self.actors.contains_key(&name)
            || !self.spawning.insert(name.clone())
        {
            return;
        }
        let args = self.vm_args(&name);
        let me = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = match spawn_supervisor(&me, args).await {
                Ok(actor) => {
                    // Its view after recovery (the record may have changed).
                    let info = crate::ask::ask_ref("vm", &actor, VmMsg::Info, ASK_CHILD)
                        .await
                        .ok()
                        .map(Box::new);
                    Ok((actor, info))
                }
                Err(e) => Err(e),
            };
            let _ = me.cast(VmsMsg::Spawned { name, result });
        });
    }

    /// `Unavailable` for a VM whose supervisor is being respawned.
    fn restarting(name: &str) -> ErrorData {
        ErrorData::new(
            ErrorKind::Unavailable,
            format!("the supervisor of VM `{name}` is restarting"),
        )
        .with_hint("it re-adopts the VM within moments; retry the command")
    }

    fn children(&self) -> Vec<ActorInfo> {
        self.infos
            .keys()
            .map(|name| {
                let (restarts, since) =
                    self.lives.get(name).copied().unwrap_or((0, Instant::now()));
                let actor = self.actors.get(name);
                ActorInfo {
                    name: registered_name(name),
                    id: actor.map(|a| a.get_id().to_string()).unwrap_or_default(),
                    status: if actor.is_some() {
                        ActorStatus::Running
                    } else {
                        ActorStatus::Restarting
                    },
                    parent: Some(names::VMS.to_string()),
                    restart_count: restarts,
                    uptime_ms: if actor.is_some() {
                        since.elapsed().as_millis() as u64
                    } else {
                        0
                    },
                }
            })
            .collect()
    }

    fn kill_child(&mut self, registered: &str) -> Result<(String, String), ErrorData> {
        let name = registered.strip_prefix("vm:").unwrap_or(registered);
        if !self.infos.contains_key(name) {
            let known: Vec<String> = self.infos.keys().map(|n| registered_name(n)).collect();
            return Err(ErrorData::new(
                ErrorKind::NotFound,
                format!("no actor named `{registered}`"),
            )
            .with_hint(if known.is_empty() {
                "there are no VMs, so no vm:<name> actors".to_string()
            } else {
                format!("VM supervisors: {}", known.join(", "))
            }));
        }
        let Some(actor) = self.actors.get(name) else {
            return Err(ErrorData::new(
                ErrorKind::InvalidState,
                format!("the {registered} actor is restarting and not running"),
            )
            .with_hint("wait for the VM manager to respawn it (see `banger debug actors`)"));
        };
        let id = actor.get_id().to_string();
        warn!(actor = %registered, %id, "killing actor on request");
        actor.kill();
        Ok((registered_name(name), id))
    }

    fn ensure_free(&self, name: &str) -> Result<(), ErrorData> {
        if self.infos.contains_key(name)
            || self.actors.contains_key(name)
            || self.reserving.contains(name)
        {
            return Err(ErrorData::new(
                ErrorKind::AlreadyExists,
                format!("name taken: a VM named `{name}` exists"),
            )
            .with_hint("pick another --name, or delete the VM first"));
        }
        if self.pending.contains_key(name) {
            return Err(ErrorData::new(
                ErrorKind::AlreadyExists,
                format!("name taken: VM `{name}` is being created"),
            )
            .with_hint(format!("follow it with `banger vm watch {name}`")));
        }
        Ok(())
    }
}

/// Spawns the supervisor of VM `args.name`, linked to the manager. The
/// name may still be registered for a moment by a supervisor that was just
/// stopped (the VM was deleted and is being made again) or killed: that is
/// waited out for up to 2 s.
async fn spawn_supervisor(
    myself: &ActorRef<VmsMsg>,
    args: VmArgs,
) -> Result<ActorRef<VmMsg>, ErrorData> {
    let name = args.name.clone();
    let mut tries = 0;
    loop {
        match Actor::spawn_linked(
            Some(registered_name(&name)),
            VmSupervisor,
            args.clone(),
            myself.get_cell(),
        )
        .await
        {
            Ok((actor, _)) => return Ok(actor),
            Err(ractor::SpawnErr::ActorAlreadyRegistered(_)) if tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(ErrorData::new(
                    ErrorKind::Internal,
                    format!("starting the supervisor of VM `{name}` failed: {e}"),
                ))
            }
        }
    }
}

async fn load_records(store: &StoreClient) -> Result<Vec<VmRecord>, ErrorData> {
    let entries = store.scan_raw(record::TREE, b"").await?;
    let mut out = Vec::new();
    for (key, value) in entries {
        match decode_record::<VmRecord>(record::TREE, &value) {
            Ok(rec) => out.push(rec),
            Err(e) => {
                warn!(key = %String::from_utf8_lossy(&key), error = %e, "skipping an unreadable VM record")
            }
        }
    }
    Ok(out)
}

/// Undoes a create that never finished: processes, TAP, DNS, files, lease, record.
async fn undo_create(rec: &VmRecord, settings: &VmSettings, store: &StoreClient) {
    info!(vm = %rec.name, "removing a VM whose create was interrupted");
    let mut r = rec.clone();
    r.state = VmState::Failed;
    recover::recover(&mut r, settings).await;
    let _ = recover::remove_files(rec, settings).await;
    undo_lease(&rec.name).await;
    forget_record(store, &rec.name).await;
}

/// Removes VM leftovers that no record owns.
async fn sweep_orphans(settings: &VmSettings, known: &[VmRecord]) {
    let owned_dirs: std::collections::HashSet<std::path::PathBuf> = known
        .iter()
        .flat_map(|r| [settings.vm_dir(&r.id), settings.vm_run_dir(&r.id)])
        .collect();
    let names: std::collections::HashSet<String> = known.iter().map(|r| r.name.clone()).collect();
    // VMM processes of unknown VMs.
    let run_root = settings.run_dir.display().to_string();
    for p in recover::processes_mentioning(&run_root) {
        let cmd = p.cmdline().unwrap_or_default();
        let owned = known
            .iter()
            .any(|r| cmd.contains(&settings.vm_run_dir(&r.id).display().to_string()));
        if !owned {
            warn!(pid = p.pid, "killing an orphaned VMM process");
            banger_vmm::process::kill_and_wait(p).await;
        }
    }
    // Directories of unknown VMs.
    for root in [&settings.vms_dir, &settings.run_dir] {
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                if !owned_dirs.contains(&e.path()) {
                    warn!(dir = %e.path().display(), "removing an orphaned VM directory");
                    let _ = recover::remove_dir(&e.path());
                }
            }
        }
    }
    // TAPs, leases and DNS records of unknown VMs (waiting out a restart of
    // the TapPool or DNS actor, as recovery does).
    let (timeout, patience) = (Duration::from_secs(10), Duration::from_secs(15));
    match ask_patiently(names::TAPS, TapsMsg::Status, timeout, patience).await {
        Ok(status) => {
            for lease in status.pool.in_use {
                if let Some(vm) = lease.owner.strip_prefix("vm:") {
                    if !names.contains(vm) {
                        recover::release_tap(vm, &lease.tap).await;
                    }
                }
            }
            for lease in status.leases {
                if let Some(vm) = lease.owner.strip_prefix("vm:") {
                    if !names.contains(vm) {
                        recover::release_lease(vm).await;
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot sweep TAPs and leases"),
    }
    match ask_patiently(names::DNS, DnsMsg::Status, timeout, patience).await {
        Ok(status) => {
            for record in status.records {
                if record.source == "vm" && !names.contains(&record.name) {
                    recover::withdraw_dns(&record.name).await;
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot sweep DNS records"),
    }
}

impl Actor for VmManager {
    type Msg = VmsMsg;
    type State = VmsState;
    type Arguments = VmsArgs;

    /// Only reads the records: the slow recovery runs in `post_start`.
    async fn pre_start(
        &self,
        _myself: ActorRef<VmsMsg>,
        args: VmsArgs,
    ) -> Result<VmsState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let records = load_records(&store).await?;
        let mut state = VmsState {
            settings: args.settings,
            store,
            store_timeout: args.store_timeout,
            infos: BTreeMap::new(),
            actors: HashMap::new(),
            spawning: HashSet::new(),
            lives: HashMap::new(),
            pending: HashMap::new(),
            reserving: HashSet::new(),
            reservations: tokio::task::JoinSet::new(),
            image_use: args.image_use,
            interrupted: Vec::new(),
        };
        for rec in records {
            // A VM that never ran, made before this daemon started, belongs
            // to a create that a crash interrupted. (Creates of this daemon
            // still have their create job, which finishes or undoes them.)
            let interrupted = !rec.ever_running
                && matches!(rec.state, VmState::Created | VmState::Starting)
                && rec.created_unix_ms < args.daemon_started_unix_ms;
            if interrupted {
                state.interrupted.push(rec);
            } else {
                state
                    .infos
                    .insert(rec.name.clone(), rec.info(&state.settings));
            }
        }
        Ok(state)
    }

    /// Recovery, before the first message is handled: undoes interrupted
    /// creates, removes what no VM owns, and starts one supervisor per VM
    /// (each re-adopts its VMM or records that it is gone).
    async fn post_start(
        &self,
        myself: ActorRef<VmsMsg>,
        state: &mut VmsState,
    ) -> Result<(), ActorProcessingErr> {
        for rec in std::mem::take(&mut state.interrupted) {
            undo_create(&rec, &state.settings, &state.store).await;
        }
        let kept: Vec<VmRecord> = load_records(&state.store)
            .await?
            .into_iter()
            .filter(|r| state.infos.contains_key(&r.name))
            .collect();
        sweep_orphans(&state.settings, &kept).await;
        let names: Vec<String> = state.infos.keys().cloned().collect();
        for name in names {
            match state.spawn_vm(&myself, &name, None).await {
                Ok(actor) => {
                    // Its view after recovery, so that `vm list` never shows
                    // the stale state of the record.
                    if let Ok(info) =
                        crate::ask::ask_ref("vm", &actor, VmMsg::Info, ASK_CHILD).await
                    {
                        state.infos.insert(name.clone(), info);
                    }
                }
                Err(e) => {
                    // E.g. the previous incarnation's supervisor still holds
                    // the name for a moment.
                    warn!(vm = %name, error = %e, "VM supervisor failed to start; retrying");
                    state.respawn(&myself, name, Duration::from_millis(200));
                }
            }
        }
        state.publish_image_use();
        info!(vms = state.infos.len(), "VM manager ready");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<VmsMsg>,
        msg: VmsMsg,
        state: &mut VmsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VmsMsg::List(reply) => {
                let _ = reply.send(state.infos.values().cloned().collect());
            }
            VmsMsg::Get { name, reply } => {
                let r = match state.actors.get(&name) {
                    Some(actor) => Ok(actor.clone()),
                    None if state.infos.contains_key(&name) => Err(VmsState::restarting(&name)),
                    None if state.pending.contains_key(&name) => Err(ErrorData::new(
                        ErrorKind::InvalidState,
                        format!("VM `{name}` is still being created"),
                    )
                    .with_hint(format!("follow it with `banger vm watch {name}`"))),
                    None => Err(ErrorData::new(
                        ErrorKind::NotFound,
                        format!("no VM named `{name}`"),
                    )
                    .with_hint("see `banger vm list`")),
                };
                let _ = reply.send(r);
            }
            VmsMsg::Claim {
                name,
                log,
                cancel,
                reply,
            } => {
                let r = state.ensure_free(&name);
                if r.is_ok() {
                    state.pending.insert(name, (log, cancel));
                }
                let _ = reply.send(r);
            }
            VmsMsg::Unclaim { name } => {
                state.pending.remove(&name);
            }
            VmsMsg::Pending { name, reply } => {
                let _ = reply.send(state.pending.get(&name).cloned());
            }
            VmsMsg::Reserve {
                record,
                requested_ip,
                reply,
            } => {
                let name = record.name.clone();
                let free = if state.infos.contains_key(&name)
                    || state.actors.contains_key(&name)
                    || state.reserving.contains(&name)
                {
                    Err(ErrorData::new(
                        ErrorKind::AlreadyExists,
                        format!("name taken: a VM named `{name}` exists"),
                    ))
                } else if !state.settings.network && requested_ip.is_some() {
                    Err(ErrorData::new(
                        ErrorKind::InvalidRequest,
                        "--ip needs guest networking, which is disabled ([network] enabled = false)",
                    ))
                } else {
                    Ok(())
                };
                if let Err(e) = free {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                // The durable part (lease, record) waits on the disk: it
                // runs beside this mailbox, so parallel creates reserve at
                // the same time and share their flushes. The name is held
                // in `reserving` until `Reserved` comes back.
                state.reserving.insert(name.clone());
                let me = myself.clone();
                let store = state.store;
                let network = state.settings.network;
                let timeout = state.store_timeout;
                state.reservations.spawn(async move {
                    let result =
                        reserve_durably(*record, requested_ip, network, &store, timeout).await;
                    let msg = VmsMsg::Reserved {
                        name,
                        result: result.map(Box::new),
                        reply,
                    };
                    if let Err(ractor::MessagingErr::SendErr(VmsMsg::Reserved {
                        name,
                        result: Ok(_),
                        ..
                    })) = me.cast(msg)
                    {
                        // The manager died meanwhile; the create's undo
                        // (it gets no answer) removes the VM by name, and
                        // the next manager loads the record to find it.
                        warn!(vm = %name, "the VM manager stopped during a reservation");
                    }
                });
            }
            VmsMsg::Reserved {
                name,
                result,
                reply,
            } => {
                state.reserving.remove(&name);
                while state.reservations.try_join_next().is_some() {}
                let r = match result {
                    Ok(rec) => {
                        state.infos.insert(name.clone(), rec.info(&state.settings));
                        state.lives.remove(&name);
                        match state.spawn_vm(&myself, &name, Some(rec)).await {
                            Ok(actor) => Ok(actor),
                            Err(e) => {
                                state.infos.remove(&name);
                                state.lives.remove(&name);
                                forget_record(&state.store, &name).await;
                                undo_reservation(&name).await;
                                Err(e)
                            }
                        }
                    }
                    Err(e) => Err(e),
                };
                state.publish_image_use();
                let _ = reply.send(r);
            }
            VmsMsg::Remove { name, id, reply } => {
                if state.reserving.contains(&name) {
                    // Answered once the reservation is; then retried.
                    let _ = reply.send(Err(ErrorData::new(
                        ErrorKind::Unavailable,
                        format!("VM `{name}` is being reserved"),
                    )
                    .with_hint("retry in a moment")));
                    return Ok(());
                }
                // Already gone (a retried remove), or another VM of that
                // name: nothing to do.
                let ours = state
                    .infos
                    .get(&name)
                    .is_some_and(|info| id.as_ref().is_none_or(|id| info.id == *id));
                if !ours {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let r = async {
                    state.store.delete(record::TREE, name.as_bytes()).await?;
                    undo_lease(&name).await;
                    Ok(())
                }
                .await;
                if r.is_ok() {
                    state.infos.remove(&name);
                    state.lives.remove(&name);
                    if let Some(actor) = state.actors.remove(&name) {
                        actor.stop(Some("deleted".into()));
                    }
                    state.publish_image_use();
                }
                let _ = reply.send(r);
            }
            VmsMsg::Updated(info) => {
                // From the VM's current supervisor, or one being respawned
                // (its recovery reports before `Spawned` arrives); never
                // from a deleted VM, nor from another VM of the same name.
                if state
                    .infos
                    .get(&info.name)
                    .is_some_and(|known| known.id == info.id)
                {
                    state.infos.insert(info.name.clone(), *info);
                    state.publish_image_use();
                }
            }
            VmsMsg::Spawned { name, result } => {
                state.spawning.remove(&name);
                match result {
                    Ok((actor, info)) if state.infos.contains_key(&name) => {
                        info!(vm = %name, id = %actor.get_id(), "VM supervisor respawned");
                        state.adopt_child(&name, actor, true);
                        if let Some(info) = info {
                            if state.infos.get(&name).is_some_and(|k| k.id == info.id) {
                                state.infos.insert(name, *info);
                            }
                        }
                        state.publish_image_use();
                    }
                    // Deleted meanwhile.
                    Ok((actor, _)) => actor.stop(Some("deleted".into())),
                    Err(e) if state.infos.contains_key(&name) => {
                        warn!(vm = %name, error = %e, "respawning the VM supervisor failed; retrying");
                        state.respawn(&myself, name, Duration::from_secs(1));
                    }
                    Err(_) => {}
                }
            }
            VmsMsg::Children(reply) => {
                let _ = reply.send(state.children());
            }
            VmsMsg::KillChild { name, reply } => {
                let _ = reply.send(state.kill_child(&name));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<VmsMsg>,
        event: SupervisionEvent,
        state: &mut VmsState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell.clone(), err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell.clone(), reason.clone().unwrap_or_default())
            }
            _ => return Ok(()),
        };
        let name = state
            .actors
            .iter()
            .find(|(_, a)| a.get_id() == cell.get_id())
            .map(|(n, _)| n.clone());
        // Not a current supervisor: a deleted VM's, or one already replaced.
        let Some(name) = name else {
            return Ok(());
        };
        state.actors.remove(&name);
        if reason == "deleted" {
            return Ok(());
        }
        warn!(vm = %name, %reason, "VM supervisor died; respawning it");
        // A moment for the registry to free the name.
        state.respawn(&myself, name, Duration::from_millis(100));
        Ok(())
    }
}

/// Deletes the record of `name`, waiting out a restart of the store (up
/// to 15 s).
/// The durable part of a reservation: the guest address's lease, then
/// the record. Whatever it wrote is undone when it fails.
async fn reserve_durably(
    mut rec: VmRecord,
    requested_ip: Option<Ipv4Addr>,
    network: bool,
    store: &StoreClient,
    timeout: Duration,
) -> Result<VmRecord, ErrorData> {
    let name = rec.name.clone();
    if !network {
        if let Err(e) = store.put(record::TREE, name.as_bytes(), &rec).await {
            // The store may have written it before it failed to answer: a
            // record nobody knows would come back as a VM with the next
            // start of this manager.
            forget_record(store, &name).await;
            return Err(e);
        }
        return Ok(rec);
    }
    // The lease, a warm TAP and the record, which holds both, in one
    // durable write: the boot then has no TAP to wait for.
    let owner = lease_owner(&name);
    let with = {
        let (rec, key) = (rec.clone(), name.as_bytes().to_vec());
        WithLease::new(move |ip, tap| {
            let rec = VmRecord {
                ip: Some(ip),
                tap: tap.map(str::to_string),
                ..rec
            };
            Ok((record::TREE.to_string(), key, encode_record(&rec)?))
        })
        .with_tap()
    };
    match ask(
        names::TAPS,
        |reply| TapsMsg::Reserve {
            owner,
            ip: requested_ip,
            with: Some(with),
            reply,
        },
        timeout,
    )
    .await
    .and_then(|r| r)
    {
        Ok(reserved) => {
            rec.ip = Some(reserved.lease.ip);
            rec.tap = reserved.tap;
            Ok(rec)
        }
        Err(e) => {
            // The answer may be lost, or the write may have been applied
            // but not flushed: neither the lease, the TAP nor the record
            // may stay.
            if e.kind != ErrorKind::AlreadyExists && e.kind != ErrorKind::InvalidRequest {
                forget_record(store, &name).await;
                undo_reservation(&name).await;
            }
            Err(e)
        }
    }
}

async fn forget_record(store: &StoreClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.delete(record::TREE, name.as_bytes()).await {
            Err(e) if e.kind == ErrorKind::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                warn!(vm = %name, error = %e, "deleting the VM record failed");
                return;
            }
            Ok(_) => return,
        }
    }
}

async fn undo_lease(name: &str) {
    recover::release_lease(name).await;
}

/// Undoes a reservation: its lease and the TAP handed out with it.
async fn undo_reservation(name: &str) {
    undo_lease(name).await;
    for tap in recover::taps_owned_by(&lease_owner(name)).await {
        recover::release_tap(name, &tap).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use banger_protocol::RestartPolicy;
    use banger_vmm::{Accel, VmmKind};

    pub fn sample_record() -> VmRecord {
        VmRecord {
            id: "aabbccddeeff0011".into(),
            name: "web".into(),
            state: VmState::Created,
            image: "img".into(),
            rootfs: "/x/rootfs.ext4".into(),
            work_seed: None,
            kernel: "k".into(),
            kernel_path: "/x/vmlinuz".into(),
            initrd_path: None,
            modules_path: None,
            vmm: VmmKind::Qemu,
            accel: Accel::Tcg,
            accel_reason: "test".into(),
            cpus: 1,
            memory_mib: 256,
            disk_bytes: 1 << 30,
            ip: Some("172.30.0.5".parse().unwrap()),
            prefix_len: 24,
            gateway: Some("172.30.0.1".parse().unwrap()),
            dns: None,
            mac: "02:aa:bb:cc:dd:ee".into(),
            tap: None,
            process: None,
            restart: RestartPolicy::OnFailure,
            restarts: 0,
            created_unix_ms: 0,
            started_unix_ms: None,
            last_error: None,
            console_tail: vec![],
            ever_running: false,
            systemd: false,
            has_sshd: false,
            has_agent: true,
        }
    }

    #[test]
    fn state_machine_rejects_invalid_transitions() {
        assert!(VmState::Created.can_transition(VmState::Starting));
        assert!(!VmState::Created.can_transition(VmState::Running));
        assert!(!VmState::Stopped.can_transition(VmState::Stopping));
        assert!(VmState::Running.can_transition(VmState::Crashed));
        assert!(VmState::Crashed.can_transition(VmState::Failed));
    }
}
