//! Request handling for VMs. Short queries go to the VmManager or the
//! VM's supervisor; a create runs as a daemon-owned job (it survives the
//! client going away; an explicit cancel undoes it) that the request
//! follows; exec, logs, ports and health talk to the guest agent or the
//! console log directly from the request task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_protocol::agent::{AgentToHost, ExecRequest};
use banger_protocol::{
    ErrorData, ErrorKind, ImageBuildRequest, ImageInfo, ImagePullRequest, KernelInfo, OutputStream,
    Request, Response, ServerMessage, VmCreateRequest, VmExecRequest, VmInfo, VmState,
};
use banger_vmm::{Accel, VmmKind};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::dispatch::{ClientInput, RequestCtx};
use super::RouterContext;
use crate::ask::{ask, ask_ref};
use crate::images::{self, catalog::ImageCatalog, ImagesMsg};
use crate::kernels::catalog::ensure_kernel;
use crate::layout::{new_id, Layout};
use crate::names;
use crate::records::validate_name;
use crate::vms::oplog::{follow, Follower, OpLog};
use crate::vms::record::{mac_for, VmRecord};
use crate::vms::supervisor::VmMsg;
use crate::vms::VmsMsg;

/// How long a VM's supervisor gets to answer a short question.
const ASK: Duration = Duration::from_secs(30);

pub async fn handle(request: Request, rctx: &RequestCtx) -> Result<Response, ErrorData> {
    match request {
        Request::VmCreate(req) => create(req, rctx).await.map(Response::Vm),
        Request::VmWatch { name } => watch(&name, rctx).await.map(Response::Vm),
        Request::VmStart { name } => {
            let vm = supervisor(&name).await?;
            run_op(&vm, "start", rctx, |log, reply| VmMsg::Start { log, reply })
                .await
                .map(Response::Vm)
        }
        Request::VmStop { name, force } => {
            let vm = supervisor(&name).await?;
            run_op(&vm, "stop", rctx, |log, reply| VmMsg::Stop {
                force,
                log,
                reply,
            })
            .await
            .map(Response::Vm)
        }
        Request::VmRestart { name } => {
            let vm = supervisor(&name).await?;
            let info = ask_ref("vm", &vm, VmMsg::Info, ASK).await?;
            if matches!(info.state, VmState::Running | VmState::Starting) {
                run_op(&vm, "stop", rctx, |log, reply| VmMsg::Stop {
                    force: false,
                    log,
                    reply,
                })
                .await?;
            }
            run_op(&vm, "start", rctx, |log, reply| VmMsg::Start { log, reply })
                .await
                .map(Response::Vm)
        }
        Request::VmDelete { name, force } => delete(&name, force, rctx)
            .await
            .map(|()| Response::Deleted { name }),
        Request::VmList => ask(names::VMS, VmsMsg::List, ASK).await.map(Response::Vms),
        Request::VmShow { name } => {
            let vm = supervisor(&name).await?;
            ask_ref("vm", &vm, VmMsg::Info, ASK).await.map(Response::Vm)
        }
        Request::VmLogs {
            name,
            lines,
            follow,
        } => logs(&name, lines, follow, rctx).await,
        Request::VmExec(req) => exec(req, rctx).await.map(Response::Exited),
        Request::VmPorts { name } => agent(&name).await?.ports(ASK).await.map(Response::Ports),
        Request::VmHealth { name } => agent(&name).await?.health(ASK).await.map(Response::Health),
        other => Err(ErrorData::new(
            ErrorKind::Internal,
            format!("{} is not a VM request", other.name()),
        )),
    }
}

async fn supervisor(name: &str) -> Result<ractor::ActorRef<VmMsg>, ErrorData> {
    let name = name.to_string();
    ask(names::VMS, |reply| VmsMsg::Get { name, reply }, ASK).await?
}

async fn agent(name: &str) -> Result<crate::vms::agent::AgentClient, ErrorData> {
    let vm = supervisor(name).await?;
    ask_ref("vm", &vm, VmMsg::Agent, ASK).await?
}

/// Streams a progress event to the client.
fn forward(rctx: &RequestCtx) -> impl FnMut(banger_protocol::Progress) + '_ {
    move |progress| {
        let _ = rctx.out.try_send(ServerMessage::Progress {
            id: rctx.id,
            progress,
        });
    }
}

