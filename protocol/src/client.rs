//! An async client for `bangerd`'s socket, used by the CLI, the tests and
//! the benchmarks: connect, handshake, send requests, read progress and
//! replies.

use std::path::{Path, PathBuf};

use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;

use crate::{
    codec, decode, encode, ClientMessage, ErrorData, ErrorKind, Event, FrameError, Framed, Hello,
    OutputStream, Progress, Request, Response, ServerHello, ServerMessage,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to bangerd at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to bangerd failed")]
    Io(#[source] std::io::Error),
    #[error("bangerd closed the connection before answering")]
    Closed,
    #[error("bad frame from bangerd")]
    Frame(#[source] FrameError),
    /// The daemon answered with an error.
    #[error("{0}")]
    Daemon(ErrorData),
    #[error("unexpected message from bangerd: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The daemon-side error, if this is one.
    pub fn daemon_error(&self) -> Option<&ErrorData> {
        match self {
            ClientError::Daemon(e) => Some(e),
            _ => None,
        }
    }
}

/// One handshaken connection to the daemon. Requests on one `Client` are
/// sequential; open several clients for parallel work.
#[derive(Debug)]
pub struct Client {
    framed: Framed<UnixStream>,
    next_id: u64,
    server: ServerHello,
}

impl Client {
    /// Connects to the socket and performs the version handshake.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Self::handshake(stream, Hello::current()).await
    }

    /// Performs the handshake on an open stream with the given hello.
    pub async fn handshake(stream: UnixStream, hello: Hello) -> Result<Self, ClientError> {
        let mut framed = Framed::new(stream, codec());
        let payload = encode(&ClientMessage::Hello(hello)).map_err(ClientError::Frame)?;
        framed.send(payload).await.map_err(ClientError::Io)?;
        match read_message(&mut framed).await? {
            ServerMessage::Hello(server) => Ok(Self {
                framed,
                next_id: 1,
                server,
            }),
            ServerMessage::Error(err) => Err(ClientError::Daemon(err)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// What the daemon said about itself in the handshake.
    pub fn server(&self) -> &ServerHello {
        &self.server
    }

    /// Sends a request and returns its id without waiting for the answer.
    pub async fn send(&mut self, request: Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let payload =
            encode(&ClientMessage::Request { id, request }).map_err(ClientError::Frame)?;
        self.framed.send(payload).await.map_err(ClientError::Io)?;
        Ok(id)
    }

    /// Asks the daemon to cancel request `id`; its final reply still follows.
    pub async fn cancel(&mut self, id: u64) -> Result<(), ClientError> {
        let payload = encode(&ClientMessage::Cancel { id }).map_err(ClientError::Frame)?;
        self.framed.send(payload).await.map_err(ClientError::Io)
    }

    /// Sends stdin bytes, end of stdin or a terminal resize for request `id`.
    pub async fn send_message(&mut self, msg: ClientMessage) -> Result<(), ClientError> {
        let payload = encode(&msg).map_err(ClientError::Frame)?;
        self.framed.send(payload).await.map_err(ClientError::Io)
    }

    /// Reads the next frame from the daemon.
    pub async fn next_message(&mut self) -> Result<ServerMessage, ClientError> {
        read_message(&mut self.framed).await
    }

    /// Sends a request and waits for its final reply, ignoring progress.
    pub async fn request(&mut self, request: Request) -> Result<Response, ClientError> {
        self.request_with_progress(request, |_| {}).await
    }

    /// Sends a request, hands every progress event to `on_progress` and
    /// returns the final reply.
    pub async fn request_with_progress(
        &mut self,
        request: Request,
        mut on_progress: impl FnMut(Progress) + Send,
    ) -> Result<Response, ClientError> {
        let id = self.send(request).await?;
        self.wait_reply(id, &mut on_progress, &mut |_| {}).await
    }

    /// Reads frames until the final reply to `id`, routing progress and
    /// events to the callbacks.
    pub async fn wait_reply(
        &mut self,
        id: u64,
        on_progress: &mut (dyn FnMut(Progress) + Send),
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Response, ClientError> {
        self.wait_reply_with_output(id, on_progress, on_event, &mut |_, _| {})
            .await
    }

    /// [`Client::wait_reply`], also routing `Output` frames to `on_output`.
    pub async fn wait_reply_with_output(
        &mut self,
        id: u64,
        on_progress: &mut (dyn FnMut(Progress) + Send),
        on_event: &mut (dyn FnMut(Event) + Send),
        on_output: &mut (dyn FnMut(OutputStream, Vec<u8>) + Send),
    ) -> Result<Response, ClientError> {
        loop {
            match self.next_message().await? {
                ServerMessage::Progress { id: pid, progress } if pid == id => on_progress(progress),
                ServerMessage::Event { id: eid, event } if eid == id => on_event(event),
                ServerMessage::Output {
                    id: oid,
                    stream,
                    data,
                } if oid == id => on_output(stream, data),
                ServerMessage::Reply { id: rid, result } if rid == id => {
                    return result.map_err(ClientError::Daemon)
                }
                ServerMessage::Error(err) => return Err(ClientError::Daemon(err)),
                // Frames for other (earlier, abandoned) requests are skipped.
                ServerMessage::Progress { .. }
                | ServerMessage::Event { .. }
                | ServerMessage::Output { .. }
                | ServerMessage::Reply { .. } => {}
                ServerMessage::Hello(_) => {
                    return Err(ClientError::Unexpected("a second handshake".into()))
                }
            }
        }
    }
}

async fn read_message(framed: &mut Framed<UnixStream>) -> Result<ServerMessage, ClientError> {
    match framed.next().await {
        None => Err(ClientError::Closed),
        Some(Err(e)) => Err(ClientError::Io(e)),
        Some(Ok(bytes)) => decode(&bytes).map_err(ClientError::Frame),
    }
}

/// A local error in the shape the daemon uses, for uniform CLI reporting.
pub fn local_error(kind: ErrorKind, message: impl Into<String>) -> ErrorData {
    ErrorData::new(kind, message)
}
