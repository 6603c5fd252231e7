//! The Firecracker backend against processes.
//!
//! - `real_firecracker`: drives a real `firecracker` from `PATH` when there
//!   is one (the API comes up, the whole configuration is accepted; with
//!   `BANGER_FC_KERNEL=<vmlinux>` and `BANGER_FC_ROOTFS=<ext4>` it also
//!   boots and stops a guest). Without one it checks the "not found" error
//!   and prints `SKIPPED: firecracker not on PATH`: Firecracker cannot be
//!   installed on the build machines.
//! - The other tests run everywhere. Launch, stop, kill, adopt and the
//!   agent connection are exercised end to end against a stand-in
//!   Firecracker: a shell wrapper that re-executes this test binary as a
//!   real HTTP/1.1 API server on `--api-sock` (see [`fake_firecracker_main`]).
//!   It checks what Firecracker checks (logger file exists, GET without
//!   body), serves hybrid vsock on the configured `uds_path`, prints to its
//!   stdout (the console) on `InstanceStart` and exits on `SendCtrlAltDel`.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_vmm::firecracker::client::ApiClient;
use banger_vmm::firecracker::{self, Configuration, FirecrackerBackend, RunPaths};
use banger_vmm::process::{self, Exit, ProcessId};
use banger_vmm::{
    Accel, DiskFormat, DiskSpec, MachineSpec, StopOutcome, VmmBackend, VmmError, VmmKind,
};

/// Set in the stand-in's environment: its behaviour.
const FAKE_MODE: &str = "BANGER_FAKE_FIRECRACKER";
const FAKE_SOCK: &str = "BANGER_FAKE_FC_SOCK";
const FAKE_ID: &str = "BANGER_FAKE_FC_ID";

fn write_elf(path: &Path) {
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.resize(4096, 0);
    std::fs::write(path, bytes).unwrap();
}

fn spec(dir: &Path, name: &str) -> MachineSpec {
    let kernel = dir.join("vmlinux");
    write_elf(&kernel);
    let root = dir.join("root.ext4");
    std::fs::File::create(&root)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    MachineSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 128,
        kernel,
        initrd: None,
        cmdline: "root=/dev/vda rw".into(),
        disks: vec![DiskSpec {
            id: "root".into(),
            path: root,
            format: DiskFormat::Raw,
            read_only: false,
        }],
        net: None,
        run_dir: dir.join("run"),
        console_log: dir.join("console.log"),
        accel: Accel::Kvm,
    }
}

/// SIGKILLs a process when dropped (a failing test leaves nothing behind).
struct KillOnDrop(Option<ProcessId>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            id.sigkill();
        }
    }
}

// ---------------------------------------------------------------------------
// Real Firecracker (when installed)

