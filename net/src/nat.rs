//! NAT and forwarding for the guest subnet, in banger's own nftables table
//! (family `ip`, default name `banger`). Nothing outside that table is ever
//! read or written.
//!
//! The desired state is built with the `nftables` crate's typed JSON schema
//! ([`NatRules::ruleset`]) and applied with `nft -j -f -` as ONE transaction
//! that first deletes the table (if present) and then adds it complete, so a
//! reconcile always leaves exactly the expected rules, whatever was there.
//!
//! `nft` is run directly (not through `nftables::helper`) only because the
//! helper does not capture `nft`'s stderr when applying, and that message is
//! the one a user needs. The child inherits the network namespace of the
//! calling thread. These functions block for one `nft` run (a few ms): call
//! them from `spawn_blocking` inside an async actor.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, CT,
};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;
use thiserror::Error;
use tracing::instrument;

use crate::config::{validate_table_name, NetConfig};
use crate::error::NetError;
use crate::ifname::validate_ifname;
use crate::subnet::Ipv4Net;

/// The NAT chain: `type nat hook postrouting priority srcnat`.
pub const NAT_CHAIN: &str = "postrouting";
/// The forwarding chain: `type filter hook forward priority filter`.
pub const FORWARD_CHAIN: &str = "forward";

const FAMILY: NfFamily = NfFamily::IP;
const FAMILY_NAME: &str = "ip";
/// `srcnat` priority.
const NAT_PRIORITY: i32 = 100;
/// `filter` priority.
const FILTER_PRIORITY: i32 = 0;

/// Running `nft` failed.
#[derive(Debug, Error)]
pub enum NatError {
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft failed while {action} ({status})")]
    Failed {
        action: &'static str,
        status: ExitStatus,
        #[source]
        stderr: NftMessage,
    },
    #[error("nft printed JSON that could not be read while {action}")]
    Json {
        action: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// What `nft` wrote on stderr, as the cause of a [`NatError::Failed`].
#[derive(Debug, Clone)]
pub struct NftMessage(pub String);

impl fmt::Display for NftMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.trim();
        if text.is_empty() {
            f.write_str("(no message on stderr)")
        } else {
            f.write_str(text)
        }
    }
}

impl std::error::Error for NftMessage {}

/// The NAT and forwarding rules for one guest subnet: the desired content of
/// banger's table.
///
/// - chain `postrouting` (nat): `ip saddr <subnet> oifname != "<bridge>"
///   counter masquerade`, or `oifname "<uplink>"` instead of the `!=` match
///   when an uplink is given;
/// - chain `forward` (filter, policy accept): `iifname "<bridge>" counter
///   accept` and `oifname "<bridge>" ct state established,related counter
///   accept`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRules {
    /// The nftables table (family `ip`).
    pub table: String,
    /// The guests' bridge.
    pub bridge: String,
    /// The guest subnet to masquerade.
    pub subnet: Ipv4Net,
    /// Masquerade only out of this interface (see [`crate::Host::default_uplink`]);
    /// `None` masquerades out of every interface but the bridge, which keeps
    /// working when the default route moves (Wi-Fi to Ethernet, a VPN).
    pub uplink: Option<String>,
}

impl NatRules {
    /// The rules for `cfg`'s table, bridge and subnet.
    pub fn new(cfg: &NetConfig, uplink: Option<String>) -> NatRules {
        NatRules {
            table: cfg.nft_table.clone(),
            bridge: cfg.bridge.clone(),
            subnet: cfg.subnet,
            uplink,
        }
    }

    /// Checks the table and interface names.
    pub fn validate(&self) -> Result<(), NetError> {
        validate_table_name(&self.table)?;
        validate_ifname(&self.bridge)?;
        if let Some(uplink) = &self.uplink {
            validate_ifname(uplink)?;
        }
        Ok(())
    }

