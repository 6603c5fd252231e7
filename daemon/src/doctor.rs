//! Preflight checks behind `banger doctor`: can this host run banger's
//! guests, and if not, what should the user do about it.
//!
//! The daemon's request handler calls [`run_checks`] for `Request::Doctor`
//! and replies with the [`DoctorReport`]. The checks are independent, run
//! concurrently and each ends within its own deadline, so a report always
//! comes back (after about `kvm_probe_timeout` at worst).
//!
//! The `kvm` check does not trust `/dev/kvm` existing. It runs a tiny
//! real-mode guest with `kvm-ioctls` in a child process (`bangerd
//! __kvm-probe`, see [`kvm_probe_child_main`]) and kills the child if it
//! hangs, which is what happens under nested paravirtualised KVM
//! (`kvm_pvm`), where real mode does not work. The VM launcher can use the
//! same probe ([`probe_kvm`], [`KvmProbeOutcome::accelerated`]) to choose
//! between KVM and TCG.
//!
//! The child speaks a tiny line protocol: progress on stderr
//! (`kvm-probe: stage <name>`, so that a hang can be placed), and exactly
//! one result line on stdout: `ok <detail>` or `err <kind> <message>`.

use std::future::Future;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use banger_protocol::{CheckStatus, DoctorCheck, DoctorReport};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::Command;

/// The argument that makes `bangerd` run [`kvm_probe_child_main`].
pub const KVM_PROBE_ARG: &str = "__kvm-probe";

/// How long the KVM probe child may run before it is killed. A working KVM
/// answers in a few milliseconds.
pub const DEFAULT_KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Below this much free space the state dir is a WARN.
pub const STATE_DIR_WARN_BYTES: u64 = 5 * GIB;
/// Below this much free space the state dir is a FAIL.
pub const STATE_DIR_FAIL_BYTES: u64 = 512 * MIB;

/// Oldest e2fsprogs whose `mkfs.ext4` has `-d` (populate from a directory).
pub const MIN_E2FSPROGS: (u32, u32) = (1, 43);

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Deadline for one `<tool> --version`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(3);
/// Extra time a check gets beyond its slowest step before it is cut off.
const CHECK_SLACK: Duration = Duration::from_secs(2);
/// How long to wait for a killed probe child to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(1);
/// Cap on what is read from a child's stdout/stderr.
const MAX_CHILD_OUTPUT: u64 = 16 * 1024;

const KVM_DEV: &str = "/dev/kvm";
const TUN_DEV: &str = "/dev/net/tun";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const PROC_MODULES: &str = "/proc/modules";
const SYS_MODULE: &str = "/sys/module";
/// Tools such as `mkfs.ext4` and `nft` live in sbin, which is often not on
/// a user's PATH.
const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];
/// Kernel modules worth naming when KVM does not work.
const KVM_MODULES: &[&str] = &["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"];

/// Capability number of `CAP_NET_ADMIN` (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

const CHECK_KVM: &str = "kvm";
const CHECK_QEMU: &str = "qemu";
const CHECK_FIRECRACKER: &str = "firecracker";
const CHECK_MKFS: &str = "mkfs.ext4";
const CHECK_NFT: &str = "nft";
const CHECK_IP_FORWARD: &str = "ip_forward";
const CHECK_NET_ADMIN: &str = "net_admin";
const CHECK_STATE_DIR: &str = "state_dir";

/// What [`run_checks`] needs to know about the running daemon.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// The `bangerd` executable, run as `<bangerd_exe> __kvm-probe`.
    pub bangerd_exe: PathBuf,
    /// The daemon's state directory (images, VMs, logs).
    pub state_dir: PathBuf,
    /// Deadline for the KVM probe child; it is killed after it.
    pub kvm_probe_timeout: Duration,
}

impl DoctorOptions {
    /// Options with the default probe timeout.
    pub fn new(bangerd_exe: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            bangerd_exe,
            state_dir,
            kvm_probe_timeout: DEFAULT_KVM_PROBE_TIMEOUT,
        }
    }
}

/// Runs every check concurrently and returns them in a fixed order. Never
/// panics; every check has a deadline, so this returns within about
/// `kvm_probe_timeout` + 2 s.
#[tracing::instrument(skip_all, fields(state_dir = %opts.state_dir.display()))]
pub async fn run_checks(opts: &DoctorOptions) -> DoctorReport {
    let tool_deadline = TOOL_TIMEOUT + CHECK_SLACK;
    let kvm_deadline = opts.kvm_probe_timeout + KILL_WAIT + CHECK_SLACK;
    let state_dir = opts.state_dir.clone();
    let (kvm, qemu, firecracker, mkfs, nft, ip_forward, net_admin, state) = tokio::join!(
        bounded(CHECK_KVM, kvm_deadline, check_kvm(opts)),
        bounded(CHECK_QEMU, tool_deadline, check_qemu()),
        bounded(CHECK_FIRECRACKER, tool_deadline, check_firecracker()),
        bounded(CHECK_MKFS, tool_deadline, check_mkfs()),
        bounded(CHECK_NFT, tool_deadline, check_nft()),
        bounded(
            CHECK_IP_FORWARD,
            tool_deadline,
            blocking(CHECK_IP_FORWARD, check_ip_forward)
        ),
        bounded(
            CHECK_NET_ADMIN,
            tool_deadline,
            blocking(CHECK_NET_ADMIN, check_net_admin)
        ),
        bounded(
            CHECK_STATE_DIR,
            tool_deadline,
            blocking(CHECK_STATE_DIR, move || check_state_dir(&state_dir)),
        ),
    );
    let checks = vec![
        kvm,
        qemu,
        firecracker,
        mkfs,
        nft,
        ip_forward,
        net_admin,
        state,
    ];
    for c in &checks {
        tracing::debug!(check = %c.name, status = c.status.as_str(), detail = %c.detail, "doctor check");
    }
    DoctorReport { checks }
}

/// Runs `check`, or reports a WARN if it does not finish within `limit`.
async fn bounded(
    name: &'static str,
    limit: Duration,
    check: impl Future<Output = DoctorCheck>,
) -> DoctorCheck {
    match tokio::time::timeout(limit, check).await {
        Ok(c) => c,
        Err(_) => warn(
            name,
            format!("the check did not finish within {} s", limit.as_secs()),
            "run `banger doctor` again; if this persists, look for hung processes or \
             filesystems (`ps`, `dmesg`)",
        ),
    }
}

/// Runs a blocking check on the blocking pool; a panic becomes a FAIL.
async fn blocking(
    name: &'static str,
    check: impl FnOnce() -> DoctorCheck + Send + 'static,
) -> DoctorCheck {
    match tokio::task::spawn_blocking(check).await {
        Ok(c) => c,
        Err(e) => fail(
            name,
            format!("the check crashed: {e}"),
            "this is a banger bug; please report it",
        ),
    }
}

fn check(
    name: &str,
    status: CheckStatus,
    detail: impl Into<String>,
    fix: Option<String>,
) -> DoctorCheck {
    DoctorCheck {
        name: name.to_string(),
        status,
        detail: detail.into(),
        fix,
    }
}

fn pass(name: &str, detail: impl Into<String>) -> DoctorCheck {
    check(name, CheckStatus::Pass, detail, None)
}

fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> DoctorCheck {
    check(name, CheckStatus::Warn, detail, Some(fix.into()))
}

fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> DoctorCheck {
    check(name, CheckStatus::Fail, detail, Some(fix.into()))
}

// ---------------------------------------------------------------------------
// kvm
// ---------------------------------------------------------------------------

/// `KVM_GET_API_VERSION` of every kernel since 2.6.22.
const KVM_API_VERSION: i32 = 12;
/// Guest-physical address the probe's code is loaded at.
const PROBE_GUEST_ADDR: u64 = 0x1000;
/// Size of the probe's guest memory (one slot).
const PROBE_MEM_SIZE: usize = 0x4000;
/// The port the probe writes to (COM1).
const PROBE_PORT: u16 = 0x3f8;
/// Initial `al` and `bl`; the guest writes `al + bl + '0'`.
const PROBE_AL: u8 = 2;
const PROBE_BL: u8 = 3;
const PROBE_EXPECTED_BYTE: u8 = b'0' + PROBE_AL + PROBE_BL;
/// Iterations of the probe's busy loop (two instructions each): under a
/// millisecond when the CPU runs guest code, most of a second when KVM
/// emulates every instruction (as under nested PVM, measured at ~0.8 µs per
/// instruction).
const PROBE_LOOPS: u32 = 1 << 19;
/// A busy loop slower than this means guest code is emulated, not run: far
/// above native speed plus scheduling noise, well below emulated speed.
const PROBE_NATIVE_LIMIT: Duration = Duration::from_millis(200);
/// The two I/O writes the probe's guest makes, then it halts.
const PROBE_WRITES: u32 = 2;

/// 16-bit real-mode code: compute a byte, write it to COM1, spin
/// [`PROBE_LOOPS`] times, write it again, halt.
fn probe_code() -> Vec<u8> {
    let mut code = vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x00, 0xd8, //       add al, bl
        0x04, b'0', //       add al, '0'
        0xee, //             out dx, al
        0x66, 0xb9, //       mov ecx, imm32 (PROBE_LOOPS)
    ];
    code.extend_from_slice(&PROBE_LOOPS.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0x49, //       loop: dec ecx
        0x75, 0xfc, //       jnz loop
        0xee, //             out dx, al
        0xf4, //             hlt
    ]);
    code
}
/// KVM_RUN exits the probe tolerates before giving up on seeing `hlt`.
const PROBE_MAX_EXITS: usize = 64;

/// Why the in-process KVM probe failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmProbeError {
    #[error("{KVM_DEV} does not exist")]
    NoDevice,
    #[error("cannot open {KVM_DEV}")]
    Open(#[source] io::Error),
    #[error("KVM API version is {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// An ioctl or allocation that prepares the VM failed.
    #[error("{op} failed")]
    Setup {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("KVM_RUN failed")]
    Run(#[source] io::Error),
    #[error("the guest stopped with {exit} (expected {expected})")]
    UnexpectedExit {
        exit: String,
        expected: &'static str,
    },
    #[error("the guest wrote {data:02x?} to port {port:#x} (expected [{PROBE_EXPECTED_BYTE:02x}] to port {PROBE_PORT:#x})")]
    WrongOutput { port: u16, data: Vec<u8> },
    #[error("the guest did not halt within {0} exits")]
    NoHalt(usize),
    /// The guest ran, but so slowly that KVM must be emulating it.
    #[error("a {loops}-iteration loop took {} ms, so guest code is emulated instruction by instruction", elapsed.as_millis())]
    TooSlow { loops: u32, elapsed: Duration },
}

impl KvmProbeError {
    pub fn kind(&self) -> KvmProbeErrorKind {
        match self {
            KvmProbeError::NoDevice => KvmProbeErrorKind::NoDevice,
            KvmProbeError::Open(e) if e.kind() == io::ErrorKind::NotFound => {
                KvmProbeErrorKind::NoDevice
            }
            KvmProbeError::Open(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                KvmProbeErrorKind::Denied
            }
            KvmProbeError::Open(_) => KvmProbeErrorKind::Open,
            KvmProbeError::ApiVersion(_) => KvmProbeErrorKind::ApiVersion,
            KvmProbeError::Setup { .. } => KvmProbeErrorKind::Setup,
            KvmProbeError::Run(_)
            | KvmProbeError::UnexpectedExit { .. }
            | KvmProbeError::WrongOutput { .. }
            | KvmProbeError::NoHalt(_)
            | KvmProbeError::TooSlow { .. } => KvmProbeErrorKind::Guest,
        }
    }
}

/// The class of a [`KvmProbeError`], as it crosses the child's stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmProbeErrorKind {
    NoDevice,
    Denied,
    Open,
    ApiVersion,
    /// Creating the VM, its memory or its vCPU failed.
    Setup,
    /// The VM was built but did not run the guest code as a CPU would.
    Guest,
}

