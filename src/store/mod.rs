//! The storage seam: a small interface over bytes ([`Backend`]) that every module
//! with state stores through, and typed tables ([`Table`]) on top of it. The store
//! names no domain type: `grant/`, `record/`, `audit` and `totp/` each own their
//! trees, key layout and values, and keep their own consistency rules through the
//! three atomic operations the seam offers (compare-and-swap, ordered append,
//! counters) rather than through in-process locks, so the same rules hold when
//! several bastions share one database.
//!
//! Two backends: sled ([`SledBackend`], embedded, the default: one bastion) and
//! PostgreSQL ([`PgBackend`]: several bastions on one database). Values are JSON:
//! readable with any dump tool, tolerant of added fields, and small enough for the
//! record sizes involved (recordings are compressed by `record`).

pub mod feed;
#[cfg(test)]
pub mod intercept;
pub mod migrate;
mod pg_backend;
mod sled_backend;
pub(crate) mod table;

use std::path::Path;

use thiserror::Error;

pub use feed::{Change, Subscription};
pub use pg_backend::{
    PgBackend, PgSettings, DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE, PASSWORD_ENV, SCHEMA_VERSION,
};
pub use sled_backend::{sled_config, SledBackend};
pub use table::{Key, Table};
pub use tokio_postgres::config::SslMode;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The backend's message is part of this one, so it is not also a `source`
    /// (which would print it twice in an error chain).
    #[error("database error: {0}")]
    Backend(String),
    #[error("damaged record in tree {tree}: {detail}")]
    Corrupt { tree: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One stored pair.
pub type Entry = (Vec<u8>, Vec<u8>);

/// What [`Backend::remove_prefix`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub entries: u64,
    pub bytes: u64,
}

/// An ordered scan: entries in key order, fetched lazily.
pub type Scan<'a> = Box<dyn Iterator<Item = Result<Entry>> + Send + 'a>;

/// What a database must offer: named trees of ordered byte keys and values, and the
/// atomic operations the modules above build their rules on. Every write is
/// visible to every later read at once; [`Backend::flush`] makes the writes so far
/// durable.
pub trait Backend: Send + Sync {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// The values of `keys`, in order, up to the first key that is absent: the
    /// pieces of one transcript batch. By default one [`Backend::get`] after the
    /// other (sled: its range iterators keep what they read, so a scan would
    /// hold a whole batch and more); PostgreSQL reads them in one round trip.
    fn get_run(&self, tree: &str, keys: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        let mut values = Vec::new();
        for key in keys {
            match self.get(tree, key)? {
                Some(value) => values.push(value),
                None => break,
            }
        }
        Ok(values)
    }