/// Follows `log` for the client. An explicit cancel runs `on_cancel` and
/// still waits for the operation's end; a client that went away stops
/// following and leaves the operation running in the daemon.
async fn follow_for_client(
    log: &OpLog,
    rctx: &RequestCtx,
    on_cancel: impl FnOnce(),
) -> Result<VmInfo, ErrorData> {
    follow_op(log, rctx, Some(on_cancel)).await
}

/// Follows `log` for a watcher: an explicit cancel (Ctrl-C in `vm watch`)
/// only stops the watching; the operation goes on.
async fn watch_for_client(log: &OpLog, rctx: &RequestCtx) -> Result<VmInfo, ErrorData> {
    follow_op(log, rctx, None::<fn()>).await
}

async fn follow_op(
    log: &OpLog,
    rctx: &RequestCtx,
    mut on_cancel: Option<impl FnOnce()>,
) -> Result<VmInfo, ErrorData> {
    let mut fwd = forward(rctx);
    let mut follower = Follower::new(log);
    let mut cancelled = false;
    loop {
        if let Some(result) = follower.drain(&mut fwd) {
            return result;
        }
        tokio::select! {
            changed = follower.changed() => changed?,
            _ = rctx.connection.cancelled() => return Err(rctx.cancelled_error()),
            _ = rctx.cancel.cancelled(), if !cancelled => {
                cancelled = true;
                match on_cancel.take() {
                    Some(f) => f(),
                    None => return Err(rctx.cancelled_error()),
                }
            }
        }
    }
}

async fn run_op(
    vm: &ractor::ActorRef<VmMsg>,
    op: &str,
    rctx: &RequestCtx,
    build: impl FnOnce(OpLog, ractor::RpcReplyPort<Result<(), ErrorData>>) -> VmMsg,
) -> Result<VmInfo, ErrorData> {
    let log = OpLog::new(op);
    let l = log.clone();
    ask_ref("vm", vm, |reply| build(l, reply), ASK).await??;
    let vm2 = vm.clone();
    follow_for_client(&log, rctx, move || {
        let _ = vm2.cast(VmMsg::CancelStart);
    })
    .await
}

async fn watch(name: &str, rctx: &RequestCtx) -> Result<VmInfo, ErrorData> {
    let n = name.to_string();
    // Ctrl-C in `vm watch` stops watching, not the create or operation
    // (`vm delete` ends a create).
    if let Some((log, _cancel)) =
        ask(names::VMS, |reply| VmsMsg::Pending { name: n, reply }, ASK).await?
    {
        return watch_for_client(&log, rctx).await;
    }
    let vm = supervisor(name).await?;
    match ask_ref("vm", &vm, VmMsg::CurrentOp, ASK).await? {
        Some(log) => watch_for_client(&log, rctx).await,
        None => ask_ref("vm", &vm, VmMsg::Info, ASK).await,
    }
}

/// A generated name: adjective-noun plus a short suffix.
fn generate_name() -> String {
    const A: &[&str] = &[
        "brisk", "calm", "eager", "fuzzy", "jolly", "keen", "lucky", "quiet", "rapid", "sunny",
        "tidy", "witty",
    ];
    const N: &[&str] = &[
        "otter", "falcon", "badger", "heron", "lynx", "marten", "panda", "quokka", "raven",
        "tapir", "wombat", "yak",
    ];
    let id = new_id();
    let n = u64::from_str_radix(&id[..8], 16).unwrap_or(0);
    format!(
        "{}-{}-{}",
        A[(n % 12) as usize],
        N[((n / 12) % 12) as usize],
        &id[8..12]
    )
}

