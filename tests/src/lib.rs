//! Test harness: runs a real `bangerd` process in its own temporary XDG
//! directories, so integration tests and benchmarks exercise the binaries
//! exactly as a user would, in parallel and without touching the host's
//! banger installation.
//!
//! - [`TestDaemon`] owns one daemon (and its temp dirs) for its lifetime:
//!   start, signal, restart (also into a network namespace of its own:
//!   [`TestDaemon::move_into_netns`]), run the `banger` CLI against it (in
//!   that namespace: [`TestDaemon::banger_in_netns`]), read its logs.
//!   Dropping it kills whatever daemon still runs on its dirs.
//! - [`RawConnection`] speaks frames by hand, for malformed-input tests.
//! - [`wait`] polls for a condition with a deadline instead of sleeping.
//! - [`artifacts`], [`oci`], [`ext4`] and [`http`] serve the image and
//!   kernel tests: streaming requests with their progress, hand-made OCI
//!   layers, reading built ext4 images with debugfs, and a loopback HTTP
//!   server with `Range` support.
//!
//! The binaries are found with [`bin_path`]; build them first with
//! `cargo build --workspace --bins`.

pub mod artifacts;
pub mod ext4;
pub mod http;
pub mod netns;
pub mod oci;
mod raw;
pub mod vm;
pub mod wait;

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use banger_protocol::client::{Client, ClientError};
use banger_protocol::paths::Paths;
use banger_protocol::{ActorInfo, ActorStatus, Request, Response};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

pub use raw::{RawConnection, Received};

/// How long [`TestDaemonBuilder::start`] waits for the daemon to answer a handshake.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a `banger` CLI invocation may run before the harness kills it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of a workspace binary (`bangerd`, `banger`, ...).
///
/// `BANGER_BIN_DIR` wins when set; otherwise the binary is looked up in the
/// cargo profile directory of the running executable (`target/<profile>/`:
/// an integration test runs from `target/<profile>/deps/`).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("BANGER_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir(),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: build it first: cargo build --workspace --bins \
         (or point BANGER_BIN_DIR at the directory holding it)",
        path.display()
    );
    path
}

fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let parent = exe.parent().expect("the executable has a parent directory");
    match parent.file_name().and_then(|n| n.to_str()) {
        Some("deps") | Some("examples") => parent.parent().unwrap_or(parent).to_path_buf(),
        _ => parent.to_path_buf(),
    }
}

/// Configures a [`TestDaemon`] before it starts.
#[derive(Debug, Default)]
pub struct TestDaemonBuilder {
    config: Option<String>,
    /// Run in a network namespace of its own (see [`netns`]).
    netns: bool,
    /// A program that starts `bangerd` (its path and arguments follow):
    /// for a test that prepares the daemon's surroundings first, e.g. a
    /// private mount namespace.
    wrapper: Option<PathBuf>,
    /// Start `bangerd` in a session of its own (see [`Self::own_session`]).
    own_session: bool,
    /// Size in MiB of a tmpfs mounted on the state directory (see
    /// [`Self::state_on_tmpfs`]).
    state_tmpfs_mib: Option<u64>,
}

impl TestDaemonBuilder {
    /// The contents of `config.toml` (TOML text).
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// Starts `bangerd` through `program`, which gets the daemon's path as
    /// its first argument and must end by exec'ing it (it runs inside the
    /// namespace with `netns()`).
    pub fn wrapper(mut self, program: impl Into<PathBuf>) -> Self {
        self.wrapper = Some(program.into());
        self
    }

    /// Starts `bangerd` as the leader of a session of its own, as the CLI's
    /// auto-start and systemd do, so it also sets its autogroup's nice
    /// value (see `daemon/src/priority.rs`). Without it the daemon shares
    /// the test's session and autogroup, which competes with every VMM
    /// (each has a session and autogroup of its own) as one equal group:
    /// benchmarks use this to measure the daemon as users run it.
    pub fn own_session(mut self) -> Self {
        self.own_session = true;
        self
    }

    /// Puts the daemon's state directory (database, images, VM disks) on a
    /// tmpfs of `mib` MiB of its own, so a test can fill it up. It is
    /// unmounted (lazily) when the daemon is dropped.
    pub fn state_on_tmpfs(mut self, mib: u64) -> Self {
        self.state_tmpfs_mib = Some(mib);
        self
    }

