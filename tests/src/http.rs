//! A minimal HTTP/1.1 file server on 127.0.0.1 for download tests: serves
//! fixed files, honours `Range: bytes=N-` with `206 Partial Content`,
//! records every request it saw, and can be told to cut a response short
//! (headers announce the whole body, then the connection closes) to
//! exercise resumable downloads.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the server does with one request (taken in order; [`Reply::Full`]
/// once the plan is used up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The whole file, or the requested range.
    Full,
    /// Announce the full length, send only this many body bytes, then close.
    CutAfter(u64),
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// `N` of a `Range: bytes=N-` header.
    pub range_start: Option<u64>,
    /// Status code answered.
    pub status: u16,
}

/// The running server; stopped when dropped.
#[derive(Debug)]
pub struct FileServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl FileServer {
    /// Serves `files` (URL path → bytes), replying to requests per `plan`.
    pub async fn start(files: HashMap<String, Vec<u8>>, plan: Vec<Reply>) -> FileServer {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(files);
        let plan = Arc::new(Mutex::new(VecDeque::from(plan)));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let reply = plan
                        .lock()
                        .expect("plan")
                        .pop_front()
                        .unwrap_or(Reply::Full);
                    let (files, seen) = (files.clone(), seen.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, &files, reply, &seen).await;
                    });
                }
            })
        };
        FileServer { addr, seen, task }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    reply: Reply,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let range_start = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| {
            v.trim()
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        });
    let Some(data) = files.get(&path) else {
        seen.lock().expect("seen").push(Seen {
            path,
            range_start,
            status: 404,
        });
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return stream.shutdown().await;
    };
    let len = data.len() as u64;
    let (status, start) = match range_start {
        Some(n) if n < len => (206, n),
        _ => (200, 0),
    };
    seen.lock().expect("seen").push(Seen {
        path,
        range_start,
        status,
    });
    let body = &data[start as usize..];
    let mut header = if status == 206 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\n",
            len - 1
        )
    } else {
        "HTTP/1.1 200 OK\r\n".to_string()
    };
    header.push_str(&format!(
        "Content-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(header.as_bytes()).await?;
    let send = match reply {
        Reply::Full => body.len(),
        Reply::CutAfter(n) => body.len().min(n as usize),
    };
    stream.write_all(&body[..send]).await?;
    stream.flush().await?;
    stream.shutdown().await
}