async fn create(req: VmCreateRequest, rctx: &RequestCtx) -> Result<VmInfo, ErrorData> {
    let ctx = rctx.ctx.clone();
    let name = req.name.clone().unwrap_or_else(generate_name);
    validate_name("VM", &name)?;
    if name.contains('.') || name.contains('_') {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("invalid VM name `{name}`: it must be a DNS label"),
        )
        .with_hint("use a-z, 0-9 and '-', starting with a letter or digit"));
    }
    if let Some(v) = &req.vmm {
        parse_vmm(v)?;
    }
    if req.cpus == Some(0) || req.memory_mib.is_some_and(|m| m < 64) {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            "--cpus must be at least 1 and --memory at least 64 MiB",
        ));
    }
    let log = OpLog::new("create");
    let cancel = CancellationToken::new();
    {
        let (n, l, c) = (name.clone(), log.clone(), cancel.clone());
        ask(
            names::VMS,
            |reply| VmsMsg::Claim {
                name: n,
                log: l,
                cancel: c,
                reply,
            },
            ASK,
        )
        .await??;
    }
    let job_log = log.clone();
    let job_cancel = cancel.clone();
    let job_name = name.clone();
    let peer_uid = rctx.peer_uid;
    let detach = req.detach;
    let tracker = ctx.tracker.clone();
    tracker.spawn(async move {
        let result = create_job(&job_name, req, ctx.clone(), peer_uid, &job_log, job_cancel).await;
        if let Err(e) = &result {
            info!(vm = %job_name, error = %e, "create failed");
        }
        if let Ok(manager) = crate::ask::lookup::<VmsMsg>(names::VMS) {
            let _ = manager.cast(VmsMsg::Unclaim { name: job_name });
        }
        job_log.finish(result);
    });
    if detach {
        return Ok(placeholder(&name, &rctx.ctx));
    }
    follow_for_client(&log, rctx, move || cancel.cancel()).await
}

fn placeholder(name: &str, ctx: &RouterContext) -> VmInfo {
    VmInfo {
        id: String::new(),
        name: name.to_string(),
        state: VmState::Created,
        image: String::new(),
        kernel: String::new(),
        vmm: String::new(),
        accel: None,
        accel_reason: None,
        cpus: 0,
        memory_mib: 0,
        disk_bytes: 0,
        ip: None,
        gateway: None,
        mac: String::new(),
        tap: None,
        fqdn: format!("{name}.{}", ctx.vms.dns_zone.trim_end_matches('.')),
        pid: None,
        restart: Default::default(),
        restarts: 0,
        created_unix_ms: crate::unix_ms(),
        started_unix_ms: None,
        last_error: None,
        console_tail: Vec::new(),
        console_log: String::new(),
        ssh_key: ctx.vms.ssh_key().display().to_string(),
        known_hosts: String::new(),
        has_sshd: false,
        agent_ready: false,
    }
}

fn parse_vmm(v: &str) -> Result<Option<VmmKind>, ErrorData> {
    match v {
        "auto" => Ok(None),
        "qemu" => Ok(Some(VmmKind::Qemu)),
        "firecracker" => Ok(Some(VmmKind::Firecracker)),
        other => Err(
            ErrorData::new(ErrorKind::InvalidRequest, format!("unknown VMM `{other}`"))
                .with_hint("use auto, qemu or firecracker"),
        ),
    }
}

/// A request context for work the daemon does on its own behalf (the
/// create job): its progress lands in `log`, its cancellation is `cancel`.
fn job_ctx(
    ctx: Arc<RouterContext>,
    peer_uid: Option<u32>,
    log: &OpLog,
    cancel: CancellationToken,
) -> RequestCtx {
    let (out, mut rx) = mpsc::channel::<ServerMessage>(64);
    let log = log.clone();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let ServerMessage::Progress { progress, .. } = msg {
                log.progress_bytes(
                    &progress.stage,
                    progress.detail,
                    progress.bytes_done.zip(progress.bytes_total),
                );
            }
        }
    });
    RequestCtx {
        id: 0,
        ctx,
        out,
        cancel,
        peer_uid,
        started: Instant::now(),
        connection: CancellationToken::new(),
        input: std::sync::Mutex::new(None),
    }
}

