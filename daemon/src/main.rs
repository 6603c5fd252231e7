//! `bangerd`: the banger daemon. A thin binary: it prepares the host side
//! (paths, config, logging, lock, socket), starts the actor tree from
//! `banger-actors` and drives graceful shutdown.

mod config;
mod doctor;
mod instance;
mod logging;
mod priority;
mod vm_setup;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use banger_actors::events::{self, Events, EventsArgs};
use banger_actors::images::{ImageRegistry, ImageSettings, ImagesArgs};
use banger_actors::kernels::{KernelRegistry, KernelsArgs};
use banger_actors::layout::Layout;
use banger_actors::names;
use banger_actors::network::dns::{Dns, DnsArgs, DnsSettings};
use banger_actors::network::taps::{NetworkSettings, TapPool, TapsArgs};
use banger_actors::router::{DaemonInfo, HostServices, Router, RouterArgs, RouterContext};
use banger_actors::store::{Store, StoreArgs};
use banger_actors::supervisor::{
    ChildSpec, RestartPolicy, Supervisor, SupervisorArgs, SupervisorMsg,
};
use banger_actors::vms::{ImageUse, VmImageUsers, VmManager, VmsArgs};
use banger_protocol::paths::Paths;
use banger_protocol::{ConfigDump, DoctorReport, EventKind, BANGER_VERSION};
use clap::Parser;
use ractor::Actor;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;

/// Exit code when the root supervisor escalated (restart intensity exceeded).
const EXIT_ESCALATED: u8 = 3;

/// bangerd: the banger daemon. Usually started by the `banger` CLI.
///
/// Paths follow XDG_CONFIG_HOME, XDG_STATE_HOME and XDG_RUNTIME_DIR.
#[derive(Debug, Parser)]
#[command(name = "bangerd", version)]
struct Cli {}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(doctor::KVM_PROBE_ARG) {
        doctor::kvm_probe_child_main();
    }
    let _cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking-pool threads (disk copies, store flushes) stay for a
        // while when idle: a burst of creates would otherwise start a
        // dozen threads again each time (tokio's default is 10 s).
        .thread_keep_alive(std::time::Duration::from_secs(300))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bangerd: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bangerd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[derive(Debug)]
struct DaemonHost {
    exe: PathBuf,
    state_dir: PathBuf,
    /// The KVM probe's verdict, worked out once.
    kvm: Arc<tokio::sync::OnceCell<(bool, String)>>,
}

impl HostServices for DaemonHost {
    fn doctor(&self) -> Pin<Box<dyn Future<Output = DoctorReport> + Send>> {
        let opts = doctor::DoctorOptions::new(self.exe.clone(), self.state_dir.clone());
        Box::pin(async move { doctor::run_checks(&opts).await })
    }

