//! `banger network status|down|lease`: what bangerd set up on the host
//! network (bridge, TAP pool, NAT, IP forwarding), guest address leases,
//! and removing it all. Every view is built from one `NetworkStatus`; the
//! DNS part is rendered by [`crate::dns_cmd`].

use banger_protocol::client::Client;
use banger_protocol::{Lease, NetworkStatus, Request, Response};
use serde::Serialize;

use crate::args::{JsonFlag, LeaseAddArgs, LeaseCommand, NetworkCommand, OwnerArgs};
use crate::connect;
use crate::dns_cmd::{self, DnsJson};
use crate::error::{CliError, Exit};
use crate::image_cmd::{ago, now_unix_ms, query, yes_no};
use crate::outln;
use crate::output::{print_json, Table};

pub async fn run(command: NetworkCommand) -> Result<Exit, CliError> {
    match command {
        NetworkCommand::Status(flags) => status(flags).await,
        NetworkCommand::Down => down().await,
        NetworkCommand::Lease(LeaseCommand::Add(args)) => lease_add(args).await,
        NetworkCommand::Lease(LeaseCommand::Rm(args)) => lease_rm(args).await,
        NetworkCommand::Lease(LeaseCommand::List(flags)) => lease_list(flags).await,
    }
}

/// Asks the daemon for the whole network state (starting it if needed).
pub(crate) async fn fetch_status() -> Result<NetworkStatus, CliError> {
    match query(Request::NetworkStatus).await? {
        Response::Network(status) => Ok(status),
        other => Err(connect::unexpected("network_status", &other)),
    }
}

/// The JSON shape of `network status` (banger's own, stable).
#[derive(Serialize, Debug, PartialEq)]
struct NetworkJson<'a> {
    bridge: BridgeJson<'a>,
    pool: PoolJson<'a>,
    nat: NatJson<'a>,
    ip_forward: bool,
    leases: Vec<LeaseJson<'a>>,
    dns: DnsJson<'a>,
}

#[derive(Serialize, Debug, PartialEq)]
struct BridgeJson<'a> {
    name: &'a str,
    exists: bool,
    up: bool,
    address: Option<&'a str>,
    subnet: &'a str,
}

#[derive(Serialize, Debug, PartialEq)]
struct PoolJson<'a> {
    target: u32,
    warm: &'a [String],
    in_use: Vec<TapUseJson<'a>>,
}

#[derive(Serialize, Debug, PartialEq)]
struct TapUseJson<'a> {
    tap: &'a str,
    owner: &'a str,
}

#[derive(Serialize, Debug, PartialEq)]
struct NatJson<'a> {
    /// The nftables table, always of family `ip`.
    table: &'a str,
    present: bool,
    /// `null`: masquerading out of any interface but the bridge.
    uplink: Option<&'a str>,
    rules: &'a [String],
}

/// The JSON shape of a lease.
#[derive(Serialize, Debug, PartialEq)]
struct LeaseJson<'a> {
    ip: String,
    owner: &'a str,
    /// Asked for with `--ip` rather than allocated.
    #[serde(rename = "static")]
    static_ip: bool,
    created_unix_ms: u64,
}

impl<'a> From<&'a Lease> for LeaseJson<'a> {
    fn from(l: &'a Lease) -> Self {
        Self {
            ip: l.ip.to_string(),
            owner: &l.owner,
            static_ip: l.static_ip,
            created_unix_ms: l.created_unix_ms,
        }
    }
}

