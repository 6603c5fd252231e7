//! banger's guest agent, as a library: the binary (`main.rs`) only parses
//! the command line and picks a mode.
//!
//! The agent serves the host (bangerd) over the agent protocol
//! ([`banger_protocol::agent`]) on every transport it finds: the
//! virtio-serial port under QEMU, vsock under Firecracker, or a Unix socket
//! for tests ([`transport`]). Each connection is one [`session`]: it answers
//! `Health` ([`health`]) and `Ports` ([`ports`]), runs processes for `Exec`
//! ([`exec`]) and powers the guest off.
//!
//! When it is PID 1 (images without an init) it also boots the guest
//! ([`init`]): mounts, kernel modules ([`modules`]), network ([`netconf`]),
//! the work disk ([`ext4`]), sshd, and a clean power off; and it reaps every
//! orphan ([`reaper`]). In both modes it writes the VM's name (and, under
//! systemd, its resolvers) into `/etc` ([`identity`]).

pub mod cli;
pub mod cmdline;
pub mod context;
pub mod exec;
pub mod ext4;
pub mod fdio;
pub mod health;
pub mod identity;
pub mod init;
pub mod log;
pub mod modules;
pub mod netconf;
pub mod ports;
pub mod power;
pub mod pty;
pub mod reaper;
pub mod service;
pub mod session;
pub mod sshd;
pub mod transport;

/// The agent's version, reported in `Hello` and `Health`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
