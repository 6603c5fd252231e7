//! `banger dns add|rm|list|setup`: the `<name>.vm` records bangerd's DNS
//! server answers, and pointing the host's resolver at it. `list` reads
//! `NetworkStatus.dns`; the record table and JSON shapes here are also the
//! DNS part of `banger network status`.

use banger_protocol::{DnsRecord, DnsSetupReport, DnsStatus, Request, Response};
use serde::Serialize;

use crate::args::{DnsAddArgs, DnsCommand, DnsNameArgs, JsonFlag};
use crate::connect;
use crate::error::{CliError, Exit};
use crate::image_cmd::query;
use crate::network_cmd::fetch_status;
use crate::outln;
use crate::output::{print_json, Table};

pub async fn run(command: DnsCommand) -> Result<Exit, CliError> {
    match command {
        DnsCommand::Add(args) => add(args).await,
        DnsCommand::Rm(args) => rm(args).await,
        DnsCommand::List(flags) => list(flags).await,
        DnsCommand::Setup(flags) => setup(flags).await,
    }
}

/// The JSON shape of the DNS server's state (banger's own, stable).
#[derive(Serialize, Debug, PartialEq)]
pub struct DnsJson<'a> {
    /// `null` when the DNS server is disabled in the config.
    listen: Option<String>,
    zone: &'a str,
    records: Vec<RecordJson<'a>>,
}

impl<'a> From<&'a DnsStatus> for DnsJson<'a> {
    fn from(d: &'a DnsStatus) -> Self {
        Self {
            listen: d.listen.map(|a| a.to_string()),
            zone: &d.zone,
            records: sorted(&d.records)
                .into_iter()
                .map(|r| RecordJson::new(r, &d.zone))
                .collect(),
        }
    }
}

/// The JSON shape of one record.
#[derive(Serialize, Debug, PartialEq)]
pub struct RecordJson<'a> {
    /// Relative to the zone: `web`.
    name: &'a str,
    /// The name to resolve: `web.vm`.
    fqdn: String,
    ip: String,
    /// `static` (added with `dns add`) or `vm`.
    source: &'a str,
}

impl<'a> RecordJson<'a> {
    fn new(r: &'a DnsRecord, zone: &str) -> Self {
        Self {
            name: &r.name,
            fqdn: fqdn(&r.name, zone),
            ip: r.ip.to_string(),
            source: &r.source,
        }
    }
}

/// `web` in zone `vm.` → `web.vm`.
pub fn fqdn(name: &str, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    if zone.is_empty() {
        name.to_string()
    } else {
        format!("{name}.{zone}")
    }
}

fn sorted(records: &[DnsRecord]) -> Vec<&DnsRecord> {
    let mut records: Vec<&DnsRecord> = records.iter().collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    records
}

/// `NAME IP SOURCE`, names in full (`web.vm`), sorted.
pub fn records_table(dns: &DnsStatus) -> Table {
    let mut table = Table::new(&["NAME", "IP", "SOURCE"]);
    for r in sorted(&dns.records) {
        table.row(vec![
            fqdn(&r.name, &dns.zone),
            r.ip.to_string(),
            r.source.clone(),
        ]);
    }
    table
}

/// Where the server listens, as a status line.
pub fn listen_text(dns: &DnsStatus) -> String {
    match dns.listen {
        Some(addr) => format!("{addr} (zone {})", dns.zone),
        None => "disabled in the config ([dns] enabled = false)".to_string(),
    }
}

async fn add(args: DnsAddArgs) -> Result<Exit, CliError> {
    let request = Request::DnsAdd {
        name: args.name.clone(),
        ip: args.ip,
    };
    match query(request).await? {
        Response::Done => {
            outln!(
                "{} → {}",
                fqdn(&args.name.to_ascii_lowercase(), "vm."),
                args.ip
            )?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("dns_add", &other)),
    }
}

async fn rm(args: DnsNameArgs) -> Result<Exit, CliError> {
    match query(Request::DnsRemove { name: args.name }).await? {
        Response::Deleted { name } => {
            outln!("removed {}", fqdn(&name, "vm."))?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("dns_remove", &other)),
    }
}

