//! `Exec`: starting a process for the host and carrying its I/O.
//!
//! [`spawn`] checks the request (program found in `PATH`, working
//! directory), starts the process through the [`reaper`] — on pipes, or on
//! a new PTY as session leader with it as controlling terminal — and
//! returns the [`Running`] handle the session keeps for `Stdin`, `Resize`,
//! `Signal`, plus a [`Launcher`]. The session queues `Started` and then
//! launches the tasks that stream `Output` and finally `Exited`.
//!
//! `Exited` is sent only after the output streams reached end of file, so
//! the host has all output first. A background process that keeps a pipe
//! open must not hold `Exited` forever: once the process has exited, the
//! streams get a grace period that restarts while output still flows.
//!
//! Every process leads its own process group, so ending a session kills
//! everything it started (`kill(-pgid)`).

use crate::fdio::AsyncFdIo;
use crate::pty;
use crate::reaper;
use crate::session::Outbox;
use banger_protocol::agent::{
    AgentToHost, ExecRequest, ExitStatus, OutputStream, TtySize, MAX_IO_CHUNK,
};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// `PATH` when the request does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `TERM` when the request does not set one.
pub const DEFAULT_TERM: &str = "xterm";
/// How long output may stay silent after the process exited before the
/// streams are given up on.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("empty argv")]
    EmptyArgv,
    #[error("`{program}`: command not found in PATH ({path})")]
    NotFound { program: String, path: String },
    #[error("`{program}`")]
    NotRunnable {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("working directory {dir}")]
    Cwd {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot allocate a pseudo-terminal")]
    Pty(#[source] io::Error),
    #[error("cannot start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// The error and its causes on one line: the host only sees this text.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

enum StdinCmd {
    Data(Vec<u8>),
    Close,
}

/// What the session keeps of a running process.
#[derive(Debug)]
pub struct Running {
    pub pid: u32,
    /// Tells this process apart from a later one with the same request id.
    pub token: u64,
    tty: Option<Arc<AsyncFdIo>>,
    stdin: Option<mpsc::UnboundedSender<StdinCmd>>,
    exited: Arc<AtomicBool>,
}

impl std::fmt::Debug for StdinCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StdinCmd::Data(d) => write!(f, "Data({} bytes)", d.len()),
            StdinCmd::Close => write!(f, "Close"),
        }
    }
}

impl Running {
    /// Queues bytes for the process's stdin (or its terminal).
    pub fn write_stdin(&self, data: Vec<u8>) -> Result<(), String> {
        let tx = self
            .stdin
            .as_ref()
            .ok_or("the process was started without stdin")?;
        tx.send(StdinCmd::Data(data))
            .map_err(|_| "the process's stdin is closed".to_string())
    }

    /// Closes stdin (on a terminal: sends the end-of-file character).
    pub fn close_stdin(&self) -> Result<(), String> {
        let tx = self
            .stdin
            .as_ref()
            .ok_or("the process was started without stdin")?;
        tx.send(StdinCmd::Close)
            .map_err(|_| "the process's stdin is already closed".to_string())
    }

