//! The vsock transport (Firecracker): a listening AF_VSOCK stream socket on
//! [`AGENT_VSOCK_PORT`](banger_protocol::agent::AGENT_VSOCK_PORT), any CID.
//! Firecracker's hybrid vsock turns the host's `CONNECT 1024` on its Unix
//! socket into a connection here.

use crate::fdio::FdListener;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Creates, binds and listens.
pub fn bind(port: u32) -> io::Result<FdListener> {
    // SAFETY: socket(2) returns a new fd or -1.
    let raw = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid sockaddr_vm; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: the pointer and length describe `addr`.
    let rc = unsafe {
        libc::bind(
            raw,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(raw, 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    FdListener::new(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_when_the_host_has_vsock() {
        if !std::path::Path::new("/dev/vsock").exists() {
            return;
        }
        // A port nobody else uses; binding twice must fail the second time.
        let first = bind(61_024).expect("bind vsock");
        let second = bind(61_024).expect_err("port is taken");
        assert_eq!(second.raw_os_error(), Some(libc::EADDRINUSE));
        drop(first);
    }
}
