//! Booting a VM: the slow per-VM work of a start, run outside any actor's
//! mailbox. It makes the disks (first start only), takes a TAP, launches
//! the VMM, waits for the guest agent (and sshd), learns the guest's SSH
//! host key and publishes the DNS record. Every stage is reported with its
//! duration. Facts that must survive a crash (the TAP taken, the VMM's
//! pid) are sent to the VM's supervisor as soon as they exist; on failure
//! or cancellation everything made so far is undone here.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::agent::cmdline as keys;
use banger_protocol::{ErrorData, ErrorKind};
use banger_vmm::{
    DiskFormat, DiskSpec, MachineSpec, NetSpec, ProcessId, VmmBackend, VmmHandle, VmmKind,
};
use tokio_util::sync::CancellationToken;

use super::agent::AgentConn;
use super::disks;
use super::oplog::OpLog;
use super::record::{console_tail, VmRecord, VmSettings};
use crate::ask::ask_patiently;
use crate::names;
use crate::network::taps::TapsMsg;

/// Facts reported to the supervisor while the boot runs.
#[derive(Debug)]
pub enum BootFact {
    Tap(String),
    Launched(ProcessId),
}

/// A VM that is up.
#[derive(Debug)]
pub struct Booted {
    pub handle: Arc<dyn VmmHandle>,
    pub agent: Option<AgentConn>,
    pub tap: Option<String>,
}

/// Where a failed boot leaves its pieces, for the cleanup.
#[derive(Debug, Default)]
struct Made {
    tap: Option<String>,
    handle: Option<Arc<dyn VmmHandle>>,
    dns: bool,
}

pub fn backend(kind: VmmKind, settings: &VmSettings) -> Result<Arc<dyn VmmBackend>, ErrorData> {
    let find = |binary: &str| {
        banger_vmm::process::find_binary(binary).map_err(|e| vmm_error(&e, "preparing the VMM"))
    };
    Ok(match kind {
        VmmKind::Qemu => Arc::new(banger_vmm::qemu::QemuBackend::with_binary(find(
            &settings.qemu_binary,
        )?)),
        VmmKind::Firecracker => Arc::new(banger_vmm::firecracker::FirecrackerBackend::with_binary(
            find(&settings.firecracker_binary)?,
        )),
    })
}

pub fn vmm_error(err: &banger_vmm::VmmError, what: &str) -> ErrorData {
    let kind = match err {
        banger_vmm::VmmError::BinaryNotFound { .. } | banger_vmm::VmmError::InvalidSpec { .. } => {
            ErrorKind::InvalidRequest
        }
        banger_vmm::VmmError::SocketTimeout(_) => ErrorKind::Timeout,
        _ => ErrorKind::Internal,
    };
    let mut e = ErrorData::from_error(kind, err).with_cause(what.to_string());
    if let banger_vmm::VmmError::BinaryNotFound { binary } = err {
        e = e.with_hint(if binary.contains("qemu") {
            "install it: apt-get install qemu-system-x86 (or set [vm] qemu_binary)".to_string()
        } else {
            "install firecracker, or use --vmm qemu".to_string()
        });
    }
    e
}

/// The kernel command line for `rec`.
pub fn cmdline(rec: &VmRecord) -> String {
    let mut parts = vec![
        "root=/dev/vda".to_string(),
        "rw".to_string(),
        "net.ifnames=0".to_string(),
        "panic=5".to_string(),
        format!("{}={}", keys::HOSTNAME, rec.name),
        format!("{}={}", keys::MAC, rec.mac),
    ];
    if rec.systemd {
        parts.push(format!("systemd.hostname={}", rec.name));
    } else {
        parts.push(format!("init={}", super::AGENT_GUEST_PATH));
    }
    if let Some(ip) = rec.ip {
        parts.push(format!("{}={ip}/{}", keys::IP, rec.prefix_len));
        let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(rec.prefix_len)));
        let gw = rec.gateway.map(|g| g.to_string()).unwrap_or_default();
        if let Some(g) = rec.gateway {
            parts.push(format!("{}={g}", keys::GATEWAY));
        }
        // systemd-network-generator turns this into a networkd config.
        parts.push(format!("ip={ip}::{gw}:{mask}:{}:eth0:off", rec.name));
        if let Some(dns) = rec.dns {
            parts.push(format!("{}={dns}", keys::DNS));
            parts.push(format!("nameserver={dns}"));
        }
    }
    parts.join(" ")
}

