//! The daemon's life cycle seen from outside: start, status, stop, restart
//! on the same directories, signals, the single-instance lock, stale
//! sockets, socket permissions, the CLI's auto-start and its basic commands.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Output;
use std::time::Duration;

use banger_protocol::{
    ErrorKind, Request, Response, ServerMessage, BANGER_VERSION, PROTOCOL_VERSION,
};
use banger_tests::{error_chain, usable_group, wait, TestDaemon};

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    )
}

async fn status(d: &TestDaemon) -> banger_protocol::DaemonStatus {
    let mut client = d.client().await;
    match client.request(Request::Status).await {
        Ok(Response::Status(s)) => s,
        Ok(other) => panic!("Status answered {other:?}"),
        Err(e) => panic!("Status failed: {}", error_chain(&e)),
    }
}

async fn ping(d: &TestDaemon) {
    let mut client = d.client().await;
    match client.request(Request::Ping).await {
        Ok(Response::Pong) => {}
        other => panic!("Ping answered {other:?}"),
    }
}

fn assert_exited_cleanly(d: &mut TestDaemon, how: &str) {
    let status = d
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("bangerd still runs {EXIT_TIMEOUT:?} after {how}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after {how}; stderr:\n{}",
        d.stderr_log()
    );
    assert!(
        !d.socket().exists(),
        "the socket is left behind after {how}"
    );
}

