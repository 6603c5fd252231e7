//! `vm run` to SSH-ready against a bare QEMU booting the same kernel and
//! rootfs.
//!
//! The image is the golden `debian-bookworm` (systemd, sshd, the agent as
//! a service). It is built with mmdebstrap from Debian's archive, which is
//! not reachable from a network namespace: the daemon builds it in the
//! host's namespace with networking off (the test default), is stopped,
//! and is started again on the same state inside a fresh namespace with
//! networking on (`TestDaemon::move_into_netns`).
//!
//! Then `--image-runs` pairs, alternating which side goes first:
//!
//! - banger: `VmCreate` of the image (what `banger vm run` sends before it
//!   starts `ssh`), with a fixed address, timed from just before the
//!   request is sent until the guest's sshd sent its banner on
//!   `<ip>:22` ([`super::probe`], from inside the namespace), and until the
//!   create's reply. The VM is deleted afterwards.
//! - bare: the command of [`super::bare`], built from the first VM's QEMU
//!   command line, with a fresh qcow2 overlay of the image's rootfs (made
//!   before the clock starts), a TAP from the daemon (`TapAcquire`, so it
//!   is on the daemon's bridge) and the same address (held with
//!   `LeaseReserve` meanwhile), timed from just before QEMU is spawned
//!   until the banner. QEMU is killed afterwards.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use banger_protocol::client::Client;
use banger_protocol::{ImageBuildRequest, Request, Response};
use banger_tests::vm::qemu_pids;
use banger_tests::{error_chain, TestDaemon};

use super::bare::Reference;
use super::creates::{self, ask, connect, delete, wait_pool};
use super::note;
use super::probe::Probe;
use super::stages::Create;
use crate::cpu;
use crate::table::fmt_duration;

/// The golden image (the catalog's default).
pub const IMAGE: &str = "debian-bookworm";
/// mmdebstrap, which the image build runs.
const MMDEBSTRAP: &str = "/usr/bin/mmdebstrap";
/// Longest the image build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest a boot to sshd may take (either side).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Owner of the TAP and the address the bare QEMU uses.
const BARE_OWNER: &str = "bench-bare";

/// Everything the SSH-ready comparison measured.
#[derive(Debug)]
pub struct SshRuns {
    /// banger: request sent → sshd banner read.
    pub banger_banner: Vec<Duration>,
    /// banger: the creates (reply time in `total`, stages).
    pub banger_creates: Vec<Create>,
    /// banger: CPU time of the VM's QEMU when the banner was read.
    pub banger_qemu_cpu: Vec<Duration>,
    /// banger: CPU time of bangerd (and the children it waited for) from
    /// the request to the banner.
    pub daemon_cpu: Vec<Duration>,
    /// bare QEMU: spawn → sshd banner read.
    pub bare_banner: Vec<Duration>,
    /// bare QEMU: its CPU time when the banner was read.
    pub bare_qemu_cpu: Vec<Duration>,
    /// What the bare command was built from.
    pub reference: Reference,
    /// The bare command (paths of one run).
    pub bare_command: String,
    pub build_time: Duration,
    pub ip: Ipv4Addr,
}

/// The `[vm]` config of the image daemon: the size the recipe in
/// ENVIRONMENT.md booted to sshd in 16 s under TCG.
fn config(accel: &str) -> String {
    format!(
        "[vm]\naccel = \"{accel}\"\ncpus = 2\nmemory_mib = 1024\nboot_timeout_secs = {}\n\
         stop_timeout_secs = 20\n",
        BOOT_TIMEOUT.as_secs()
    )
}

/// Builds the image, moves the daemon into a namespace and runs the pairs.
pub async fn measure(runs: u32, accel: &str) -> anyhow::Result<SshRuns> {
    if !Path::new(MMDEBSTRAP).is_file() {
        bail!(
            "{MMDEBSTRAP} not found (the golden image is built with it): \
             apt-get install -y mmdebstrap, or pass --skip-ssh"
        );
    }
    // A session of its own, as the CLI's auto-start and systemd run it.
    let builder = TestDaemon::builder().own_session().config(config(accel));
    let mut daemon = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.start()))
        .map_err(|_| anyhow!("bangerd did not start (see the message above)"))?;
    note(format!(
        "building the golden image {IMAGE} (mmdebstrap from Debian's archive, a few minutes)"
    ));
    let started = Instant::now();
    build(&daemon).await?;
    let build_time = started.elapsed();
    note(format!("built in {}", fmt_duration(build_time)));

    creates::stop(&mut daemon);
    let moved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        daemon.move_into_netns(&config(accel))
    }));
    if moved.is_err() {
        bail!("bangerd did not start again in a namespace (see the message above)");
    }
    pairs(&daemon, runs, build_time).await
}