impl KvmProbeErrorKind {
    const ALL: [KvmProbeErrorKind; 6] = [
        KvmProbeErrorKind::NoDevice,
        KvmProbeErrorKind::Denied,
        KvmProbeErrorKind::Open,
        KvmProbeErrorKind::ApiVersion,
        KvmProbeErrorKind::Setup,
        KvmProbeErrorKind::Guest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KvmProbeErrorKind::NoDevice => "no-device",
            KvmProbeErrorKind::Denied => "denied",
            KvmProbeErrorKind::Open => "open",
            KvmProbeErrorKind::ApiVersion => "api-version",
            KvmProbeErrorKind::Setup => "setup",
            KvmProbeErrorKind::Guest => "guest",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// What came of running the probe child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbeOutcome {
    /// `/dev/kvm` does not exist; no child was run.
    NoDevice,
    /// The guest ran; the child's detail line.
    Ran(String),
    /// The child ran and reported a probe error.
    Failed {
        kind: KvmProbeErrorKind,
        message: String,
    },
    /// The child was killed after `after`; `stage` is the last step it
    /// announced (`run` means it hung inside KVM_RUN).
    TimedOut {
        stage: Option<String>,
        after: Duration,
    },
    /// The probe itself could not be run or answered nonsense.
    Broken(String),
}

impl KvmProbeOutcome {
    /// Whether guests can use KVM acceleration.
    pub fn accelerated(&self) -> bool {
        matches!(self, KvmProbeOutcome::Ran(_))
    }
}

/// A private anonymous mapping used as guest memory; unmapped on drop.
#[derive(Debug)]
struct GuestMemory {
    ptr: *mut u8,
    len: usize,
}

impl GuestMemory {
    fn new(len: usize) -> Result<Self, KvmProbeError> {
        // SAFETY: an anonymous mapping with no address hint touches no
        // existing memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KvmProbeError::Setup {
                op: "mmap of guest memory",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live, writable mapping of len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

fn setup_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmProbeError {
    move |e| KvmProbeError::Setup {
        op,
        source: e.into(),
    }
}

/// Announces a probe step on stderr, so that the parent can tell where a
/// hang happened.
fn stage_to_stderr(name: &str) {
    let _ = writeln!(io::stderr().lock(), "kvm-probe: stage {name}");
}

/// Runs the KVM probe in this process: opens `/dev/kvm`, checks the API
/// version, builds a VM with a little memory and one vCPU, runs 16-bit
/// real-mode code that writes a computed byte to port 0x3f8, spins, writes
/// it again and halts, and checks every exit.
///
/// Besides the exits, the time the guest's busy loop takes tells real
/// execution from instruction-by-instruction emulation (nested PVM runs the
/// code, at about 1/1000 of the speed). On a host whose KVM cannot run real
/// mode at all this could hang inside `KVM_RUN`: run it in a child process
/// with a deadline, as [`probe_kvm`] does.
#[allow(dead_code)] // API for in-process callers; the daemon itself uses the child (`probe_kvm`)
pub fn kvm_probe_in_process() -> Result<String, KvmProbeError> {
    kvm_probe_with_stages(&mut |_| {})
}

/// [`kvm_probe_in_process`], calling `stage` as each step starts.
fn kvm_probe_with_stages(stage: &mut dyn FnMut(&str)) -> Result<String, KvmProbeError> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    stage("open");
    if !Path::new(KVM_DEV).exists() {
        return Err(KvmProbeError::NoDevice);
    }
    let kvm = Kvm::new().map_err(|e| KvmProbeError::Open(e.into()))?;
    let api = kvm.get_api_version();
    if api != KVM_API_VERSION {
        return Err(KvmProbeError::ApiVersion(api));
    }

    stage("vm");
    // Declared before the VM so that it is unmapped only after the VM is gone.
    let mut mem = GuestMemory::new(PROBE_MEM_SIZE)?;
    let code = probe_code();
    mem.as_mut_slice()[..code.len()].copy_from_slice(&code);
    let vm = kvm.create_vm().map_err(setup_err("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: PROBE_GUEST_ADDR,
        memory_size: PROBE_MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region is a live mapping of PROBE_MEM_SIZE bytes that
    // outlives `vm` (it is dropped after it) and is not used for anything else.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(setup_err("KVM_SET_USER_MEMORY_REGION"))?;

    stage("vcpu");
    let mut vcpu = vm.create_vcpu(0).map_err(setup_err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(setup_err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(setup_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(setup_err("KVM_GET_REGS"))?;
    regs.rip = PROBE_GUEST_ADDR;
    regs.rax = u64::from(PROBE_AL);
    regs.rbx = u64::from(PROBE_BL);
    regs.rflags = 2; // bit 1 is reserved and must be set
    vcpu.set_regs(&regs).map_err(setup_err("KVM_SET_REGS"))?;

    stage("run");
    let mut writes = 0u32;
    let mut loop_started = Instant::now();
    let expected = |writes: u32| {
        if writes < PROBE_WRITES {
            "an I/O write to port 0x3f8"
        } else {
            "HLT"
        }
    };
    for _ in 0..PROBE_MAX_EXITS {
        let internal_error = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port != PROBE_PORT || data != [PROBE_EXPECTED_BYTE] || writes >= PROBE_WRITES {
                    return Err(KvmProbeError::WrongOutput {
                        port,
                        data: data.to_vec(),
                    });
                }
                writes += 1;
                if writes == 1 {
                    stage("loop");
                    loop_started = Instant::now();
                }
                continue;
            }
            Ok(VcpuExit::Hlt) if writes == PROBE_WRITES => {
                let elapsed = loop_started.elapsed();
                if elapsed > PROBE_NATIVE_LIMIT {
                    return Err(KvmProbeError::TooSlow {
                        loops: PROBE_LOOPS,
                        elapsed,
                    });
                }
                return Ok(format!(
                    "KVM runs guest code natively (API {api}; a {}-iteration loop took {:.1} ms)",
                    PROBE_LOOPS,
                    elapsed.as_secs_f64() * 1000.0
                ));
            }
            Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::InternalError) => true,
            Ok(other) => {
                return Err(KvmProbeError::UnexpectedExit {
                    exit: format!("{other:?}"),
                    expected: expected(writes),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(KvmProbeError::Run(e.into())),
        };
        if internal_error {
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
            // filled the `internal` member of the union.
            let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
            return Err(KvmProbeError::UnexpectedExit {
                exit: format!(
                    "KVM_EXIT_INTERNAL_ERROR ({})",
                    internal_suberror_name(suberror)
                ),
                expected: expected(writes),
            });
        }
    }
    Err(KvmProbeError::NoHalt(PROBE_MAX_EXITS))
}

fn internal_suberror_name(suberror: u32) -> String {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure".into(),
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "simultaneous exceptions".into(),
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed".into(),
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason".into(),
        other => format!("suberror {other}"),
    }
}

/// Entry point of `bangerd __kvm-probe`: runs [`kvm_probe_in_process`],
/// prints one result line on stdout, exits 0 on success and 1 on failure.
pub fn kvm_probe_child_main() -> ! {
    let (line, code) = match kvm_probe_with_stages(&mut stage_to_stderr) {
        Ok(detail) => (format!("ok {}", one_line(&detail)), 0),
        Err(e) => (
            format!("err {} {}", e.kind().as_str(), one_line(&error_chain(&e))),
            1,
        ),
    };
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    std::process::exit(code)
}

/// `error: cause: cause`, for the one line that leaves the child.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs `<bangerd_exe> __kvm-probe` with a deadline and interprets it; the
/// child is killed if it is still running at the deadline.
pub async fn probe_kvm(bangerd_exe: &Path, timeout: Duration) -> KvmProbeOutcome {
    if !Path::new(KVM_DEV).exists() {
        return KvmProbeOutcome::NoDevice;
    }
    let mut child = match Command::new(bangerd_exe)
        .arg(KVM_PROBE_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return KvmProbeOutcome::Broken(format!(
                "cannot run `{} {KVM_PROBE_ARG}`: {e}",
                bangerd_exe.display()
            ))
        }
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    // Filled as the child writes, so that what it said before a hang survives
    // the timeout dropping the readers.
    let mut out = Vec::new();
    let mut err = Vec::new();
    let finished = tokio::time::timeout(timeout, async {
        let (_, _, status) = tokio::join!(
            read_capped(stdout.as_mut(), &mut out),
            read_capped(stderr.as_mut(), &mut err),
            child.wait(),
        );
        status
    })
    .await;
    match finished {
        Ok(Ok(status)) => interpret_probe_exit(
            status,
            &String::from_utf8_lossy(&out),
            &String::from_utf8_lossy(&err),
        ),
        Ok(Err(e)) => KvmProbeOutcome::Broken(format!("waiting for the probe child failed: {e}")),
        Err(_) => {
            let _ = child.start_kill();
            if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                tracing::warn!(pid = ?child.id(), "KVM probe child did not die after SIGKILL");
            }
            let stage = last_stage(&String::from_utf8_lossy(&err));
            match stage {
                Some(stage) => KvmProbeOutcome::TimedOut {
                    stage: Some(stage),
                    after: timeout,
                },
                None => KvmProbeOutcome::Broken(format!(
                    "`{} {KVM_PROBE_ARG}` printed nothing within {} ms; is it a bangerd that \
                     knows {KVM_PROBE_ARG}?",
                    bangerd_exe.display(),
                    timeout.as_millis()
                )),
            }
        }
    }
}

/// Appends up to [`MAX_CHILD_OUTPUT`] bytes from `reader` to `buf`, as they come.
async fn read_capped(reader: Option<&mut (impl AsyncRead + Unpin)>, buf: &mut Vec<u8>) {
    let Some(reader) = reader else { return };
    let mut chunk = [0u8; 1024];
    while (buf.len() as u64) < MAX_CHILD_OUTPUT {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The last `kvm-probe: stage <name>` line in the child's stderr.
fn last_stage(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("kvm-probe: stage "))
        .map(|s| s.trim().to_string())
}

/// Interprets a probe child that exited by itself.
fn interpret_probe_exit(status: ExitStatus, stdout: &str, stderr: &str) -> KvmProbeOutcome {
    match parse_probe_line(stdout) {
        Some(outcome) => outcome,
        None => {
            let said = stderr
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty() && !l.starts_with("kvm-probe: stage "))
                .unwrap_or("");
            let last = last_stage(stderr)
                .map(|s| format!(" after stage {s}"))
                .unwrap_or_default();
            KvmProbeOutcome::Broken(
                format!("the probe child {status}{last} without a result {said}")
                    .trim_end()
                    .to_string(),
            )
        }
    }
}

/// Parses the child's stdout (`ok <detail>` / `err <kind> <message>`).
fn parse_probe_line(stdout: &str) -> Option<KvmProbeOutcome> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("ok") || l.starts_with("err "))?;
    if let Some(detail) = line.strip_prefix("ok") {
        return Some(KvmProbeOutcome::Ran(detail.trim().to_string()));
    }
    let rest = line.strip_prefix("err ")?;
    let (kind, message) = rest.split_once(' ').unwrap_or((rest, ""));
    let kind = KvmProbeErrorKind::parse(kind)?;
    Some(KvmProbeOutcome::Failed {
        kind,
        message: message.trim().to_string(),
    })
}

async fn check_kvm(opts: &DoctorOptions) -> DoctorCheck {
    let outcome = probe_kvm(&opts.bangerd_exe, opts.kvm_probe_timeout).await;
    let modules = if outcome.accelerated() {
        Vec::new()
    } else {
        loaded_kvm_modules()
    };
    tracing::info!(outcome = ?outcome, modules = ?modules, "KVM probe finished");
    kvm_check(&outcome, &modules)
}

/// KVM-related kernel modules that are loaded, from `/proc/modules` or,
/// where that does not exist, `/sys/module`.
fn loaded_kvm_modules() -> Vec<String> {
    let names: Vec<String> = match std::fs::read_to_string(PROC_MODULES) {
        Ok(text) => text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect(),
        Err(_) => std::fs::read_dir(SYS_MODULE)
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    };
    kvm_modules_among(&names)
}

fn kvm_modules_among(names: &[String]) -> Vec<String> {
    KVM_MODULES
        .iter()
        .filter(|m| names.iter().any(|n| n == *m))
        .map(|m| m.to_string())
        .collect()
}

const TCG_NOTE: &str = "guests will run under QEMU TCG (software emulation, much slower)";

/// Turns a probe outcome (and the loaded KVM modules) into the `kvm` check.
fn kvm_check(outcome: &KvmProbeOutcome, modules: &[String]) -> DoctorCheck {
    let module_note = if modules.iter().any(|m| m == "kvm_pvm") {
        format!(
            "; loaded modules: {} (kvm_pvm is paravirtualised nested KVM)",
            modules.join(", ")
        )
    } else if modules.is_empty() {
        String::new()
    } else {
        format!("; loaded modules: {}", modules.join(", "))
    };
    let no_real_mode_fix = "nothing is required: banger uses QEMU TCG. For acceleration, run \
        banger on bare metal or in a VM with hardware nested virtualisation (kvm_intel/kvm_amd), \
        not on paravirtualised nested KVM such as kvm_pvm";
    match outcome {
        KvmProbeOutcome::Ran(detail) => pass(
            CHECK_KVM,
            if detail.is_empty() {
                format!("KVM runs guest code (API {KVM_API_VERSION})")
            } else {
                detail.clone()
            },
        ),
        KvmProbeOutcome::NoDevice
        | KvmProbeOutcome::Failed {
            kind: KvmProbeErrorKind::NoDevice,
            ..
        } => warn(
            CHECK_KVM,
            format!("{KVM_DEV} does not exist: {TCG_NOTE}{module_note}"),
            "enable virtualisation (VT-x/AMD-V) in the firmware, load the module (`modprobe \
             kvm_intel` or `modprobe kvm_amd`), or run on a host with nested virtualisation",
        ),
        KvmProbeOutcome::Failed {
            kind: KvmProbeErrorKind::Denied,
            message,
        } => warn(
            CHECK_KVM,
            format!("{message}: {TCG_NOTE}"),
            "add the user running bangerd to the `kvm` group (`usermod -aG kvm <user>`, then log \
             in again) or run bangerd as root",
        ),
        KvmProbeOutcome::Failed {
            kind: KvmProbeErrorKind::Open,
            message,
        } => warn(
            CHECK_KVM,
            format!("{message}: {TCG_NOTE}{module_note}"),
            "check that a KVM module is loaded (`lsmod | grep kvm`) and look at `dmesg`",
        ),
        KvmProbeOutcome::Failed {
            kind: KvmProbeErrorKind::ApiVersion,
            message,
        } => warn(
            CHECK_KVM,
            format!("{message}: {TCG_NOTE}"),
            "use a mainline Linux kernel (any since 2.6.22 has API version 12)",
        ),
        KvmProbeOutcome::Failed {
            kind: KvmProbeErrorKind::Setup,
            message,
        } => warn(
            CHECK_KVM,
            format!("KVM is present but cannot build a VM ({message}): {TCG_NOTE}{module_note}"),
            no_real_mode_fix,
        ),
        KvmProbeOutcome::Failed {
            kind: KvmProbeErrorKind::Guest,
            message,
        } => warn(
            CHECK_KVM,
            format!(
                "KVM is present but cannot run a real-mode guest at hardware speed ({message}); \
                 nested or paravirtualised KVM such as kvm_pvm? QEMU will use TCG{module_note}"
            ),
            no_real_mode_fix,
        ),
        KvmProbeOutcome::TimedOut { stage, after } => {
            let what = match stage.as_deref() {
                Some("run") => format!(
                    "the guest hung in KVM_RUN and was killed after {} ms",
                    after.as_millis()
                ),
                Some("loop") => format!(
                    "its busy loop had not finished when it was killed after {} ms, so guest code \
                     is emulated",
                    after.as_millis()
                ),
                Some(s) => format!(
                    "the probe hung at stage `{s}` and was killed after {} ms",
                    after.as_millis()
                ),
                None => format!("the probe was killed after {} ms", after.as_millis()),
            };
            warn(
                CHECK_KVM,
                format!(
                    "KVM is present but cannot run a real-mode guest ({what}); nested or \
                     paravirtualised KVM such as kvm_pvm? QEMU will use TCG{module_note}"
                ),
                no_real_mode_fix,
            )
        }
        KvmProbeOutcome::Broken(why) => warn(
            CHECK_KVM,
            format!("could not run the KVM probe ({why}); QEMU will use TCG"),
            "make sure the bangerd executable is intact (reinstall banger); if this persists, \
             report it as a banger bug",
        ),
    }
}

// ---------------------------------------------------------------------------
// tools: qemu, firecracker, mkfs.ext4, nft
// ---------------------------------------------------------------------------

/// What was found about one external program.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ToolProbe {
    Missing,
    /// Found at `path`; `version` is the first line of its version output,
    /// or why that could not be had.
    Found {
        path: PathBuf,
        version: Result<String, String>,
    },
}

/// Looks `program` up on PATH, then in `extra_dirs`, and asks it its version.
async fn probe_tool(program: &str, extra_dirs: &[&str], version_args: &[&str]) -> ToolProbe {
    let dirs = search_dirs(std::env::var_os("PATH"), extra_dirs);
    let Some(path) = find_in_dirs(program, &dirs) else {
        return ToolProbe::Missing;
    };
    let version = tool_version(&path, version_args).await;
    ToolProbe::Found { path, version }
}

fn search_dirs(path_var: Option<std::ffi::OsString>, extra_dirs: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = path_var
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in extra_dirs {
        let d = PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// The first executable regular file named `program` in `dirs`.
fn find_in_dirs(program: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .filter(|d| d.is_absolute())
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Runs `<path> <args>` with a deadline; the first non-empty line of its
/// stdout, else of its stderr (mke2fs prints its version there).
async fn tool_version(path: &Path, args: &[&str]) -> Result<String, String> {
    let run = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(TOOL_TIMEOUT, run).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(format!("cannot run it: {e}")),
        Err(_) => {
            return Err(format!(
                "`{}` did not answer within {} s",
                args.join(" "),
                TOOL_TIMEOUT.as_secs()
            ))
        }
    };
    let first = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(String::from)
    };
    match (
        output.status.success(),
        first(&output.stdout).or_else(|| first(&output.stderr)),
    ) {
        (true, Some(line)) => Ok(line),
        (true, None) => Err("it printed no version".into()),
        (false, line) => Err(format!(
            "`{}` exited with {}{}",
            args.join(" "),
            output.status,
            line.map(|l| format!(": {l}")).unwrap_or_default()
        )),
    }
}

/// The version number in a `--version` line: the first word that starts
/// with a digit (after an optional `v`) and contains a dot.
pub fn parse_version(line: &str) -> Option<String> {
    line.split_whitespace()
        .map(|w| w.trim_matches(|c: char| matches!(c, ',' | ';' | '(' | ')' | ':')))
        .map(|w| w.strip_prefix('v').unwrap_or(w))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()) && w.contains('.'))
        .map(String::from)
}

/// Whether dotted `version` is at least `(major, minor)`.
fn version_at_least(version: &str, min: (u32, u32)) -> Option<bool> {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    Some((major, minor) >= min)
}

fn describe_version(line: &str) -> String {
    parse_version(line).unwrap_or_else(|| line.to_string())
}

async fn check_qemu() -> DoctorCheck {
    qemu_check(&probe_tool("qemu-system-x86_64", &[], &["--version"]).await)
}

fn qemu_check(probe: &ToolProbe) -> DoctorCheck {
    const FIX: &str = "apt-get install qemu-system-x86";
    match probe {
        ToolProbe::Missing => fail(
            CHECK_QEMU,
            "qemu-system-x86_64 is not on PATH; banger runs guests with it",
            FIX,
        ),
        ToolProbe::Found {
            path,
            version: Ok(line),
        } => pass(
            CHECK_QEMU,
            format!(
                "qemu-system-x86_64 {} at {}",
                describe_version(line),
                path.display()
            ),
        ),
        ToolProbe::Found {
            path,
            version: Err(why),
        } => fail(
            CHECK_QEMU,
            format!("{} is there but broken: {why}", path.display()),
            format!("reinstall it: {FIX} --reinstall"),
        ),
    }
}

async fn check_firecracker() -> DoctorCheck {
    firecracker_check(&probe_tool("firecracker", &[], &["--version"]).await)
}

fn firecracker_check(probe: &ToolProbe) -> DoctorCheck {
    const FIX: &str =
        "nothing is required; to use Firecracker, put a firecracker release binary on PATH";
    match probe {
        ToolProbe::Missing => warn(
            CHECK_FIRECRACKER,
            "firecracker is not on PATH (optional; QEMU is used instead)",
            FIX,
        ),
        ToolProbe::Found {
            path,
            version: Ok(line),
        } => pass(
            CHECK_FIRECRACKER,
            format!(
                "firecracker {} at {}",
                describe_version(line),
                path.display()
            ),
        ),
        ToolProbe::Found {
            path,
            version: Err(why),
        } => warn(
            CHECK_FIRECRACKER,
            format!(
                "{} does not run: {why} (optional; QEMU is used instead)",
                path.display()
            ),
            "replace it with a working firecracker release binary, or remove it",
        ),
    }
}

async fn check_mkfs() -> DoctorCheck {
    mkfs_check(&probe_tool("mkfs.ext4", SBIN_DIRS, &["-V"]).await)
}

fn mkfs_check(probe: &ToolProbe) -> DoctorCheck {
    const FIX: &str = "apt-get install e2fsprogs";
    let need = format!(
        "e2fsprogs >= {}.{} is needed for `mkfs.ext4 -d`",
        MIN_E2FSPROGS.0, MIN_E2FSPROGS.1
    );
    match probe {
        ToolProbe::Missing => fail(
            CHECK_MKFS,
            format!("mkfs.ext4 not found on PATH or in sbin; {need}"),
            FIX,
        ),
        ToolProbe::Found {
            path,
            version: Ok(line),
        } => {
            match parse_version(line)
                .as_deref()
                .map(|v| (v.to_string(), version_at_least(v, MIN_E2FSPROGS)))
            {
                Some((v, Some(true))) => pass(
                    CHECK_MKFS,
                    format!("mkfs.ext4 (e2fsprogs {v}) at {}", path.display()),
                ),
                Some((v, Some(false))) => fail(
                    CHECK_MKFS,
                    format!("mkfs.ext4 at {} is e2fsprogs {v}; {need}", path.display()),
                    format!("upgrade e2fsprogs: {FIX}"),
                ),
                _ => warn(
                    CHECK_MKFS,
                    format!(
                        "cannot tell the version of {} from `{line}`; {need}",
                        path.display()
                    ),
                    format!("make sure e2fsprogs is recent: {FIX}"),
                ),
            }
        }
        ToolProbe::Found {
            path,
            version: Err(why),
        } => warn(
            CHECK_MKFS,
            format!("{} is there but `-V` failed: {why}; {need}", path.display()),
            format!("reinstall it: {FIX} --reinstall"),
        ),
    }
}

async fn check_nft() -> DoctorCheck {
    nft_check(&probe_tool("nft", SBIN_DIRS, &["--version"]).await)
}

fn nft_check(probe: &ToolProbe) -> DoctorCheck {
    const FIX: &str = "apt-get install nftables";
    match probe {
        ToolProbe::Missing => fail(
            CHECK_NFT,
            "nft not found on PATH or in sbin; banger sets up guest NAT with it",
            FIX,
        ),
        ToolProbe::Found {
            path,
            version: Ok(line),
        } => pass(
            CHECK_NFT,
            format!("nft {} at {}", describe_version(line), path.display()),
        ),
        ToolProbe::Found {
            path,
            version: Err(why),
        } => warn(
            CHECK_NFT,
            format!("{} is there but `--version` failed: {why}", path.display()),
            format!("reinstall it: {FIX} --reinstall"),
        ),
    }
}

// ---------------------------------------------------------------------------
// ip_forward, net_admin, state_dir
// ---------------------------------------------------------------------------

fn check_ip_forward() -> DoctorCheck {
    ip_forward_check(std::fs::read_to_string(IP_FORWARD).map_err(|e| e.to_string()))
}

fn ip_forward_check(value: Result<String, String>) -> DoctorCheck {
    const FIX: &str =
        "sysctl -w net.ipv4.ip_forward=1 (banger also enables it when it sets up NAT)";
    match value.as_deref().map(str::trim) {
        Ok("1") => pass(CHECK_IP_FORWARD, "net.ipv4.ip_forward is 1"),
        Ok("0") => warn(
            CHECK_IP_FORWARD,
            "net.ipv4.ip_forward is 0; banger enables it when it sets up NAT for guests",
            FIX,
        ),
        Ok(other) => warn(
            CHECK_IP_FORWARD,
            format!("net.ipv4.ip_forward is `{other}`, expected 0 or 1"),
            FIX,
        ),
        Err(e) => warn(
            CHECK_IP_FORWARD,
            format!("cannot read {IP_FORWARD}: {e}"),
            FIX,
        ),
    }
}

fn check_net_admin() -> DoctorCheck {
    let caps = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| e.to_string())
        .and_then(|s| {
            parse_cap_eff(&s).ok_or_else(|| "no CapEff line in /proc/self/status".to_string())
        });
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEV)
        .map(drop);
    net_admin_check(caps, tun)
}

