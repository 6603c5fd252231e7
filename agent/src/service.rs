//! Service mode: the agent under systemd (`banger-agent.service`), or on a
//! host for tests. The init system owns the network and the running
//! hostname; in a guest (no transport flag, banger's keys on the kernel
//! command line) the agent first puts the VM's name and resolvers into
//! `/etc` ([`identity`]). It serves its transports until SIGTERM/SIGINT,
//! then kills the processes it started for the host.

use crate::cli::Cli;
use crate::cmdline::BootConfig;
use crate::context::{AgentContext, PowerMode};
use crate::exec::error_chain;
use crate::{identity, reaper, transport};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot watch signals")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
}

/// Runs until a stop signal; the exit code says whether startup worked.
pub fn run(cli: Cli) -> ExitCode {
    match serve(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: Cli) -> Result<(), ServiceError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServiceError::Runtime)?;
    rt.block_on(async {
        reaper::start().map_err(ServiceError::Signals)?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;
        let ctx = Arc::new(AgentContext {
            pid1: false,
            power: if cli.fake_poweroff {
                PowerMode::Fake
            } else {
                PowerMode::Service
            },
        });
        if !cli.explicit_transports() {
            guest_identity();
        }
        let transports = cli.transports(Path::new("/dev/vsock").exists());
        transport::start(ctx, &transports, !cli.explicit_transports())?;
        info!(
            version = crate::AGENT_VERSION,
            ?transports,
            "banger-agent ready"
        );
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        info!("stopping; killing the processes started for the host");
        reaper::signal_all_groups(libc::SIGKILL);
        Ok::<(), ServiceError>(())
    })?;
    // Serial threads may sit in a blocking read: do not wait for them.
    rt.shutdown_background();
    Ok(())
}

/// `banger-agent --mount-work-disk` (the unit's `ExecStartPre`): mounts
/// the work disk on `/root` before the agent, and with it `sysinit.target`
/// and every service, starts. It looks the disk up in sysfs, so it does
/// not wait for udev (slow on an emulated CPU).
pub fn mount_work_disk() -> ExitCode {
    match crate::init::mount_work_disk() {
        Ok(Some(dev)) => {
            info!(device = %dev, "work disk mounted on /root");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            error!("cannot mount the work disk on /root: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the VM's hostname and resolvers into `/etc` when banger booted
/// this guest (its keys are on the kernel command line; a host running
/// the agent for tests has none, and its files are never touched).
fn guest_identity() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = BootConfig::from_cmdline(&cmdline);
    if cfg.hostname.is_none() && cfg.dns.is_empty() {
        return;
    }
    for p in &cfg.problems {
        tracing::warn!("kernel command line: {p}");
    }
    identity::apply(&cfg, Path::new("/etc"), true);
}