/// The machine spec for `rec` (disks must exist; see [`prepare_disks`]).
pub fn machine_spec(rec: &VmRecord, settings: &VmSettings, disks: Vec<DiskSpec>) -> MachineSpec {
    MachineSpec {
        name: rec.name.clone(),
        vcpus: rec.cpus,
        memory_mib: rec.memory_mib,
        kernel: rec.kernel_path.clone(),
        initrd: rec.initrd_path.clone(),
        cmdline: cmdline(rec),
        disks,
        net: rec.tap.clone().map(|tap| NetSpec {
            tap,
            mac: rec.mac.clone(),
        }),
        run_dir: settings.vm_run_dir(&rec.id),
        console_log: settings.console_log(&rec.id),
        accel: rec.accel,
    }
}

/// The per-VM disks, made when missing: root (overlay or clone), work
/// (clone of the seed, grown), modules (shared per kernel).
pub async fn prepare_disks(
    rec: &VmRecord,
    settings: &VmSettings,
    log: &OpLog,
) -> Result<Vec<DiskSpec>, ErrorData> {
    let dir = settings.vm_dir(&rec.id);
    std::fs::create_dir_all(&dir).map_err(|e| {
        ErrorData::from_error(ErrorKind::Internal, &e)
            .with_cause(format!("creating {}", dir.display()))
    })?;
    // The disks do not depend on each other: made at the same time.
    let (root, work, modules) = tokio::try_join!(
        root_disk(rec, &dir, log),
        work_disk(rec, &dir, log),
        modules_disk(rec, log),
    )?;
    let specs = std::iter::once(root).chain(work).chain(modules).collect();
    Ok(specs)
}

/// The root disk: a qcow2 overlay of the image under QEMU, else a clone.
async fn root_disk(rec: &VmRecord, dir: &Path, log: &OpLog) -> Result<DiskSpec, ErrorData> {
    let qcow = dir.join("root.qcow2");
    let raw = dir.join("root.ext4");
    let t = Instant::now();
    if rec.vmm == VmmKind::Qemu && (qcow.exists() || (!raw.exists() && disks::have_qemu_img())) {
        if !qcow.exists() {
            // Every overlay of an image is the same small file (its
            // backing file is the image's rootfs): made once, then copied.
            match disks::templates_dir(&rec.rootfs, rec.work_seed.as_deref()) {
                Some(templates) => {
                    let rootfs = rec.rootfs.clone();
                    let template =
                        disks::template(&templates.join("root.qcow2"), |tmp| async move {
                            disks::qcow2_overlay(&rootfs, &tmp).await
                        })
                        .await?;
                    disks::clone(&template, &qcow).await?;
                }
                None => disks::qcow2_overlay(&rec.rootfs, &qcow).await?,
            }
            log.stage_done("disks", "root disk: copy-on-write overlay of the image", t);
        }
        return Ok(DiskSpec {
            id: "root".into(),
            path: qcow,
            format: DiskFormat::Qcow2,
            read_only: false,
        });
    }
    if !raw.exists() {
        let method = disks::clone(&rec.rootfs, &raw).await?;
        log.stage_done(
            "disks",
            format!("root disk: {} of the image", method.as_str()),
            t,
        );
    }
    Ok(DiskSpec {
        id: "root".into(),
        path: raw,
        format: DiskFormat::Raw,
        read_only: false,
    })
}

/// The work disk: a clone of the image's work seed grown to `--disk`.
async fn work_disk(rec: &VmRecord, dir: &Path, log: &OpLog) -> Result<Option<DiskSpec>, ErrorData> {
    let Some(seed) = &rec.work_seed else {
        return Ok(None);
    };
    let work = dir.join("work.ext4");
    if !work.exists() {
        let t = Instant::now();
        let tmp = dir.join("work.ext4.tmp");
        let _ = std::fs::remove_file(&tmp);
        // The seed grown to a size is the same for every VM of the image:
        // grown once (a template per size), then cloned.
        let method = match disks::templates_dir(&rec.rootfs, Some(seed)) {
            Some(templates) => {
                let (seed, bytes) = (seed.clone(), rec.disk_bytes);
                let name = format!("work-{bytes}.ext4");
                let template = disks::template(&templates.join(name), |tmp| async move {
                    disks::clone(&seed, &tmp).await?;
                    disks::grow_ext4(&tmp, bytes).await
                })
                .await?;
                disks::clone(&template, &tmp).await?
            }
            None => {
                let method = disks::clone(seed, &tmp).await?;
                disks::grow_ext4(&tmp, rec.disk_bytes).await?;
                method
            }
        };
        std::fs::rename(&tmp, &work).map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
        log.stage_done(
            "disks",
            format!(
                "work disk: {} of the seed, grown to {} MiB",
                method.as_str(),
                rec.disk_bytes >> 20
            ),
            t,
        );
    }
    Ok(Some(DiskSpec {
        id: "work".into(),
        path: work,
        format: DiskFormat::Raw,
        read_only: false,
    }))
}

