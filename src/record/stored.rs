//! Where recordings live in the store: the session records, the session id
//! counter, and the transcript batches cut into pieces.
//!
//! Trees: `sessions` (session id → [`SessionRecord`], JSON) and `chunks`
//! (`session id ‖ batch index ‖ piece index`, big-endian, → compressed bytes); the
//! `session_id` counter hands out ids. The indexes of the records, and the rules
//! they keep, are in [`super::index`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
#[cfg(test)]
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::index::{self, SessionQuery};
use super::SessionRecord;
use crate::audit::{AuditEvent, AuditLog};
use crate::store::{self, Entry, Key, Result, Store, StoreError, Table};

const SESSIONS: &str = "sessions";
const CHUNKS: &str = "chunks";
const SESSION_ID: &str = "session_id";
/// Session ids taken and not yet accounted for: id → the node holding it.
const RESERVATIONS: &str = "session_reservations";

/// The recorder's tables. Cheap to clone (shared with the writer threads).
#[derive(Clone)]
pub struct SessionStore {
    store: Arc<Store>,
    sessions: Table<u64, SessionRecord>,
    audit: AuditLog,
    /// Fault injection: makes transcript writes fail, as a full disk would.
    /// Writes that may still succeed before every one fails; negative: no limit.
    fail_batches: Arc<AtomicI64>,
    /// Fault injection: the one write that is late instead, and whether it
    /// then fails ([`SessionStore::make_one_batch_write_late`]).
    #[cfg(test)]
    late: Arc<Mutex<Option<Late>>>,
    /// The first batch of every write that landed, in the order they landed.
    #[cfg(test)]
    landed: Arc<Mutex<Vec<u32>>>,
}

/// A write made late by fault injection, which then fails or lands, and how
/// late every write after it is.
#[cfg(test)]
#[derive(Clone, Copy, Default)]
pub struct Late {
    pub by: Duration,
    pub fails: bool,
    pub others_by: Duration,
}

impl SessionStore {
    /// The tables on `store`, building the indexes an older database lacks.
    pub fn open(store: Arc<Store>) -> Result<SessionStore> {
        let sessions = SessionStore {
            sessions: Table::new(&store, SESSIONS),
            audit: AuditLog::open(&store)?,
            store,
            fail_batches: Arc::new(AtomicI64::new(-1)),
            #[cfg(test)]
            late: Arc::default(),
            #[cfg(test)]
            landed: Arc::default(),
        };
        if index::missing(&sessions.store)? {
            for entry in sessions.sessions.iter() {
                let (_, session) = entry?;
                index::index(sessions.store.backend(), &session)?;
            }
            store::set_schema_version(&sessions.store, index::MODULE, index::SCHEMA)?;
        }
        Ok(sessions)
    }

    /// See [`Store::failure`].
    pub fn failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// See [`Store::failure_is_sticky`].
    pub fn failure_is_sticky(&self) -> bool {
        self.store.failure_is_sticky()
    }

    pub fn append_audit(&self, event: AuditEvent) -> Result<AuditEvent> {
        self.audit.append(event)
    }

    #[cfg(test)]
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>> {
        self.audit.events()
    }

    /// A fresh session id: 1, 2, 3… (short enough to type after `replay`).
    pub fn next_session_id(&self) -> Result<u64> {
        self.store.next_id(SESSION_ID)
    }

    /// A fresh session id, reserved in the store for `node` until
    /// [`SessionStore::release_id`]: `audit verify` on any node of a cluster then
    /// tells an id in flight from a deleted session.
    pub fn reserve_id(&self, node: &str) -> Result<u64> {
        let id = self.next_session_id()?;
        self.store
            .backend()
            .put(RESERVATIONS, &id.encode(), node.as_bytes())?;
        Ok(id)
    }

    /// Ends a reservation (the id's record or `session.failed` event is stored).
    pub fn release_id(&self, id: u64) -> Result<()> {
        self.store.backend().remove(RESERVATIONS, &id.encode())?;
        Ok(())
    }

    /// The ids reserved now, with the node that holds each.
    pub fn reserved_ids(&self) -> Result<Vec<(u64, String)>> {
        let mut reserved = Vec::new();
        for entry in self.store.backend().scan(RESERVATIONS, b"", None) {
            let (key, node) = entry?;
            let id = u64::decode(&key).ok_or_else(|| StoreError::Corrupt {
                tree: RESERVATIONS,
                detail: format!("a key of {} bytes is not a session id", key.len()),
            })?;
            reserved.push((id, String::from_utf8_lossy(&node).into_owned()));
        }
        Ok(reserved)
    }

