//! A small QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is line-delimited JSON. On connect QEMU sends a greeting
//! (`{"QMP": {...}}`), the client leaves negotiation mode with
//! `qmp_capabilities`, then sends `{"execute", "arguments", "id"}` and gets
//! back `{"return", "id"}` or `{"error": {"class", "desc"}, "id"}`.
//! Asynchronous events (`{"event", "data", "timestamp"}`: `POWERDOWN`,
//! `SHUTDOWN`, `RESET`...) may arrive at any point, also between a command
//! and its reply; [`QmpClient`] keeps the most recent ones aside.
//!
//! One command is in flight at a time (`&mut self`). Reads are cancel-safe
//! (partial input stays in the client's buffer); a cancelled or failed
//! command leaves the client [`broken`](QmpClient::is_broken), and its
//! owner ([`super::QemuHandle`]) then opens a new connection. QEMU serves
//! one QMP client per socket at a time, so a client must be dropped before
//! another can be served.

use std::collections::VecDeque;
use std::io;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::VmmError;

/// Largest QMP message accepted (`query-qmp-schema` is about 200 KiB).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Events kept for [`QmpClient::take_events`]; older ones are dropped.
pub const MAX_EVENTS: usize = 64;

/// QEMU's version from the greeting.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// `SHUTDOWN`, `POWERDOWN`, `RESET`, `STOP`...
    pub name: String,
    /// The event's `data` (`Null` when it has none).
    pub data: Value,
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    /// Bytes read but not yet consumed as a message.
    buf: Vec<u8>,
    /// How far `buf` has been searched for a newline.
    scanned: usize,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    version: Option<QemuVersion>,
    /// Set while a command is in flight and left set when it fails or is
    /// cancelled: the stream may then hold a stale reply or half a request.
    broken: bool,
}

/// What one QMP line is.
enum Message {
    Greeting(Value),
    Event(QmpEvent),
    Reply {
        id: Option<Value>,
        result: Result<Value, VmmError>,
    },
}

fn protocol(msg: impl Into<String>) -> VmmError {
    VmmError::QmpProtocol(msg.into())
}

fn parse(line: &[u8]) -> Result<Message, VmmError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        protocol(format!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    let Value::Object(mut obj) = value else {
        return Err(protocol(format!("expected a JSON object, got {value}")));
    };
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(event) = obj.remove("event") {
        let name = event
            .as_str()
            .ok_or_else(|| protocol(format!("event name is not a string: {event}")))?
            .to_string();
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(QmpEvent { name, data }));
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(Message::Reply {
            id,
            result: Ok(ret),
        });
    }
    if let Some(error) = obj.remove("error") {
        let field = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        return Ok(Message::Reply {
            id,
            result: Err(VmmError::Qmp {
                class: field("class"),
                desc: field("desc"),
            }),
        });
    }
    Err(protocol(format!("unknown message: {}", Value::Object(obj))))
}

