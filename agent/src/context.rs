//! What every session shares: whether the agent is PID 1 and how a
//! `PowerOff` request is carried out.

use crate::power::PowerAction;
use tokio::sync::mpsc;

/// How `PowerOff` is carried out.
#[derive(Debug, Clone)]
pub enum PowerMode {
    /// Log it and do nothing (`--fake-poweroff`, for tests).
    Fake,
    /// Ask systemd (or the system's `poweroff`/`reboot`).
    Service,
    /// Ask the init loop, which stops everything and calls `reboot(2)`.
    Init(mpsc::UnboundedSender<PowerAction>),
}

/// Shared by all sessions of one agent.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// The agent runs as the guest's init.
    pub pid1: bool,
    pub power: PowerMode,
}
