//! Reaching bangerd: connecting with a deadline, starting the daemon when
//! it is not running (`banger daemon start` and every auto-starting
//! command), and running one request, plain or streaming with Ctrl-C
//! cancellation.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::paths::Paths;
use banger_protocol::{ErrorKind, Event, Progress, Request, Response, ServerMessage};

use crate::error::{CliError, Exit};

/// How long an ordinary request (and the handshake) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a freshly spawned daemon has to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the socket is tried while the daemon starts.
const START_POLL: Duration = Duration::from_millis(20);
/// How long a cancelled request has to send its final reply.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// How many lines of the daemon's stderr a failed start shows.
const STDERR_TAIL_LINES: usize = 20;

/// Resolves every banger path from the environment.
pub fn paths() -> Result<Paths, CliError> {
    Paths::from_env().map_err(|e| CliError::from_error(&e))
}

/// The error for a daemon that accepted a request and went silent.
fn no_answer(timeout: Duration) -> CliError {
    CliError::failed(format!(
        "bangerd did not answer within {}s",
        timeout.as_secs()
    ))
    .with_kind(ErrorKind::Timeout)
    .with_hint(
        "see `banger daemon logs`; if it is stuck, `banger daemon stop` and run the command again",
    )
}

/// The error for a reply of the wrong kind.
pub fn unexpected(request: &str, response: &Response) -> CliError {
    CliError::failed(format!(
        "unexpected answer from bangerd to `{request}`: {response:?}"
    ))
    .with_hint("the client and the daemon may be of different builds; see `banger version`")
}

/// Whether a connect error just means "nobody is listening".
fn nobody_listening(err: &ClientError) -> bool {
    match err {
        ClientError::Connect { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ),
        _ => false,
    }
}

/// Connects to a running daemon; `None` when none is listening.
pub async fn probe(paths: &Paths) -> Result<Option<Client>, CliError> {
    probe_within(paths, REQUEST_TIMEOUT).await
}

/// [`probe`] with a deadline for the connection and handshake.
pub async fn probe_within(paths: &Paths, timeout: Duration) -> Result<Option<Client>, CliError> {
    let socket = paths.socket();
    match tokio::time::timeout(timeout, Client::connect(&socket)).await {
        Err(_) => Err(no_answer(timeout)),
        Ok(Ok(client)) => Ok(Some(client)),
        Ok(Err(err)) if nobody_listening(&err) => Ok(None),
        Ok(Err(err)) => Err(err.into()),
    }
}

/// Connects to the daemon, starting it first if it is not running (and
/// saying so on stderr).
pub async fn connect_or_start(paths: &Paths) -> Result<Client, CliError> {
    if let Some(client) = probe(paths).await? {
        return Ok(client);
    }
    let started = start_daemon(paths).await?;
    if started.ours {
        let pid = started.client.server().pid;
        eprintln!("bangerd was not running; started it (pid {pid})");
    }
    Ok(started.client)
}

/// Sends one request and waits for its final reply, at most [`REQUEST_TIMEOUT`].
pub async fn request(client: &mut Client, request: Request) -> Result<Response, CliError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, client.request(request)).await {
        Ok(result) => result.map_err(CliError::from),
        Err(_) => Err(no_answer(REQUEST_TIMEOUT)),
    }
}

/// Something a streaming request produced before its final reply.
#[derive(Debug)]
pub enum StreamItem {
    Progress(Progress),
    Event(Event),
    /// Output bytes (a followed log).
    Output(banger_protocol::OutputStream, Vec<u8>),
    /// The user pressed Ctrl-C and the daemon was asked to cancel; its
    /// final reply is being awaited (progress shown so far may go away).
    Cancelling,
}

/// How a streaming request ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// The daemon sent the final reply.
    Reply(Response),
    /// The user pressed Ctrl-C; the daemon was asked to cancel.
    Cancelled,
    /// The user pressed Ctrl-C, but the operation had already finished:
    /// the daemon's final reply is a success.
    ReplyAfterCancel(Response),
}