    fn kvm_usable(&self) -> Pin<Box<dyn Future<Output = (bool, String)> + Send>> {
        let (cell, exe) = (self.kvm.clone(), self.exe.clone());
        Box::pin(async move {
            cell.get_or_init(|| async move {
                let outcome = doctor::probe_kvm(&exe, doctor::DEFAULT_KVM_PROBE_TIMEOUT).await;
                let verdict = vm_setup::accel_verdict(&outcome);
                info!(kvm = verdict.0, reason = %verdict.1, "KVM probe for VMs");
                verdict
            })
            .await
            .clone()
        })
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    let started_at = Instant::now();
    // Before anything can connect: a signal that arrives right after the
    // socket answers must find the handlers in place, not kill us outright.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let paths = Paths::from_env()?;
    let config_path = paths.config_file();
    let (config, config_exists) = Config::load(&config_path)?;

    instance::private_dir(&paths.runtime_dir)?;
    std::fs::create_dir_all(&paths.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            paths.state_dir.display()
        )
    })?;
    let _log_guard = logging::init(&paths.log_file(), &config.log_level)?;
    let _lock = instance::lock(&paths.lock_file(), &paths.runtime_dir)?;
    let listener = instance::bind(&paths.socket(), &config.socket_group)?;
    info!(
        pid = std::process::id(),
        version = BANGER_VERSION,
        socket = %paths.socket().display(),
        state_dir = %paths.state_dir.display(),
        "bangerd starting"
    );
    match priority::apply(config.nice) {
        Ok(applied) => info!(
            nice = config.nice,
            threads = applied.threads,
            autogroup = applied.autogroup,
            "CPU priority set"
        ),
        Err(e) => warn!(
            nice = config.nice,
            error = %e,
            "cannot set the CPU priority (lowering nice needs root); running at {:?}",
            priority::current()
        ),
    }

    let agent_path = vm_setup::agent_path(&config.vm.agent_path);
    let vm_settings = vm_setup::settings(&config, &paths, agent_path.clone())?;
    let (image_use_tx, image_use_rx) = tokio::sync::watch::channel(ImageUse::new());
    let ctx = Arc::new(RouterContext {
        info: DaemonInfo {
            pid: std::process::id(),
            started_at,
            socket_path: paths.socket(),
            state_dir: paths.state_dir.clone(),
            log_path: paths.log_file(),
            config: ConfigDump {
                path: config_path.display().to_string(),
                file_exists: config_exists,
                toml: config.to_toml(),
            },
        },
        request_timeout: config.request_timeout(),
        shutdown_grace: Duration::from_secs(config.shutdown.grace_secs),
        shutdown: CancellationToken::new(),
        stop_requested: CancellationToken::new(),
        tracker: TaskTracker::new(),
        owner_uid: nix::unistd::geteuid().as_raw(),
        host: Arc::new(DaemonHost {
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("bangerd")),
            state_dir: paths.state_dir.clone(),
            kvm: Arc::new(tokio::sync::OnceCell::new()),
        }),
        open_connections: AtomicU64::new(0),
        total_connections: AtomicU64::new(0),
        images: ImageSettings {
            max_image_bytes: config.images.max_image_bytes,
            default_kernel: Some(config.images.default_kernel.clone()).filter(|k| !k.is_empty()),
            kernel_catalog: Some(PathBuf::from(&config.images.kernel_catalog))
                .filter(|p| !p.as_os_str().is_empty()),
            config_dir: paths.config_dir.clone(),
            agent_path: agent_path.clone(),
        },
        vms: vm_settings.clone(),
    });
    let layout = Layout::new(&paths.state_dir);
    let leftovers = layout.reconcile();
    if leftovers > 0 {
        warn!(
            removed = leftovers,
            "removed unfinished staging dirs of a previous run"
        );
    }

    let network = NetworkSettings {
        enabled: config.network.enabled,
        net: config.network.to_net().map_err(anyhow::Error::msg)?,
        pool_size: config.network.pool_size,
    };
    let dns = DnsSettings {
        enabled: config.dns.enabled,
        config: banger_dns::DnsConfig {
            listen: config.dns.listen.parse()?,
            ttl: config.dns.ttl,
            limits: banger_dns::Limits {
                client_rate: (config.dns.client_qps > 0).then(|| banger_dns::ClientRate {
                    queries_per_second: config.dns.client_qps,
                    burst: config.dns.client_qps.saturating_mul(2),
                }),
                ..banger_dns::Limits::default()
            },
            ..banger_dns::DnsConfig::default()
        },
    };
    let escalation = CancellationToken::new();
    let children = vec![
        ChildSpec::new(
            names::STORE,
            Store,
            StoreArgs {
                path: paths.db_dir(),
            },
        ),
        ChildSpec::new(
            names::EVENTS,
            Events,
            EventsArgs {
                store_timeout: config.request_timeout(),
            },
        ),
        ChildSpec::new(
            names::KERNELS,
            KernelRegistry,
            KernelsArgs {
                layout: layout.clone(),
                store_timeout: config.request_timeout(),
            },
        ),
        ChildSpec::new(
            names::IMAGES,
            ImageRegistry,
            ImagesArgs {
                layout,
                store_timeout: config.request_timeout(),
                users: Arc::new(VmImageUsers(image_use_rx)),
            },
        ),
        ChildSpec::new(
            names::TAPS,
            TapPool,
            TapsArgs {
                settings: network,
                store_timeout: config.request_timeout(),
            },
        ),
        ChildSpec::new(
            names::DNS,
            Dns,
            DnsArgs {
                settings: dns,
                store_timeout: config.request_timeout(),
            },
        ),
        ChildSpec::new(
            names::VMS,
            VmManager,
            VmsArgs {
                settings: vm_settings,
                store_timeout: config.request_timeout(),
                image_use: Arc::new(image_use_tx),
                daemon_started_unix_ms: banger_actors::unix_ms(),
            },
        ),
        ChildSpec::new(
            names::ROUTER,
            Router,
            RouterArgs {
                listener: Arc::new(listener),
                ctx: ctx.clone(),
            },
        ),
    ];
    let policy = RestartPolicy {
        max_restarts: config.supervisor.max_restarts,
        window: Duration::from_secs(config.supervisor.restart_window_secs),
        backoff_initial: Duration::from_millis(config.supervisor.backoff_initial_ms),
        backoff_max: Duration::from_millis(config.supervisor.backoff_max_ms),
    };
    let (supervisor, supervisor_handle) = Actor::spawn(
        Some(names::SUPERVISOR.to_string()),
        Supervisor,
        SupervisorArgs {
            children,
            policy,
            escalation: escalation.clone(),
        },
    )
    .await
    .context("starting the actor tree failed")?;
    events::publish(EventKind::DaemonStarted {
        pid: std::process::id(),
        version: BANGER_VERSION.into(),
    });
    info!(
        elapsed_ms = started_at.elapsed().as_millis() as u64,
        "bangerd ready"
    );

    let escalated = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM received; shutting down"); false }
        _ = sigint.recv() => { info!("SIGINT received; shutting down"); false }
        _ = ctx.stop_requested.cancelled() => { info!("shutting down on request"); false }
        _ = escalation.cancelled() => { error!("the supervisor escalated; shutting down"); true }
    };

    // 1. Stop accepting; in-flight requests get the grace period, then are
    //    cancelled, and every one is answered before its connection closes.
    events::publish(EventKind::DaemonStopping);
    ctx.shutdown.cancel();
    ctx.tracker.close();
    let wait = ctx.shutdown_grace + Duration::from_secs(5);
    if tokio::time::timeout(wait, ctx.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = ctx.tracker.len(),
            "connections still open after the grace period; closing them"
        );
    }
    // 2. Stop the actors, the store last (it flushes on stop).
    match ractor::call_t!(supervisor, SupervisorMsg::StopChildren, 30_000) {
        Ok(()) => {}
        Err(e) => warn!(error = %e, "stopping actors failed"),
    }
    supervisor.stop(None);
    let _ = tokio::time::timeout(Duration::from_secs(5), supervisor_handle).await;
    // 3. Remove the socket; the lock goes with the process.
    let _ = std::fs::remove_file(paths.socket());
    info!(
        uptime_ms = started_at.elapsed().as_millis() as u64,
        "bangerd stopped"
    );
    Ok(if escalated {
        ExitCode::from(EXIT_ESCALATED)
    } else {
        ExitCode::SUCCESS
    })
}