/// The effective capability set from the text of `/proc/<pid>/status`.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn has_cap(caps: u64, cap: u32) -> bool {
    cap < 64 && caps & (1u64 << cap) != 0
}

fn net_admin_check(caps: Result<u64, String>, tun: io::Result<()>) -> DoctorCheck {
    const CAP_FIX: &str = "run bangerd as root, or grant it the capability: \
        `sudo setcap cap_net_admin+ep $(which bangerd)`";
    let cap = caps.as_ref().map(|c| has_cap(*c, CAP_NET_ADMIN));
    match (cap, tun) {
        (Ok(true), Ok(())) => pass(
            CHECK_NET_ADMIN,
            format!("CAP_NET_ADMIN is effective and {TUN_DEV} opens read-write: bridges and TAPs can be made"),
        ),
        (Ok(false), _) => fail(
            CHECK_NET_ADMIN,
            "bangerd lacks CAP_NET_ADMIN, so it cannot create bridges, TAP devices or NAT rules",
            CAP_FIX,
        ),
        (Err(e), _) => fail(CHECK_NET_ADMIN, format!("cannot read this process's capabilities: {e}"), CAP_FIX),
        (Ok(true), Err(e)) if e.kind() == io::ErrorKind::NotFound => fail(
            CHECK_NET_ADMIN,
            format!("{TUN_DEV} does not exist, so TAP devices cannot be made"),
            "load the tun module: `modprobe tun` (and add `tun` to /etc/modules to keep it)",
        ),
        (Ok(true), Err(e)) => fail(
            CHECK_NET_ADMIN,
            format!("cannot open {TUN_DEV} read-write: {e}"),
            format!("run bangerd as root or make {TUN_DEV} accessible (`chmod 0666 {TUN_DEV}`); `modprobe tun` if it is missing"),
        ),
    }
}

