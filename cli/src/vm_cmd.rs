//! `banger vm ...`: create, run, manage and reach VMs.
//!
//! Long operations (create, start, stop, delete) stream their stages
//! through [`crate::progress`]; `vm run` then opens a shell with the
//! system `ssh`, the managed key and the VM's own known-hosts file (no
//! prompts), or through the guest agent when the image has no sshd.
//! `vm exec` and the agent shell relay stdin/stdout over the daemon
//! socket, on a raw terminal when there is one.

use std::io::{IsTerminal as _, Write as _};

use banger_protocol::client::Client;
use banger_protocol::{
    ClientMessage, OutputStream, Request, Response, RestartPolicy, ServerMessage, TtySize,
    VmCreateRequest, VmExecRequest, VmInfo,
};

use crate::args::{
    JsonFlag, VmCommand, VmCreateArgs, VmExecArgs, VmLogsArgs, VmNameJson, VmRunArgs,
};
use crate::connect::{self, StreamEnd, StreamItem};
use crate::error::{CliError, Exit};
use crate::image_cmd::{ago, now_unix_ms};
use crate::outln;
use crate::output::{human_bytes, print_json, Table};
use crate::progress;

pub async fn run(command: VmCommand) -> Result<Exit, CliError> {
    match command {
        VmCommand::Create(c) => {
            let json = c.create.json;
            match create(&c.create, c.detach).await? {
                Some(info) => {
                    print_vm(&info, json, c.detach)?;
                    Ok(Exit::Ok)
                }
                None => connect::cancelled(),
            }
        }
        VmCommand::Run(args) => vm_run(args).await,
        VmCommand::Start(a) => op(Request::VmStart { name: a.name }, a.json).await,
        VmCommand::Stop(a) => {
            op(
                Request::VmStop {
                    name: a.name,
                    force: a.force,
                },
                a.json,
            )
            .await
        }
        VmCommand::Restart(a) => op(Request::VmRestart { name: a.name }, a.json).await,
        VmCommand::Watch(a) => op(Request::VmWatch { name: a.name }, a.json).await,
        VmCommand::Delete(a) => match progress::run(
            Request::VmDelete {
                name: a.name.clone(),
                force: a.force,
            },
            a.json,
        )
        .await?
        {
            Some(_) => {
                if a.json {
                    progress::print_result_line("deleted", &a.name)?;
                } else {
                    outln!("deleted {}", a.name)?;
                }
                Ok(Exit::Ok)
            }
            None => connect::cancelled(),
        },
        VmCommand::List(f) => list(f).await,
        VmCommand::Show(a) => {
            let info = show(&a.name).await?;
            print_vm(&info, a.json, false)?;
            Ok(Exit::Ok)
        }
        VmCommand::Logs(a) => logs(a).await,
        VmCommand::Ssh(a) => {
            let info = show(&a.name).await?;
            ssh(&info, &a.args)
        }
        VmCommand::Exec(a) => exec_cmd(a).await,
        VmCommand::Ports(a) => ports(a).await,
        VmCommand::Health(a) => health(a).await,
    }
}

fn request_of(args: &VmCreateArgs, detach: bool) -> VmCreateRequest {
    VmCreateRequest {
        name: args.name.clone(),
        image: args.image.clone(),
        cpus: args.cpus,
        memory_mib: args.memory.map(|b| (b >> 20) as u32),
        disk_bytes: args.disk,
        ip: args.ip,
        vmm: args.vmm.clone(),
        restart: args.restart.as_deref().and_then(RestartPolicy::parse),
        detach,
    }
}

/// Creates a VM showing progress; `None` when Ctrl-C cancelled it.
async fn create(args: &VmCreateArgs, detach: bool) -> Result<Option<VmInfo>, CliError> {
    match progress::run(Request::VmCreate(request_of(args, detach)), args.json).await? {
        Some(Response::Vm(info)) => Ok(Some(info)),
        Some(other) => Err(connect::unexpected("vm_create", &other)),
        None => Ok(None),
    }
}