#[tokio::test]
async fn status_stop_and_restart_on_the_same_dirs() {
    let mut d = TestDaemon::start();
    let pid = d.pid();

    let out = d.banger(["daemon", "status"]);
    assert!(out.status.success(), "daemon status: {}", describe(&out));
    assert!(
        stdout(&out).contains(&pid.to_string()),
        "status shows the pid: {}",
        describe(&out)
    );

    let out = d.banger(["daemon", "status", "--json"]);
    assert!(
        out.status.success(),
        "daemon status --json: {}",
        describe(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(json["running"], true);
    assert_eq!(json["pid"], pid, "{json}");

    let before = status(&d).await;
    assert_eq!(before.pid, pid);
    assert_eq!(before.version, BANGER_VERSION);
    assert_eq!(before.socket_path, d.socket().display().to_string());
    assert!(
        before
            .store
            .path
            .starts_with(&d.paths().state_dir.display().to_string()),
        "the store lives under the state dir: {before:?}"
    );

    let out = d.banger(["daemon", "stop"]);
    assert!(out.status.success(), "daemon stop: {}", describe(&out));
    assert_exited_cleanly(&mut d, "`banger daemon stop`");

    // `daemon status` never starts the daemon.
    let out = d.banger(["daemon", "status"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "status of a stopped daemon: {}",
        describe(&out)
    );
    assert!(stdout(&out).contains("not running"), "{}", describe(&out));
    assert!(!d.socket().exists(), "`daemon status` started a daemon");

    // Same directories again: the store (and its lock) must reopen.
    d.restart();
    assert_ne!(d.pid(), pid);
    let after = status(&d).await;
    assert_eq!(after.pid, d.pid());
    assert_eq!(after.store.path, before.store.path);
    assert!(
        after.store.records >= before.store.records,
        "records were lost across a restart: {} then {}",
        before.store.records,
        after.store.records
    );
}

#[tokio::test]
async fn the_daemon_runs_at_its_configured_priority() {
    // The default: ahead of guests and the rest of the host. This daemon
    // shares the test's session, whose autogroup it must leave alone.
    let ours = banger_tests::nice_values(std::process::id()).1;
    let d = TestDaemon::start();
    ping(&d).await;
    assert!(!banger_tests::session_leader(d.pid()));
    let (threads, group) = banger_tests::nice_values(d.pid());
    assert!(threads.len() >= 2, "threads of bangerd: {threads:?}");
    assert!(
        threads.iter().all(|&n| n == -10),
        "every thread at nice -10: {threads:?}"
    );
    assert_eq!(group, ours, "bangerd changed its launcher's autogroup");
    drop(d);

    // Configured.
    let d = TestDaemon::builder().config("nice = 3\n").start();
    ping(&d).await;
    let (threads, _) = banger_tests::nice_values(d.pid());
    assert!(threads.iter().all(|&n| n == 3), "nice 3: {threads:?}");
    drop(d);

    // Started by the CLI (a session of its own): the autogroup too.
    let d = TestDaemon::builder().prepare();
    let out = d.banger(["daemon", "start"]);
    assert!(out.status.success(), "daemon start: {}", describe(&out));
    let pid = status(&d).await.pid;
    assert!(banger_tests::session_leader(pid));
    let (threads, group) = banger_tests::nice_values(pid);
    assert!(threads.iter().all(|&n| n == -10), "{threads:?}");
    if std::path::Path::new("/proc/self/autogroup").exists() {
        assert_eq!(group, Some(-10), "the CLI-started daemon's autogroup");
    }
    let out = d.banger(["daemon", "stop"]);
    assert!(out.status.success(), "daemon stop: {}", describe(&out));

    // The harness's own_session (what the benchmarks use) starts it the
    // same way: a session leader that sets its autogroup.
    let d = TestDaemon::builder().own_session().start();
    ping(&d).await;
    assert!(banger_tests::session_leader(d.pid()));
    if std::path::Path::new("/proc/self/autogroup").exists() {
        assert_eq!(banger_tests::nice_values(d.pid()).1, Some(-10));
    }
    drop(d);

    // Out of range: refused, naming the key.
    let d = TestDaemon::builder().config("nice = -21\n").prepare();
    let out = d.run_second_instance(Duration::from_secs(20));
    assert!(!out.status.success(), "nice = -21 was accepted");
    assert!(
        stderr(&out).contains("nice must be between -20 and 19"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn sigterm_is_a_graceful_exit() {
    let mut d = TestDaemon::start();
    ping(&d).await;
    d.sigterm();
    assert_exited_cleanly(&mut d, "SIGTERM");
}

#[tokio::test]
async fn sigint_is_a_graceful_exit() {
    let mut d = TestDaemon::start();
    ping(&d).await;
    d.sigint();
    assert_exited_cleanly(&mut d, "SIGINT");
}

/// Once a daemon answers a handshake it is up: a signal at that moment
/// must already mean a graceful shutdown, not the default (death by signal,
/// socket left behind). Several rounds, as the window is short.
#[tokio::test]
async fn signal_right_after_ready_is_graceful() {
    for round in 0..6 {
        let mut d = TestDaemon::start();
        if round % 2 == 0 {
            d.sigterm();
        } else {
            d.sigint();
        }
        assert_exited_cleanly(
            &mut d,
            &format!("a signal right after ready (round {round})"),
        );
    }
}

#[tokio::test]
async fn shutdown_request_is_a_graceful_exit() {
    let mut d = TestDaemon::start();
    let mut client = d.client().await;
    match client.request(Request::Shutdown).await {
        Ok(Response::ShuttingDown) => {}
        other => panic!("Shutdown answered {other:?}"),
    }
    assert_exited_cleanly(&mut d, "Request::Shutdown");
}

#[tokio::test]
async fn a_second_instance_is_refused() {
    let d = TestDaemon::start();
    let out = d.run_second_instance(EXIT_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(1),
        "second bangerd: {}",
        describe(&out)
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("already running"),
        "second bangerd: {}",
        describe(&out)
    );
    // The first one is undisturbed.
    assert_eq!(d.lock_file_pid(), Some(d.pid()));
    ping(&d).await;
    assert_eq!(status(&d).await.pid, d.pid());
}

#[tokio::test]
async fn stale_socket_after_sigkill_is_recovered() {
    let mut d = TestDaemon::start();
    let socket = d.socket();
    let exit = d.sigkill().expect("bangerd dies on SIGKILL");
    assert_eq!(exit.code(), None, "killed by a signal");
    let meta = fs::symlink_metadata(&socket).expect("a SIGKILLed daemon leaves its socket");
    assert!(meta.file_type().is_socket());

    d.restart();
    ping(&d).await;
    assert_eq!(status(&d).await.pid, d.pid());
}

#[tokio::test]
async fn socket_is_private_by_default() {
    let d = TestDaemon::start();
    let meta = fs::metadata(d.socket()).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
}

#[tokio::test]
async fn socket_group_makes_it_group_accessible() {
    let group = usable_group();
    let d = TestDaemon::builder()
        .config(format!("socket_group = \"{}\"\n", group.name))
        .start();
    let meta = fs::metadata(d.socket()).expect("socket");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "socket mode with socket_group"
    );
    assert_eq!(
        meta.gid(),
        group.gid.as_raw(),
        "socket group (wanted {})",
        group.name
    );
    ping(&d).await;
}

#[tokio::test]
async fn cli_auto_starts_the_daemon_and_says_so() {
    let d = TestDaemon::builder().prepare();
    assert!(!d.socket().exists());

    let out = d.banger(["debug", "actors"]);
    assert!(out.status.success(), "debug actors: {}", describe(&out));
    for name in ["supervisor", "store", "events", "router"] {
        assert!(
            stdout(&out).contains(name),
            "actor {name} listed: {}",
            describe(&out)
        );
    }
    let pid = d
        .lock_file_pid()
        .expect("the auto-started daemon holds the lock");
    assert!(
        d.owns_process(pid),
        "pid {pid} is a bangerd on this test's dirs"
    );
    let err = stderr(&out);
    assert!(
        err.contains("started") && err.contains(&pid.to_string()),
        "the CLI says it started the daemon (pid {pid}): {}",
        describe(&out)
    );

    // A second command reuses it silently.
    let out = d.banger(["debug", "actors"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !stderr(&out).contains("started"),
        "started a second daemon: {}",
        describe(&out)
    );
    assert_eq!(d.lock_file_pid(), Some(pid));

    let out = d.banger(["daemon", "stop"]);
    assert!(out.status.success(), "daemon stop: {}", describe(&out));
    wait::until_blocking(EXIT_TIMEOUT, "the auto-started daemon to exit", || {
        (!d.owns_process(pid)).then_some(())
    });
    assert!(!d.socket().exists(), "the socket is left behind");
}

#[tokio::test]
async fn version_shows_client_and_daemon() {
    let d = TestDaemon::start();
    let out = d.banger(["version"]);
    assert!(out.status.success(), "version: {}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("banger {BANGER_VERSION}")),
        "{}",
        describe(&out)
    );
    assert!(
        text.contains(&format!("bangerd {BANGER_VERSION}")),
        "{}",
        describe(&out)
    );

    let out = d.banger(["version", "--json"]);
    assert!(out.status.success(), "version --json: {}", describe(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("version JSON");
    assert_eq!(json["client"]["version"], BANGER_VERSION);
    assert_eq!(json["daemon"]["version"], BANGER_VERSION);
    assert_eq!(json["daemon"]["protocol_version"], PROTOCOL_VERSION);
    assert_eq!(json["daemon"]["pid"], d.pid());
}

#[tokio::test]
async fn config_show_prints_the_defaults() {
    let d = TestDaemon::start();
    let out = d.banger(["config", "show"]);
    assert!(out.status.success(), "config show: {}", describe(&out));
    let text = stdout(&out);
    for line in [
        "log_level = \"info\"",
        "request_timeout_secs = 30",
        "max_restarts = 5",
        "restart_window_secs = 30",
        "backoff_initial_ms = 100",
        "backoff_max_ms = 5000",
        "grace_secs = 10",
    ] {
        assert!(
            text.contains(line),
            "default `{line}` shown: {}",
            describe(&out)
        );
    }
    assert!(
        text.contains("[supervisor]") && text.contains("[shutdown]"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn config_show_reflects_the_file() {
    let d = TestDaemon::builder()
        .config("request_timeout_secs = 7\n[supervisor]\nmax_restarts = 9\n")
        .start();
    let mut client = d.client().await;
    let dump = match client.request(Request::ConfigShow).await {
        Ok(Response::Config(dump)) => dump,
        other => panic!("ConfigShow answered {other:?}"),
    };
    assert!(dump.file_exists);
    assert_eq!(dump.path, d.paths().config_file().display().to_string());
    assert!(
        dump.toml.contains("request_timeout_secs = 7"),
        "{}",
        dump.toml
    );
    assert!(dump.toml.contains("max_restarts = 9"), "{}", dump.toml);
    assert!(
        dump.toml.contains("grace_secs = 10"),
        "defaults fill the rest: {}",
        dump.toml
    );
}

#[tokio::test]
async fn bad_usage_exits_with_2_and_starts_nothing() {
    let d = TestDaemon::builder().prepare();
    for args in [
        &["debug", "kill-actor"][..],
        &["no-such-command"],
        &["debug", "progress", "--steps", "0"],
    ] {
        let out = d.banger(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "banger {args:?}: {}",
            describe(&out)
        );
        assert!(
            !out.stderr.is_empty(),
            "banger {args:?} explains itself: {}",
            describe(&out)
        );
    }
    assert!(!d.socket().exists(), "a usage error started the daemon");
    assert_eq!(d.lock_file_pid(), None);
}

#[tokio::test]
async fn log_file_holds_json_lines() {
    let d = TestDaemon::start();
    ping(&d).await;
    let records = wait::until(
        Duration::from_secs(10),
        "a JSON line in the log file",
        || {
            let records = d.log_records();
            async move { (!records.is_empty()).then_some(records) }
        },
    )
    .await;
    let contents = d.log_file_contents();
    for line in contents.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            value.get("level").is_some(),
            "log line without a level: {line}"
        );
    }
    assert!(!records.is_empty());
}

/// A SIGTERM while a streaming request runs: the client still gets a final
/// reply for it (Done, or a Cancelled/ShuttingDown error), not a connection
/// closed without an answer; then the daemon exits 0.
#[tokio::test]
async fn sigterm_during_a_request_still_answers_it() {
    let mut d = TestDaemon::start();
    let mut client = d.client().await;
    let id = client
        .send(Request::DebugProgress {
            steps: 10_000,
            interval_ms: 20,
        })
        .await
        .expect("send DebugProgress");
    let first = tokio::time::timeout(Duration::from_secs(10), client.next_message())
        .await
        .expect("a first progress frame")
        .expect("read");
    assert!(
        matches!(first, ServerMessage::Progress { id: pid, .. } if pid == id),
        "{first:?}"
    );

    d.sigterm();
    let final_reply = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match client.next_message().await {
                Ok(ServerMessage::Progress { .. }) => {}
                Ok(ServerMessage::Reply { id: rid, result }) if rid == id => return Ok(result),
                Ok(other) => return Err(format!("unexpected frame {other:?}")),
                Err(e) => return Err(format!("no final reply: {}", error_chain(&e))),
            }
        }
    })
    .await
    .expect("the final reply arrives within the grace period");
    match final_reply {
        Ok(Ok(Response::Done)) => {}
        Ok(Err(e)) if matches!(e.kind, ErrorKind::Cancelled | ErrorKind::ShuttingDown) => {
            assert!(!e.message.is_empty());
        }
        other => panic!("in-flight request after SIGTERM ended with {other:?}"),
    }
    assert_exited_cleanly(&mut d, "SIGTERM with a request in flight");
}
