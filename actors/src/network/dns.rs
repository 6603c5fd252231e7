//! The Dns actor: owns banger's authoritative `vm.` DNS server and its
//! records. Records are durable (store tree `dns`): static ones added with
//! `banger dns add`, and one per running VM (published by the VM work);
//! after a restart of this actor the server is started again and the
//! records are rebuilt from the store.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use banger_dns::{DnsConfig, DnsServer, Records};
use banger_protocol::{DnsRecord, DnsStatus, ErrorData, ErrorKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::info;

use crate::records::validate_name;
use crate::store::{decode_record, StoreClient};

pub const TREE: &str = "dns";

#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub enabled: bool,
    pub config: DnsConfig,
}

#[derive(Debug)]
pub enum DnsMsg {
    /// Adds or replaces `<name>.vm`.
    Set {
        record: DnsRecord,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    Remove {
        name: String,
        reply: RpcReplyPort<Result<Option<DnsRecord>, ErrorData>>,
    },
    Status(RpcReplyPort<DnsStatus>),
}

#[derive(Debug, Clone, Copy)]
pub struct Dns;

#[derive(Debug, Clone)]
pub struct DnsArgs {
    pub settings: DnsSettings,
    pub store_timeout: Duration,
}

#[derive(Debug)]
pub struct DnsState {
    /// Dropping the server (also when the actor is killed) closes its sockets.
    server: Option<DnsServer>,
    records: Option<Records>,
    entries: BTreeMap<String, DnsRecord>,
    store: StoreClient,
    zone: String,
}

impl Actor for Dns {
    type Msg = DnsMsg;
    type State = DnsState;
    type Arguments = DnsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DnsMsg>,
        args: DnsArgs,
    ) -> Result<DnsState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let mut entries = BTreeMap::new();
        for (_, value) in store.scan_raw(TREE, b"").await? {
            let record: DnsRecord = decode_record(TREE, &value)?;
            entries.insert(record.name.clone(), record);
        }
        let zone = args.settings.config.zone.clone();
        let (server, records) = if args.settings.enabled {
            let (server, records) = DnsServer::start(args.settings.config.clone()).await?;
            records.replace_all(entries.values().map(|r| (r.name.clone(), r.ip)))?;
            info!(listen = %server.local_addr(), records = entries.len(), "DNS serving vm.");
            (Some(server), Some(records))
        } else {
            (None, None)
        };
        Ok(DnsState {
            server,
            records,
            entries,
            store,
            zone,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<DnsMsg>,
        msg: DnsMsg,
        state: &mut DnsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DnsMsg::Set { record, reply } => {
                let _ = reply.send(set(state, record).await);
            }
            DnsMsg::Remove { name, reply } => {
                let name = name.to_ascii_lowercase();
                let res = match state.entries.get(&name).cloned() {
                    None => Ok(None),
                    Some(record) => state.store.delete(TREE, name.as_bytes()).await.map(|_| {
                        state.entries.remove(&name);
                        if let Some(records) = &state.records {
                            records.remove(&name);
                        }
                        Some(record)
                    }),
                };
                let _ = reply.send(res);
            }
            DnsMsg::Status(reply) => {
                let _ = reply.send(DnsStatus {
                    listen: state.server.as_ref().map(DnsServer::local_addr),
                    zone: state.zone.clone(),
                    records: state.entries.values().cloned().collect(),
                });
            }
        }
        Ok(())
    }
}

async fn set(state: &mut DnsState, mut record: DnsRecord) -> Result<(), ErrorData> {
    record.name = record.name.to_ascii_lowercase();
    validate_name("DNS", &record.name)?;
    if record.name.contains('.') || record.name.contains('_') {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("`{}` is not a single DNS label", record.name),
        )
        .with_hint("use letters, digits and '-' only"));
    }
    if let Some(records) = &state.records {
        records
            .set(&record.name, record.ip)
            .map_err(|e| ErrorData::from_error(ErrorKind::InvalidRequest, &e))?;
    }
    if let Err(e) = state.store.put(TREE, record.name.as_bytes(), &record).await {
        // Keep the server in line with what is durable.
        if let Some(records) = &state.records {
            match state.entries.get(&record.name) {
                Some(old) => {
                    let _ = records.set(&old.name, old.ip);
                }
                None => {
                    records.remove(&record.name);
                }
            }
        }
        return Err(e);
    }
    info!(name = %record.name, ip = %record.ip, source = %record.source, "DNS record set");
    state.entries.insert(record.name.clone(), record);
    Ok(())
}

/// A record for `name` → `ip` from `source`.
pub fn record(name: &str, ip: Ipv4Addr, source: &str) -> DnsRecord {
    DnsRecord {
        name: name.to_string(),
        ip,
        source: source.to_string(),
    }
}
