//! One client connection: handshake, then requests, each in its own task,
//! with progress and replies multiplexed back through one writer task.
//!
//! Framing errors are answered, never fatal to the daemon: an undecodable
//! frame gets a `MalformedFrame` error and the connection goes on (frame
//! boundaries are intact); an oversized length prefix gets `FrameTooLarge`
//! and the connection is closed (the stream cannot be resynchronised); a
//! truncated frame at EOF or a client that goes away cancels that
//! connection's in-flight requests and nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::{
    codec, decode, encode, ClientMessage, ErrorData, ErrorKind, ServerHello, ServerMessage,
    BANGER_VERSION, FEATURES, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::dispatch::{self, ClientInput, RequestCtx};
use super::RouterContext;

/// How long a new connection may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(stream: UnixStream, ctx: Arc<RouterContext>, conn: u64) {
    let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
    let span = info_span!("conn", conn, peer_uid);
    serve_inner(stream, ctx, peer_uid).instrument(span).await;
}

async fn serve_inner(stream: UnixStream, ctx: Arc<RouterContext>, peer_uid: Option<u32>) {
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, codec());
    let (out, out_rx) = mpsc::channel::<ServerMessage>(256);
    let writer = tokio::spawn(write_loop(FramedWrite::new(write, codec()), out_rx));

    if handshake(&mut reader, &out).await {
        request_loop(&mut reader, &out, &ctx, peer_uid).await;
    }
    drop(out);
    let _ = writer.await;
}

async fn write_loop(
    mut sink: FramedWrite<tokio::net::unix::OwnedWriteHalf, banger_protocol::FrameCodec>,
    mut rx: mpsc::Receiver<ServerMessage>,
) {
    while let Some(msg) = rx.recv().await {
        let payload = match encode(&msg) {
            Ok(p) => p,
            Err(err) => {
                // A reply too big to send: tell the client instead of dropping it.
                warn!(error = %err, "reply could not be encoded");
                let id = match &msg {
                    ServerMessage::Reply { id, .. } => Some(*id),
                    _ => None,
                };
                let err = ErrorData::from_error(ErrorKind::Internal, &err);
                let fallback = match id {
                    Some(id) => ServerMessage::Reply {
                        id,
                        result: Err(err),
                    },
                    None => ServerMessage::Error(err),
                };
                match encode(&fallback) {
                    Ok(p) => p,
                    Err(_) => continue,
                }
            }
        };
        if sink.send(payload).await.is_err() {
            // The client is gone; drain so senders never block.
            while rx.recv().await.is_some() {}
            return;
        }
    }
}

fn frame_error(err: &std::io::Error) -> ErrorData {
    if banger_protocol::is_frame_too_large(err) {
        ErrorData::new(
            ErrorKind::FrameTooLarge,
            format!("frame exceeds the limit of {MAX_FRAME_LEN} bytes; closing the connection"),
        )
    } else {
        ErrorData::from_error(ErrorKind::MalformedFrame, err)
    }
}

/// Reads and answers the hello. Returns false when the connection must close.
async fn handshake(
    reader: &mut FramedRead<tokio::net::unix::OwnedReadHalf, banger_protocol::FrameCodec>,
    out: &mpsc::Sender<ServerMessage>,
) -> bool {
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Err(_) => {
            let _ = out
                .send(ServerMessage::Error(ErrorData::new(
                    ErrorKind::Timeout,
                    format!("no handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()),
                )))
                .await;
            return false;
        }
        Ok(None) => return false,
        Ok(Some(Err(err))) => {
            let _ = out.send(ServerMessage::Error(frame_error(&err))).await;
            return false;
        }
        Ok(Some(Ok(bytes))) => bytes,
    };
    let reply = match decode::<ClientMessage>(&first) {
        Ok(ClientMessage::Hello(hello)) if hello.protocol_version == PROTOCOL_VERSION => {
            debug!(client_version = %hello.client_version, "handshake ok");
            let hello = ServerHello {
                protocol_version: PROTOCOL_VERSION,
                daemon_version: BANGER_VERSION.to_string(),
                features: FEATURES.iter().map(|f| f.to_string()).collect(),
                pid: std::process::id(),
            };
            return out.send(ServerMessage::Hello(hello)).await.is_ok();
        }
        Ok(ClientMessage::Hello(hello)) => ErrorData::new(
            ErrorKind::VersionMismatch,
            format!(
                "client speaks protocol {} (banger {}), this bangerd speaks protocol {} (banger {})",
                hello.protocol_version, hello.client_version, PROTOCOL_VERSION, BANGER_VERSION
            ),
        )
        .with_hint("use a banger CLI of the same version as bangerd, or restart the daemon with `banger daemon stop`"),
        Ok(_) => ErrorData::new(ErrorKind::InvalidRequest, "the first message must be a handshake (Hello)"),
        Err(err) => ErrorData::from_error(ErrorKind::MalformedFrame, &err)
            .with_hint("the first frame must be a postcard-encoded ClientMessage::Hello"),
    };
    let _ = out.send(ServerMessage::Error(reply)).await;
    false
}