    /// The entries whose keys start with `prefix`, from `from` on (inclusive; the
    /// whole prefix when `None`), in key order.
    fn scan<'a>(&'a self, tree: &str, prefix: &[u8], from: Option<&[u8]>) -> Scan<'a>;

    /// The entry with the greatest key, if the tree has any.
    fn last(&self, tree: &str) -> Result<Option<Entry>>;

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()>;

    /// Writes all of `entries` or none of them.
    fn put_all(&self, tree: &str, entries: Vec<Entry>) -> Result<()>;

    /// The size a caller that stores bulk data (transcripts) cuts it into: the
    /// piece this backend writes and reads most cheaply.
    fn piece_bytes(&self) -> usize;

    /// How many bytes of bulk data a caller writes at once: large enough that a
    /// write's fixed costs (a batch, a statement, a commit) stay small against
    /// its bytes, small enough that it does not hold the store for long. A MiB
    /// by default: on sled, writes of 4 MiB cost 26 % more of the bastion's CPU
    /// per GiB and ran no faster (README, Performance).
    fn write_bytes(&self) -> usize {
        1024 * 1024
    }

    /// How many bulk writes of one caller may be under way at once, each on its
    /// own (they may land in any order, so a crash can keep a later one without
    /// an earlier: the caller then holds a prefix and pieces after a gap, which
    /// its readers must stop at). One by default: sled writes through one log,
    /// and two writes at once were not measured on it.
    fn concurrent_writes(&self) -> usize {
        1
    }

    /// The largest piece a database of this backend may hold, which is also the
    /// largest it accepts from another (`store migrate` copies pieces as they
    /// are): [`Backend::piece_bytes`], unless older versions cut pieces larger.
    fn largest_piece(&self) -> usize {
        self.piece_bytes()
    }

    /// Removes `key`; returns the value it had.
    fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Removes the entries whose keys start with `prefix`, all or none; returns
    /// how many there were and their values' bytes. For a range a caller keeps
    /// small and no one writes into meanwhile (one sealed transcript batch): sled
    /// removes the keys its scan found in one batch, PostgreSQL the range in one
    /// statement.
    fn remove_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Removed>;

    /// Sets `key` to `new` (removes it when `None`) only if its value is still
    /// exactly `old` (absent when `None`). `Ok(false)`: someone changed it first;
    /// nothing was written. On an error the change may or may not have been
    /// made: PostgreSQL's errors say which (`pg_backend::settle_change`), and
    /// sled's fail the whole store until it is reopened
    /// ([`Backend::failure_is_sticky`]).
    fn compare_and_swap(
        &self,
        tree: &str,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool>;

    /// Adds one to the counter `name` (absent counts as 0) and returns the new
    /// value: every caller, in any process sharing the database, gets a different one.
    fn increment(&self, name: &str) -> Result<u64>;

    /// The counter's current value (0 if it was never incremented).
    fn counter(&self, name: &str) -> Result<u64>;

    /// Raises the counter to `value` if it is lower (migrations of older
    /// databases, whose numbers came from elsewhere); never lowers it.
    fn seed_counter(&self, name: &str, value: u64) -> Result<()>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<()>;

    /// The names of the trees that hold at least one entry (`store migrate`
    /// copies them all).
    fn trees(&self) -> Result<Vec<String>>;

    /// Every counter and its value. Counter names never contain `/`.
    fn counters(&self) -> Result<Vec<(String, u64)>>;

    /// The keys changed in `tree` from now on, by this process or by any other
    /// sharing the database (see [`feed`]: bounded, with a resync marker when
    /// changes were dropped). Each subscription costs the backend a little for
    /// as long as it lives: subscribe once per tree and consumer, not per change.
    fn subscribe(&self, tree: &str) -> Result<Subscription>;

    /// Why the database cannot be written right now, if it cannot.
    fn failure(&self) -> Option<String>;

    /// Whether a [`Backend::failure`] lasts until the process reopens the
    /// database (sled: its write errors are sticky) rather than clearing by
    /// itself once the database answers again (a server that was unreachable).
    fn failure_is_sticky(&self) -> bool;

    /// Whether several bastions may share this database (PostgreSQL), rather
    /// than one process holding it (sled).
    fn is_shared(&self) -> bool;
}

/// Which backend holds the data (`[store]` in the config).
#[derive(Debug, Clone, Default)]
pub enum Settings {
    /// sled in `DATA_DIR/db`.
    #[default]
    Sled,
    Postgres(PgSettings),
}

/// The database: one backend, shared by the modules' tables.
pub struct Store {
    backend: Box<dyn Backend>,
}

impl Store {
    /// Opens the database `settings` name: sled in `data_dir/db` (created if
    /// missing), or PostgreSQL (migrated to this build's schema).
    pub fn open(settings: &Settings, data_dir: &Path) -> Result<Store> {
        Ok(Store::on(match settings {
            Settings::Sled => Box::new(SledBackend::open(&data_dir.join("db"))?),
            Settings::Postgres(pg) => Box::new(PgBackend::open(pg)?),
        }))
    }

    /// Opens (or creates) the sled database in `data_dir/db`.
    pub fn sled(data_dir: &Path) -> Result<Store> {
        Store::open(&Settings::Sled, data_dir)
    }

    /// A store on any backend.
    pub fn on(backend: Box<dyn Backend>) -> Store {
        Store { backend }
    }

    /// The raw seam, for modules that lay out bytes themselves (transcripts).
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Why the store cannot be written right now, if it cannot.
    pub fn failure(&self) -> Option<String> {
        self.backend.failure()
    }

    /// Whether only a restart (a fresh open) clears a [`Store::failure`].
    pub fn failure_is_sticky(&self) -> bool {
        self.backend.failure_is_sticky()
    }

    /// Forces everything written so far to disk.
    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }

    /// The atomic ordered append: writes the value `build` makes under the key
    /// after the tree's last one (keys are big-endian sequence numbers from 1), and
    /// returns that number and value. `build` gets the number and the previous
    /// value, so a value may depend on its predecessor (a hash chain). The write is
    /// an insert-if-absent: when another appender took the number first, the
    /// append starts over from the new last entry, so two appenders never write
    /// the same number or link to the same predecessor.
    pub fn append(
        &self,
        tree: &str,
        mut build: impl FnMut(u64, Option<&[u8]>) -> Result<Vec<u8>>,
    ) -> Result<(u64, Vec<u8>)> {
        loop {
            let last = self.backend.last(tree)?;
            let seq = match &last {
                Some((key, _)) => u64::decode(key)
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "(ordered append)",
                        detail: format!("key of {} bytes is not a sequence number", key.len()),
                    })?
                    .saturating_add(1),
                None => 1,
            };
            let value = build(seq, last.as_ref().map(|(_, v)| v.as_slice()))?;
            if self
                .backend
                .compare_and_swap(tree, &seq.encode(), None, Some(&value))?
            {
                return Ok((seq, value));
            }
        }
    }

    /// A fresh, strictly increasing number from counter `name` (survives restarts).
    pub fn next_id(&self, name: &str) -> Result<u64> {
        self.backend.increment(name)
    }
}

