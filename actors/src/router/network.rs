//! Request handling for host networking and DNS.

use banger_protocol::{DnsSetupReport, ErrorData, ErrorKind, NetworkStatus, Request, Response};

use super::dispatch::RequestCtx;
use crate::ask::ask;
use crate::names;
use crate::network::dns::{self, DnsMsg};
use crate::network::taps::{self, TapsMsg};

pub async fn handle(request: Request, rctx: &RequestCtx) -> Result<Response, ErrorData> {
    let timeout = rctx.ctx.request_timeout;
    match request {
        Request::NetworkStatus => {
            let taps = ask(names::TAPS, TapsMsg::Status, timeout).await?;
            let dns = ask(names::DNS, DnsMsg::Status, timeout).await?;
            let (table, uplink) = (taps.nat_table.clone(), taps.uplink.clone());
            let nat = tokio::task::spawn_blocking(move || taps::nat_status(&table, uplink))
                .await
                .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?;
            let ip_forward = banger_net::ip_forward_enabled().unwrap_or(false);
            Ok(Response::Network(NetworkStatus {
                bridge: taps.bridge,
                pool: taps.pool,
                nat,
                ip_forward,
                leases: taps.leases,
                dns,
            }))
        }
        Request::NetworkDown => {
            ask(names::TAPS, TapsMsg::Down, timeout).await??;
            Ok(Response::Done)
        }
        Request::LeaseReserve { owner, ip } => ask(
            names::TAPS,
            |reply| TapsMsg::Reserve {
                owner,
                ip,
                with: None,
                reply,
            },
            timeout,
        )
        .await?
        .map(|r| Response::Lease(r.lease)),
        Request::LeaseRelease { owner } => {
            match ask(
                names::TAPS,
                |reply| TapsMsg::Unreserve {
                    owner: owner.clone(),
                    reply,
                },
                timeout,
            )
            .await??
            {
                Some(lease) => Ok(Response::Lease(lease)),
                None => Err(ErrorData::new(
                    ErrorKind::NotFound,
                    format!("`{owner}` holds no lease"),
                )
                .with_hint("see `banger network status`")),
            }
        }
        Request::DnsAdd { name, ip } => {
            let record = dns::record(&name, ip, "static");
            ask(names::DNS, |reply| DnsMsg::Set { record, reply }, timeout).await??;
            Ok(Response::Done)
        }
        Request::DnsRemove { name } => {
            match ask(
                names::DNS,
                |reply| DnsMsg::Remove {
                    name: name.clone(),
                    reply,
                },
                timeout,
            )
            .await??
            {
                Some(_) => Ok(Response::Deleted { name }),
                None => Err(ErrorData::new(
                    ErrorKind::NotFound,
                    format!("no DNS record `{name}.vm`"),
                )),
            }
        }
        Request::TapAcquire { owner } => {
            let acquired = ask(
                names::TAPS,
                |reply| TapsMsg::Acquire { owner, reply },
                timeout,
            )
            .await??;
            Ok(Response::Tap {
                tap: acquired.tap,
                from_pool: acquired.from_pool,
            })
        }
        Request::TapRelease { tap } => {
            ask(
                names::TAPS,
                |reply| TapsMsg::Release { tap, reply },
                timeout,
            )
            .await??;
            Ok(Response::Done)
        }
        Request::DnsSetup => {
            let status = ask(names::DNS, DnsMsg::Status, timeout).await?;
            let listen = status.listen.ok_or_else(|| {
                ErrorData::new(
                    ErrorKind::Unavailable,
                    "banger's DNS server is disabled in the config",
                )
            })?;
            let report = tokio::task::spawn_blocking(move || dns_setup(listen))
                .await
                .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))??;
            Ok(Response::DnsSetup(report))
        }
        other => Err(ErrorData::new(
            ErrorKind::Internal,
            format!("{} is not a network request", other.name()),
        )),
    }
}

/// Where the systemd-resolved drop-in goes.
const RESOLVED_DROPIN: &str = "/etc/systemd/resolved.conf.d/banger.conf";

fn resolved_running() -> bool {
    // The same test `systemd-resolved`'s own tools use: its runtime dir.
    std::path::Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
        || std::path::Path::new("/run/systemd/resolve/resolv.conf").exists()
}

/// Routes `~vm` to banger's listener through systemd-resolved when it runs;
/// otherwise says exactly what to configure.
fn dns_setup(listen: std::net::SocketAddr) -> Result<DnsSetupReport, ErrorData> {
    let dropin = format!("# Written by `banger dns setup`: send *.vm queries to bangerd.\n[Resolve]\nDNS={listen}\nDomains=~vm\n");
    if resolved_running() {
        let dir = std::path::Path::new(RESOLVED_DROPIN)
            .parent()
            .unwrap_or(std::path::Path::new("/"));
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(RESOLVED_DROPIN, &dropin))
            .map_err(|e| {
                ErrorData::from_error(ErrorKind::PermissionDenied, &e)
                    .with_cause(format!("writing {RESOLVED_DROPIN}"))
            })?;
        let out = std::process::Command::new("systemctl")
            .args(["restart", "systemd-resolved"])
            .output();
        let restarted = out.as_ref().is_ok_and(|o| o.status.success());
        let mut lines = vec![format!(
            "wrote {RESOLVED_DROPIN}: *.vm is resolved by bangerd at {listen}"
        )];
        if restarted {
            lines.push("restarted systemd-resolved".into());
        } else {
            lines.push(
                "could not restart systemd-resolved: run `systemctl restart systemd-resolved`"
                    .into(),
            );
        }
        return Ok(DnsSetupReport {
            configured: restarted,
            lines,
        });
    }
    let (ip, port) = (listen.ip(), listen.port());
    Ok(DnsSetupReport {
        configured: false,
        lines: vec![
            "systemd-resolved is not running, so banger did not change the resolver.".into(),
            "/etc/resolv.conf cannot name a port; route .vm to bangerd with a local forwarder, e.g.:".into(),
            format!("  dnsmasq:  add `server=/vm/{ip}#{port}` to /etc/dnsmasq.d/banger.conf and restart dnsmasq"),
            format!("  unbound:  add `forward-zone:` `name: \"vm.\"` `forward-addr: {ip}@{port}` and `domain-insecure: \"vm.\"`"),
            format!("  systemd-resolved (once installed): put this in {RESOLVED_DROPIN}:"),
            format!("    [Resolve]  DNS={listen}  Domains=~vm"),
            format!("Check with: dig @{ip} -p {port} <name>.vm"),
        ],
    })
}