    pub fn resize(&self, size: TtySize) -> io::Result<()> {
        let tty = self.tty.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the process has no terminal")
        })?;
        pty::set_size(tty.as_raw_fd(), size)
    }

    /// Sends `signal` to the process, or with a terminal to its foreground
    /// process group.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.exited.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let target = match &self.tty {
            Some(tty) => -pty::foreground_group(tty.as_raw_fd()).unwrap_or(self.pid as i32),
            None => self.pid as i32,
        };
        // SAFETY: plain syscall.
        if unsafe { libc::kill(target, signal) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILLs the process group (and a terminal's foreground group).
    pub fn kill(&self) {
        if self.exited.load(Ordering::SeqCst) {
            return;
        }
        if let Some(fg) = self
            .tty
            .as_ref()
            .and_then(|t| pty::foreground_group(t.as_raw_fd()))
        {
            // SAFETY: plain syscall.
            unsafe { libc::kill(-fg, libc::SIGKILL) };
        }
        // SAFETY: plain syscall; the process leads its group.
        unsafe {
            libc::kill(-(self.pid as i32), libc::SIGKILL);
            libc::kill(self.pid as i32, libc::SIGKILL);
        }
    }
}

/// The I/O of a started process, to be launched once `Started` is queued.
#[derive(Debug)]
pub struct Launcher {
    id: u64,
    exit: oneshot::Receiver<ExitStatus>,
    outputs: Vec<(OutputStream, Arc<AsyncFdIo>)>,
    stdin: Option<(Arc<AsyncFdIo>, bool, mpsc::UnboundedReceiver<StdinCmd>)>,
    exited: Arc<AtomicBool>,
}

/// Looks `program` up like `execvp` would, to give a clear error.
pub fn resolve(program: &str, path: &str) -> Result<PathBuf, ExecError> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Ok(_) => Ok(p),
            Err(source) => Err(ExecError::NotRunnable {
                program: program.to_string(),
                source,
            }),
        };
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| ExecError::NotFound {
            program: program.to_string(),
            path: path.to_string(),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn next_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Starts the process of `request`.
pub fn spawn(id: u64, request: &ExecRequest) -> Result<(Running, Launcher), ExecError> {
    let (program, args) = request.argv.split_first().ok_or(ExecError::EmptyArgv)?;
    let env_value = |key: &str| {
        request
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let path = env_value("PATH").unwrap_or_else(|| DEFAULT_PATH.to_string());
    let resolved = resolve(program, &path)?;
    let cwd = match &request.cwd {
        Some(dir) => {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ExecError::Cwd {
                        dir: dir.clone(),
                        source: io::Error::from_raw_os_error(libc::ENOTDIR),
                    })
                }
                Err(source) => {
                    return Err(ExecError::Cwd {
                        dir: dir.clone(),
                        source,
                    })
                }
            }
            PathBuf::from(dir)
        }
        None if Path::new("/root").is_dir() => PathBuf::from("/root"),
        None => PathBuf::from("/"),
    };

    let mut cmd = Command::new(&resolved);
    cmd.arg0(program)
        .args(args)
        .env_clear()
        .env("PATH", &path)
        .env("HOME", "/root")
        .env(
            "TERM",
            env_value("TERM").unwrap_or_else(|| DEFAULT_TERM.to_string()),
        )
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd);

    let exited = Arc::new(AtomicBool::new(false));
    let spawn_err = |source| ExecError::Spawn {
        program: program.clone(),
        source,
    };
    let (spawned, outputs, stdin_io, tty) = if let Some(size) = request.tty {
        let pty = pty::open(size).map_err(ExecError::Pty)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(ExecError::Pty);
        cmd.stdin(Stdio::from(dup(&pty.slave)?))
            .stdout(Stdio::from(dup(&pty.slave)?))
            .stderr(Stdio::from(pty.slave));
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe { cmd.pre_exec(pty::become_session_leader) };
        let spawned = reaper::spawn(&mut cmd).map_err(spawn_err)?;
        // The command holds the slave's copies: drop them now, or the
        // master never sees end of file.
        drop(cmd);
        let master = Arc::new(AsyncFdIo::new(pty.master).map_err(ExecError::Pty)?);
        (
            spawned,
            vec![(OutputStream::Stdout, master.clone())],
            Some((master.clone(), true)),
            Some(master),
        )
    } else {
        cmd.stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut spawned = reaper::spawn(&mut cmd).map_err(spawn_err)?;
        drop(cmd);
        let wrap = |fd: Option<OwnedFd>| -> Option<Arc<AsyncFdIo>> {
            fd.and_then(|fd| AsyncFdIo::new(fd).ok()).map(Arc::new)
        };
        let mut outputs = Vec::new();
        if let Some(io) = wrap(spawned.stdout.take()) {
            outputs.push((OutputStream::Stdout, io));
        }
        if let Some(io) = wrap(spawned.stderr.take()) {
            outputs.push((OutputStream::Stderr, io));
        }
        let stdin_io = wrap(spawned.stdin.take()).map(|io| (io, false));
        (spawned, outputs, stdin_io, None)
    };

    let (stdin_tx, stdin) = match stdin_io {
        Some((io, is_tty)) => {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some((io, is_tty, rx)))
        }
        None => (None, None),
    };
    let running = Running {
        pid: spawned.pid,
        token: next_token(),
        tty,
        stdin: stdin_tx,
        exited: exited.clone(),
    };
    let launcher = Launcher {
        id,
        exit: spawned.exit,
        outputs,
        stdin,
        exited,
    };
    Ok((running, launcher))
}

/// Bytes read and sends in flight, to tell silent streams from busy ones.
#[derive(Debug, Default)]
struct Progress {
    bytes: AtomicU64,
    sending: AtomicU64,
}

