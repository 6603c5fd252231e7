//! `banger dns setup` on a host that runs systemd-resolved: the drop-in it
//! writes makes the host's own resolver answer `<name>.vm` from bangerd,
//! which is what lets `ssh root@<name>.vm` work from the host.
//!
//! The resolver is the real `systemd-resolved` (Debian's binary, unpacked
//! by `scripts/test-all.sh` rather than installed, because installing it
//! takes over the machine's `/etc/resolv.conf`). It runs with bangerd in a
//! network namespace and a private mount namespace of the test's own:
//! tmpfs over `/etc/systemd` and `/run/systemd`, and an `/etc/resolv.conf`
//! naming resolved's stub, so nothing of the host's resolver is touched.
//! What cannot run here is systemd itself (PID 1): the `systemctl` bangerd
//! calls is a script of the test's that restarts the test's resolved, as
//! `systemctl restart systemd-resolved` would.
//!
//! Needs `dig` and `getent`; `BANGER_TEST_RESOLVED` names the
//! `systemd-resolved` binary (default: where test-all.sh unpacks it, else
//! `/lib/systemd/systemd-resolved`).

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use banger_protocol::{Request, Response};
use banger_tests::TestDaemon;

/// Where `scripts/test-all.sh` unpacks Debian's systemd-resolved.
const UNPACKED_RESOLVED: &str =
    "/var/cache/banger-tests/systemd-resolved/lib/systemd/systemd-resolved";
const DROPIN: &str = "/etc/systemd/resolved.conf.d/banger.conf";
const WEB_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 21);

/// Mounts, a routable link and resolved, then `exec` of bangerd ("$@").
const WRAPPER: &str = r#"#!/bin/bash
set -euo pipefail
T="$(dirname "$0")"
exec unshare --mount --propagation private bash -c '
set -euo pipefail
T="$1"; shift
mount --bind "$T/passwd" /etc/passwd
mount --bind "$T/group" /etc/group
mount -t tmpfs banger-test /etc/systemd
# (Where /run/systemd does not exist, a tmpfs over all of /run holds it,
# so that nothing is created on the host.)
if [ -d /run/systemd ]; then
  mount -t tmpfs banger-test /run/systemd
else
  mount -t tmpfs banger-test /run
  mkdir /run/systemd
fi
mount --bind "$T/resolv.conf" /etc/resolv.conf
# resolved only asks its servers while some link is routable.
ip link add bgt-up0 type veth peer name bgt-up1
ip addr add 192.0.2.1/24 dev bgt-up0
ip link set bgt-up0 up
ip link set bgt-up1 up
ip route add default via 192.0.2.2
"$T/bin/systemctl" start systemd-resolved
export PATH="$T/bin:$PATH"
exec "$@"' wrapper "$T" "$@"
"#;

/// `systemctl start|restart systemd-resolved` for the test's resolved.
const SYSTEMCTL: &str = r#"#!/bin/bash
set -euo pipefail
T="$(cd "$(dirname "$0")/.." && pwd)"
[ "${2:-}" = systemd-resolved ] || { echo "systemctl (test): unsupported: $*" >&2; exit 1; }
case "$1" in
  start|restart) ;;
  *) echo "systemctl (test): unsupported: $*" >&2; exit 1 ;;