    /// The last session id [`SessionStore::next_session_id`] handed out (0 if none).
    pub fn last_session_id(&self) -> Result<u64> {
        self.store.backend().counter(SESSION_ID)
    }

    /// Stores a session's record, its index entries first (see [`super::index`]).
    pub fn save_session(&self, session: &SessionRecord) -> Result<()> {
        index::index(self.store.backend(), session)?;
        self.sessions.put(&session.id, session)?;
        index::unindex(self.store.backend(), session)
    }

    pub fn session(&self, id: u64) -> Result<Option<SessionRecord>> {
        self.sessions.get(&id)
    }

    /// Every recorded session, oldest first.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>> {
        self.sessions
            .iter()
            .map(|entry| entry.map(|(_, session)| session))
            .collect()
    }

    /// The sessions `query` wants, oldest first, read through an index when the
    /// query names a user, a target, a start or live sessions.
    pub fn find(&self, query: &SessionQuery) -> Result<Vec<SessionRecord>> {
        match index::candidates(self.store.backend(), query)? {
            Some(ids) => self.read_matching(ids, |s| query.matches(s)),
            None => Ok(self
                .sessions()?
                .into_iter()
                .filter(|s| query.matches(s))
                .collect()),
        }
    }

    /// The sessions that started at or before `at` (their recordings may be old
    /// enough for retention), oldest first.
    pub fn started_by(&self, at: DateTime<Utc>) -> Result<Vec<SessionRecord>> {
        let ids = index::started_by(self.store.backend(), at)?;
        self.read_matching(ids, |s| s.started_at <= at)
    }

    /// The records of `ids` that `keep` holds for (an index may name a record
    /// that changed since, or was never stored).
    fn read_matching(
        &self,
        ids: std::collections::BTreeSet<u64>,
        keep: impl Fn(&SessionRecord) -> bool,
    ) -> Result<Vec<SessionRecord>> {
        let mut sessions = Vec::new();
        for id in ids {
            match self.sessions.get(&id)? {
                Some(session) if keep(&session) => sessions.push(session),
                _ => {}
            }
        }
        Ok(sessions)
    }

    /// Stores batches `first`, `first + 1`, … of a session, each cut into pieces
    /// of at most the backend's [`store::Backend::piece_bytes`] under keys that
    /// sort in order, in one atomic write (on PostgreSQL one round trip and one
    /// commit, not one per batch).
    /// A batch that fits in one piece is stored as it is, without a copy.
    pub fn put_batches(&self, session: u64, first: u32, batches: Vec<Vec<u8>>) -> Result<()> {
        if self.fails_injected() {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        let piece_bytes = self.store.backend().piece_bytes();
        let mut pieces: Vec<Entry> = Vec::new();
        for (index, batch) in (first..).zip(batches) {
            if !batch.is_empty() && batch.len() <= piece_bytes {
                pieces.push((piece_key(session, index, 0).to_vec(), batch));
                continue;
            }
            pieces.extend(
                batch.chunks(piece_bytes).enumerate().map(|(n, piece)| {
                    (piece_key(session, index, n as u32).to_vec(), piece.to_vec())
                }),
            );
        }
        self.store.backend().put_all(CHUNKS, pieces)?;
        #[cfg(test)]
        self.landed.lock().expect("fault lock poisoned").push(first);
        Ok(())
    }

    /// One stored batch of a session, if there is one at `index` (batches are
    /// numbered from 0, and a transcript ends at its first missing batch:
    /// writes that landed after a failed or lost one are not part of it).
    /// Readers go batch by batch, so memory holds one
    /// batch, never a whole transcript. Pieces are asked for in runs of 1, 2, 4, …
    /// up to a MiB of pieces ([`store::Backend::get_run`]: one round trip each on
    /// PostgreSQL, one `get` per piece on sled, whose range iterators keep what
    /// they read: a scan per batch took exporting 1 GiB from +63 to +306 MiB), so
    /// a keystroke's batch costs two asks and a MiB of 8000-byte pieces eight,
    /// after one `get` for a batch stored whole, as older recordings are.
    pub fn batch(&self, session: u64, index: u32) -> Result<Option<Vec<u8>>> {
        let seam = self.store.backend();
        // A batch stored whole under its own key, as recordings made before
        // batches were cut into pieces are.
        if let Some(whole) = seam.get(CHUNKS, &batch_key(session, index))? {
            return Ok(Some(whole));
        }
        let longest = (READ_RUN_BYTES / seam.piece_bytes()).max(1) as u32;
        let mut batch = Vec::new();
        let (mut next, mut run) = (0u32, 1u32);
        loop {
            let keys: Vec<Vec<u8>> = (next..next.saturating_add(run))
                .map(|piece| piece_key(session, index, piece).to_vec())
                .collect();
            let pieces = seam.get_run(CHUNKS, &keys)?;
            let complete = pieces.len() == keys.len();
            for piece in pieces {
                batch.extend_from_slice(&piece);
                next += 1;
            }
            if !complete || next == u32::MAX {
                break;
            }
            run = (run * 2).min(longest);
        }
        Ok((next > 0).then_some(batch))
    }

    /// Removes a session's transcript (retention); returns the bytes freed. Batch
    /// by batch in the order [`SessionStore::batch`] reads them, from the first key
    /// left (an earlier delete may have stopped half-way), so that no change and no
    /// scan ever spans more than a batch: sled's range iterators keep what they
    /// read, so the scan over the whole session only finds where to go on.
    pub fn delete_batches(&self, session: u64) -> Result<u64> {
        self.delete_batches_from(session, 0)
    }

    /// Removes a session's batches from `index` on, those after a gap included
    /// (writes that landed after an earlier one failed or was lost in a crash,
    /// see [`store::Backend::concurrent_writes`]); returns the bytes freed. As
    /// [`SessionStore::delete_batches`] does, a batch at a time.
    pub fn delete_batches_from(&self, session: u64, index: u32) -> Result<u64> {
        let seam = self.store.backend();
        let start = batch_key(session, index);
        // From the first key of the session when from 0, keys of another shape
        // included.
        let from = (index > 0).then_some(&start[..]);
        let mut freed = 0;
        loop {
            let first = match seam.scan(CHUNKS, &session.to_be_bytes(), from).next() {
                None => return Ok(freed),
                Some(entry) => entry?.0,
            };
            match first.get(8..12) {
                // Removes `first` too: it shares its batch's key as a prefix.
                Some(index) => {
                    let index = u32::from_be_bytes(index.try_into().expect("four bytes"));
                    freed += self.delete_from(session, index)?;
                }
                // A key of another shape: removed alone, so each round removes
                // at least one key.
                None => {
                    if let Some(value) = seam.remove(CHUNKS, &first)? {
                        freed += value.len() as u64;
                    }
                }
            }
        }
    }

    /// Removes batches `index`, `index + 1`, … of a session until one is missing;
    /// returns the bytes freed. Each batch goes in one change (its whole key and
    /// its pieces share its key as a prefix).
    fn delete_from(&self, session: u64, index: u32) -> Result<u64> {
        let seam = self.store.backend();
        let mut freed = 0;
        for index in index.. {
            let removed = seam.remove_prefix(CHUNKS, &batch_key(session, index))?;
            if removed.entries == 0 {
                break;
            }
            freed += removed.bytes;
        }
        Ok(freed)
    }

    /// Fault injection for tests of the fail-closed path: while `on`, every
    /// transcript write fails like a full disk.
    pub fn fail_batch_writes(&self, on: bool) {
        self.fail_batch_writes_after(if on { 0 } else { -1 });
    }

    /// Fault injection: `writes` more transcript writes succeed, then every one
    /// fails (negative: none fails).
    pub fn fail_batch_writes_after(&self, writes: i64) {
        #[cfg(test)]
        {
            *self.late.lock().expect("fault lock poisoned") = None;
        }
        self.fail_batches.store(writes, Ordering::Relaxed);
    }

    /// Whether this write fails by fault injection: once the writes that may
    /// still succeed are used up, every one does.
    #[cfg(not(test))]
    fn fails_injected(&self) -> bool {
        self.successes_left() == Err(0)
    }

    /// Counts a write against the injected successes left: `Ok` while some
    /// are, else `Err` with the count (0: used up; negative: no fault).
    fn successes_left(&self) -> std::result::Result<i64, i64> {
        self.fail_batches
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then_some(left - 1)
            })
    }

    /// Fault injection: `writes` more transcript writes succeed, and the next
    /// one is `late` (writes begun after it may land first); no other fails.
    #[cfg(test)]
    pub fn make_one_batch_write_late(&self, writes: i64, late: Late) {
        *self.late.lock().expect("fault lock poisoned") = Some(late);
        self.fail_batches.store(writes, Ordering::Relaxed);
    }

    /// The first batch of every write that landed, in the order they landed.
    #[cfg(test)]
    pub fn landed(&self) -> Vec<u32> {
        self.landed.lock().expect("fault lock poisoned").clone()
    }

    /// The numbers of the batches a session has pieces of, in order, gaps and
    /// all.
    #[cfg(test)]
    pub fn batch_numbers(&self, session: u64) -> Vec<u32> {
        let seam = self.store.backend();
        let mut numbers: Vec<u32> = (seam.scan(CHUNKS, &session.to_be_bytes(), None))
            .map(|entry| {
                let key = entry.expect("scan").0;
                u32::from_be_bytes(key[8..12].try_into().expect("a batch key"))
            })
            .collect();
        numbers.dedup();
        numbers
    }

    /// Whether this write fails by fault injection, as in production; with a
    /// late write planned, the write that comes once the successes are used up
    /// waits `late.by` and fails if `late.fails`, and every write after it
    /// waits `late.others_by` and lands.
    #[cfg(test)]
    fn fails_injected(&self) -> bool {
        let left = self.successes_left();
        let Some(late) = *self.late.lock().expect("fault lock poisoned") else {
            return left == Err(0);
        };
        if left.is_ok() {
            return false;
        }
        let claimed = left == Err(0)
            && self
                .fail_batches
                .compare_exchange(0, -1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        std::thread::sleep(if claimed { late.by } else { late.others_by });
        claimed && late.fails
    }
}

