//! The record map: [`Records`] is the writer's handle (held by the daemon's
//! Dns actor), [`Snapshot`] the immutable view the serving tasks read.
//!
//! Writers build a new `Arc<Snapshot>` and publish it through a
//! `tokio::sync::watch` channel; readers check the channel's version (one
//! atomic load) per query and only take the new `Arc` when it changed. No
//! lock is ever held across an `.await`, and readers never wait on a
//! writer's work.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{Name, RData, Record};
use tokio::sync::watch;

use crate::name::{parent_keys, record_key, ZoneName};
use crate::DnsError;

/// SOA timers (seconds). Nobody transfers this zone; these only need to be
/// sane for tools that print them.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// What does not change while the server runs: the zone and its apex.
#[derive(Debug)]
pub(crate) struct Zone {
    pub(crate) name: ZoneName,
    pub(crate) ttl: u32,
    /// `ns.<zone>`: the SOA MNAME and the only NS target.
    nameserver: Name,
    /// `hostmaster.<zone>`: the SOA RNAME.
    hostmaster: Name,
    /// `<zone> NS ns.<zone>`.
    pub(crate) ns: Record,
}

impl Zone {
    pub(crate) fn new(zone: &str, ttl: u32) -> Result<Self, DnsError> {
        let invalid = |source| DnsError::InvalidZone {
            zone: zone.to_string(),
            source,
        };
        let name = ZoneName::parse(zone).map_err(invalid)?;
        // Both are one short label longer than the zone; if that overflows
        // 255 bytes the zone leaves no room for any record name anyway.
        let too_long = |_| invalid(crate::NameError::TooLong(name.name.len() + 12));
        let nameserver = name.name.prepend_label("ns").map_err(too_long)?;
        let hostmaster = name.name.prepend_label("hostmaster").map_err(too_long)?;
        let ns = Record::from_rdata(name.name.clone(), ttl, RData::NS(NS(nameserver.clone())));
        Ok(Self {
            name,
            ttl,
            nameserver,
            hostmaster,
            ns,
        })
    }

    fn soa(&self, serial: u32) -> Record {
        let soa = SOA::new(
            self.nameserver.clone(),
            self.hostmaster.clone(),
            serial,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            // Negative answers are cached for min(SOA TTL, MINIMUM): both
            // are the configured TTL, so a VM that appears is seen at once.
            self.ttl,
        );
        Record::from_rdata(self.name.name.clone(), self.ttl, RData::SOA(soa))
    }
}

/// One immutable version of the record map.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// Lowercase relative name → address.
    names: HashMap<Box<str>, Ipv4Addr>,
    /// Names that exist only because a longer name does (`prod` for
    /// `web.prod`): answered NODATA, not NXDOMAIN.
    empty_non_terminals: HashSet<Box<str>>,
    serial: u32,
    /// The apex SOA with this version's serial.
    pub(crate) soa: Record,
}

/// What a relative name is in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Address(Ipv4Addr),
    EmptyNonTerminal,
    Missing,
}

impl Snapshot {
    fn build(zone: &Zone, names: HashMap<Box<str>, Ipv4Addr>, serial: u32) -> Self {
        let empty_non_terminals = names
            .keys()
            .flat_map(|k| parent_keys(k))
            .filter(|p| !names.contains_key(*p))
            .map(Box::from)
            .collect();
        Self {
            names,
            empty_non_terminals,
            serial,
            soa: zone.soa(serial),
        }
    }

    /// `key` must already be lowercase (see `name::query_key`).
    pub(crate) fn lookup(&self, key: &str) -> Lookup {
        if let Some(addr) = self.names.get(key) {
            Lookup::Address(*addr)
        } else if self.empty_non_terminals.contains(key) {
            Lookup::EmptyNonTerminal
        } else {
            Lookup::Missing
        }
    }
}

/// Next SOA serial: bumps on every change, skipping 0 (RFC 1982 arithmetic
/// makes wrap-around fine for resolvers that look at it at all).
fn next_serial(serial: u32) -> u32 {
    match serial.wrapping_add(1) {
        0 => 1,
        s => s,
    }
}