/// The kernel's modules disk, built on its first use.
async fn modules_disk(rec: &VmRecord, log: &OpLog) -> Result<Option<DiskSpec>, ErrorData> {
    let Some(modules) = rec.modules_path.as_ref().filter(|m| m.is_dir()) else {
        return Ok(None);
    };
    let t = Instant::now();
    let existed = modules.with_extension("ext4").exists();
    let disk = disks::modules_disk(modules).await?;
    if !existed {
        log.stage_done("disks", "modules disk built for the kernel", t);
    }
    Ok(Some(DiskSpec {
        id: "modules".into(),
        path: disk,
        format: DiskFormat::Raw,
        read_only: true,
    }))
}

/// Boots `rec`. `report` receives facts to persist as they happen.
pub async fn boot(
    rec: VmRecord,
    settings: VmSettings,
    log: OpLog,
    cancel: CancellationToken,
    report: impl Fn(BootFact) + Send + Sync,
) -> Result<Booted, ErrorData> {
    let mut made = Made::default();
    let result = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(ErrorData::new(ErrorKind::Cancelled, "the start was cancelled")),
        r = boot_steps(rec.clone(), &settings, &log, &report, &mut made) => r,
    };
    match result {
        Ok(booted) => Ok(booted),
        Err(mut err) => {
            if let Some(handle) = made.handle.take() {
                let _ = handle.kill().await;
                let tail = console_tail(&settings.console_log(&rec.id), 25);
                if !tail.is_empty() && err.kind != ErrorKind::Cancelled {
                    err = err.with_cause(format!("last console lines:\n  {}", tail.join("\n  ")));
                }
            }
            undo_network(&rec.name, made.tap.take(), made.dns).await;
            Err(err)
        }
    }
}

/// Returns the TAP and withdraws the DNS record, waiting out a restart
/// of the TapPool or DNS actor (both are also reconciled at start-up).
pub async fn undo_network(name: &str, tap: Option<String>, dns: bool) {
    if let Some(tap) = tap {
        super::recover::release_tap(name, &tap).await;
    }
    if dns {
        super::recover::withdraw_dns(name).await;
    }
}

/// How long a boot waits out a restart of the TapPool before its TAP
/// step fails (the chaos tests kill it mid-create).
const PATIENCE: Duration = Duration::from_secs(15);

