//! Every message that crosses the socket.
//!
//! Append-only: new variants and fields go at the end (see the crate docs).

use serde::{Deserialize, Serialize};

use crate::images::*;
use crate::network::*;
use crate::vms::*;
use crate::ErrorData;

/// The first frame a client sends. Its layout must never change: a daemon of
/// any version has to be able to read it to say "wrong version".
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub client_version: String,
    pub features: Vec<String>,
}

impl Hello {
    /// The hello of this build.
    pub fn current() -> Self {
        Self {
            protocol_version: crate::PROTOCOL_VERSION,
            client_version: crate::BANGER_VERSION.to_string(),
            features: crate::FEATURES.iter().map(|f| f.to_string()).collect(),
        }
    }
}

/// The daemon's answer to a [`Hello`] it accepts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    pub protocol_version: u32,
    pub daemon_version: String,
    pub features: Vec<String>,
    pub pid: u32,
}

/// Frames from a client to the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Hello(Hello),
    /// A request; `id` is chosen by the client and echoed on every frame
    /// that answers it.
    Request {
        id: u64,
        request: Request,
    },
    /// Asks the daemon to cancel the request with this id; it still ends
    /// with a final reply (normally a `Cancelled` error).
    Cancel {
        id: u64,
    },
    /// Bytes for the stdin of request `id` (an exec).
    Input {
        id: u64,
        data: Vec<u8>,
    },
    /// End of stdin for request `id`.
    InputClose {
        id: u64,
    },
    /// The client's terminal changed size (an exec on a TTY).
    Resize {
        id: u64,
        size: TtySize,
    },
}

/// Frames from the daemon to a client.
// A frame lives only from its decoding to its handling; boxing the large
// variant would buy nothing but a box in every match.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Hello(ServerHello),
    Progress {
        id: u64,
        progress: Progress,
    },
    /// The one final answer to request `id`.
    Reply {
        id: u64,
        result: Result<Response, ErrorData>,
    },
    /// A lifecycle event for a subscription opened by request `id`.
    Event {
        id: u64,
        event: Event,
    },
    /// An error about the connection itself rather than one request: a
    /// refused handshake, a malformed or oversized frame.
    Error(ErrorData),
    /// Output of request `id`: a process's stdout/stderr, or log lines.
    Output {
        id: u64,
        stream: OutputStream,
        data: Vec<u8>,
    },
}