async fn op(request: Request, json: bool) -> Result<Exit, CliError> {
    let name = request.name();
    match progress::run(request, json).await? {
        Some(Response::Vm(info)) => {
            print_vm(&info, json, false)?;
            Ok(Exit::Ok)
        }
        Some(other) => Err(connect::unexpected(name, &other)),
        None => connect::cancelled(),
    }
}

async fn show(name: &str) -> Result<VmInfo, CliError> {
    match crate::image_cmd::query(Request::VmShow {
        name: name.to_string(),
    })
    .await?
    {
        Response::Vm(info) => Ok(info),
        other => Err(connect::unexpected("vm_show", &other)),
    }
}

fn print_vm(info: &VmInfo, json: bool, detached: bool) -> Result<(), CliError> {
    if json {
        return progress::print_result_line("vm", info);
    }
    if detached {
        return outln!(
            "creating {} in the background; follow it with `banger vm watch {}`",
            info.name,
            info.name
        );
    }
    let mut lines = vec![format!("vm {}", info.name)];
    let mut kv = |k: &str, v: String| lines.push(format!("  {:<10} {v}", format!("{k}:")));
    kv("state", info.state.to_string());
    kv(
        "address",
        info.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
    );
    kv("dns", info.fqdn.clone());
    kv("image", info.image.clone());
    kv("kernel", info.kernel.clone());
    let accel = match (&info.accel, &info.accel_reason) {
        (Some(a), Some(r)) => format!(" ({a}: {r})"),
        _ => String::new(),
    };
    kv("vmm", format!("{}{accel}", info.vmm));
    kv(
        "resources",
        format!(
            "{} vCPU, {} MiB, {} disk",
            info.cpus,
            info.memory_mib,
            human_bytes(info.disk_bytes)
        ),
    );
    kv(
        "restart",
        format!("{} ({} restarts)", info.restart.as_str(), info.restarts),
    );
    if let Some(pid) = info.pid {
        kv("pid", pid.to_string());
    }
    if let Some(tap) = &info.tap {
        kv("tap", tap.clone());
    }
    kv(
        "agent",
        if info.agent_ready {
            "connected"
        } else {
            "not connected"
        }
        .into(),
    );
    kv("console", info.console_log.clone());
    if let Some(err) = &info.last_error {
        kv("error", err.clone());
    }
    outln!("{}", lines.join("\n"))?;
    if !info.console_tail.is_empty() {
        outln!("last console lines:")?;
        for l in &info.console_tail {
            outln!("  {l}")?;
        }
    }
    Ok(())
}

async fn list(flags: JsonFlag) -> Result<Exit, CliError> {
    let vms = match crate::image_cmd::query(Request::VmList).await? {
        Response::Vms(v) => v,
        other => return Err(connect::unexpected("vm_list", &other)),
    };
    if flags.json {
        print_json(&vms)?;
        return Ok(Exit::Ok);
    }
    let now = now_unix_ms();
    let mut t = Table::new(&["NAME", "STATE", "ADDRESS", "VMM", "IMAGE", "CREATED"]);
    for v in &vms {
        t.row(vec![
            v.name.clone(),
            v.state.to_string(),
            v.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            v.vmm.clone(),
            v.image.clone(),
            ago(now, v.created_unix_ms),
        ]);
    }
    t.print()?;
    Ok(Exit::Ok)
}

async fn vm_run(args: VmRunArgs) -> Result<Exit, CliError> {
    let Some(info) = create(&args.create, false).await? else {
        return connect::cancelled();
    };
    if !args.create.json {
        eprintln!(
            "{} is up at {} ({})",
            info.name,
            info.ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "no address".into()),
            info.fqdn
        );
    }
    let result = if info.has_sshd && info.ip.is_some() {
        ssh(&info, &args.command)
    } else {
        let tty = args.command.is_empty() && std::io::stdin().is_terminal();
        let argv = if args.command.is_empty() {
            vec!["/bin/sh".to_string(), "-l".to_string()]
        } else {
            args.command.clone()
        };
        agent_exec(&info.name, argv, tty).await
    };
    if args.rm {
        let _ = progress::run(
            Request::VmDelete {
                name: info.name.clone(),
                force: true,
            },
            false,
        )
        .await;
    }
    result
}