/// `ImageBuild` of the golden image, with its stages on stderr.
async fn build(daemon: &TestDaemon) -> anyhow::Result<()> {
    let mut client = connect(&daemon.socket()).await?;
    let req = Request::ImageBuild(ImageBuildRequest {
        name: IMAGE.into(),
        suite: None,
        packages: vec![],
        size: None,
        mirror: None,
    });
    let mut stage = String::new();
    let mut last = String::new();
    let reply = tokio::time::timeout(
        BUILD_TIMEOUT,
        client.request_with_progress(req, |p| {
            if p.stage != stage {
                note(format!("  {}: {}", p.stage, p.detail));
                stage = p.stage.clone();
            }
            last = format!("{}: {}", p.stage, p.detail);
        }),
    )
    .await;
    match reply {
        Err(_) => bail!("ImageBuild did not finish within {BUILD_TIMEOUT:?} (last: {last})"),
        Ok(Err(e)) => bail!("ImageBuild failed: {} (last: {last})", error_chain(&e)),
        Ok(Ok(Response::Image(image))) if image.has_sshd => Ok(()),
        Ok(Ok(Response::Image(image))) => bail!("the built image has no sshd: {image:?}"),
        Ok(Ok(other)) => bail!("ImageBuild answered {other:?}"),
    }
}

async fn pairs(daemon: &TestDaemon, runs: u32, build_time: Duration) -> anyhow::Result<SshRuns> {
    let netns = daemon
        .netns()
        .ok_or_else(|| anyhow!("the daemon has no namespace"))?
        .path();
    let mut admin = connect(&daemon.socket()).await?;
    let status = match ask(&mut admin, Request::NetworkStatus, creates::ASK_TIMEOUT).await? {
        Response::Network(s) => s,
        other => bail!("NetworkStatus answered {other:?}"),
    };
    let ip = last_host(&status.bridge.subnet)?;
    let pool = status.pool.target;
    let rootfs = match ask(
        &mut admin,
        Request::ImageShow { name: IMAGE.into() },
        creates::ASK_TIMEOUT,
    )
    .await?
    {
        Response::Image(image) => PathBuf::from(image.rootfs_path),
        other => bail!("ImageShow answered {other:?}"),
    };
    wait_pool(&mut admin, pool).await?;

    let mut banger_banner = Vec::new();
    let mut banger_creates = Vec::new();
    let mut banger_qemu_cpu = Vec::new();
    let mut daemon_cpu = Vec::new();
    let mut bare_banner = Vec::new();
    let mut bare_qemu_cpu = Vec::new();
    let mut reference: Option<Reference> = None;
    let mut bare_command = String::new();
    for run in 1..=runs {
        // banger first in odd runs (the first needs no reference), the
        // bare QEMU first in even ones.
        for banger_turn in [run % 2 == 1, run % 2 == 0] {
            if banger_turn {
                let name = format!("bench-ssh-{run}");
                let (create, banner, r) = banger_run(daemon, &netns, &name, ip).await;
                delete(&mut admin, &name).await?;
                let (create, banner, r) = (create?, banner?, r?);
                note(format!(
                    "run {run}/{runs}, vm run: sshd banner after {} (QEMU CPU {}, bangerd CPU {}), \
                     reply after {}; {}",
                    fmt_duration(banner.wall),
                    fmt_duration(banner.qemu_cpu),
                    fmt_duration(banner.daemon_cpu),
                    fmt_duration(create.total),
                    creates::brief(&create)
                ));
                reference.get_or_insert(r);
                banger_banner.push(banner.wall);
                banger_qemu_cpu.push(banner.qemu_cpu);
                daemon_cpu.push(banner.daemon_cpu);
                banger_creates.push(create);
                wait_pool(&mut admin, pool).await?;
            } else {
                let r = reference
                    .as_ref()
                    .ok_or_else(|| anyhow!("no reference command line"))?;
                let (banner, command) =
                    bare_run(daemon, &netns, &mut admin, r, &rootfs, ip).await?;
                note(format!(
                    "run {run}/{runs}, bare QEMU: sshd banner after {} (QEMU CPU {})",
                    fmt_duration(banner.wall),
                    fmt_duration(banner.qemu_cpu)
                ));
                bare_command = command;
                bare_banner.push(banner.wall);
                bare_qemu_cpu.push(banner.qemu_cpu);
                wait_pool(&mut admin, pool).await?;
            }
        }
    }
    Ok(SshRuns {
        banger_banner,
        banger_creates,
        banger_qemu_cpu,
        daemon_cpu,
        bare_banner,
        bare_qemu_cpu,
        reference: reference.ok_or_else(|| anyhow!("no banger run"))?,
        bare_command,
        build_time,
        ip,
    })
}

