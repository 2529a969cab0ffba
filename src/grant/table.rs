//! Where grants live in the store, and the indexes that lists read.
//!
//! Trees (names kept from before the storage seam, so old databases open as they
//! are):
//! - `requests`: seq → the grant (JSON) with its `version`, which every change
//!   raises: a change is a compare-and-swap from the version it read.
//! - `request_ids`: id → seq (8 bytes), claimed with an insert-if-absent, so two
//!   requests can never get one id.
//! - `grants_live`: `user 0x00 seq` → nothing, for every pending or approved
//!   grant (a session start reads its user's live grants with one prefix scan).
//! - `grants_by_user`: `user 0x00 seq` → nothing, for every grant.
//! - `grants_due`: `deadline (ms) ‖ seq` → nothing, for every grant with a
//!   deadline (a pending one's decision time, an approved one's expiry): the
//!   sweep reads only what is due.
//!
//! An index entry is written before the grant it points to and removed after it,
//! so an index may briefly hold an entry too many but never misses one; readers
//! check every grant they read through an index against what they asked for.
//! A reader that finds an entry of an ended grant removes it (its writer's
//! removal may have failed), then reads the grant again: an ended grant becomes
//! live again only when its unaudited change is undone, which writes the
//! entries both before and after putting the grant back (when the store fails
//! in between, a removed entry is put back rather than lost; only when the
//! undo's second index write fails too may an entry stay missing until the
//! grant's next change, which is logged). An entry with no grant behind it is
//! left alone (it may be a request being filed) until its deadline is a day
//! past: a request whose filing failed half-way left it.
//! Databases from before the indexes get them built once, at open (schema 1).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Grant;
use crate::store::table::{millis, name_prefix, trailing_u64};
use crate::store::{self, Backend, Key, Result, Store, StoreError, Subscription, Table};

const GRANTS: &str = "requests";
const IDS: &str = "request_ids";
const LIVE: &str = "grants_live";
const BY_USER: &str = "grants_by_user";
const DUE: &str = "grants_due";
/// The counter grant seqs come from.
const SEQ: &str = "grant_seq";
/// The schema this module migrates databases to.
const SCHEMA: u64 = 1;
/// How long past its deadline a due entry with no grant behind it is kept: a
/// request being filed writes its entries before itself, and its deadline is
/// a flow's `pending_ttl` away when it does.
const ORPHAN_AFTER_MS: u64 = 24 * 3600 * 1000;

/// A grant as stored: the grant's own JSON, plus the version of this record.
#[derive(Serialize, Deserialize)]
struct Stored {
    /// 0 for grants written before versions were (no change has been made to them
    /// since).
    #[serde(default)]
    version: u64,
    #[serde(flatten)]
    grant: Grant,
}

/// A grant read for a change: the bytes it must still have when the change is
/// written.
pub struct Read {
    pub grant: Grant,
    version: u64,
    bytes: Vec<u8>,
}

impl Read {
    /// The stored version (raised by every change).
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The grant trees of one store.
#[derive(Clone)]
pub struct GrantTable {
    grants: Table<u64, Stored>,
}

impl GrantTable {
    /// The table on `store`, building indexes an older database lacks.
    pub fn open(store: &Arc<Store>) -> Result<GrantTable> {
        let table = GrantTable {
            grants: Table::new(store, GRANTS),
        };
        table.migrate()?;
        Ok(table)
    }

    fn seam(&self) -> &dyn Backend {
        self.grants.store().backend()
    }

    /// Builds the live and by-user indexes and the seq counter from the grants,
    /// once (recorded as the schema version).
    fn migrate(&self) -> Result<()> {
        let store = self.grants.store();
        if store::schema_version(store, "grants")? >= SCHEMA {
            return Ok(());
        }
        let mut last = 0;
        for entry in self.grants.iter() {
            let (seq, stored) = entry?;
            self.index(&stored.grant)?;
            last = seq;
        }
        // Grant seqs came from sled's id generator before; the counter starts past
        // every one of them.
        self.seam().seed_counter(SEQ, last)?;
        store::set_schema_version(store, "grants", SCHEMA)
    }

