//! Recovery: making a VM's record agree with the host after a restart of
//! its supervisor or of the whole daemon, and removing what nobody owns.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use banger_protocol::{ErrorData, ErrorKind, VmState};
use banger_vmm::{ProcessId, VmmHandle};
use tracing::{info, warn};

use super::boot;
use super::record::{VmRecord, VmSettings};
use crate::ask::ask;
use crate::names;
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

/// TAPs the pool has handed to `owner`.
async fn taps_owned_by(owner: &str) -> Vec<String> {
    match ask(names::TAPS, TapsMsg::Status, Duration::from_secs(10)).await {
        Ok(status) => status
            .pool
            .in_use
            .into_iter()
            .filter(|l| l.owner == owner)
            .map(|l| l.tap)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Reconciles `rec` with the host. Returns the adopted VMM when the VM is
/// still running; otherwise every process, TAP and DNS record of the VM
/// is removed and the state says what happened.
pub async fn recover(rec: &mut VmRecord, settings: &VmSettings) -> Option<Arc<dyn VmmHandle>> {
    let run_dir = settings.vm_run_dir(&rec.id);
    let procs = processes_mentioning(&run_dir.display().to_string());
    let mut adopted = None;
    if rec.state == VmState::Running {
        if let Some(p) = rec.process.filter(|p| procs.contains(p)) {
            let spec = boot::machine_spec(rec, settings, Vec::new());
            match boot::backend(rec.vmm, settings) {
                Ok(backend) => match backend.adopt(&spec, p).await {
                    Ok(handle) => {
                        info!(vm = %rec.name, pid = p.pid, "re-adopted the running VMM");
                        adopted = Some(handle);
                    }
                    Err(e) => warn!(vm = %rec.name, error = %e, "cannot adopt the VMM; killing it"),
                },
                Err(e) => warn!(vm = %rec.name, error = %e, "no backend to adopt the VMM"),
            }
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
    if adopted.is_some() {
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
        boot::undo_network(&rec.name, Some(tap), false).await;
    }
    boot::undo_network(&rec.name, None, true).await;
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

/// Removes a VM's disks, logs and run dir.
pub async fn remove_files(rec: &VmRecord, settings: &VmSettings) -> Result<(), ErrorData> {
    for dir in [settings.vm_dir(&rec.id), settings.vm_run_dir(&rec.id)] {
        remove_dir(&dir)?;
    }
    Ok(())
}

pub fn remove_dir(dir: &Path) -> Result<(), ErrorData> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ErrorData::from_error(ErrorKind::Internal, &e)
            .with_cause(format!("removing {}", dir.display()))),
    }
}