/// One operation per variant.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Version,
    Status,
    /// Graceful daemon shutdown.
    Shutdown,
    ConfigShow,
    DebugActors,
    /// Kills one actor (chaos testing); only the socket's owner may do this.
    DebugKillActor {
        name: String,
    },
    /// Streams lifecycle events from `since` (exclusive) on, until the client
    /// disconnects or cancels. `None` means "only new events".
    SubscribeEvents {
        since: Option<u64>,
    },
    Doctor,
    /// Runs a synthetic long operation that streams `steps` progress events
    /// `interval_ms` apart: exercises progress, cancellation and disconnects
    /// end to end (`banger debug progress`).
    DebugProgress {
        steps: u32,
        interval_ms: u64,
    },
    ImageList,
    ImageShow {
        name: String,
    },
    /// Pulls an OCI image and builds its ext4 rootfs (streams progress).
    ImagePull(ImagePullRequest),
    /// Adopts an existing ext4 rootfs (unmanaged: banger does not own the file).
    ImageRegister(ImageRegisterRequest),
    /// Copies an unmanaged image's files into managed storage.
    ImagePromote {
        name: String,
    },
    /// Deletes an image; refused while a VM uses it.
    ImageDelete {
        name: String,
    },
    /// Removes cached layers no image references (nor a pull in progress
    /// uses), and finished kernel downloads.
    ImagePrune,
    /// Builds an image from the Debian archive with mmdebstrap (streams progress).
    ImageBuild(ImageBuildRequest),
    ImageCatalog,
    KernelList,
    KernelShow {
        name: String,
    },
    KernelImport(KernelImportRequest),
    /// Downloads a kernel from the embedded catalog (streams progress).
    KernelPull {
        name: String,
    },
    KernelDelete {
        name: String,
    },
    KernelCatalog,
    /// Bridge, TAP pool, NAT rules, leases and DNS records.
    NetworkStatus,
    /// Removes everything banger created on the host network (bridge,
    /// TAPs, nft table); refused while VMs run.
    NetworkDown,
    /// Reserves a guest address for `owner` (a specific one with `ip`).
    LeaseReserve {
        owner: String,
        ip: Option<std::net::Ipv4Addr>,
    },
    LeaseRelease {
        owner: String,
    },
    /// Adds a static `<name>.vm` record.
    DnsAdd {
        name: String,
        ip: std::net::Ipv4Addr,
    },
    DnsRemove {
        name: String,
    },
    /// Points the host resolver at banger's DNS for `.vm` names.
    DnsSetup,
    /// Takes a TAP from the pool for `owner` (what a VM start does;
    /// `banger debug tap` exposes it for tests and benchmarks).
    TapAcquire {
        owner: String,
    },
    TapRelease {
        tap: String,
    },
    /// Creates and boots a VM (streams progress until it is up, or returns
    /// at once with `detach`).
    VmCreate(VmCreateRequest),
    /// Follows the progress of a VM's current operation until it ends.
    VmWatch {
        name: String,
    },
    VmStart {
        name: String,
    },
    VmStop {
        name: String,
        /// Kill at once instead of asking the guest to power off.
        force: bool,
    },
    VmRestart {
        name: String,
    },
    VmDelete {
        name: String,
        /// Delete a running VM (it is stopped first).
        force: bool,
    },
    VmList,
    VmShow {
        name: String,
    },
    /// The console log: the last `lines` lines, then (with `follow`) new
    /// output as it comes, as `Output` frames.
    VmLogs {
        name: String,
        lines: Option<u32>,
        follow: bool,
    },
    /// Runs a command through the guest agent: `Output` frames, then the
    /// exit status as the reply.
    VmExec(VmExecRequest),
    VmPorts {
        name: String,
    },
    VmHealth {
        name: String,
    },
}

impl Request {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Version => "version",
            Request::Status => "status",
            Request::Shutdown => "shutdown",
            Request::ConfigShow => "config_show",
            Request::DebugActors => "debug_actors",
            Request::DebugKillActor { .. } => "debug_kill_actor",
            Request::SubscribeEvents { .. } => "subscribe_events",
            Request::Doctor => "doctor",
            Request::DebugProgress { .. } => "debug_progress",
            Request::ImageList => "image_list",
            Request::ImageShow { .. } => "image_show",
            Request::ImagePull(_) => "image_pull",
            Request::ImageRegister(_) => "image_register",
            Request::ImagePromote { .. } => "image_promote",
            Request::ImageDelete { .. } => "image_delete",
            Request::ImagePrune => "image_prune",
            Request::ImageBuild(_) => "image_build",
            Request::ImageCatalog => "image_catalog",
            Request::KernelList => "kernel_list",
            Request::KernelShow { .. } => "kernel_show",
            Request::KernelImport(_) => "kernel_import",
            Request::KernelPull { .. } => "kernel_pull",
            Request::KernelDelete { .. } => "kernel_delete",
            Request::KernelCatalog => "kernel_catalog",
            Request::NetworkStatus => "network_status",
            Request::NetworkDown => "network_down",
            Request::LeaseReserve { .. } => "lease_reserve",
            Request::LeaseRelease { .. } => "lease_release",
            Request::DnsAdd { .. } => "dns_add",
            Request::DnsRemove { .. } => "dns_remove",
            Request::DnsSetup => "dns_setup",
            Request::TapAcquire { .. } => "tap_acquire",
            Request::TapRelease { .. } => "tap_release",
            Request::VmCreate(_) => "vm_create",
            Request::VmWatch { .. } => "vm_watch",
            Request::VmStart { .. } => "vm_start",
            Request::VmStop { .. } => "vm_stop",
            Request::VmRestart { .. } => "vm_restart",
            Request::VmDelete { .. } => "vm_delete",
            Request::VmList => "vm_list",
            Request::VmShow { .. } => "vm_show",
            Request::VmLogs { .. } => "vm_logs",
            Request::VmExec(_) => "vm_exec",
            Request::VmPorts { .. } => "vm_ports",
            Request::VmHealth { .. } => "vm_health",
        }
    }
}

