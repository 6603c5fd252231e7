//! Pseudo-terminals for `Exec { tty: Some(..) }`: allocation (both ends
//! close-on-exec from the start, so concurrent spawns never inherit them),
//! window size, the foreground process group, and the `pre_exec` step
//! that makes the child a session leader with the PTY as controlling
//! terminal.

use banger_protocol::agent::TtySize;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// Both ends of a fresh PTY.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub slave_path: PathBuf,
}

/// Opens a PTY pair of `size`.
pub fn open(size: TtySize) -> io::Result<Pty> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `m` is a new fd we own.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on a PTY master.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r NUL-terminated the buffer.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: open on a NUL-terminated path.
    let s = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a new fd we own.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_size(master.as_raw_fd(), size)?;
    Ok(Pty {
        master,
        slave,
        slave_path: PathBuf::from(path.to_string_lossy().into_owned()),
    })
}

/// `TIOCSWINSZ`: the kernel then sends `SIGWINCH` to the foreground group.
pub fn set_size(fd: RawFd, size: TtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TIOCGWINSZ`.
pub fn get_size(fd: RawFd) -> io::Result<TtySize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize to the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The terminal's foreground process group, if it has one.
pub fn foreground_group(master: RawFd) -> Option<i32> {
    // SAFETY: tcgetpgrp on an fd.
    let pgrp = unsafe { libc::tcgetpgrp(master) };
    (pgrp > 0).then_some(pgrp)
}

/// Runs in the child between `fork` and `exec`, after its stdio were set to
/// the slave: new session, slave (fd 0) as controlling terminal.
/// Async-signal-safe: two syscalls.
pub fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid/ioctl are async-signal-safe syscalls.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_pty_with_its_size() {
        let pty = open(TtySize { rows: 30, cols: 99 }).expect("openpty");
        assert!(
            pty.slave_path.starts_with("/dev/pts"),
            "{:?}",
            pty.slave_path
        );
        assert_eq!(
            get_size(pty.slave.as_raw_fd()).expect("size"),
            TtySize { rows: 30, cols: 99 }
        );
        set_size(pty.master.as_raw_fd(), TtySize { rows: 5, cols: 6 }).expect("resize");
        assert_eq!(
            get_size(pty.slave.as_raw_fd()).expect("size"),
            TtySize { rows: 5, cols: 6 }
        );
        // SAFETY: fcntl query.
        let flags = unsafe { libc::fcntl(pty.master.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }
}
