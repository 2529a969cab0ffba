//! The seam on sled 0.34: one sled `Db` in `DATA_DIR/db`, one sled tree per named
//! tree, counters in the `meta` tree.
//!
//! A failed write poisons sled for good: once it has seen an I/O error (a full
//! disk), every later write returns it again, even after space was freed. The
//! backend remembers the first such error ([`Backend::failure`]) so the health
//! check can report it and the server can restart itself once space is back.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::feed::{self, Change, Sink};
use super::{Backend, Entry, Removed, Result, Scan, StoreError, Subscription, META};

/// How often a subscription's thread looks whether its subscriber is gone while
/// the tree is quiet.
const SUBSCRIBER_CHECK: Duration = Duration::from_millis(500);

/// sled's page cache; its default (1 GiB) would let recordings grow the bastion's
/// memory far beyond what the relay uses.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// sled's log segment size for new databases (sled's default is 512 KiB). A log
/// message over a quarter of a segment becomes a file of its own under `blobs/`,
/// which sled rewrites whole and frees late; 2 MiB segments keep transcript pieces
/// ([`Backend::piece_bytes`]) and most leaf rewrites in the log, where its segment
/// cleaner reclaims them. A database keeps the segment size it was created with
/// (sled refuses to open it with another).
const SEGMENT_BYTES: usize = 2 * 1024 * 1024;

pub struct SledBackend {
    db: sled::Db,
    /// The first write error sled returned: from then on sled fails every write.
    failure: Mutex<Option<String>>,
}

impl From<sled::Error> for StoreError {
    fn from(err: sled::Error) -> StoreError {
        StoreError::Backend(err.to_string())
    }
}

impl SledBackend {
    /// Opens (or creates) the database in directory `db`.
    pub fn open(db: &Path) -> Result<SledBackend> {
        Ok(SledBackend {
            db: sled_config(db).open()?,
            failure: Mutex::new(None),
        })
    }

    fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// Passes a write's result on, remembering the first I/O error.
    fn written<T>(&self, result: sled::Result<T>) -> Result<T> {
        if let Err(err @ (sled::Error::Io(_) | sled::Error::ReportableBug(_))) = &result {
            let mut failure = self.failure.lock().expect("store lock poisoned");
            if failure.is_none() {
                tracing::error!(error = %err, "the database cannot be written; refusing everything that needs it");
                *failure = Some(err.to_string());
            }
        }
        Ok(result?)
    }
}

