//! The QEMU backend: `qemu-system-x86_64` (q35, KVM or TCG) controlled
//! over QMP.
//!
//! [`QemuBackend::launch`] validates a [`MachineSpec`] and builds the
//! command line ([`args`]), starts QEMU detached
//! ([`process::spawn_detached`]) and returns a [`QemuHandle`] once QMP
//! answers and the guest's vCPUs run. Everything QEMU needs at run time
//! lives in the VM's run dir ([`RunPaths`]): `qmp.sock` (QMP control),
//! `qmpev.sock` (a second QMP monitor, for events only), `agent.sock` (the
//! guest agent's virtio-serial port), `qemu.pid` and `qemu.log` (QEMU's own
//! output). The serial console goes to the spec's `console_log`.
//!
//! QEMU runs with `-no-reboot`, so any guest reset (a reboot, a panic with
//! `panic=N`) or power-off ends the process with exit code 0 (verified with
//! QEMU 7.2): the VM's supervisor learns of every guest exit from
//! [`VmmHandle::wait_exit_reason`], which tells them apart
//! ([`crate::exit`]): the handle keeps a task reading QEMU's events
//! (`SHUTDOWN` with its `reason`: `guest-shutdown`, `guest-reset`,
//! `guest-panic`, `host-signal`...; `GUEST_PANICKED`) on the events
//! monitor, and reads the console written since the launch (the kernel's
//! `Kernel panic - not syncing` line before a panic's reset). A pvpanic
//! device with `-action panic=exit-failure` makes QEMU exit with code 1 as
//! soon as a guest with the pvpanic driver panics. A failure of QEMU
//! itself is a non-zero code (1 for a bad argument or an unopenable disk)
//! or a signal.
//!
//! Each handle owns at most one QMP connection (QEMU serves one client per
//! socket), opened on demand and replaced when it breaks, plus the event
//! watcher's connection (closed when the handle is dropped). After a
//! daemon restart [`QemuBackend::adopt`] checks the recorded process is
//! still this VM's QEMU and reconnects; the previous owner's connections
//! must be gone by then (they are, when the previous owner was a dead
//! daemon or a dropped handle).

mod args;
mod qmp;

pub use args::{
    args, kernel_cmdline, opt_escape, validate, RunPaths, AGENT_SOCKET, LOG_FILE, PID_FILE,
    QMP_SOCKET,
};
pub use qmp::{QemuVersion, QmpClient, QmpEvent};

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::{watch, Mutex, OnceCell};
use tokio::task::AbortHandle;
use tracing::instrument;

use crate::exit::{self as exit_reason, QemuEvents, VmmExit};
use crate::process::{self, ProcessId};
use crate::{MachineSpec, StopOutcome, VmmBackend, VmmError, VmmHandle, VmmKind, VmmStatus};

/// The QEMU binary looked up on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// How long QEMU gets to open its QMP socket and answer on it.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one QMP command (or connecting and negotiating) may take.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed QEMU gets to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a start-up error: how long to wait for QEMU to exit on its own
/// (its exit status and log then explain the error better).
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How much of `qemu.log` goes into an error.
const LOG_TAIL: usize = 2000;
/// After QEMU exited: how long its event watcher gets to read the last
/// events (the socket closes with the process, so it is normally at once).
const EVENTS_GRACE: Duration = Duration::from_secs(2);
/// How long an adoption waits for its event watcher to be served.
const ADOPT_EVENTS_WAIT: Duration = Duration::from_secs(2);

/// Starts and adopts QEMU processes.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    binary: PathBuf,
    startup_timeout: Duration,
}

impl QemuBackend {
    /// Uses `qemu-system-x86_64` from `PATH`.
    pub fn new() -> Result<Self, VmmError> {
        Ok(Self::with_binary(process::find_binary(QEMU_BINARY)?))
    }