    /// Creates the directories and starts `bangerd`, waiting until it
    /// answers a handshake. Panics (with the daemon's stderr) if it exits
    /// or is not ready within [`READY_TIMEOUT`].
    pub fn start(self) -> TestDaemon {
        let mut daemon = self.prepare();
        daemon.launch();
        daemon
    }

    /// Creates the directories (and config) without starting a daemon: for
    /// tests of the CLI's auto-start, or of a daemon that must fail to start.
    pub fn prepare(self) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("banger-test-")
            .tempdir()
            .expect("temp dir");
        for sub in ["config", "state", "run"] {
            fs::create_dir(dir.path().join(sub)).expect("create XDG dir");
        }
        fs::set_permissions(dir.path().join("run"), fs::Permissions::from_mode(0o700))
            .expect("chmod runtime dir");
        let state_tmpfs = self.state_tmpfs_mib.map(|mib| {
            let state = dir.path().join("state");
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={mib}m,mode=0755"))
                .arg("banger-test-state")
                .arg(&state)
                .output()
                .expect("run mount");
            assert!(
                out.status.success(),
                "mounting a tmpfs on {}: {}",
                state.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            state
        });
        let netns = self.netns.then(netns::NetNs::create);
        let config = self.config.as_deref().unwrap_or("");
        let config = match netns {
            // The network is the namespace's: keep the daemon's defaults.
            Some(_) if !config.contains("[dns]") => {
                format!("{config}\n[dns]\nlisten = \"127.0.0.1:0\"\n")
            }
            Some(_) => config.to_string(),
            None => with_test_defaults(config),
        };
        let daemon = TestDaemon {
            dir,
            child: None,
            launches: 0,
            netns,
            wrapper: self.wrapper,
            own_session: self.own_session,
            state_tmpfs,
        };
        let path = daemon.paths().config_file();
        fs::create_dir_all(path.parent().expect("config dir")).expect("create config dir");
        fs::write(&path, config).expect("write config.toml");
        daemon
    }
}

/// Test daemons run side by side on the host: unless a test configures
/// them itself, they create no bridge, TAP or nft table (that is for tests
/// that run the daemon in a network namespace of their own), and their DNS
/// server takes a free port.
pub fn with_test_defaults(config: &str) -> String {
    let mut out = config.to_string();
    if !config.contains("[network]") {
        out.push_str("\n[network]\nenabled = false\n");
    }
    if !config.contains("[dns]") {
        out.push_str("\n[dns]\nlisten = \"127.0.0.1:0\"\n");
    }
    out
}

/// One `bangerd` process in its own temporary XDG directories.
///
/// Every `TestDaemon` has its own directories, so tests run in parallel.
/// `Drop` SIGKILLs the daemon if it still runs (and any daemon the CLI
/// auto-started on these directories), so nothing leaks when a test fails.
#[derive(Debug)]
pub struct TestDaemon {
    dir: TempDir,
    child: Option<Child>,
    launches: u32,
    /// Dropped after the daemon is killed (`Drop` runs before the fields).
    netns: Option<netns::NetNs>,
    wrapper: Option<PathBuf>,
    own_session: bool,
    /// The state directory when it is a tmpfs of the test's, unmounted on
    /// drop.
    state_tmpfs: Option<PathBuf>,
}

impl TestDaemon {
    pub fn builder() -> TestDaemonBuilder {
        TestDaemonBuilder::default()
    }

    /// A daemon with the default configuration.
    pub fn start() -> TestDaemon {
        Self::builder().start()
    }

