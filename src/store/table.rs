//! Typed tables over the seam: keys encoded so that byte order is the natural
//! order, values as JSON.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Result, Store, StoreError};

/// A key type and its byte form, which sorts as the keys do.
pub trait Key: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// Big-endian, so sequence numbers scan in the order things happened.
impl Key for u64 {
    fn encode(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}

impl Key for String {
    fn encode(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<String> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// One tree of `K → V` (JSON).
pub struct Table<K, V> {
    store: Arc<Store>,
    tree: &'static str,
    kinds: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Table {
            store: self.store.clone(),
            tree: self.tree,
            kinds: PhantomData,
        }
    }
}

impl<K: Key, V: Serialize + DeserializeOwned> Table<K, V> {
    pub fn new(store: &Arc<Store>, tree: &'static str) -> Table<K, V> {
        Table {
            store: store.clone(),
            tree,
            kinds: PhantomData,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn get(&self, key: &K) -> Result<Option<V>> {
        Ok(self.get_versioned(key)?.map(|(value, _)| value))
    }

    /// The value and its stored bytes, to [`Table::swap`] from.
    pub fn get_versioned(&self, key: &K) -> Result<Option<(V, Vec<u8>)>> {
        match self.store.backend().get(self.tree, &key.encode())? {
            Some(bytes) => Ok(Some((self.parse(&bytes)?, bytes))),
            None => Ok(None),
        }
    }

    pub fn put(&self, key: &K, value: &V) -> Result<()> {
        self.store
            .backend()
            .put(self.tree, &key.encode(), &to_json(value))
    }

    pub fn remove(&self, key: &K) -> Result<()> {
        self.store.backend().remove(self.tree, &key.encode())?;
        Ok(())
    }

    /// Writes `new` only if the stored bytes are still `old` (absent: `None`).
    /// `Ok(false)`: it changed meanwhile; read it again and redo the change.
    pub fn swap(&self, key: &K, old: Option<&[u8]>, new: &V) -> Result<bool> {
        self.store
            .backend()
            .compare_and_swap(self.tree, &key.encode(), old, Some(&to_json(new)))
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(K, V)>> + '_ {
        self.scan(b"", None)
    }

    /// The entries whose key bytes start with `prefix`, from `from` on.
    pub fn scan<'a>(
        &'a self,
        prefix: &[u8],
        from: Option<&K>,
    ) -> impl Iterator<Item = Result<(K, V)>> + 'a {
        let from = from.map(Key::encode);
        self.store
            .backend()
            .scan(self.tree, prefix, from.as_deref())
            .map(|entry| {
                let (key, value) = entry?;
                Ok((self.parse_key(&key)?, self.parse(&value)?))
            })
    }

    /// Every key, in order (values are not parsed).
    pub fn keys(&self) -> impl Iterator<Item = Result<K>> + '_ {
        self.store
            .backend()
            .scan(self.tree, b"", None)
            .map(|entry| self.parse_key(&entry?.0))
    }

    /// The entry with the greatest key.
    pub fn last(&self) -> Result<Option<(K, V)>> {
        match self.store.backend().last(self.tree)? {
            Some((key, value)) => Ok(Some((self.parse_key(&key)?, self.parse(&value)?))),
            None => Ok(None),
        }
    }

    pub fn parse(&self, bytes: &[u8]) -> Result<V> {
        serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
            tree: self.tree,
            detail: err.to_string(),
        })
    }

    fn parse_key(&self, bytes: &[u8]) -> Result<K> {
        K::decode(bytes).ok_or_else(|| StoreError::Corrupt {
            tree: self.tree,
            detail: format!(
                "a key of {} bytes that is not one of this tree's",
                bytes.len()
            ),
        })
    }
}

/// Index keys are made of these parts, so that byte order is the order a list
/// wants: a name ([`name_prefix`]), a time ([`millis`]), and last the number of the
/// record the entry points to ([`trailing_u64`]).
///
/// `name 0x00`: names (users, targets) never hold a NUL byte, so one name's prefix
/// never starts another's. A hostile name with a NUL only finds entries the reader
/// then re-checks against the record.
pub fn name_prefix(name: &str) -> Vec<u8> {
    let mut prefix = name.as_bytes().to_vec();
    prefix.push(0);
    prefix
}

/// Milliseconds since 1970, the time part of an index key (times before it count
/// as 0).
pub fn millis(at: chrono::DateTime<chrono::Utc>) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

/// The record number an index key ends with (its last 8 bytes, big-endian).
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    u64::decode(&key[key.len().checked_sub(8)?..])
}

/// A value's stored form.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}