fn check_state_dir(dir: &Path) -> DoctorCheck {
    state_dir_check(dir, prepare_state_dir(dir))
}

/// Creates `dir` if needed, proves it writable and returns its free bytes.
fn prepare_state_dir(dir: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    std::fs::write(&probe, b"banger doctor\n")
        .map_err(|e| format!("cannot write a file in it: {e}"))?;
    std::fs::remove_file(&probe).map_err(|e| format!("cannot remove {}: {e}", probe.display()))?;
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("statvfs failed: {e}"))?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let free = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    Ok(free)
}

fn free_space_status(free: u64) -> CheckStatus {
    if free < STATE_DIR_FAIL_BYTES {
        CheckStatus::Fail
    } else if free < STATE_DIR_WARN_BYTES {
        CheckStatus::Warn
    } else {
        CheckStatus::Pass
    }
}

fn state_dir_check(dir: &Path, prepared: Result<u64, String>) -> DoctorCheck {
    let free =
        match prepared {
            Ok(free) => free,
            Err(e) => return fail(
                CHECK_STATE_DIR,
                format!("{} is not usable: {e}", dir.display()),
                "make it writable by the user running bangerd, or point XDG_STATE_HOME elsewhere",
            ),
        };
    let detail = format!("{} is writable, {} free", dir.display(), human_bytes(free));
    match free_space_status(free) {
        CheckStatus::Pass => pass(CHECK_STATE_DIR, detail),
        CheckStatus::Warn => warn(
            CHECK_STATE_DIR,
            format!("{detail} (images and VM disks want at least {})", human_bytes(STATE_DIR_WARN_BYTES)),
            "free some space (`banger` images and VMs you no longer need) or move XDG_STATE_HOME to a bigger filesystem",
        ),
        CheckStatus::Fail => fail(
            CHECK_STATE_DIR,
            format!("{detail}: too little to create a VM (under {})", human_bytes(STATE_DIR_FAIL_BYTES)),
            "free space on that filesystem or move XDG_STATE_HOME to a bigger one",
        ),
    }
}

