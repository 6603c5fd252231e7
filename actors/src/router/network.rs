//! Request handling for host networking and DNS (being wired up).

use banger_protocol::{ErrorData, ErrorKind, Request, Response};

use super::dispatch::RequestCtx;

pub async fn handle(request: Request, _rctx: &RequestCtx) -> Result<Response, ErrorData> {
    Err(ErrorData::new(
        ErrorKind::Unavailable,
        format!("{} is not available yet", request.name()),
    ))
}
