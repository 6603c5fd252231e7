//! Init mode's network setup, over rtnetlink: `lo` up; the NIC whose MAC
//! is `banger.mac=` (never a guessed name: the kernel may rename it) up
//! with `banger.ip=`; the default route via `banger.gw=`; and
//! `/etc/resolv.conf` from `banger.dns=`.
//!
//! `virtio_net` probes asynchronously after its module is loaded, so the
//! NIC is waited for.

use crate::cmdline::{format_mac, BootConfig};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("cannot open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("netlink: {op}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no network interface with MAC {mac} appeared within {waited:?}")]
    NoSuchMac { mac: String, waited: Duration },
    #[error("no network interface besides lo appeared within {0:?}")]
    NoInterface(Duration),
}

fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetconfError {
    move |source| NetconfError::Netlink { op, source }
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A link as far as this module cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Vec<u8>>,
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = Some(a.clone()),
            _ => {}
        }
    }
    link
}

/// What [`configure`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Configured {
    /// The configured interface, if any was asked for.
    pub interface: Option<String>,
}

/// Brings up `lo` and the NIC of `cfg`, waiting up to `wait` for the NIC.
pub async fn configure(cfg: &BootConfig, wait: Duration) -> Result<Configured, NetconfError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetconfError::Connect)?;
    let driver = tokio::spawn(connection);
    let result = configure_with(&handle, cfg, wait).await;
    driver.abort();
    result
}

async fn links(handle: &rtnetlink::Handle) -> Result<Vec<Link>, NetconfError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))?;
    Ok(msgs.iter().map(link_of).collect())
}

async fn set_up(handle: &rtnetlink::Handle, index: u32) -> Result<(), NetconfError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("set link up"))
}

async fn configure_with(
    handle: &rtnetlink::Handle,
    cfg: &BootConfig,
    wait: Duration,
) -> Result<Configured, NetconfError> {
    if let Some(lo) = links(handle).await?.into_iter().find(|l| l.name == "lo") {
        set_up(handle, lo.index).await?;
    }
    if cfg.mac.is_none() && cfg.ip.is_none() {
        return Ok(Configured::default());
    }
    let deadline = Instant::now() + wait;
    let nic = loop {
        let all = links(handle).await?;
        let found = match cfg.mac {
            Some(mac) => all.into_iter().find(|l| l.mac.as_deref() == Some(&mac[..])),
            // No MAC given: the first real interface.
            None => all
                .into_iter()
                .filter(|l| l.name != "lo" && l.mac.as_ref().is_some_and(|m| m.len() == 6))
                .min_by_key(|l| l.index),
        };
        if let Some(l) = found {
            break l;
        }
        if Instant::now() >= deadline {
            return Err(match cfg.mac {
                Some(mac) => NetconfError::NoSuchMac {
                    mac: format_mac(&mac),
                    waited: wait,
                },
                None => NetconfError::NoInterface(wait),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    set_up(handle, nic.index).await?;
    if let Some((ip, prefix)) = cfg.ip {
        handle
            .address()
            .add(nic.index, IpAddr::V4(ip), prefix)
            .replace()
            .execute()
            .await
            .map_err(nl("add address"))?;
    }
    if let Some(gw) = cfg.gateway {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(nic.index)
            .build();
        match handle.route().add(route).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(nl("add default route")(e)),
        }
    }
    Ok(Configured {
        interface: Some(nic.name),
    })
}

/// The text of `/etc/resolv.conf` for `servers`.
pub fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut text = String::from("# written by banger-agent from banger.dns=\n");
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    text
}

/// Writes `resolv.conf` at `path`, replacing a symlink there (e.g. to
/// systemd-resolved's stub, which nothing serves in init mode).
pub fn write_resolv_conf(path: &Path, servers: &[Ipv4Addr]) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, resolv_conf(servers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink("/nonexistent/stub-resolv.conf", &path).expect("symlink");
        write_resolv_conf(
            &path,
            &[Ipv4Addr::new(172, 30, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
        )
        .expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains("nameserver 172.30.0.1\nnameserver 9.9.9.9\n"),
            "{text}"
        );
        assert!(!std::fs::symlink_metadata(&path)
            .expect("meta")
            .file_type()
            .is_symlink());
    }

    /// Runs `f` on a thread of its own in a fresh network namespace (only
    /// that thread moves), so nothing on the host changes.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare on the calling thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .expect("netns thread")
    }

    #[test]
    fn configures_the_nic_with_the_right_mac_in_a_namespace() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let result = in_new_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
                tokio::spawn(conn);
                // A veth pair (dummy is not in every kernel); only `nic0`
                // carries the MAC banger asked for.
                handle
                    .link()
                    .add(rtnetlink::LinkVeth::new("decoy0", "nic0").build())
                    .execute()
                    .await
                    .expect("add veth pair");
                for (name, mac) in [("decoy0", [2, 0, 0, 0, 0, 1]), ("nic0", [2, 0, 0, 0, 0, 2])] {
                    handle
                        .link()
                        .set(
                            LinkUnspec::new_with_name(name)
                                .address(mac.to_vec())
                                .build(),
                        )
                        .execute()
                        .await
                        .expect("set MAC");
                }
                let cfg = BootConfig::from_cmdline(
                    "banger.mac=02:00:00:00:00:02 banger.ip=10.99.0.5/24 banger.gw=10.99.0.1",
                );
                let done = configure(&cfg, Duration::from_secs(2))
                    .await
                    .expect("configure");
                assert_eq!(done.interface.as_deref(), Some("nic0"));
                // Idempotent: a second run succeeds too.
                configure(&cfg, Duration::from_secs(2))
                    .await
                    .expect("configure again");

                let missing = BootConfig::from_cmdline("banger.mac=02:00:00:00:00:09");
                let err = configure(&missing, Duration::from_millis(200))
                    .await
                    .expect_err("no such MAC");
                assert!(err.to_string().contains("02:00:00:00:00:09"), "{err}");

                let addrs = crate::health::ipv4_addresses();
                let routes =
                    std::fs::read_to_string("/proc/thread-self/net/route").expect("routes");
                (addrs, routes)
            })
        });
        let Some((addrs, routes)) = result else {
            return;
        };
        assert_eq!(addrs, vec!["nic0 10.99.0.5/24".to_string()]);
        // Default route (destination 0) via 10.99.0.1 (0100630A) on nic0.
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("nic0\t00000000\t0100630A")),
            "{routes}"
        );
    }
}