    /// The temporary directory holding `config/`, `state/` and `run/`.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The XDG variables every process of this test runs with.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let root = self.dir.path();
        vec![
            ("XDG_CONFIG_HOME", root.join("config").into_os_string()),
            ("XDG_STATE_HOME", root.join("state").into_os_string()),
            ("XDG_RUNTIME_DIR", root.join("run").into_os_string()),
        ]
    }

    /// banger's paths as the daemon and the CLI see them.
    pub fn paths(&self) -> Paths {
        let env = self.env();
        Paths::from_lookup(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .expect("XDG variables are absolute")
    }

    pub fn socket(&self) -> PathBuf {
        self.paths().socket()
    }

    /// A `bangerd` command with this test's environment; stdio is left to the caller.
    pub fn bangerd_command(&self) -> Command {
        let mut cmd = match (&self.netns, &self.wrapper) {
            (Some(ns), None) => ns.command(bin_path("bangerd")),
            (None, None) => Command::new(bin_path("bangerd")),
            (Some(ns), Some(w)) => {
                let mut cmd = ns.command(w);
                cmd.arg(bin_path("bangerd"));
                cmd
            }
            (None, Some(w)) => {
                let mut cmd = Command::new(w);
                cmd.arg(bin_path("bangerd"));
                cmd
            }
        };
        self.apply_env(&mut cmd);
        cmd
    }

    /// A `banger` command with this test's environment (and `BANGERD`
    /// pointing at the daemon binary for auto-start).
    pub fn banger_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(bin_path("banger"));
        cmd.args(args);
        self.apply_env(&mut cmd);
        cmd.env("BANGERD", bin_path("bangerd"));
        cmd
    }

    /// A `banger` command that runs inside the daemon's network namespace
    /// (`ip netns exec`), so what the CLI starts (the system `ssh`) reaches
    /// the guests. Panics without a namespace.
    pub fn banger_command_in_netns<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let ns = self
            .netns
            .as_ref()
            .expect("this daemon has no namespace: use netns() or move_into_netns()");
        let mut cmd = ns.command(bin_path("banger"));
        cmd.args(args);
        self.apply_env(&mut cmd);
        cmd.env("BANGERD", bin_path("bangerd"));
        cmd
    }

    /// Runs the real `banger` CLI inside the daemon's network namespace
    /// (stdin is not a terminal) and returns its output. Panics if it runs
    /// longer than `timeout`.
    pub fn banger_in_netns<I, S>(&self, args: I, timeout: Duration) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let cmd = self.banger_command_in_netns(args);
        self.run_command(cmd, timeout)
    }

    fn apply_env(&self, cmd: &mut Command) {
        cmd.env_remove("RUST_LOG");
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// Runs the real `banger` CLI against this daemon and returns its output.
    /// Panics if it runs longer than [`CLI_TIMEOUT`].
    pub fn banger<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let cmd = self.banger_command(args);
        self.run_command(cmd, CLI_TIMEOUT)
    }

    /// Runs `cmd` to completion with stdout and stderr captured (in files,
    /// so a chatty process cannot block on a full pipe). Panics, after
    /// killing it, if it runs longer than `timeout`.
    pub fn run_command(&self, mut cmd: Command, timeout: Duration) -> Output {
        let out = tempfile::NamedTempFile::new_in(self.dir.path()).expect("stdout file");
        let err = tempfile::NamedTempFile::new_in(self.dir.path()).expect("stderr file");
        cmd.stdin(Stdio::null())
            .stdout(out.reopen().expect("reopen stdout"))
            .stderr(err.reopen().expect("reopen stderr"));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let status = wait_child(&mut child, timeout);
        let stdout = fs::read(out.path()).expect("read stdout");
        let stderr = fs::read(err.path()).expect("read stderr");
        match status {
            Some(status) => Output {
                status,
                stdout,
                stderr,
            },
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
        }
    }

    /// Starts another `bangerd` on the same directories while this one
    /// may still run, and returns how it ended (for single-instance tests).
    pub fn run_second_instance(&self, timeout: Duration) -> Output {
        let cmd = self.bangerd_command();
        self.run_command(cmd, timeout)
    }

    /// The file the daemon's stderr is appended to (across restarts).
    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("bangerd.stderr")
    }

    /// Everything the daemon(s) started by this harness wrote to stderr.
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// The daemon's JSON log file (`Paths::log_file`), or "" if absent.
    pub fn log_file_contents(&self) -> String {
        fs::read_to_string(self.paths().log_file()).unwrap_or_default()
    }

    /// The JSON log lines that parse (a line being written may not yet).
    pub fn log_records(&self) -> Vec<serde_json::Value> {
        self.log_file_contents()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn launch(&mut self) {
        assert!(
            self.child.is_none() || !self.is_running(),
            "bangerd is still running; stop it before starting it again"
        );
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("open stderr log");
        let stdout = stderr.try_clone().expect("dup stderr log");
        let mut cmd = self.bangerd_command();
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        if self.own_session {
            // `ip netns exec` and a wrapper exec the daemon in the same
            // process, so it stays the session's leader.
            // SAFETY: setsid is async-signal-safe and touches no Rust state.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        self.child = Some(child);
        self.launches += 1;
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let socket = self.socket();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_status() {
                panic!(
                    "bangerd exited with {status} before it was ready\nstderr:\n{}",
                    self.stderr_log()
                );
            }
            let last_error = match handshake_blocking(&socket) {
                Ok(()) => return,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let _ = self.sigkill();
                panic!(
                    "bangerd did not accept a handshake on {} within {READY_TIMEOUT:?} \
                     (last error: {last_error})\nstderr:\n{}",
                    socket.display(),
                    self.stderr_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again on the same directories (it must have exited).
    pub fn restart(&mut self) {
        self.launch();
    }

    /// How many times this harness started `bangerd`.
    pub fn launches(&self) -> u32 {
        self.launches
    }

    /// Starts the daemon again on the same directories, now inside a fresh
    /// network namespace owned by this test and with networking enabled:
    /// for a test that needs the host's network first (the golden image
    /// build reaches Debian's archive) and guests afterwards. The daemon
    /// must have exited and must not have had a namespace. `config.toml`
    /// is replaced by `config` (whose `[network]` defaults, not the test
    /// defaults, apply), plus a free DNS port unless `config` sets `[dns]`.
    pub fn move_into_netns(&mut self, config: &str) {
        assert!(
            !self.is_running(),
            "bangerd is still running; stop it before moving it into a namespace"
        );
        if let Some(pid) = self.lock_file_pid() {
            assert!(
                !self.owns_process(pid),
                "a bangerd (pid {pid}) still runs on these directories"
            );
        }
        assert!(self.netns.is_none(), "the daemon already has a namespace");
        let mut text = config.to_string();
        if !config.contains("[dns]") {
            text.push_str("\n[dns]\nlisten = \"127.0.0.1:0\"\n");
        }
        fs::write(self.paths().config_file(), text).expect("rewrite config.toml");
        self.netns = Some(netns::NetNs::create());
        self.launch();
    }

    /// A handshaken client. Panics if the daemon does not accept one.
    pub async fn client(&self) -> Client {
        self.try_client()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to bangerd: {}", error_chain(&e)))
    }

    pub async fn try_client(&self) -> Result<Client, ClientError> {
        Client::connect(&self.socket()).await
    }

    /// The daemon's pid. Panics if this harness did not start one.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("no daemon was started").id()
    }

    fn signal(&self, signal: Signal) -> nix::Result<()> {
        let pid = i32::try_from(self.pid()).expect("pid fits i32");
        kill(Pid::from_raw(pid), signal)
    }

    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM).expect("send SIGTERM");
    }

    pub fn sigint(&self) {
        self.signal(Signal::SIGINT).expect("send SIGINT");
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn sigkill(&mut self) -> Option<ExitStatus> {
        if self.is_running() {
            let _ = self.signal(Signal::SIGKILL);
        }
        self.wait_exit(Duration::from_secs(10))
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Whether the daemon this harness started is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Waits (polling) for the daemon to exit; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("no daemon was started");
        wait_child(child, timeout)
    }

    /// The pid recorded in the lock file (the daemon running on these
    /// directories, whoever started it).
    pub fn lock_file_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.paths().lock_file()).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// Kills a daemon on these directories that this harness did not start
    /// (one auto-started by the CLI). Only a process that is `bangerd` and
    /// runs with this test's `XDG_RUNTIME_DIR` is touched.
    pub fn kill_foreign_daemon(&self) {
        let Some(pid) = self.lock_file_pid() else {
            return;
        };
        if self.child.as_ref().is_some_and(|c| c.id() == pid) || !self.owns_process(pid) {
            return;
        }
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Whether `pid` is a `bangerd` running on this test's directories.
    pub fn owns_process(&self, pid: u32) -> bool {
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let mut wanted = b"XDG_RUNTIME_DIR=".to_vec();
        wanted.extend_from_slice(self.dir.path().join("run").as_os_str().as_encoded_bytes());
        let is_bangerd = cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"bangerd"));
        is_bangerd
            && environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_slice())
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.kill_foreign_daemon();
        // VMMs run detached from bangerd (they outlive it on purpose): kill
        // every process whose command line mentions this daemon's dirs.
        for pid in self.processes_mentioning_root() {
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        if let Some(state) = &self.state_tmpfs {
            // Lazily: a VMM just killed may still hold a disk open.
            let _ = Command::new("umount").arg("-l").arg(state).status();
        }
    }
}