    fn table_obj(&self) -> NfListObject<'static> {
        table_obj(&self.table)
    }

    fn chain(
        &self,
        name: &'static str,
        kind: NfChainType,
        hook: NfHook,
        prio: i32,
    ) -> NfListObject<'static> {
        NfListObject::Chain(Chain {
            family: FAMILY,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Borrowed(name),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        })
    }

    fn rule(
        &self,
        chain: &'static str,
        comment: &'static str,
        expr: Vec<Statement<'static>>,
    ) -> NfListObject<'static> {
        NfListObject::Rule(Rule {
            family: FAMILY,
            table: Cow::Owned(self.table.clone()),
            chain: Cow::Borrowed(chain),
            expr: Cow::Owned(expr),
            comment: Some(Cow::Borrowed(comment)),
            ..Rule::default()
        })
    }

    /// The table's objects, in the order they must be added.
    fn objects(&self) -> Vec<NfListObject<'static>> {
        let bridge = || Expression::String(Cow::Owned(self.bridge.clone()));
        let out_iface = match &self.uplink {
            Some(uplink) => matches(
                meta(MetaKey::Oifname),
                Expression::String(Cow::Owned(uplink.clone())),
            ),
            None => not_matches(meta(MetaKey::Oifname), bridge()),
        };
        vec![
            self.table_obj(),
            self.chain(
                NAT_CHAIN,
                NfChainType::NAT,
                NfHook::Postrouting,
                NAT_PRIORITY,
            ),
            self.rule(
                NAT_CHAIN,
                "banger: masquerade guest traffic leaving the host",
                vec![
                    matches(
                        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                            PayloadField {
                                protocol: Cow::Borrowed("ip"),
                                field: Cow::Borrowed("saddr"),
                            },
                        ))),
                        Expression::Named(NamedExpression::Prefix(Prefix {
                            addr: Box::new(Expression::String(Cow::Owned(
                                self.subnet.network().to_string(),
                            ))),
                            len: u32::from(self.subnet.prefix()),
                        })),
                    ),
                    out_iface,
                    Statement::Counter(Counter::Anonymous(None)),
                    Statement::Masquerade(None),
                ],
            ),
            self.chain(
                FORWARD_CHAIN,
                NfChainType::Filter,
                NfHook::Forward,
                FILTER_PRIORITY,
            ),
            self.rule(
                FORWARD_CHAIN,
                "banger: forward guest traffic",
                vec![
                    matches(meta(MetaKey::Iifname), bridge()),
                    Statement::Counter(Counter::Anonymous(None)),
                    Statement::Accept(None),
                ],
            ),
            self.rule(
                FORWARD_CHAIN,
                "banger: forward replies to guests",
                vec![
                    matches(meta(MetaKey::Oifname), bridge()),
                    Statement::Match(Match {
                        left: Expression::Named(NamedExpression::CT(CT {
                            key: Cow::Borrowed("state"),
                            family: None,
                            dir: None,
                        })),
                        right: Expression::List(vec![
                            Expression::String(Cow::Borrowed("established")),
                            Expression::String(Cow::Borrowed("related")),
                        ]),
                        op: Operator::IN,
                    }),
                    Statement::Counter(Counter::Anonymous(None)),
                    Statement::Accept(None),
                ],
            ),
        ]
    }

    /// The desired state: `add` commands for the table, both chains and
    /// their rules. Applying it alone to a host that already has the table
    /// would append duplicate rules; [`apply`](Self::apply) prefixes it with
    /// the delete.
    pub fn ruleset(&self) -> Nftables<'static> {
        let mut batch = Batch::new();
        for obj in self.objects() {
            batch.add(obj);
        }
        batch.to_nftables()
    }

    /// The single transaction [`apply`](Self::apply) sends: add the table
    /// (a no-op if it exists, so that the delete cannot fail), delete it with
    /// everything in it, then the whole [`ruleset`](Self::ruleset).
    pub fn apply_transaction(&self) -> Nftables<'static> {
        let mut batch = Batch::new();
        batch.add(self.table_obj());
        batch.delete(self.table_obj());
        for obj in self.objects() {
            batch.add(obj);
        }
        batch.to_nftables()
    }

    /// Makes banger's table exactly [`ruleset`](Self::ruleset), atomically:
    /// packets see either the old table or the new one, never a mix, and
    /// applying twice leaves one copy of each rule.
    #[instrument(skip_all, fields(table = %self.table, bridge = %self.bridge, subnet = %self.subnet))]
    pub fn apply(&self) -> Result<(), NetError> {
        self.validate()?;
        let payload = to_json(&self.apply_transaction());
        run_nft(
            &["-j", "-f", "-"],
            Some(&payload),
            "applying banger's table",
        )?;
        tracing::info!(table = %self.table, uplink = ?self.uplink, "applied NAT and forwarding rules");
        Ok(())
    }

    /// Whether the live table holds exactly this ruleset (ignoring handles
    /// and counter values). `false` if the table is missing or drifted.
    pub fn is_applied(&self) -> Result<bool, NetError> {
        let Some(live) = Self::current(&self.table)? else {
            return Ok(false);
        };
        let desired = serde_json::to_value(self.ruleset()).unwrap_or(Value::Null);
        Ok(normalize(&live) == normalize(&desired))
    }

    /// Deletes the table `table` (family `ip`) with everything in it.
    /// Returns `false` if it did not exist.
    #[instrument]
    pub fn remove(table: &str) -> Result<bool, NetError> {
        validate_table_name(table)?;
        if !Self::exists(table)? {
            return Ok(false);
        }
        let mut batch = Batch::new();
        batch.add(table_obj(table));
        batch.delete(table_obj(table));
        run_nft(
            &["-j", "-f", "-"],
            Some(&to_json(&batch.to_nftables())),
            "deleting banger's table",
        )?;
        tracing::info!(table, "deleted nftables table");
        Ok(true)
    }

    /// Whether the table `table` (family `ip`) exists.
    pub fn exists(table: &str) -> Result<bool, NetError> {
        validate_table_name(table)?;
        let out = run_nft(
            &["-j", "list", "tables", FAMILY_NAME],
            None,
            "listing tables",
        )?;
        let listing: Value = serde_json::from_str(&out).map_err(|source| NatError::Json {
            action: "listing tables",
            source,
        })?;
        let found = objects(&listing).any(|obj| {
            obj.get("table").is_some_and(|t| {
                t.get("family").and_then(Value::as_str) == Some(FAMILY_NAME)
                    && t.get("name").and_then(Value::as_str) == Some(table)
            })
        });
        Ok(found)
    }

    /// The live table as `nft -j list table ip <table>` prints it, or `None`
    /// if it does not exist. For `network status`.
    pub fn current(table: &str) -> Result<Option<Value>, NetError> {
        if !Self::exists(table)? {
            return Ok(None);
        }
        let out = run_nft(
            &["-j", "list", "table", FAMILY_NAME, table],
            None,
            "listing banger's table",
        )?;
        let value = serde_json::from_str(&out).map_err(|source| NatError::Json {
            action: "listing banger's table",
            source,
        })?;
        Ok(Some(value))
    }
}

