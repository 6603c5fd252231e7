//! Single-instance lock and the listening socket.
//!
//! The lock is an exclusive `flock` on `bangerd.lock` in the runtime dir,
//! held for the daemon's lifetime; the kernel drops it when the process
//! dies, however it dies. Whoever holds the lock owns the socket path, so
//! a socket file found while holding it is stale (left by a killed daemon)
//! and is removed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("another bangerd is already running (pid {pid}) for {}", runtime_dir.display())]
    AlreadyRunning { pid: String, runtime_dir: PathBuf },
    #[error("cannot prepare directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime directory {} is owned by uid {owner}, not by us (uid {uid})", path.display())]
    DirOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error("cannot use lock file {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket_group `{0}` does not exist")]
    NoSuchGroup(String),
    #[error("cannot set the permissions of {}", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates `path` (and parents) with mode 0700, or checks an existing one
/// is ours.
pub fn private_dir(path: &Path) -> Result<(), InstanceError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| InstanceError::Dir {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = std::fs::metadata(path).map_err(|source| InstanceError::Dir {
        path: path.to_path_buf(),
        source,
    })?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(InstanceError::DirOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// Holds the single-instance lock while alive.
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
}

/// Takes the lock or reports who holds it.
pub fn lock(lock_path: &Path, runtime_dir: &Path) -> Result<InstanceLock, InstanceError> {
    let err = |source| InstanceError::Lock {
        path: lock_path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path)
        .map_err(err)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(InstanceError::AlreadyRunning {
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.to_string()
                },
                runtime_dir: runtime_dir.to_path_buf(),
            });
        }
        Err((_, errno)) => return Err(err(errno.into())),
    };
    lock.set_len(0).map_err(err)?;
    lock.rewind().map_err(err)?;
    writeln!(lock, "{}", std::process::id()).map_err(err)?;
    lock.sync_all().map_err(err)?;
    Ok(InstanceLock { _lock: lock })
}

/// Binds the socket (removing a stale one) with the right mode: 0600, or
/// 0660 owned by `group` when one is configured. The umask is tightened
/// around `bind` so the socket never exists with looser permissions.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, InstanceError> {
    if path.exists() {
        warn!(path = %path.display(), "removing stale socket left by a previous bangerd");
        let _ = std::fs::remove_file(path);
    }
    let gid = if group.is_empty() {
        None
    } else {
        let g = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| InstanceError::NoSuchGroup(group.to_string()))?;
        Some(g.gid)
    };
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|source| InstanceError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let perm_err = |source| InstanceError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    let mode = match gid {
        Some(gid) => {
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| perm_err(e.into()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(perm_err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_reports_the_holder_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bangerd.lock");
        let _held = lock(&path, dir.path()).expect("first lock");
        let err = lock(&path, dir.path()).expect_err("second lock must fail");
        let msg = err.to_string();
        assert!(msg.contains("already running"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn socket_is_owner_only_and_stale_one_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"stale").expect("write stale");
        let _l = bind(&path, "").expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn unknown_group_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = bind(&dir.path().join("s.sock"), "no-such-group-banger").expect_err("must fail");
        assert!(err.to_string().contains("no-such-group-banger"));
    }
}