impl TestDaemon {
    /// Live processes (other than this one) whose command line mentions
    /// this daemon's temporary root: its bangerd and its VMMs.
    pub fn processes_mentioning_root(&self) -> Vec<u32> {
        let root = self.dir.path().display().to_string();
        let me = std::process::id();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(&root) {
                out.push(pid);
            }
        }
        out
    }
}

/// Polls `child` until it exits or `timeout` passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One `Client::connect` attempt from a plain thread with its own runtime,
/// so it works whether or not the caller is inside a tokio runtime.
fn handshake_blocking(socket: &Path) -> Result<(), String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                match tokio::time::timeout(Duration::from_secs(2), Client::connect(socket)).await {
                    Ok(Ok(_client)) => Ok(()),
                    Ok(Err(e)) => Err(error_chain(&e)),
                    Err(_) => Err("handshake timed out".to_string()),
                }
            })
        })
        .join()
        .unwrap_or_else(|_| Err("handshake thread panicked".to_string()))
    })
}

/// An error and its sources, `: `-separated, for assertion messages.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// `DebugActors` through `client`; panics on any error.
pub async fn actors(client: &mut Client) -> Vec<ActorInfo> {
    match client.request(Request::DebugActors).await {
        Ok(Response::Actors(actors)) => actors,
        Ok(other) => panic!("DebugActors answered {other:?}"),
        Err(e) => panic!("DebugActors failed: {}", error_chain(&e)),
    }
}