impl Backend for SledBackend {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn scan<'a>(&'a self, tree: &str, prefix: &[u8], from: Option<&[u8]>) -> Scan<'a> {
        let tree = match self.tree(tree) {
            Ok(tree) => tree,
            Err(err) => return Box::new(std::iter::once(Err(err))),
        };
        let prefix = prefix.to_vec();
        let start = match from {
            Some(from) if from > prefix.as_slice() => from.to_vec(),
            _ => prefix.clone(),
        };
        let entries = tree.range(start..);
        Box::new(
            entries
                .take_while(move |entry| {
                    entry
                        .as_ref()
                        .map_or(true, |(key, _)| key.starts_with(&prefix))
                })
                .map(|entry| {
                    let (key, value) = entry?;
                    Ok((key.to_vec(), value.to_vec()))
                }),
        )
    }

    fn last(&self, tree: &str) -> Result<Option<Entry>> {
        Ok(self
            .tree(tree)?
            .last()?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.written(self.tree(tree)?.insert(key, value))?;
        Ok(())
    }

    /// One entry is one `insert`, atomic by itself. A sled batch is not free: every
    /// `apply_batch` seals and writes sled's current I/O buffer twice (with a
    /// `sync_file_range` each, on a thread pool that wakes all its idle threads per
    /// write). One a second per idle-ish session made 500 sessions' keystroke
    /// flushes cost hundreds of buffer writes a second, which showed as the
    /// bastion's echo-latency tail in `benches/load.rs`.
    fn put_all(&self, tree: &str, mut entries: Vec<Entry>) -> Result<()> {
        if entries.len() == 1 {
            let (key, value) = entries.pop().expect("one entry");
            return self.put(tree, &key, &value);
        }
        let mut batch = sled::Batch::default();
        for (key, value) in entries {
            batch.insert(key, value);
        }
        self.written(self.tree(tree)?.apply_batch(batch))
    }

    /// sled 0.34 keeps large values in memory whatever its cache capacity: its
    /// cache evicts only once 64 accesses have queued up in one of its 256
    /// shards, which leaves of large values rarely reach. `benches/pieces.rs`
    /// writes and reads back 1 GiB of random bytes per piece size: 16 KiB pieces
    /// end at 126 to 204 MiB of RSS, 64 KiB pieces at 851 MiB, 256 KiB at 1 GiB;
    /// every size writes 3 to 3.7 bytes per byte and keeps 1.37 to 1.62 on disk
    /// (README, "What sled itself costs, by piece size").
    fn piece_bytes(&self) -> usize {
        16 * 1024
    }

    fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .written(self.tree(tree)?.remove(key))?
            .map(|v| v.to_vec()))
    }

    fn remove_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Removed> {
        let tree = self.tree(tree)?;
        let mut removed = Removed::default();
        let mut batch = sled::Batch::default();
        for entry in tree.scan_prefix(prefix) {
            let (key, value) = entry?;
            removed.entries += 1;
            removed.bytes += value.len() as u64;
            batch.remove(key);
        }
        if removed.entries > 0 {
            self.written(tree.apply_batch(batch))?;
        }
        Ok(removed)
    }

    fn compare_and_swap(
        &self,
        tree: &str,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        let swapped = self.written(self.tree(tree)?.compare_and_swap(key, old, new))?;
        Ok(swapped.is_ok())
    }

    fn increment(&self, name: &str) -> Result<u64> {
        let next = self.written(self.tree(META)?.update_and_fetch(name, |old| {
            Some((decode_counter(old) + 1).to_be_bytes().to_vec())
        }))?;
        Ok(decode_counter(next.as_deref()))
    }

    fn counter(&self, name: &str) -> Result<u64> {
        Ok(decode_counter(self.tree(META)?.get(name)?.as_deref()))
    }

    fn seed_counter(&self, name: &str, value: u64) -> Result<()> {
        self.written(self.tree(META)?.update_and_fetch(name, |old| {
            Some(decode_counter(old).max(value).to_be_bytes().to_vec())
        }))?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.written(self.db.flush())?;
        Ok(())
    }

    fn trees(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for name in self.db.tree_names() {
            // sled's own default tree is not one of ours.
            if name.as_ref() == b"__sled__default" {
                continue;
            }
            let name = String::from_utf8(name.to_vec()).map_err(|_| StoreError::Corrupt {
                tree: "(tree names)",
                detail: "a tree name is not UTF-8".into(),
            })?;
            if !self.tree(&name)?.is_empty() {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Counters share the `meta` tree with schema versions and the like, whose
    /// keys have a `/` (`schema/grants`): a counter is an 8-byte value under a
    /// plain name.
    fn counters(&self) -> Result<Vec<(String, u64)>> {
        let mut counters = Vec::new();
        for entry in self.tree(META)?.iter() {
            let (key, value) = entry?;
            let Ok(name) = std::str::from_utf8(&key) else {
                continue;
            };
            if !name.contains('/') && value.len() == 8 {
                counters.push((name.to_string(), decode_counter(Some(&value))));
            }
        }
        Ok(counters)
    }

    /// sled's `watch_prefix` makes a writer wait when its subscriber's queue (1024
    /// events) is full, so a thread of its own drains it into the subscription's
    /// bounded queue, which drops and resyncs instead. The thread ends when the
    /// subscription is dropped or the database closes.
    fn subscribe(&self, tree: &str) -> Result<Subscription> {
        let mut events = self.tree(tree)?.watch_prefix(vec![]);
        let (sink, subscription) = feed::channel();
        std::thread::Builder::new()
            .name(format!("sled-watch-{tree}"))
            .spawn(move || forward(&mut events, &sink))
            .map_err(|err| StoreError::Backend(format!("cannot start a watch thread: {err}")))?;
        Ok(subscription)
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().expect("store lock poisoned").clone()
    }

    fn failure_is_sticky(&self) -> bool {
        true
    }

    fn is_shared(&self) -> bool {
        false
    }
}

/// Hands sled's events to `sink` until either end goes away.
fn forward(events: &mut sled::Subscriber, sink: &Sink) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match events.next_timeout(SUBSCRIBER_CHECK) {
            Ok(event) => {
                if !sink.deliver(Change::Key(event.key().to_vec())) {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) if !sink.is_closed() => {}
            Err(_) => return,
        }
    }
}

/// A counter's stored form: 8 bytes, big-endian (absent or damaged: 0).
fn decode_counter(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

/// sled's settings for the database in `db` (`DATA_DIR/db`); tools and tests that
/// open the files directly must use them too (sled refuses another segment size).
pub fn sled_config(db: &Path) -> sled::Config {
    sled::Config::new()
        .segment_size(existing_segment_size(db).unwrap_or(SEGMENT_BYTES))
        .path(db)
        .flush_every_ms(Some(200))
        .cache_capacity(CACHE_BYTES)
}

/// The segment size an existing database was created with (sled's `conf` file
/// says `segment_size: N`), so that databases created before [`SEGMENT_BYTES`]
/// open as they are.
fn existing_segment_size(db: &Path) -> Option<usize> {
    let conf = std::fs::read_to_string(db.join("conf")).ok()?;
    conf.lines()
        .find_map(|line| line.strip_prefix("segment_size: "))
        .and_then(|n| n.trim().parse().ok())
}
