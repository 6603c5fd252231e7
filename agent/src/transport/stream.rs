//! Connection-oriented transports (vsock, Unix): accept connections and
//! serve each as one session, many at once. When the connection ends, the
//! session ends and its processes are killed.

use crate::context::AgentContext;
use crate::fdio::{FdListener, FdStream};
use crate::limited;
use crate::log::{HOST_INPUT, TRANSPORT};
use crate::session::{Outbox, Session, WriterCmd, OUTBOX_CAPACITY};
use banger_protocol::agent::GuestCodec;
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, warn};

/// Accepts connections forever, one session task each.
pub async fn serve_listener(ctx: Arc<AgentContext>, transport: &'static str, listener: FdListener) {
    loop {
        match listener.accept().await {
            Ok(fd) => match FdStream::new(fd) {
                Ok(stream) => {
                    tokio::spawn(serve_connection(ctx.clone(), transport, stream));
                }
                Err(e) => limited!(
                    TRANSPORT,
                    warn!(transport, "cannot register connection: {e}")
                ),
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                limited!(TRANSPORT, warn!(transport, "accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Serves one connection until the host closes it.
pub async fn serve_connection(ctx: Arc<AgentContext>, transport: &'static str, stream: FdStream) {
    debug!(transport, "session connected");
    let (out, mut rx) = Outbox::channel(OUTBOX_CAPACITY);
    let mut sink = FramedWrite::new(stream.clone(), GuestCodec::default());
    let writer = tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                WriterCmd::Msg(msg) => {
                    if let Err(e) = sink.send(msg).await {
                        debug!(transport, "writing to the host failed: {e}");
                        break;
                    }
                }
                WriterCmd::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    });
    let mut session = Session::new(ctx, transport, out);
    let mut frames = FramedRead::new(stream, GuestCodec::default());
    let mut dropped = 0;
    loop {
        let next = frames.next().await;
        let skipped = frames.decoder().dropped;
        if skipped > dropped {
            limited!(
                HOST_INPUT,
                warn!(
                    transport,
                    skipped = skipped - dropped,
                    "skipped undecodable frames"
                )
            );
            dropped = skipped;
        }
        match next {
            Some(Ok(msg)) => session.handle(msg).await,
            Some(Err(e)) => {
                debug!(transport, "connection ended: {e}");
                break;
            }
            None => break,
        }
    }
    debug!(transport, session = ?session.hello(), "session disconnected");
    drop(session);
    // The writer ends once the last process task lets go of the outbox.
    drop(writer);
}