async fn create_job(
    name: &str,
    req: VmCreateRequest,
    ctx: Arc<RouterContext>,
    peer_uid: Option<u32>,
    log: &OpLog,
    cancel: CancellationToken,
) -> Result<VmInfo, ErrorData> {
    let jctx = job_ctx(ctx.clone(), peer_uid, log, cancel.clone());
    let settings = &ctx.vms;

    // Phase 1: resolve, outside any window.
    let t = Instant::now();
    let resolved = tokio::select! {
        r = resolve(&req, &jctx) => r?,
        _ = cancel.cancelled() => return Err(ErrorData::new(ErrorKind::Cancelled, "the create was cancelled")),
    };
    let (image, kernel) = resolved;
    let (vmm, kernel_path) = choose_vmm(&req, &kernel, settings)?;
    let (accel, accel_reason) = choose_accel(vmm, &ctx).await?;
    log.stage_done(
        "resolve",
        format!("image {}, kernel {}, {vmm}", image.name, kernel.name),
        t,
    );

    // Phase 2: the reservation window.
    let t = Instant::now();
    let id = new_id();
    let record = VmRecord {
        id: id.clone(),
        name: name.to_string(),
        state: VmState::Created,
        image: image.name.clone(),
        rootfs: image.rootfs_path.clone().into(),
        work_seed: image.work_seed_path.clone().map(Into::into),
        kernel: kernel.name.clone(),
        kernel_path,
        initrd_path: kernel.initrd_path.clone().map(Into::into),
        // The modules disk is for images without the kernel's modules;
        // a kernel made from this image's own /boot has them in the image.
        modules_path: kernel
            .modules_path
            .clone()
            .filter(|_| kernel.source != crate::kernels::built_with_image(&image.name))
            .map(Into::into),
        vmm,
        accel,
        accel_reason,
        cpus: req.cpus.unwrap_or(settings.default_cpus),
        memory_mib: req.memory_mib.unwrap_or(settings.default_memory_mib),
        disk_bytes: req.disk_bytes.unwrap_or(settings.default_disk_bytes),
        ip: None,
        prefix_len: settings.prefix_len,
        gateway: settings.gateway,
        dns: settings.guest_dns,
        mac: mac_for(&id),
        tap: None,
        process: None,
        restart: req.restart.unwrap_or_default(),
        restarts: 0,
        created_unix_ms: crate::unix_ms(),
        started_unix_ms: None,
        last_error: None,
        console_tail: Vec::new(),
        ever_running: false,
        systemd: image.has_systemd,
        has_sshd: image.has_sshd,
        has_agent: image.has_agent,
    };
    let requested_ip = req.ip;
    let reserved = ask(
        names::VMS,
        |reply| VmsMsg::Reserve {
            record: Box::new(record),
            requested_ip,
            reply,
        },
        ASK,
    )
    .await
    .and_then(|r| r);
    let vm = match reserved {
        Ok(vm) => vm,
        Err(err) => {
            if matches!(err.kind, ErrorKind::Unavailable | ErrorKind::Timeout) {
                // The answer was lost (the manager restarted or was slow):
                // the reservation may have happened. Undo it, if so.
                if let Err(e) = remove_vm(name, Some(&id)).await {
                    warn!(vm = %name, error = %e, "undoing an unanswered reservation failed");
                }
            }
            return Err(err);
        }
    };
    log.stage_done(
        "reserve",
        format!("name {name} and its address reserved"),
        t,
    );

    // Phase 3: the per-VM work, in the VM's supervisor (the one that runs
    // now: the VM manager may have been restarted since the reservation).
    let inner = OpLog::new("create");
    let l = inner.clone();
    let started = match current_supervisor(name, &id, vm).await {
        Ok(vm) => ask_ref("vm", &vm, |reply| VmMsg::Start { log: l, reply }, ASK)
            .await
            .map(|r| r.map(|()| vm)),
        Err(e) => Err(e),
    };
    let result = match started {
        Ok(Ok(vm)) => {
            let vm2 = vm.clone();
            let c = cancel.clone();
            let watcher = tokio::spawn(async move {
                c.cancelled().await;
                let _ = vm2.cast(VmMsg::CancelStart);
            });
            // Copied with the time each event happened: the following
            // starts once the supervisor has answered, after the boot's
            // first steps.
            let r = follow(&inner, |p| log.copy_from(&inner, p)).await;
            watcher.abort();
            r
        }
        Ok(Err(e)) | Err(e) => Err(e),
    };
    match result {
        Ok(info) => Ok(info),
        Err(err) => {
            // A create is all or nothing.
            let t = Instant::now();
            match remove_vm(name, Some(&id)).await {
                Ok(()) => {
                    log.stage_done("cleanup", "the half-created VM was removed", t);
                    // Nothing is left to look at: the name is free again.
                    let hint = match err.kind {
                        ErrorKind::Cancelled => return Err(err),
                        ErrorKind::Unavailable => format!(
                            "the half-created VM was removed; run the command again (`banger vm create --name {name}`)"
                        ),
                        _ => match err.hint.clone() {
                            Some(h) => format!("{h}; the half-created VM was removed"),
                            None => "the half-created VM was removed".to_string(),
                        },
                    };
                    Err(err.with_hint(hint))
                }
                Err(e) => {
                    warn!(vm = %name, error = %e, "undoing a failed create failed");
                    log.progress(
                        "cleanup",
                        format!("removing the half-created VM failed: {e}"),
                    );
                    Err(err.with_cause(format!(
                        "removing the half-created VM failed too: {e}; delete it with `banger vm delete {name}`"
                    )))
                }
            }
        }
    }
}