/// Sends a request that streams progress or events, handing each to
/// `on_item`, until the final reply; no timeout. Ctrl-C sends a cancel,
/// hands [`StreamItem::Cancelling`] to `on_item`, waits up to
/// [`CANCEL_GRACE`] for the final reply (a second Ctrl-C stops waiting)
/// and returns [`StreamEnd::Cancelled`] (or [`StreamEnd::ReplyAfterCancel`]
/// when the operation won the race).
pub async fn stream(
    client: &mut Client,
    request: Request,
    mut on_item: impl FnMut(StreamItem) -> Result<(), CliError>,
) -> Result<StreamEnd, CliError> {
    let id = client.send(request).await?;
    {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                message = client.next_message() => {
                    if let Some(response) = route(id, message?, &mut on_item)? {
                        return Ok(StreamEnd::Reply(response));
                    }
                }
                signal = &mut ctrl_c => {
                    signal.map_err(|e| CliError::with_source("cannot listen for Ctrl-C", &e))?;
                    break;
                }
            }
        }
    }
    // The daemon may be gone already; cancelling is best effort.
    if client.cancel(id).await.is_ok() {
        on_item(StreamItem::Cancelling)?;
        let drain = async {
            loop {
                match client.next_message().await {
                    Ok(message) => match route(id, message, &mut |_| Ok(())) {
                        Ok(Some(response)) => return Some(response),
                        Err(_) => return None,
                        Ok(None) => {}
                    },
                    Err(_) => return None,
                }
            }
        };
        tokio::select! {
            finished = tokio::time::timeout(CANCEL_GRACE, drain) => match finished {
                Ok(Some(response)) => return Ok(StreamEnd::ReplyAfterCancel(response)),
                Ok(None) => {}
                Err(_) => eprintln!(
                    "bangerd did not confirm the cancellation within {}s",
                    CANCEL_GRACE.as_secs()
                ),
            },
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    Ok(StreamEnd::Cancelled)
}

/// Prints `cancelled` on stderr: how every interrupted command ends (exit 130).
pub fn cancelled() -> Result<Exit, CliError> {
    eprintln!("cancelled");
    Ok(Exit::Interrupted)
}

/// Handles one frame of a stream for request `id`: `Some` on its final reply.
fn route(
    id: u64,
    message: ServerMessage,
    on_item: &mut impl FnMut(StreamItem) -> Result<(), CliError>,
) -> Result<Option<Response>, CliError> {
    match message {
        ServerMessage::Progress { id: pid, progress } if pid == id => {
            on_item(StreamItem::Progress(progress))?;
            Ok(None)
        }
        ServerMessage::Event { id: eid, event } if eid == id => {
            on_item(StreamItem::Event(event))?;
            Ok(None)
        }
        ServerMessage::Reply { id: rid, result } if rid == id => {
            result.map(Some).map_err(CliError::from)
        }
        ServerMessage::Output {
            id: oid,
            stream,
            data,
        } if oid == id => {
            on_item(StreamItem::Output(stream, data))?;
            Ok(None)
        }
        ServerMessage::Error(err) => Err(err.into()),
        ServerMessage::Hello(_) => Err(ClientError::Unexpected("a second handshake".into()).into()),
        ServerMessage::Progress { .. }
        | ServerMessage::Event { .. }
        | ServerMessage::Output { .. }
        | ServerMessage::Reply { .. } => Ok(None),
    }
}

/// A daemon that answers after [`start_daemon`].
#[derive(Debug)]
pub struct Started {
    pub client: Client,
    /// False when another client's bangerd won the start race and ours exited.
    pub ours: bool,
}

/// Spawns bangerd detached from this terminal and waits until it answers a
/// handshake. On failure prints the tail of its stderr log.
pub async fn start_daemon(paths: &Paths) -> Result<Started, CliError> {
    let binary = daemon_binary()?;
    let stderr_log = paths.stderr_log_file();
    let (mut child, log_start) = spawn_detached(&binary, &stderr_log)?;
    let socket = paths.socket();
    let deadline = Instant::now() + START_TIMEOUT;

    let failure = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            // Not answering after this long: do not leave it half-started.
            let _ = child.kill();
            let _ = child.wait();
            break CliError::failed("cannot start bangerd").with_cause(format!(
                "it did not answer on {} within {}s, so it was killed (pid {})",
                socket.display(),
                START_TIMEOUT.as_secs(),
                child.id()
            ));
        }
        match tokio::time::timeout(remaining, Client::connect(&socket)).await {
            Ok(Ok(client)) => {
                let lost_race =
                    client.server().pid != child.id() && matches!(child.try_wait(), Ok(Some(_)));
                return Ok(Started {
                    client,
                    ours: !lost_race,
                });
            }
            Ok(Err(ClientError::Daemon(data))) if data.kind == ErrorKind::VersionMismatch => {
                return Err(data.into());
            }
            // Not listening yet, or listening but not ready to talk yet.
            Ok(Err(_)) | Err(_) => {}
        }
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                // Lost a start race: another bangerd holds the lock and
                // will answer shortly.
                if another_daemon_alive(paths, child.id()) {
                    tokio::time::sleep(START_POLL).await;
                    continue;
                }
                break CliError::failed("cannot start bangerd").with_cause(format!(
                    "{} exited ({status}) before answering on {}",
                    binary.display(),
                    socket.display()
                ));
            }
            Err(e) => break CliError::with_source("cannot start bangerd", &e),
        }
        tokio::time::sleep(START_POLL).await;
    };

    print_stderr_tail(&stderr_log, log_start);
    Err(failure.with_hint(format!(
        "see {} and `banger daemon logs`",
        stderr_log.display()
    )))
}

/// Whether the lock file names a live process other than `our_child`.
fn another_daemon_alive(paths: &Paths, our_child: u32) -> bool {
    let Ok(text) = fs::read_to_string(paths.lock_file()) else {
        return false;
    };
    match text
        .split_whitespace()
        .next()
        .and_then(|t| t.parse::<u32>().ok())
    {
        Some(pid) if pid != our_child => crate::daemon_cmd::process_alive(pid),
        _ => false,
    }
}

