//! A connection that speaks frames by hand, for tests that send what a
//! well-behaved [`banger_protocol::client::Client`] never would: garbage
//! payloads, oversized or truncated frames, requests before the handshake.

use std::io;
use std::path::Path;
use std::time::Duration;

use banger_protocol::{
    codec, decode, encode, ClientMessage, FrameError, Framed, Hello, ServerMessage,
};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// What reading from the daemon produced.
// Short-lived, like `ServerMessage` itself.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Received {
    Message(ServerMessage),
    /// The daemon closed the connection (EOF, or a reset after it closed
    /// with our unread bytes still queued).
    Closed,
    /// The daemon sent a frame that does not decode.
    BadFrame(FrameError),
    /// Any other I/O error.
    Io(io::Error),
}

/// A raw, unhandshaken connection to the daemon's socket.
#[derive(Debug)]
pub struct RawConnection {
    framed: Framed<UnixStream>,
}

impl RawConnection {
    pub async fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        Self {
            framed: Framed::new(stream, codec()),
        }
    }

    /// Connects and completes a valid handshake.
    pub async fn connect_handshaken(socket: &Path) -> Self {
        let mut conn = Self::connect(socket).await;
        conn.send(&ClientMessage::Hello(Hello::current())).await;
        match conn.recv(Duration::from_secs(10)).await {
            Received::Message(ServerMessage::Hello(_)) => conn,
            other => panic!("handshake refused: {other:?}"),
        }
    }

    /// Sends one well-formed frame.
    pub async fn send(&mut self, msg: &ClientMessage) {
        let payload = encode(msg).expect("encode");
        self.framed.send(payload).await.expect("send frame");
    }

    /// Sends a frame with a correct length header around arbitrary bytes.
    pub async fn send_payload(&mut self, payload: &[u8]) {
        let len = u32::try_from(payload.len()).expect("payload fits u32");
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes).await;
    }

    /// Writes bytes as they are, no framing.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await.expect("write");
        stream.flush().await.expect("flush");
    }

    /// Like [`Self::send_raw`], but a write error (the daemon already
    /// closed) is returned instead of panicking.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// Closes our writing half: the daemon sees EOF.
    pub async fn shutdown_write(&mut self) {
        self.framed.get_mut().shutdown().await.expect("shutdown");
    }

    /// Reads the next frame. Panics if nothing happens within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Received {
        let next = tokio::time::timeout(timeout, self.framed.next())
            .await
            .unwrap_or_else(|_| panic!("nothing from bangerd within {timeout:?}"));
        match next {
            None => Received::Closed,
            Some(Err(e)) if is_reset(&e) => Received::Closed,
            Some(Err(e)) => Received::Io(e),
            Some(Ok(bytes)) => match decode(&bytes) {
                Ok(msg) => Received::Message(msg),
                Err(e) => Received::BadFrame(e),
            },
        }
    }

    /// Reads the next frame, which must be a message.
    pub async fn recv_message(&mut self, timeout: Duration) -> ServerMessage {
        match self.recv(timeout).await {
            Received::Message(msg) => msg,
            other => panic!("expected a message from bangerd, got {other:?}"),
        }
    }

    /// Asserts the daemon closes the connection without sending anything more.
    pub async fn expect_closed(&mut self, timeout: Duration) {
        match self.recv(timeout).await {
            Received::Closed => {}
            other => panic!("expected bangerd to close the connection, got {other:?}"),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}