    /// The keys of the grants changed from now on, by any bastion on this
    /// database ([`GrantTable::seq_of`] reads them).
    pub fn subscribe(&self) -> Result<Subscription> {
        self.seam().subscribe(GRANTS)
    }

    /// The seq a key of the grants tree names (`None`: not one of its keys).
    pub fn seq_of(key: &[u8]) -> Option<u64> {
        u64::decode(key)
    }

    /// A fresh seq (store order).
    pub fn next_seq(&self) -> Result<u64> {
        self.grants.store().next_id(SEQ)
    }

    pub fn id_taken(&self, id: &str) -> Result<bool> {
        Ok(self.seam().get(IDS, id.as_bytes())?.is_some())
    }

    /// The grant with id `id`, as read for a change.
    pub fn read(&self, id: &str) -> Result<Option<Read>> {
        let Some(seq) = self.seam().get(IDS, id.as_bytes())? else {
            return Ok(None);
        };
        let seq = u64::decode(&seq).ok_or_else(|| StoreError::Corrupt {
            tree: IDS,
            detail: format!("the seq of {id} is not 8 bytes"),
        })?;
        self.read_seq(seq)
    }

    /// The grant stored under `seq`, as read for a change.
    pub fn read_seq(&self, seq: u64) -> Result<Option<Read>> {
        Ok(self
            .grants
            .get_versioned(&seq)?
            .map(|(stored, bytes)| Read {
                grant: stored.grant,
                version: stored.version,
                bytes,
            }))
    }

    /// Stores a new grant under its id. `Ok(false)`: the id is taken (nothing
    /// was written).
    pub fn insert(&self, grant: &Grant) -> Result<bool> {
        let seq = grant.seq.encode();
        if !self
            .seam()
            .compare_and_swap(IDS, grant.id.as_bytes(), None, Some(&seq))?
        {
            return Ok(false);
        }
        self.index(grant)?;
        let stored = Stored {
            version: 1,
            grant: grant.clone(),
        };
        if !self.swap_grant(grant.seq, None, &stored)? {
            return Err(StoreError::Corrupt {
                tree: GRANTS,
                detail: format!("seq {} was handed out twice", grant.seq),
            });
        }
        Ok(true)
    }

    /// Removes a grant [`GrantTable::insert`] just stored (its event could not be
    /// written).
    pub fn uninsert(&self, grant: &Grant) -> Result<()> {
        self.seam().remove(GRANTS, &grant.seq.encode())?;
        self.unindex(grant)?;
        self.seam().remove(IDS, grant.id.as_bytes())?;
        Ok(())
    }

    /// Writes `changed` over the grant as `read` saw it, if nobody changed it since.
    /// Returns what to pass to [`GrantTable::restore`], or `None` when the race
    /// was lost (nothing written: read again and redo the change).
    pub fn update(&self, read: &Read, changed: &Grant) -> Result<Option<Read>> {
        let stored = Stored {
            version: read.version + 1,
            grant: changed.clone(),
        };
        let (was_due, due) = (due_key(&read.grant), due_key(changed));
        if let Some(key) = &due {
            self.seam().put(DUE, key, b"")?;
        }
        if !self.swap_grant(changed.seq, Some(&read.bytes), &stored)? {
            return Ok(None);
        }
        // The change is made: from here on, an error would leave it without its
        // audit event. Entries left behind are removed by their readers.
        if !changed.state.is_live() {
            self.remove_stale(LIVE, &user_key(changed));
        }
        if let Some(key) = was_due.filter(|key| Some(key) != due.as_ref()) {
            self.remove_stale(DUE, &key);
        }
        Ok(Some(Read {
            grant: changed.clone(),
            version: stored.version,
            bytes: store::table::to_json(&stored),
        }))
    }

