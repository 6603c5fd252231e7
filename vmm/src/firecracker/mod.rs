//! Firecracker backend: starts the `firecracker` binary with an API socket
//! in the VM's run dir, configures the microVM over its HTTP API and boots
//! it; the VmSupervisor (in `banger-actors`) then holds the
//! [`FirecrackerHandle`].
//!
//! - [`api`]: the request/response bodies, mirroring Firecracker's swagger.
//! - [`client`]: HTTP/1.1 over the API Unix socket, error answers mapped to
//!   [`VmmError::Firecracker`].
//! - [`vsock`]: the hybrid-vsock `CONNECT <port>` handshake used to reach
//!   the guest agent.
//!
//! Files in the run dir: `fc.sock` (API), `vsock.sock` (hybrid vsock),
//! `firecracker.log` (Firecracker's own log once configured). Firecracker's
//! stdout/stderr, which carry the guest's serial console, are appended to
//! [`MachineSpec::console_log`].
//!
//! Launch order: validate the spec (ELF kernel, raw disks, socket path
//! lengths), spawn, wait for the API, then [`configure`]: logger,
//! machine-config, boot-source, drives, network interface, vsock,
//! `InstanceStart`. Any failure kills the process before returning.

pub mod api;
pub mod client;
pub mod vsock;

#[cfg(test)]
mod fake;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tracing::{info, instrument, warn};

use self::api::{
    ActionType, BootSource, Drive, Logger, MachineConfiguration, NetworkInterface, Vsock,
};
use self::client::ApiClient;
use crate::process::{self, Exit, ProcessId};
use crate::{
    exit, DiskFormat, MachineSpec, StopOutcome, VmmBackend, VmmError, VmmExit, VmmHandle, VmmKind,
    VmmStatus,
};

/// API socket file name in the run dir.
pub const API_SOCKET: &str = "fc.sock";
/// Hybrid vsock socket file name in the run dir.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Firecracker's own log file name in the run dir.
pub const LOG_FILE: &str = "firecracker.log";
/// The guest's vsock CID (the lowest a guest may have).
pub const GUEST_CID: u32 = 3;
/// Firecracker's id of the (single) network interface.
pub const NET_IFACE_ID: &str = "net0";
/// Kernel parameters every Firecracker guest needs: the serial console,
/// reboot through the keyboard controller (so Ctrl+Alt+Del and a guest
/// reboot make Firecracker exit), no hang on panic, no PCI probing.
pub const DEFAULT_BOOT_ARGS: [&str; 4] = ["console=ttyS0", "reboot=k", "panic=1", "pci=off"];
/// Longest Unix socket path (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long Firecracker may take to bring its API socket up.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// Bound on each API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the vsock `CONNECT` handshake.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of the logs an early-exit error quotes.
const LOG_TAIL: usize = 2000;

/// The files of one VM's run dir that Firecracker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    pub api_socket: PathBuf,
    pub vsock: PathBuf,
    pub log: PathBuf,
}

impl RunPaths {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            api_socket: run_dir.join(API_SOCKET),
            vsock: run_dir.join(VSOCK_SOCKET),
            log: run_dir.join(LOG_FILE),
        }
    }
}

/// The kernel command line for Firecracker: `cmdline` plus those of
/// [`DEFAULT_BOOT_ARGS`] whose key (`console=`, `reboot=`...) it does not
/// set already.
pub fn firecracker_boot_args(cmdline: &str) -> String {
    let mut args: Vec<&str> = cmdline.split_whitespace().collect();
    for default in DEFAULT_BOOT_ARGS {
        let key = &default[..=default.find('=').unwrap_or(default.len() - 1)];
        if !args.iter().any(|a| a.starts_with(key)) {
            args.push(default);
        }
    }
    args.join(" ")
}

/// Whether `path` is an ELF file (`\x7fELF` magic). Unreadable files are not.
pub fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The `--id` for Firecracker: alphanumerics and `-`, at most 64 characters.
pub fn instance_id(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() {
        "banger-vm".into()
    } else {
        id
    }
}

fn invalid(reason: impl Into<String>) -> VmmError {
    VmmError::InvalidSpec {
        backend: VmmKind::Firecracker,
        reason: reason.into(),
    }
}

fn path_str(path: &Path) -> Result<String, VmmError> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("{} is not valid UTF-8", path.display())))
}