    /// Uses the given QEMU binary (not checked until launch).
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            startup_timeout: STARTUP_TIMEOUT,
        }
    }

    /// How long a launch waits for QMP to answer (default
    /// [`STARTUP_TIMEOUT`]).
    pub fn with_startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Removes sockets left by an earlier QEMU in the run dir, refusing
    /// when a QEMU still answers on them.
    async fn prepare_run_dir(spec: &MachineSpec, paths: &RunPaths) -> Result<(), VmmError> {
        std::fs::create_dir_all(&spec.run_dir).map_err(|source| VmmError::Io {
            what: format!("creating run dir {}", spec.run_dir.display()),
            source,
        })?;
        if let Some(parent) = spec.console_log.parent() {
            std::fs::create_dir_all(parent).map_err(|source| VmmError::Io {
                what: format!("creating {}", parent.display()),
                source,
            })?;
        }
        if paths.qmp.exists() && UnixStream::connect(&paths.qmp).await.is_ok() {
            return Err(VmmError::InvalidSpec {
                backend: VmmKind::Qemu,
                reason: format!(
                    "run dir {} is in use: a VMM answers on {}",
                    spec.run_dir.display(),
                    paths.qmp.display()
                ),
            });
        }
        for socket in [&paths.qmp, &paths.events, &paths.agent] {
            match std::fs::remove_file(socket) {
                Ok(()) => tracing::debug!(path = %socket.display(), "removed a stale socket"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        what: format!("removing stale socket {}", socket.display()),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Waits for QMP to come up on a QEMU just started and checks the
    /// guest runs. The event monitor is connected at the same time (QEMU
    /// opens both sockets before its main loop), so its handshake costs no
    /// extra round trips after start-up.
    async fn start_up(
        &self,
        pid: ProcessId,
        paths: &RunPaths,
    ) -> Result<(QmpClient, EventSource), VmmError> {
        let timeout = self.startup_timeout;
        let deadline = Instant::now() + timeout;
        let stream = tokio::time::timeout(
            timeout,
            connect_when_listening(&paths.qmp, pid, Duration::from_millis(20)),
        )
        .await
        .map_err(|_| VmmError::SocketTimeout(timeout))??;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let control = async {
            let mut qmp = tokio::time::timeout(remaining, QmpClient::handshake(stream))
                .await
                .map_err(|_| VmmError::SocketTimeout(timeout))??;
            let status = tokio::time::timeout(QMP_TIMEOUT, qmp.execute("query-status", None))
                .await
                .map_err(|_| qmp_timeout("query-status"))??;
            Ok::<_, VmmError>((qmp, status))
        };
        // Without the event monitor (an error here) exits are classified
        // from the status and console.
        let events = async {
            // Its socket may appear a moment after the control one.
            let connect = async {
                let stream =
                    connect_when_listening(&paths.events, pid, Duration::from_millis(5)).await?;
                QmpClient::handshake(stream).await
            };
            match tokio::time::timeout(QMP_TIMEOUT, connect).await {
                Ok(Ok(client)) => EventSource::Connected(client),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "no QEMU event monitor; exit reasons come from the console");
                    EventSource::None
                }
                Err(_) => {
                    tracing::warn!(
                        "the QEMU event monitor did not answer; exit reasons come from the console"
                    );
                    EventSource::None
                }
            }
        };
        let (control, events) = tokio::join!(control, events);
        let (qmp, status) = control?;
        let status = parse_status(&status)?;
        if !status.running {
            return Err(VmmError::QmpProtocol(format!(
                "QEMU started but the guest is {:?}, not running",
                status.detail
            )));
        }
        Ok((qmp, events))
    }
}

/// Connects to a socket QEMU makes while it starts, trying every `every`
/// while the socket is missing or not listening yet and QEMU lives (the
/// caller bounds the wait).
async fn connect_when_listening(
    path: &Path,
    pid: ProcessId,
    every: Duration,
) -> Result<UnixStream, VmmError> {
    loop {
        if !pid.is_alive() {
            // Reported as EarlyExit by the caller.
            return Err(VmmError::Control(io::Error::other("QEMU exited")));
        }
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(VmmError::Control(e)),
        }
        tokio::time::sleep(every).await;
    }
}

/// Kills a process on drop unless disarmed: covers errors and a cancelled
/// `launch` future alike.
struct KillOnDrop(Option<ProcessId>);

impl KillOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            tracing::warn!(
                pid = pid.pid,
                "killing QEMU after a failed or cancelled launch"
            );
            pid.sigkill();
            // Reap it (it is our child) so no zombie stays behind.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(process::wait_exit(pid));
            }
        }
    }
}

fn qmp_timeout(command: &str) -> VmmError {
    VmmError::Control(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("QMP command {command} got no reply within {QMP_TIMEOUT:?}"),
    ))
}

fn parse_status(ret: &Value) -> Result<VmmStatus, VmmError> {
    let detail = ret
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| VmmError::QmpProtocol(format!("query-status returned {ret}")))?;
    Ok(VmmStatus {
        running: ret
            .get("running")
            .and_then(Value::as_bool)
            .unwrap_or(detail == "running"),
        detail: detail.to_string(),
    })
}

