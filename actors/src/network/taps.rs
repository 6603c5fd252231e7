//! The TapPool actor: the bridge, a warm pool of TAP devices on it, NAT
//! for the guest subnet, and guest address leases.
//!
//! State that must survive a crash is in the store: leases (tree
//! `leases`) and which TAP is handed to which owner (tree `taps`). On
//! start — daemon start or a restart of this actor — it reconciles the host
//! with that: the bridge and the nft table are brought to the expected
//! state, TAPs handed out are adopted, idle banger TAPs on the bridge are
//! adopted into the pool and any other banger TAP is deleted.
//!
//! Netlink work is quick (about a millisecond) but still awaited outside
//! the mailbox where it can be: refills run in a task that reports back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use banger_net::ipam::Pool;
use banger_net::{Host, NatRules, NetConfig};
use banger_protocol::{BridgeStatus, ErrorData, ErrorKind, Lease, NatStatus, PoolStatus, TapLease};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::store::{decode_record, encode_record, StoreClient, TreePut};
use crate::unix_ms;

pub const LEASES: &str = "leases";
pub const TAPS: &str = "taps";

/// Network settings from the daemon's config.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// False: nothing is created on the host; requests that need the
    /// network fail with a clear error.
    pub enabled: bool,
    pub net: NetConfig,
    /// Warm TAPs kept ready.
    pub pool_size: u32,
}

/// A TAP handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub tap: String,
    /// False when the pool was empty and the TAP was created on demand.
    pub from_pool: bool,
}

/// A record written in the same atomic, durable step as a new lease,
/// made from the lease's address and the TAP handed out with it (see
/// [`WithLease::with_tap`]): the VmManager's `created` record, which holds
/// both. A crash then leaves all or none, and a create waits for one flush
/// instead of one per step.
pub struct WithLease {
    make: Box<dyn FnOnce(Ipv4Addr, Option<&str>) -> Result<TreePut, ErrorData> + Send>,
    tap: bool,
}

impl WithLease {
    pub fn new(
        make: impl FnOnce(Ipv4Addr, Option<&str>) -> Result<TreePut, ErrorData> + Send + 'static,
    ) -> Self {
        Self {
            make: Box::new(make),
            tap: false,
        }
    }

    /// Also hands a warm TAP to the lease's owner, in the same write, when
    /// the pool has one (none otherwise: the boot takes one then).
    pub fn with_tap(mut self) -> Self {
        self.tap = true;
        self
    }
}

/// What a reservation got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub lease: Lease,
    /// The warm TAP handed out with it (see [`WithLease::with_tap`]).
    pub tap: Option<String>,
}

impl std::fmt::Debug for WithLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WithLease(..)")
    }
}

#[derive(Debug)]
pub enum TapsMsg {
    Acquire {
        owner: String,
        reply: RpcReplyPort<Result<Acquired, ErrorData>>,
    },
    Release {
        tap: String,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    Reserve {
        owner: String,
        ip: Option<Ipv4Addr>,
        /// Written together with the lease.
        with: Option<WithLease>,
        reply: RpcReplyPort<Result<Reservation, ErrorData>>,
    },
    Unreserve {
        owner: String,
        reply: RpcReplyPort<Result<Option<Lease>, ErrorData>>,
    },
    Status(RpcReplyPort<TapsStatus>),
    /// Removes every TAP, the bridge and the nft table; refused while TAPs are handed out.
    Down(RpcReplyPort<Result<(), ErrorData>>),
    /// From the refill task.
    Refilled {
        created: Vec<String>,
        failed: Option<String>,
    },
    /// From a background delete: the name is free again.
    Deleted {
        tap: String,
    },
    /// A warm TAP's hand-out could not be recorded: back to the pool.
    Unacquired {
        tap: String,
        owner: String,
    },
    /// A lease could not be recorded: the address is free again.
    LeaseFailed {
        ip: Ipv4Addr,
        owner: String,
    },
}

/// What `network status` shows of the TapPool.
#[derive(Debug, Clone)]
pub struct TapsStatus {
    pub enabled: bool,
    pub bridge: BridgeStatus,
    pub pool: PoolStatus,
    pub nat_table: String,
    pub uplink: Option<String>,
    pub leases: Vec<Lease>,
    /// The last failure of a background refill, if any.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct TapPool;

#[derive(Debug, Clone)]
pub struct TapsArgs {
    pub settings: NetworkSettings,
    pub store_timeout: Duration,
}

#[derive(Debug)]
pub struct TapsState {
    settings: NetworkSettings,
    store: StoreClient,
    host: Option<Host>,
    pool: Pool,
    warm: VecDeque<String>,
    in_use: BTreeMap<String, String>,
    /// TAP names being created by a refill task (reserved names).
    creating: BTreeSet<String>,
    /// TAP names being deleted in the background (reserved until gone).
    deleting: BTreeSet<String>,
    refilling: bool,
    leases: BTreeMap<Ipv4Addr, Lease>,
    last_error: Option<String>,
    uplink: Option<String>,
}

fn net_err(what: &str) -> impl FnOnce(banger_net::NetError) -> ErrorData + '_ {
    move |e| ErrorData::from_error(ErrorKind::Internal, &e).with_cause(what.to_string())
}

fn disabled() -> ErrorData {
    ErrorData::new(
        ErrorKind::Unavailable,
        "host networking is disabled in the config",
    )
    .with_hint("set [network] enabled = true in config.toml and restart the daemon")
}

impl TapsState {
    fn taken(&self) -> BTreeSet<Ipv4Addr> {
        self.leases.keys().copied().collect()
    }