#[tokio::test]
async fn real_firecracker() {
    let binary = match process::find_binary("firecracker") {
        Ok(b) => b,
        Err(_) => {
            let err = FirecrackerBackend::new().unwrap_err();
            assert!(
                matches!(&err, VmmError::BinaryNotFound { binary } if binary == "firecracker"),
                "{err:?}"
            );
            assert_eq!(err.to_string(), "firecracker was not found on PATH");
            eprintln!("SKIPPED: firecracker not on PATH");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "fc-real");

    // Configuration only: a placeholder ELF is accepted by PUT /boot-source
    // (the kernel is loaded at InstanceStart), so this runs on any host.
    let paths = firecracker::prepare_run_dir(&spec).unwrap();
    let mut cmd = Command::new(&binary);
    cmd.arg("--api-sock")
        .arg(&paths.api_socket)
        .arg("--id")
        .arg(firecracker::instance_id(&spec.name));
    let id = process::spawn_detached(cmd, &spec.console_log).unwrap();
    let _guard = KillOnDrop(Some(id));
    let client = ApiClient::new(&paths.api_socket);
    let t0 = Instant::now();
    let info = loop {
        if let Ok(info) = client.instance_info().await {
            break info;
        }
        assert!(
            id.is_alive(),
            "firecracker exited: {}",
            process::tail_of(&spec.console_log, 2000)
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "no API socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(info.id, "fc-real");
    assert_eq!(info.state, "Not started");
    assert!(!info.is_running());
    Configuration::from_spec(&spec)
        .unwrap()
        .apply(&client)
        .await
        .unwrap();
    // A refused request comes back as a typed error with Firecracker's text.
    let bad = firecracker::api::MachineConfiguration {
        vcpu_count: 0,
        mem_size_mib: 128,
        smt: None,
    };
    let err = client.put(&bad).await.unwrap_err();
    assert!(
        matches!(&err, VmmError::Firecracker { status: 400, path, fault_message, .. }
            if path == "/machine-config" && !fault_message.is_empty()),
        "{err:?}"
    );
    assert_eq!(
        process::kill_and_wait(id).await,
        Exit::Signal(libc::SIGKILL)
    );

    // A full boot when a Firecracker kernel and root file system are given.
    let (Some(kernel), Some(rootfs)) = (
        std::env::var_os("BANGER_FC_KERNEL"),
        std::env::var_os("BANGER_FC_ROOTFS"),
    ) else {
        eprintln!("real firecracker: configuration checked; set BANGER_FC_KERNEL and BANGER_FC_ROOTFS for a boot");
        return;
    };
    let mut boot = spec.clone();
    boot.kernel = kernel.into();
    boot.disks[0].path = rootfs.into();
    boot.disks[0].read_only = true;
    let handle = FirecrackerBackend::with_binary(&binary)
        .launch(&boot)
        .await
        .unwrap();
    let _guard = KillOnDrop(Some(handle.process()));
    assert!(handle.status().await.unwrap().running);
    let outcome = handle.stop(Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(outcome, StopOutcome::Clean | StopOutcome::Killed),
        "{outcome:?}"
    );
    assert!(!handle.process().is_alive());
}

// ---------------------------------------------------------------------------
// Without Firecracker

#[tokio::test]
async fn a_missing_binary_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "nobin");
    let err = FirecrackerBackend::with_binary("/nonexistent")
        .launch(&spec)
        .await
        .unwrap_err();
    match &err {
        VmmError::Spawn { binary, source } => {
            assert_eq!(binary, "/nonexistent");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("/nonexistent"), "{err}");
    assert!(!RunPaths::new(&spec.run_dir).api_socket.exists());
}

#[tokio::test]
async fn a_non_elf_kernel_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(dir.path(), "bz");
    // What a Debian /boot/vmlinuz starts with: a bzImage's MZ stub.
    let vmlinuz = dir.path().join("vmlinuz");
    std::fs::write(&vmlinuz, b"MZ\xea\x07\x00\xc0").unwrap();
    spec.kernel = vmlinuz;
    let wrapper = fake_binary(dir.path(), "ok");
    let err = FirecrackerBackend::with_binary(&wrapper)
        .launch(&spec)
        .await
        .unwrap_err();
    match &err {
        VmmError::InvalidSpec { backend, reason } => {
            assert_eq!(*backend, VmmKind::Firecracker);
            assert!(reason.contains("uncompressed ELF vmlinux"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!spec.console_log.exists(), "the VMM was never started");
    assert!(!spec.run_dir.exists());
}

// ---------------------------------------------------------------------------
// Against the stand-in Firecracker

/// Writes the wrapper script that runs this test binary as a stand-in
/// Firecracker in `mode`. The stand-in records every request as a JSON
/// line in `<api socket>.requests` and its pid in `<api socket>.pid`.
fn fake_binary(dir: &Path, mode: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let wrapper = dir.join("firecracker");
    let mut f = std::fs::File::create(&wrapper).unwrap();
    write!(
        f,
        r#"#!/bin/sh
sock=""; id=""
while [ $# -gt 0 ]; do
  case "$1" in
    --api-sock) sock="$2"; shift 2 ;;
    --id) id="$2"; shift 2 ;;
    *) echo "unexpected argument $1" >&2; exit 2 ;;
  esac
done
export {FAKE_MODE}={mode} {FAKE_SOCK}="$sock" {FAKE_ID}="$id"
exec '{exe}' fake_firecracker_main --exact --nocapture --test-threads=1 -q "$sock"
"#,
        exe = exe.display()
    )
    .unwrap();
    drop(f);
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

fn recorded(spec: &MachineSpec) -> Vec<serde_json::Value> {
    let path = requests_file(&RunPaths::new(&spec.run_dir).api_socket);
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn requests_file(api_socket: &Path) -> PathBuf {
    let mut p = api_socket.as_os_str().to_owned();
    p.push(".requests");
    p.into()
}

fn pid_file(api_socket: &Path) -> PathBuf {
    let mut p = api_socket.as_os_str().to_owned();
    p.push(".pid");
    p.into()
}

#[tokio::test]
async fn launch_configures_boots_serves_the_agent_and_stops_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "web 1");
    let wrapper = fake_binary(dir.path(), "ok");
    let backend = FirecrackerBackend::with_binary(&wrapper);
    assert_eq!(backend.kind(), VmmKind::Firecracker);

    let handle = backend.launch(&spec).await.unwrap();
    let _guard = KillOnDrop(Some(handle.process()));
    assert_eq!(handle.kind(), VmmKind::Firecracker);
    assert!(handle.process().is_alive());

    let reqs = recorded(&spec);
    let seq: Vec<String> = reqs
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .filter(|r| r != "GET /")
        .collect();
    assert_eq!(
        seq,
        [
            "PUT /logger",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/root",
            "PUT /vsock",
            "PUT /actions"
        ]
    );
    let id_seen = reqs.iter().find(|r| r["path"] == "/boot-source").unwrap();
    assert_eq!(
        id_seen["body"]["boot_args"],
        "root=/dev/vda rw console=ttyS0 reboot=k panic=1 pci=off"
    );
    assert_eq!(
        reqs.last().unwrap()["body"],
        serde_json::json!({"action_type": "InstanceStart"})
    );
    // The sanitised --id, and the console on the process's stdout.
    let status = handle.status().await.unwrap();
    assert!(status.running, "{status:?}");
    assert_eq!(status.detail, "Running");
    let console = std::fs::read_to_string(&spec.console_log).unwrap();
    assert!(console.contains("fake guest: booting web-1"), "{console}");

    // The agent over hybrid vsock: the stand-in echoes.
    let mut agent = handle.connect_agent().await.unwrap();
    agent.write_all(b"hello agent").await.unwrap();
    let mut buf = [0u8; 11];
    agent.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello agent");
    drop(agent);

    // A second backend instance (as after a daemon restart) adopts it.
    let adopted = FirecrackerBackend::with_binary("/nonexistent")
        .adopt(&spec, handle.process())
        .await
        .unwrap();
    assert_eq!(adopted.process(), handle.process());
    assert!(adopted.status().await.unwrap().running);
    // Another VM's spec does not adopt it.
    let mut other = spec.clone();
    other.run_dir = dir.path().join("run2");
    assert!(matches!(
        backend.adopt(&other, handle.process()).await,
        Err(VmmError::NotAdoptable { .. })
    ));

    let outcome = handle.stop(Duration::from_secs(20)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Clean);
    assert_eq!(handle.wait_exit().await, Exit::Code(0));
    assert!(!handle.process().is_alive());
    let last = recorded(&spec).last().unwrap().clone();
    assert_eq!(
        last["body"],
        serde_json::json!({"action_type": "SendCtrlAltDel"})
    );
    assert_eq!(
        handle.stop(Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyExited
    );
    assert!(!handle.status().await.unwrap().running);
}

#[tokio::test]
async fn relaunch_over_stale_sockets_works() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "again");
    let wrapper = fake_binary(dir.path(), "ok");
    let backend = FirecrackerBackend::with_binary(&wrapper);
    let first = backend.launch(&spec).await.unwrap();
    let _g1 = KillOnDrop(Some(first.process()));
    first.kill().await.unwrap();
    assert!(!first.process().is_alive());
    assert_eq!(first.wait_exit().await, Exit::Signal(libc::SIGKILL));
    // SIGKILL leaves both sockets behind; the next launch clears them.
    let paths = RunPaths::new(&spec.run_dir);
    assert!(paths.api_socket.exists() && paths.vsock.exists());
    let second = backend.launch(&spec).await.unwrap();
    let _g2 = KillOnDrop(Some(second.process()));
    assert_ne!(first.process(), second.process());
    assert!(second.status().await.unwrap().running);
    second.kill().await.unwrap();
}

#[tokio::test]
async fn a_refused_instance_start_kills_the_vmm_and_returns_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "fault");
    let wrapper = fake_binary(dir.path(), "fault-on-start");
    let err = FirecrackerBackend::with_binary(&wrapper)
        .launch(&spec)
        .await
        .unwrap_err();
    match &err {
        VmmError::Firecracker {
            method,
            path,
            status,
            fault_message,
        } => {
            assert_eq!(method, "PUT");
            assert_eq!(path, "/actions");
            assert_eq!(*status, 400);
            assert_eq!(fault_message, "Cannot start microvm: fake failure");
        }
        other => panic!("unexpected {other:?}"),
    }
    let pid: u32 = std::fs::read_to_string(pid_file(&RunPaths::new(&spec.run_dir).api_socket))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if let Some(left) = ProcessId::of(pid) {
        left.sigkill();
        panic!("the VMM was left running");
    }
}