fn table_obj(name: &str) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: FAMILY,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn matches(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn not_matches(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn to_json(nft: &Nftables<'_>) -> String {
    // The schema types are plain data; serialising them cannot fail.
    serde_json::to_string(nft).unwrap_or_else(|e| unreachable!("nftables schema serialises: {e}"))
}

/// The objects of a `{"nftables": [...]}` document.
fn objects(doc: &Value) -> impl Iterator<Item = &Value> {
    doc.get("nftables")
        .and_then(Value::as_array)
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
}

/// A listing or a ruleset reduced to comparable objects: `add` wrappers and
/// `metainfo` dropped, handles removed, counters zeroed; sorted.
fn normalize(doc: &Value) -> Vec<String> {
    fn scrub(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("handle");
                for (key, inner) in map.iter_mut() {
                    if key == "counter" {
                        *inner = Value::Null;
                    } else {
                        scrub(inner);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    let mut out: Vec<String> = objects(doc)
        .filter(|obj| obj.get("metainfo").is_none())
        .map(|obj| {
            let mut obj = obj.get("add").cloned().unwrap_or_else(|| obj.clone());
            scrub(&mut obj);
            obj.to_string()
        })
        .collect();
    out.sort();
    out
}

/// `nft` from `PATH`, else from the sbin directories a non-login root shell
/// may not have in `PATH`.
fn nft_program() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("nft"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

fn run_nft(args: &[&str], stdin: Option<&str>, action: &'static str) -> Result<String, NatError> {
    let program = nft_program();
    let spawn_err = |source| NatError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let mut child = Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A few KiB: fits in the pipe, and nft reads all input before output.
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    if !output.status.success() {
        return Err(NatError::Failed {
            action,
            status: output.status,
            stderr: NftMessage(String::from_utf8_lossy(&output.stderr).into_owned()),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(uplink: Option<&str>) -> NatRules {
        NatRules::new(&NetConfig::default(), uplink.map(str::to_owned))
    }

    #[test]
    fn ruleset_json_is_what_nft_expects() {
        let value = serde_json::to_value(rules(None).ruleset()).expect("json");
        let expected = json!({"nftables": [
            {"add": {"table": {"family": "ip", "name": "banger"}}},
            {"add": {"chain": {"family": "ip", "table": "banger", "name": "postrouting",
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}},
            {"add": {"rule": {"family": "ip", "table": "banger", "chain": "postrouting",
                "comment": "banger: masquerade guest traffic leaving the host",
                "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": "172.30.0.0", "len": 24}}}},
                    {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "banger0"}},
                    {"counter": null},
                    {"masquerade": null}]}}},
            {"add": {"chain": {"family": "ip", "table": "banger", "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}},
            {"add": {"rule": {"family": "ip", "table": "banger", "chain": "forward",
                "comment": "banger: forward guest traffic",
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "banger0"}},
                    {"counter": null},
                    {"accept": null}]}}},
            {"add": {"rule": {"family": "ip", "table": "banger", "chain": "forward",
                "comment": "banger: forward replies to guests",
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "banger0"}},
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                    {"counter": null},
                    {"accept": null}]}}}
        ]});
        assert_eq!(value, expected);
    }

    #[test]
    fn uplink_pins_the_masquerade_interface() {
        let value = serde_json::to_value(rules(Some("eth0")).ruleset()).expect("json");
        let nat_rule = &value["nftables"][2]["add"]["rule"]["expr"][1];
        assert_eq!(
            nat_rule,
            &json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}})
        );
    }

    #[test]
    fn apply_transaction_deletes_then_rebuilds() {
        let value = serde_json::to_value(rules(None).apply_transaction()).expect("json");
        let cmds = value["nftables"].as_array().expect("array");
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "ip", "name": "banger"}}})
        );
        assert_eq!(
            cmds[1],
            json!({"delete": {"table": {"family": "ip", "name": "banger"}}})
        );
        assert_eq!(cmds.len(), 2 + 6);
    }

    #[test]
    fn validation() {
        let mut r = rules(Some("eth0"));
        assert!(r.validate().is_ok());
        r.uplink = Some("eth0; drop".into());
        assert!(matches!(r.validate(), Err(NetError::InvalidName(_))));
        r.uplink = None;
        r.table = "bad table".into();
        assert!(matches!(r.validate(), Err(NetError::Config(_))));
    }

    #[test]
    fn a_failure_shows_nfts_message_in_the_source_chain() {
        use std::error::Error as _;
        use std::os::unix::process::ExitStatusExt;
        let err = NatError::Failed {
            action: "applying banger's table",
            status: ExitStatus::from_raw(1 << 8),
            stderr: NftMessage("Error: Could not process rule: No such file or directory\n".into()),
        };
        assert_eq!(
            err.to_string(),
            "nft failed while applying banger's table (exit status: 1)"
        );
        let cause = err.source().map(ToString::to_string);
        assert_eq!(
            cause.as_deref(),
            Some("Error: Could not process rule: No such file or directory")
        );
        assert_eq!(
            NftMessage(" \n".into()).to_string(),
            "(no message on stderr)"
        );
    }

    #[test]
    fn normalize_ignores_handles_counters_and_metainfo() {
        let listed = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "t", "handle": 7}},
            {"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 3,
                "expr": [{"counter": {"packets": 5, "bytes": 300}}, {"accept": null}]}}
        ]});
        let desired = json!({"nftables": [
            {"add": {"rule": {"family": "ip", "table": "t", "chain": "c",
                "expr": [{"counter": null}, {"accept": null}]}}},
            {"add": {"table": {"family": "ip", "name": "t"}}}
        ]});
        assert_eq!(normalize(&listed), normalize(&desired));
    }
}
