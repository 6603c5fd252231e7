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

pub mod agent;
pub mod boot;
pub mod disks;
pub mod oplog;
pub mod record;
pub mod recover;
pub mod supervisor;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use banger_protocol::{ErrorData, ErrorKind, VmInfo, VmState};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ask::ask;
use crate::images::ImageUsers;
use crate::names;
use crate::network::dns::DnsMsg;
use crate::network::taps::TapsMsg;
use crate::store::{decode_record, StoreClient};
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
    /// Forgets a torn-down VM: record, lease, supervisor.
    Remove {
        name: String,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    /// A supervisor's latest view of its VM.
    Updated(Box<VmInfo>),
    Respawn {
        name: String,
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
    actors: HashMap<String, ActorRef<VmMsg>>,
    pending: HashMap<String, (OpLog, CancellationToken)>,
    image_use: Arc<watch::Sender<ImageUse>>,
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

    async fn spawn_vm(
        &mut self,
        myself: &ActorRef<VmsMsg>,
        name: &str,
    ) -> Result<ActorRef<VmMsg>, ErrorData> {
        let (actor, _) = Actor::spawn_linked(
            Some(registered_name(name)),
            VmSupervisor,
            VmArgs {
                name: name.to_string(),
                settings: self.settings.clone(),
                store_timeout: self.store_timeout,
            },
            myself.get_cell(),
        )
        .await
        .map_err(|e| {
            ErrorData::new(
                ErrorKind::Internal,
                format!("starting the supervisor of VM `{name}` failed: {e}"),
            )
        })?;
        self.actors.insert(name.to_string(), actor.clone());
        Ok(actor)
    }

    fn ensure_free(&self, name: &str) -> Result<(), ErrorData> {
        if self.infos.contains_key(name) || self.actors.contains_key(name) {
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
    let owner = lease_owner(&rec.name);
    let _ = ask(
        names::TAPS,
        |reply| TapsMsg::Unreserve { owner, reply },
        Duration::from_secs(10),
    )
    .await;
    let _ = store.delete(record::TREE, rec.name.as_bytes()).await;
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
    let timeout = Duration::from_secs(10);
    if let Ok(status) = ask(names::TAPS, TapsMsg::Status, timeout).await {
        for lease in status.pool.in_use {
            if let Some(vm) = lease.owner.strip_prefix("vm:") {
                if !names.contains(vm) {
                    let tap = lease.tap;
                    let _ = ask(
                        names::TAPS,
                        |reply| TapsMsg::Release { tap, reply },
                        timeout,
                    )
                    .await;
                }
            }
        }
        for lease in status.leases {
            if let Some(vm) = lease.owner.strip_prefix("vm:") {
                if !names.contains(vm) {
                    let owner = lease.owner.clone();
                    let _ = ask(
                        names::TAPS,
                        |reply| TapsMsg::Unreserve { owner, reply },
                        timeout,
                    )
                    .await;
                }
            }
        }
    }
    if let Ok(status) = ask(names::DNS, DnsMsg::Status, timeout).await {
        for record in status.records {
            if record.source == "vm" && !names.contains(&record.name) {
                let name = record.name;
                let _ = ask(names::DNS, |reply| DnsMsg::Remove { name, reply }, timeout).await;
            }
        }
    }
}

impl Actor for VmManager {
    type Msg = VmsMsg;
    type State = VmsState;
    type Arguments = VmsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<VmsMsg>,
        args: VmsArgs,
    ) -> Result<VmsState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let mut records = load_records(&store).await?;
        let mut kept = Vec::new();
        for rec in records.drain(..) {
            let interrupted = !rec.ever_running
                && matches!(rec.state, VmState::Created | VmState::Starting)
                && rec.created_unix_ms < args.daemon_started_unix_ms;
            if interrupted {
                undo_create(&rec, &args.settings, &store).await;
            } else {
                kept.push(rec);
            }
        }
        sweep_orphans(&args.settings, &kept).await;
        let mut state = VmsState {
            settings: args.settings,
            store,
            store_timeout: args.store_timeout,
            infos: BTreeMap::new(),
            actors: HashMap::new(),
            pending: HashMap::new(),
            image_use: args.image_use,
        };
        for rec in &kept {
            state
                .infos
                .insert(rec.name.clone(), rec.info(&state.settings));
            if let Err(e) = state.spawn_vm(&myself, &rec.name).await {
                warn!(vm = %rec.name, error = %e, "VM supervisor failed to start");
            }
        }
        state.publish_image_use();
        info!(vms = kept.len(), "VM manager ready");
        Ok(state)
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
                let r = state.actors.get(&name).cloned().ok_or_else(|| {
                    if state.pending.contains_key(&name) {
                        ErrorData::new(
                            ErrorKind::InvalidState,
                            format!("VM `{name}` is still being created"),
                        )
                        .with_hint(format!("follow it with `banger vm watch {name}`"))
                    } else {
                        ErrorData::new(ErrorKind::NotFound, format!("no VM named `{name}`"))
                            .with_hint("see `banger vm list`")
                    }
                });
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
                let mut rec = *record;
                let name = rec.name.clone();
                let r = async {
                    if state.infos.contains_key(&name) || state.actors.contains_key(&name) {
                        return Err(ErrorData::new(ErrorKind::AlreadyExists, format!("name taken: a VM named `{name}` exists")));
                    }
                    if state.settings.network {
                        let owner = lease_owner(&name);
                        let lease = ask(
                            names::TAPS,
                            |reply| TapsMsg::Reserve { owner, ip: requested_ip, reply },
                            state.store_timeout,
                        )
                        .await??;
                        rec.ip = Some(lease.ip);
                    } else if requested_ip.is_some() {
                        return Err(ErrorData::new(ErrorKind::InvalidRequest, "--ip needs guest networking, which is disabled ([network] enabled = false)"));
                    }
                    if let Err(e) = state.store.put(record::TREE, name.as_bytes(), &rec).await {
                        undo_lease(&name).await;
                        return Err(e);
                    }
                    state.infos.insert(name.clone(), rec.info(&state.settings));
                    match state.spawn_vm(&myself, &name).await {
                        Ok(actor) => Ok(actor),
                        Err(e) => {
                            state.infos.remove(&name);
                            let _ = state.store.delete(record::TREE, name.as_bytes()).await;
                            undo_lease(&name).await;
                            Err(e)
                        }
                    }
                }
                .await;
                state.publish_image_use();
                let _ = reply.send(r);
            }
            VmsMsg::Remove { name, reply } => {
                let r = async {
                    state.store.delete(record::TREE, name.as_bytes()).await?;
                    undo_lease(&name).await;
                    Ok(())
                }
                .await;
                if r.is_ok() {
                    state.infos.remove(&name);
                    if let Some(actor) = state.actors.remove(&name) {
                        actor.stop(Some("deleted".into()));
                    }
                    state.publish_image_use();
                }
                let _ = reply.send(r);
            }
            VmsMsg::Updated(info) => {
                if state.actors.contains_key(&info.name) {
                    state.infos.insert(info.name.clone(), *info);
                    state.publish_image_use();
                }
            }
            VmsMsg::Respawn { name } => {
                // Still a VM (not deleted meanwhile)?
                if state.infos.contains_key(&name) {
                    state.actors.remove(&name);
                    if let Err(e) = state.spawn_vm(&myself, &name).await {
                        warn!(vm = %name, error = %e, "respawning the VM supervisor failed; retrying");
                        let me = myself.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = me.cast(VmsMsg::Respawn { name });
                        });
                    }
                }
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
        if let Some(name) = name {
            if reason == "deleted" {
                return Ok(());
            }
            warn!(vm = %name, %reason, "VM supervisor died; respawning it");
            // A moment for the registry to free the name.
            let me = myself.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = me.cast(VmsMsg::Respawn { name });
            });
        }
        Ok(())
    }
}

async fn undo_lease(name: &str) {
    let owner = lease_owner(name);
    let _ = ask(
        names::TAPS,
        |reply| TapsMsg::Unreserve { owner, reply },
        Duration::from_secs(10),
    )
    .await;
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