fn human_bytes(n: u64) -> String {
    if n >= GIB {
        format!("{:.1} GiB", n as f64 / GIB as f64)
    } else {
        format!("{} MiB", n / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn cap_eff_is_parsed_and_net_admin_bit_read() {
        let status = "Name:\tbangerd\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        let caps = parse_cap_eff(status).expect("CapEff present");
        assert_eq!(caps, 0x0000_01ff_feff_ffff);
        assert!(has_cap(caps, CAP_NET_ADMIN));
        // An unprivileged process: nothing effective.
        let caps = parse_cap_eff("CapEff:\t0000000000000000\n").expect("CapEff present");
        assert!(!has_cap(caps, CAP_NET_ADMIN));
        // Only bit 12 set.
        assert!(has_cap(0x1000, CAP_NET_ADMIN));
        assert!(!has_cap(0x0fff, CAP_NET_ADMIN));
        assert_eq!(parse_cap_eff("CapPrm:\t0000000000001000\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn version_lines_of_the_real_tools() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
                .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(
            parse_version("Firecracker v1.7.0").as_deref(),
            Some("1.7.0")
        );
        assert_eq!(
            parse_version("mke2fs 1.47.0 (5-Feb-2023)").as_deref(),
            Some("1.47.0")
        );
        assert_eq!(
            parse_version("nftables v1.0.6 (Lester Gooch #5)").as_deref(),
            Some("1.0.6")
        );
        assert_eq!(parse_version("no digits here"), None);
        assert_eq!(version_at_least("1.47.0", MIN_E2FSPROGS), Some(true));
        assert_eq!(version_at_least("1.43", MIN_E2FSPROGS), Some(true));
        assert_eq!(version_at_least("1.42.9", MIN_E2FSPROGS), Some(false));
        assert_eq!(version_at_least("2.0", MIN_E2FSPROGS), Some(true));
        assert_eq!(version_at_least("x.y", MIN_E2FSPROGS), None);
    }

    fn found(version: Result<&str, &str>) -> ToolProbe {
        ToolProbe::Found {
            path: PathBuf::from("/usr/bin/tool"),
            version: version.map(String::from).map_err(String::from),
        }
    }

    #[test]
    fn tool_decisions() {
        let q = qemu_check(&ToolProbe::Missing);
        assert_eq!(q.status, CheckStatus::Fail);
        assert_eq!(q.fix.as_deref(), Some("apt-get install qemu-system-x86"));
        let q = qemu_check(&found(Ok("QEMU emulator version 7.2.22 (Debian)")));
        assert_eq!(q.status, CheckStatus::Pass);
        assert!(q.detail.contains("7.2.22"), "{}", q.detail);
        assert_eq!(
            qemu_check(&found(Err("exited with 127"))).status,
            CheckStatus::Fail
        );

        let f = firecracker_check(&ToolProbe::Missing);
        assert_eq!(f.status, CheckStatus::Warn);
        assert!(f.detail.contains("optional"));
        assert_eq!(
            firecracker_check(&found(Ok("Firecracker v1.7.0"))).status,
            CheckStatus::Pass
        );

        let m = mkfs_check(&ToolProbe::Missing);
        assert_eq!(m.status, CheckStatus::Fail);
        assert_eq!(m.fix.as_deref(), Some("apt-get install e2fsprogs"));
        assert_eq!(
            mkfs_check(&found(Ok("mke2fs 1.47.0 (5-Feb-2023)"))).status,
            CheckStatus::Pass
        );
        assert_eq!(
            mkfs_check(&found(Ok("mke2fs 1.42.9 (28-Dec-2013)"))).status,
            CheckStatus::Fail
        );
        assert_eq!(
            mkfs_check(&found(Ok("mke2fs unknown"))).status,
            CheckStatus::Warn
        );

        let n = nft_check(&ToolProbe::Missing);
        assert_eq!(n.status, CheckStatus::Fail);
        assert_eq!(n.fix.as_deref(), Some("apt-get install nftables"));
        assert_eq!(
            nft_check(&found(Ok("nftables v1.0.6 (Lester Gooch #5)"))).status,
            CheckStatus::Pass
        );
    }

    #[test]
    fn programs_are_found_only_if_executable() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let plain = a.path().join("mkfs.ext4");
        std::fs::write(&plain, b"").expect("write");
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let exe = b.path().join("mkfs.ext4");
        std::fs::write(&exe, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let dirs = vec![
            PathBuf::from("relative"),
            a.path().to_path_buf(),
            b.path().to_path_buf(),
        ];
        assert_eq!(find_in_dirs("mkfs.ext4", &dirs), Some(exe));
        assert_eq!(find_in_dirs("nft", &dirs), None);
        let dirs = search_dirs(Some("/bin:/usr/sbin".into()), SBIN_DIRS);
        assert_eq!(
            dirs.iter()
                .filter(|d| d.as_path() == Path::new("/usr/sbin"))
                .count(),
            1
        );
        assert!(dirs.contains(&PathBuf::from("/sbin")));
    }

    #[tokio::test]
    async fn tool_version_reads_stderr_and_reports_failure() {
        // mke2fs prints its version on stderr.
        let v = tool_version(
            Path::new("/bin/sh"),
            &["-c", "echo 'mke2fs 1.47.0 (x)' >&2"],
        )
        .await;
        assert_eq!(v.as_deref(), Ok("mke2fs 1.47.0 (x)"));
        let v = tool_version(Path::new("/bin/sh"), &["-c", "echo broken; exit 3"]).await;
        assert!(v.as_ref().is_err_and(|e| e.contains("broken")), "{v:?}");
    }

    #[test]
    fn ip_forward_decisions() {
        assert_eq!(ip_forward_check(Ok("1\n".into())).status, CheckStatus::Pass);
        let w = ip_forward_check(Ok("0\n".into()));
        assert_eq!(w.status, CheckStatus::Warn);
        assert!(w
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("sysctl -w net.ipv4.ip_forward=1")));
        assert_eq!(
            ip_forward_check(Err("no such file".into())).status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn net_admin_decisions() {
        let all = 0x0000_01ff_feff_ffff;
        assert_eq!(net_admin_check(Ok(all), Ok(())).status, CheckStatus::Pass);
        let no_cap = net_admin_check(Ok(0), Ok(()));
        assert_eq!(no_cap.status, CheckStatus::Fail);
        assert!(no_cap
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("setcap cap_net_admin+ep")));
        let no_tun = net_admin_check(Ok(all), Err(io::ErrorKind::NotFound.into()));
        assert_eq!(no_tun.status, CheckStatus::Fail);
        assert!(no_tun
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("modprobe tun")));
        assert_eq!(
            net_admin_check(Ok(all), Err(io::ErrorKind::PermissionDenied.into())).status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn free_space_thresholds() {
        assert_eq!(free_space_status(0), CheckStatus::Fail);
        assert_eq!(
            free_space_status(STATE_DIR_FAIL_BYTES - 1),
            CheckStatus::Fail
        );
        assert_eq!(free_space_status(STATE_DIR_FAIL_BYTES), CheckStatus::Warn);
        assert_eq!(
            free_space_status(STATE_DIR_WARN_BYTES - 1),
            CheckStatus::Warn
        );
        assert_eq!(free_space_status(STATE_DIR_WARN_BYTES), CheckStatus::Pass);
        let c = state_dir_check(Path::new("/s"), Ok(100 * MIB));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("100 MiB"), "{}", c.detail);
        assert_eq!(
            state_dir_check(Path::new("/s"), Err("denied".into())).status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn state_dir_is_created_and_probed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b/banger");
        let free = prepare_state_dir(&dir).expect("usable");
        assert!(dir.is_dir());
        assert!(free > 0);
        assert_eq!(
            std::fs::read_dir(&dir).expect("read_dir").count(),
            0,
            "the probe file is removed"
        );
        // A path under a regular file cannot be created.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(prepare_state_dir(&file.join("sub")).is_err());
    }

    #[test]
    fn probe_lines_round_trip() {
        assert_eq!(
            parse_probe_line("ok KVM runs guest code (API 12)\n"),
            Some(KvmProbeOutcome::Ran("KVM runs guest code (API 12)".into()))
        );
        assert_eq!(
            parse_probe_line("err denied cannot open /dev/kvm: Permission denied (os error 13)\n"),
            Some(KvmProbeOutcome::Failed {
                kind: KvmProbeErrorKind::Denied,
                message: "cannot open /dev/kvm: Permission denied (os error 13)".into()
            })
        );
        assert_eq!(parse_probe_line("err bogus-kind x"), None);
        assert_eq!(parse_probe_line("daemon starting...\n"), None);
        for kind in KvmProbeErrorKind::ALL {
            assert_eq!(KvmProbeErrorKind::parse(kind.as_str()), Some(kind));
        }
        let denied = KvmProbeError::Open(io::ErrorKind::PermissionDenied.into());
        assert_eq!(denied.kind(), KvmProbeErrorKind::Denied);
        let line = format!(
            "err {} {}",
            denied.kind().as_str(),
            one_line(&error_chain(&denied))
        );
        assert!(matches!(
            parse_probe_line(&line),
            Some(KvmProbeOutcome::Failed {
                kind: KvmProbeErrorKind::Denied,
                ..
            })
        ));
    }

    #[test]
    fn probe_exit_and_stage_interpretation() {
        let stderr = "kvm-probe: stage open\nkvm-probe: stage vm\nkvm-probe: stage run\n";
        assert_eq!(last_stage(stderr).as_deref(), Some("run"));
        assert_eq!(last_stage("starting daemon\n"), None);
        let crashed = interpret_probe_exit(
            ExitStatus::from_raw(134 << 8),
            "",
            "kvm-probe: stage vcpu\nthread 'main' panicked at x\n",
        );
        match crashed {
            KvmProbeOutcome::Broken(why) => {
                assert!(why.contains("after stage vcpu"), "{why}");
                assert!(why.contains("panicked"), "{why}");
            }
            other => panic!("expected Broken, got {other:?}"),
        }
    }

    #[test]
    fn kvm_decisions() {
        let pvm = vec!["kvm".to_string(), "kvm_pvm".to_string()];
        let ok = kvm_check(
            &KvmProbeOutcome::Ran("KVM runs guest code (API 12)".into()),
            &[],
        );
        assert_eq!(ok.status, CheckStatus::Pass);
        assert_eq!(ok.fix, None);

        let missing = kvm_check(&KvmProbeOutcome::NoDevice, &[]);
        assert_eq!(missing.status, CheckStatus::Warn);
        assert!(missing.detail.contains("TCG"));
        assert!(missing
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("kvm_intel")));

        let hung = kvm_check(
            &KvmProbeOutcome::TimedOut {
                stage: Some("run".into()),
                after: Duration::from_secs(3),
            },
            &pvm,
        );
        assert_eq!(hung.status, CheckStatus::Warn);
        assert!(
            hung.detail.contains("cannot run a real-mode guest"),
            "{}",
            hung.detail
        );
        assert!(hung.detail.contains("KVM_RUN"), "{}", hung.detail);
        assert!(
            hung.detail.contains("loaded modules: kvm, kvm_pvm"),
            "{}",
            hung.detail
        );

        let internal = kvm_check(
            &KvmProbeOutcome::Failed {
                kind: KvmProbeErrorKind::Guest,
                message: "the guest stopped with KVM_EXIT_INTERNAL_ERROR (emulation failure)"
                    .into(),
            },
            &[],
        );
        assert_eq!(internal.status, CheckStatus::Warn);
        assert!(internal.detail.contains("QEMU will use TCG"));

        let denied = kvm_check(
            &KvmProbeOutcome::Failed {
                kind: KvmProbeErrorKind::Denied,
                message: "x".into(),
            },
            &[],
        );
        assert!(denied
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("kvm` group")));
        assert!(!KvmProbeOutcome::NoDevice.accelerated());
        assert!(KvmProbeOutcome::Ran(String::new()).accelerated());
    }

    #[test]
    fn probe_code_spins_probe_loops_times() {
        let code = probe_code();
        let mov_ecx = code
            .windows(2)
            .position(|w| w == [0x66, 0xb9])
            .expect("mov ecx, imm32");
        let imm: [u8; 4] = code[mov_ecx + 2..mov_ecx + 6].try_into().expect("4 bytes");
        assert_eq!(u32::from_le_bytes(imm), PROBE_LOOPS);
        // `jnz` jumps back exactly over `dec ecx` and itself.
        assert_eq!(&code[mov_ecx + 6..mov_ecx + 10], &[0x66, 0x49, 0x75, 0xfc]);
        assert_eq!(
            code.iter().filter(|b| **b == 0xee).count() as u32,
            PROBE_WRITES
        );
        assert_eq!(code.last(), Some(&0xf4), "ends with hlt");
        assert!(code.len() <= PROBE_MEM_SIZE);
    }

    #[test]
    fn emulated_guest_is_a_guest_problem() {
        let slow = KvmProbeError::TooSlow {
            loops: PROBE_LOOPS,
            elapsed: Duration::from_millis(900),
        };
        assert_eq!(slow.kind(), KvmProbeErrorKind::Guest);
        assert!(slow.to_string().contains("900 ms"), "{slow}");
        let killed = kvm_check(
            &KvmProbeOutcome::TimedOut {
                stage: Some("loop".into()),
                after: Duration::from_secs(3),
            },
            &[],
        );
        assert_eq!(killed.status, CheckStatus::Warn);
        assert!(killed.detail.contains("emulated"), "{}", killed.detail);
    }

    /// Runs the real probe on this host, in a thread so that a hang in
    /// KVM_RUN fails the test instead of blocking it forever.
    #[test]
    fn the_real_probe_finishes_and_explains_itself() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(kvm_probe_in_process());
        });
        let result = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the probe finished within 20 s");
        match result {
            Ok(detail) => assert!(detail.contains("natively"), "{detail}"),
            Err(e) => {
                let kind = e.kind();
                assert_eq!(
                    kind == KvmProbeErrorKind::NoDevice,
                    !Path::new(KVM_DEV).exists(),
                    "{e}"
                );
                assert!(!error_chain(&e).is_empty());
            }
        }
    }

    #[test]
    fn kvm_modules_are_picked_out() {
        let names: Vec<String> = ["8250", "kvm_pvm", "bridge", "kvm"]
            .map(String::from)
            .into();
        assert_eq!(
            kvm_modules_among(&names),
            vec!["kvm".to_string(), "kvm_pvm".to_string()]
        );
        assert!(kvm_modules_among(&["tun".to_string()]).is_empty());
    }

    #[tokio::test]
    async fn a_probe_child_that_never_answers_is_killed_in_time() {
        // `/bin/sleep __kvm-probe` fails at once; `sleep` via a script that
        // ignores its argument stands in for a hung child that prints nothing.
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = tmp.path().join("fake-bangerd");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'kvm-probe: stage run' >&2\nexec sleep 30\n",
        )
        .expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let started = std::time::Instant::now();
        let outcome = probe_kvm(&fake, Duration::from_millis(500)).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        if Path::new(KVM_DEV).exists() {
            assert_eq!(
                outcome,
                KvmProbeOutcome::TimedOut {
                    stage: Some("run".into()),
                    after: Duration::from_millis(500)
                }
            );
        } else {
            assert_eq!(outcome, KvmProbeOutcome::NoDevice);
        }
    }

    #[tokio::test]
    async fn a_probe_child_that_reports_is_believed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = tmp.path().join("fake-bangerd");
        std::fs::write(&fake, "#!/bin/sh\n[ \"$1\" = __kvm-probe ] || exit 9\necho 'err guest the guest stopped with Shutdown (expected HLT)'\nexit 1\n")
            .expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let outcome = probe_kvm(&fake, Duration::from_secs(5)).await;
        if Path::new(KVM_DEV).exists() {
            assert_eq!(
                outcome,
                KvmProbeOutcome::Failed {
                    kind: KvmProbeErrorKind::Guest,
                    message: "the guest stopped with Shutdown (expected HLT)".into()
                }
            );
        } else {
            assert_eq!(outcome, KvmProbeOutcome::NoDevice);
        }
    }
}
