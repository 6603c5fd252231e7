//! Name handling: which record names [`Records`](crate::Records) accepts,
//! how a configured zone is parsed, and how a query name is turned into a
//! record key without allocating. Keys are lowercase; lookups are
//! case-insensitive.

use std::fmt;

use hickory_proto::rr::Name;

/// Longest label the DNS allows (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest name on the wire, length octets and root label included.
pub const MAX_NAME_WIRE_LEN: usize = 255;

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name has an empty label")]
    EmptyLabel,
    #[error("label is {0} bytes long (at most 63)")]
    LabelTooLong(usize),
    #[error("character {0:?} is not allowed (use a-z, 0-9, '-' and '_')")]
    BadCharacter(char),
    #[error("name is {0} bytes on the wire (at most 255)")]
    TooLong(usize),
}

/// A byte allowed in a label, after lowercasing.
fn is_label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// Checks dot-separated labels (no leading, trailing or doubled dots) and
/// returns them lowercased, plus their length on the wire without the root.
fn normalize_labels(name: &str) -> Result<(String, usize), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let mut wire = 0;
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong(label.len()));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii() || !is_label_byte(c.to_ascii_lowercase() as u8))
        {
            return Err(NameError::BadCharacter(c));
        }
        wire += 1 + label.len();
    }
    Ok((name.to_ascii_lowercase(), wire))
}

/// The zone this server is authoritative for, parsed from config
/// (`"vm."` or `"vm"`; several labels are fine, the root is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ZoneName {
    /// Lowercase, fully qualified.
    pub(crate) name: Name,
    /// Lowercase labels, for matching query names.
    labels: Vec<Box<[u8]>>,
    /// Wire length without the root octet.
    wire_len: usize,
}

impl ZoneName {
    pub(crate) fn parse(zone: &str) -> Result<Self, NameError> {
        let zone = zone.strip_suffix('.').unwrap_or(zone);
        let (lower, wire_len) = normalize_labels(zone)?;
        if wire_len + 1 > MAX_NAME_WIRE_LEN {
            return Err(NameError::TooLong(wire_len + 1));
        }
        let labels: Vec<Box<[u8]>> = lower.split('.').map(|l| l.as_bytes().into()).collect();
        let mut name = Name::from_labels(labels.iter().map(|l| &l[..]))
            .map_err(|_| NameError::TooLong(wire_len + 1))?;
        name.set_fqdn(true);
        Ok(Self {
            name,
            labels,
            wire_len,
        })
    }

    /// If `name` is at or below the zone (ignoring case), the number of
    /// labels in front of the zone; `None` if it is outside.
    pub(crate) fn relative_len(&self, name: &Name) -> Option<usize> {
        let total = name.iter().len();
        if total < self.labels.len() {
            return None;
        }
        let matches = name
            .iter()
            .rev()
            .zip(self.labels.iter().rev())
            .all(|(q, z)| q.eq_ignore_ascii_case(z));
        matches.then(|| total - self.labels.len())
    }
}

impl fmt::Display for ZoneName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.name.fmt(f)
    }
}

/// Validates a record name (a VM name, relative to the zone: `web`, or
/// several labels such as `web.prod`) and returns its key: lowercase.
pub(crate) fn record_key(name: &str, zone: &ZoneName) -> Result<String, NameError> {
    let (key, wire) = normalize_labels(name)?;
    let total = wire + zone.wire_len + 1;
    if total > MAX_NAME_WIRE_LEN {
        return Err(NameError::TooLong(total));
    }
    Ok(key)
}

/// Builds the record key for the first `relative` labels of a query name
/// into `buf`. `None` when a label holds a byte no record name can contain
/// (so no record can match). Does not allocate.
pub(crate) fn query_key<'b>(
    name: &Name,
    relative: usize,
    buf: &'b mut [u8; 256],
) -> Option<&'b str> {
    let mut len = 0;
    for (i, label) in name.iter().take(relative).enumerate() {
        if i > 0 {
            *buf.get_mut(len)? = b'.';
            len += 1;
        }
        for &b in label {
            let b = b.to_ascii_lowercase();
            if !is_label_byte(b) {
                return None;
            }
            *buf.get_mut(len)? = b;
            len += 1;
        }
    }
    std::str::from_utf8(&buf[..len]).ok()
}

