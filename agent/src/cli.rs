//! Command-line arguments of `banger-agent`, apart from the logic they
//! select (`service.rs` and `init.rs` read them).
//!
//! With no transport flag the agent finds its transports itself: the
//! virtio-serial port named [`AGENT_SERIAL_NAME`] and, when `/dev/vsock`
//! exists, vsock port [`AGENT_VSOCK_PORT`]. Any explicit transport flag
//! turns that discovery off, so a test on a host never touches the host's
//! devices or loads kernel modules.

use banger_protocol::agent::{AGENT_SERIAL_NAME, AGENT_VSOCK_PORT};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug, Clone, Default)]
#[command(name = "banger-agent", version, about = "banger's guest agent")]
pub struct Cli {
    /// Serve on a Unix socket at PATH (one session per connection). For
    /// tests on the host.
    #[arg(long, value_name = "PATH")]
    pub listen_unix: Vec<PathBuf>,

    /// Use this character device (or FIFO, or tty) as the serial transport
    /// instead of looking the port up by name.
    #[arg(long, value_name = "PATH")]
    pub serial_device: Option<PathBuf>,

    /// Listen on this AF_VSOCK port (default when `/dev/vsock` exists and no
    /// other transport flag is given: 1024).
    #[arg(long, value_name = "PORT")]
    pub vsock_port: Option<u32>,

    /// Answer `PowerOff` with `Done` but only log it (for tests).
    #[arg(long)]
    pub fake_poweroff: bool,

    /// Mount the work disk (ext4 labelled `banger-work`) on /root if it is
    /// attached and /root is not a mount point yet, then exit: the
    /// `ExecStartPre` of the systemd unit (as init the agent does it itself).
    #[arg(long)]
    pub mount_work_disk: bool,

    /// Log filter (`error`, `warn`, `info`, `debug`, or a tracing directive).
    #[arg(long, default_value = "info", value_name = "FILTER")]
    pub log: String,
}

/// The transports one run serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transports {
    pub unix: Vec<PathBuf>,
    pub serial: Option<SerialTarget>,
    pub vsock_port: Option<u32>,
}

/// Where the serial transport lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// The virtio-serial port with this name (found in sysfs).
    Named(String),
    /// An explicit path.
    Path(PathBuf),
}

impl Cli {
    /// Whether any transport was named on the command line.
    pub fn explicit_transports(&self) -> bool {
        !self.listen_unix.is_empty() || self.serial_device.is_some() || self.vsock_port.is_some()
    }

    /// The transports to serve; `vsock_present` says whether `/dev/vsock`
    /// exists (only consulted when no transport was named).
    pub fn transports(&self, vsock_present: bool) -> Transports {
        if self.explicit_transports() {
            Transports {
                unix: self.listen_unix.clone(),
                serial: self.serial_device.clone().map(SerialTarget::Path),
                vsock_port: self.vsock_port,
            }
        } else {
            Transports {
                unix: Vec::new(),
                serial: Some(SerialTarget::Named(AGENT_SERIAL_NAME.to_string())),
                vsock_port: vsock_present.then_some(AGENT_VSOCK_PORT),
            }
        }
    }

    /// The defaults, as PID 1 uses them when its arguments do not parse
    /// (the kernel passes unknown boot words to init as arguments).
    pub fn pid1_default() -> Self {
        Cli {
            log: "info".to_string(),
            ..Cli::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_means_discovery() {
        let cli = Cli::try_parse_from(["banger-agent"]).expect("parse");
        let t = cli.transports(true);
        assert_eq!(t.serial, Some(SerialTarget::Named("banger.agent".into())));
        assert_eq!(t.vsock_port, Some(1024));
        assert_eq!(cli.transports(false).vsock_port, None);
    }

    #[test]
    fn explicit_flags_turn_discovery_off() {
        let cli =
            Cli::try_parse_from(["banger-agent", "--listen-unix", "/tmp/a.sock"]).expect("parse");
        let t = cli.transports(true);
        assert_eq!(t.unix, vec![PathBuf::from("/tmp/a.sock")]);
        assert_eq!(t.serial, None);
        assert_eq!(t.vsock_port, None);
    }
}
