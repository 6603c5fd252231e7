//! The server as a real client sees it: Debian's `dig` (bind9-dnsutils)
//! against a server on a loopback port.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use banger_dns::{DnsConfig, Limits};
use common::{config, start, WEB};
use tokio::process::Command;

/// Runs `dig @127.0.0.1 -p PORT ARGS…` and returns its stdout.
async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let output = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=2", "+time=2"])
        .args(args)
        .output()
        .await
        .expect("run dig (apt-get install -y bind9-dnsutils)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "dig {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The status from `;; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: …`.
fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in:\n{out}"))
}

/// The flags from `;; flags: qr aa rd; QUERY: 1, …`.
fn flags(out: &str) -> Vec<&str> {
    let line = out
        .lines()
        .find(|l| l.starts_with(";; flags:"))
        .unwrap_or_else(|| panic!("no flags in:\n{out}"));
    line.trim_start_matches(";; flags:")
        .split(';')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// `name ttl class type data` lines of the answer section (`+noall +answer`).
fn answers(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[tokio::test]
async fn known_name_short() {
    let (server, _records) = start(config(Limits::default())).await;
    let out = dig(server.local_addr(), &["web.vm", "A", "+short"]).await;
    assert_eq!(out.trim(), "10.0.0.2");
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_name_is_authoritative_nxdomain() {
    let (server, _records) = start(config(Limits::default())).await;
    let out = dig(server.local_addr(), &["nope.vm", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(flags(&out).contains(&"aa"), "{out}");
    assert!(out.contains("AUTHORITY: 1"), "{out}");
    assert!(out.contains("SOA"), "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn outside_the_zone_is_refused() {
    let (server, _records) = start(config(Limits::default())).await;
    let out = dig(server.local_addr(), &["example.com", "A"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
    assert!(!flags(&out).contains(&"aa"), "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_works() {
    let (server, _records) = start(config(Limits::default())).await;
    let out = dig(server.local_addr(), &["web.vm", "A", "+tcp", "+short"]).await;
    assert_eq!(out.trim(), "10.0.0.2");
    let out = dig(server.local_addr(), &["nope.vm", "A", "+tcp"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn mixed_case_answers_in_the_question_case() {
    let (server, _records) = start(config(Limits::default())).await;
    let out = dig(server.local_addr(), &["WeB.Vm", "A", "+noall", "+answer"]).await;
    let rows = answers(&out);
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0][0], "WeB.Vm.", "{out}");
    assert_eq!(rows[0][4], "10.0.0.2", "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn ttl_is_the_configured_one() {
    let cfg = DnsConfig {
        ttl: 42,
        ..config(Limits::default())
    };
    let (server, _records) = start(cfg).await;
    let out = dig(server.local_addr(), &["web.vm", "A", "+noall", "+answer"]).await;
    let rows = answers(&out);
    assert_eq!(rows[0][1], "42", "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn apex_soa_ns_and_nodata() {
    let (server, _records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    let out = dig(addr, &["vm", "SOA", "+short"]).await;
    assert!(out.starts_with("ns.vm. hostmaster.vm. "), "{out}");
    let out = dig(addr, &["vm", "NS", "+short"]).await;
    assert_eq!(out.trim(), "ns.vm.");
    let out = dig(addr, &["web.vm", "AAAA"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(flags(&out).contains(&"aa"), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    assert!(out.contains("AUTHORITY: 1"), "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn record_changes_are_visible_to_the_next_query() {
    let (server, records) = start(config(Limits::default())).await;
    let addr = server.local_addr();
    let db = Ipv4Addr::new(10, 0, 0, 9);

    let out = dig(addr, &["db.vm", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    records.set("db", db).expect("set db");
    assert_eq!(dig(addr, &["db.vm", "+short"]).await.trim(), "10.0.0.9");
    records.set("db", WEB).expect("move db");
    assert_eq!(dig(addr, &["db.vm", "+short"]).await.trim(), "10.0.0.2");
    assert_eq!(records.remove("db"), Some(WEB));
    let out = dig(addr, &["db.vm", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    records.replace_all([("api", db)]).expect("replace all");
    assert_eq!(dig(addr, &["api.vm", "+short"]).await.trim(), "10.0.0.9");
    let out = dig(addr, &["web.vm", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    server.shutdown().await;
}
