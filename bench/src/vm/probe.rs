//! SSH-ready, seen from outside the guest: sshd has sent its banner
//! (`SSH-2.0-...`) on `<ip>:22`. The guest's address lives in the
//! daemon's network namespace, so the probe runs on a thread of its own
//! that has `setns(2)`-ed into it. It tries to connect every
//! [`INTERVAL`] until the banner comes, the deadline passes or the probe
//! is dropped.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::oneshot;

/// Pause between connection attempts. A refused connection (the guest is
/// up, sshd is not yet) comes back at once, so this is the resolution of
/// the measurement once the guest's network is up.
pub const INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for a connection (no ARP answer yet: the guest's NIC is
/// not up).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait for the banner on an accepted connection.
const BANNER_TIMEOUT: Duration = Duration::from_secs(5);

/// A running probe; dropping it stops the thread within about a second.
#[derive(Debug)]
pub struct Probe {
    rx: oneshot::Receiver<anyhow::Result<Option<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Probe {
    /// Starts probing `addr` from inside the namespace at `netns` (a file
    /// under `/run/netns`; `None`: this process's namespace), until
    /// `deadline`.
    pub fn start(netns: Option<PathBuf>, addr: SocketAddr, deadline: Instant) -> Probe {
        let (tx, rx) = oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            let entered = netns.as_ref().map_or(Ok(()), enter);
            let result = entered.map(|()| wait_banner(addr, deadline, &flag));
            let _ = tx.send(result);
        });
        Probe { rx, stop }
    }

    /// When the banner was read; `None` if the deadline passed first.
    pub async fn wait(mut self) -> anyhow::Result<Option<Instant>> {
        (&mut self.rx)
            .await
            .map_err(|_| anyhow!("the SSH probe thread died"))?
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &PathBuf) -> anyhow::Result<()> {
    let file = File::open(path).map_err(|e| anyhow!("open {}: {e}", path.display()))?;
    // SAFETY: `file` is an open namespace file; setns affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(anyhow!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn wait_banner(addr: SocketAddr, deadline: Instant, stop: &AtomicBool) -> Option<Instant> {
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if let Ok(stream) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            if let Some(at) = read_banner(stream) {
                return Some(at);
            }
        }
        std::thread::sleep(INTERVAL);
    }
    None
}

/// When the first bytes of a banner arrived, if they did.
fn read_banner(mut stream: TcpStream) -> Option<Instant> {
    stream.set_read_timeout(Some(BANNER_TIMEOUT)).ok()?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got += n,
        }
    }
    let at = Instant::now();
    is_banner(&buf[..got]).then_some(at)
}

/// Whether `data` starts like an SSH identification string (RFC 4253 4.2).
pub fn is_banner(data: &[u8]) -> bool {
    data.starts_with(b"SSH-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn banners() {
        assert!(is_banner(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"));
        assert!(!is_banner(b"HTTP/1.1 400"));
        assert!(!is_banner(b"SSH"));
    }

    #[test]
    fn a_listener_that_sends_a_banner_is_found_and_a_silent_one_is_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");

        let ssh = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = ssh.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut conn in ssh.incoming().flatten() {
                let _ = conn.write_all(b"SSH-2.0-test\r\n");
            }
        });
        let started = Instant::now();
        let probe = Probe::start(None, addr, started + Duration::from_secs(20));
        let at = rt.block_on(probe.wait()).expect("probe ran");
        assert!(at.is_some_and(|t| t >= started));

        // Accepts and says something else: never ready; the deadline ends it.
        let http = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = http.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut conn in http.incoming().flatten() {
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n");
            }
        });
        let probe = Probe::start(None, addr, Instant::now() + Duration::from_millis(300));
        assert_eq!(rt.block_on(probe.wait()).expect("probe ran"), None);

        // Nothing listens (connections refused): retried until the deadline.
        let free = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let probe = Probe::start(None, addr, Instant::now() + Duration::from_millis(300));
        assert_eq!(rt.block_on(probe.wait()).expect("probe ran"), None);
    }
}
