//! `banger daemon start|stop|status` (and `logs`, in [`crate::logs_cmd`]):
//! managing bangerd itself. None of these auto-starts the daemon except
//! `start`, whose whole point it is.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use banger_protocol::paths::Paths;
use banger_protocol::{DaemonStatus, ErrorKind, Request, Response};
use serde::Serialize;

use crate::args::{DaemonCommand, JsonFlag};
use crate::connect::{self, probe};
use crate::error::{CliError, Exit};
use crate::output::{human_bytes, human_duration_ms, print_json};
use crate::{logs_cmd, outln};

/// How long `stop` waits for the daemon process to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_POLL: Duration = Duration::from_millis(20);
/// How long `stop` waits for a handshake before falling back to SIGTERM.
const STOP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(command: DaemonCommand) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    match command {
        DaemonCommand::Start => start(&paths).await,
        DaemonCommand::Stop => stop(&paths).await,
        DaemonCommand::Status(flags) => status(&paths, flags).await,
        DaemonCommand::Logs(args) => logs_cmd::run(&paths, &args).await,
    }
}

async fn start(paths: &Paths) -> Result<Exit, CliError> {
    if let Some(client) = probe(paths).await? {
        outln!("bangerd is already running (pid {})", client.server().pid)?;
        return Ok(Exit::Ok);
    }
    let started = connect::start_daemon(paths).await?;
    let pid = started.client.server().pid;
    if started.ours {
        outln!("started bangerd (pid {pid})")?;
    } else {
        outln!("bangerd is already running (pid {pid})")?;
    }
    Ok(Exit::Ok)
}

async fn stop(paths: &Paths) -> Result<Exit, CliError> {
    let pid = match request_shutdown(paths).await {
        Ok(Some(pid)) => pid,
        Ok(None) => {
            outln!("bangerd is not running")?;
            return Ok(Exit::Ok);
        }
        // It cannot be asked over the socket (another protocol version, or
        // wedged): ask with SIGTERM instead.
        Err(err)
            if matches!(
                err.kind(),
                Some(ErrorKind::VersionMismatch | ErrorKind::Timeout)
            ) =>
        {
            signal_shutdown(paths, err)?
        }
        Err(err) => return Err(err),
    };
    wait_gone(pid).await?;
    outln!("stopped bangerd")?;
    Ok(Exit::Ok)
}

/// Sends `Shutdown`; returns the daemon's pid, `None` if it is not running.
async fn request_shutdown(paths: &Paths) -> Result<Option<u32>, CliError> {
    let Some(mut client) = connect::probe_within(paths, STOP_CONNECT_TIMEOUT).await? else {
        return Ok(None);
    };
    let pid = client.server().pid;
    match connect::request(&mut client, Request::Shutdown).await? {
        Response::ShuttingDown => Ok(Some(pid)),
        other => Err(connect::unexpected(Request::Shutdown.name(), &other)),
    }
}

/// Sends SIGTERM to the daemon that holds the instance lock (its pid is in
/// the lock file, which only counts while a live daemon holds the lock).
/// Without such a daemon, `failure` is the error.
fn signal_shutdown(paths: &Paths, failure: CliError) -> Result<u32, CliError> {
    let Some(pid) = lock_holder(&paths.lock_file()) else {
        return Err(failure);
    };
    let Ok(raw) = i32::try_from(pid) else {
        return Err(failure);
    };
    eprintln!(
        "{}; stopping bangerd (pid {pid}) with SIGTERM",
        failure.message()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| CliError::with_source(format!("cannot signal bangerd (pid {pid})"), &e))?;
    Ok(pid)
}

/// The pid recorded in the lock file, if a process holds the lock now.
fn lock_holder(lock_file: &Path) -> Option<u32> {
    let mut file = File::open(lock_file).ok()?;
    match Flock::lock(file.try_clone().ok()?, FlockArg::LockSharedNonblock) {
        // Nobody holds it (dropping the guard releases it at once).
        Ok(_unheld) => None,
        Err((_, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            file.read_to_string(&mut text).ok()?;
            text.trim().parse().ok()
        }
        Err(_) => None,
    }
}

/// Waits until process `pid` has exited, at most [`STOP_TIMEOUT`].
async fn wait_gone(pid: u32) -> Result<(), CliError> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return Err(CliError::failed(format!(
                "bangerd (pid {pid}) did not exit within {}s of being asked to",
                STOP_TIMEOUT.as_secs()
            ))
            .with_hint(format!(
                "see `banger daemon logs`; `kill -9 {pid}` ends it for good"
            )));
        }
        tokio::time::sleep(STOP_POLL).await;
    }
    Ok(())
}

/// Whether process `pid` still exists (a zombie counts as gone: it has exited).
pub fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Err(Errno::ESRCH) => false,
        // Exists (EPERM: it exists but belongs to someone else).
        _ => !is_zombie(pid),
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| proc_stat_state(&stat))
        .is_some_and(|state| state == 'Z')
}

/// The state letter of a `/proc/PID/stat` line (the field after `(comm)`,
/// where comm may itself contain spaces and parentheses).
fn proc_stat_state(stat: &str) -> Option<char> {
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
}

/// `banger daemon status --json`.
#[derive(Serialize, Debug)]
struct StatusJson<'a> {
    running: bool,
    #[serde(flatten)]
    status: Option<StatusFields<'a>>,
}