    /// The lowest TAP index not in use, warm or being created.
    fn next_tap_name(&self) -> Result<String, ErrorData> {
        let used: BTreeSet<&String> = self
            .warm
            .iter()
            .chain(self.in_use.keys())
            .chain(self.creating.iter())
            .chain(self.deleting.iter())
            .collect();
        (0u32..)
            .map(|i| self.settings.net.tap_name(i))
            .find(|n| n.as_ref().map_or(true, |n| !used.contains(n)))
            .unwrap_or_else(|| unreachable!("an infinite range always has a next element"))
            .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))
    }
}

impl Actor for TapPool {
    type Msg = TapsMsg;
    type State = TapsState;
    type Arguments = TapsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TapsMsg>,
        args: TapsArgs,
    ) -> Result<TapsState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let settings = args.settings;
        let pool = Pool::new(settings.net.subnet)?;
        let mut leases = BTreeMap::new();
        for (_, value) in store.scan_raw(LEASES, b"").await? {
            let lease: Lease = decode_record(LEASES, &value)?;
            leases.insert(lease.ip, lease);
        }
        let mut in_use = BTreeMap::new();
        for (key, value) in store.scan_raw(TAPS, b"").await? {
            let owner: String = decode_record(TAPS, &value)?;
            in_use.insert(String::from_utf8_lossy(&key).to_string(), owner);
        }
        let mut state = TapsState {
            settings,
            store,
            host: None,
            pool,
            warm: VecDeque::new(),
            in_use,
            creating: BTreeSet::new(),
            deleting: BTreeSet::new(),
            refilling: false,
            leases,
            last_error: None,
            uplink: None,
        };
        if state.settings.enabled {
            reconcile(&mut state).await?;
            refill(&myself, &mut state);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<TapsMsg>,
        msg: TapsMsg,
        state: &mut TapsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TapsMsg::Acquire { owner, reply } => acquire(&myself, state, owner, reply).await,
            TapsMsg::Release { tap, reply } => {
                let _ = reply.send(release(&myself, state, &tap).await);
            }
            TapsMsg::Reserve {
                owner,
                ip,
                with,
                reply,
            } => reserve(&myself, state, owner, ip, with, reply),
            TapsMsg::Unreserve { owner, reply } => {
                let lease = state.leases.values().find(|l| l.owner == owner).cloned();
                let res = match lease {
                    Some(lease) => state
                        .store
                        .delete(LEASES, &lease.ip.octets())
                        .await
                        .map(|_| {
                            state.leases.remove(&lease.ip);
                            info!(ip = %lease.ip, %owner, "lease released");
                            Some(lease)
                        }),
                    None => Ok(None),
                };
                let _ = reply.send(res);
            }
            TapsMsg::Status(reply) => {
                let _ = reply.send(status(state).await);
            }
            TapsMsg::Down(reply) => {
                let _ = reply.send(down(state).await);
            }
            TapsMsg::Deleted { tap } => {
                state.deleting.remove(&tap);
            }
            TapsMsg::Unacquired { tap, owner } => {
                if state.in_use.get(&tap) == Some(&owner) {
                    state.in_use.remove(&tap);
                    state.warm.push_front(tap);
                }
            }
            TapsMsg::LeaseFailed { ip, owner } => {
                if state.leases.get(&ip).is_some_and(|l| l.owner == owner) {
                    state.leases.remove(&ip);
                }
            }
            TapsMsg::Refilled { created, failed } => {
                for tap in created {
                    state.creating.remove(&tap);
                    state.warm.push_back(tap);
                }
                state.refilling = false;
                if let Some(err) = failed {
                    warn!(error = %err, "refilling the TAP pool failed");
                    state.creating.clear();
                    state.last_error = Some(err);
                } else {
                    refill(&myself, state);
                }
            }
        }
        Ok(())
    }
}

