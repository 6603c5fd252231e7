//! The Unix socket transport (`--listen-unix PATH`), for tests on the
//! host: same sessions as vsock, on a path.

use crate::fdio::FdListener;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Binds `path` (replacing a stale socket there, never another file) with
/// mode 0600.
pub fn bind(path: &Path) -> io::Result<FdListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    FdListener::new(OwnedFd::from(listener))
}