/// Final results, one variant per kind of answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Response {
    Pong,
    Version(VersionInfo),
    Status(DaemonStatus),
    ShuttingDown,
    Config(ConfigDump),
    Actors(Vec<ActorInfo>),
    ActorKilled {
        name: String,
        id: String,
    },
    /// The subscription ended (the daemon stops or the client cancelled).
    SubscriptionEnded,
    Doctor(DoctorReport),
    Done,
    Images(Vec<ImageInfo>),
    Image(ImageInfo),
    Kernels(Vec<KernelInfo>),
    Kernel(KernelInfo),
    Deleted {
        name: String,
    },
    Pruned(PruneReport),
    ImageCatalog(Vec<ImageCatalogEntry>),
    KernelCatalog(Vec<KernelCatalogEntry>),
    Network(NetworkStatus),
    Lease(Lease),
    /// What `dns setup` did, or what to do by hand.
    DnsSetup(DnsSetupReport),
    Tap {
        tap: String,
        /// False when the pool was empty and the TAP was created on demand.
        from_pool: bool,
    },
    Vm(VmInfo),
    Vms(Vec<VmInfo>),
    /// How an exec ended.
    Exited(ExitStatus),
    Ports(Vec<ListeningPort>),
    Health(GuestHealth),
}

/// A step of a long operation.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Machine-friendly stage name (`resolve`, `download`, `boot`, ...).
    pub stage: String,
    /// Human-readable detail of this step.
    pub detail: String,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    /// Time since the operation started.
    pub elapsed_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub daemon_version: String,
    pub protocol_version: u32,
    pub features: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub uptime_ms: u64,
    pub socket_path: String,
    pub state_dir: String,
    pub config_path: String,
    pub log_path: String,
    pub store: StoreStats,
    pub open_connections: u64,
    pub events_published: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    pub path: String,
    pub trees: u64,
    pub records: u64,
    pub size_on_disk: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConfigDump {
    /// Where the config file is (it may not exist: then everything is default).
    pub path: String,
    pub file_exists: bool,
    /// The effective configuration, as TOML.
    pub toml: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorStatus {
    Running,
    /// Died and waiting for its backoff to end before it is respawned.
    Restarting,
    Stopped,
    /// Restarted too often in the restart window: escalated to its parent.
    Escalated,
}

impl ActorStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorStatus::Running => "running",
            ActorStatus::Restarting => "restarting",
            ActorStatus::Stopped => "stopped",
            ActorStatus::Escalated => "escalated",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    pub name: String,
    /// ractor's actor id, e.g. `0.12`; empty while not running.
    pub id: String,
    pub status: ActorStatus,
    pub parent: Option<String>,
    pub restart_count: u32,
    pub uptime_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    Pass,
    Warn,
    Fail,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "PASS",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DoctorCheck {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
    /// What to do about a WARN or FAIL.
    pub fix: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DoctorReport {
    pub checks: Vec<DoctorCheck>,
}

/// A lifecycle event, numbered in publication order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub kind: EventKind,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    DaemonStarted {
        pid: u32,
        version: String,
    },
    DaemonStopping,
    ActorStarted {
        name: String,
    },
    ActorRestarted {
        name: String,
        restart_count: u32,
    },
    ActorFailed {
        name: String,
        reason: String,
    },
    /// A child restarted too often within the window; its supervisor escalates.
    RestartIntensityExceeded {
        name: String,
        restarts: u32,
        window_ms: u64,
    },
}