/// Brings the host to the expected state (see the module docs).
async fn reconcile(state: &mut TapsState) -> Result<(), ErrorData> {
    let net = state.settings.net.clone();
    let host = Host::connect()
        .await
        .map_err(net_err("opening a netlink connection"))?;
    let bridge = host
        .ensure_bridge(&net)
        .await
        .map_err(net_err("setting up the bridge"))?;
    if bridge.changed() {
        info!(bridge = %net.bridge, address = %bridge.address, "bridge set up");
    }
    let uplink = host
        .default_uplink()
        .await
        .map_err(net_err("finding the uplink"))?;
    state.uplink = uplink.clone();
    let rules = NatRules::new(&net, uplink);
    tokio::task::spawn_blocking(move || -> Result<(), ErrorData> {
        banger_net::enable_ip_forward().map_err(|e| {
            ErrorData::from_error(ErrorKind::Internal, &e).with_cause("enabling IPv4 forwarding")
        })?;
        rules.apply().map_err(net_err("applying the nft table"))
    })
    .await
    .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))??;

    let mut adopted = 0;
    let mut deleted = 0;
    for link in host
        .list_links_with_prefix(&net.tap_prefix)
        .await
        .map_err(net_err("listing TAPs"))?
    {
        if net.tap_index(&link.name).is_none() || link.kind.as_deref() != Some("tun") {
            continue;
        }
        let on_bridge = link.master.as_deref() == Some(net.bridge.as_str());
        if state.in_use.contains_key(&link.name) {
            if !on_bridge || !link.up {
                host.reattach_tap(&link.name, &net.bridge)
                    .await
                    .map_err(net_err("re-attaching a TAP"))?;
                info!(tap = %link.name, "handed-out TAP put back on the bridge");
            }
            adopted += 1;
        } else if on_bridge && link.up && (state.warm.len() as u32) < state.settings.pool_size {
            state.warm.push_back(link.name.clone());
            adopted += 1;
        } else {
            host.delete_tap(&link.name)
                .await
                .map_err(net_err("deleting an orphaned TAP"))?;
            deleted += 1;
        }
    }
    // TAPs recorded as handed out but gone from the host are forgotten.
    let missing: Vec<String> = {
        let mut v = Vec::new();
        for tap in state.in_use.keys() {
            if !host
                .link_exists(tap)
                .await
                .map_err(net_err("checking TAPs"))?
            {
                v.push(tap.clone());
            }
        }
        v
    };
    for tap in missing {
        warn!(%tap, "a handed-out TAP no longer exists; forgetting it");
        state.store.delete(TAPS, tap.as_bytes()).await?;
        state.in_use.remove(&tap);
    }
    info!(
        adopted,
        deleted,
        warm = state.warm.len(),
        in_use = state.in_use.len(),
        "TAPs reconciled"
    );
    state.host = Some(host);
    Ok(())
}

