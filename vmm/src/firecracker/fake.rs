//! Test stand-in for Firecracker's API: a real hyper HTTP/1.1 server on a
//! Unix socket that records every request (method, path, body) and answers
//! through a closure. Unit tests only.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub method: String,
    pub path: String,
    pub body: String,
    pub content_type: Option<String>,
    pub content_length: Option<usize>,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
}

impl Reply {
    pub fn no_content() -> Self {
        Self::text(204, "")
    }
    pub fn json(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.into(),
            content_type: "application/json",
        }
    }
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.into(),
            content_type: "text/plain",
        }
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

pub(crate) struct FakeApi {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    pub async fn start(respond: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake API socket");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let respond: Responder = Arc::new(respond);
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let recorded = recorded.clone();
                        let respond = respond.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let header = |name| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let content_type = header(CONTENT_TYPE);
                            let content_length =
                                header(CONTENT_LENGTH).and_then(|v| v.parse().ok());
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                                .unwrap_or_default();
                            let rec = Recorded {
                                method,
                                path,
                                body,
                                content_type,
                                content_length,
                            };
                            let reply = respond(&rec);
                            recorded.lock().expect("lock").push(rec);
                            let mut resp = Response::builder().status(reply.status);
                            if !reply.body.is_empty() {
                                resp = resp.header(CONTENT_TYPE, reply.content_type);
                            }
                            Ok::<_, Infallible>(
                                resp.body(Full::new(Bytes::from(reply.body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            _dir: dir,
            socket,
            requests,
            task,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }
}