/// The tree where modules keep schema versions and other small values.
pub const META: &str = "meta";

/// The schema version `module` recorded (0 before its first migration).
pub fn schema_version(store: &Store, module: &str) -> Result<u64> {
    let key = format!("schema/{module}");
    Ok(store
        .backend()
        .get(META, key.as_bytes())?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Records that `module`'s data now has schema `version` (after its migration).
pub fn set_schema_version(store: &Store, module: &str, version: u64) -> Result<()> {
    let key = format!("schema/{module}");
    store
        .backend()
        .put(META, key.as_bytes(), &version.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        (dir, store)
    }

    /// A swap from a value that changed meanwhile writes nothing and says so.
    #[test]
    fn compare_and_swap_refuses_a_stale_value() {
        let (_dir, store) = store();
        let seam = store.backend();
        assert!(seam.compare_and_swap("t", b"k", None, Some(b"1")).unwrap());
        assert!(!seam.compare_and_swap("t", b"k", None, Some(b"2")).unwrap());
        assert!(seam
            .compare_and_swap("t", b"k", Some(b"1"), Some(b"2"))
            .unwrap());
        assert!(!seam
            .compare_and_swap("t", b"k", Some(b"1"), Some(b"3"))
            .unwrap());
        assert_eq!(seam.get("t", b"k").unwrap().unwrap(), b"2");
        assert!(seam.compare_and_swap("t", b"k", Some(b"2"), None).unwrap());
        assert_eq!(seam.get("t", b"k").unwrap(), None);
    }

    /// Appenders on many threads get every number once, in order, each value
    /// built on the one before it.
    #[test]
    fn ordered_appends_never_fork() {
        let (_dir, store) = store();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        store
                            .append("log", |seq, previous| {
                                let before = previous.map_or(0, |p| {
                                    u64::from_be_bytes(p.try_into().expect("8 bytes"))
                                });
                                assert_eq!(before + 1, seq);
                                Ok(seq.to_be_bytes().to_vec())
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let keys: Vec<u64> = store
            .backend()
            .scan("log", b"", None)
            .map(|e| u64::decode(&e.unwrap().0).unwrap())
            .collect();
        assert_eq!(keys, (1..=1000).collect::<Vec<_>>());
    }

    /// Scans stay inside their prefix, start where asked and come back in key
    /// order; typed tables read the same entries.
    #[test]
    fn scans_by_prefix_and_range() {
        let (_dir, store) = store();
        let table: Table<String, u32> = Table::new(&store, "t");
        for (key, value) in [("b/2", 2), ("a/1", 1), ("b/1", 1), ("b/3", 3), ("c/1", 1)] {
            table.put(&key.to_string(), &value).unwrap();
        }
        let keys = |prefix: &[u8], from: Option<&str>| -> Vec<String> {
            let from = from.map(str::to_string);
            table
                .scan(prefix, from.as_ref())
                .map(|e| e.unwrap().0)
                .collect()
        };
        assert_eq!(keys(b"b/", None), ["b/1", "b/2", "b/3"]);
        assert_eq!(keys(b"b/", Some("b/2")), ["b/2", "b/3"]);
        assert_eq!(keys(b"", Some("b/3")), ["b/3", "c/1"]);
        assert_eq!(keys(b"d", None), Vec::<String>::new());
        assert_eq!(table.last().unwrap(), Some(("c/1".to_string(), 1)));
        let (value, bytes) = table.get_versioned(&"b/2".to_string()).unwrap().unwrap();
        assert!(table
            .swap(&"b/2".to_string(), Some(&bytes), &(value + 1))
            .unwrap());
        assert!(!table.swap(&"b/2".to_string(), Some(&bytes), &0).unwrap());
        assert_eq!(table.get(&"b/2".to_string()).unwrap(), Some(3));
    }

    #[test]
    fn counters_hand_out_each_number_once() {
        let (_dir, store) = store();
        assert_eq!(store.backend().counter("c").unwrap(), 0);
        store.backend().seed_counter("c", 41).unwrap();
        assert_eq!(store.next_id("c").unwrap(), 42);
        store.backend().seed_counter("c", 7).unwrap();
        assert_eq!(store.next_id("c").unwrap(), 43, "seeding never goes back");
        assert_eq!(schema_version(&store, "m").unwrap(), 0);
        set_schema_version(&store, "m", 2).unwrap();
        assert_eq!(schema_version(&store, "m").unwrap(), 2);
    }
}