/// Starts a refill task when the pool is below target.
fn refill(myself: &ActorRef<TapsMsg>, state: &mut TapsState) {
    let pooled = (state.warm.len() + state.creating.len()) as u32;
    let missing = state.settings.pool_size.saturating_sub(pooled);
    if state.refilling || missing == 0 {
        return;
    }
    let Some(host) = state.host.clone() else {
        return;
    };
    let mut names = Vec::new();
    for _ in 0..missing {
        match state.next_tap_name() {
            Ok(name) => {
                state.creating.insert(name.clone());
                names.push(name);
            }
            Err(_) => break,
        }
    }
    state.refilling = true;
    let bridge = state.settings.net.bridge.clone();
    let me = myself.clone();
    tokio::spawn(async move {
        let mut created = Vec::new();
        let mut failed = None;
        for name in names {
            match host.create_tap(&name, &bridge).await {
                Ok(_) => created.push(name),
                Err(e) => {
                    failed = Some(format!("creating {name}: {e}"));
                    break;
                }
            }
        }
        let _ = me.cast(TapsMsg::Refilled { created, failed });
    });
}

async fn acquire(
    myself: &ActorRef<TapsMsg>,
    state: &mut TapsState,
    owner: String,
    reply: RpcReplyPort<Result<Acquired, ErrorData>>,
) {
    if !state.settings.enabled {
        let _ = reply.send(Err(disabled()));
        return;
    }
    if owner.is_empty() {
        let _ = reply.send(Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            "a TAP needs an owner",
        )));
        return;
    }
    if state.host.is_none() {
        // Taken down with `network down`: set it up again on demand.
        if let Err(e) = reconcile(state).await {
            let _ = reply.send(Err(e));
            return;
        }
    }
    if let Some(tap) = state.warm.pop_front() {
        // Handed out now; the record is written beside this mailbox (sent
        // now, so a later release's delete cannot overtake it), and the
        // answer waits for it. Parallel acquires share their flushes.
        state.in_use.insert(tap.clone(), owner.clone());
        let written = state.store.put_sent(TAPS, tap.as_bytes(), &owner);
        let me = myself.clone();
        tokio::spawn(async move {
            let res = match written.await {
                Ok(()) => Ok(Acquired {
                    tap,
                    from_pool: true,
                }),
                Err(e) => {
                    let _ = me.cast(TapsMsg::Unacquired { tap, owner });
                    Err(e)
                }
            };
            let _ = reply.send(res);
        });
        refill(myself, state);
        return;
    }
    // Cold path: reserve a name now, create it outside the mailbox.
    let name = match state.next_tap_name() {
        Ok(n) => n,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    let Some(host) = state.host.clone() else {
        let _ = reply.send(Err(ErrorData::new(
            ErrorKind::Unavailable,
            "the network is not set up",
        )));
        return;
    };
    if let Err(e) = state.store.put(TAPS, name.as_bytes(), &owner).await {
        let _ = reply.send(Err(e));
        return;
    }
    state.in_use.insert(name.clone(), owner);
    let bridge = state.settings.net.bridge.clone();
    let me = myself.clone();
    tokio::spawn(async move {
        match host.create_tap(&name, &bridge).await {
            Ok(_) => {
                let _ = reply.send(Ok(Acquired {
                    tap: name,
                    from_pool: false,
                }));
            }
            Err(e) => {
                let err = ErrorData::from_error(ErrorKind::Internal, &e)
                    .with_cause(format!("creating TAP {name}"));
                // Give the name back.
                let (tx, _rx) = ractor::concurrency::oneshot();
                let _ = me.cast(TapsMsg::Release {
                    tap: name,
                    reply: tx.into(),
                });
                let _ = reply.send(Err(err));
            }
        }
    });
    refill(myself, state);
}

async fn release(
    myself: &ActorRef<TapsMsg>,
    state: &mut TapsState,
    tap: &str,
) -> Result<(), ErrorData> {
    if state.in_use.remove(tap).is_none() {
        return Err(ErrorData::new(
            ErrorKind::NotFound,
            format!("TAP {tap} is not handed out"),
        ));
    }
    state.store.delete(TAPS, tap.as_bytes()).await?;
    let Some(host) = state.host.clone() else {
        return Ok(());
    };
    // TAPs a refill is creating count towards the target already.
    let pooled = state.warm.len() + state.creating.len();
    if (pooled as u32) < state.settings.pool_size && host.link_exists(tap).await.unwrap_or(false) {
        state.warm.push_back(tap.to_string());
    } else {
        // The name stays reserved until the TAP is gone, so a cold acquire
        // cannot pick it while it still exists.
        let tap = tap.to_string();
        state.deleting.insert(tap.clone());
        let me = myself.clone();
        tokio::spawn(async move {
            if let Err(e) = host.delete_tap(&tap).await {
                warn!(%tap, error = %e, "deleting a released TAP failed");
            }
            let _ = me.cast(TapsMsg::Deleted { tap });
        });
    }
    refill(myself, state);
    Ok(())
}

