//! The embedded database: one sled `Db` in the data dir, one tree per kind of record,
//! typed access on top. Keys are big-endian sequence numbers so that scans come back
//! in the order things happened.
//!
//! Values are JSON: readable with any sled dump tool, tolerant of added fields, and
//! small enough for the record sizes involved (recordings are compressed separately).
//!
//! A failed write poisons sled for good: once it has seen an I/O error (a full
//! disk), every later write returns it again, even after space was freed. The
//! store remembers the first such error ([`Store::failure`]) so the health check
//! can report it and the server can restart itself once space is back.

use std::path::Path;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::audit::AuditEvent;
use crate::grant::Grant;
use crate::record::SessionRecord;

/// sled's page cache; its default (1 GiB) would let recordings grow the bastion's
/// memory far beyond what the relay uses.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Largest value a stored batch is split into. sled 0.34 keeps every value larger
/// than a few pages in memory for as long as the process lives, whatever its cache
/// capacity: 300 MiB of 1 MiB values took 300 MiB of RSS, and wrote 2.8 bytes per
/// byte. Cut into 16 KiB pieces the same data plateaus at about 135 MiB of RSS with
/// a 64 MiB cache and writes 1.4 bytes per byte (measured with sled 0.34.7 on
/// incompressible data; 8 KiB pieces: 76 MiB, 1.66x; 4 KiB: 35 MiB, 1.76x).
const PIECE_BYTES: usize = 16 * 1024;