/// The tail of `log` from byte `from` on (this launch's output only).
fn log_since(log: &Path, from: u64) -> String {
    match std::fs::read(log) {
        Ok(bytes) => {
            let new = bytes.get(from as usize..).unwrap_or(&bytes);
            let start = new.len().saturating_sub(LOG_TAIL);
            String::from_utf8_lossy(&new[start..]).trim().to_string()
        }
        Err(_) => process::tail_of(log, LOG_TAIL),
    }
}

#[async_trait::async_trait]
impl VmmBackend for QemuBackend {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    #[instrument(skip_all, fields(vm = %spec.name))]
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn VmmHandle>, VmmError> {
        validate(spec)?;
        let paths = RunPaths::of(&spec.run_dir);
        Self::prepare_run_dir(spec, &paths).await?;
        let log_start = std::fs::metadata(&paths.log).map(|m| m.len()).unwrap_or(0);
        let console_start = std::fs::metadata(&spec.console_log)
            .map(|m| m.len())
            .unwrap_or(0);

        let mut cmd = Command::new(&self.binary);
        cmd.args(args(spec));
        let pid = process::spawn_detached_off_runtime(cmd, paths.log.clone()).await?;
        let spawned = std::time::Instant::now();
        let guard = KillOnDrop(Some(pid));
        tracing::debug!(pid = pid.pid, "QEMU spawned");

        let (qmp, events) = match self.start_up(pid, &paths).await {
            Ok(started) => started,
            Err(err) => {
                // If QEMU is exiting on its own, its status and log say why.
                let exited = tokio::time::timeout(EXIT_GRACE, process::wait_exit(pid)).await;
                let exit = match exited {
                    Ok(exit) => exit,
                    Err(_) => process::kill_and_wait(pid).await,
                };
                guard.disarm();
                if exited.is_ok() {
                    let output = log_since(&paths.log, log_start);
                    tracing::error!(%exit, %output, "QEMU exited during start-up");
                    return Err(VmmError::EarlyExit {
                        status: exit.to_string(),
                        output,
                    });
                }
                tracing::error!(error = %err, "QEMU start-up failed; killed it");
                return Err(err);
            }
        };
        let start_up = spawned.elapsed();
        guard.disarm();
        tracing::info!(
            pid = pid.pid,
            accel = spec.accel.as_str(),
            version = ?qmp.version(),
            "QEMU running"
        );
        let mut handle = QemuHandle::new(spec, pid, Some(qmp), events, Some(console_start));
        handle.start_up = Some(start_up);
        Ok(Arc::new(handle))
    }

    #[instrument(skip_all, fields(vm = %spec.name, pid = pid.pid))]
    async fn adopt(
        &self,
        spec: &MachineSpec,
        pid: ProcessId,
    ) -> Result<Arc<dyn VmmHandle>, VmmError> {
        let paths = RunPaths::of(&spec.run_dir);
        // The pid file path names this VM's run dir exactly (a bare run-dir
        // prefix would also match `<run_dir>0/...`) and, unlike the socket
        // paths, is passed unescaped.
        if !pid.matches(&paths.pid.to_string_lossy()) {
            return Err(VmmError::NotAdoptable { pid: pid.pid });
        }
        // A QEMU started by an older banger has no event monitor. The
        // watcher connects in the background: a previous owner's
        // connection may linger a moment.
        let events = if paths.events.exists() {
            EventSource::Connect(paths.events.clone())
        } else {
            EventSource::None
        };
        let handle = QemuHandle::new(spec, pid, None, events, None);
        // Proves the process is a QEMU that answers; keeps the connection.
        let status = handle.status().await?;
        // Give the watcher a moment to be served, so that an exit right
        // after the adoption is not missed.
        let listening = handle.wait_listening(ADOPT_EVENTS_WAIT).await;
        tracing::info!(status = %status.detail, events = listening, "adopted QEMU");
        Ok(Arc::new(handle))
    }
}

/// Where a handle's event watcher gets its QMP events from.
enum EventSource {
    /// A connection made during the launch.
    Connected(QmpClient),
    /// A socket to connect to (adoption).
    Connect(PathBuf),
    /// None: no event monitor.
    None,
}

/// What the event watcher publishes.
#[derive(Debug, Clone, Default)]
struct Watched {
    /// The watcher is connected and negotiated: no event is missed.
    listening: bool,
    events: QemuEvents,
}