/// How long removing a VM waits out restarts of the VM manager and of the
/// VM's supervisor (a failed create must not leave its VM behind because
/// an actor was being restarted at that moment).
const REMOVE_PATIENCE: Duration = Duration::from_secs(120);

fn retryable(err: &ErrorData) -> bool {
    matches!(err.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
}

/// The supervisor of VM `name` (of id `id`) that runs now: `first` when it
/// is alive, else the one the VM manager has (waiting out a respawn).
async fn current_supervisor(
    name: &str,
    id: &str,
    first: ractor::ActorRef<VmMsg>,
) -> Result<ractor::ActorRef<VmMsg>, ErrorData> {
    if first.get_status() == ractor::ActorStatus::Running {
        return Ok(first);
    }
    let deadline = Instant::now() + ASK;
    loop {
        let err = match supervisor(name).await {
            Ok(vm) => match ask_ref("vm", &vm, VmMsg::Info, ASK).await {
                Ok(info) if info.id == id => return Ok(vm),
                Ok(_) => {
                    return Err(ErrorData::new(
                        ErrorKind::NotFound,
                        format!("VM `{name}` was removed while it was being created"),
                    ))
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !retryable(&err) || Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tears VM `name` down and forgets it; with `id`, only the VM of that id.
/// Idempotent, and retried while the VM manager or the VM's supervisor is
/// being restarted.
async fn remove_vm(name: &str, id: Option<&str>) -> Result<(), ErrorData> {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    let mut delay = Duration::from_millis(100);
    loop {
        match remove_once(name, id).await {
            Err(e) if retryable(&e) && Instant::now() + delay < deadline => {
                info!(vm = %name, error = %e, "removing the VM: waiting for its actors");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn remove_once(name: &str, id: Option<&str>) -> Result<(), ErrorData> {
    let vm = match supervisor(name).await {
        Ok(vm) => vm,
        // Gone already, or never reserved (only claimed).
        Err(e) if matches!(e.kind, ErrorKind::NotFound | ErrorKind::InvalidState) => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(id) = id {
        let info = ask_ref("vm", &vm, VmMsg::Info, ASK).await?;
        if info.id != id {
            return Ok(());
        }
    }
    ask_ref("vm", &vm, VmMsg::Teardown, Duration::from_secs(120)).await??;
    let (n, id) = (name.to_string(), id.map(str::to_string));
    ask(
        names::VMS,
        |reply| VmsMsg::Remove { name: n, id, reply },
        ASK,
    )
    .await?
}

async fn delete(name: &str, force: bool, rctx: &RequestCtx) -> Result<(), ErrorData> {
    let vm = supervisor(name).await?;
    let info = ask_ref("vm", &vm, VmMsg::Info, ASK).await?;
    if !force && info.state == VmState::Running {
        rctx.progress("stop", format!("stopping {name}"), None)
            .await;
        if let Err(e) = run_op(&vm, "stop", rctx, |log, reply| VmMsg::Stop {
            force: false,
            log,
            reply,
        })
        .await
        {
            if e.kind == ErrorKind::Cancelled {
                return Err(e);
            }
        }
    }
    let t = Instant::now();
    remove_vm(name, Some(&info.id)).await?;
    rctx.progress(
        "delete",
        format!(
            "disks, address, TAP and DNS record released ({} ms)",
            t.elapsed().as_millis()
        ),
        None,
    )
    .await;
    Ok(())
}

/// Image and kernel for a create: local first, then the catalogs.
async fn resolve(
    req: &VmCreateRequest,
    jctx: &RequestCtx,
) -> Result<(ImageInfo, KernelInfo), ErrorData> {
    let ctx = &jctx.ctx;
    let settings = &ctx.images;
    let layout = Layout::new(&ctx.info.state_dir);
    let catalog = ImageCatalog::embedded();
    let name = match &req.image {
        Some(n) => n.clone(),
        None if !ctx.vms.default_image.is_empty() => ctx.vms.default_image.clone(),
        None => catalog
            .default_image()
            .map(|i| i.name.clone())
            .ok_or_else(|| {
                ErrorData::new(
                    ErrorKind::InvalidRequest,
                    "no image given and no default image",
                )
            })?,
    };
    // Patiently: a registry being restarted costs a moment, not the create.
    let image = match crate::ask::ask_patiently(
        names::IMAGES,
        |reply| ImagesMsg::Get {
            name: name.clone(),
            reply,
        },
        ASK,
        Duration::from_secs(10),
    )
    .await?
    {
        Some(image) => image,
        None => {
            let entry = catalog.find(&name).ok_or_else(|| {
                ErrorData::new(ErrorKind::NotFound, format!("image `{name}` is neither here nor in the image catalog"))
                    .with_hint("see `banger image list` and `banger image catalog`, or `banger image pull REF`")
            })?;
            jctx.progress(
                "image",
                format!(
                    "image {name} is not here yet; getting it from the catalog ({})",
                    entry.kind
                ),
                None,
            )
            .await;
            if entry.kind == "build" {
                images::build::build(
                    ImageBuildRequest {
                        name: name.clone(),
                        suite: Some(entry.source.clone()),
                        packages: Vec::new(),
                        size: None,
                        mirror: None,
                    },
                    jctx,
                    settings,
                    &layout,
                )
                .await?
            } else {
                images::pull::pull(
                    ImagePullRequest {
                        reference: entry.source.clone(),
                        name: Some(name.clone()),
                        size: None,
                        platform: None,
                        insecure: false,
                        kernel: entry.kernel.clone(),
                    },
                    jctx,
                    settings,
                    &layout,
                )
                .await?
            }
        }
    };
    let kernel_name = image
        .kernel
        .clone()
        .or_else(|| settings.default_kernel.clone())
        .ok_or_else(|| {
            ErrorData::new(
                ErrorKind::InvalidRequest,
                format!(
                    "image `{}` names no kernel and there is no default kernel",
                    image.name
                ),
            )
            .with_hint("register the image with --kernel-ref, or set [images] default_kernel")
        })?;
    let kernel = ensure_kernel(&kernel_name, jctx, settings, &layout).await?;
    Ok((image, kernel))
}

/// Picks the backend and the kernel file it boots. `auto` picks
/// Firecracker only when its binary exists, KVM works and the kernel is
/// Firecracker-compatible.
fn choose_vmm(
    req: &VmCreateRequest,
    kernel: &KernelInfo,
    settings: &crate::vms::record::VmSettings,
) -> Result<(VmmKind, std::path::PathBuf), ErrorData> {
    let wanted = parse_vmm(req.vmm.as_deref().unwrap_or(&settings.vmm))?;
    let fc_ok = kernel.backends.iter().any(|b| b == "firecracker") && kernel.vmlinux_path.is_some();
    let kind = match wanted {
        Some(k) => k,
        None => {
            let fc_binary = banger_vmm::process::find_binary(&settings.firecracker_binary).is_ok();
            if fc_binary
                && fc_ok
                && std::path::Path::new("/dev/kvm").exists()
                && settings.accel != "tcg"
            {
                VmmKind::Firecracker
            } else {
                VmmKind::Qemu
            }
        }
    };
    match kind {
        VmmKind::Firecracker => {
            if !fc_ok {
                return Err(ErrorData::new(
                    ErrorKind::InvalidRequest,
                    format!("kernel `{}` cannot boot under Firecracker", kernel.name),
                )
                .with_cause(
                    "Firecracker needs an ELF vmlinux with virtio-mmio and ext4 built in"
                        .to_string(),
                )
                .with_hint("use --vmm qemu, or a Firecracker kernel (`banger kernel import`)"));
            }
            Ok((kind, kernel.vmlinux_path.clone().unwrap_or_default().into()))
        }
        VmmKind::Qemu => Ok((kind, kernel.kernel_path.clone().into())),
    }
}

async fn choose_accel(vmm: VmmKind, ctx: &RouterContext) -> Result<(Accel, String), ErrorData> {
    if vmm == VmmKind::Firecracker {
        return Ok((Accel::Kvm, "Firecracker always uses KVM".into()));
    }
    match ctx.vms.accel.as_str() {
        "tcg" => Ok((Accel::Tcg, "[vm] accel = \"tcg\" in the config".into())),
        "kvm" => Ok((Accel::Kvm, "[vm] accel = \"kvm\" in the config".into())),
        _ => {
            let (usable, reason) = ctx.host.kvm_usable().await;
            Ok(if usable {
                (Accel::Kvm, reason)
            } else {
                (Accel::Tcg, reason)
            })
        }
    }
}

async fn exec(
    req: VmExecRequest,
    rctx: &RequestCtx,
) -> Result<banger_protocol::ExitStatus, ErrorData> {
    if req.argv.is_empty() {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            "nothing to run: give a command after --",
        ));
    }
    let client = agent(&req.name).await?;
    let mut input = if req.stdin { rctx.take_input() } else { None };
    let mut proc = client
        .exec(ExecRequest {
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            tty: req.tty,
            stdin: req.stdin,
        })
        .await?;
    loop {
        tokio::select! {
            msg = proc.next() => match msg {
                None => return Err(ErrorData::new(ErrorKind::Unavailable, "the connection to the guest agent was lost while the command ran")),
                Some(AgentToHost::Output { stream, data, .. }) => {
                    if rctx.out.send(ServerMessage::Output { id: rctx.id, stream, data }).await.is_err() {
                        proc.signal(libc::SIGKILL).await;
                    }
                }
                Some(AgentToHost::Exited { status, .. }) => return Ok(status),
                Some(AgentToHost::Failed { message, .. }) => {
                    return Err(ErrorData::new(ErrorKind::InvalidRequest, message))
                }
                Some(_) => {}
            },
            i = async { match input.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => match i {
                Some(ClientInput::Data(data)) => { proc.stdin(data).await; }
                Some(ClientInput::Resize(size)) => { proc.resize(size).await; }
                Some(ClientInput::Close) | None => { proc.close_stdin().await; input = None; }
            },
            _ = rctx.cancel.cancelled() => {
                proc.signal(libc::SIGKILL).await;
                return Err(rctx.cancelled_error());
            }
        }
    }
}

async fn logs(
    name: &str,
    lines: Option<u32>,
    follow: bool,
    rctx: &RequestCtx,
) -> Result<Response, ErrorData> {
    let vm = supervisor(name).await?;
    let info = ask_ref("vm", &vm, VmMsg::Info, ASK).await?;
    let path = std::path::PathBuf::from(&info.console_log);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(Response::Done),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Not booted yet: wait for the log to appear.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = rctx.cancel.cancelled() => return Ok(Response::Done),
                }
                if let Ok(f) = tokio::fs::File::open(&path).await {
                    break f;
                }
            }
        }
        Err(e) => {
            return Err(ErrorData::from_error(ErrorKind::Internal, &e)
                .with_cause(format!("reading {}", path.display())))
        }
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = match lines {
        None => 0,
        Some(n) => {
            let window = len.min(1 << 20);
            file.seek(std::io::SeekFrom::Start(len - window)).await.ok();
            let mut tail = Vec::new();
            file.read_to_end(&mut tail).await.ok();
            let mut count = 0;
            let mut cut = 0;
            for (i, b) in tail.iter().enumerate().rev() {
                if *b == b'\n' && i + 1 != tail.len() {
                    count += 1;
                    if count == n {
                        cut = i + 1;
                        break;
                    }
                }
            }
            len - window + cut as u64
        }
    };
    file.seek(std::io::SeekFrom::Start(start)).await.ok();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await.unwrap_or(0);
        if n > 0 {
            if rctx
                .out
                .send(ServerMessage::Output {
                    id: rctx.id,
                    stream: OutputStream::Stdout,
                    data: buf[..n].to_vec(),
                })
                .await
                .is_err()
            {
                return Ok(Response::Done);
            }
            continue;
        }
        if !follow {
            return Ok(Response::Done);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = rctx.cancel.cancelled() => return Ok(Response::Done),
        }
    }
}