esac
if [ -s "$T/resolved.pid" ]; then
  pid=$(cat "$T/resolved.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
fi
rm -f /run/systemd/resolve/io.systemd.Resolve
SYSTEMD_LOG_LEVEL=info setsid "$(cat "$T/resolved-bin")" >>"$T/resolved.log" 2>&1 </dev/null &
echo $! > "$T/resolved.pid"
for _ in $(seq 200); do
  [ -S /run/systemd/resolve/io.systemd.Resolve ] && exit 0
  sleep 0.05
done
echo "systemd-resolved did not start: see $T/resolved.log" >&2
exit 1
"#;

fn resolved_binary() -> PathBuf {
    let path = std::env::var_os("BANGER_TEST_RESOLVED")
        .map(PathBuf::from)
        .or_else(|| {
            [UNPACKED_RESOLVED, "/lib/systemd/systemd-resolved"]
                .map(PathBuf::from)
                .into_iter()
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(UNPACKED_RESOLVED));
    assert!(
        path.is_file(),
        "systemd-resolved not found at {}: run scripts/test-all.sh, which unpacks it, \
         or set BANGER_TEST_RESOLVED",
        path.display()
    );
    path
}

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// The test's files: the wrapper, `bin/systemctl` (and the path of the
/// resolved it starts), the passwd and group files resolved needs its user
/// in, and the namespace's resolv.conf.
fn prepare(dir: &Path, resolved: &Path) -> PathBuf {
    fs::write(
        dir.join("resolved-bin"),
        resolved.as_os_str().as_encoded_bytes(),
    )
    .expect("write resolved-bin");
    fs::create_dir_all(dir.join("bin")).expect("mkdir bin");
    let wrapper = dir.join("start-bangerd");
    write_exec(&wrapper, WRAPPER);
    write_exec(&dir.join("bin/systemctl"), SYSTEMCTL);
    let mut passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let mut group = fs::read_to_string("/etc/group").expect("read /etc/group");
    if !passwd.contains("\nsystemd-resolve:") {
        passwd.push_str("systemd-resolve:x:991:991::/run/systemd/resolve:/usr/sbin/nologin\n");
        group.push_str("systemd-resolve:x:991:\n");
    }
    fs::write(dir.join("passwd"), passwd).expect("write passwd");
    fs::write(dir.join("group"), group).expect("write group");
    fs::write(
        dir.join("resolv.conf"),
        "nameserver 127.0.0.53\noptions edns0\n",
    )
    .expect("write resolv.conf");
    wrapper
}

/// Kills the test's resolved when the test ends, however it ends.
struct ResolvedGuard(PathBuf);

impl Drop for ResolvedGuard {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(self.0.join("resolved.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Runs `args` in the daemon's network and mount namespaces.
fn in_daemon_ns(d: &TestDaemon, args: &[&str]) -> Output {
    let pid = d
        .lock_file_pid()
        .expect("the daemon wrote its pid to its lock file")
        .to_string();
    Command::new("nsenter")
        .args(["--target", &pid, "--mount", "--net", "--"])
        .args(args)
        .output()
        .expect("run nsenter")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stub_dig(d: &TestDaemon, name: &str) -> Output {
    in_daemon_ns(d, &["dig", "+time=3", "+tries=2", "@127.0.0.53", name, "A"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_setup_routes_vm_names_through_systemd_resolved() {
    let resolved = resolved_binary();
    let files = tempfile::Builder::new()
        .prefix("banger-resolved-")
        .tempdir()
        .expect("temp dir");
    let wrapper = prepare(files.path(), &resolved);
    let _guard = ResolvedGuard(files.path().to_path_buf());
    let d = TestDaemon::builder()
        .netns()
        .config("[network]\nenabled = false\n")
        .wrapper(&wrapper)
        .start();
    let log = || fs::read_to_string(files.path().join("resolved.log")).unwrap_or_default();
    let mut client = d.client().await;

    // The daemon sees resolved (its varlink socket) in its namespace only.
    assert!(
        !Path::new(DROPIN).exists(),
        "the host has a {DROPIN} of its own: this test would not show anything"
    );
    match client
        .request(Request::DnsAdd {
            name: "web".into(),
            ip: WEB_IP,
        })
        .await
    {
        Ok(Response::Done) => {}
        other => panic!("DnsAdd answered {other:?}"),
    }

    // Before the setup the host's resolver knows nothing of `.vm`.
    let before = stub_dig(&d, "web.vm");
    let before_text = text(&before);
    assert!(
        !String::from_utf8_lossy(&before.stdout).contains(&WEB_IP.to_string()),
        "resolved answered web.vm before the setup: {before_text}"
    );

    let out = d.banger(["dns", "setup"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}\nresolved log:\n{}", log());
    assert!(said.contains(&format!("wrote {DROPIN}")), "{said}");
    assert!(said.contains("restarted systemd-resolved"), "{said}");

    // The drop-in is in the daemon's mount namespace, not on the host.
    let listen = match client.request(Request::NetworkStatus).await {
        Ok(Response::Network(s)) => s.dns.listen.expect("DNS is on"),
        other => panic!("NetworkStatus answered {other:?}"),
    };
    let dropin = in_daemon_ns(&d, &["cat", DROPIN]);
    let dropin_text = String::from_utf8_lossy(&dropin.stdout).to_string();
    assert!(dropin.status.success(), "{}", text(&dropin));
    assert!(
        dropin_text.contains(&format!("DNS={listen}")),
        "{dropin_text}"
    );
    assert!(dropin_text.contains("Domains=~vm"), "{dropin_text}");
    assert!(
        !Path::new(DROPIN).exists(),
        "the host's {DROPIN} was written"
    );

    // Now the host resolver answers: its stub, any case, and through
    // glibc (what `ssh root@web.vm` uses).
    for name in ["web.vm", "WeB.Vm"] {
        let out = stub_dig(&d, name);
        let answer = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            answer.contains("status: NOERROR") && answer.contains(&WEB_IP.to_string()),
            "{name} through systemd-resolved: {}\nresolved log:\n{}",
            text(&out),
            log()
        );
    }
    let getent = in_daemon_ns(&d, &["getent", "ahostsv4", "web.vm"]);
    assert!(
        getent.status.success()
            && String::from_utf8_lossy(&getent.stdout).contains(&WEB_IP.to_string()),
        "getent ahostsv4 web.vm: {}",
        text(&getent)
    );
    let missing = stub_dig(&d, "nothere.vm");
    assert!(
        String::from_utf8_lossy(&missing.stdout).contains("status: NXDOMAIN"),
        "an unknown name: {}",
        text(&missing)
    );

    // A record removed from banger is gone from the host resolver too
    // (after the record's short TTL; resolved caches negative answers for
    // at most that long as well).
    match client
        .request(Request::DnsRemove { name: "web".into() })
        .await
    {
        Ok(Response::Deleted { name }) => assert_eq!(name, "web"),
        other => panic!("DnsRemove answered {other:?}"),
    }
    banger_tests::wait::until_blocking(
        Duration::from_secs(20),
        "web.vm to be gone from systemd-resolved after DnsRemove",
        || {
            let out = stub_dig(&d, "web.vm");
            String::from_utf8_lossy(&out.stdout)
                .contains("status: NXDOMAIN")
                .then_some(())
        },
    );
}