    /// Puts back the grant as `before` had it, over `written` (a change whose
    /// event could not be written). `Ok(false)`: it changed again meanwhile.
    pub fn restore(&self, written: &Read, before: &Read) -> Result<bool> {
        self.index(&before.grant)?;
        let seq = before.grant.seq;
        let swapped = self.seam().compare_and_swap(
            GRANTS,
            &seq.encode(),
            Some(&written.bytes),
            Some(&before.bytes),
        );
        let restored = match swapped {
            // As in `swap_grant`: a database whose answer was lost may have
            // made the swap; the grant read back tells.
            Err(err) => match self.read_seq(seq) {
                Ok(Some(now)) if now.bytes == before.bytes => true,
                _ => return Err(err),
            },
            Ok(restored) => restored,
        };
        if restored {
            // A reader that found the grant as `written` between the two writes
            // (a sweep on this node or another) dropped its entries as stale;
            // the grant is live again, so they go back. The grant is restored
            // either way: a failure here is logged, not returned as "not undone".
            if let Err(err) = self.index(&before.grant) {
                tracing::error!(grant = %before.grant.id, error = %err, "a restored grant may lack an index entry until its next change");
            }
        }
        Ok(restored)
    }

    /// Every grant ever filed, oldest first (history: `requests --all`).
    pub fn all(&self) -> Result<Vec<Grant>> {
        self.grants
            .iter()
            .map(|entry| entry.map(|(_, stored)| stored.grant))
            .collect()
    }

    /// The pending and approved grants, oldest first, read through the live index.
    pub fn live(&self) -> Result<Vec<Grant>> {
        let mut live = self.through(LIVE, b"", |_| true)?;
        live.sort_by_key(|g| g.seq); // the index orders them by user first
        Ok(live)
    }

    /// The pending and approved grants of `user`, oldest first, read through the
    /// live index.
    pub fn live_of(&self, user: &str) -> Result<Vec<Grant>> {
        self.through(LIVE, &name_prefix(user), |g| g.requester == user)
    }

    /// The live grants whose deadline is at or before `now`, soonest first, read
    /// through the due index. Entries of grants that ended are dropped on the way.
    pub fn due(&self, now: DateTime<Utc>) -> Result<Vec<Grant>> {
        let mut due = Vec::new();
        for entry in self.seam().scan(DUE, b"", None) {
            let (key, _) = entry?;
            let (at, seq) = key.split_at(key.len().min(8));
            let (Some(at), Some(seq)) = (u64::decode(at), u64::decode(seq)) else {
                return Err(StoreError::Corrupt {
                    tree: DUE,
                    detail: format!("a key of {} bytes", key.len()),
                });
            };
            if at > millis(now) {
                break;
            }
            match self.read_seq(seq)? {
                Some(read) if !read.grant.state.is_live() => self.drop_stale(DUE, &key, seq),
                Some(read) if read.grant.deadline().is_some_and(|at| at <= now) => {
                    due.push(read.grant);
                }
                // No grant behind an entry long past its deadline: a request
                // whose filing failed half-way left it.
                None if at.saturating_add(ORPHAN_AFTER_MS) < millis(now) => {
                    self.remove_stale(DUE, &key);
                }
                // Not due: an entry of a deadline the grant is changing from, or
                // one whose removal failed after it changed (read by every sweep
                // until the grant ends); or no grant yet (a request writes its
                // entries first).
                _ => {}
            }
        }
        Ok(due)
    }

    /// Every grant `user` filed, oldest first, read through the by-user index.
    pub fn of_user(&self, user: &str) -> Result<Vec<Grant>> {
        self.through(BY_USER, &name_prefix(user), |g| g.requester == user)
    }