/// Runs the system ssh against `info` with the managed key and the VM's
/// known-hosts file; returns ssh's exit code.
fn ssh(info: &VmInfo, extra: &[String]) -> Result<Exit, CliError> {
    let Some(ip) = info.ip else {
        return Err(CliError::failed(format!(
            "VM {} has no address (guest networking is off)",
            info.name
        ))
        .with_hint(format!("use `banger vm exec {} -- CMD`", info.name)));
    };
    let known = std::path::Path::new(&info.known_hosts);
    let strict = if known.metadata().is_ok_and(|m| m.len() > 0) {
        "yes"
    } else {
        "accept-new"
    };
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(["-i", &info.ssh_key])
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=15",
        ])
        .args(["-o", &format!("UserKnownHostsFile={}", info.known_hosts)])
        .args(["-o", &format!("StrictHostKeyChecking={strict}")])
        .args(["-o", &format!("HostKeyAlias={}", info.name)]);
    if extra.is_empty() && std::io::stdin().is_terminal() {
        cmd.arg("-t");
    }
    cmd.arg(format!("root@{ip}"));
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    let status = cmd.status().map_err(|e| {
        CliError::with_source("cannot run ssh", &e)
            .with_hint("install it: apt-get install openssh-client")
    })?;
    Ok(match status.code() {
        Some(0) => Exit::Ok,
        Some(c) => Exit::Code(c as u8),
        None => Exit::Failed,
    })
}

async fn exec_cmd(a: VmExecArgs) -> Result<Exit, CliError> {
    let tty =
        a.tty || (!a.no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
    agent_exec(&a.name, a.command, tty).await
}

/// Puts the terminal in raw mode until dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enable() -> Self {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        match termios::tcgetattr(&stdin) {
            Ok(orig) => {
                let mut raw = orig.clone();
                termios::cfmakeraw(&mut raw);
                let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
                Self(Some(orig))
            }
            Err(_) => Self(None),
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                orig,
            );
        }
    }
}

fn terminal_size() -> Option<TtySize> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills the struct we pass.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Stdin in chunks, read by a thread of its own; the channel closes at end
/// of file. Not `tokio::io::stdin`: its read runs on the blocking pool and
/// the runtime waits for it at exit, so on a terminal the CLI would hang
/// after the remote command ended until the user pressed a key.
fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// Runs `argv` in the VM through the agent, relaying stdin and output.
async fn agent_exec(name: &str, argv: Vec<String>, tty: bool) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client: Client = connect::connect_or_start(&paths).await?;
    let size = if tty {
        terminal_size().or(Some(TtySize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let request = Request::VmExec(VmExecRequest {
        name: name.to_string(),
        argv,
        env: std::env::var("TERM")
            .map(|t| vec![("TERM".to_string(), t)])
            .unwrap_or_default(),
        cwd: None,
        tty: size,
        stdin: true,
    });
    let id = client.send(request).await?;
    let _raw = tty.then(RawTerminal::enable);
    let mut stdin = stdin_chunks();
    let mut stdin_open = true;
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| CliError::with_source("cannot watch the terminal size", &e))?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            msg = client.next_message() => match msg? {
                ServerMessage::Output { id: oid, stream, data } if oid == id => {
                    let r = match stream {
                        OutputStream::Stdout => { let mut o = std::io::stdout(); o.write_all(&data).and_then(|_| o.flush()) }
                        OutputStream::Stderr => { let mut e = std::io::stderr(); e.write_all(&data).and_then(|_| e.flush()) }
                    };
                    if r.is_err() { return Ok(Exit::Failed); }
                }
                ServerMessage::Reply { id: rid, result } if rid == id => {
                    return match result.map_err(CliError::from)? {
                        Response::Exited(status) => Ok(match status.shell_code() { 0 => Exit::Ok, c => Exit::Code(c.clamp(0, 255) as u8) }),
                        other => Err(connect::unexpected("vm_exec", &other)),
                    };
                }
                ServerMessage::Error(e) => return Err(e.into()),
                _ => {}
            },
            chunk = stdin.recv(), if stdin_open => match chunk {
                None => {
                    stdin_open = false;
                    client.send_message(ClientMessage::InputClose { id }).await?;
                }
                Some(data) => client.send_message(ClientMessage::Input { id, data }).await?,
            },
            _ = winch.recv(), if tty => {
                if let Some(size) = terminal_size() {
                    client.send_message(ClientMessage::Resize { id, size }).await?;
                }
            }
            _ = &mut ctrl_c, if !tty => {
                client.cancel(id).await?;
                return connect::cancelled();
            }
        }
    }
}