/// The most piece bytes [`SessionStore::batch`] asks for at once.
const READ_RUN_BYTES: usize = 1024 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch goes in as pieces and comes out whole, and batches stored whole by
    /// earlier versions still read.
    #[test]
    fn batches_are_stored_in_pieces_and_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = SessionStore::open(Arc::new(Store::sled(dir.path()).unwrap())).unwrap();
        let seam = sessions.store.backend();
        let batch: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        sessions
            .put_batches(3, 0, vec![batch.clone(), b"small".to_vec()])
            .unwrap();
        let pieces: Vec<Entry> = seam
            .scan(CHUNKS, &batch_key(3, 0), None)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(pieces.len(), 3);
        let piece_bytes = seam.piece_bytes();
        assert!(pieces.iter().all(|(_, piece)| piece.len() <= piece_bytes));
        seam.put(CHUNKS, &batch_key(3, 2), b"whole").unwrap();
        assert_eq!(sessions.batch(3, 0).unwrap().unwrap(), batch);
        assert_eq!(sessions.batch(3, 1).unwrap().unwrap(), b"small");
        assert_eq!(sessions.batch(3, 2).unwrap().unwrap(), b"whole");
        assert_eq!(sessions.batch(3, 3).unwrap(), None);
        seam.put(CHUNKS, &batch_key(3, 9), b"after a gap").unwrap();
        // A delete that stopped half-way: batch 0 gone, a piece without its first.
        seam.remove(CHUNKS, &piece_key(3, 0, 0)).unwrap();
        seam.put(CHUNKS, &piece_key(3, 12, 1), b"orphan").unwrap();
        seam.put(CHUNKS, &piece_key(4, 0, 0), b"another session")
            .unwrap();
        let left = 40_000 - piece_bytes as u64 + 5 + 5 + 11 + 6;
        assert_eq!(sessions.delete_batches(3).unwrap(), left);
        assert_eq!(seam.scan(CHUNKS, &3u64.to_be_bytes(), None).count(), 0);
        assert_eq!(sessions.batch(4, 0).unwrap().unwrap(), b"another session");
        assert_eq!(sessions.batch(3, 0).unwrap(), None);
    }

    /// Removing from a batch on takes that batch and every later one, those
    /// after a gap too, and nothing before it or of another session.
    #[test]
    fn batches_from_one_on_are_removed_gaps_and_all() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = SessionStore::open(Arc::new(Store::sled(dir.path()).unwrap())).unwrap();
        let seam = sessions.store.backend();
        // Batch 0 stored whole, as older versions did; 1 and 2 in pieces.
        seam.put(CHUNKS, &batch_key(3, 0), b"whole").unwrap();
        let pieces = vec![vec![1; 40_000], b"two".to_vec()];
        sessions.put_batches(3, 1, pieces).unwrap();
        sessions
            .put_batches(3, 5, vec![b"after a gap".to_vec()])
            .unwrap();
        sessions
            .put_batches(4, 1, vec![b"another".to_vec()])
            .unwrap();
        assert_eq!(sessions.batch_numbers(3), [0, 1, 2, 5]);
        assert_eq!(sessions.delete_batches_from(3, 2).unwrap(), 3 + 11);
        assert_eq!(sessions.batch_numbers(3), [0, 1]);
        assert_eq!(sessions.batch(3, 0).unwrap().unwrap(), b"whole");
        assert_eq!(sessions.batch(3, 1).unwrap().unwrap(), vec![1; 40_000]);
        assert_eq!(sessions.batch_numbers(4), [1]);
        assert_eq!(sessions.delete_batches_from(3, 7).unwrap(), 0);
    }
}