/// sled's log segment size for new databases (sled's default is 512 KiB). A log
/// message over a quarter of a segment becomes a file of its own under `blobs/`,
/// which sled rewrites whole and frees late; 2 MiB segments keep transcript values
/// (64 KiB, see `record`) and most leaf rewrites in the log, where its segment
/// cleaner reclaims them. A database keeps the segment size it was created with
/// (sled refuses to open it with another).
const SEGMENT_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum StoreError {
    /// sled's message is part of this one, so it is not also a `source` (which
    /// would print it twice in an error chain).
    #[error("database error: {0}")]
    Sled(sled::Error),
    #[error("damaged record in tree {tree}: {detail}")]
    Corrupt { tree: &'static str, detail: String },
}

impl From<sled::Error> for StoreError {
    fn from(err: sled::Error) -> StoreError {
        StoreError::Sled(err)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Typed access to the database.
pub struct Store {
    db: sled::Db,
    /// seq → [`Grant`].
    requests: sled::Tree,
    /// grant id → seq.
    request_ids: sled::Tree,
    /// seq → [`AuditEvent`], a hash chain.
    audit: sled::Tree,
    /// session id → [`SessionRecord`].
    sessions: sled::Tree,
    /// (session id, batch index) → zstd-compressed transcript batch.
    chunks: sled::Tree,
    /// Counters and other small values.
    meta: sled::Tree,
    /// user → TOTP state (secret sealed by `totp.rs`).
    users_state: sled::Tree,
    /// Serialises appends so each event links to the one before it.
    audit_append: Mutex<()>,
    /// Fault injection: makes transcript writes fail, as a full disk would.
    fail_batches: std::sync::atomic::AtomicBool,
    /// The first write error sled returned: from then on sled fails every write.
    failure: Mutex<Option<String>>,
}

impl Store {
    /// Opens (or creates) the database in `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let db = sled_config(&data_dir.join("db")).open()?;
        Ok(Store {
            requests: db.open_tree("requests")?,
            request_ids: db.open_tree("request_ids")?,
            audit: db.open_tree("audit")?,
            sessions: db.open_tree("sessions")?,
            chunks: db.open_tree("chunks")?,
            meta: db.open_tree("meta")?,
            users_state: db.open_tree("users_state")?,
            audit_append: Mutex::new(()),
            fail_batches: std::sync::atomic::AtomicBool::new(false),
            failure: Mutex::new(None),
            db,
        })
    }

    /// Why the store cannot be written any more, if it cannot: sled's errors are
    /// sticky, so only a restart (a fresh open) clears it.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("store lock poisoned").clone()
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

    /// A fresh, strictly increasing number (survives restarts).
    pub fn next_seq(&self) -> Result<u64> {
        self.written(self.db.generate_id())
    }

    /// Writes `grant` and makes it durable before returning: a decision that was
    /// reported to a user must survive a crash.
    pub fn save_grant(&self, grant: &Grant) -> Result<()> {
        let key = grant.seq.to_be_bytes();
        self.written((|| {
            self.requests.insert(key, to_json(grant))?;
            self.request_ids.insert(grant.id.as_bytes(), &key)?;
            self.db.flush()?;
            Ok(())
        })())
    }

    pub fn grant(&self, id: &str) -> Result<Option<Grant>> {
        let Some(key) = self.request_ids.get(id.as_bytes())? else {
            return Ok(None);
        };
        match self.requests.get(key)? {
            Some(value) => from_json("requests", &value).map(Some),
            None => Ok(None),
        }
    }

    pub fn id_taken(&self, id: &str) -> Result<bool> {
        Ok(self.request_ids.contains_key(id.as_bytes())?)
    }

    /// Every grant ever filed, oldest first.
    pub fn grants(&self) -> Result<Vec<Grant>> {
        self.requests
            .iter()
            .values()
            .map(|value| from_json("requests", &value?))
            .collect()
    }

    /// Appends an event to the audit chain, linking it to the previous one, and
    /// returns it as stored, on disk: callers act only once their event is durable,
    /// so an action can never outlive a lost event (a full disk fails the append,
    /// and with it the action).
    pub fn append_audit(&self, mut event: AuditEvent) -> Result<AuditEvent> {
        let _guard = self.audit_append.lock().expect("audit lock poisoned");
        let previous: Option<AuditEvent> = match self.audit.last()? {
            Some((_, value)) => Some(from_json("audit", &value)?),
            None => None,
        };
        event.link_after(previous.as_ref());
        self.written((|| {
            self.audit
                .insert(event.seq.to_be_bytes(), to_json(&event))?;
            self.db.flush()
        })())?;
        Ok(event)
    }

    /// Audit events in chain order.
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>> {
        self.audit
            .iter()
            .values()
            .map(|value| from_json("audit", &value?))
            .collect()
    }

    /// The last audit event, the head of the chain.
    pub fn audit_head(&self) -> Result<Option<AuditEvent>> {
        match self.audit.last()? {
            Some((_, value)) => from_json("audit", &value).map(Some),
            None => Ok(None),
        }
    }

    /// A fresh session id: 1, 2, 3… (short enough to type after `replay`).
    pub fn next_session_id(&self) -> Result<u64> {
        let next = self.written(self.meta.update_and_fetch("session_id", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        }))?;
        let bytes = next.expect("update_and_fetch always stores a value");
        Ok(u64::from_be_bytes(
            bytes.as_ref().try_into().expect("8-byte counter"),
        ))
    }

    /// The last session id [`Store::next_session_id`] handed out (0 if none).
    pub fn last_session_id(&self) -> Result<u64> {
        Ok(self
            .meta
            .get("session_id")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    pub fn save_session(&self, session: &SessionRecord) -> Result<()> {
        self.written(
            self.sessions
                .insert(session.id.to_be_bytes(), to_json(session)),
        )?;
        Ok(())
    }

    pub fn session(&self, id: u64) -> Result<Option<SessionRecord>> {
        match self.sessions.get(id.to_be_bytes())? {
            Some(value) => from_json("sessions", &value).map(Some),
            None => Ok(None),
        }
    }

    /// Every recorded session, oldest first.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>> {
        self.sessions
            .iter()
            .values()
            .map(|value| from_json("sessions", &value?))
            .collect()
    }

    /// Stores one batch, cut into pieces of at most [`PIECE_BYTES`] under keys
    /// that sort in order, in one atomic write.
    pub fn put_batch(&self, session: u64, index: u32, compressed: &[u8]) -> Result<()> {
        if self.fail_batches.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
                "injected write failure",
            ))));
        }
        let mut pieces = sled::Batch::default();
        for (n, piece) in compressed.chunks(PIECE_BYTES).enumerate() {
            pieces.insert(&piece_key(session, index, n as u32)[..], piece);
        }
        self.written(self.chunks.apply_batch(pieces))?;
        Ok(())
    }

    /// One stored batch of a session, if there is one at `index` (batches are
    /// numbered from 0 without gaps). Readers go batch by batch, so memory holds one
    /// batch, never a whole transcript. Pieces are fetched one `get` at a time:
    /// sled's range iterators keep what they read in memory (reading 512 MiB through
    /// `scan_prefix` grew RSS by 440 MiB; by `get`, it levels off near 240 MiB).
    pub fn batch(&self, session: u64, index: u32) -> Result<Option<Vec<u8>>> {
        // A batch stored whole under its own key, as recordings made before
        // batches were cut into pieces are.
        if let Some(whole) = self.chunks.get(batch_key(session, index))? {
            return Ok(Some(whole.to_vec()));
        }
        let mut batch = Vec::new();
        let mut piece = 0;
        while let Some(bytes) = self.chunks.get(piece_key(session, index, piece))? {
            batch.extend_from_slice(&bytes);
            piece += 1;
        }
        Ok((piece > 0).then_some(batch))
    }

    /// Removes a session's transcript (retention); returns the bytes freed.
    pub fn delete_batches(&self, session: u64) -> Result<u64> {
        let mut freed = 0;
        for entry in self.chunks.scan_prefix(session.to_be_bytes()) {
            let (key, value) = entry?;
            freed += value.len() as u64;
            self.written(self.chunks.remove(key))?;
        }
        Ok(freed)
    }

    pub fn user_state<T: DeserializeOwned>(&self, user: &str) -> Result<Option<T>> {
        match self.users_state.get(user.as_bytes())? {
            Some(value) => from_json("users_state", &value).map(Some),
            None => Ok(None),
        }
    }

    /// Stores a user's state durably (a consumed TOTP step must stay consumed).
    pub fn put_user_state<T: Serialize>(&self, user: &str, state: &T) -> Result<()> {
        self.written((|| {
            self.users_state.insert(user.as_bytes(), to_json(state))?;
            self.db.flush()
        })())?;
        Ok(())
    }

    /// Every user with stored state (TOTP), by name.
    pub fn users_with_state(&self) -> Result<Vec<String>> {
        self.users_state
            .iter()
            .keys()
            .map(|key| Ok(String::from_utf8_lossy(&key?).into_owned()))
            .collect()
    }

    /// Removes a user's state for good (they left the policy).
    pub fn delete_user_state(&self, user: &str) -> Result<()> {
        self.written((|| {
            self.users_state.remove(user.as_bytes())?;
            self.db.flush()
        })())?;
        Ok(())
    }

    /// Fault injection for tests of the fail-closed path: while `on`, every
    /// transcript write fails like a full disk.
    pub fn fail_batch_writes(&self, on: bool) {
        self.fail_batches
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forces everything written so far to disk.
    pub fn flush(&self) -> Result<()> {
        self.written(self.db.flush())?;
        Ok(())
    }
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

fn batch_key(session: u64, index: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&session.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

fn piece_key(session: u64, index: u32, piece: u32) -> [u8; 16] {
    let mut key = [0; 16];
    key[..12].copy_from_slice(&batch_key(session, index));
    key[12..].copy_from_slice(&piece.to_be_bytes());
    key
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

fn from_json<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        tree,
        detail: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch goes in as pieces and comes out whole, and batches stored whole by
    /// earlier versions still read.
    #[test]
    fn batches_are_stored_in_pieces_and_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let batch: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        store.put_batch(3, 0, &batch).unwrap();
        store.put_batch(3, 1, b"small").unwrap();
        assert_eq!(store.chunks.scan_prefix(batch_key(3, 0)).count(), 3);
        assert!(store
            .chunks
            .scan_prefix(batch_key(3, 0))
            .values()
            .all(|piece| piece.unwrap().len() <= PIECE_BYTES));
        store.chunks.insert(batch_key(3, 2), &b"whole"[..]).unwrap();
        assert_eq!(store.batch(3, 0).unwrap().unwrap(), batch);
        assert_eq!(store.batch(3, 1).unwrap().unwrap(), b"small");
        assert_eq!(store.batch(3, 2).unwrap().unwrap(), b"whole");
        assert_eq!(store.batch(3, 3).unwrap(), None);
        assert_eq!(store.delete_batches(3).unwrap(), 40_000 + 5 + 5);
        assert_eq!(store.batch(3, 0).unwrap(), None);
    }
}