impl<'a> From<&'a NetworkStatus> for NetworkJson<'a> {
    fn from(s: &'a NetworkStatus) -> Self {
        Self {
            bridge: BridgeJson {
                name: &s.bridge.name,
                exists: s.bridge.exists,
                up: s.bridge.up,
                address: s.bridge.address.as_deref(),
                subnet: &s.bridge.subnet,
            },
            pool: PoolJson {
                target: s.pool.target,
                warm: &s.pool.warm,
                in_use: s
                    .pool
                    .in_use
                    .iter()
                    .map(|t| TapUseJson {
                        tap: &t.tap,
                        owner: &t.owner,
                    })
                    .collect(),
            },
            nat: NatJson {
                table: &s.nat.table,
                present: s.nat.present,
                uplink: s.nat.uplink.as_deref(),
                rules: &s.nat.rules,
            },
            ip_forward: s.ip_forward,
            leases: sorted(&s.leases).into_iter().map(LeaseJson::from).collect(),
            dns: DnsJson::from(&s.dns),
        }
    }
}

fn sorted(leases: &[Lease]) -> Vec<&Lease> {
    let mut leases: Vec<&Lease> = leases.iter().collect();
    leases.sort_by_key(|l| l.ip);
    leases
}

async fn status(flags: JsonFlag) -> Result<Exit, CliError> {
    let status = fetch_status().await?;
    if flags.json {
        print_json(&NetworkJson::from(&status))?;
    } else {
        outln!("{}", status_text(&status, now_unix_ms()).trim_end())?;
    }
    Ok(Exit::Ok)
}

/// `key:` padded so values line up, then the value.
fn field(text: &mut String, key: &str, value: &str) {
    let line = format!("{:<12}{value}", format!("{key}:"));
    text.push_str(line.trim_end());
    text.push('\n');
}