/// Hands client input to its request; input for a request that is not
/// (or no longer) in flight, or that reads no input, is dropped.
async fn route_input(
    inflight: &HashMap<u64, (CancellationToken, mpsc::Sender<ClientInput>)>,
    id: u64,
    input: ClientInput,
) {
    if let Some((_, tx)) = inflight.get(&id) {
        // Waiting here is the backpressure on a fast stdin.
        let _ = tx.send(input).await;
    }
}

async fn request_loop(
    reader: &mut FramedRead<tokio::net::unix::OwnedReadHalf, banger_protocol::FrameCodec>,
    out: &mpsc::Sender<ServerMessage>,
    ctx: &Arc<RouterContext>,
    peer_uid: Option<u32>,
) {
    let conn_cancel = CancellationToken::new();
    let mut inflight: HashMap<u64, (CancellationToken, mpsc::Sender<ClientInput>)> = HashMap::new();
    let mut tasks: JoinSet<u64> = JoinSet::new();

    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            Some(done) = tasks.join_next() => {
                if let Ok(id) = done {
                    inflight.remove(&id);
                }
            }
            frame = reader.next() => match frame {
                None => {
                    debug!("client closed the connection");
                    conn_cancel.cancel();
                    break;
                }
                Some(Err(err)) => {
                    let error = frame_error(&err);
                    debug!(error = %error, "frame error");
                    conn_cancel.cancel();
                    if error.kind == ErrorKind::FrameTooLarge {
                        let _ = out.send(ServerMessage::Error(error)).await;
                    }
                    break;
                }
                Some(Ok(bytes)) => match decode::<ClientMessage>(&bytes) {
                    Err(err) => {
                        let error = ErrorData::from_error(ErrorKind::MalformedFrame, &err)
                            .with_hint("the frame was skipped; the connection is still usable");
                        if out.send(ServerMessage::Error(error)).await.is_err() {
                            break;
                        }
                    }
                    Ok(ClientMessage::Request { id, request }) => {
                        if inflight.contains_key(&id) {
                            let err = ErrorData::new(ErrorKind::InvalidRequest, format!("request id {id} is already in flight on this connection"));
                            let _ = out.send(ServerMessage::Reply { id, result: Err(err) }).await;
                            continue;
                        }
                        let cancel = conn_cancel.child_token();
                        let (input_tx, input_rx) = mpsc::channel(64);
                        inflight.insert(id, (cancel.clone(), input_tx));
                        let rctx = RequestCtx {
                            id,
                            ctx: ctx.clone(),
                            out: out.clone(),
                            cancel,
                            peer_uid,
                            started: Instant::now(),
                            connection: conn_cancel.clone(),
                            input: std::sync::Mutex::new(Some(input_rx)),
                        };
                        let span = info_span!("request", id, op = request.name());
                        tasks.spawn(async move {
                            dispatch::run(request, rctx).await;
                            id
                        }.instrument(span));
                    }
                    Ok(ClientMessage::Cancel { id }) => {
                        if let Some((token, _)) = inflight.get(&id) {
                            debug!(id, "request cancelled by client");
                            token.cancel();
                        }
                    }
                    Ok(ClientMessage::Input { id, data }) => {
                        route_input(&inflight, id, ClientInput::Data(data)).await;
                    }
                    Ok(ClientMessage::InputClose { id }) => {
                        route_input(&inflight, id, ClientInput::Close).await;
                    }
                    Ok(ClientMessage::Resize { id, size }) => {
                        route_input(&inflight, id, ClientInput::Resize(size)).await;
                    }
                    Ok(ClientMessage::Hello(_)) => {
                        let err = ErrorData::new(ErrorKind::InvalidRequest, "handshake already done on this connection");
                        if out.send(ServerMessage::Error(err)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }

    // Shutdown or disconnect: in-flight requests get the grace period to
    // finish (a disconnect has already cancelled them), then are cancelled;
    // every one of them still sends its final reply.
    if !tasks.is_empty() {
        let grace = tokio::time::sleep(ctx.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut grace, if !conn_cancel.is_cancelled() => conn_cancel.cancel(),
            }
        }
    }
}
