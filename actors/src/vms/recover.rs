//! Recovery: making a VM's record agree with the host after a restart of
//! its supervisor or of the whole daemon, and removing what nobody owns.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use banger_protocol::{DnsRecord, ErrorData, ErrorKind, VmState};
use banger_vmm::{ProcessId, VmmHandle};
use tracing::{info, warn};

use super::agent::AgentConn;
use super::boot;
use super::record::{VmRecord, VmSettings};
use crate::ask::ask_patiently;
use crate::names;
use crate::network::dns::DnsMsg;
use crate::network::taps::TapsMsg;

/// Live processes whose command line mentions `needle` (a VM's run dir,
/// or the run dir of all VMs).
pub fn processes_mentioning(needle: &str) -> Vec<ProcessId> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
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
        if let Some(id) = ProcessId::of(pid) {
            if id.cmdline().is_some_and(|c| c.contains(needle)) {
                found.push(id);
            }
        }
    }
    found
}

/// How long recovery and cleanup wait out a restart of the TapPool or the
/// DNS actor: what they give back must not stay taken because that actor
/// was being restarted at that moment.
const PATIENCE: Duration = Duration::from_secs(15);
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// TAPs the pool has handed to `owner` (none when the pool does not answer).
pub(crate) async fn taps_owned_by(owner: &str) -> Vec<String> {
    match ask_patiently(names::TAPS, TapsMsg::Status, ASK_TIMEOUT, PATIENCE).await {
        Ok(status) => status
            .pool
            .in_use
            .into_iter()
            .filter(|l| l.owner == owner)
            .map(|l| l.tap)
            .collect(),
        Err(e) => {
            warn!(%owner, error = %e, "cannot see the TAPs handed out");
            Vec::new()
        }
    }
}

/// Gives `tap` back to the pool (already given back: fine).
pub(crate) async fn release_tap(vm: &str, tap: &str) {
    let r = ask_patiently(
        names::TAPS,
        |reply| TapsMsg::Release {
            tap: tap.to_string(),
            reply,
        },
        ASK_TIMEOUT,
        PATIENCE,
    )
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind == ErrorKind::NotFound => {}
        Ok(Err(e)) | Err(e) => warn!(%vm, %tap, error = %e, "releasing the TAP failed"),
    }
}

/// Publishes the `<vm>.vm` record for `ip`, waiting out a restart of the
/// DNS actor (idempotent: the record replaces any of the same name).
pub(crate) async fn publish_dns(vm: &str, ip: std::net::Ipv4Addr) -> Result<(), ErrorData> {
    let record = DnsRecord {
        name: vm.to_string(),
        ip,
        source: "vm".into(),
    };
    ask_patiently(
        names::DNS,
        |reply| DnsMsg::Set {
            record: record.clone(),
            reply,
        },
        ASK_TIMEOUT,
        PATIENCE,
    )
    .await?
}

/// Withdraws the `<vm>.vm` DNS record (none: fine).
pub(crate) async fn withdraw_dns(vm: &str) {
    let r = ask_patiently(
        names::DNS,
        |reply| DnsMsg::Remove {
            name: vm.to_string(),
            reply,
        },
        ASK_TIMEOUT,
        PATIENCE,
    )
    .await;
    if let Ok(Err(e)) | Err(e) = r {
        warn!(%vm, error = %e, "withdrawing the DNS record failed");
    }
}

/// Gives back the address lease of `vm` (none: fine).
pub(crate) async fn release_lease(vm: &str) {
    let r = ask_patiently(
        names::TAPS,
        |reply| TapsMsg::Unreserve {
            owner: format!("vm:{vm}"),
            reply,
        },
        ASK_TIMEOUT,
        PATIENCE,
    )
    .await;
    if let Ok(Err(e)) | Err(e) = r {
        warn!(%vm, error = %e, "releasing the address lease failed");
    }
}