/// Checks what Firecracker would refuse late (or not at all): the kernel's
/// format, disk formats and ids, vCPU count, socket path lengths.
pub fn validate(spec: &MachineSpec) -> Result<(), VmmError> {
    if let Err(e) = std::fs::metadata(&spec.kernel) {
        return Err(invalid(format!(
            "kernel {} cannot be read: {e}",
            spec.kernel.display()
        )));
    }
    if !is_elf(&spec.kernel) {
        return Err(invalid(format!(
            "kernel {} is not an ELF file: Firecracker needs an uncompressed ELF vmlinux \
             (a bzImage/vmlinuz does not boot)",
            spec.kernel.display()
        )));
    }
    if !(1..=32).contains(&spec.vcpus) {
        return Err(invalid(format!(
            "{} vCPUs: Firecracker supports 1 to 32",
            spec.vcpus
        )));
    }
    if spec.memory_mib == 0 {
        return Err(invalid("memory size is 0 MiB"));
    }
    for disk in &spec.disks {
        if disk.format == DiskFormat::Qcow2 {
            return Err(invalid(format!(
                "disk {} ({}) is qcow2: Firecracker only takes raw images",
                disk.id,
                disk.path.display()
            )));
        }
        if disk.id.is_empty() || !disk.id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
            return Err(invalid(format!(
                "disk id {:?}: Firecracker ids are alphanumerics and '_'",
                disk.id
            )));
        }
    }
    let paths = RunPaths::new(&spec.run_dir);
    for socket in [&paths.api_socket, &paths.vsock] {
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "socket path {} is {len} bytes, longer than {MAX_SOCKET_PATH}: use a shorter run dir",
                socket.display()
            )));
        }
    }
    Ok(())
}

/// The API requests that configure `spec`, in the order they are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    pub logger: Logger,
    pub machine: MachineConfiguration,
    pub boot: BootSource,
    pub drives: Vec<Drive>,
    pub net: Option<NetworkInterface>,
    pub vsock: Vsock,
}

impl Configuration {
    pub fn from_spec(spec: &MachineSpec) -> Result<Self, VmmError> {
        let paths = RunPaths::new(&spec.run_dir);
        let mut drives = Vec::with_capacity(spec.disks.len());
        for (i, disk) in spec.disks.iter().enumerate() {
            if disk.format == DiskFormat::Qcow2 {
                return Err(invalid(format!("disk {} is qcow2", disk.id)));
            }
            drives.push(Drive {
                drive_id: disk.id.clone(),
                path_on_host: path_str(&disk.path)?,
                is_root_device: i == 0,
                is_read_only: disk.read_only,
            });
        }
        Ok(Self {
            logger: Logger {
                log_path: Some(path_str(&paths.log)?),
                level: Some("Info".into()),
                show_level: Some(true),
                show_log_origin: Some(false),
            },
            machine: MachineConfiguration {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
                smt: Some(false),
            },
            boot: BootSource {
                kernel_image_path: path_str(&spec.kernel)?,
                boot_args: Some(firecracker_boot_args(&spec.cmdline)),
                initrd_path: spec.initrd.as_deref().map(path_str).transpose()?,
            },
            drives,
            net: spec.net.as_ref().map(|n| NetworkInterface {
                iface_id: NET_IFACE_ID.into(),
                host_dev_name: n.tap.clone(),
                guest_mac: Some(n.mac.clone()),
            }),
            vsock: Vsock {
                guest_cid: GUEST_CID,
                uds_path: path_str(&paths.vsock)?,
            },
        })
    }

    /// Sends every request (without starting the guest).
    pub async fn apply(&self, client: &ApiClient) -> Result<(), VmmError> {
        client.put(&self.logger).await?;
        client.put(&self.machine).await?;
        client.put(&self.boot).await?;
        for drive in &self.drives {
            client.put(drive).await?;
        }
        if let Some(net) = &self.net {
            client.put(net).await?;
        }
        client.put(&self.vsock).await?;
        Ok(())
    }
}

/// Configures a freshly started Firecracker for `spec` and boots the guest
/// (`InstanceStart`). The log file must exist ([`prepare_run_dir`]).
pub async fn configure(client: &ApiClient, spec: &MachineSpec) -> Result<(), VmmError> {
    Configuration::from_spec(spec)?.apply(client).await?;
    client.action(ActionType::InstanceStart).await
}

