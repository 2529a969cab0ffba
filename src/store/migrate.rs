//! `portcullis store migrate`: copies one database into another, tree by tree and
//! counter by counter, byte for byte. Values are copied as stored, so every digest
//! in the audit chain and every transcript digest still matches, ids stay what they
//! were, and `audit verify --recordings` passes on the copy. Memory holds one batch
//! of entries, whatever the database holds.

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{Backend, Entry, StoreError};

/// Entries written per atomic write.
const BATCH_ENTRIES: usize = 512;
/// Bytes (keys and values) written per atomic write, at most (a single larger
/// entry goes alone).
const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the destination database already holds data (trees: {}); migrate into an empty \
         database, so that two histories are never mixed",
        .0.join(", ")
    )]
    NotEmpty(Vec<String>),
    #[error("the copy of tree {0} does not match the original after copying; nothing was deleted from the source")]
    Mismatch(String),
    #[error(
        "the source stores transcripts in pieces of up to {from} bytes, and the destination \
         keeps pieces of at most {to} well (sled holds larger values in memory for good); \
         migrate from sled into PostgreSQL, not back"
    )]
    PiecesTooLarge { from: usize, to: usize },
}

/// What was copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub trees: usize,
    pub entries: u64,
    pub bytes: u64,
    pub counters: usize,
}

/// Copies every tree and counter of `from` into the empty `to`, then reads both
/// back and compares them tree by tree. `progress` hears of each tree as it starts.
pub fn copy(
    from: &dyn Backend,
    to: &dyn Backend,
    mut progress: impl FnMut(&str),
) -> Result<Copied, MigrateError> {
    let occupied = to.trees()?;
    if !occupied.is_empty() {
        return Err(MigrateError::NotEmpty(occupied));
    }
    // Values are copied as they are, so pieces cut for the source must suit the
    // destination.
    if from.largest_piece() > to.largest_piece() {
        return Err(MigrateError::PiecesTooLarge {
            from: from.largest_piece(),
            to: to.largest_piece(),
        });
    }
    let mut copied = Copied::default();
    for tree in from.trees()? {
        progress(&tree);
        copy_tree(from, to, &tree, &mut copied)?;
        if fingerprint(from, &tree)? != fingerprint(to, &tree)? {
            return Err(MigrateError::Mismatch(tree));
        }
        copied.trees += 1;
    }
    for (name, value) in from.counters()? {
        to.seed_counter(&name, value)?;
        copied.counters += 1;
    }
    to.flush()?;
    Ok(copied)
}

fn copy_tree(
    from: &dyn Backend,
    to: &dyn Backend,
    tree: &str,
    copied: &mut Copied,
) -> Result<(), StoreError> {
    let mut batch: Vec<Entry> = Vec::new();
    let mut batch_bytes = 0;
    for entry in from.scan(tree, b"", None) {
        let (key, value) = entry?;
        batch_bytes += key.len() + value.len();
        copied.entries += 1;
        copied.bytes += (key.len() + value.len()) as u64;
        batch.push((key, value));
        if batch.len() >= BATCH_ENTRIES || batch_bytes >= BATCH_BYTES {
            to.put_all(tree, std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        to.put_all(tree, batch)?;
    }
    Ok(())
}

/// A digest of a tree's entries in key order.
fn fingerprint(backend: &dyn Backend, tree: &str) -> Result<[u8; 32], StoreError> {
    let mut digest = Sha256::new();
    for entry in backend.scan(tree, b"", None) {
        let (key, value) = entry?;
        for part in [&key, &value] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part);
        }
    }
    Ok(digest.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledBackend;

    fn sled() -> (tempfile::TempDir, SledBackend) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(&dir.path().join("db")).unwrap();
        (dir, backend)
    }

    #[test]
    fn copies_every_tree_and_counter_byte_for_byte() {
        let (_a, from) = sled();
        for n in 0..2000u32 {
            from.put(
                "chunks",
                &n.to_be_bytes(),
                &vec![n as u8; (n % 300) as usize],
            )
            .unwrap();
        }
        from.put("requests", b"k", b"{\"id\":\"abc\"}").unwrap();
        from.put(crate::store::META, b"schema/grants", &1u64.to_be_bytes())
            .unwrap();
        for _ in 0..7 {
            from.increment("session_id").unwrap();
        }
        let (_b, to) = sled();
        let mut seen = Vec::new();
        let copied = copy(&from, &to, |tree| seen.push(tree.to_string())).unwrap();
        assert_eq!(copied.trees, 3, "{seen:?}");
        assert_eq!(copied.entries, 2000 + 1 + 2);
        assert_eq!(copied.counters, 1);
        for tree in from.trees().unwrap() {
            assert_eq!(
                fingerprint(&from, &tree).unwrap(),
                fingerprint(&to, &tree).unwrap()
            );
        }
        assert_eq!(to.counter("session_id").unwrap(), 7);
        assert_eq!(
            to.increment("session_id").unwrap(),
            8,
            "ids go on where they were"
        );
    }

    #[test]
    fn refuses_a_destination_that_holds_data() {
        let (_a, from) = sled();
        from.put("requests", b"k", b"v").unwrap();
        let (_b, to) = sled();
        to.put("sessions", b"1", b"other history").unwrap();
        let refused = copy(&from, &to, |_| {}).unwrap_err().to_string();
        assert!(
            refused.contains("already holds data (trees: sessions)"),
            "{refused}"
        );
        assert_eq!(to.get("requests", b"k").unwrap(), None);
    }
}