/// The moment sshd's banner was read.
#[derive(Debug, Clone, Copy)]
struct Banner {
    /// Since the request was sent (banger) or QEMU was spawned (bare).
    wall: Duration,
    /// CPU time of the guest's QEMU so far.
    qemu_cpu: Duration,
    /// CPU time of bangerd since the request (banger only).
    daemon_cpu: Duration,
}

/// One `VmCreate` with the banner probe running alongside. Returns the
/// create, the banner and the VM's QEMU command line (each an error of
/// its own, so the caller deletes the VM in every case).
async fn banger_run(
    daemon: &TestDaemon,
    netns: &Path,
    name: &str,
    ip: Ipv4Addr,
) -> (
    anyhow::Result<Create>,
    anyhow::Result<Banner>,
    anyhow::Result<Reference>,
) {
    let none = || anyhow!("no create");
    let client = match connect(&daemon.socket()).await {
        Ok(c) => c,
        Err(e) => return (Err(e), Err(none()), Err(none())),
    };
    let daemon_pid = daemon.pid();
    let daemon_before = match cpu::of(daemon_pid) {
        Ok(c) => c,
        Err(e) => return (Err(e), Err(none()), Err(none())),
    };
    let addr = SocketAddr::from((ip, 22));
    let probe = Probe::start(
        Some(netns.to_path_buf()),
        addr,
        Instant::now() + BOOT_TIMEOUT,
    );
    let sent = Instant::now();
    let creating = creates::create(client, creates::request(name, IMAGE, Some(ip)));
    let probing = async {
        let at = probe.wait().await?;
        let Some(at) = at else {
            bail!("VM {name}'s sshd sent no banner on {addr} within {BOOT_TIMEOUT:?}");
        };
        // The only VM of this daemon: its QEMU is the one QEMU under the
        // daemon's directories.
        let qemu = match qemu_pids(daemon).as_slice() {
            [pid] => cpu::of(*pid)?.total(),
            pids => bail!("expected one QEMU for VM {name}, found {pids:?}"),
        };
        Ok(Banner {
            wall: at.saturating_duration_since(sent),
            qemu_cpu: qemu,
            daemon_cpu: cpu::of(daemon_pid)?.since(&daemon_before).total(),
        })
    };
    tokio::pin!(creating, probing);
    let mut created = None;
    let mut banner = None;
    while created.is_none() || banner.is_none() {
        tokio::select! {
            c = &mut creating, if created.is_none() => {
                match c {
                    Ok(c) => created = Some(c),
                    // The probe would wait for a guest that is gone.
                    Err(e) => return (Err(e), Err(none()), Err(none())),
                }
            }
            b = &mut probing, if banner.is_none() => banner = Some(b),
        }
    }
    let (Some((create, info)), Some(banner)) = (created, banner) else {
        return (Err(none()), Err(none()), Err(none()));
    };
    let reference = info
        .pid
        .ok_or_else(|| anyhow!("VM {name} has no VMM pid"))
        .and_then(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .with_context(|| format!("reading the command line of VM {name}'s QEMU ({pid})"))
        })
        .and_then(|cmdline| Reference::parse(&cmdline));
    (Ok(create), banner, reference)
}

/// A QEMU process killed (and reaped) when dropped.
#[derive(Debug)]
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One boot of the bare command to the sshd banner. Returns the time and
/// the command as run.
async fn bare_run(
    daemon: &TestDaemon,
    netns: &Path,
    admin: &mut Client,
    reference: &Reference,
    rootfs: &Path,
    ip: Ipv4Addr,
) -> anyhow::Result<(Banner, String)> {
    // The address stays ours while the bare guest uses it.
    let reserve = Request::LeaseReserve {
        owner: BARE_OWNER.into(),
        ip: Some(ip),
    };
    ask(admin, reserve, creates::ASK_TIMEOUT).await?;
    let tap = match ask(
        admin,
        Request::TapAcquire {
            owner: BARE_OWNER.into(),
        },
        creates::ASK_TIMEOUT,
    )
    .await
    {
        Ok(Response::Tap { tap, .. }) => Ok(tap),
        Ok(other) => Err(anyhow!("TapAcquire answered {other:?}")),
        Err(e) => Err(e),
    };
    let result = match &tap {
        Ok(tap) => boot_bare(daemon, netns, reference, rootfs, tap, ip).await,
        Err(_) => Err(anyhow!("no TAP")),
    };
    if let Ok(tap) = tap.as_ref() {
        let release = Request::TapRelease { tap: tap.clone() };
        ask(admin, release, creates::ASK_TIMEOUT).await?;
    }
    let release = Request::LeaseRelease {
        owner: BARE_OWNER.into(),
    };
    ask(admin, release, creates::ASK_TIMEOUT).await?;
    tap?;
    result
}