impl QmpClient {
    /// Connects to the QMP socket at `path` and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path).await.map_err(VmmError::Control)?;
        Self::handshake(stream).await
    }

    /// Reads the greeting on an open stream and leaves negotiation mode.
    pub async fn handshake(stream: UnixStream) -> Result<Self, VmmError> {
        let mut client = Self {
            stream,
            buf: Vec::new(),
            scanned: 0,
            next_id: 1,
            events: VecDeque::new(),
            version: None,
            broken: true,
        };
        loop {
            match client.read_message().await? {
                Message::Greeting(greeting) => {
                    client.version = greeting
                        .get("version")
                        .and_then(|v| v.get("qemu"))
                        .and_then(|v| QemuVersion::deserialize(v).ok());
                    break;
                }
                Message::Event(event) => client.record(event),
                Message::Reply { .. } => {
                    return Err(protocol("a reply arrived before the QMP greeting"))
                }
            }
        }
        client.broken = false;
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> Option<QemuVersion> {
        self.version
    }

    /// Whether the connection can no longer be trusted (a command failed
    /// on the transport or was cancelled half-way).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Runs `command` with `arguments` (a JSON object, or `None`) and
    /// returns its `return` value. A QMP error reply is
    /// [`VmmError::Qmp`] and leaves the connection usable; events that
    /// arrive meanwhile are kept for [`take_events`](Self::take_events).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        if self.broken {
            return Err(protocol(
                "the QMP connection is unusable after an earlier failure",
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), json!(command));
        if let Some(arguments) = arguments {
            if !arguments.is_object() {
                return Err(protocol(format!(
                    "arguments of {command} must be a JSON object, got {arguments}"
                )));
            }
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), json!(id));
        let mut line = Value::Object(request).to_string().into_bytes();
        line.push(b'\n');

        self.broken = true;
        self.stream
            .write_all(&line)
            .await
            .map_err(VmmError::Control)?;
        loop {
            match self.read_message().await? {
                Message::Event(event) => self.record(event),
                Message::Greeting(_) => {
                    return Err(protocol("a second greeting on one connection"))
                }
                // QEMU omits the id only when it could not parse the
                // request; with one command in flight, that is ours.
                Message::Reply { id: got, result } => {
                    if got.as_ref().is_none_or(|got| *got == json!(id)) {
                        self.broken = false;
                        return result;
                    }
                    tracing::debug!(expected = id, got = ?got, "QMP reply for another command dropped");
                }
            }
        }
    }

    /// The events seen since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for the next event (returning a kept one first).
    pub async fn next_event(&mut self) -> Result<QmpEvent, VmmError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        match self.read_message().await? {
            Message::Event(event) => Ok(event),
            Message::Greeting(_) | Message::Reply { .. } => {
                self.broken = true;
                Err(protocol("unexpected non-event message while idle"))
            }
        }
    }

    fn record(&mut self, event: QmpEvent) {
        tracing::debug!(event = %event.name, data = %event.data, "QMP event");
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Reads one message. Cancel-safe: bytes read so far stay in `buf`.
    async fn read_message(&mut self) -> Result<Message, VmmError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + pos;
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return parse(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_MESSAGE {
                self.broken = true;
                return Err(protocol(format!(
                    "a message is longer than {MAX_MESSAGE} bytes"
                )));
            }
            self.buf.reserve(8192);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(VmmError::Control)?;
            if n == 0 {
                self.broken = true;
                return Err(if self.buf.trim_ascii().is_empty() {
                    VmmError::Control(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "QEMU closed the QMP connection",
                    ))
                } else {
                    protocol("QEMU closed the QMP connection in the middle of a message")
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU: sends the greeting, then for each request line calls
    /// `reply` and writes what it returns (`\r\n`-terminated, like QEMU).
    /// Returns the requests it received.
    fn fake_qmp(
        listener: UnixListener,
        reply: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            w.write_all(format!("{GREETING}\r\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                for out in reply(&request) {
                    w.write_all(format!("{out}\r\n").as_bytes()).await.unwrap();
                }
                seen.push(request);
            }
            seen
        })
    }

    fn socket() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    fn reply_ok(request: &Value, ret: Value) -> String {
        json!({"return": ret, "id": request["id"]}).to_string()
    }

    #[tokio::test]
    async fn greeting_capabilities_events_and_errors() {
        let (_dir, path, listener) = socket();
        let server = fake_qmp(listener, |req| {
            match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => vec![reply_ok(req, json!({}))],
            // Like QEMU: the event comes before the command's reply.
            "system_powerdown" => vec![
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "POWERDOWN"}"#
                    .into(),
                reply_ok(req, json!({})),
            ],
            "query-status" => vec![
                // A stale reply to some earlier id is skipped.
                json!({"return": {"status": "paused"}, "id": 999}).to_string(),
                reply_ok(req, json!({"status": "running", "running": true})),
            ],
            "echo" => vec![reply_ok(req, req["arguments"].clone())],
            _ => vec![json!({"id": req["id"], "error": {"class": "CommandNotFound",
                "desc": format!("The command {} has not been found", req["execute"].as_str().unwrap())}})
            .to_string()],
        }
        });

        let mut qmp = QmpClient::connect(&path).await.unwrap();
        assert_eq!(
            qmp.version(),
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            })
        );
        assert_eq!(
            qmp.execute("system_powerdown", None).await.unwrap(),
            json!({})
        );
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");

        match qmp.execute("nope", None).await.unwrap_err() {
            VmmError::Qmp { class, desc } => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command nope has not been found");
            }
            other => panic!("expected a QMP error, got {other:?}"),
        }
        // An error reply leaves the connection usable.
        assert!(!qmp.is_broken());
        let args = json!({"device": "root", "n": 3});
        assert_eq!(qmp.execute("echo", Some(args.clone())).await.unwrap(), args);

        let events = qmp.take_events();
        assert_eq!(
            events,
            [QmpEvent {
                name: "POWERDOWN".into(),
                data: Value::Null
            }]
        );
        assert!(qmp.take_events().is_empty());

        drop(qmp);
        let seen = server.await.unwrap();
        let commands: Vec<&str> = seen
            .iter()
            .map(|r| r["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            commands,
            [
                "qmp_capabilities",
                "system_powerdown",
                "query-status",
                "nope",
                "echo"
            ]
        );
        // Ids are distinct and increasing; arguments only when given.
        let ids: Vec<u64> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert!(seen[1].get("arguments").is_none());
        assert_eq!(seen[4]["arguments"], args);
    }

    #[tokio::test]
    async fn an_event_with_data_can_be_awaited() {
        let (_dir, path, listener) = socket();
        let server = fake_qmp(listener, |req| {
            match req["execute"].as_str().unwrap() {
            "quit" => vec![
                reply_ok(req, json!({})),
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#.into(),
            ],
            _ => vec![reply_ok(req, json!({}))],
        }
        });
        let mut qmp = QmpClient::connect(&path).await.unwrap();
        qmp.execute("quit", None).await.unwrap();
        let event = qmp.next_event().await.unwrap();
        assert_eq!(event.name, "SHUTDOWN");
        assert_eq!(event.data["reason"], "guest-shutdown");
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_connection_is_an_error_and_breaks_the_client() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(format!("{GREETING}\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            let req: Value = serde_json::from_slice(buf[..n].trim_ascii()).unwrap();
            s.write_all(format!("{}\r\n", reply_ok(&req, json!({}))).as_bytes())
                .await
                .unwrap();
            // Half a message, then the connection goes away.
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(br#"{"return": {"sta"#).await.unwrap();
        });
        let mut qmp = QmpClient::connect(&path).await.unwrap();
        let err = qmp.execute("query-status", None).await.unwrap_err();
        assert!(
            matches!(&err, VmmError::QmpProtocol(m) if m.contains("middle of a message")),
            "{err:?}"
        );
        assert!(qmp.is_broken());
        let err = qmp.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, VmmError::QmpProtocol(_)), "{err:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn eof_between_messages_is_a_control_error() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        let err = QmpClient::connect(&path).await.unwrap_err();
        assert!(
            matches!(&err, VmmError::Control(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn something_that_is_not_qmp_is_rejected() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
        });
        let err = QmpClient::connect(&path).await.unwrap_err();
        assert!(
            matches!(&err, VmmError::QmpProtocol(m) if m.contains("not JSON")),
            "{err:?}"
        );
        drop(err);
        server.abort();
    }

    #[test]
    fn a_cancelled_command_breaks_the_client() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_dir, path, listener) = socket();
            // Answers the negotiation, never the next command.
            let _server = fake_qmp(listener, |req| {
                if req["execute"] == "qmp_capabilities" {
                    vec![reply_ok(req, json!({}))]
                } else {
                    vec![]
                }
            });
            let mut qmp = QmpClient::connect(&path).await.unwrap();
            let timed_out = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                qmp.execute("query-status", None),
            )
            .await;
            assert!(timed_out.is_err());
            assert!(qmp.is_broken());
        });
    }
}
