//! HTTP/1.1 client for Firecracker's API socket (hyper 1 over a
//! `tokio::net::UnixStream`).
//!
//! Each request opens its own connection: on a local Unix socket that
//! costs next to nothing, and it keeps a request that timed out from
//! leaving a half-read response in a shared connection. The whole
//! exchange (connect, send, read the body) is bounded by the client's
//! timeout. A non-2xx answer becomes [`VmmError::Firecracker`] with the
//! `fault_message` of the body (or the raw body when it is not Firecracker's
//! error JSON).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::api::{self, ActionType, InstanceActionInfo, InstanceInfo, PutRequest};
use crate::VmmError;

/// Default bound on one API request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one Firecracker's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

/// Aborts the connection task when the request is dropped (e.g. on timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the bound on each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// PUTs `body` to its resource.
    pub async fn put<T: PutRequest>(&self, body: &T) -> Result<(), VmmError> {
        let path = body.path();
        let json = serde_json::to_vec(body)
            .map_err(|e| VmmError::Http(format!("encoding the body of PUT {path}: {e}")))?;
        self.request(Method::PUT, &path, Some(json)).await?;
        Ok(())
    }

    /// GETs `path` and decodes the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, VmmError> {
        let body = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|e| {
            VmmError::Http(format!(
                "unexpected answer to GET {path}: {e}: {}",
                String::from_utf8_lossy(&body)
            ))
        })
    }

    /// `GET /`.
    pub async fn instance_info(&self) -> Result<InstanceInfo, VmmError> {
        self.get("/").await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), VmmError> {
        self.put(&InstanceActionInfo { action_type }).await
    }

    /// Sends one request; returns the body of a 2xx answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmError> {
        let exchange = self.exchange(method.clone(), path, body);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(VmmError::Http(format!(
                "{method} {path}: no answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmError> {
        let http_err = |e: hyper::Error| VmmError::Http(format!("{method} {path}: {e}"));
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(VmmError::Control)?;
        // Title-case header names (`Content-Length`), as curl and
        // Firecracker's own examples send them.
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "firecracker API connection ended with an error");
            }
        }));

        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        if let Some(body) = &body {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_LENGTH, body.len());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| VmmError::Http(format!("{method} {path}: {e}")))?;

        let response = sender.send_request(req).await.map_err(http_err)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        tracing::debug!(%method, path, status = status.as_u16(), "firecracker API");
        if status.is_success() {
            Ok(body)
        } else {
            Err(fault(&method, path, status, &body))
        }
    }
}

/// Maps an error answer to [`VmmError::Firecracker`].
fn fault(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> VmmError {
    let fault_message = match serde_json::from_slice::<api::Error>(body) {
        Ok(e) => e.fault_message,
        Err(_) => {
            let raw = String::from_utf8_lossy(body).trim().to_string();
            if raw.is_empty() {
                status.canonical_reason().unwrap_or("no body").to_string()
            } else {
                raw
            }
        }
    };
    VmmError::Firecracker {
        method: method.to_string(),
        path: path.to_string(),
        status: status.as_u16(),
        fault_message,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::firecracker::api::{Drive, MachineConfiguration};
    use crate::firecracker::fake::{FakeApi, Reply};

    #[tokio::test]
    async fn put_sends_json_with_length_and_path() {
        let fake = FakeApi::start(|_| Reply::no_content()).await;
        let client = ApiClient::new(fake.socket());
        client
            .put(&Drive {
                drive_id: "work".into(),
                path_on_host: "/w.ext4".into(),
                is_root_device: false,
                is_read_only: true,
            })
            .await
            .unwrap();
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].method, "PUT");
        assert_eq!(reqs[0].path, "/drives/work");
        assert_eq!(reqs[0].content_type.as_deref(), Some("application/json"));
        assert_eq!(
            reqs[0].json(),
            serde_json::json!({
                "drive_id": "work",
                "path_on_host": "/w.ext4",
                "is_root_device": false,
                "is_read_only": true,
            })
        );
        assert_eq!(reqs[0].content_length, Some(reqs[0].body.len()));
    }

    #[tokio::test]
    async fn get_instance_info() {
        let fake = FakeApi::start(|r| {
            if r.method == "GET" && r.path == "/" {
                Reply::json(
                    200,
                    r#"{"id":"a","state":"Not started","vmm_version":"1.7.0","app_name":"Firecracker"}"#,
                )
            } else {
                Reply::json(400, r#"{"fault_message":"no"}"#)
            }
        })
        .await;
        let info = ApiClient::new(fake.socket()).instance_info().await.unwrap();
        assert_eq!(info.state, "Not started");
        assert_eq!(info.id, "a");
        assert!(!info.is_running());
        // Firecracker refuses a GET with a body: none is sent, not even an
        // empty one with a length.
        assert!(fake.requests()[0].body.is_empty());
        assert_eq!(fake.requests()[0].content_length, None);
    }

    #[tokio::test]
    async fn fault_message_is_mapped() {
        let fake = FakeApi::start(|_| {
            Reply::json(
                400,
                r#"{"fault_message":"Invalid vCPU count: it must be 1 or an even number"}"#,
            )
        })
        .await;
        let err = ApiClient::new(fake.socket())
            .put(&MachineConfiguration {
                vcpu_count: 3,
                mem_size_mib: 128,
                smt: Some(true),
            })
            .await
            .unwrap_err();
        match err {
            VmmError::Firecracker {
                method,
                path,
                status,
                fault_message,
            } => {
                assert_eq!(method, "PUT");
                assert_eq!(path, "/machine-config");
                assert_eq!(status, 400);
                assert_eq!(
                    fault_message,
                    "Invalid vCPU count: it must be 1 or an even number"
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[tokio::test]
    async fn non_json_error_body_is_kept_raw() {
        let fake = FakeApi::start(|_| Reply::text(500, "  internal meltdown\n")).await;
        let err = ApiClient::new(fake.socket())
            .action(ActionType::InstanceStart)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                VmmError::Firecracker { status: 500, fault_message, path, .. }
                    if fault_message == "internal meltdown" && path == "/actions"
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("internal meltdown"), "{err}");

        // An empty error body falls back to the status's reason.
        let fake = FakeApi::start(|_| Reply::text(404, "")).await;
        let err = ApiClient::new(fake.socket())
            .instance_info()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Firecracker { status: 404, fault_message, .. } if fault_message == "Not Found"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn undecodable_success_body_is_an_http_error() {
        let fake = FakeApi::start(|_| Reply::json(200, r#"{"id":"a"}"#)).await;
        let err = ApiClient::new(fake.socket())
            .instance_info()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Http(m) if m.contains("GET /")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_a_control_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ApiClient::new(dir.path().join("nope.sock"))
            .instance_info()
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Control(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts connections but never answers.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let started = std::time::Instant::now();
        let err = ApiClient::new(&path)
            .with_timeout(Duration::from_millis(200))
            .instance_info()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Http(m) if m.contains("no answer within")),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
