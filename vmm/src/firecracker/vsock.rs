//! Host-initiated connections over Firecracker's hybrid vsock.
//!
//! Firecracker listens on the device's `uds_path`. A host process connects,
//! writes `CONNECT <port>\n`, and Firecracker answers `OK <host port>\n`
//! once the guest accepted the connection on that vsock port (or closes
//! the socket when nothing listens there). From then on the Unix stream
//! carries the guest connection's bytes. The acknowledgement is read one
//! byte at a time so that nothing the guest sends right after it is
//! consumed here.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::VmmError;

/// Longest acknowledgement line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

/// Connects to guest vsock `port` through Firecracker's `uds_path`, within
/// `timeout` for the whole handshake.
pub async fn connect(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VmmError> {
    match tokio::time::timeout(timeout, handshake(uds_path, port)).await {
        Ok(result) => result,
        Err(_) => Err(VmmError::Agent(format!(
            "no answer to CONNECT {port} on {} within {timeout:?}",
            uds_path.display()
        ))),
    }
}

async fn handshake(uds_path: &Path, port: u32) -> Result<UnixStream, VmmError> {
    let mut stream = UnixStream::connect(uds_path)
        .await
        .map_err(|e| VmmError::Agent(format!("connecting to {}: {e}", uds_path.display())))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| VmmError::Agent(format!("sending CONNECT {port}: {e}")))?;

    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| VmmError::Agent(format!("reading the answer to CONNECT {port}: {e}")))?;
        if n == 0 {
            return Err(VmmError::Agent(if line.is_empty() {
                format!(
                    "the VMM closed the connection to vsock port {port} \
                     (is the guest agent listening?)"
                )
            } else {
                format!(
                    "truncated answer to CONNECT {port}: {:?}",
                    String::from_utf8_lossy(&line)
                )
            }));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Err(VmmError::Agent(format!(
                "overlong answer to CONNECT {port}: {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
    }
    let reply = String::from_utf8_lossy(&line);
    if is_ok_reply(&reply) {
        Ok(stream)
    } else {
        Err(VmmError::Agent(format!(
            "vsock CONNECT {port} refused: {:?}",
            reply.trim_end()
        )))
    }
}

/// `OK <number>`.
fn is_ok_reply(line: &str) -> bool {
    line.strip_prefix("OK ")
        .is_some_and(|n| !n.is_empty() && n.trim_end_matches('\r').parse::<u32>().is_ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::net::UnixListener;

    /// A fake hybrid-vsock listener: reads the CONNECT line, answers
    /// `reply`, then (if `then` is set) writes those bytes right after.
    async fn fake_listener(
        reply: &'static [u8],
        then: &'static [u8],
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::task::JoinHandle<String>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).await.unwrap() == 1 {
                got.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            // Reply and the following payload in a single write, as a
            // fast guest would: the client must not eat the payload.
            let mut out = reply.to_vec();
            out.extend_from_slice(then);
            s.write_all(&out).await.unwrap();
            // Echo whatever comes next until EOF.
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            String::from_utf8(got).unwrap()
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn ok_handshake_returns_the_stream_without_over_reading() {
        let (_dir, path, server) = fake_listener(b"OK 1073741824\n", b"HELLO").await;
        let mut stream = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"HELLO");
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        drop(stream);
        assert_eq!(server.await.unwrap(), "CONNECT 1024\n");
    }

    #[tokio::test]
    async fn other_reply_is_an_agent_error_with_the_reply() {
        let (_dir, path, _server) = fake_listener(b"ERR no listener\n", b"").await;
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        match err {
            VmmError::Agent(msg) => assert!(msg.contains("ERR no listener"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn closed_connection_is_an_agent_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 13];
            let _ = s.read_exact(&mut b).await;
            // Dropped: Firecracker's answer when the guest port is closed.
        });
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Agent(m) if m.contains("closed the connection")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn silence_times_out_and_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let err = connect(&path, 7, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Agent(m) if m.contains("no answer to CONNECT 7")),
            "{err:?}"
        );

        let err = connect(&dir.path().join("absent.sock"), 7, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Agent(m) if m.contains("absent.sock")),
            "{err:?}"
        );
    }

    #[test]
    fn ok_reply_shape() {
        assert!(is_ok_reply("OK 1"));
        assert!(is_ok_reply("OK 1073741824"));
        assert!(!is_ok_reply("OK"));
        assert!(!is_ok_reply("OK "));
        assert!(!is_ok_reply("OK x"));
        assert!(!is_ok_reply("ok 1"));
        assert!(!is_ok_reply("FAIL 1"));
    }
}