/// Reads QEMU's events until the connection ends (QEMU exited) and
/// publishes what matters for the exit reason.
async fn watch_events(source: EventSource, tx: watch::Sender<Watched>) {
    let mut client = match source {
        EventSource::Connected(client) => client,
        EventSource::Connect(path) => match QmpClient::connect(&path).await {
            Ok(client) => client,
            Err(err) => {
                tracing::debug!(error = %err, "cannot watch QEMU's events");
                return;
            }
        },
        EventSource::None => return,
    };
    tx.send_modify(|w| w.listening = true);
    while let Ok(event) = client.next_event().await {
        tracing::info!(event = %event.name, data = %event.data, "QEMU event");
        match event.name.as_str() {
            "SHUTDOWN" => {
                let reason = event
                    .data
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(String::from);
                tx.send_modify(|w| w.events.shutdown_reason = reason);
            }
            "GUEST_PANICKED" => tx.send_modify(|w| w.events.panicked = true),
            _ => {}
        }
    }
}

/// A QEMU process started (or adopted) for one VM.
pub struct QemuHandle {
    name: String,
    pid: ProcessId,
    paths: RunPaths,
    qmp: Mutex<Option<QmpClient>>,
    /// What the event watcher saw; closed when the watcher ended.
    events: watch::Receiver<Watched>,
    watcher: Option<AbortHandle>,
    console: PathBuf,
    /// The console's length at launch (`None`: adopted).
    console_from: Option<u64>,
    /// The process status, once seen: `process::wait_exit` can reap only
    /// once (kept apart from `exit`, so that a wait cancelled while the
    /// reason is worked out does not lose it).
    status: OnceCell<process::Exit>,
    /// How it exited, once worked out.
    exit: OnceCell<VmmExit>,
    /// Spawn → QMP answering, for a launch.
    start_up: Option<Duration>,
}

impl Drop for QemuHandle {
    /// Ends the event watcher, so that its connection does not keep the
    /// next owner (a re-adopting supervisor) from being served.
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
    }
}

impl fmt::Debug for QemuHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuHandle")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("run_dir", &self.paths.qmp.parent())
            .field("exit", &self.exit.get())
            .finish_non_exhaustive()
    }
}

impl QemuHandle {
    fn new(
        spec: &MachineSpec,
        pid: ProcessId,
        qmp: Option<QmpClient>,
        events: EventSource,
        console_from: Option<u64>,
    ) -> Self {
        let (tx, rx) = watch::channel(Watched::default());
        // Without a runtime (never in practice) there is just no watcher.
        let watcher = tokio::runtime::Handle::try_current()
            .ok()
            .map(|rt| rt.spawn(watch_events(events, tx)).abort_handle());
        Self {
            name: spec.name.clone(),
            pid,
            paths: RunPaths::of(&spec.run_dir),
            qmp: Mutex::new(qmp),
            events: rx,
            watcher,
            console: spec.console_log.clone(),
            console_from,
            status: OnceCell::new(),
            exit: OnceCell::new(),
            start_up: None,
        }
    }

    /// Waits up to `bound` until the event watcher listens; false when it
    /// does not (no event monitor, or still waiting for a previous owner's
    /// connection to go).
    async fn wait_listening(&self, bound: Duration) -> bool {
        let mut rx = self.events.clone();
        let listening =
            tokio::time::timeout(bound, async { rx.wait_for(|w| w.listening).await.is_ok() }).await;
        listening.unwrap_or(false)
    }