/// Handle to the A records while the server runs. Cheap to clone; every
/// change is visible to the next query. Names are relative to the zone
/// (`web` for `web.vm.`), matched case-insensitively.
#[derive(Clone, Debug)]
pub struct Records {
    zone: Arc<Zone>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Records {
    pub(crate) fn new(zone: Arc<Zone>) -> Self {
        let snapshot = Snapshot::build(&zone, HashMap::new(), 1);
        let (tx, _rx) = watch::channel(Arc::new(snapshot));
        Self { zone, tx }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    fn key(&self, name: &str) -> Result<String, DnsError> {
        record_key(name, &self.zone.name).map_err(|source| DnsError::InvalidName {
            name: name.to_string(),
            source,
        })
    }

    /// Applies `change` to a copy of the current map and publishes it, unless
    /// `change` returns `false` (nothing changed: no new serial).
    fn update(&self, change: impl FnOnce(&mut HashMap<Box<str>, Ipv4Addr>) -> bool) -> bool {
        self.tx.send_if_modified(|current| {
            let mut names = current.names.clone();
            if !change(&mut names) {
                return false;
            }
            *current = Arc::new(Snapshot::build(
                &self.zone,
                names,
                next_serial(current.serial),
            ));
            true
        })
    }

    /// Points `name` at `addr`, replacing any previous address.
    pub fn set(&self, name: &str, addr: Ipv4Addr) -> Result<(), DnsError> {
        let key = self.key(name)?;
        self.update(|names| names.insert(key.into(), addr) != Some(addr));
        Ok(())
    }

    /// Removes `name`; returns the address it had. An invalid name has no
    /// record, so it returns `None`.
    pub fn remove(&self, name: &str) -> Option<Ipv4Addr> {
        let key = record_key(name, &self.zone.name).ok()?;
        let mut removed = None;
        self.update(|names| {
            removed = names.remove(key.as_str());
            removed.is_some()
        });
        removed
    }

    /// Replaces every record at once (e.g. after the Dns actor restarts and
    /// re-reads the VM list). All names are checked first: on error nothing
    /// changes. A name given twice keeps its last address.
    pub fn replace_all<I, S>(&self, records: I) -> Result<(), DnsError>
    where
        I: IntoIterator<Item = (S, Ipv4Addr)>,
        S: AsRef<str>,
    {
        let mut new = HashMap::new();
        for (name, addr) in records {
            new.insert(self.key(name.as_ref())?.into_boxed_str(), addr);
        }
        self.update(|names| {
            if *names == new {
                return false;
            }
            *names = new;
            true
        });
        Ok(())
    }

    /// The address `name` resolves to now.
    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        let key = record_key(name, &self.zone.name).ok()?;
        match self.tx.borrow().lookup(&key) {
            Lookup::Address(addr) => Some(addr),
            _ => None,
        }
    }

    /// Every record, sorted by (lowercase) name.
    pub fn to_map(&self) -> BTreeMap<String, Ipv4Addr> {
        self.tx
            .borrow()
            .names
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tx.borrow().names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The zone's SOA serial: starts at 1 and grows with every change.
    pub fn serial(&self) -> u32 {
        self.tx.borrow().serial
    }

    /// The zone these records live in (`vm.`).
    pub fn zone(&self) -> String {
        self.zone.name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Records {
        Records::new(Arc::new(Zone::new("vm.", 5).expect("zone")))
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    #[test]
    fn set_get_remove_case_insensitively() {
        let r = records();
        r.set("Web", A).expect("set");
        assert_eq!(r.get("web"), Some(A));
        assert_eq!(r.get("WEB"), Some(A));
        assert_eq!(
            r.to_map().into_iter().collect::<Vec<_>>(),
            [("web".to_string(), A)]
        );
        assert_eq!(r.remove("wEb"), Some(A));
        assert_eq!(r.get("web"), None);
        assert_eq!(r.remove("web"), None);
        assert_eq!(r.remove("not a name"), None);
        assert!(r.is_empty());
    }

    #[test]
    fn invalid_names_are_rejected() {
        let r = records();
        let err = r.set(&"x".repeat(64), A).expect_err("too long");
        assert!(matches!(err, DnsError::InvalidName { .. }), "{err:?}");
        r.set("ok", A).expect("set");
        let err = r
            .replace_all([("fine", A), ("bad name", B)])
            .expect_err("bad name");
        assert!(matches!(err, DnsError::InvalidName { .. }), "{err:?}");
        // Nothing changed.
        assert_eq!(r.to_map().len(), 1);
        assert_eq!(r.get("ok"), Some(A));
    }

    #[test]
    fn serial_moves_only_on_change() {
        let r = records();
        let s0 = r.serial();
        r.set("web", A).expect("set");
        let s1 = r.serial();
        assert!(s1 > s0);
        r.set("web", A).expect("same again");
        assert_eq!(r.serial(), s1);
        r.replace_all([("web", A)]).expect("same map");
        assert_eq!(r.serial(), s1);
        r.replace_all([("db", B)]).expect("new map");
        assert!(r.serial() > s1);
        assert_eq!(r.get("web"), None);
        assert_eq!(r.get("db"), Some(B));
        assert_eq!(next_serial(u32::MAX), 1);
    }

    #[test]
    fn readers_see_new_snapshots() {
        let r = records();
        let mut rx = r.subscribe();
        let old = rx.borrow_and_update().clone();
        r.set("web", A).expect("set");
        assert!(rx.has_changed().expect("sender alive"));
        let new = rx.borrow_and_update().clone();
        assert_eq!(old.lookup("web"), Lookup::Missing);
        assert_eq!(new.lookup("web"), Lookup::Address(A));
        assert_eq!(
            new.soa.data,
            RData::SOA(SOA::new(
                Name::from_ascii("ns.vm.").expect("ns"),
                Name::from_ascii("hostmaster.vm.").expect("hostmaster"),
                new.serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                5
            ))
        );
    }

    #[test]
    fn multi_label_names_imply_empty_non_terminals() {
        let r = records();
        r.set("web.prod", A).expect("set");
        let snap = r.subscribe().borrow().clone();
        assert_eq!(snap.lookup("web.prod"), Lookup::Address(A));
        assert_eq!(snap.lookup("prod"), Lookup::EmptyNonTerminal);
        assert_eq!(snap.lookup("x.web.prod"), Lookup::Missing);
        r.set("prod", B).expect("set parent");
        let snap = r.subscribe().borrow().clone();
        assert_eq!(snap.lookup("prod"), Lookup::Address(B));
    }
}