/// Creates the run dir, removes sockets a previous Firecracker left behind
/// (Firecracker refuses to bind over them) and creates an empty log file
/// (Firecracker opens it without creating it, and writes from offset 0).
pub fn prepare_run_dir(spec: &MachineSpec) -> Result<RunPaths, VmmError> {
    let io = |what: String| move |source| VmmError::Io { what, source };
    std::fs::create_dir_all(&spec.run_dir)
        .map_err(io(format!("creating {}", spec.run_dir.display())))?;
    let paths = RunPaths::new(&spec.run_dir);
    for socket in [&paths.api_socket, &paths.vsock] {
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing stale {}", socket.display()))(e)),
        }
    }
    std::fs::File::create(&paths.log).map_err(io(format!("creating {}", paths.log.display())))?;
    Ok(paths)
}

/// The `firecracker` binary as a [`VmmBackend`].
#[derive(Debug, Clone)]
pub struct FirecrackerBackend {
    binary: PathBuf,
}

impl FirecrackerBackend {
    /// Uses `firecracker` from `PATH`; [`VmmError::BinaryNotFound`] when
    /// there is none.
    pub fn new() -> Result<Self, VmmError> {
        Ok(Self {
            binary: process::find_binary("firecracker")?,
        })
    }

    /// Uses the given binary (not checked until launch).
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn command(&self, spec: &MachineSpec, paths: &RunPaths) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-sock")
            .arg(&paths.api_socket)
            .arg("--id")
            .arg(instance_id(&spec.name));
        cmd
    }
}