#[derive(Serialize, Debug)]
struct StatusFields<'a> {
    pid: u32,
    version: &'a str,
    uptime_ms: u64,
    socket: &'a str,
    state_dir: &'a str,
    config_path: &'a str,
    log_path: &'a str,
    store: StoreJson<'a>,
    open_connections: u64,
    events_published: u64,
}

#[derive(Serialize, Debug)]
struct StoreJson<'a> {
    path: &'a str,
    trees: u64,
    records: u64,
    size_on_disk: u64,
}

impl<'a> From<&'a DaemonStatus> for StatusFields<'a> {
    fn from(s: &'a DaemonStatus) -> Self {
        Self {
            pid: s.pid,
            version: &s.version,
            uptime_ms: s.uptime_ms,
            socket: &s.socket_path,
            state_dir: &s.state_dir,
            config_path: &s.config_path,
            log_path: &s.log_path,
            store: StoreJson {
                path: &s.store.path,
                trees: s.store.trees,
                records: s.store.records,
                size_on_disk: s.store.size_on_disk,
            },
            open_connections: s.open_connections,
            events_published: s.events_published,
        }
    }
}

async fn status(paths: &Paths, flags: JsonFlag) -> Result<Exit, CliError> {
    let Some(mut client) = probe(paths).await? else {
        if flags.json {
            print_json(&StatusJson {
                running: false,
                status: None,
            })?;
        } else {
            outln!("bangerd is not running")?;
        }
        return Ok(Exit::Failed);
    };
    let status = match connect::request(&mut client, Request::Status).await? {
        Response::Status(status) => status,
        other => return Err(connect::unexpected(Request::Status.name(), &other)),
    };
    if flags.json {
        print_json(&StatusJson {
            running: true,
            status: Some((&status).into()),
        })?;
    } else {
        outln!("{}", render_status(&status))?;
    }
    Ok(Exit::Ok)
}

fn render_status(s: &DaemonStatus) -> String {
    let rows = [
        ("pid", s.pid.to_string()),
        ("version", s.version.clone()),
        ("uptime", human_duration_ms(s.uptime_ms)),
        ("socket", s.socket_path.clone()),
        ("state dir", s.state_dir.clone()),
        ("config", s.config_path.clone()),
        ("log", s.log_path.clone()),
        ("store", s.store.path.clone()),
        (
            "store size",
            format!(
                "{} records in {} trees, {} on disk",
                s.store.records,
                s.store.trees,
                human_bytes(s.store.size_on_disk)
            ),
        ),
        ("connections", s.open_connections.to_string()),
        ("events", format!("{} published", s.events_published)),
    ];
    let mut out = String::from("bangerd is running");
    for (name, value) in rows {
        out.push_str(&format!("\n  {:<13}{value}", format!("{name}:")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::StoreStats;

    fn sample() -> DaemonStatus {
        DaemonStatus {
            pid: 42,
            version: "0.1.0".into(),
            uptime_ms: 192_000,
            socket_path: "/r/banger/bangerd.sock".into(),
            state_dir: "/s/banger".into(),
            config_path: "/c/banger/config.toml".into(),
            log_path: "/s/banger/logs/bangerd.jsonl".into(),
            store: StoreStats {
                path: "/s/banger/db".into(),
                trees: 2,
                records: 7,
                size_on_disk: 2048,
            },
            open_connections: 1,
            events_published: 9,
        }
    }

    #[test]
    fn status_text() {
        let text = render_status(&sample());
        assert!(
            text.starts_with("bangerd is running\n  pid:         42\n"),
            "{text}"
        );
        assert!(text.contains("\n  uptime:      3m12s\n"), "{text}");
        assert!(
            text.contains("\n  store size:  7 records in 2 trees, 2.0 KiB on disk\n"),
            "{text}"
        );
        assert!(text.ends_with("\n  events:      9 published"), "{text}");
    }

    #[test]
    fn status_json_shapes() {
        let not_running = serde_json::to_value(StatusJson {
            running: false,
            status: None,
        })
        .expect("json");
        assert_eq!(not_running, serde_json::json!({"running": false}));
        let s = sample();
        let running = serde_json::to_value(StatusJson {
            running: true,
            status: Some((&s).into()),
        })
        .expect("json");
        assert_eq!(running["running"], true);
        assert_eq!(running["pid"], 42);
        assert_eq!(running["store"]["records"], 7);
        assert_eq!(running["socket"], "/r/banger/bangerd.sock");
    }

    #[test]
    fn proc_stat_parsing() {
        assert_eq!(proc_stat_state("123 (bangerd) S 1 2 3"), Some('S'));
        assert_eq!(proc_stat_state("123 (a) b) Z 1"), Some('Z'));
        assert_eq!(proc_stat_state("garbage"), None);
    }

    #[test]
    fn lock_holder_needs_a_held_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bangerd.lock");
        assert_eq!(lock_holder(&path), None);
        std::fs::write(&path, "4242\n").expect("write");
        assert_eq!(
            lock_holder(&path),
            None,
            "a stale pid without a lock holder does not count"
        );
        let held = Flock::lock(
            File::open(&path).expect("open"),
            FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| e)
        .expect("lock");
        assert_eq!(lock_holder(&path), Some(4242));
        drop(held);
        assert_eq!(lock_holder(&path), None);
    }

    #[test]
    fn this_process_is_alive_and_a_free_pid_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
