//! sshd in init mode: when the image has `/usr/sbin/sshd`, generate
//! missing host keys (`ssh-keygen -A`), create `/run/sshd`, and keep
//! `sshd -D -e` running, restarting it with backoff when it exits.
//! (Under systemd, the image's own `ssh.service` does all this.)

use crate::reaper;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const SSHD: &str = "/usr/sbin/sshd";

/// Whether `/etc/ssh` holds at least one private host key.
pub fn has_host_keys(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("ssh_host_") && name.ends_with("_key")
        })
    })
}

/// Runs sshd for as long as the agent lives.
pub async fn supervise() {
    if !Path::new(SSHD).exists() {
        return;
    }
    if let Err(e) = std::fs::create_dir_all("/run/sshd") {
        warn!("cannot create /run/sshd: {e}");
    }
    if !has_host_keys(Path::new("/etc/ssh")) {
        info!("generating ssh host keys");
        match reaper::run(&["ssh-keygen", "-A"], Duration::from_secs(120)).await {
            Ok(out) if out.status.shell_code() == 0 => {}
            Ok(out) => warn!(status = ?out.status, "ssh-keygen -A failed"),
            Err(e) => warn!("cannot run ssh-keygen -A: {e}"),
        }
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e"]).stdin(Stdio::null()).process_group(0);
        match reaper::spawn(&mut cmd) {
            Ok(child) => {
                info!(pid = child.pid, "sshd started");
                let status = child.exit.await;
                warn!(?status, "sshd exited");
            }
            Err(e) => warn!("cannot start sshd: {e}"),
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys_are_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!has_host_keys(dir.path()));
        std::fs::write(dir.path().join("ssh_host_ed25519_key.pub"), "pub").expect("write");
        assert!(!has_host_keys(dir.path()));
        std::fs::write(dir.path().join("ssh_host_ed25519_key"), "key").expect("write");
        assert!(has_host_keys(dir.path()));
    }
}