    /// The files of this VM's run dir.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// Runs a QMP command on the handle's connection (opening a new one if
    /// there is none or it broke). One retry on a fresh connection when an
    /// existing one fails on the transport.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut slot = self.qmp.lock().await;
        if slot.as_ref().is_some_and(QmpClient::is_broken) {
            *slot = None;
        }
        let had_connection = slot.is_some();
        match Self::execute_on(&mut slot, &self.paths.qmp, command, arguments.clone()).await {
            Err(err)
                if had_connection
                    && !matches!(err, VmmError::Qmp { .. })
                    && self.pid.is_alive() =>
            {
                tracing::debug!(error = %err, "QMP connection broke; reconnecting");
                Self::execute_on(&mut slot, &self.paths.qmp, command, arguments).await
            }
            other => other,
        }
    }

    async fn execute_on(
        slot: &mut Option<QmpClient>,
        socket: &Path,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let client = match slot {
            Some(client) => client,
            None => {
                let client = tokio::time::timeout(QMP_TIMEOUT, QmpClient::connect(socket))
                    .await
                    .map_err(|_| {
                        VmmError::Control(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no QMP greeting on {} within {QMP_TIMEOUT:?} (is another client connected?)",
                                socket.display()
                            ),
                        ))
                    })??;
                slot.insert(client)
            }
        };
        let result =
            match tokio::time::timeout(QMP_TIMEOUT, client.execute(command, arguments)).await {
                Ok(result) => result,
                Err(_) => Err(qmp_timeout(command)),
            };
        for event in client.take_events() {
            tracing::info!(event = %event.name, data = %event.data, "QEMU event");
        }
        if client.is_broken() {
            *slot = None;
        }
        result
    }

    /// Waits for the exit and remembers it with its reason (reaping
    /// happens once).
    async fn exited(&self) -> VmmExit {
        self.exit
            .get_or_init(|| async {
                let status = *self
                    .status
                    .get_or_init(|| process::wait_exit(self.pid))
                    .await;
                // The watcher ends at the EOF that follows the exit.
                let mut rx = self.events.clone();
                let _ = tokio::time::timeout(EVENTS_GRACE, async {
                    while rx.changed().await.is_ok() {}
                })
                .await;
                let events = rx.borrow().events.clone();
                let console = exit_reason::console_since(&self.console, self.console_from);
                let exit =
                    exit_reason::classify_qemu(status, &events, exit_reason::console_hint(&console));
                tracing::info!(vm = %self.name, pid = self.pid.pid, %status, ?events, reason = %exit, "QEMU exited");
                exit
            })
            .await
            .clone()
    }

    fn is_gone(&self) -> bool {
        self.status.initialized() || !self.pid.is_alive()
    }

    async fn kill_inner(&self) -> Result<VmmExit, VmmError> {
        self.pid.sigkill();
        let exit = tokio::time::timeout(KILL_TIMEOUT, self.exited())
            .await
            .map_err(|_| {
                VmmError::Control(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "QEMU (pid {}) still runs {KILL_TIMEOUT:?} after SIGKILL",
                        self.pid.pid
                    ),
                ))
            })?;
        *self.qmp.lock().await = None;
        Ok(exit)
    }
}

#[async_trait::async_trait]
impl VmmHandle for QemuHandle {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn process(&self) -> ProcessId {
        self.pid
    }

    fn start_up(&self) -> Option<Duration> {
        self.start_up
    }

    /// Connects to the agent's virtio-serial port. QEMU serves one client
    /// at a time: a new connection is accepted once the previous stream is
    /// dropped (until then it waits in the socket's backlog).
    async fn connect_agent(&self) -> Result<UnixStream, VmmError> {
        if self.is_gone() {
            return Err(VmmError::Agent(format!(
                "QEMU for VM {} is not running",
                self.name
            )));
        }
        UnixStream::connect(&self.paths.agent).await.map_err(|e| {
            VmmError::Agent(format!(
                "cannot connect to {}: {e}",
                self.paths.agent.display()
            ))
        })
    }

    async fn status(&self) -> Result<VmmStatus, VmmError> {
        if self.is_gone() {
            let detail = match self.status.get() {
                Some(status) => format!("exited ({status})"),
                None => "exited".to_string(),
            };
            return Ok(VmmStatus {
                running: false,
                detail,
            });
        }
        let ret = self.execute("query-status", None).await?;
        parse_status(&ret)
    }

    #[instrument(skip_all, fields(vm = %self.name, pid = self.pid.pid))]
    async fn stop(&self, timeout: Duration) -> Result<StopOutcome, VmmError> {
        if self.is_gone() {
            self.exited().await;
            return Ok(StopOutcome::AlreadyExited);
        }
        if let Err(err) = self.execute("system_powerdown", None).await {
            // It may have exited just now; either way we wait, then kill.
            tracing::warn!(error = %err, "system_powerdown failed");
        }
        if let Ok(exit) = tokio::time::timeout(timeout, self.exited()).await {
            *self.qmp.lock().await = None;
            tracing::info!(%exit, "guest powered off");
            return Ok(StopOutcome::Clean);
        }
        let exit = self.kill_inner().await?;
        tracing::info!(%exit, ?timeout, "guest did not power off in time; killed QEMU");
        Ok(StopOutcome::Killed)
    }

    #[instrument(skip_all, fields(vm = %self.name, pid = self.pid.pid))]
    async fn kill(&self) -> Result<(), VmmError> {
        let exit = self.kill_inner().await?;
        tracing::info!(%exit, "killed QEMU");
        Ok(())
    }

