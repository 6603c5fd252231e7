//! The VM's identity in the guest's files, from banger's keys on the
//! kernel command line ([`BootConfig`]):
//!
//! - `/etc/hostname` holds the VM's name, and `/etc/hosts` maps it to
//!   `127.0.1.1` (Debian's convention), so the name resolves locally;
//! - `/etc/resolv.conf` lists the resolvers banger passed, unless it is a
//!   symlink (systemd-resolved or resolvconf own it then).
//!
//! An image's files carry the image's name and, for a built image, the
//! build host's resolver (mmdebstrap copies `/etc/resolv.conf` in). Under
//! systemd, `systemd.hostname=` sets the running hostname and networkd
//! configures the NIC, but nothing rewrites these files; in init mode the
//! agent does the rest itself. Every write is best effort: a failure is a
//! warning, never a failed boot.

use crate::cmdline::BootConfig;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use tracing::{info, warn};

/// The `/etc/hosts` address Debian gives the machine's own name.
pub const SELF_ADDRESS: &str = "127.0.1.1";

/// Applies the hostname and (when `resolvers` is set) the resolvers of
/// `cfg` to the files under `etc` (`/etc` in the guest).
pub fn apply(cfg: &BootConfig, etc: &Path, resolvers: bool) {
    if let Some(name) = &cfg.hostname {
        match write_hostname(etc, name) {
            Ok(true) => info!(hostname = %name, "/etc/hostname and /etc/hosts updated"),
            Ok(false) => {}
            Err(e) => warn!(hostname = %name, "cannot write /etc/hostname or /etc/hosts: {e}"),
        }
    }
    if resolvers && !cfg.dns.is_empty() {
        match write_resolvers(&etc.join("resolv.conf"), &cfg.dns) {
            Ok(true) => info!(servers = ?cfg.dns, "/etc/resolv.conf written"),
            Ok(false) => {}
            Err(e) => warn!("cannot write /etc/resolv.conf: {e}"),
        }
    }
}

/// Makes `<etc>/hostname` say `name` and `<etc>/hosts` map it; returns
/// whether anything changed.
pub fn write_hostname(etc: &Path, name: &str) -> io::Result<bool> {
    let mut changed = replace_if_different(&etc.join("hostname"), &format!("{name}\n"))?;
    let hosts_path = etc.join("hosts");
    let hosts = match std::fs::read_to_string(&hosts_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    changed |= replace_if_different(&hosts_path, &hosts_with(&hosts, name))?;
    Ok(changed)
}

/// `hosts` with its `127.0.1.1` line naming only `name` (added after the
/// `127.0.0.1` line when missing); a sane default when `hosts` is empty.
pub fn hosts_with(hosts: &str, name: &str) -> String {
    let own = format!("{SELF_ADDRESS}\t{name}");
    if hosts.trim().is_empty() {
        return format!(
            "127.0.0.1\tlocalhost\n{own}\n\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        );
    }
    let mut out = Vec::new();
    let mut placed = false;
    for line in hosts.lines() {
        if line.split_whitespace().next() == Some(SELF_ADDRESS) {
            if !placed {
                out.push(own.clone());
                placed = true;
            }
            continue;
        }
        out.push(line.to_string());
        if !placed && line.split_whitespace().next() == Some("127.0.0.1") {
            out.push(own.clone());
            placed = true;
        }
    }
    if !placed {
        out.insert(0, own);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// Writes `servers` to `path` unless it is a symlink (a resolver daemon
/// owns it); returns whether the file changed.
pub fn write_resolvers(path: &Path, servers: &[Ipv4Addr]) -> io::Result<bool> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Ok(false);
    }
    replace_if_different(path, &crate::netconf::resolv_conf(servers))
}

/// Replaces `path` with `contents` (a new file renamed over it, so a
/// crash leaves the old or the new file, and a symlink there is replaced,
/// not followed) unless it already holds exactly that.
fn replace_if_different(path: &Path, contents: &str) -> io::Result<bool> {
    let is_file = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    if is_file && std::fs::read(path).is_ok_and(|c| c == contents.as_bytes()) {
        return Ok(false);
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.banger-agent"));
    let write = || -> io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    let res = write();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_gets_one_line_for_the_name() {
        let debian =
            "127.0.0.1\tlocalhost\n127.0.1.1\tdebian-bookworm\n\n::1 localhost ip6-localhost\n";
        assert_eq!(
            hosts_with(debian, "gold"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tgold\n\n::1 localhost ip6-localhost\n"
        );
        assert_eq!(
            hosts_with("127.0.0.1 localhost\n::1 localhost\n", "gold"),
            "127.0.0.1 localhost\n127.0.1.1\tgold\n::1 localhost\n"
        );
        assert_eq!(
            hosts_with("10.0.0.1 other\n", "gold"),
            "127.0.1.1\tgold\n10.0.0.1 other\n"
        );
        // Two old lines become one.
        assert_eq!(
            hosts_with("127.0.1.1 a\n127.0.0.1 localhost\n127.0.1.1 b\n", "gold"),
            "127.0.1.1\tgold\n127.0.0.1 localhost\n"
        );
        let fresh = hosts_with("", "gold");
        assert!(
            fresh.starts_with("127.0.0.1\tlocalhost\n127.0.1.1\tgold\n"),
            "{fresh}"
        );
        // Idempotent.
        assert_eq!(
            hosts_with(&hosts_with(debian, "gold"), "gold"),
            hosts_with(debian, "gold")
        );
    }

    #[test]
    fn files_are_written_once_and_symlinks_replaced_or_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "keep\n").expect("write");
        std::os::unix::fs::symlink(&outside, etc.join("hostname")).expect("symlink");
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n127.0.1.1 img\n").expect("hosts");
        assert!(write_hostname(etc, "gold").expect("write"));
        assert_eq!(
            std::fs::read_to_string(etc.join("hostname")).expect("read"),
            "gold\n"
        );
        assert_eq!(std::fs::read_to_string(&outside).expect("read"), "keep\n");
        assert!(std::fs::read_to_string(etc.join("hosts"))
            .expect("read")
            .contains("127.0.1.1\tgold\n"));
        assert!(
            !write_hostname(etc, "gold").expect("again"),
            "nothing to change"
        );

        let servers = [Ipv4Addr::new(192, 0, 2, 53)];
        let resolv = etc.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 10.255.255.53\n").expect("resolv");
        assert!(write_resolvers(&resolv, &servers).expect("write"));
        assert!(std::fs::read_to_string(&resolv)
            .expect("read")
            .contains("nameserver 192.0.2.53\n"));
        assert!(!write_resolvers(&resolv, &servers).expect("again"));
        // A resolver daemon's symlink is left alone.
        std::fs::remove_file(&resolv).expect("rm");
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)
            .expect("symlink");
        assert!(!write_resolvers(&resolv, &servers).expect("symlink"));
        assert!(std::fs::symlink_metadata(&resolv)
            .expect("meta")
            .file_type()
            .is_symlink());
        let leftovers: Vec<_> = std::fs::read_dir(etc)
            .expect("read_dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".banger-agent"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