async fn list(flags: JsonFlag) -> Result<Exit, CliError> {
    let dns = fetch_status().await?.dns;
    if flags.json {
        print_json(&DnsJson::from(&dns))?;
        return Ok(Exit::Ok);
    }
    if dns.listen.is_none() {
        eprintln!("note: the DNS server is disabled in the config; these records are not served");
    }
    records_table(&dns).print()?;
    Ok(Exit::Ok)
}

/// The JSON shape of `dns setup`.
#[derive(Serialize, Debug, PartialEq)]
struct SetupJson<'a> {
    configured: bool,
    lines: &'a [String],
}

async fn setup(flags: JsonFlag) -> Result<Exit, CliError> {
    let report = match query(Request::DnsSetup).await? {
        Response::DnsSetup(report) => report,
        other => return Err(connect::unexpected("dns_setup", &other)),
    };
    if flags.json {
        print_json(&SetupJson {
            configured: report.configured,
            lines: &report.lines,
        })?;
    } else {
        outln!("{}", setup_text(&report).trim_end())?;
    }
    // Not configuring the resolver is an answer, not a failure: the
    // report says what to do instead.
    Ok(Exit::Ok)
}

/// A verdict line, then the daemon's report indented under it.
fn setup_text(report: &DnsSetupReport) -> String {
    let mut text = if report.configured {
        "resolver configured: the host now resolves *.vm names through bangerd\n".to_string()
    } else {
        "resolver NOT configured: *.vm names do not resolve on this host yet; do this by hand:\n"
            .to_string()
    };
    for line in &report.lines {
        text.push_str(&format!("  {line}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::Ipv4Addr;

    fn dns_status() -> DnsStatus {
        DnsStatus {
            listen: Some("127.0.0.1:42069".parse().expect("addr")),
            zone: "vm.".into(),
            records: vec![
                DnsRecord {
                    name: "web".into(),
                    ip: Ipv4Addr::new(172, 30, 0, 2),
                    source: "vm".into(),
                },
                DnsRecord {
                    name: "db".into(),
                    ip: Ipv4Addr::new(10, 0, 0, 53),
                    source: "static".into(),
                },
            ],
        }
    }

    #[test]
    fn records_table_is_sorted_with_full_names() {
        assert_eq!(
            records_table(&dns_status()).render(),
            "NAME    IP          SOURCE\n\
             db.vm   10.0.0.53   static\n\
             web.vm  172.30.0.2  vm\n"
        );
        let empty = DnsStatus {
            listen: None,
            zone: "vm.".into(),
            records: vec![],
        };
        assert_eq!(records_table(&empty).render(), "NAME  IP  SOURCE\n");
        assert_eq!(
            listen_text(&empty),
            "disabled in the config ([dns] enabled = false)"
        );
        assert_eq!(listen_text(&dns_status()), "127.0.0.1:42069 (zone vm.)");
    }

    #[test]
    fn dns_json() {
        assert_eq!(
            serde_json::to_value(DnsJson::from(&dns_status())).expect("json"),
            json!({
                "listen": "127.0.0.1:42069",
                "zone": "vm.",
                "records": [
                    {"name": "db", "fqdn": "db.vm", "ip": "10.0.0.53", "source": "static"},
                    {"name": "web", "fqdn": "web.vm", "ip": "172.30.0.2", "source": "vm"}
                ]
            })
        );
    }

    #[test]
    fn fqdns() {
        assert_eq!(fqdn("web", "vm."), "web.vm");
        assert_eq!(fqdn("web", "vm"), "web.vm");
        assert_eq!(fqdn("web", ""), "web");
    }

    #[test]
    fn setup_says_whether_the_resolver_was_configured() {
        let done = DnsSetupReport {
            configured: true,
            lines: vec!["wrote /etc/x".into(), "restarted systemd-resolved".into()],
        };
        assert_eq!(
            setup_text(&done),
            "resolver configured: the host now resolves *.vm names through bangerd\n\
             \x20 wrote /etc/x\n\
             \x20 restarted systemd-resolved\n"
        );
        let manual = DnsSetupReport {
            configured: false,
            lines: vec!["systemd-resolved is not running".into()],
        };
        let text = setup_text(&manual);
        assert!(text.starts_with("resolver NOT configured"), "{text}");
        assert!(
            text.ends_with("\n  systemd-resolved is not running\n"),
            "{text}"
        );
    }
}
