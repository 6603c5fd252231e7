//! Named records an actor owns and persists in one store tree (images,
//! kernels, later VMs): loaded from the store when the actor starts, so a
//! restarted actor has exactly what was durable.

use std::collections::BTreeMap;

use banger_protocol::{ErrorData, ErrorKind, ImageInfo, KernelInfo};
use serde::{de::DeserializeOwned, Serialize};

use crate::store::{decode_record, StoreClient};

pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Store tree of this kind of record.
    const TREE: &'static str;
    /// What users call it (`image`, `kernel`).
    const KIND: &'static str;
    fn name(&self) -> &str;
}

impl Record for ImageInfo {
    const TREE: &'static str = "images";
    const KIND: &'static str = "image";
    fn name(&self) -> &str {
        &self.name
    }
}

impl Record for KernelInfo {
    const TREE: &'static str = "kernels";
    const KIND: &'static str = "kernel";
    fn name(&self) -> &str {
        &self.name
    }
}

/// Checks a user-chosen name: 1–63 characters of `a-z 0-9 . _ -`,
/// starting with a letter or digit, so it is safe as a file name, in a
/// kernel command line and (for VMs) as a DNS label.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ErrorData> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("invalid {kind} name `{name}`"),
        )
        .with_hint(
            "use 1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
        ))
    }
}

#[derive(Debug)]
pub struct Records<T> {
    map: BTreeMap<String, T>,
}

impl<T: Record> Records<T> {
    pub async fn load(store: &StoreClient) -> Result<Self, ErrorData> {
        let mut map = BTreeMap::new();
        for (_, value) in store.scan_raw(T::TREE, b"").await? {
            let record: T = decode_record(T::TREE, &value)?;
            map.insert(record.name().to_string(), record);
        }
        Ok(Self { map })
    }

    pub fn get(&self, name: &str) -> Option<&T> {
        self.map.get(name)
    }

    pub fn list(&self) -> Vec<T> {
        self.map.values().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.map.values()
    }

    pub fn require(&self, name: &str) -> Result<&T, ErrorData> {
        self.map.get(name).ok_or_else(|| not_found::<T>(name))
    }

    pub fn ensure_free(&self, name: &str) -> Result<(), ErrorData> {
        if self.map.contains_key(name) {
            return Err(ErrorData::new(
                ErrorKind::AlreadyExists,
                format!("{} name `{name}` is taken", T::KIND),
            )
            .with_hint(format!(
                "pick another name or delete it first: banger {} delete {name}",
                T::KIND
            )));
        }
        Ok(())
    }

    /// Persists, then updates the map (the map never holds what is not durable).
    pub async fn insert(&mut self, store: &StoreClient, record: T) -> Result<(), ErrorData> {
        store
            .put(T::TREE, record.name().as_bytes(), &record)
            .await?;
        self.map.insert(record.name().to_string(), record);
        Ok(())
    }

    pub async fn remove(&mut self, store: &StoreClient, name: &str) -> Result<T, ErrorData> {
        let record = self.require(name)?.clone();
        store.delete(T::TREE, name.as_bytes()).await?;
        self.map.remove(name);
        Ok(record)
    }
}

pub fn not_found<T: Record>(name: &str) -> ErrorData {
    ErrorData::new(
        ErrorKind::NotFound,
        format!("no {} named `{name}`", T::KIND),
    )
    .with_hint(format!("see `banger {} list`", T::KIND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        for good in ["debian-bookworm", "a", "k6.1", "x_y", &"a".repeat(63)] {
            assert!(validate_name("image", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "A",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(64),
            ".hidden",
        ] {
            let err = validate_name("image", bad).expect_err(bad);
            assert_eq!(err.kind, ErrorKind::InvalidRequest);
        }
    }
}