/// A table's lines, indented under a heading.
fn indented(text: &mut String, table: &Table) {
    for line in table.render().lines() {
        text.push_str(&format!("  {line}\n"));
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// The human form of `network status`.
fn status_text(s: &NetworkStatus, now_ms: u64) -> String {
    let mut text = String::new();
    let b = &s.bridge;
    let state = match (b.exists, b.up) {
        (false, _) => "absent",
        (true, true) => "up",
        (true, false) => "down",
    };
    field(&mut text, "bridge", &format!("{}, {state}", b.name));
    field(&mut text, "  address", b.address.as_deref().unwrap_or("-"));
    field(&mut text, "  subnet", &b.subnet);

    let p = &s.pool;
    field(
        &mut text,
        "pool",
        &format!(
            "{} warm TAPs wanted, {} ready, {} in use",
            p.target,
            p.warm.len(),
            p.in_use.len()
        ),
    );
    field(&mut text, "  warm", &list_or_dash(&p.warm));
    let in_use: Vec<String> = p
        .in_use
        .iter()
        .map(|t| format!("{} ({})", t.tap, t.owner))
        .collect();
    field(&mut text, "  in use", &list_or_dash(&in_use));

    let n = &s.nat;
    let presence = if n.present { "present" } else { "absent" };
    field(
        &mut text,
        "NAT",
        &format!("table ip {}, {presence}", n.table),
    );
    let uplink = match &n.uplink {
        Some(uplink) => uplink.clone(),
        None => format!("any interface but {}", b.name),
    };
    field(&mut text, "  uplink", &uplink);
    if n.rules.is_empty() {
        field(&mut text, "  rules", "none");
    } else {
        field(&mut text, "  rules", "");
        for rule in &n.rules {
            text.push_str(&format!("    {rule}\n"));
        }
    }
    field(
        &mut text,
        "ip_forward",
        if s.ip_forward { "on" } else { "off" },
    );

    field(&mut text, "leases", &s.leases.len().to_string());
    if !s.leases.is_empty() {
        indented(&mut text, &leases_table(&s.leases, now_ms));
    }

    field(&mut text, "DNS", &dns_cmd::listen_text(&s.dns));
    if !s.dns.records.is_empty() {
        indented(&mut text, &dns_cmd::records_table(&s.dns));
    }
    text
}

/// `IP OWNER STATIC SINCE`, by address.
fn leases_table(leases: &[Lease], now_ms: u64) -> Table {
    let mut table = Table::new(&["IP", "OWNER", "STATIC", "SINCE"]);
    for l in sorted(leases) {
        table.row(vec![
            l.ip.to_string(),
            l.owner.clone(),
            yes_no(l.static_ip),
            ago(now_ms, l.created_unix_ms),
        ]);
    }
    table
}

async fn down() -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    // The summary compares the state before and after: the daemon answers
    // `Done` and nothing more, and when host networking is disabled in its
    // config it removes nothing.
    let before = status_of(&mut client).await;
    match connect::request(&mut client, Request::NetworkDown).await? {
        Response::Done => {}
        other => return Err(connect::unexpected("network_down", &other)),
    }
    let after = status_of(&mut client).await;
    outln!("{}", down_text(before.as_ref(), after.as_ref()).trim_end())?;
    Ok(Exit::Ok)
}

/// The network status, or `None` when it cannot be had (the summary of
/// `down` is then generic).
async fn status_of(client: &mut Client) -> Option<NetworkStatus> {
    match connect::request(client, Request::NetworkStatus).await {
        Ok(Response::Network(status)) => Some(status),
        _ => None,
    }
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// What `network down` removed and what is still there.
fn down_text(before: Option<&NetworkStatus>, after: Option<&NetworkStatus>) -> String {
    let (Some(b), Some(a)) = (before, after) else {
        return "bangerd removed its bridge, TAPs and nft table\n".into();
    };
    let mut text = String::new();
    if b.bridge.exists && !a.bridge.exists {
        text.push_str(&format!("removed bridge {}\n", b.bridge.name));
    }
    let gone: Vec<&str> = b
        .pool
        .warm
        .iter()
        .filter(|t| !a.pool.warm.contains(t))
        .map(String::as_str)
        .collect();
    if !gone.is_empty() {
        text.push_str(&format!(
            "removed {}: {}\n",
            plural(gone.len(), "TAP"),
            gone.join(", ")
        ));
    }
    if b.nat.present && !a.nat.present {
        text.push_str(&format!("removed nft table ip {}\n", b.nat.table));
    }
    let removed = !text.is_empty();
    let mut left = Vec::new();
    if a.bridge.exists {
        left.push(format!("bridge {}", a.bridge.name));
    }
    if !a.pool.warm.is_empty() {
        left.push(format!("TAPs {}", a.pool.warm.join(", ")));
    }
    if a.nat.present {
        left.push(format!("nft table ip {}", a.nat.table));
    }
    if !left.is_empty() {
        text.push_str(&format!(
            "still there: {} (is [network] enabled = false in the daemon's config?)\n",
            left.join("; ")
        ));
    } else if !removed {
        text.push_str("nothing to remove: banger's bridge, TAPs and nft table were not there\n");
    }
    text.push_str(&format!(
        "kept: {}, {}, net.ipv4.ip_forward as it is\n",
        plural(a.leases.len(), "lease"),
        plural(a.dns.records.len(), "DNS record"),
    ));
    if removed {
        text.push_str("bangerd sets the network up again when it next starts\n");
    }
    text
}

async fn lease_add(args: LeaseAddArgs) -> Result<Exit, CliError> {
    let request = Request::LeaseReserve {
        owner: args.owner,
        ip: args.ip,
    };
    let lease = match query(request).await? {
        Response::Lease(lease) => lease,
        other => return Err(connect::unexpected("lease_reserve", &other)),
    };
    if args.json {
        print_json(&LeaseJson::from(&lease))?;
    } else {
        outln!("{}", leased_line(&lease))?;
    }
    Ok(Exit::Ok)
}

fn leased_line(l: &Lease) -> String {
    let how = if l.static_ip { " (static)" } else { "" };
    format!("leased {} to {}{how}", l.ip, l.owner)
}

async fn lease_rm(args: OwnerArgs) -> Result<Exit, CliError> {
    match query(Request::LeaseRelease { owner: args.owner }).await? {
        Response::Lease(lease) => {
            outln!("released {} (held by {})", lease.ip, lease.owner)?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("lease_release", &other)),
    }
}

async fn lease_list(flags: JsonFlag) -> Result<Exit, CliError> {
    let leases = fetch_status().await?.leases;
    if flags.json {
        print_json(
            &sorted(&leases)
                .into_iter()
                .map(LeaseJson::from)
                .collect::<Vec<_>>(),
        )?;
    } else {
        leases_table(&leases, now_unix_ms()).print()?;
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::{BridgeStatus, DnsRecord, DnsStatus, NatStatus, PoolStatus, TapLease};
    use serde_json::json;
    use std::net::Ipv4Addr;

    const NOW: u64 = 1_714_565_045_007;

    fn lease(last: u8, owner: &str, static_ip: bool, age_ms: u64) -> Lease {
        Lease {
            ip: Ipv4Addr::new(172, 30, 0, last),
            owner: owner.into(),
            static_ip,
            created_unix_ms: NOW - age_ms,
        }
    }

    fn status() -> NetworkStatus {
        NetworkStatus {
            bridge: BridgeStatus {
                name: "banger0".into(),
                exists: true,
                up: true,
                address: Some("172.30.0.1/24".into()),
                subnet: "172.30.0.0/24".into(),
            },
            pool: PoolStatus {
                target: 4,
                warm: vec!["bgtap1".into(), "bgtap2".into()],
                in_use: vec![TapLease {
                    tap: "bgtap0".into(),
                    owner: "web".into(),
                }],
            },
            nat: NatStatus {
                table: "banger".into(),
                present: true,
                uplink: None,
                rules: vec!["postrouting: masquerade".into(), "forward: accept".into()],
            },
            ip_forward: true,
            // Out of order on purpose: output is sorted by address.
            leases: vec![
                lease(10, "db", true, 192_000),
                lease(2, "web", false, 5_000),
            ],
            dns: DnsStatus {
                listen: Some("127.0.0.1:42069".parse().expect("addr")),
                zone: "vm.".into(),
                records: vec![DnsRecord {
                    name: "web".into(),
                    ip: Ipv4Addr::new(172, 30, 0, 2),
                    source: "vm".into(),
                }],
            },
        }
    }

    fn bare() -> NetworkStatus {
        let mut s = status();
        s.bridge.exists = false;
        s.bridge.up = false;
        s.pool.warm.clear();
        s.pool.in_use.clear();
        s.nat.present = false;
        s.nat.rules.clear();
        s.ip_forward = false;
        s.leases.clear();
        s.dns.records.clear();
        s.dns.listen = None;
        s
    }

    #[test]
    fn status_text_has_every_section() {
        assert_eq!(
            status_text(&status(), NOW),
            "bridge:     banger0, up\n\
             \x20 address:  172.30.0.1/24\n\
             \x20 subnet:   172.30.0.0/24\n\
             pool:       4 warm TAPs wanted, 2 ready, 1 in use\n\
             \x20 warm:     bgtap1, bgtap2\n\
             \x20 in use:   bgtap0 (web)\n\
             NAT:        table ip banger, present\n\
             \x20 uplink:   any interface but banger0\n\
             \x20 rules:\n\
             \x20   postrouting: masquerade\n\
             \x20   forward: accept\n\
             ip_forward: on\n\
             leases:     2\n\
             \x20 IP           OWNER  STATIC  SINCE\n\
             \x20 172.30.0.2   web    no      5s ago\n\
             \x20 172.30.0.10  db     yes     3m12s ago\n\
             DNS:        127.0.0.1:42069 (zone vm.)\n\
             \x20 NAME    IP          SOURCE\n\
             \x20 web.vm  172.30.0.2  vm\n"
        );
    }

    #[test]
    fn status_text_when_nothing_is_set_up() {
        let mut s = bare();
        s.nat.uplink = Some("eth0".into());
        assert_eq!(
            status_text(&s, NOW),
            "bridge:     banger0, absent\n\
             \x20 address:  172.30.0.1/24\n\
             \x20 subnet:   172.30.0.0/24\n\
             pool:       4 warm TAPs wanted, 0 ready, 0 in use\n\
             \x20 warm:     -\n\
             \x20 in use:   -\n\
             NAT:        table ip banger, absent\n\
             \x20 uplink:   eth0\n\
             \x20 rules:    none\n\
             ip_forward: off\n\
             leases:     0\n\
             DNS:        disabled in the config ([dns] enabled = false)\n"
        );
    }

    #[test]
    fn leases_table_renders() {
        assert_eq!(
            leases_table(&status().leases, NOW).render(),
            "IP           OWNER  STATIC  SINCE\n\
             172.30.0.2   web    no      5s ago\n\
             172.30.0.10  db     yes     3m12s ago\n"
        );
        assert_eq!(
            leases_table(&[], NOW).render(),
            "IP  OWNER  STATIC  SINCE\n"
        );
        assert_eq!(
            leased_line(&lease(10, "db", true, 0)),
            "leased 172.30.0.10 to db (static)"
        );
        assert_eq!(
            leased_line(&lease(2, "web", false, 0)),
            "leased 172.30.0.2 to web"
        );
    }

    #[test]
    fn status_json_is_the_whole_object() {
        let v = serde_json::to_value(NetworkJson::from(&status())).expect("json");
        assert_eq!(
            v,
            json!({
                "bridge": {"name": "banger0", "exists": true, "up": true,
                           "address": "172.30.0.1/24", "subnet": "172.30.0.0/24"},
                "pool": {"target": 4, "warm": ["bgtap1", "bgtap2"],
                         "in_use": [{"tap": "bgtap0", "owner": "web"}]},
                "nat": {"table": "banger", "present": true, "uplink": null,
                        "rules": ["postrouting: masquerade", "forward: accept"]},
                "ip_forward": true,
                "leases": [
                    {"ip": "172.30.0.2", "owner": "web", "static": false, "created_unix_ms": NOW - 5_000},
                    {"ip": "172.30.0.10", "owner": "db", "static": true, "created_unix_ms": NOW - 192_000}
                ],
                "dns": {"listen": "127.0.0.1:42069", "zone": "vm.",
                        "records": [{"name": "web", "fqdn": "web.vm", "ip": "172.30.0.2", "source": "vm"}]}
            })
        );
    }

    #[test]
    fn down_says_what_went_and_what_stays() {
        let mut after = bare();
        after.leases = status().leases;
        after.dns.records = status().dns.records;
        assert_eq!(
            down_text(Some(&status()), Some(&after)),
            "removed bridge banger0\n\
             removed 2 TAPs: bgtap1, bgtap2\n\
             removed nft table ip banger\n\
             kept: 2 leases, 1 DNS record, net.ipv4.ip_forward as it is\n\
             bangerd sets the network up again when it next starts\n"
        );
        assert_eq!(
            down_text(Some(&bare()), Some(&bare())),
            "nothing to remove: banger's bridge, TAPs and nft table were not there\n\
             kept: 0 leases, 0 DNS records, net.ipv4.ip_forward as it is\n"
        );
        // A daemon with networking disabled answers `Done` and removes nothing.
        let mut stays = bare();
        stays.nat.present = true;
        assert_eq!(
            down_text(Some(&stays), Some(&stays)),
            "still there: nft table ip banger (is [network] enabled = false in the daemon's config?)\n\
             kept: 0 leases, 0 DNS records, net.ipv4.ip_forward as it is\n"
        );
        assert_eq!(
            down_text(Some(&status()), None),
            "bangerd removed its bridge, TAPs and nft table\n"
        );
    }
}