/// Waits until the API answers `GET /`, the process dies, or the deadline.
async fn wait_for_api(
    id: ProcessId,
    client: &ApiClient,
    spec: &MachineSpec,
) -> Result<(), VmmError> {
    let started = Instant::now();
    let probe = client.clone().with_timeout(Duration::from_secs(1));
    loop {
        if !id.is_alive() {
            return Err(early_exit(id, spec).await);
        }
        if client.socket().exists() && probe.instance_info().await.is_ok() {
            return Ok(());
        }
        if started.elapsed() >= SOCKET_WAIT {
            return Err(VmmError::SocketTimeout(SOCKET_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`VmmError::EarlyExit`] for a process that died, with its output.
async fn early_exit(id: ProcessId, spec: &MachineSpec) -> VmmError {
    let status = tokio::time::timeout(Duration::from_secs(2), process::wait_exit(id))
        .await
        .unwrap_or(Exit::Unknown);
    let mut output = process::tail_of(&spec.console_log, LOG_TAIL);
    let log = process::tail_of(&RunPaths::new(&spec.run_dir).log, LOG_TAIL);
    if !log.is_empty() {
        output.push_str("\nfirecracker.log: ");
        output.push_str(&log);
    }
    VmmError::EarlyExit {
        status: status.to_string(),
        output,
    }
}

/// Leaves nothing running after a failed launch: a dead process becomes
/// [`VmmError::EarlyExit`], a live one is killed and `err` returned.
async fn abort_launch(id: ProcessId, spec: &MachineSpec, err: VmmError) -> VmmError {
    if matches!(err, VmmError::EarlyExit { .. }) {
        // Already reaped and described.
        return err;
    }
    if !id.is_alive() {
        return early_exit(id, spec).await;
    }
    warn!(vm = %spec.name, pid = id.pid, error = %err, "firecracker launch failed; killing it");
    process::kill_and_wait(id).await;
    err
}

#[async_trait::async_trait]
impl VmmBackend for FirecrackerBackend {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    #[instrument(skip_all, fields(vm = %spec.name))]
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn VmmHandle>, VmmError> {
        validate(spec)?;
        let paths = prepare_run_dir(spec)?;
        let console_start = std::fs::metadata(&spec.console_log)
            .map(|m| m.len())
            .unwrap_or(0);
        let id = process::spawn_detached_off_runtime(
            self.command(spec, &paths),
            spec.console_log.clone(),
        )
        .await?;
        info!(pid = id.pid, binary = %self.binary.display(), "firecracker started");
        let spawned = std::time::Instant::now();
        let client = ApiClient::new(&paths.api_socket).with_timeout(API_TIMEOUT);
        let mut start_up = None;
        let configured = async {
            wait_for_api(id, &client, spec).await?;
            start_up = Some(spawned.elapsed());
            configure(&client, spec).await
        };
        if let Err(err) = configured.await {
            return Err(abort_launch(id, spec, err).await);
        }
        info!(pid = id.pid, "firecracker guest started");
        let mut handle = FirecrackerHandle::new(spec, id, client, Some(console_start));
        handle.start_up = start_up;
        Ok(Arc::new(handle))
    }

    #[instrument(skip_all, fields(vm = %spec.name, pid = pid.pid))]
    async fn adopt(
        &self,
        spec: &MachineSpec,
        pid: ProcessId,
    ) -> Result<Arc<dyn VmmHandle>, VmmError> {
        let paths = RunPaths::new(&spec.run_dir);
        // The API socket path names this VM's run dir exactly (a bare run
        // dir `/x/a` would also match `/x/ab/...`).
        if !pid.matches(&paths.api_socket.to_string_lossy()) {
            return Err(VmmError::NotAdoptable { pid: pid.pid });
        }
        let client = ApiClient::new(&paths.api_socket).with_timeout(API_TIMEOUT);
        let info = client.instance_info().await?;
        info!(state = %info.state, "adopted firecracker");
        Ok(Arc::new(FirecrackerHandle::new(spec, pid, client, None)))
    }
}

/// A running Firecracker process.
#[derive(Debug)]
pub struct FirecrackerHandle {
    name: String,
    process: ProcessId,
    client: ApiClient,
    vsock: PathBuf,
    /// The guest's console (Firecracker's stdout) and its length at
    /// launch (`None`: adopted), for the exit reason.
    console: PathBuf,
    console_from: Option<u64>,
    /// The exit status once observed (only the first wait can reap it).
    exit: Mutex<Option<Exit>>,
    /// Spawn → API answering, for a launch.
    start_up: Option<Duration>,
}

impl FirecrackerHandle {
    fn new(
        spec: &MachineSpec,
        process: ProcessId,
        client: ApiClient,
        console_from: Option<u64>,
    ) -> Self {
        Self {
            name: spec.name.clone(),
            process,
            client,
            vsock: RunPaths::new(&spec.run_dir).vsock,
            console: spec.console_log.clone(),
            console_from,
            exit: Mutex::new(None),
            start_up: None,
        }
    }

    pub fn api(&self) -> &ApiClient {
        &self.client
    }

    fn recorded_exit(&self) -> Option<Exit> {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_exit(&self, exit: Exit) -> Exit {
        let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the first, most informative status (a reaped child's code).
        match *slot {
            Some(Exit::Unknown) | None => {
                *slot = Some(exit);
                exit
            }
            Some(first) => first,
        }
    }

    async fn wait(&self) -> Exit {
        if let Some(exit) = self.recorded_exit() {
            return exit;
        }
        let exit = process::wait_exit(self.process).await;
        self.record_exit(exit)
    }
}

#[async_trait::async_trait]
impl VmmHandle for FirecrackerHandle {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn process(&self) -> ProcessId {
        self.process
    }

    fn start_up(&self) -> Option<Duration> {
        self.start_up
    }

    async fn connect_agent(&self) -> Result<UnixStream, VmmError> {
        vsock::connect(
            &self.vsock,
            banger_protocol::agent::AGENT_VSOCK_PORT,
            AGENT_CONNECT_TIMEOUT,
        )
        .await
    }

    /// `GET /`; a process that has exited is reported as not running.
    async fn status(&self) -> Result<VmmStatus, VmmError> {
        if !self.process.is_alive() {
            return Ok(VmmStatus {
                running: false,
                detail: "exited".into(),
            });
        }
        let info = self.client.instance_info().await?;
        Ok(VmmStatus {
            running: info.is_running(),
            detail: info.state,
        })
    }

    async fn stop(&self, timeout: Duration) -> Result<StopOutcome, VmmError> {
        if !self.process.is_alive() {
            self.wait().await;
            return Ok(StopOutcome::AlreadyExited);
        }
        if let Err(e) = self.client.action(ActionType::SendCtrlAltDel).await {
            if !self.process.is_alive() {
                self.wait().await;
                return Ok(StopOutcome::AlreadyExited);
            }
            warn!(vm = %self.name, error = %e, "SendCtrlAltDel failed; killing firecracker");
            self.kill().await?;
            return Ok(StopOutcome::Killed);
        }
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(exit) => {
                info!(vm = %self.name, %exit, "firecracker stopped");
                Ok(StopOutcome::Clean)
            }
            Err(_) => {
                warn!(vm = %self.name, ?timeout, "guest did not power off; killing firecracker");
                self.kill().await?;
                Ok(StopOutcome::Killed)
            }
        }
    }

    async fn kill(&self) -> Result<(), VmmError> {
        let exit = process::kill_and_wait(self.process).await;
        self.record_exit(exit);
        if self.process.is_alive() {
            return Err(VmmError::Io {
                what: format!("killing firecracker (pid {})", self.process.pid),
                source: std::io::Error::other("still alive after SIGKILL"),
            });
        }
        Ok(())
    }

    async fn wait_exit(&self) -> Exit {
        self.wait().await
    }

    async fn wait_exit_reason(&self) -> VmmExit {
        let status = self.wait().await;
        let console = exit::console_since(&self.console, self.console_from);
        exit::classify_firecracker(status, exit::console_hint(&console))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::fake::{FakeApi, Reply};
    use super::*;
    use crate::{Accel, DiskSpec, NetSpec};
    use serde_json::json;

    fn spec(dir: &Path) -> MachineSpec {
        MachineSpec {
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: dir.join("vmlinux"),
            initrd: None,
            cmdline: "root=/dev/vda rw".into(),
            disks: vec![
                DiskSpec {
                    id: "root".into(),
                    path: dir.join("root.ext4"),
                    format: DiskFormat::Raw,
                    read_only: false,
                },
                DiskSpec {
                    id: "work".into(),
                    path: dir.join("work.ext4"),
                    format: DiskFormat::Raw,
                    read_only: true,
                },
            ],
            net: Some(NetSpec {
                tap: "bgtap0".into(),
                mac: "02:aa:bb:cc:dd:ee".into(),
            }),
            run_dir: dir.join("run"),
            console_log: dir.join("console.log"),
            accel: Accel::Kvm,
        }
    }

    fn write_elf(path: &Path) {
        let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
        bytes.resize(64, 0);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn boot_args_add_the_missing_defaults() {
        assert_eq!(
            firecracker_boot_args("root=/dev/vda rw"),
            "root=/dev/vda rw console=ttyS0 reboot=k panic=1 pci=off"
        );
        assert_eq!(
            firecracker_boot_args(""),
            "console=ttyS0 reboot=k panic=1 pci=off"
        );
        // Present keys are left as they are, not duplicated.
        assert_eq!(
            firecracker_boot_args("console=ttyS0,115200  panic=5 quiet"),
            "console=ttyS0,115200 panic=5 quiet reboot=k pci=off"
        );
        assert_eq!(
            firecracker_boot_args("console=ttyS0 reboot=k panic=1 pci=off"),
            "console=ttyS0 reboot=k panic=1 pci=off"
        );
        // `nopci=off` is not `pci=`.
        assert!(firecracker_boot_args("nopci=off").ends_with(" pci=off"));
    }

    #[test]
    fn elf_detection() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        write_elf(&elf);
        assert!(is_elf(&elf));
        let bz = dir.path().join("vmlinuz");
        std::fs::write(&bz, b"MZ\x00\x00 not an elf at all").unwrap();
        assert!(!is_elf(&bz));
        let short = dir.path().join("short");
        std::fs::write(&short, b"\x7fEL").unwrap();
        assert!(!is_elf(&short));
        assert!(!is_elf(&dir.path().join("missing")));
    }

    #[test]
    fn instance_ids_are_sanitised() {
        assert_eq!(instance_id("web-1"), "web-1");
        assert_eq!(instance_id("my vm_2.test"), "my-vm-2-test");
        assert_eq!(instance_id(""), "banger-vm");
        assert_eq!(instance_id(&"x".repeat(100)).len(), 64);
    }

    fn reason(err: VmmError) -> String {
        match err {
            VmmError::InvalidSpec {
                backend: VmmKind::Firecracker,
                reason,
            } => reason,
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        assert!(reason(validate(&s).unwrap_err()).contains("cannot be read"));

        std::fs::write(&s.kernel, b"\x1f\x8b compressed").unwrap();
        let r = reason(validate(&s).unwrap_err());
        assert!(r.contains("uncompressed ELF vmlinux"), "{r}");

        write_elf(&s.kernel);
        validate(&s).unwrap();

        s.disks[1].format = DiskFormat::Qcow2;
        assert!(reason(validate(&s).unwrap_err()).contains("qcow2"));
        s.disks[1].format = DiskFormat::Raw;

        s.disks[1].id = "work-disk".into();
        assert!(reason(validate(&s).unwrap_err()).contains("work-disk"));
        s.disks[1].id = "work_disk".into();
        validate(&s).unwrap();

        s.vcpus = 0;
        assert!(reason(validate(&s).unwrap_err()).contains("vCPUs"));
        s.vcpus = 33;
        assert!(reason(validate(&s).unwrap_err()).contains("vCPUs"));
        s.vcpus = 1;

        s.memory_mib = 0;
        assert!(reason(validate(&s).unwrap_err()).contains("0 MiB"));
        s.memory_mib = 128;

        // vsock.sock is the longer name: 107 bytes in total is the limit.
        let base = dir.path().as_os_str().len() + 1;
        let fill = MAX_SOCKET_PATH - base - 1 - VSOCK_SOCKET.len();
        s.run_dir = dir.path().join("r".repeat(fill));
        assert_eq!(RunPaths::new(&s.run_dir).vsock.as_os_str().len(), 107);
        validate(&s).unwrap();
        s.run_dir = dir.path().join("r".repeat(fill + 1));
        let r = reason(validate(&s).unwrap_err());
        assert!(r.contains("108 bytes"), "{r}");
    }

    #[test]
    fn run_dir_preparation_removes_stale_sockets_and_creates_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        std::fs::create_dir_all(&s.run_dir).unwrap();
        let paths = RunPaths::new(&s.run_dir);
        let _stale = std::os::unix::net::UnixListener::bind(&paths.api_socket).unwrap();
        std::fs::write(&paths.vsock, b"").unwrap();
        std::fs::write(&paths.log, b"old log").unwrap();
        let prepared = prepare_run_dir(&s).unwrap();
        assert_eq!(prepared, paths);
        assert!(!paths.api_socket.exists());
        assert!(!paths.vsock.exists());
        assert_eq!(std::fs::read(&paths.log).unwrap(), b"");

        // A run dir that does not exist yet is created.
        let mut s2 = s.clone();
        s2.run_dir = dir.path().join("new/run");
        prepare_run_dir(&s2).unwrap();
        assert!(s2.run_dir.join(LOG_FILE).is_file());
    }

    #[tokio::test]
    async fn configure_sends_the_sequence_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.initrd = Some(dir.path().join("initrd.img"));
        let fake = FakeApi::start(|_| Reply::no_content()).await;
        configure(&ApiClient::new(fake.socket()), &s).await.unwrap();

        let run = s.run_dir.to_str().unwrap();
        let d = dir.path().to_str().unwrap();
        let got: Vec<(String, String, serde_json::Value)> = fake
            .requests()
            .iter()
            .map(|r| (r.method.clone(), r.path.clone(), r.json()))
            .collect();
        let expected = vec![
            (
                "/logger",
                json!({
                    "log_path": format!("{run}/firecracker.log"),
                    "level": "Info",
                    "show_level": true,
                    "show_log_origin": false,
                }),
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false}),
            ),
            (
                "/boot-source",
                json!({
                    "kernel_image_path": format!("{d}/vmlinux"),
                    "boot_args": "root=/dev/vda rw console=ttyS0 reboot=k panic=1 pci=off",
                    "initrd_path": format!("{d}/initrd.img"),
                }),
            ),
            (
                "/drives/root",
                json!({
                    "drive_id": "root",
                    "path_on_host": format!("{d}/root.ext4"),
                    "is_root_device": true,
                    "is_read_only": false,
                }),
            ),
            (
                "/drives/work",
                json!({
                    "drive_id": "work",
                    "path_on_host": format!("{d}/work.ext4"),
                    "is_root_device": false,
                    "is_read_only": true,
                }),
            ),
            (
                "/network-interfaces/net0",
                json!({
                    "iface_id": "net0",
                    "host_dev_name": "bgtap0",
                    "guest_mac": "02:aa:bb:cc:dd:ee",
                }),
            ),
            (
                "/vsock",
                json!({"guest_cid": 3, "uds_path": format!("{run}/vsock.sock")}),
            ),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ];
        let expected: Vec<(String, String, serde_json::Value)> = expected
            .into_iter()
            .map(|(p, b)| ("PUT".to_string(), p.to_string(), b))
            .collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn configure_without_net_or_initrd_skips_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.net = None;
        s.disks.truncate(1);
        let fake = FakeApi::start(|_| Reply::no_content()).await;
        configure(&ApiClient::new(fake.socket()), &s).await.unwrap();
        let reqs = fake.requests();
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/logger",
                "/machine-config",
                "/boot-source",
                "/drives/root",
                "/vsock",
                "/actions"
            ]
        );
        assert!(reqs[2].json().get("initrd_path").is_none());
    }

    #[tokio::test]
    async fn configure_stops_at_the_first_fault() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let fake = FakeApi::start(|r| {
            if r.path == "/drives/root" {
                Reply::json(
                    400,
                    r#"{"fault_message":"Unable to create the block device: No such file or directory (os error 2)"}"#,
                )
            } else {
                Reply::no_content()
            }
        })
        .await;
        let err = configure(&ApiClient::new(fake.socket()), &s)
            .await
            .unwrap_err();
        match err {
            VmmError::Firecracker {
                method,
                path,
                status,
                fault_message,
            } => {
                assert_eq!(
                    (method.as_str(), path.as_str(), status),
                    ("PUT", "/drives/root", 400)
                );
                assert!(fault_message.starts_with("Unable to create the block device"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let last = fake.requests().last().unwrap().path.clone();
        assert_eq!(last, "/drives/root", "nothing is sent after the fault");
    }

    fn handle_for(fake: &FakeApi, s: &MachineSpec, id: ProcessId) -> FirecrackerHandle {
        FirecrackerHandle::new(s, id, ApiClient::new(fake.socket()), None)
    }

    fn sleeper(dir: &Path) -> ProcessId {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        process::spawn_detached(cmd, &dir.join("sleep.log")).unwrap()
    }

    #[tokio::test]
    async fn status_reads_the_instance_state() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let fake = FakeApi::start(|r| {
            assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/"));
            Reply::json(
                200,
                r#"{"id":"web-1","state":"Running","vmm_version":"1.7.0","app_name":"Firecracker"}"#,
            )
        })
        .await;
        let id = sleeper(dir.path());
        let h = handle_for(&fake, &s, id);
        assert_eq!(
            h.status().await.unwrap(),
            VmmStatus {
                running: true,
                detail: "Running".into()
            }
        );
        h.kill().await.unwrap();
        assert!(!id.is_alive());
        assert_eq!(h.wait_exit().await, Exit::Signal(libc::SIGKILL));
        // Repeated waits give the same status.
        assert_eq!(h.wait_exit().await, Exit::Signal(libc::SIGKILL));
        let st = h.status().await.unwrap();
        assert!(!st.running);
        assert_eq!(st.detail, "exited");
    }

    #[tokio::test]
    async fn stop_sends_ctrl_alt_del_then_kills_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let fake = FakeApi::start(|_| Reply::no_content()).await;
        let id = sleeper(dir.path());
        let h = handle_for(&fake, &s, id);
        let outcome = h.stop(Duration::from_millis(300)).await.unwrap();
        assert_eq!(outcome, StopOutcome::Killed);
        assert!(!id.is_alive());
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].path, "/actions");
        assert_eq!(reqs[0].json(), json!({"action_type": "SendCtrlAltDel"}));
        assert_eq!(
            h.stop(Duration::from_secs(1)).await.unwrap(),
            StopOutcome::AlreadyExited
        );
    }

    #[tokio::test]
    async fn stop_is_clean_when_the_vmm_exits_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let fake = FakeApi::start(|_| Reply::no_content()).await;
        // Exits by itself shortly after the request, as Firecracker does
        // when the guest reboots.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 0.3; exit 0"]);
        let id = process::spawn_detached(cmd, &dir.path().join("o.log")).unwrap();
        let h = handle_for(&fake, &s, id);
        assert_eq!(
            h.stop(Duration::from_secs(10)).await.unwrap(),
            StopOutcome::Clean
        );
        assert_eq!(h.wait_exit().await, Exit::Code(0));
        // A guest that stops resets, and Firecracker exits 0: a power-off.
        let exit = h.wait_exit_reason().await;
        assert_eq!(exit.reason, crate::ExitReason::PowerOff);
        assert_eq!(exit.status, Exit::Code(0));
    }

    #[tokio::test]
    async fn stop_kills_at_once_when_ctrl_alt_del_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let fake = FakeApi::start(|_| Reply::json(400, r#"{"fault_message":"not started"}"#)).await;
        let id = sleeper(dir.path());
        let h = handle_for(&fake, &s, id);
        let started = Instant::now();
        assert_eq!(
            h.stop(Duration::from_secs(60)).await.unwrap(),
            StopOutcome::Killed
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(!id.is_alive());
    }

    #[tokio::test]
    async fn adopt_checks_identity_then_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let backend = FirecrackerBackend::with_binary("/nonexistent/firecracker");
        // A live process whose command line does not name the run dir.
        let other = sleeper(dir.path());
        let err = backend.adopt(&s, other).await.unwrap_err();
        assert!(matches!(err, VmmError::NotAdoptable { pid } if pid == other.pid));
        process::kill_and_wait(other).await;

        // One that names the API socket but whose API is not up.
        std::fs::create_dir_all(&s.run_dir).unwrap();
        let api = RunPaths::new(&s.run_dir).api_socket;
        let mut cmd = Command::new("bash");
        // `exec -a` keeps one process whose argv[0] names the socket.
        cmd.args(["-c", "exec -a \"$0\" sleep 600"])
            .arg(format!("firecracker --api-sock {}", api.display()));
        let id = process::spawn_detached(cmd, &dir.path().join("o.log")).unwrap();
        // Until bash has exec'd, the command line is bash's own.
        process::wait_for_cmdline(id, &api.display().to_string()).await;
        let err = backend.adopt(&s, id).await.unwrap_err();
        assert!(matches!(err, VmmError::Control(_)), "{err:?}");

        // With the API answering it is adopted.
        let fake = FakeApi::start(|_| {
            Reply::json(
                200,
                r#"{"id":"web-1","state":"Running","vmm_version":"1.7.0","app_name":"Firecracker"}"#,
            )
        })
        .await;
        std::os::unix::fs::symlink(fake.socket(), &api).unwrap();
        let handle = backend.adopt(&s, id).await.unwrap();
        assert_eq!(handle.process(), id);
        assert_eq!(handle.kind(), VmmKind::Firecracker);
        assert!(handle.status().await.unwrap().running);
        handle.kill().await.unwrap();
        assert!(!id.is_alive());

        // A dead process is not adoptable.
        let err = backend.adopt(&s, id).await.unwrap_err();
        assert!(matches!(err, VmmError::NotAdoptable { .. }));
    }

    #[tokio::test]
    async fn connect_agent_uses_the_run_dirs_vsock_and_agent_port() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        std::fs::create_dir_all(&s.run_dir).unwrap();
        let listener = tokio::net::UnixListener::bind(RunPaths::new(&s.run_dir).vsock).unwrap();
        let server = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut line = [0u8; 13];
            c.read_exact(&mut line).await.unwrap();
            c.write_all(b"OK 52\n").await.unwrap();
            String::from_utf8(line.to_vec()).unwrap()
        });
        let fake = FakeApi::start(|_| Reply::no_content()).await;
        let id = sleeper(dir.path());
        let h = handle_for(&fake, &s, id);
        let _stream = h.connect_agent().await.unwrap();
        assert_eq!(
            server.await.unwrap(),
            format!("CONNECT {}\n", banger_protocol::agent::AGENT_VSOCK_PORT)
        );
        h.kill().await.unwrap();
    }

    #[tokio::test]
    async fn launch_rejects_bad_specs_before_starting_anything() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        std::fs::write(&s.kernel, b"MZ bzImage").unwrap();
        // A binary that would leave a trace if it were ever run.
        let marker = dir.path().join("ran");
        let fake_bin = dir.path().join("firecracker");
        std::fs::write(
            &fake_bin,
            format!("#!/bin/sh\ntouch {}\n", marker.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = FirecrackerBackend::with_binary(&fake_bin)
            .launch(&s)
            .await
            .unwrap_err();
        assert!(reason(err).contains("ELF"));
        assert!(!marker.exists());
        assert!(!s.run_dir.exists(), "nothing was prepared either");
    }
}
