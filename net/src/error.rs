//! [`NetError`]: what a host-networking operation reports. The message says
//! what failed; the cause (netlink errno, I/O error, `nft`'s stderr) is in
//! the `source` chain.

use std::io;

use thiserror::Error;

use crate::config::ConfigError;
use crate::ifname::IfNameError;
use crate::nat::NatError;

/// A failed host-networking operation.
#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    InvalidName(#[from] IfNameError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not open a netlink connection")]
    Connect(#[source] io::Error),
    #[error("netlink: {op} {link} failed")]
    Netlink {
        op: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("TAP {link}: {op} failed")]
    Tun {
        op: &'static str,
        link: String,
        #[source]
        source: io::Error,
    },
    #[error("{kind} {name} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("interface {name} already exists")]
    AlreadyExists { name: String },
    #[error("interface {name} is a {found}, not a {expected}")]
    WrongKind {
        name: String,
        expected: &'static str,
        found: String,
    },
    #[error(transparent)]
    Nat(#[from] NatError),
}

impl NetError {
    /// The errno behind a netlink or TAP failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Netlink { source, .. } => netlink_errno(source),
            NetError::Tun { source, .. } => source.raw_os_error(),
            NetError::Connect(source) => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The (positive) errno of a netlink error reply.
pub(crate) fn netlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|code| -code.get()),
        _ => None,
    }
}