impl Launcher {
    /// Starts the I/O tasks; `on_exit` runs after `Exited` was queued.
    pub fn launch(self, out: Outbox, generation: u64, on_exit: impl FnOnce() + Send + 'static) {
        let Launcher {
            id,
            exit,
            outputs,
            stdin,
            exited,
        } = self;
        let progress = Arc::new(Progress::default());
        let readers: Vec<_> = outputs
            .into_iter()
            .map(|(stream, io)| {
                tokio::spawn(pump_output(
                    id,
                    stream,
                    io,
                    out.clone(),
                    generation,
                    progress.clone(),
                ))
            })
            .collect();
        let feeder = stdin.map(|(io, is_tty, rx)| tokio::spawn(feed_stdin(io, is_tty, rx)));
        tokio::spawn(async move {
            // A lost status (cannot happen while the reaper runs) reads as
            // a failure rather than hanging the request.
            let status = exit.await.unwrap_or(ExitStatus::Code(-1));
            exited.store(true, Ordering::SeqCst);
            drain(readers, &progress).await;
            if let Some(f) = feeder {
                f.abort();
            }
            let _ = out
                .send_as(generation, AgentToHost::Exited { id, status })
                .await;
            on_exit();
        });
    }
}

/// Waits for the output streams to end; gives up once they were silent
/// (nothing read, nothing being sent) for [`OUTPUT_GRACE`].
async fn drain(readers: Vec<tokio::task::JoinHandle<()>>, progress: &Progress) {
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    let mut all = futures::future::join_all(readers);
    let mut last = progress.bytes.load(Ordering::SeqCst);
    loop {
        tokio::select! {
            _ = &mut all => return,
            _ = tokio::time::sleep(OUTPUT_GRACE) => {
                let now = progress.bytes.load(Ordering::SeqCst);
                if now == last && progress.sending.load(Ordering::SeqCst) == 0 {
                    for a in aborts {
                        a.abort();
                    }
                    return;
                }
                last = now;
            }
        }
    }
}

async fn pump_output(
    id: u64,
    stream: OutputStream,
    io: Arc<AsyncFdIo>,
    out: Outbox,
    generation: u64,
    progress: Arc<Progress>,
) {
    let mut buf = vec![0u8; MAX_IO_CHUNK];
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        progress.bytes.fetch_add(n as u64, Ordering::SeqCst);
        progress.sending.fetch_add(1, Ordering::SeqCst);
        let sent = out
            .send_as(
                generation,
                AgentToHost::Output {
                    id,
                    stream,
                    data: buf[..n].to_vec(),
                },
            )
            .await;
        progress.sending.fetch_sub(1, Ordering::SeqCst);
        if sent.is_err() {
            return;
        }
    }
}

/// End-of-file character (`^D`) written to a terminal on `StdinClose`.
const VEOF: u8 = 4;

async fn feed_stdin(io: Arc<AsyncFdIo>, is_tty: bool, mut rx: mpsc::UnboundedReceiver<StdinCmd>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            StdinCmd::Data(data) => {
                if io.write_all(&data).await.is_err() {
                    // The reader went away; later input has nowhere to go.
                    return;
                }
            }
            StdinCmd::Close if is_tty => {
                let _ = io.write_all(&[VEOF]).await;
            }
            StdinCmd::Close => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_finds_programs_and_explains_misses() {
        assert!(resolve("sh", DEFAULT_PATH).expect("sh").ends_with("sh"));
        let err = resolve("banger-no-such-program", "/usr/bin:/bin").expect_err("missing");
        assert_eq!(
            error_chain(&err),
            "`banger-no-such-program`: command not found in PATH (/usr/bin:/bin)"
        );
        let err = resolve("/nonexistent/x", DEFAULT_PATH).expect_err("missing");
        assert!(
            error_chain(&err).starts_with("`/nonexistent/x`: No such file"),
            "{err}"
        );
    }

    #[test]
    fn bad_requests_fail_before_spawning() {
        let req = |argv: &[&str], cwd: Option<&str>| ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: cwd.map(str::to_string),
            tty: None,
            stdin: false,
        };
        assert!(matches!(
            spawn(1, &req(&[], None)),
            Err(ExecError::EmptyArgv)
        ));
        let err = spawn(1, &req(&["true"], Some("/nonexistent-dir"))).expect_err("cwd");
        assert!(
            error_chain(&err).starts_with("working directory /nonexistent-dir: No such file"),
            "{}",
            error_chain(&err)
        );
    }
}