/// Reserves an address for `owner`: taken at once (no other reservation
/// can get it), recorded beside this mailbox, answered once recorded.
fn reserve(
    myself: &ActorRef<TapsMsg>,
    state: &mut TapsState,
    owner: String,
    ip: Option<Ipv4Addr>,
    with: Option<WithLease>,
    reply: RpcReplyPort<Result<Reservation, ErrorData>>,
) {
    let lease = match new_lease(state, owner, ip) {
        Ok(lease) => lease,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    // A warm TAP goes with it when asked for and at hand; never made here.
    let tap = with
        .as_ref()
        .filter(|w| w.tap && state.settings.enabled && state.host.is_some())
        .and_then(|_| state.warm.pop_front());
    let puts = (|| {
        let mut puts = vec![(
            LEASES.to_string(),
            lease.ip.octets().to_vec(),
            encode_record(&lease)?,
        )];
        if let Some(tap) = &tap {
            puts.push((
                TAPS.to_string(),
                tap.as_bytes().to_vec(),
                encode_record(&lease.owner)?,
            ));
        }
        if let Some(with) = with {
            puts.push((with.make)(lease.ip, tap.as_deref())?);
        }
        Ok::<_, ErrorData>(puts)
    })();
    let puts = match puts {
        Ok(puts) => puts,
        Err(e) => {
            if let Some(tap) = tap {
                state.warm.push_front(tap);
            }
            let _ = reply.send(Err(e));
            return;
        }
    };
    state.leases.insert(lease.ip, lease.clone());
    if let Some(tap) = &tap {
        state.in_use.insert(tap.clone(), lease.owner.clone());
        refill(myself, state);
    }
    let written = state.store.put_all_sent(puts);
    let me = myself.clone();
    tokio::spawn(async move {
        let res = match written.await {
            Ok(()) => {
                info!(ip = %lease.ip, owner = %lease.owner, tap = ?tap, "lease reserved");
                Ok(Reservation { lease, tap })
            }
            Err(e) => {
                if let Some(tap) = tap {
                    let _ = me.cast(TapsMsg::Unacquired {
                        tap,
                        owner: lease.owner.clone(),
                    });
                }
                let _ = me.cast(TapsMsg::LeaseFailed {
                    ip: lease.ip,
                    owner: lease.owner,
                });
                Err(e)
            }
        };
        let _ = reply.send(res);
    });
}

/// The lease `owner` gets, checked against the ones held.
fn new_lease(state: &TapsState, owner: String, ip: Option<Ipv4Addr>) -> Result<Lease, ErrorData> {
    if owner.is_empty() {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            "a lease needs an owner",
        ));
    }
    if let Some(existing) = state.leases.values().find(|l| l.owner == owner) {
        return Err(ErrorData::new(
            ErrorKind::AlreadyExists,
            format!("`{owner}` already holds {}", existing.ip),
        )
        .with_hint(format!("release it first: banger network lease rm {owner}")));
    }
    let taken = state.taken();
    let addr = match ip {
        Some(ip) => {
            state.pool.validate_static(ip, &taken).map_err(|e| {
                let kind = if taken.contains(&ip) {
                    ErrorKind::AlreadyExists
                } else {
                    ErrorKind::InvalidRequest
                };
                ErrorData::from_error(kind, &e).with_hint(format!(
                    "guest addresses come from {}",
                    state.settings.net.subnet
                ))
            })?;
            ip
        }
        None => state.pool.allocate(&taken).map_err(|e| {
            ErrorData::from_error(ErrorKind::Unavailable, &e)
                .with_hint("delete unused VMs or leases, or use a larger subnet")
        })?,
    };
    Ok(Lease {
        ip: addr,
        owner,
        static_ip: ip.is_some(),
        created_unix_ms: unix_ms(),
    })
}

