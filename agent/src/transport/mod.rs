//! The byte streams the agent serves the protocol on. Each carries frames
//! of [`GuestCodec`](banger_protocol::agent::GuestCodec) and feeds
//! [`Session`](crate::session::Session)s:
//!
//! - [`serial`]: the virtio-serial port (QEMU); one long-lived stream whose
//!   host side comes and goes, sessions told apart by `Hello`.
//! - [`vsock`]: AF_VSOCK (Firecracker); one session per connection.
//! - [`unix`]: a Unix socket (tests on the host); one session per connection.

pub mod serial;
pub mod stream;
pub mod unix;
pub mod vsock;

use crate::cli::Transports;
use crate::context::AgentContext;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen on Unix socket {path}")]
    Unix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on vsock port {port}")]
    Vsock {
        port: u32,
        #[source]
        source: io::Error,
    },
}

/// Binds every listener, then serves all transports in background tasks.
/// Fails if a listener cannot be bound; `optional_vsock` turns a vsock
/// failure into a warning (vsock found by discovery, not asked for).
pub fn start(
    ctx: Arc<AgentContext>,
    transports: &Transports,
    optional_vsock: bool,
) -> Result<(), TransportError> {
    for path in &transports.unix {
        let listener = unix::bind(path).map_err(|source| TransportError::Unix {
            path: path.clone(),
            source,
        })?;
        info!(path = %path.display(), "listening on Unix socket");
        tokio::spawn(stream::serve_listener(ctx.clone(), "unix", listener));
    }
    if let Some(port) = transports.vsock_port {
        match vsock::bind(port) {
            Ok(listener) => {
                info!(port, "listening on vsock");
                tokio::spawn(stream::serve_listener(ctx.clone(), "vsock", listener));
            }
            Err(source) if optional_vsock => {
                warn!(port, "vsock unavailable: {source}");
            }
            Err(source) => return Err(TransportError::Vsock { port, source }),
        }
    }
    if let Some(target) = &transports.serial {
        tokio::spawn(serial::run(ctx, target.clone()));
    }
    Ok(())
}