async fn boot_steps(
    mut rec: VmRecord,
    settings: &VmSettings,
    log: &OpLog,
    report: &(impl Fn(BootFact) + Send + Sync),
    made: &mut Made,
) -> Result<Booted, ErrorData> {
    let timeout = Duration::from_secs(30);
    // A create's reservation hands out a warm TAP with the lease; it is
    // this boot's to use (and to give back if the boot fails).
    if let Some(tap) = rec.tap.clone() {
        made.tap = Some(tap.clone());
        log.stage_done(
            "network",
            format!("TAP {tap} (from the warm pool, with the reservation)"),
            Instant::now(),
        );
    }
    // Otherwise one is taken now. The disks and the TAP do not depend on
    // each other: the TAP pool's durable write of the hand-out runs while
    // the disks are made.
    let network = async {
        if !(settings.network && rec.ip.is_some()) || rec.tap.is_some() {
            return Ok(None);
        }
        let t = Instant::now();
        let owner = format!("vm:{}", rec.name);
        // Patient: a TapPool that died after handing out a TAP but before
        // answering leaves that TAP recorded as this VM's, and it is
        // released with the VM (recovery and delete release every TAP the
        // VM owns).
        let acquired = ask_patiently(
            names::TAPS,
            |reply| TapsMsg::Acquire {
                owner: owner.clone(),
                reply,
            },
            timeout,
            PATIENCE,
        )
        .await??;
        Ok::<_, ErrorData>(Some((acquired, t)))
    };
    let (disks, network) = tokio::join!(prepare_disks(&rec, settings, log), network);
    // Recorded before any error is returned, so a failed disk gives the
    // TAP back.
    if let Some((acquired, t)) = network? {
        made.tap = Some(acquired.tap.clone());
        report(BootFact::Tap(acquired.tap.clone()));
        log.stage_done(
            "network",
            format!(
                "TAP {} ({})",
                acquired.tap,
                if acquired.from_pool {
                    "from the warm pool"
                } else {
                    "pool empty: created on demand"
                }
            ),
            t,
        );
        rec.tap = Some(acquired.tap);
    }
    let disks = disks?;

    let t = Instant::now();
    let spec = machine_spec(&rec, settings, disks);
    let run_dir = spec.run_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|e| {
        ErrorData::from_error(ErrorKind::Internal, &e)
            .with_cause(format!("creating {}", run_dir.display()))
    })?;
    let backend = backend(rec.vmm, settings)?;
    let handle = backend
        .launch(&spec)
        .await
        .map_err(|e| vmm_error(&e, "launching the VMM"))?;
    made.handle = Some(handle.clone());
    report(BootFact::Launched(handle.process()));
    let accel = if rec.vmm == VmmKind::Qemu {
        format!(", {}: {}", rec.accel.as_str(), rec.accel_reason)
    } else {
        String::new()
    };
    // The VMM's own start-up (spawn → control socket answering) is named
    // apart: it is the VMM's time, not banger's.
    let start_up = handle
        .start_up()
        .map(|d| format!("; VMM start-up {} ms", d.as_millis()))
        .unwrap_or_default();
    log.stage_done(
        "launch",
        format!(
            "{} started, pid {}{accel}{start_up}",
            rec.vmm,
            handle.process().pid
        ),
        t,
    );

    let deadline = Instant::now() + settings.boot_timeout;
    let mut agent = None;
    if rec.has_agent {
        let t = Instant::now();
        log.progress("boot", "waiting for the guest agent");
        let conn = wait_agent(&*handle, deadline, settings).await?;
        log.stage_done("boot", "guest agent is up", t);
        agent = Some(conn);
    }
    if rec.has_sshd {
        if let Some(ip) = rec.ip {
            let t = Instant::now();
            wait_ssh(&*handle, ip, agent.as_ref(), deadline, settings).await?;
            log.stage_done("ssh", "sshd is listening", t);
            if let Some(conn) = &agent {
                let t = Instant::now();
                match learn_host_keys(&rec, settings, conn).await {
                    Ok(n) => log.stage_done("ssh", format!("{n} host key(s) recorded"), t),
                    Err(e) => log.progress(
                        "ssh",
                        format!(
                            "host keys not recorded ({e}); ssh will accept the first key it sees"
                        ),
                    ),
                }
            }
        }
    }

    if let Some(ip) = rec.ip {
        let t = Instant::now();
        // Patient: a VM must not come up without its name because the DNS
        // actor was restarting at that moment.
        match super::recover::publish_dns(&rec.name, ip).await {
            Ok(()) => {
                made.dns = true;
                log.stage_done(
                    "dns",
                    format!(
                        "{}.{} -> {ip}",
                        rec.name,
                        settings.dns_zone.trim_end_matches('.')
                    ),
                    t,
                );
            }
            // DNS disabled or down: the VM is still usable by address.
            Err(e) => log.progress("dns", format!("no DNS record: {e}")),
        }
    }

    made.handle = None;
    made.dns = false;
    Ok(Booted {
        handle,
        agent,
        tap: made.tap.take(),
    })
}

fn exited_error(exit: banger_vmm::process::Exit) -> ErrorData {
    ErrorData::new(
        ErrorKind::Internal,
        format!("the VMM exited while the guest was booting ({exit})"),
    )
    .with_hint("see the console lines below and `banger vm logs`")
}

