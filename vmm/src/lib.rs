//! The VMM backends banger drives, behind one trait ([`VmmBackend`]):
//!
//! - [`qemu`]: `qemu-system-x86_64`, KVM or TCG, controlled over QMP;
//!   boots distribution kernels (bzImage + initrd). What runs in CI.
//! - [`firecracker`]: the `firecracker` binary, configured over its HTTP
//!   API socket; ELF `vmlinux` kernels with virtio-mmio built in.
//!
//! A backend turns a [`MachineSpec`] into a running VMM process and hands
//! back a [`VmmHandle`] for it. The process is started in its own session
//! so it outlives bangerd: after a daemon restart the VM's supervisor
//! re-adopts it ([`VmmBackend::adopt`]) from the pid and start time it
//! recorded ([`process::ProcessId`]) and the sockets in the VM's run dir.
//!
//! This crate knows nothing about actors or the store; the VmSupervisor in
//! `banger-actors` owns one handle per VM.

pub mod exit;
pub mod firecracker;
pub mod process;
pub mod qemu;
mod spawn;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

pub use exit::{ExitReason, VmmExit};
pub use process::ProcessId;

/// Which VMM a VM runs under.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        }
    }
}

impl fmt::Display for VmmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CPU virtualisation for QEMU (Firecracker always uses KVM).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's software emulation: slow, but works everywhere.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Format of a disk image file.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    /// A qcow2 overlay (QEMU only), e.g. a per-VM copy-on-write root over
    /// the image's shared ext4.
    Qcow2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Drive id (`root`, `work`); also the Firecracker drive id.
    pub id: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Host TAP device.
    pub tap: String,
    /// Guest MAC, `02:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// Everything needed to start one VM. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    /// The VM's name (used for the VMM's process name / id).
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The kernel in the format this backend boots (bzImage or ELF for
    /// QEMU, ELF `vmlinux` for Firecracker).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line (the backend may append its own console setting).
    pub cmdline: String,
    /// Disks in guest order: the first is `/dev/vda`, the second `/dev/vdb`.
    pub disks: Vec<DiskSpec>,
    pub net: Option<NetSpec>,
    /// Per-VM directory for the VMM's sockets and pid file. Unix socket
    /// paths are limited to 107 bytes, so keep it short.
    pub run_dir: PathBuf,
    /// The guest's serial console is appended here.
    pub console_log: PathBuf,
    /// QEMU only.
    pub accel: Accel,
}

/// What a clean stop ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off within the timeout.
    Clean,
    /// The guest did not power off in time; the VMM was killed.
    Killed,
    /// The VMM had already exited.
    AlreadyExited,
}

/// What the VMM reports about its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmStatus {
    /// Running (vCPUs executing) as far as the VMM knows.
    pub running: bool,
    /// The VMM's own word for the state (`running`, `paused`, `shutdown`, `Running`...).
    pub detail: String,
}

/// Errors of the VMM layer.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{binary} was not found on PATH")]
    BinaryNotFound { binary: String },
    #[error("starting {binary} failed")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM exited during start-up ({status}); last output: {output}")]
    EarlyExit { status: String, output: String },
    #[error("timed out after {0:?} waiting for the VMM's control socket")]
    SocketTimeout(Duration),
    #[error("the VMM's control socket failed")]
    Control(#[source] std::io::Error),
    #[error("QMP error {class}: {desc}")]
    Qmp { class: String, desc: String },
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    /// Firecracker answered a request with an error (`fault_message`).
    #[error("firecracker refused {method} {path} (HTTP {status}): {fault_message}")]
    Firecracker {
        method: String,
        path: String,
        status: u16,
        fault_message: String,
    },
    #[error("HTTP error talking to firecracker: {0}")]
    Http(String),
    #[error("connecting to the guest agent failed: {0}")]
    Agent(String),
    #[error("process {pid} is gone or is not this VM's VMM")]
    NotAdoptable { pid: u32 },
    #[error("the spec is not valid for {backend}: {reason}")]
    InvalidSpec { backend: VmmKind, reason: String },
    #[error("I/O error on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A VMM implementation.
#[async_trait::async_trait]
pub trait VmmBackend: Send + Sync + fmt::Debug {
    fn kind(&self) -> VmmKind;

    /// Starts a VMM process for `spec` and boots the guest. Returns once the
    /// VMM runs the guest (not when the guest is up: that is the agent's
    /// health). On error no process is left running.
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn VmmHandle>, VmmError>;

    /// Re-attaches to a VMM started earlier for `spec` (after a daemon or
    /// supervisor restart). Fails with [`VmmError::NotAdoptable`] when the
    /// process is gone or is some other process that reused the pid.
    async fn adopt(
        &self,
        spec: &MachineSpec,
        pid: ProcessId,
    ) -> Result<Arc<dyn VmmHandle>, VmmError>;
}

/// A running VMM process.
#[async_trait::async_trait]
pub trait VmmHandle: Send + Sync + fmt::Debug {
    fn kind(&self) -> VmmKind;

    /// The process, for the store (adoption after a restart) and `vm show`.
    fn process(&self) -> ProcessId;

    /// For a VMM this handle launched: how long its process took from
    /// being spawned to answering on its control socket (QMP, the
    /// Firecracker API; for QEMU, both of its monitors, connected at the
    /// same time). That is the VMM's own start-up, not banger's
    /// work; `None` for an adopted process.
    fn start_up(&self) -> Option<Duration> {
        None
    }

    /// Opens a new byte stream to the guest agent. Under QEMU there is one
    /// virtio-serial port: a new stream replaces the previous one.
    async fn connect_agent(&self) -> Result<UnixStream, VmmError>;

    /// The VMM's view of the guest.
    async fn status(&self) -> Result<VmmStatus, VmmError>;

    /// Asks the guest to power off (QMP `system_powerdown`, Firecracker
    /// `SendCtrlAltDel`), waits up to `timeout` for the VMM to exit, then
    /// kills it. Always leaves the process gone (and reaped if it is ours).
    async fn stop(&self, timeout: Duration) -> Result<StopOutcome, VmmError>;

    /// Kills the VMM at once (SIGKILL) and waits for it to be gone.
    async fn kill(&self) -> Result<(), VmmError>;

    /// Resolves when the process has exited (works for adopted processes
    /// too, through a pidfd), with its raw status. Cancel-safe; may be
    /// called repeatedly. [`wait_exit_reason`](Self::wait_exit_reason)
    /// says why it exited.
    async fn wait_exit(&self) -> process::Exit {
        self.wait_exit_reason().await.status
    }

    /// Resolves when the process has exited, with why ([`VmmExit`]): a
    /// guest power-off, a guest reset or panic, a kill, a VMM failure.
    /// Cancel-safe; may be called repeatedly (the same answer each time).
    async fn wait_exit_reason(&self) -> VmmExit;
}
