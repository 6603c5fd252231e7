//! VMs as they travel. Append-only.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use crate::agent::{ExitStatus, GuestHealth, ListeningPort, OutputStream, TtySize};

/// The life of a VM. Transitions are checked by the daemon
/// ([`VmState::can_transition`]); an operation in the wrong state gets an
/// `InvalidState` error naming the state and the operation.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Reserved and recorded; never booted yet.
    Created,
    /// Disks, TAP and VMM being set up; waiting for the guest agent.
    Starting,
    Running,
    Stopping,
    /// Stopped on request or powered off from inside.
    Stopped,
    /// The VMM died unexpectedly; the supervisor may restart it.
    Crashed,
    /// Gave up: a start failed, or it crashed too often.
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Failed => "failed",
        }
    }

    /// The state machine: which transitions are valid.
    pub fn can_transition(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Created, Starting)
                | (Stopped, Starting)
                | (Crashed, Starting)
                | (Failed, Starting)
                | (Starting, Running)
                | (Starting, Failed)
                | (Starting, Stopping)
                | (Starting, Crashed)
                | (Running, Stopping)
                | (Running, Crashed)
                | (Running, Stopped)
                | (Stopping, Stopped)
                | (Crashed, Failed)
                | (Crashed, Stopped)
        )
    }

    /// Whether a VMM process belongs to this state.
    pub fn has_vmm(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the supervisor does when the VMM dies without being asked to.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    No,
    /// Restart after a crash, not after a clean power-off from inside.
    #[default]
    OnFailure,
    /// Restart after any exit that banger did not ask for.
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "no" => Some(RestartPolicy::No),
            "on-failure" => Some(RestartPolicy::OnFailure),
            "always" => Some(RestartPolicy::Always),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct VmCreateRequest {
    /// Default: a generated name.
    pub name: Option<String>,
    /// Image name or catalog entry; default: the catalog default.
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// Size of the work disk (`/root`), bytes.
    pub disk_bytes: Option<u64>,
    pub ip: Option<Ipv4Addr>,
    /// `auto`, `qemu` or `firecracker`.
    pub vmm: Option<String>,
    pub restart: Option<RestartPolicy>,
    /// Return once the VM is reserved; the boot goes on in the daemon
    /// (follow it with `VmWatch`).
    pub detach: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: VmState,
    pub image: String,
    pub kernel: String,
    /// `qemu` or `firecracker`.
    pub vmm: String,
    /// `kvm` or `tcg` (QEMU), with why it was chosen.
    pub accel: Option<String>,
    pub accel_reason: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub ip: Option<Ipv4Addr>,
    pub gateway: Option<Ipv4Addr>,
    pub mac: String,
    pub tap: Option<String>,
    /// `<name>.vm`.
    pub fqdn: String,
    pub pid: Option<u32>,
    pub restart: RestartPolicy,
    /// Restarts by the supervisor since the last explicit start.
    pub restarts: u32,
    pub created_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    /// Why the VM is `failed` or `crashed`, or why the last start failed.
    pub last_error: Option<String>,
    /// The last lines of the serial console, when the VM failed or crashed.
    pub console_tail: Vec<String>,
    pub console_log: String,
    /// The managed SSH key and the known-hosts file for this VM.
    pub ssh_key: String,
    pub known_hosts: String,
    pub has_sshd: bool,
    /// The guest agent answered since the last start.
    pub agent_ready: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VmExecRequest {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size.
    pub tty: Option<TtySize>,
    /// The client will send stdin (`ClientMessage::Input`).
    pub stdin: bool,
}