    /// The grants an index names (keys end in the seq), checked with `keep`.
    fn through(
        &self,
        index: &str,
        prefix: &[u8],
        keep: impl Fn(&Grant) -> bool,
    ) -> Result<Vec<Grant>> {
        let mut grants = Vec::new();
        for entry in self.seam().scan(index, prefix, None) {
            let (key, _) = entry?;
            let seq = trailing_u64(&key).ok_or_else(|| StoreError::Corrupt {
                tree: "grant index",
                detail: format!("a key of {} bytes", key.len()),
            })?;
            match self.read_seq(seq)? {
                Some(read) if index == LIVE && !read.grant.state.is_live() => {
                    self.drop_stale(LIVE, &key, seq);
                }
                Some(read) if keep(&read.grant) => grants.push(read.grant),
                _ => {}
            }
        }
        Ok(grants)
    }

    /// Swaps the stored grant `seq` from `old` to `new`. When the store cannot
    /// say whether it did (an error: a database whose answer was lost may still
    /// have made the change), what is stored now tells: a grant that reads back
    /// exactly as `new` was changed by this call, and the change goes on to get
    /// its audit event; otherwise the error stands.
    fn swap_grant(&self, seq: u64, old: Option<&[u8]>, new: &Stored) -> Result<bool> {
        match self.grants.swap(&seq, old, new) {
            Err(err) => match self.grants.get_versioned(&seq) {
                Ok(Some((_, now))) if now == store::table::to_json(new) => Ok(true),
                _ => Err(err),
            },
            swapped => swapped,
        }
    }

    /// Removes an index entry that no longer points at a grant it indexes, or
    /// leaves it for its next reader to skip and remove (`through`, `due`) when
    /// the store refuses: the change that made it stale is already stored.
    fn remove_stale(&self, index: &str, key: &[u8]) {
        if let Err(err) = self.seam().remove(index, key) {
            tracing::warn!(index, error = %err, "a stale grant index entry stays");
        }
    }

    /// Removes an index entry whose grant a reader found ended, so that later
    /// readers skip nothing. An ended grant is live again only when the change
    /// that ended it is undone ([`GrantTable::restore`], on this bastion or
    /// another): the grant is read once more after the removal and indexed
    /// again if so. With `restore` indexing again after its swap, no order of
    /// the two leaves a live grant out of its indexes.
    /// When that cannot be checked or done, the entry goes back: an entry too
    /// many is skipped, while a missing due entry is a grant that never expires
    /// and a missing live entry one that sessions cannot use.
    fn drop_stale(&self, index: &str, key: &[u8], seq: u64) {
        self.remove_stale(index, key);
        let indexed = match self.read_seq(seq) {
            Ok(Some(read)) if read.grant.state.is_live() => self.index(&read.grant),
            Ok(_) => return,
            Err(err) => Err(err),
        };
        if let Err(err) = indexed {
            tracing::warn!(index, error = %err, "cannot check a removed grant index entry; putting it back");
            if let Err(err) = self.seam().put(index, key, b"") {
                tracing::error!(index, error = %err, "a grant index entry may be missing until the grant's next change");
            }
        }
    }

    fn index(&self, grant: &Grant) -> Result<()> {
        let key = user_key(grant);
        if grant.state.is_live() {
            self.seam().put(LIVE, &key, b"")?;
        }
        if let Some(due) = due_key(grant) {
            self.seam().put(DUE, &due, b"")?;
        }
        self.seam().put(BY_USER, &key, b"")
    }

    fn unindex(&self, grant: &Grant) -> Result<()> {
        let key = user_key(grant);
        self.seam().remove(LIVE, &key)?;
        if let Some(due) = due_key(grant) {
            self.seam().remove(DUE, &due)?;
        }
        self.seam().remove(BY_USER, &key)?;
        Ok(())
    }
}

/// A grant's key in the due index, if it has a deadline.
fn due_key(grant: &Grant) -> Option<Vec<u8>> {
    let mut key = millis(grant.deadline()?).encode();
    key.extend_from_slice(&grant.seq.encode());
    Some(key)
}

/// A grant's key in the indexes: `requester 0x00 seq`.
fn user_key(grant: &Grant) -> Vec<u8> {
    let mut key = name_prefix(&grant.requester);
    key.extend_from_slice(&grant.seq.encode());
    key
}