#[tokio::test]
async fn a_vmm_dying_at_start_is_an_early_exit_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "dies");
    let wrapper = fake_binary(dir.path(), "die");
    let err = FirecrackerBackend::with_binary(&wrapper)
        .launch(&spec)
        .await
        .unwrap_err();
    match &err {
        VmmError::EarlyExit { status, output } => {
            assert_eq!(status, "exit code 1");
            assert!(output.contains("Error creating the Kvm object"), "{output}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_guest_ignoring_ctrl_alt_del_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "deaf");
    let wrapper = fake_binary(dir.path(), "deaf");
    let handle = FirecrackerBackend::with_binary(&wrapper)
        .launch(&spec)
        .await
        .unwrap();
    let _guard = KillOnDrop(Some(handle.process()));
    let t0 = Instant::now();
    let outcome = handle.stop(Duration::from_millis(500)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Killed);
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert!(!handle.process().is_alive());
    assert_eq!(handle.wait_exit().await, Exit::Signal(libc::SIGKILL));
}

// ---------------------------------------------------------------------------
// The stand-in itself

/// Runs as the stand-in Firecracker when started through [`fake_binary`];
/// a no-op in a normal test run.
#[test]
fn fake_firecracker_main() {
    let Ok(mode) = std::env::var(FAKE_MODE) else {
        return;
    };
    let sock = PathBuf::from(std::env::var(FAKE_SOCK).unwrap());
    let id = std::env::var(FAKE_ID).unwrap();
    std::fs::write(pid_file(&sock), std::process::id().to_string()).unwrap();
    if mode == "die" {
        eprintln!("Error creating the Kvm object: No such file or directory (os error 2)");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(fake::serve(sock, id, mode));
    std::process::exit(0);
}

mod fake {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    struct State {
        id: String,
        mode: String,
        started: bool,
        log: PathBuf,
        vsock: Option<tokio::task::JoinHandle<()>>,
    }

    pub async fn serve(sock: PathBuf, id: String, mode: String) {
        let listener = UnixListener::bind(&sock).unwrap();
        let state = Arc::new(Mutex::new(State {
            id,
            mode,
            started: false,
            log: requests_file(&sock),
            vsock: None,
        }));
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn reply(status: u16, body: String) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    fn fault(msg: &str) -> Response<Full<Bytes>> {
        reply(400, serde_json::json!({ "fault_message": msg }).to_string())
    }

    async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let has_length = req.headers().contains_key(hyper::header::CONTENT_LENGTH);
        let raw = req.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = if raw.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&raw) {
                Ok(v) => v,
                Err(e) => return fault(&format!("bad JSON: {e}")),
            }
        };
        let mut st = state.lock().unwrap();
        let line = serde_json::json!({"method": method, "path": path, "body": body});
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&st.log)
            .unwrap();
        writeln!(f, "{line}").unwrap();

        match (method.as_str(), path.as_str()) {
            ("GET", "/") => {
                if has_length || !raw.is_empty() {
                    return fault("GET request cannot have a body.");
                }
                let state = if st.started { "Running" } else { "Not started" };
                reply(
                    200,
                    serde_json::json!({
                        "id": st.id, "state": state,
                        "vmm_version": "0.0.0-fake", "app_name": "Firecracker",
                    })
                    .to_string(),
                )
            }
            ("PUT", "/logger") => {
                // Firecracker opens the log without creating it.
                let p = body["log_path"].as_str().unwrap_or_default();
                if !Path::new(p).is_file() {
                    return fault(&format!("Failed to open target file: {p}"));
                }
                reply(204, String::new())
            }
            ("PUT", "/vsock") => {
                let uds = PathBuf::from(body["uds_path"].as_str().unwrap());
                let listener = match UnixListener::bind(&uds) {
                    Ok(l) => l,
                    Err(e) => return fault(&format!("Cannot create vsock device: {e}")),
                };
                st.vsock = Some(tokio::spawn(vsock(listener)));
                reply(204, String::new())
            }
            ("PUT", "/actions") => match body["action_type"].as_str() {
                Some("InstanceStart") if st.mode == "fault-on-start" => {
                    fault("Cannot start microvm: fake failure")
                }
                Some("InstanceStart") => {
                    st.started = true;
                    println!("fake guest: booting {}", st.id);
                    reply(204, String::new())
                }
                Some("SendCtrlAltDel") => {
                    if st.mode != "deaf" {
                        tokio::spawn(async {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            std::process::exit(0);
                        });
                    }
                    reply(204, String::new())
                }
                _ => fault("unknown action"),
            },
            ("PUT", p)
                if p == "/machine-config"
                    || p == "/boot-source"
                    || p.starts_with("/drives/")
                    || p.starts_with("/network-interfaces/") =>
            {
                if st.started {
                    fault("The requested operation is not supported after starting the microVM.")
                } else {
                    reply(204, String::new())
                }
            }
            _ => fault(&format!(
                "Invalid request method and/or path: {method} {path}."
            )),
        }
    }

    /// Hybrid vsock: `CONNECT 1024\n` → `OK <n>\n`, then echo; other
    /// ports are closed, as when nothing listens in the guest.
    async fn vsock(listener: UnixListener) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line != b"CONNECT 1024" {
                    return;
                }
                s.write_all(b"OK 1073741824\n").await.unwrap();
                let mut buf = [0u8; 256];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }
}