/// Starts `binary` in its own session, stdin from /dev/null, stdout and
/// stderr appended to `stderr_log`. Returns the child and where in the log
/// its output begins.
fn spawn_detached(binary: &Path, stderr_log: &Path) -> Result<(Child, u64), CliError> {
    if let Some(dir) = stderr_log.parent() {
        fs::create_dir_all(dir).map_err(|e| {
            CliError::with_source(format!("cannot create log directory {}", dir.display()), &e)
        })?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_log)
        .map_err(|e| CliError::with_source(format!("cannot open {}", stderr_log.display()), &e))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log
        .try_clone()
        .map_err(|e| CliError::with_source(format!("cannot open {}", stderr_log.display()), &e))?;

    let mut command = Command::new(binary);
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setsid(2), which is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| {
        CliError::with_source(format!("cannot run {}", binary.display()), &e)
            .with_hint("set BANGERD to the path of the bangerd binary")
    })?;
    Ok((child, log_start))
}

/// Prints the last lines the daemon wrote to `stderr_log` after `from`.
fn print_stderr_tail(stderr_log: &Path, from: u64) {
    let mut text = String::new();
    let read = File::open(stderr_log).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    let lines = last_lines(&text, STDERR_TAIL_LINES);
    if read.is_err() || lines.is_empty() {
        eprintln!("bangerd wrote nothing to {}", stderr_log.display());
        return;
    }
    eprintln!("last lines bangerd wrote to {}:", stderr_log.display());
    for line in lines {
        eprintln!("  | {line}");
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Finds the daemon binary for this environment.
fn daemon_binary() -> Result<PathBuf, CliError> {
    find_daemon_binary(
        std::env::var_os("BANGERD"),
        std::env::current_exe().ok(),
        std::env::var_os("PATH"),
        is_executable,
    )
    .ok_or_else(|| {
        CliError::failed("cannot find the bangerd binary")
            .with_hint("set BANGERD=/path/to/bangerd, or install bangerd next to banger or on PATH")
    })
}

/// Where bangerd is: `$BANGERD` if set, else `bangerd` next to this
/// executable, else the first `bangerd` on `$PATH`.
fn find_daemon_binary(
    env_bangerd: Option<OsString>,
    current_exe: Option<PathBuf>,
    path_var: Option<OsString>,
    is_executable: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if let Some(explicit) = env_bangerd.filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(explicit));
    }
    if let Some(sibling) = current_exe.and_then(|exe| exe.parent().map(|d| d.join("bangerd"))) {
        if is_executable(&sibling) {
            return Some(sibling);
        }
    }
    let path_var = path_var?;
    std::env::split_paths(&path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("bangerd"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists<'a>(present: &'a [&'a str]) -> impl Fn(&Path) -> bool + 'a {
        move |p| present.iter().any(|q| Path::new(q) == p)
    }

    #[test]
    fn env_variable_wins_even_if_others_exist() {
        let found = find_daemon_binary(
            Some("/opt/bangerd-dev".into()),
            Some("/usr/local/bin/banger".into()),
            Some("/usr/bin".into()),
            exists(&["/usr/local/bin/bangerd", "/usr/bin/bangerd"]),
        );
        assert_eq!(found, Some(PathBuf::from("/opt/bangerd-dev")));
    }

    #[test]
    fn sibling_beats_path() {
        let found = find_daemon_binary(
            Some("".into()),
            Some("/work/target/debug/banger".into()),
            Some("/usr/bin".into()),
            exists(&["/work/target/debug/bangerd", "/usr/bin/bangerd"]),
        );
        assert_eq!(found, Some(PathBuf::from("/work/target/debug/bangerd")));
    }

    #[test]
    fn path_is_searched_in_order() {
        let found = find_daemon_binary(
            None,
            Some("/home/u/banger".into()),
            Some("/a:/b:/c".into()),
            exists(&["/c/bangerd", "/b/bangerd"]),
        );
        assert_eq!(found, Some(PathBuf::from("/b/bangerd")));
    }

    #[test]
    fn nothing_found() {
        assert_eq!(find_daemon_binary(None, None, None, |_| true), None);
        assert_eq!(
            find_daemon_binary(None, None, Some("/a".into()), |_| false),
            None
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = last_lines(&text, 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail[0], "line 11");
        assert_eq!(last_lines("one\ntwo", 20), vec!["one", "two"]);
        assert!(last_lines("", 20).is_empty());
    }

    #[test]
    fn only_absent_or_refused_sockets_mean_not_running() {
        let connect = |kind| ClientError::Connect {
            path: "/s".into(),
            source: io::Error::from(kind),
        };
        assert!(nobody_listening(&connect(io::ErrorKind::NotFound)));
        assert!(nobody_listening(&connect(io::ErrorKind::ConnectionRefused)));
        assert!(!nobody_listening(&connect(io::ErrorKind::PermissionDenied)));
        assert!(!nobody_listening(&ClientError::Closed));
    }
}
