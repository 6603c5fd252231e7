//! The virtio-serial transport (QEMU): the char device of the port named
//! [`AGENT_SERIAL_NAME`](banger_protocol::agent::AGENT_SERIAL_NAME).
//!
//! The device is found as `/dev/virtio-ports/<name>` (udev) or by scanning
//! `/sys/class/virtio-ports/*/name` (no udev in init mode). It stays open
//! for the agent's whole life; the host (a QEMU chardev socket) connects
//! and disconnects underneath. While no host is connected the kernel makes
//! `read` return 0 and `write` block, so:
//!
//! - a reader thread reads blocking; on 0 it tells the session the host is
//!   gone (the decode buffer is cleared: a torn frame of the old host
//!   must not swallow the next `Hello`) and polls every 250 ms;
//! - a writer thread writes blocking, waiting out a disconnected host;
//! - any other error closes the device, and it is looked up and reopened
//!   after a pause (the port may have been unplugged and plugged back).
//!
//! One [`Session`] lives across reconnects; a `Hello` with a new session id
//! kills the processes of the previous host and drops its queued output.
//! The reply to `Hello` starts with an extra `0x00`, so the host's decoder
//! drops whatever torn frame it may still hold.

use crate::cli::SerialTarget;
use crate::context::AgentContext;
use crate::limited;
use crate::log::{HOST_INPUT, TRANSPORT};
use crate::session::{Outbox, Session, WriterCmd, OUTBOX_CAPACITY};
use banger_protocol::agent::{encode_agent_frame, AgentToHost, GuestCodec, MAX_AGENT_FRAME};
use bytes::BytesMut;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Decoder;
use tracing::{debug, info, warn};

/// Pause between reads while no host is connected.
const HOST_ABSENT_POLL: Duration = Duration::from_millis(250);
/// Pause before reopening after an error.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// Pause between lookups while the port does not exist.
const PORT_MISSING_POLL: Duration = Duration::from_secs(1);

/// The port's device path: udev's symlink, else the sysfs scan.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let udev = Path::new("/dev/virtio-ports").join(name);
    if udev.exists() {
        return Some(udev);
    }
    find_port_in(
        name,
        Path::new("/sys/class/virtio-ports"),
        Path::new("/dev"),
    )
}

/// Scans `<sys>/*/name` for `name`; the device is `<dev>/<dir name>`.
pub fn find_port_in(name: &str, sys: &Path, dev: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(sys).ok()?.flatten().collect();
    dirs.sort_by_key(|e| e.file_name());
    dirs.into_iter()
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name))
        .map(|e| dev.join(e.file_name()))
}

/// The open device, shared by the reader and writer threads.
#[derive(Debug)]
struct Port {
    target: SerialTarget,
    current: Mutex<Option<Arc<File>>>,
}

impl Port {
    fn path(&self) -> io::Result<PathBuf> {
        match &self.target {
            SerialTarget::Path(p) => Ok(p.clone()),
            SerialTarget::Named(name) => find_port(name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no virtio-serial port named {name}"),
                )
            }),
        }
    }

    /// The open device, opening it if needed.
    fn get(&self) -> io::Result<Arc<File>> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cur.as_ref() {
            return Ok(f.clone());
        }
        let path = self.path()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        make_raw_if_tty(&file);
        info!(path = %path.display(), "serial port open");
        let file = Arc::new(file);
        *cur = Some(file.clone());
        Ok(file)
    }

    /// Forgets `file` (if still current) so the next [`Port::get`] reopens.
    fn invalidate(&self, file: &Arc<File>) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, file)) {
            *cur = None;
        }
    }
}

/// A tty (a serial console used as transport, or a test's PTY) would
/// mangle binary frames: switch it to raw mode.
fn make_raw_if_tty(file: &File) {
    use nix::sys::termios;
    if let Ok(mut t) = termios::tcgetattr(file) {
        termios::cfmakeraw(&mut t);
        let _ = termios::tcsetattr(file, termios::SetArg::TCSANOW, &t);
    }
}

/// What the reader thread reports.
#[derive(Debug)]
enum Inbound {
    Bytes(Vec<u8>),
    /// `read` returned 0: no host is connected (any more).
    HostGone,
}