/// Connects to the agent and says hello until it answers, the deadline
/// passes, or the VMM dies.
async fn wait_agent(
    handle: &dyn VmmHandle,
    deadline: Instant,
    settings: &VmSettings,
) -> Result<AgentConn, ErrorData> {
    let wait = async {
        loop {
            if Instant::now() >= deadline {
                return Err(ErrorData::new(
                    ErrorKind::Timeout,
                    format!("the guest agent did not come up within {}s", settings.boot_timeout.as_secs()),
                )
                .with_hint("the guest may be stuck booting: see `banger vm logs`; raise [vm] boot_timeout_secs on slow (TCG) hosts"));
            }
            match handle.connect_agent().await {
                Ok(stream) => {
                    let conn = AgentConn::start(stream);
                    // Keep saying hello on this connection until the guest
                    // opens its end. Under QEMU what is sent before that
                    // waits in the socket and reaches the agent all at once,
                    // so the hellos are spaced out more and more (2, 4, 8,
                    // then every 16 s) rather than piling up every 2 s
                    // through a long boot; the answer to the last one
                    // comes right after the others'.
                    let mut every = Duration::from_secs(2);
                    while Instant::now() < deadline && !conn.is_closed() {
                        if conn.client.hello(every).await.is_ok() {
                            return Ok(conn);
                        }
                        every = (every * 2).min(Duration::from_secs(16));
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    tokio::select! {
        r = wait => r,
        exit = handle.wait_exit() => Err(exited_error(exit)),
    }
}

/// Waits until the guest's sshd listens on port 22, the deadline passes,
/// or the VMM dies.
///
/// With an agent it asks for the guest's listening sockets (`Ports`: the
/// agent reads `/proc/net/tcp{,6}` and the sockets' owners, tens of ms of
/// guest CPU under TCG, no process started), not for `Health`, which runs
/// `systemctl is-system-running` (a fork, an exec and a call into PID 1:
/// about 300 ms of guest CPU each under TCG, while the guest still boots
/// towards sshd). Nor does it connect to `<ip>:22`: sshd would fork and
/// re-exec a child for that connection just when the user's ssh arrives.
/// Without an agent, connecting is the only way.
async fn wait_ssh(
    handle: &dyn VmmHandle,
    ip: Ipv4Addr,
    agent: Option<&AgentConn>,
    deadline: Instant,
    settings: &VmSettings,
) -> Result<(), ErrorData> {
    let wait = async {
        loop {
            let listening = match agent {
                Some(conn) => conn
                    .client
                    .ports(Duration::from_secs(5))
                    .await
                    .is_ok_and(|ports| {
                        ports
                            .iter()
                            .any(|p| p.port == 22 && p.proto.starts_with("tcp"))
                    }),
                None => tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(SocketAddr::from((ip, 22))),
                )
                .await
                .is_ok_and(|r| r.is_ok()),
            };
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ErrorData::new(
                    ErrorKind::Timeout,
                    format!(
                        "sshd did not start within {}s",
                        settings.boot_timeout.as_secs()
                    ),
                )
                .with_hint("see `banger vm logs`; `banger vm exec` works without sshd"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::select! {
        r = wait => r,
        exit = handle.wait_exit() => Err(exited_error(exit)),
    }
}

/// Reads the guest's SSH host keys through the agent and writes them to
/// the VM's known-hosts file, so `ssh` never has to ask.
async fn learn_host_keys(
    rec: &VmRecord,
    settings: &VmSettings,
    conn: &AgentConn,
) -> Result<usize, ErrorData> {
    let (status, out, _) = conn
        .client
        .run(
            &["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"],
            Duration::from_secs(10),
        )
        .await?;
    if status.shell_code() != 0 && out.is_empty() {
        return Err(ErrorData::new(
            ErrorKind::Internal,
            "no host keys in /etc/ssh",
        ));
    }
    let mut hosts = vec![
        rec.name.clone(),
        format!("{}.{}", rec.name, settings.dns_zone.trim_end_matches('.')),
    ];
    if let Some(ip) = rec.ip {
        hosts.push(ip.to_string());
    }
    let names = hosts.join(",");
    let mut text = String::new();
    let mut n = 0;
    for line in String::from_utf8_lossy(&out).lines() {
        let mut fields = line.split_whitespace();
        if let (Some(kind), Some(key)) = (fields.next(), fields.next()) {
            text.push_str(&format!("{names} {kind} {key}\n"));
            n += 1;
        }
    }
    let path: PathBuf = settings.known_hosts(&rec.id);
    std::fs::write(&path, text).map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_for_agent_init_and_systemd() {
        let mut rec = super::super::tests::sample_record();
        rec.systemd = false;
        let c = cmdline(&rec);
        assert!(c.contains("init=/usr/local/bin/banger-agent"), "{c}");
        assert!(c.contains("banger.ip=172.30.0.5/24"), "{c}");
        assert!(
            c.contains("ip=172.30.0.5::172.30.0.1:255.255.255.0:web:eth0:off"),
            "{c}"
        );
        assert!(c.contains("banger.mac=02:aa:bb:cc:dd:ee"), "{c}");
        rec.systemd = true;
        rec.ip = None;
        let c = cmdline(&rec);
        assert!(!c.contains("init="), "{c}");
        assert!(c.contains("systemd.hostname=web"), "{c}");
        assert!(!c.contains("ip="), "{c}");
    }
}