    async fn wait_exit_reason(&self) -> VmmExit {
        self.exited().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Accel;
    use std::os::unix::fs::PermissionsExt;

    fn spec(dir: &Path) -> MachineSpec {
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, b"not a kernel").unwrap();
        MachineSpec {
            name: "t".into(),
            vcpus: 1,
            memory_mib: 64,
            kernel,
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            net: None,
            run_dir: dir.join("run"),
            console_log: dir.join("console.log"),
            accel: Accel::Tcg,
        }
    }

    /// Writes an executable script. Spawning it right after writing can
    /// fail with ETXTBSY when another test thread forks meanwhile, so the
    /// launch is retried on that error.
    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fake-qemu");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    async fn launch(backend: &QemuBackend, spec: &MachineSpec) -> Result<(), VmmError> {
        for _ in 0..20 {
            match backend.launch(spec).await {
                Err(VmmError::Spawn { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other.map(|_| ()),
            }
        }
        panic!("the fake QEMU stayed busy (ETXTBSY)");
    }

    #[tokio::test]
    async fn a_missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let backend = QemuBackend::with_binary(dir.path().join("no-such-qemu"));
        let err = backend.launch(&spec(dir.path())).await.unwrap_err();
        assert!(matches!(err, VmmError::Spawn { .. }), "{err:?}");
        assert!(QemuBackend::with_binary("x").binary() == Path::new("x"));
    }

    #[tokio::test]
    async fn an_invalid_spec_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        spec.vcpus = 0;
        let marker = dir.path().join("started");
        let fake = script(dir.path(), &format!("touch {}", marker.display()));
        let err = launch(&QemuBackend::with_binary(fake), &spec)
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::InvalidSpec { .. }), "{err:?}");
        assert!(!marker.exists());
        assert!(!spec.run_dir.exists());
    }

    #[tokio::test]
    async fn an_early_exit_reports_status_and_this_launchs_output() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        std::fs::create_dir_all(&spec.run_dir).unwrap();
        std::fs::write(
            RunPaths::of(&spec.run_dir).log,
            "output of an earlier run\n",
        )
        .unwrap();
        // The pause keeps spawn_detached from seeing an instant exit.
        let fake = script(
            dir.path(),
            "sleep 0.2; echo \"qemu: cannot do $2\" >&2; exit 3",
        );
        let err = launch(&QemuBackend::with_binary(fake), &spec)
            .await
            .unwrap_err();
        match err {
            VmmError::EarlyExit { status, output } => {
                assert_eq!(status, "exit code 3");
                assert_eq!(output, "qemu: cannot do banger-t");
            }
            other => panic!("expected EarlyExit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_qemu_that_never_answers_is_killed_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let pidfile = dir.path().join("fake.pid");
        let fake = script(
            dir.path(),
            &format!("echo $$ > {}; exec sleep 600", pidfile.display()),
        );
        let backend =
            QemuBackend::with_binary(fake).with_startup_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let err = launch(&backend, &spec).await.unwrap_err();
        assert!(matches!(err, VmmError::SocketTimeout(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed and reaped: no /proc entry, not even a zombie.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "fake QEMU {pid} is still there"
        );
    }

    #[tokio::test]
    async fn a_run_dir_in_use_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        std::fs::create_dir_all(&spec.run_dir).unwrap();
        let paths = RunPaths::of(&spec.run_dir);
        let _live = tokio::net::UnixListener::bind(&paths.qmp).unwrap();
        let err = QemuBackend::with_binary("/bin/false")
            .launch(&spec)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is in use"), "{err}");
        assert!(paths.qmp.exists());

        // A stale socket (nobody listening) is removed. A child another
        // test is spawning holds a copy of the listener until its exec, so
        // wait until nobody answers any more.
        drop(_live);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&paths.qmp).is_ok() {
            assert!(Instant::now() < deadline, "the listener stays open");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::write(&paths.agent, b"").unwrap();
        let err = QemuBackend::with_binary("/bin/false")
            .launch(&spec)
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::EarlyExit { .. }), "{err:?}");
        assert!(!paths.qmp.exists() && !paths.agent.exists());
    }

    #[test]
    fn status_parsing() {
        let s = parse_status(&serde_json::json!({"status": "paused", "running": false})).unwrap();
        assert_eq!(
            s,
            VmmStatus {
                running: false,
                detail: "paused".into()
            }
        );
        assert!(parse_status(&serde_json::json!({})).is_err());
    }
}
