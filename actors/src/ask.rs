//! Asking a named actor something, with a timeout, turning every way the
//! exchange can fail into an [`ErrorData`] a client can act on.

use std::time::Duration;

use banger_protocol::{ErrorData, ErrorKind};
use ractor::{rpc::CallResult, ActorRef, Message, RpcReplyPort};

/// Looks up the actor registered as `name`.
pub fn lookup<M: Message>(name: &str) -> Result<ActorRef<M>, ErrorData> {
    ractor::registry::where_is(name)
        .map(ActorRef::<M>::from)
        .ok_or_else(|| unavailable(name, "is not running"))
}

/// Sends `build(reply)` to the actor registered as `name` and waits up to
/// `timeout` for the answer.
pub async fn ask<M, T>(
    name: &str,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
    timeout: Duration,
) -> Result<T, ErrorData>
where
    M: Message,
    T: Send + 'static,
{
    let actor = lookup::<M>(name)?;
    ask_ref(name, &actor, build, timeout).await
}

/// Like [`ask`], for an actor reference already in hand.
pub async fn ask_ref<M, T>(
    name: &str,
    actor: &ActorRef<M>,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
    timeout: Duration,
) -> Result<T, ErrorData>
where
    M: Message,
    T: Send + 'static,
{
    match actor.call(build, Some(timeout)).await {
        Ok(CallResult::Success(value)) => Ok(value),
        Ok(CallResult::Timeout) => Err(timed_out(name, timeout)),
        Ok(CallResult::SenderError) => Err(unavailable(name, "stopped before answering")),
        Err(_) => Err(unavailable(name, "is not running")),
    }
}

/// The error of an actor that did not answer within `timeout`.
pub(crate) fn timed_out(name: &str, timeout: Duration) -> ErrorData {
    ErrorData::new(
        ErrorKind::Timeout,
        format!(
            "the {name} actor did not answer within {}s",
            timeout.as_secs_f32()
        ),
    )
    .with_hint("see `banger daemon logs`; the request can be retried")
}

/// The error of an actor that is not running or stopped before answering.
pub(crate) fn unavailable(name: &str, what: &str) -> ErrorData {
    ErrorData::new(ErrorKind::Unavailable, format!("the {name} actor {what}"))
        .with_hint("its supervisor restarts it within moments; retry the command")
}

/// Like [`ask`], but waits out a restart of the actor: `Unavailable`
/// answers are retried for up to `patience`. For the final step of long
/// operations (publishing a pulled image), which should not be lost to a
/// supervisor restarting the registry at that moment.
pub async fn ask_patiently<M, T>(
    name: &str,
    mut build: impl FnMut(RpcReplyPort<T>) -> M,
    timeout: Duration,
    patience: Duration,
) -> Result<T, ErrorData>
where
    M: Message,
    T: Send + 'static,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(50);
    loop {
        match ask(name, &mut build, timeout).await {
            Err(err)
                if err.kind == ErrorKind::Unavailable
                    && tokio::time::Instant::now() + delay < deadline =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Runs CPU-heavy async work (decompression, tar parsing) on a
/// blocking-pool thread with a runtime of its own, so the daemon's async
/// workers keep serving other requests. `cancel` stops it promptly.
pub async fn offload<T, F>(
    cancel: tokio_util::sync::CancellationToken,
    work: impl FnOnce() -> F + Send + 'static,
) -> Result<T, ErrorData>
where
    F: std::future::Future<Output = Result<T, ErrorData>>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
        rt.block_on(async {
            tokio::select! {
                _ = cancel.cancelled() => Err(ErrorData::new(ErrorKind::Cancelled, "cancelled")),
                res = work() => res,
            }
        })
    })
    .await
    .map_err(|e| ErrorData::new(ErrorKind::Internal, format!("worker thread failed: {e}")))?
}