async fn status(state: &TapsState) -> TapsStatus {
    let net = &state.settings.net;
    let mut bridge = BridgeStatus {
        name: net.bridge.clone(),
        exists: false,
        up: false,
        address: net
            .gateway()
            .map(|g| format!("{g}/{}", net.subnet.prefix())),
        subnet: net.subnet.to_string(),
    };
    let host = match &state.host {
        Some(h) => Some(h.clone()),
        None => Host::connect().await.ok(),
    };
    if let Some(host) = host {
        if let Ok(Some(link)) = host.link(&net.bridge).await {
            bridge.exists = true;
            bridge.up = link.up;
        }
    }
    TapsStatus {
        enabled: state.settings.enabled,
        bridge,
        pool: PoolStatus {
            target: state.settings.pool_size,
            warm: state.warm.iter().cloned().collect(),
            in_use: state
                .in_use
                .iter()
                .map(|(tap, owner)| TapLease {
                    tap: tap.clone(),
                    owner: owner.clone(),
                })
                .collect(),
        },
        nat_table: net.nft_table.clone(),
        uplink: state.uplink.clone(),
        leases: state.leases.values().cloned().collect(),
        last_error: state.last_error.clone(),
    }
}

async fn down(state: &mut TapsState) -> Result<(), ErrorData> {
    if !state.in_use.is_empty() {
        let users: Vec<String> = state
            .in_use
            .iter()
            .map(|(t, o)| format!("{t} ({o})"))
            .collect();
        return Err(ErrorData::new(
            ErrorKind::InvalidState,
            format!("TAPs are in use: {}", users.join(", ")),
        )
        .with_hint("stop and delete the VMs first"));
    }
    let Some(host) = state.host.clone() else {
        return Ok(());
    };
    let net = state.settings.net.clone();
    for tap in state.warm.drain(..).collect::<Vec<_>>() {
        host.delete_tap(&tap)
            .await
            .map_err(net_err("deleting a TAP"))?;
    }
    for link in host
        .list_links_with_prefix(&net.tap_prefix)
        .await
        .map_err(net_err("listing TAPs"))?
    {
        if net.tap_index(&link.name).is_some() && link.kind.as_deref() == Some("tun") {
            host.delete_tap(&link.name)
                .await
                .map_err(net_err("deleting a TAP"))?;
        }
    }
    host.delete_bridge(&net.bridge)
        .await
        .map_err(net_err("deleting the bridge"))?;
    let table = net.nft_table.clone();
    tokio::task::spawn_blocking(move || NatRules::remove(&table))
        .await
        .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?
        .map_err(net_err("removing the nft table"))?;
    // Until the next start, nothing is set up.
    state.host = None;
    info!("host network removed");
    Ok(())
}

/// The nft table as `nft` shows it, for `network status` (blocking).
pub fn nat_status(table: &str, uplink: Option<String>) -> NatStatus {
    let absent = |uplink| NatStatus {
        table: table.to_string(),
        present: false,
        uplink,
        rules: Vec::new(),
    };
    if !matches!(NatRules::exists(table), Ok(true)) {
        return absent(uplink);
    }
    let out = std::process::Command::new("nft")
        .args(["list", "table", "ip", table])
        .output();
    let rules = match out {
        Ok(o) if o.status.success() => rule_lines(&String::from_utf8_lossy(&o.stdout)),
        _ => Vec::new(),
    };
    NatStatus {
        table: table.to_string(),
        present: true,
        uplink,
        rules,
    }
}

/// The rule lines of `nft list table` output, prefixed with their chain.
fn rule_lines(text: &str) -> Vec<String> {
    let mut chain = String::new();
    let mut rules = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ") {
            chain = name.trim_end_matches(" {").to_string();
        } else if !line.is_empty()
            && !line.starts_with("type ")
            && !line.starts_with("table ")
            && line != "}"
        {
            rules.push(format!("{chain}: {line}"));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_lines_keep_rules_with_their_chain() {
        let text = "table ip banger {\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr 172.30.0.0/24 masquerade\n\t}\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"banger0\" accept\n\t}\n}\n";
        assert_eq!(
            rule_lines(text),
            vec![
                "postrouting: ip saddr 172.30.0.0/24 masquerade".to_string(),
                "forward: iifname \"banger0\" accept".to_string()
            ]
        );
    }
}