/// Every proper suffix of a key (`a.b.c` → `b.c`, `c`): the empty
/// non-terminals a multi-label name implies.
pub(crate) fn parent_keys(key: &str) -> impl Iterator<Item = &str> {
    key.match_indices('.').map(move |(i, _)| &key[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> ZoneName {
        ZoneName::parse("vm.").expect("zone")
    }

    #[test]
    fn record_names_are_lowercased() {
        assert_eq!(record_key("WeB", &zone()).as_deref(), Ok("web"));
        assert_eq!(record_key("db-1_x", &zone()).as_deref(), Ok("db-1_x"));
        assert_eq!(record_key("a.B.c", &zone()).as_deref(), Ok("a.b.c"));
    }

    #[test]
    fn label_validation() {
        let z = zone();
        assert_eq!(record_key("", &z), Err(NameError::Empty));
        assert_eq!(record_key("a..b", &z), Err(NameError::EmptyLabel));
        assert_eq!(record_key(".a", &z), Err(NameError::EmptyLabel));
        assert_eq!(record_key("a.", &z), Err(NameError::EmptyLabel));
        assert_eq!(record_key(&"a".repeat(63), &z).map(|k| k.len()), Ok(63));
        assert_eq!(
            record_key(&"a".repeat(64), &z),
            Err(NameError::LabelTooLong(64))
        );
        assert_eq!(record_key("we b", &z), Err(NameError::BadCharacter(' ')));
        assert_eq!(record_key("wéb", &z), Err(NameError::BadCharacter('é')));
        assert_eq!(record_key("a*", &z), Err(NameError::BadCharacter('*')));
        // 4 × 63-byte labels + "vm" is 4×64 + 3 + 1 = 260 bytes on the wire.
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(record_key(&long, &z), Err(NameError::TooLong(260)));
        // 3 × 64 + 59 + 3 + 1 (root) is exactly 255.
        let max = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(58));
        assert!(record_key(&max, &z).is_ok());
    }

    #[test]
    fn zone_parsing() {
        assert_eq!(ZoneName::parse("vm").expect("vm").to_string(), "vm.");
        assert_eq!(ZoneName::parse("VM.").expect("VM.").to_string(), "vm.");
        assert_eq!(
            ZoneName::parse("banger.internal.")
                .expect("two labels")
                .to_string(),
            "banger.internal."
        );
        assert_eq!(ZoneName::parse("."), Err(NameError::Empty));
        assert_eq!(ZoneName::parse(""), Err(NameError::Empty));
    }

    #[test]
    fn zone_membership_ignores_case() {
        let z = zone();
        let n = |s: &str| Name::from_ascii(s).expect("name");
        assert_eq!(z.relative_len(&n("web.vm.")), Some(1));
        assert_eq!(z.relative_len(&n("WeB.Vm.")), Some(1));
        assert_eq!(z.relative_len(&n("VM.")), Some(0));
        assert_eq!(z.relative_len(&n("a.b.vm.")), Some(2));
        assert_eq!(z.relative_len(&n("example.com.")), None);
        assert_eq!(z.relative_len(&n("vm.com.")), None);
        assert_eq!(z.relative_len(&n("xvm.")), None);
        assert_eq!(z.relative_len(&Name::root()), None);
    }

    #[test]
    fn query_keys_are_case_insensitive() {
        let mut buf = [0u8; 256];
        let n = Name::from_ascii("WeB.Vm.").expect("name");
        assert_eq!(query_key(&n, 1, &mut buf), Some("web"));
        let n = Name::from_ascii("A.b-C.vm.").expect("name");
        assert_eq!(query_key(&n, 2, &mut buf), Some("a.b-c"));
        // An escaped dot inside a label can never match a key.
        let n = Name::from_ascii("a\\.b.vm.").expect("name");
        assert_eq!(query_key(&n, 1, &mut buf), None);
        let n = Name::from_labels(vec![&b"w\xffb"[..], b"vm"]).expect("name");
        assert_eq!(query_key(&n, 1, &mut buf), None);
    }

    #[test]
    fn parents_of_a_key() {
        assert_eq!(parent_keys("a.b.c").collect::<Vec<_>>(), ["b.c", "c"]);
        assert_eq!(parent_keys("web").count(), 0);
    }
}