async fn boot_bare(
    daemon: &TestDaemon,
    netns: &Path,
    reference: &Reference,
    rootfs: &Path,
    tap: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<(Banner, String)> {
    // Under the daemon's temporary root: removed with it, and a QEMU that
    // survives this process is killed by the harness (its command line
    // mentions the root).
    let dir = tempfile::Builder::new()
        .prefix("bare-")
        .tempdir_in(daemon.root())
        .context("temporary directory for the bare QEMU")?;
    let overlay = dir.path().join("root.qcow2");
    let console = dir.path().join("console.log");
    let img = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(rootfs)
        .arg(&overlay)
        .output()
        .await
        .context("cannot run qemu-img (apt-get install -y qemu-utils)")?;
    if !img.status.success() {
        bail!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&img.stderr)
        );
    }
    let args = reference.bare_args(&overlay, tap, &console);
    let command = format!("{} {}", reference.qemu, shell_words(&args));
    let log = std::fs::File::create(dir.path().join("qemu.log")).context("QEMU's log file")?;
    let netns_name = netns
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad namespace path {}", netns.display()))?;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", netns_name])
        .arg(&reference.qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("QEMU's log file")?)
        .stderr(log);

    let addr = SocketAddr::from((ip, 22));
    let probe = Probe::start(
        Some(netns.to_path_buf()),
        addr,
        Instant::now() + BOOT_TIMEOUT,
    );
    let spawned = Instant::now();
    let mut vmm = Vmm(cmd
        .spawn()
        .with_context(|| format!("cannot start {command}"))?);
    let waiting = probe.wait();
    tokio::pin!(waiting);
    let banner = loop {
        tokio::select! {
            r = &mut waiting => break r?,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(status) = vmm.0.try_wait().context("waiting for QEMU")? {
                    bail!(
                        "the bare QEMU exited with {status} before sshd answered\n{command}\n\
                         QEMU: {}\nconsole (last lines):\n{}",
                        std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default(),
                        tail(&console, 20)
                    );
                }
            }
        }
    };
    let Some(at) = banner else {
        bail!(
            "the bare QEMU's sshd sent no banner on {addr} within {BOOT_TIMEOUT:?}\n{command}\n\
             console (last lines):\n{}",
            tail(&console, 20)
        );
    };
    let qemu_cpu = cpu::of(vmm.0.id())?.total();
    drop(vmm);
    let banner = Banner {
        wall: at.saturating_duration_since(spawned),
        qemu_cpu,
        daemon_cpu: Duration::ZERO,
    };
    Ok((banner, command))
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Arguments joined for display, quoted where a shell would need it.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=,.:/+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The highest host address of `subnet` (`a.b.c.d/len`): an address the
/// daemon's leases are least likely to have handed out.
pub fn last_host(subnet: &str) -> anyhow::Result<Ipv4Addr> {
    let (net, len) = subnet
        .split_once('/')
        .ok_or_else(|| anyhow!("subnet {subnet:?} has no prefix length"))?;
    let net: Ipv4Addr = net.parse().with_context(|| format!("subnet {subnet:?}"))?;
    let len: u32 = len.parse().with_context(|| format!("subnet {subnet:?}"))?;
    if !(8..=29).contains(&len) {
        bail!("subnet {subnet:?}: a /{len} is not supported here");
    }
    let mask = u32::MAX << (32 - len);
    let broadcast = (u32::from(net) & mask) | !mask;
    Ok(Ipv4Addr::from(broadcast - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_host_of_a_subnet() {
        let host = |s: &str| last_host(s).map(|a| a.to_string()).ok();
        assert_eq!(host("172.30.0.0/24").as_deref(), Some("172.30.0.254"));
        assert_eq!(host("10.1.0.0/16").as_deref(), Some("10.1.255.254"));
        // Host bits in the network address are ignored.
        assert_eq!(host("192.168.7.9/29").as_deref(), Some("192.168.7.14"));
        for bad in [
            "172.30.0.0",
            "172.30.0.0/31",
            "172.30.0.0/x",
            "nope/24",
            "1.2.3.0/4",
        ] {
            assert!(last_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_are_shown_as_a_shell_would_take_them() {
        let args: Vec<String> = ["-m", "1024M", "-append", "root=/dev/vda rw", "it's", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            shell_words(&args),
            r"-m 1024M -append 'root=/dev/vda rw' 'it'\''s' ''"
        );
    }

    #[test]
    fn the_image_daemon_config() {
        let text = config("kvm");
        assert!(
            text.contains("accel = \"kvm\"\ncpus = 2\nmemory_mib = 1024\n"),
            "{text}"
        );
        assert!(
            !text.contains("[network]"),
            "the namespace's defaults apply: {text}"
        );
    }
}