/// Reconciles `rec` with the host. Returns the adopted VMM when the VM is
/// still running; otherwise every process, TAP and DNS record of the VM
/// is removed and the state says what happened.
///
/// A VM is adopted when its record says `running`, or says `starting` or
/// `created` (a boot whose end, or whose record updates, a restart cut
/// off) and its guest agent answers: then it is `running` again. The VMM
/// is the process the record names; when the record has none (its update
/// was lost) the one live process of the VM's run dir. An adopted VM's
/// DNS record is published again (idempotent; it may have been lost with
/// the DNS actor), and its TAP is the record's or the one the pool handed
/// to it.
pub async fn recover(rec: &mut VmRecord, settings: &VmSettings) -> Option<Arc<dyn VmmHandle>> {
    let run_dir = settings.vm_run_dir(&rec.id).display().to_string();
    // A walk of every process: off the runtime's workers.
    let procs = tokio::task::spawn_blocking(move || processes_mentioning(&run_dir))
        .await
        .unwrap_or_default();
    let mut adopted = None;
    let candidate = rec
        .process
        .filter(|p| procs.contains(p))
        .or_else(|| (procs.len() == 1).then(|| procs[0]));
    let adoptable = rec.state == VmState::Running
        || (matches!(rec.state, VmState::Starting | VmState::Created) && rec.has_agent);
    if let (true, Some(p)) = (adoptable, candidate) {
        let spec = boot::machine_spec(rec, settings, Vec::new());
        match boot::backend(rec.vmm, settings) {
            Ok(backend) => match backend.adopt(&spec, p).await {
                Ok(handle) if rec.state != VmState::Running => {
                    if agent_answers(&*handle).await {
                        info!(vm = %rec.name, pid = p.pid, "re-adopted a VMM whose boot was cut off: its guest agent is up");
                        rec.state = VmState::Running;
                        rec.ever_running = true;
                        rec.last_error = None;
                        rec.started_unix_ms.get_or_insert_with(crate::unix_ms);
                        adopted = Some(handle);
                    } else {
                        warn!(vm = %rec.name, pid = p.pid, "the VM was still booting when its supervisor stopped; killing its VMM");
                    }
                }
                Ok(handle) => {
                    info!(vm = %rec.name, pid = p.pid, "re-adopted the running VMM");
                    adopted = Some(handle);
                }
                Err(e) => warn!(vm = %rec.name, error = %e, "cannot adopt the VMM; killing it"),
            },
            Err(e) => warn!(vm = %rec.name, error = %e, "no backend to adopt the VMM"),
        }
    }
    for p in procs {
        if adopted
            .as_ref()
            .is_none_or(|h: &Arc<dyn VmmHandle>| h.process() != p)
        {
            warn!(vm = %rec.name, pid = p.pid, "killing a VMM process nobody owns");
            banger_vmm::process::kill_and_wait(p).await;
        }
    }
    if let Some(handle) = &adopted {
        rec.process = Some(handle.process());
        // The TAP the VMM uses is the record's; when the record lost it,
        // the one the pool handed to this VM. Any other TAP handed to it
        // is a leftover of an earlier boot.
        let mut taps = taps_owned_by(&format!("vm:{}", rec.name)).await;
        if rec.tap.is_none() && taps.len() == 1 {
            rec.tap = taps.pop();
        }
        for tap in taps {
            if rec.tap.as_ref() != Some(&tap) {
                warn!(vm = %rec.name, %tap, "releasing a TAP the running VM does not use");
                release_tap(&rec.name, &tap).await;
            }
        }
        if let Some(ip) = rec.ip {
            // DNS disabled or down: the VM is still usable by address.
            if let Err(e) = publish_dns(&rec.name, ip).await {
                warn!(vm = %rec.name, error = %e, "publishing the DNS record failed");
            }
        }
        return adopted;
    }
    // Nothing runs: give back what a running VM holds.
    let owner = format!("vm:{}", rec.name);
    let mut taps = taps_owned_by(&owner).await;
    if let Some(tap) = rec.tap.take() {
        if !taps.contains(&tap) {
            taps.push(tap);
        }
    }
    for tap in taps {
        release_tap(&rec.name, &tap).await;
    }
    withdraw_dns(&rec.name).await;
    let had_process = rec.process.take().is_some();
    rec.state = match rec.state {
        VmState::Running | VmState::Starting if rec.ever_running => {
            rec.last_error = Some(if had_process {
                "the VMM was gone when banger came back".to_string()
            } else {
                "banger stopped while the VM was starting".to_string()
            });
            VmState::Crashed
        }
        VmState::Starting => {
            rec.last_error = Some("the create was interrupted".to_string());
            VmState::Failed
        }
        VmState::Stopping => VmState::Stopped,
        other => other,
    };
    None
}

/// Whether the guest agent behind `handle` answers a hello (a few tries:
/// a hello sent before the guest opened its end of the port is lost).
async fn agent_answers(handle: &dyn VmmHandle) -> bool {
    let probe = async {
        let stream = handle.connect_agent().await.ok()?;
        let conn = AgentConn::start(stream);
        for _ in 0..3 {
            if conn.client.hello(Duration::from_secs(1)).await.is_ok() {
                return Some(());
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Removes a VM's disks, logs and run dir.
pub async fn remove_files(rec: &VmRecord, settings: &VmSettings) -> Result<(), ErrorData> {
    let dirs = [settings.vm_dir(&rec.id), settings.vm_run_dir(&rec.id)];
    // Freeing a disk's blocks takes a while: off the runtime's workers.
    tokio::task::spawn_blocking(move || dirs.iter().try_for_each(|d| remove_dir(d)))
        .await
        .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?
}

pub fn remove_dir(dir: &Path) -> Result<(), ErrorData> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ErrorData::from_error(ErrorKind::Internal, &e)
            .with_cause(format!("removing {}", dir.display()))),
    }
}
