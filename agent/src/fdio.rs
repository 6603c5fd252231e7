//! Non-blocking I/O on raw file descriptors through tokio's reactor: pipes
//! and PTY masters of processes ([`AsyncFdIo`]), accepted vsock and Unix
//! connections ([`FdStream`]) and their listening sockets ([`FdListener`]).
//!
//! tokio has no vsock type and its pipe type refuses PTYs, so the agent
//! wraps every fd the same way: `O_NONBLOCK` plus [`AsyncFd`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers an owned fd with the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the fd is valid and owned by the `AsyncFd` from here on;
    // nothing closes or replaces it behind the registration's back.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn sys_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn sys_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking fd registered with the reactor. Reads and writes may run
/// concurrently from different tasks (`&self` methods).
#[derive(Debug)]
pub struct AsyncFdIo {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncFdIo {
    /// Makes `fd` non-blocking and registers it.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(AsyncFdIo { fd: register(fd)? })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    /// Reads once; `Ok(0)` is end of file. A PTY master whose slave side is
    /// closed reports `EIO`: that is end of file too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys_read(fd.get_ref().as_raw_fd(), buf)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| sys_write(fd.get_ref().as_raw_fd(), data)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    fn poll_read_buf(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| sys_read(fd.get_ref().as_raw_fd(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_write_buf(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| sys_write(fd.get_ref().as_raw_fd(), data)) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A connected stream socket (vsock or Unix) as `AsyncRead + AsyncWrite`;
/// clones share the fd, so one can read while another writes.
#[derive(Debug, Clone)]
pub struct FdStream {
    io: Arc<AsyncFdIo>,
}

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(FdStream {
            io: Arc::new(AsyncFdIo::new(fd)?),
        })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.poll_read_buf(cx, buf)
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.poll_write_buf(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on the socket we own.
        unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(Ok(()))
    }
}

/// A listening stream socket of any family.
#[derive(Debug)]
pub struct FdListener {
    fd: AsyncFd<OwnedFd>,
}

impl FdListener {
    /// Wraps a socket that is already bound and listening.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(FdListener { fd: register(fd)? })
    }

    /// Accepts one connection (non-blocking, close-on-exec).
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: accept4 with no address buffer.
                let conn = unsafe {
                    libc::accept4(
                        fd.get_ref().as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: accept4 returned a new fd that we now own.
                    Ok(unsafe { OwnedFd::from_raw_fd(conn) })
                }
            });
            match result {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: valid out array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just created both.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[tokio::test]
    async fn pipe_round_trip_and_eof() {
        let (r, w) = pipe();
        let r = AsyncFdIo::new(r).expect("reader");
        let w = AsyncFdIo::new(w).expect("writer");
        // Larger than a pipe buffer: the writer must wait for the reader.
        let data = vec![7u8; 200_000];
        let writer = async {
            w.write_all(&data).await.expect("write");
            drop(w);
        };
        let reader = async {
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = r.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), data.len());
    }

    #[tokio::test]
    async fn unix_listener_and_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let std_listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let listener = FdListener::new(OwnedFd::from(std_listener)).expect("listener");
        let client = tokio::spawn({
            let path = path.clone();
            async move {
                let mut c = tokio::net::UnixStream::connect(path)
                    .await
                    .expect("connect");
                c.write_all(b"ping").await.expect("write");
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).await.expect("read");
                buf
            }
        });
        let conn = listener.accept().await.expect("accept");
        let mut stream = FdStream::new(conn).expect("stream");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await.expect("write");
        assert_eq!(&client.await.expect("client"), b"pong");
    }
}