/// The actor called `name` in `list`.
pub fn find_actor<'a>(list: &'a [ActorInfo], name: &str) -> Option<&'a ActorInfo> {
    list.iter().find(|a| a.name == name)
}

/// Whether every actor in `list` is running.
pub fn all_running(list: &[ActorInfo]) -> bool {
    list.iter().all(|a| a.status == ActorStatus::Running)
}

/// The group to use for `socket_group` tests: a group this process may
/// chown to (any group for root, a supplementary group otherwise), other
/// than its primary one when possible, so the chown is observable.
pub fn usable_group() -> nix::unistd::Group {
    use nix::unistd::{getegid, geteuid, getgroups, Gid, Group};
    let egid = getegid();
    let mut candidates: Vec<Gid> = if geteuid().is_root() {
        fs::read_to_string("/etc/group")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(':').nth(2)?.parse::<u32>().ok())
            .map(Gid::from_raw)
            .collect()
    } else {
        getgroups().unwrap_or_default()
    };
    candidates.retain(|g| *g != egid);
    candidates.push(egid);
    candidates
        .into_iter()
        .find_map(|gid| Group::from_gid(gid).ok().flatten())
        .expect("at least the primary group has a name in /etc/group")
}

/// Field `n` (counting from 1, as proc(5) does; 3 or later) of a `stat`
/// file. The command name (field 2) may hold spaces and ends at the last
/// ')'.
fn stat_field<T: std::str::FromStr>(stat_path: &Path, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// Whether process `pid` leads its own session (field 6 of its stat).
pub fn session_leader(pid: u32) -> bool {
    stat_field::<u32>(Path::new(&format!("/proc/{pid}/stat")), 6) == Some(pid)
}

/// The nice value of every thread of process `pid`, and its autogroup's
/// nice value where the kernel has autogroups.
pub fn nice_values(pid: u32) -> (Vec<i32>, Option<i32>) {
    let mut threads = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Some(nice) = stat_field(&task.path().join("stat"), 19) {
                threads.push(nice);
            }
        }
    }
    let group = std::fs::read_to_string(format!("/proc/{pid}/autogroup"))
        .ok()
        .and_then(|s| s.split_whitespace().last()?.parse().ok());
    (threads, group)
}