async fn logs(a: VmLogsArgs) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let request = Request::VmLogs {
        name: a.name,
        lines: a.lines,
        follow: a.follow,
    };
    let end = connect::stream(&mut client, request, |item| {
        if let StreamItem::Output(stream, data) = item {
            let r = match stream {
                OutputStream::Stdout => std::io::stdout()
                    .write_all(&data)
                    .and_then(|_| std::io::stdout().flush()),
                OutputStream::Stderr => std::io::stderr().write_all(&data),
            };
            r.map_err(CliError::stdout)?;
        }
        Ok(())
    })
    .await?;
    // Ctrl-C is how `logs -f` ends: not an error.
    let _: StreamEnd = end;
    Ok(Exit::Ok)
}

async fn ports(a: VmNameJson) -> Result<Exit, CliError> {
    let ports = match crate::image_cmd::query(Request::VmPorts { name: a.name }).await? {
        Response::Ports(p) => p,
        other => return Err(connect::unexpected("vm_ports", &other)),
    };
    if a.json {
        print_json(&ports)?;
        return Ok(Exit::Ok);
    }
    let mut t = Table::new(&["PROTO", "ADDRESS", "PORT", "PROCESS"]);
    for p in &ports {
        let process = match (&p.process, p.pid) {
            (Some(n), Some(pid)) => format!("{n} ({pid})"),
            (None, Some(pid)) => pid.to_string(),
            (Some(n), None) => n.clone(),
            (None, None) => "-".into(),
        };
        t.row(vec![
            p.proto.clone(),
            p.address.clone(),
            p.port.to_string(),
            process,
        ]);
    }
    t.print()?;
    Ok(Exit::Ok)
}

async fn health(a: VmNameJson) -> Result<Exit, CliError> {
    let h = match crate::image_cmd::query(Request::VmHealth { name: a.name }).await? {
        Response::Health(h) => h,
        other => return Err(connect::unexpected("vm_health", &other)),
    };
    if a.json {
        print_json(&h)?;
        return Ok(Exit::Ok);
    }
    outln!("hostname   {}", h.hostname)?;
    outln!(
        "agent      {}{}",
        h.agent_version,
        if h.pid1 { " (init)" } else { "" }
    )?;
    outln!(
        "uptime     {}",
        crate::output::human_duration_ms(h.uptime_ms)
    )?;
    outln!(
        "load       {:.2} {:.2} {:.2}",
        h.load_centi[0] as f64 / 100.0,
        h.load_centi[1] as f64 / 100.0,
        h.load_centi[2] as f64 / 100.0
    )?;
    outln!(
        "memory     {} available of {}",
        human_bytes(h.mem_available_kib * 1024),
        human_bytes(h.mem_total_kib * 1024)
    )?;
    outln!("addresses  {}", h.addresses.join(", "))?;
    if let Some(s) = &h.system_state {
        outln!("system     {s}")?;
    }
    outln!(
        "sshd       {}",
        if h.sshd_listening {
            "listening"
        } else {
            "not listening"
        }
    )?;
    Ok(Exit::Ok)
}