/// What the writer thread receives.
#[derive(Debug)]
enum Wire {
    Frame(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

fn reader_thread(port: Arc<Port>, tx: mpsc::Sender<Inbound>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut host_present = true;
    let mut missing_logged = false;
    loop {
        let file = match port.get() {
            Ok(f) => f,
            Err(e) => {
                // A VM without the port (Firecracker) waits quietly.
                if e.kind() == io::ErrorKind::NotFound {
                    if !missing_logged {
                        info!("waiting for the serial port: {e}");
                        missing_logged = true;
                    }
                } else {
                    limited!(TRANSPORT, warn!("serial port unavailable: {e}"));
                }
                std::thread::sleep(PORT_MISSING_POLL);
                continue;
            }
        };
        match (&*file).read(&mut buf) {
            Ok(0) => {
                if host_present {
                    debug!("serial host disconnected");
                    host_present = false;
                    if tx.blocking_send(Inbound::HostGone).is_err() {
                        return;
                    }
                }
                std::thread::sleep(HOST_ABSENT_POLL);
            }
            Ok(n) => {
                host_present = true;
                if tx.blocking_send(Inbound::Bytes(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                limited!(TRANSPORT, warn!("serial read failed, reopening: {e}"));
                port.invalidate(&file);
                std::thread::sleep(REOPEN_DELAY);
            }
        }
    }
}

fn writer_thread(port: Arc<Port>, mut rx: mpsc::Receiver<Wire>) {
    while let Some(cmd) = rx.blocking_recv() {
        let frame = match cmd {
            Wire::Frame(f) => f,
            Wire::Flush(ack) => {
                let _ = ack.send(());
                continue;
            }
        };
        let mut data = &frame[..];
        while !data.is_empty() {
            let file = match port.get() {
                Ok(f) => f,
                Err(_) => {
                    // The reader thread reports why.
                    std::thread::sleep(PORT_MISSING_POLL);
                    continue;
                }
            };
            match (&*file).write(data) {
                Ok(0) => std::thread::sleep(HOST_ABSENT_POLL),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    // Some kernels refuse writes while the host is away.
                    std::thread::sleep(HOST_ABSENT_POLL);
                }
                Err(e) => {
                    limited!(TRANSPORT, warn!("serial write failed, reopening: {e}"));
                    port.invalidate(&file);
                    std::thread::sleep(REOPEN_DELAY);
                }
            }
        }
    }
}

/// Encodes one message for the wire; `Hello` gets a leading terminator.
fn wire_frame(msg: &AgentToHost) -> Option<Vec<u8>> {
    let frame = match encode_agent_frame(msg) {
        Ok(f) if f.len() <= MAX_AGENT_FRAME => f,
        Ok(_) | Err(_) => {
            limited!(TRANSPORT, warn!("dropping a reply that cannot be framed"));
            return None;
        }
    };
    if matches!(msg, AgentToHost::Hello { .. }) {
        let mut with_sync = Vec::with_capacity(frame.len() + 1);
        with_sync.push(0);
        with_sync.extend_from_slice(&frame);
        Some(with_sync)
    } else {
        Some(frame)
    }
}

/// Serves the serial port forever.
pub async fn run(ctx: Arc<AgentContext>, target: SerialTarget) {
    if let SerialTarget::Named(name) = &target {
        ensure_port_driver(name, ctx.pid1).await;
    }
    let port = Arc::new(Port {
        target,
        current: Mutex::new(None),
    });
    let (in_tx, mut in_rx) = mpsc::channel(16);
    let (wire_tx, wire_rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("serial-read".into())
        .spawn({
            let port = port.clone();
            move || reader_thread(port, in_tx)
        })
        .and_then(|_| {
            std::thread::Builder::new()
                .name("serial-write".into())
                .spawn({
                    let port = port.clone();
                    move || writer_thread(port, wire_rx)
                })
        });
    if let Err(e) = spawned {
        warn!("cannot start the serial transport: {e}");
        return;
    }

    let (out, mut rx) = Outbox::channel(OUTBOX_CAPACITY);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            let wire = match cmd {
                WriterCmd::Msg(msg) => match wire_frame(&msg) {
                    Some(f) => Wire::Frame(f),
                    None => continue,
                },
                WriterCmd::Flush(ack) => Wire::Flush(ack),
            };
            if wire_tx.send(wire).await.is_err() {
                return;
            }
        }
    });

    let mut session = Session::new(ctx, "serial", out);
    let mut codec = GuestCodec::default();
    let mut buf = BytesMut::new();
    let mut dropped = 0;
    while let Some(inbound) = in_rx.recv().await {
        match inbound {
            Inbound::HostGone => {
                buf.clear();
                continue;
            }
            Inbound::Bytes(bytes) => buf.extend_from_slice(&bytes),
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => session.handle(msg).await,
                Ok(None) => break,
                Err(e) => {
                    limited!(HOST_INPUT, warn!("serial decode error: {e}"));
                    buf.clear();
                    break;
                }
            }
        }
        if codec.dropped > dropped {
            limited!(
                HOST_INPUT,
                warn!(
                    skipped = codec.dropped - dropped,
                    "skipped undecodable serial frames"
                )
            );
            dropped = codec.dropped;
        }
    }
}

/// Makes sure the port device can appear: if it is missing, loads
/// `virtio_console` (through `modprobe` when there is one, else directly).
async fn ensure_port_driver(name: &str, pid1: bool) {
    if find_port(name).is_some() || crate::modules::is_loaded("virtio_console") {
        return;
    }
    let modprobe = ["/sbin/modprobe", "/usr/sbin/modprobe"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let loaded = match modprobe {
        Some(mp) if !pid1 => crate::reaper::run(&[mp, "virtio_console"], Duration::from_secs(10))
            .await
            .map(|o| o.status.shell_code() == 0)
            .unwrap_or(false),
        _ => false,
    };
    if !loaded {
        let dir = crate::modules::modules_dir();
        match tokio::task::spawn_blocking(move || crate::modules::load(&dir, &["virtio_console"]))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(
                "cannot load virtio_console: {}",
                crate::exec::error_chain(&e)
            ),
            Err(e) => warn!("cannot load virtio_console: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name_in_sysfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        for (dev, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport1p2", "banger.agent"),
        ] {
            std::fs::create_dir_all(sys.join(dev)).expect("mkdir");
            std::fs::write(sys.join(dev).join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(
            find_port_in("banger.agent", &sys, Path::new("/dev")),
            Some(PathBuf::from("/dev/vport1p2"))
        );
        assert_eq!(find_port_in("other", &sys, Path::new("/dev")), None);
    }

    #[test]
    fn hello_frames_start_with_a_terminator() {
        let hello = AgentToHost::Hello {
            version: 1,
            session: 2,
            agent_version: "x".into(),
            pid1: false,
        };
        let f = wire_frame(&hello).expect("frame");
        assert_eq!(f[0], 0);
        assert_eq!(*f.last().expect("last"), 0);
        let done = wire_frame(&AgentToHost::Done { id: 1 }).expect("frame");
        assert_ne!(done[0], 0);
    }
}
