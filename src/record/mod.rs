//! Session recording: metadata and a timed transcript of every proxied session,
//! stored in sled.
//!
//! The relay hands each chunk to a [`SessionRecorder`], which only appends it to an
//! in-memory batch (a `Bytes` clone, no copy) and wakes the session's flusher task.
//! The flusher frames, compresses and writes batches to the `chunks` tree at least
//! every [`FLUSH_INTERVAL`], off the relay's path. Memory stays bounded: when a batch
//! grows past [`Recorder::pending_cap`] (the disk is slower than the session), the relay waits
//! for the flusher instead of buffering more.
//!
//! If a batch cannot be written, the session fails closed: [`SessionRecorder::failed`]
//! resolves and the relay ends the session. Nothing is proxied unrecorded.

pub mod asciicast;
pub mod check;
pub mod disk;
mod index;
pub mod replay;
pub mod screen;
mod stored;
mod transcript;
mod watchers;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::audit::{AuditEvent, AuditKind};
use crate::budget::{Account, Budget};
use crate::store::{Store, StoreError};
pub use disk::RecordingLimits;
use disk::Size;
pub use index::SessionQuery;
pub use stored::SessionStore;
pub use transcript::{Chunk, Stream, TranscriptDigest, TranscriptError};
pub use watchers::{Feed, Watched, WatchesFull, WATCHES_MAX, WATCHES_PER_USER, WATCH_BYTES};
use watchers::{Slots, Watchers};

/// Decompresses and decodes one stored batch (for tools and fuzzing).
pub fn decode_stored(stored: &[u8]) -> Result<Vec<Chunk>, TranscriptError> {
    transcript::decode(&transcript::decompress(stored)?)
}

/// The `session.interrupted` event of `session`, sealed by [`Recorder::recover`]
/// (or by the bastion itself when a session's task stopped early): its digest
/// was computed from the store. `declared_by`: the node that found the node
/// carrying it dead, when it was not that node's own next start.
pub fn interrupted_event(session: &SessionRecord, declared_by: Option<&str>) -> AuditEvent {
    AuditEvent::new(AuditKind::SessionInterrupted, "portcullis", Utc::now())
        .target(&session.target)
        .grant(&session.grant)
        .detail("session", session.id)
        .detail("user", session.user.as_str())
        .detail("node", session.node.as_str())
        .detail("declared_by", declared_by)
        .detail("transcript_sha256", session.digest.clone())
        .detail("digest_source", session.digest_source.map(|s| s.as_str()))
}

/// Longest time a recorded chunk stays only in memory: what a crash can lose.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A batch this big is flushed at once rather than at the next interval.
const BATCH_BYTES: usize = 1024 * 1024;

/// Largest run of a flush stored as a batch of its own when it does not compress
/// (runs that compress are stored together).
/// sled keeps values inside its B-tree leaves and rewrites a leaf whole when it
/// splits (every 16 keys) or consolidates, so every value is written about three
/// times whatever its size; what the size decides is how much of that garbage sled
/// can reclaim. Values up to a quarter of a segment ([`crate::store`]) are written
/// into the log, and 64 KiB values in 2 MiB segments left the least behind
/// (`benches/proxy.rs` measures it; see the README's Performance section).
const STORED_VALUE_BYTES: usize = 64 * 1024;

/// Unflushed bytes per session beyond which the relay waits for the flusher (those
/// over [`BATCH_BYTES`] are also charged to the bastion's memory budget, and when
/// that is spent the relay waits at [`BATCH_BYTES`]), or more when the store
/// writes more at once ([`Recorder::pending_cap`]).
const PENDING_CAP: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Live,
    Closed,
    /// The bastion stopped while the session was live; the transcript holds
    /// everything up to the last flush.
    Interrupted,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Live => "live",
            SessionState::Closed => "closed",
            SessionState::Interrupted => "interrupted",
        }
    }
}

/// Who computed a transcript's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestSource {
    /// The live bastion, batch by batch as it wrote the transcript, chained in the
    /// session's `session.end` event: the transcript is sealed.
    Bastion,
    /// A restart, over whatever the store held for a session that was live when the
    /// bastion stopped (`session.interrupted`). Whoever held the database while the
    /// bastion was down could have replaced those batches first, so this digest
    /// proves only that nothing changed *since* the restart.
    Recovery,
}

impl DigestSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DigestSource::Bastion => "bastion",
            DigestSource::Recovery => "recovery",
        }
    }
}

/// What is stored about one session channel (the `sessions` tree).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: u64,
    pub user: String,
    pub target: String,
    pub login: String,
    pub grant: String,
    pub client: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `shell`, `exec` or `subsystem`.
    pub kind: String,
    /// The exec command or subsystem name.
    pub command: Option<String>,
    pub term: Option<String>,
    pub cols: u32,
    pub rows: u32,
    pub resizes: u32,
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub state: SessionState,
    /// Whether data was recorded (file transfers keep metadata and counts only,
    /// unless `record_file_transfers`).
    pub full_transcript: bool,
    pub input_recorded: bool,
    pub batches: u32,
    /// Transcript size before and after compression.
    pub transcript_bytes: u64,
    pub stored_bytes: u64,
    /// SHA-256 of the transcript, once the session is over.
    pub digest: Option<String>,
    /// Who computed `digest`: only `bastion` digests seal the transcript.
    #[serde(default)]
    pub digest_source: Option<DigestSource>,
    /// The transcript was removed by retention.
    pub pruned: bool,
    /// The OpenSSH certificate used towards the target (certificate mode).
    #[serde(default)]
    pub certificate: Option<String>,
    /// The user typed or piped anything into the session (whether or not input is
    /// recorded): auditors look at these first.
    #[serde(default)]
    pub received_input: bool,
    /// The bastion node that carried the session (`[cluster] node_id`); empty in
    /// records from before nodes had ids.
    #[serde(default)]
    pub node: String,
}

impl SessionRecord {
    pub fn is_live(&self) -> bool {
        self.state == SessionState::Live
    }

    /// Whether the terminal echoed what was typed: without a pty, input shows up
    /// nowhere in the output, so replay and watch show it themselves.
    pub fn echoes_input(&self) -> bool {
        self.term.is_some()
    }

    /// Whether the transcript's digest was computed at recovery, not sealed by the
    /// live bastion.
    pub fn unsealed(&self) -> bool {
        self.digest_source == Some(DigestSource::Recovery)
    }

    /// When the session ended, or when it started if it never ended cleanly.
    pub fn last_seen(&self) -> DateTime<Utc> {
        self.ended_at.unwrap_or(self.started_at)
    }
}

/// Who started what, for a new recording.
pub struct SessionInfo {
    /// The certificate the bastion logged in with (certificate mode).
    pub certificate: Option<String>,
    pub user: String,
    pub target: String,
    pub login: String,
    pub grant: String,
    pub client: String,
    pub kind: String,
    pub command: Option<String>,
    pub term: Option<String>,
    pub cols: u32,
    pub rows: u32,
    /// sftp, scp or rsync.
    pub file_transfer: bool,
}

/// The end of a session, for its record.
#[derive(Debug, Default)]
pub struct SessionEnd {
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// All recordings: starts sessions, finds live ones for `watch`, reads transcripts.
pub struct Recorder {
    store: SessionStore,
    /// Slices being encoded or written at once, across all sessions (an encoded
    /// slice keeps its slot until its write ends): bounded so that a burst of
    /// flushes queues instead of taking every core from the relay, and so that
    /// encoded slices, which the memory budget does not count, are at most
    /// [`Recorder::concurrent_writes`] + 1 writes. One session may take them all:
    /// its writes under way and the next slice encoded meanwhile.
    writers: Arc<Semaphore>,
    record_input: bool,
    record_file_transfers: bool,
    live: Mutex<HashMap<u64, Arc<Live>>>,
    /// Session ids reserved and not yet recording or given up (see [`Reservation`]).
    reserved: Mutex<BTreeSet<u64>>,
    limits: RecordingLimits,
    /// Where free space is measured (the data dir); `None`: not measured.
    data_dir: Option<PathBuf>,
    /// Charged with what a session's unflushed batch holds beyond [`BATCH_BYTES`].
    memory: Arc<Budget>,
    /// The node id written into every session record this recorder starts.
    node: String,
    /// Watches of live sessions running now (at most [`WATCHES_MAX`]).
    watch_slots: Slots,
    /// What relays waited for the store, and what its writes took.
    totals: Arc<Totals>,
    /// Pending bytes the flusher takes as one slice, and stored bytes per write
    /// (see [`writes`]): the store's [`crate::store::Backend::write_bytes`].
    write_bytes: usize,
    /// Unflushed bytes per session beyond which the relay waits: [`PENDING_CAP`],
    /// or room for the writes under way, the slice encoded meanwhile and the
    /// relay's next write, where that is more (16 MiB on PostgreSQL).
    pending_cap: usize,
    /// Writes a session's flusher may have under way at once: the store's
    /// [`crate::store::Backend::concurrent_writes`].
    concurrent_writes: usize,
}

/// What relays waited for their recordings to be written and what the store's
/// writes took, since start: an operator's sign that the store, not the
/// network, sets the pace of bulk sessions (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecordingTotals {
    /// Time relays waited for room in their recording (its unflushed bytes at
    /// [`Recorder::pending_cap`], or the bastion's recording memory spent).
    pub waited: Duration,
    /// Transcript writes to the store that ended, landed or not.
    pub writes: u64,
    /// The time those writes took.
    pub writing: Duration,
}

/// [`RecordingTotals`] as they are counted, in nanoseconds.
#[derive(Default)]
struct Totals {
    waited_ns: AtomicU64,
    writes: AtomicU64,
    writing_ns: AtomicU64,
}

impl Totals {
    fn waited(&self, time: Duration) {
        self.waited_ns.fetch_add(nanos(time), Ordering::Relaxed);
    }

    fn wrote(&self, time: Duration) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.writing_ns.fetch_add(nanos(time), Ordering::Relaxed);
    }
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

/// A session id taken from the counter before connecting to the target (so the
/// certificate can name the session), until its recording starts. Every id is
/// accounted for in the audit log: by its session's `session.start`, or, when the
/// session fails before recording (target unreachable, refused…), by the
/// `session.failed` event this appends when dropped unused. That lets `audit
/// verify` report every other missing id as a deleted session.
pub struct Reservation {
    recorder: Arc<Recorder>,
    id: u64,
    /// Appended with the id and `reason` if the reservation is never used.
    failed: Option<AuditEvent>,
    reason: String,
}

impl Reservation {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Gives the id up, saying why in its `session.failed` event, and returns
    /// once the event is stored (or its failure logged). The append syncs to
    /// disk, so the reservation is dropped on the blocking pool.
    pub async fn fail(mut self, reason: &str) {
        self.reason = reason.to_string();
        // Should the pool not run it (the runtime is shutting down), the closure
        // is dropped, and the reservation with it, where that happens.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

impl Drop for Reservation {
    /// Appends the `session.failed` event of an unused id, then releases the id.
    /// [`Reservation::fail`] drops it on the blocking pool; any other drop (a
    /// session task cancelled in set-up) appends where it happens, rather than
    /// leave an id no event explains.
    fn drop(&mut self) {
        if let Some(event) = self.failed.take() {
            let event = event
                .detail("session", self.id)
                .detail("reason", self.reason.as_str());
            if let Err(err) = self.recorder.store.append_audit(event) {
                tracing::error!(session = self.id, error = %err, "cannot append to the audit log");
            }
        }
        // Only now: the id is accounted for in the store before it leaves this set.
        if let Err(err) = self.recorder.store.release_id(self.id) {
            tracing::error!(session = self.id, error = %err, "cannot release a session id's reservation");
        }
        self.recorder
            .reserved
            .lock()
            .expect("recorder lock poisoned")
            .remove(&self.id);
    }
}

/// Shared between a session's relay, its flusher and its watchers.
struct Live {
    user: String,
    /// Transcript bytes in the store so far (for quotas and the disk watermark).
    stored: AtomicU64,
    started: Instant,
    inner: Mutex<Pending>,
    /// Wakes the flusher early (a full batch, or the end of the session).
    flush_now: Notify,
    /// Wakes a relay waiting for room in the batch.
    room: Notify,
    failure: watch::Sender<Option<String>>,
}

/// Chunks not yet written, and what watchers need to join consistently.
struct Pending {
    chunks: Vec<Chunk>,
    /// What `chunks` hold in memory, each counted by [`held_by`].
    bytes: usize,
    /// `bytes` beyond [`BATCH_BYTES`], charged to the memory budget.
    account: Account,
    /// The chunks at the front that the flusher is writing (part of `chunks`
    /// and `bytes` until they land).
    taken: Footprint,
    /// Batches already in the store.
    batches: u32,
    resizes: u32,
    /// Bytes the user sent, recorded or not.
    input_bytes: u64,
    /// Bytes the target sent, recorded or not (for `sessions` while it is live).
    output_bytes: u64,
    finished: bool,
    /// Live chunks for watchers, each with a queue bounded in bytes; dropped
    /// at the end, so that watchers see the session close.
    watchers: Watchers,
}

/// What a watcher starts from: everything recorded so far, then the live feed.
pub struct Follow {
    /// Batches already in the store: read them with [`Recorder::batches`].
    pub stored: u32,
    /// Chunks recorded but not yet stored.
    pub pending: Vec<Chunk>,
    pub live: Feed,
}

impl Recorder {
    /// The recorder on `store` (building the session indexes an older database
    /// lacks).
    pub fn open(
        store: Arc<Store>,
        record_input: bool,
        record_file_transfers: bool,
    ) -> Result<Recorder, StoreError> {
        let write_bytes = store.backend().write_bytes();
        let concurrent_writes = store.backend().concurrent_writes().max(1);
        Ok(Recorder {
            store: SessionStore::open(store)?,
            writers: Arc::new(Semaphore::new(concurrent_writes + 1)),
            record_input,
            record_file_transfers,
            live: Mutex::new(HashMap::new()),
            reserved: Mutex::new(BTreeSet::new()),
            limits: RecordingLimits::UNLIMITED,
            data_dir: None,
            memory: Budget::new(crate::budget::DEFAULT_LIMIT),
            node: String::new(),
            watch_slots: Slots::default(),
            totals: Arc::default(),
            write_bytes,
            pending_cap: PENDING_CAP.max((concurrent_writes + 2) * write_bytes),
            concurrent_writes,
        })
    }

    /// What relays waited for the store and what its writes took, so far.
    pub fn totals(&self) -> RecordingTotals {
        let totals = &self.totals;
        RecordingTotals {
            waited: Duration::from_nanos(totals.waited_ns.load(Ordering::Relaxed)),
            writes: totals.writes.load(Ordering::Relaxed),
            writing: Duration::from_nanos(totals.writing_ns.load(Ordering::Relaxed)),
        }
    }

    /// The same recorder writing `node` into the sessions it starts.
    pub fn with_node(mut self, node: &str) -> Recorder {
        self.node = node.to_string();
        self
    }

    /// The same recorder charging unflushed batches to `memory`, the budget the
    /// relay's pipes share.
    pub fn with_memory(mut self, memory: Arc<Budget>) -> Recorder {
        self.memory = memory;
        self
    }

    /// The same recorder enforcing `limits`, with free space measured in `data_dir`.
    pub fn with_limits(mut self, limits: RecordingLimits, data_dir: PathBuf) -> Recorder {
        self.limits = limits;
        self.data_dir = Some(data_dir);
        self
    }

    pub fn limits(&self) -> RecordingLimits {
        self.limits
    }

    /// Whether `user` may start a session now: the store can be written, the disk
    /// is above `min_free_disk`, and their live sessions are under `user_quota`.
    /// The refusal says which and what to do.
    pub fn room_for(&self, user: &str) -> Result<(), String> {
        if let Some(failure) = self.store.failure() {
            let until = if self.store.failure_is_sticky() {
                "until it restarts with the database reopened"
            } else {
                "until the database answers again"
            };
            return Err(format!(
                "the bastion cannot write its database ({failure}); new sessions are refused \
                 {until}; tell an operator"
            ));
        }
        if let Some(free) = self.disk_low() {
            return Err(disk_full_message(
                free,
                self.limits.min_free_disk,
                "new sessions are refused until an operator frees space",
            ));
        }
        if let Some(quota) = self.limits.user_quota {
            let used = self.user_stored(user);
            if used >= quota {
                return Err(format!(
                    "your live sessions have recorded {} (user_quota = {}); end one of them first",
                    Size(used),
                    Size(quota)
                ));
            }
        }
        Ok(())
    }

    /// The free bytes on the data directory's file system when they are below
    /// `min_free_disk` (a failed measurement counts as no space: fail closed).
    pub fn disk_low(&self) -> Option<u64> {
        let dir = self.data_dir.as_ref()?;
        if self.limits.min_free_disk == 0 {
            return None;
        }
        let free = disk::free_bytes(dir).unwrap_or_else(|err| {
            tracing::error!(dir = %dir.display(), error = %err, "cannot measure free disk space");
            0
        });
        (free < self.limits.min_free_disk).then_some(free)
    }

    /// Ends the live session that has stored the most (and is not ending already)
    /// with `reason`; returns its id, user and stored bytes.
    pub fn end_largest(&self, reason: &str) -> Option<(u64, String, u64)> {
        let live = self.live.lock().expect("recorder lock poisoned");
        let (id, session) = live
            .iter()
            .filter(|(_, l)| l.failure.borrow().is_none())
            .max_by_key(|(_, l)| l.stored.load(Ordering::Relaxed))?;
        stop(session, reason.to_string());
        Some((
            *id,
            session.user.clone(),
            session.stored.load(Ordering::Relaxed),
        ))
    }

    /// Bytes stored by `user`'s live sessions.
    fn user_stored(&self, user: &str) -> u64 {
        self.live
            .lock()
            .expect("recorder lock poisoned")
            .values()
            .filter(|l| l.user == user)
            .map(|l| l.stored.load(Ordering::Relaxed))
            .sum()
    }

    /// Why a session that has just stored more must end, if it must.
    fn over_quota(&self, live: &Live) -> Option<String> {
        let stored = live.stored.load(Ordering::Relaxed);
        if let Some(quota) = self.limits.session_quota.filter(|q| stored > *q) {
            return Some(format!(
                "this session reached its recording quota ({} stored, session_quota = {})",
                Size(stored),
                Size(quota)
            ));
        }
        if let Some(quota) = self.limits.user_quota {
            let used = self.user_stored(&live.user);
            if used > quota {
                return Some(format!(
                    "your live sessions reached your recording quota ({} stored, user_quota = {})",
                    Size(used),
                    Size(quota)
                ));
            }
        }
        None
    }

    /// Takes the next session id. `failed` (kind `session.failed`, with actor,
    /// target and grant) is appended if the reservation is dropped before
    /// [`Recorder::start`] uses it.
    pub fn reserve(self: &Arc<Self>, failed: AuditEvent) -> Result<Reservation, StoreError> {
        // In the store first (every node's `audit verify` reads it), then here;
        // no lock is held across the database's round trips.
        let id = self.store.reserve_id(&self.node)?;
        self.reserved
            .lock()
            .expect("recorder lock poisoned")
            .insert(id);
        Ok(Reservation {
            recorder: self.clone(),
            id,
            failed: Some(failed),
            reason: "the session ended before its recording started".to_string(),
        })
    }

    /// The last id handed out, and the ids reserved right now (by any node) whose
    /// sessions have neither started recording nor failed yet, read together. The
    /// counter is read first: an id it counts was reserved before (a node writes
    /// its reservation right after taking the id) or is accounted for by then.
    pub fn reservations(&self) -> Result<(u64, BTreeSet<u64>), StoreError> {
        let reserved = self.reserved.lock().expect("recorder lock poisoned");
        let issued = self.store.last_session_id()?;
        let mut all = reserved.clone();
        all.extend(self.store.reserved_ids()?.into_iter().map(|(id, _)| id));
        Ok((issued, all))
    }

    /// Gives up the ids that `node` reserved and never accounted for (it stopped
    /// between taking an id and recording), each with a `session.failed` event
    /// that `announce` appends first.
    pub fn release_orphans(
        &self,
        node: &str,
        mut announce: impl FnMut(u64) -> Result<(), StoreError>,
    ) -> Result<Vec<u64>, StoreError> {
        let mut released = Vec::new();
        for (id, holder) in self.store.reserved_ids()? {
            if holder != node {
                continue;
            }
            announce(id)?;
            self.store.release_id(id)?;
            released.push(id);
        }
        Ok(released)
    }

    /// Registers a new session (state `live`) under a reserved id and starts its
    /// flusher.
    pub fn start(
        self: &Arc<Self>,
        mut reservation: Reservation,
        info: SessionInfo,
    ) -> Result<SessionRecorder, StoreError> {
        let full = !info.file_transfer || self.record_file_transfers;
        let record = SessionRecord {
            id: reservation.id,
            certificate: info.certificate,
            user: info.user,
            target: info.target,
            login: info.login,
            grant: info.grant,
            client: info.client,
            started_at: Utc::now(),
            ended_at: None,
            kind: info.kind,
            command: info.command,
            term: info.term,
            cols: info.cols,
            rows: info.rows,
            resizes: 0,
            exit_status: None,
            exit_signal: None,
            bytes_in: 0,
            bytes_out: 0,
            state: SessionState::Live,
            full_transcript: full,
            input_recorded: full && self.record_input,
            batches: 0,
            transcript_bytes: 0,
            stored_bytes: 0,
            digest: None,
            digest_source: None,
            pruned: false,
            received_input: false,
            node: self.node.clone(),
        };
        self.store.save_session(&record)?;
        reservation.failed = None; // the record accounts for the id now
        drop(reservation);
        let live = Arc::new(Live {
            user: record.user.clone(),
            stored: AtomicU64::new(0),
            started: Instant::now(),
            inner: Mutex::new(Pending {
                chunks: Vec::new(),
                bytes: 0,
                account: Account::new(self.memory.clone(), BATCH_BYTES),
                taken: Footprint::default(),
                batches: 0,
                resizes: 0,
                input_bytes: 0,
                output_bytes: 0,
                finished: false,
                watchers: Watchers::default(),
            }),
            flush_now: Notify::new(),
            room: Notify::new(),
            failure: watch::channel(None).0,
        });
        self.live
            .lock()
            .expect("recorder lock poisoned")
            .insert(record.id, live.clone());
        let flusher = tokio::spawn(flush_loop(self.clone(), live.clone(), record.clone()));
        Ok(SessionRecorder {
            recorder: self.clone(),
            id: record.id,
            initial: record.clone(),
            live,
            full,
            record_input: record.input_recorded,
            flusher: Some(flusher),
            ending: false,
        })
    }

    /// Joins a live session as `watcher`: what it has shown so far, then
    /// everything new. `None`: the session is not live here; refused while
    /// [`WATCHES_MAX`] watches run, or [`WATCHES_PER_USER`] of the watcher's.
    pub fn follow(&self, id: u64, watcher: &str) -> Result<Option<Follow>, WatchesFull> {
        let Some(live) = self
            .live
            .lock()
            .expect("recorder lock poisoned")
            .get(&id)
            .cloned()
        else {
            return Ok(None);
        };
        let mut pending = live.inner.lock().expect("recording lock poisoned");
        if pending.finished {
            return Ok(None); // ending right now
        }
        let feed = pending.watchers.join(self.watch_slots.take(watcher)?);
        Ok(Some(Follow {
            stored: pending.batches,
            pending: pending.chunks.clone(),
            live: feed,
        }))
    }

    /// A session's stored transcript, one decoded batch at a time: export, replay,
    /// watch, search and recovery hold one batch in memory, never a whole session.
    pub fn batches(&self, id: u64) -> Batches<'_> {
        Batches {
            store: &self.store,
            session: id,
            next: 0,
        }
    }

    /// [`Recorder::batches`] from batch `first` on (`watch` of a session another
    /// node carries reads what that node flushed since it last looked).
    pub fn batches_from(&self, id: u64, first: u32) -> Batches<'_> {
        Batches {
            store: &self.store,
            session: id,
            next: first,
        }
    }

    /// [`Recorder::batches`] for async callers that stream a transcript to a
    /// client: each batch is read and decoded on the blocking pool.
    pub fn reader(self: &Arc<Self>, id: u64) -> BatchReader {
        BatchReader {
            recorder: self.clone(),
            session: id,
            next: 0,
        }
    }

    /// Every stored chunk of a session, in order (for tests and small tools; the
    /// bastion itself reads with [`Recorder::batches`]).
    pub fn chunks(&self, id: u64) -> Result<Vec<Chunk>, StoreError> {
        let mut chunks = Vec::new();
        for batch in self.batches(id) {
            chunks.extend(batch?);
        }
        Ok(chunks)
    }

    /// Whether the session's recorded output or input contains `needle`, read one
    /// batch at a time. A match may span chunks and batches, but never mixes the two
    /// directions: each keeps its own window.
    pub fn transcript_contains(&self, id: u64, needle: &[u8]) -> Result<bool, StoreError> {
        if needle.is_empty() {
            return Ok(true);
        }
        let mut output = SearchWindow::new(needle);
        let mut input = SearchWindow::new(needle);
        for batch in self.batches(id) {
            for chunk in batch? {
                let window = match chunk.stream {
                    Stream::Stdout | Stream::Stderr => &mut output,
                    Stream::Stdin => &mut input,
                    Stream::Resize => continue,
                };
                if window.push(&chunk.data) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Whether a live session has received input so far.
    pub fn live_received_input(&self, id: u64) -> bool {
        let live = self
            .live
            .lock()
            .expect("recorder lock poisoned")
            .get(&id)
            .cloned();
        live.is_some_and(|live| {
            live.inner
                .lock()
                .expect("recording lock poisoned")
                .input_bytes
                > 0
        })
    }

    /// Bytes a live session has received and sent so far, `(in, out)` as in
    /// [`SessionRecord::bytes_in`] and [`SessionRecord::bytes_out`].
    pub fn live_bytes(&self, id: u64) -> Option<(u64, u64)> {
        let live = self
            .live
            .lock()
            .expect("recorder lock poisoned")
            .get(&id)
            .cloned()?;
        let pending = live.inner.lock().expect("recording lock poisoned");
        Some((pending.input_bytes, pending.output_bytes))
    }

    /// Every recorded session, oldest first.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.store.sessions()
    }

    /// The recorded sessions `query` wants, oldest first (read through an index
    /// when it names a user, target, start or live sessions).
    pub fn find(&self, query: &SessionQuery) -> Result<Vec<SessionRecord>, StoreError> {
        self.store.find(query)
    }

    /// One session's record.
    pub fn session(&self, id: u64) -> Result<Option<SessionRecord>, StoreError> {
        self.store.session(id)
    }

    /// [`Recorder::session`] for async callers, read on the blocking pool.
    pub async fn read_session(
        self: &Arc<Self>,
        id: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let recorder = self.clone();
        off_the_runtime(move || recorder.session(id))
            .await
            .map_err(StoreError::Backend)?
    }

    /// Recomputes a transcript's SHA-256 from the stored batches.
    pub fn digest_of(&self, id: u64) -> Result<String, StoreError> {
        let mut digest = TranscriptDigest::default();
        let mut index = 0;
        while let Some(stored) = self.store.batch(id, index)? {
            digest.update(&stored);
            index += 1;
        }
        Ok(digest.hex())
    }

    /// Marks the live sessions that `node` carried as `interrupted` (and those
    /// recorded before nodes had ids, with `node` empty), with the digest of what
    /// was flushed, computed now and marked as such ([`DigestSource::Recovery`]):
    /// nothing proves the batches are the ones the bastion wrote. Run at start for
    /// this node's previous run, and for a node the cluster declared dead;
    /// `announce` chains each session's `session.interrupted` event before its
    /// record changes, so a record never says `interrupted` without one.
    pub fn recover(
        &self,
        node: &str,
        mut announce: impl FnMut(&SessionRecord) -> Result<(), StoreError>,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let mut recovered = Vec::new();
        let live = SessionQuery {
            live: true,
            ..SessionQuery::default()
        };
        for session in self.store.find(&live)? {
            if !(session.node == node || session.node.is_empty()) {
                continue;
            }
            recovered.push(self.interrupt(session, &mut announce)?);
        }
        Ok(recovered)
    }

    /// Marks one session `interrupted` as [`Recorder::recover`] says, once
    /// `announce` has chained its event.
    fn interrupt(
        &self,
        mut session: SessionRecord,
        announce: &mut impl FnMut(&SessionRecord) -> Result<(), StoreError>,
    ) -> Result<SessionRecord, StoreError> {
        session.state = SessionState::Interrupted;
        // Recounted batch by batch (a crash in a huge session must not make the
        // next start load its whole transcript), the digest over the same
        // batches as the count. The transcript ends at the first gap: a write
        // that landed after one the crash lost (a store that takes several at
        // once) is not part of it, and is left for retention, not removed (a
        // sweep must never destroy what a node it took for dead still wrote).
        let (mut batches, mut stored_bytes) = (0, 0);
        let mut digest = TranscriptDigest::default();
        while let Some(stored) = self.store.batch(session.id, batches)? {
            digest.update(&stored);
            batches += 1;
            stored_bytes += stored.len() as u64;
        }
        session.digest = Some(digest.hex());
        session.digest_source = Some(DigestSource::Recovery);
        let (mut transcript_bytes, mut received_input) = (0, false);
        for batch in self.batches(session.id).take(batches as usize) {
            for chunk in batch? {
                transcript_bytes += chunk.data.len() as u64;
                received_input |= chunk.stream == Stream::Stdin;
            }
        }
        session.batches = batches;
        session.stored_bytes = stored_bytes;
        session.transcript_bytes = transcript_bytes;
        session.received_input = received_input;
        announce(&session)?;
        self.store.save_session(&session)?;
        Ok(session)
    }

    /// Seals the recording of a session whose task stopped before the session
    /// ended (see `Drop for SessionRecorder`), once its flusher has written what
    /// was pending: `interrupted`, with its `session.interrupted` event.
    fn abandoned(&self, id: u64) -> Result<(), StoreError> {
        let Some(session) = self.store.session(id)? else {
            return Ok(());
        };
        if !session.is_live() {
            return Ok(());
        }
        self.interrupt(session, &mut |session| {
            let event = interrupted_event(session, None).detail(
                "reason",
                "the session's task stopped before the session ended",
            );
            self.store.append_audit(event).map(|_| ())
        })?;
        Ok(())
    }

    /// Removes the transcripts of sessions last seen before `cutoff`; returns the
    /// pruned session ids and the bytes freed. Metadata and audit events stay.
    pub fn prune(&self, cutoff: DateTime<Utc>) -> Result<(Vec<u64>, u64), StoreError> {
        let mut pruned = Vec::new();
        let mut freed = 0;
        for mut session in self.store.started_by(cutoff)? {
            if session.is_live() || session.pruned || session.last_seen() >= cutoff {
                continue;
            }
            freed += self.store.delete_batches(session.id)?;
            session.pruned = true;
            self.store.save_session(&session)?;
            pruned.push(session.id);
        }
        Ok((pruned, freed))
    }

    /// Memory held by live sessions' recordings not yet written to the store
    /// (chunks counted by [`held_by`]).
    pub fn queued_bytes(&self) -> usize {
        self.live
            .lock()
            .expect("recorder lock poisoned")
            .values()
            .map(|live| live.inner.lock().expect("recording lock poisoned").bytes)
            .sum()
    }

    /// Drops a session from the live ones (also while a panic unwinds: never
    /// panics itself).
    fn forget(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Iterator over a session's stored batches, decoded, fetched one at a time.
pub struct Batches<'a> {
    store: &'a SessionStore,
    session: u64,
    next: u32,
}

impl Iterator for Batches<'_> {
    type Item = Result<Vec<Chunk>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let stored = match self.store.batch(self.session, self.next) {
            Ok(Some(stored)) => stored,
            Ok(None) => return None,
            Err(err) => return Some(Err(err)),
        };
        self.next += 1;
        Some(
            transcript::decompress(&stored)
                .and_then(|batch| transcript::decode(&batch))
                .map_err(damaged),
        )
    }
}

/// A session's stored batches for async code, one at a time. Each is read (a
/// round trip on PostgreSQL) and decompressed (up to a MiB) on the blocking pool,
/// never on the runtime thread that carries other sessions too.
pub struct BatchReader {
    recorder: Arc<Recorder>,
    session: u64,
    next: u32,
}

impl BatchReader {
    /// The next batch, or `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Chunk>>, StoreError> {
        let (recorder, session, next) = (self.recorder.clone(), self.session, self.next);
        let batch = off_the_runtime(move || recorder.batches_from(session, next).next())
            .await
            .map_err(StoreError::Backend)?
            .transpose()?;
        if batch.is_some() {
            self.next += 1;
        }
        Ok(batch)
    }

    /// How many batches were read so far.
    pub fn read(&self) -> u32 {
        self.next
    }
}

/// Runs `work` on the blocking pool, for reads and writes that async code must
/// not wait for on its runtime thread (a round trip each on PostgreSQL). A panic
/// in `work` goes on in the caller, as if it had run there; the runtime stopping
/// before `work` ran is an error.
async fn off_the_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Ok(done),
        Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
        Err(cancelled) => Err(format!("the runtime is stopping: {cancelled}")),
    }
}

/// The tail of one stream that a match may still start in, and the search over it.
struct SearchWindow<'a> {
    needle: &'a [u8],
    tail: Vec<u8>,
}

impl<'a> SearchWindow<'a> {
    fn new(needle: &'a [u8]) -> SearchWindow<'a> {
        SearchWindow {
            needle,
            tail: Vec::new(),
        }
    }

    /// Adds the next bytes of the stream; true once the needle has been seen.
    fn push(&mut self, data: &[u8]) -> bool {
        self.tail.extend_from_slice(data);
        if self
            .tail
            .windows(self.needle.len())
            .any(|w| w == self.needle)
        {
            return true;
        }
        let keep = self.needle.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        false
    }
}

/// What a session ended for the disk's sake, or a refused one, is told.
pub fn disk_full_message(free: u64, min_free: u64, consequence: &str) -> String {
    format!(
        "the bastion's disk is nearly full ({} free, min_free_disk = {}); {consequence}",
        Size(free),
        Size(min_free)
    )
}

/// Ends a live session's relay with `reason` (its flusher still writes what is
/// pending); the first reason wins.
fn stop(live: &Live, reason: String) {
    live.failure.send_if_modified(|failure| {
        if failure.is_some() {
            return false;
        }
        *failure = Some(reason);
        true
    });
    live.room.notify_waiters();
}

fn damaged(err: TranscriptError) -> StoreError {
    StoreError::Corrupt {
        tree: "chunks",
        detail: err.to_string(),
    }
}

/// The relay's handle on one session's recording.
pub struct SessionRecorder {
    recorder: Arc<Recorder>,
    id: u64,
    /// The record as stored at the start.
    initial: SessionRecord,
    live: Arc<Live>,
    full: bool,
    record_input: bool,
    /// Until [`SessionRecorder::finish`] has awaited it.
    flusher: Option<JoinHandle<Flushed>>,
    /// Whether `finish` got as far as announcing the end: from then on the end
    /// is its to write, and a drop leaves it alone.
    ending: bool,
}

impl SessionRecorder {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When the record says the session started (its `session.start` event's time).
    pub fn started_at(&self) -> DateTime<Utc> {
        self.initial.started_at
    }

    /// Output the user sees.
    pub async fn output(&self, stream: Stream, data: &Bytes) {
        if self.full {
            self.push(stream, data.clone()).await; // counts the output too
        } else {
            self.live
                .inner
                .lock()
                .expect("recording lock poisoned")
                .output_bytes += data.len() as u64;
        }
    }

    /// What the user typed or piped in (unless `record_input = false`).
    pub async fn input(&self, data: &Bytes) {
        if self.record_input {
            self.push(Stream::Stdin, data.clone()).await; // counts the input too
        } else {
            self.live
                .inner
                .lock()
                .expect("recording lock poisoned")
                .input_bytes += data.len() as u64;
        }
    }

    pub async fn resize(&self, cols: u32, rows: u32) {
        self.live
            .inner
            .lock()
            .expect("recording lock poisoned")
            .resizes += 1;
        if self.full {
            self.push(Stream::Resize, Bytes::from(format!("{cols}x{rows}")))
                .await;
        }
    }

    /// Resolves with the reason if the recording can no longer be written.
    pub async fn failed(&self) -> String {
        let mut failure = self.live.failure.subscribe();
        loop {
            if let Some(reason) = failure.borrow_and_update().clone() {
                return reason;
            }
            if failure.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn push(&self, stream: Stream, data: Bytes) {
        let chunk = Chunk {
            offset_us: self.live.started.elapsed().as_micros() as u64,
            stream,
            data,
        };
        let size = chunk.data.len();
        let cost = held_by(&chunk);
        loop {
            let room = self.live.room.notified();
            let freed = self.recorder.memory.freed();
            {
                let mut pending = self.live.inner.lock().expect("recording lock poisoned");
                let total = pending.bytes + cost;
                let failed = self.live.failure.borrow().is_some();
                // An empty batch always takes one chunk, so a session never waits on
                // other sessions' memory for ever.
                let fits = pending.bytes == 0
                    || (total <= self.recorder.pending_cap && pending.account.hold(total));
                if failed || fits {
                    pending.bytes = total;
                    if chunk.stream == Stream::Stdin {
                        pending.input_bytes += size as u64;
                    } else if chunk.stream.is_output() {
                        pending.output_bytes += size as u64;
                    }
                    pending.watchers.send(&chunk);
                    pending.chunks.push(chunk);
                    if total - pending.taken.held >= BATCH_BYTES {
                        self.live.flush_now.notify_one();
                    }
                    return;
                }
            }
            // The disk is behind (or the budget is spent): wait for a flush.
            self.live.flush_now.notify_one();
            let waiting = Instant::now();
            tokio::select! {
                _ = room => {}
                _ = freed => {}
            }
            self.recorder.totals.waited(waiting.elapsed());
        }
    }

    /// Flushes the rest, stores the end state and returns the final record, with
    /// the error if the recording could not be completed. `announce` chains the
    /// `session.end` event (the future it returns is awaited) before the record is
    /// stored as closed, so a record never says `closed` without one.
    pub async fn finish<Announced: std::future::Future<Output = ()>>(
        mut self,
        end: SessionEnd,
        announce: impl FnOnce(&SessionRecord, Option<&str>) -> Announced,
    ) -> (SessionRecord, Option<String>) {
        self.live.finish();
        let flusher = self.flusher.as_mut().expect("finished once");
        let flushed = flusher.await;
        // Awaited: a drop from here on must not await it again.
        self.flusher = None;
        let (mut record, digest, error) = match flushed {
            Ok(flushed) => (flushed.record, flushed.digest.hex(), flushed.error),
            Err(panicked) => (
                self.initial.clone(),
                self.recorder.digest_of(self.id).unwrap_or_default(),
                Some(format!("the recording stopped: {panicked}")),
            ),
        };
        self.recorder.forget(self.id);
        record.ended_at = Some(Utc::now());
        record.exit_status = end.exit_status;
        record.exit_signal = end.exit_signal;
        record.bytes_in = end.bytes_in;
        record.bytes_out = end.bytes_out;
        {
            let pending = (self.live.inner.lock()).unwrap_or_else(PoisonError::into_inner);
            record.resizes = pending.resizes;
            record.received_input = pending.input_bytes > 0 || end.bytes_in > 0;
        }
        record.state = SessionState::Closed;
        record.digest = Some(digest);
        record.digest_source = Some(DigestSource::Bastion);
        self.ending = true;
        announce(&record, error.as_deref()).await;
        // On the blocking pool: several writes, each a round trip on PostgreSQL.
        let (recorder, saving) = (self.recorder.clone(), record.clone());
        let saved = off_the_runtime(move || recorder.store.save_session(&saving)).await;
        let error = match saved {
            Ok(Ok(())) => error,
            Ok(Err(err)) => error.or(Some(err.to_string())),
            Err(cancelled) => error.or(Some(cancelled)),
        };
        (record, error)
    }
}

impl Drop for SessionRecorder {
    /// A session whose task stopped before the session ended (a bug that panics
    /// in the relay) still ends: its flusher writes what was pending, then the
    /// record is sealed `interrupted` with its event, and the session leaves
    /// `sessions --active`, instead of staying live until the next start. At
    /// shutdown, when the runtime drops every task, nothing can run any more: the
    /// next start recovers those sessions, as after a crash. This never panics,
    /// even on a poisoned lock: it may run while a panic unwinds.
    fn drop(&mut self) {
        if self.ending {
            return;
        }
        self.live.finish();
        let flusher = self.flusher.take();
        let (recorder, id) = (self.recorder.clone(), self.id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            recorder.forget(id);
            return;
        };
        tracing::error!(session = id, "the session's task stopped before the session ended; its recording will be sealed as interrupted (now, or at the next start)");
        runtime.spawn(async move {
            if let Some(flusher) = flusher {
                let _ = flusher.await;
            }
            recorder.forget(id);
            let sealed = tokio::task::spawn_blocking(move || recorder.abandoned(id)).await;
            if let Ok(Err(err)) = sealed {
                tracing::error!(session = id, error = %err, "cannot seal an interrupted session; the next start will");
            }
        });
    }
}

impl Live {
    /// No more chunks: watchers see the end, the flusher writes the rest and stops.
    fn finish(&self) {
        {
            let mut pending = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            pending.finished = true;
            pending.watchers = Watchers::default();
        }
        self.flush_now.notify_one();
    }
}

/// What the flusher leaves behind.
struct Flushed {
    record: SessionRecord,
    digest: TranscriptDigest,
    error: Option<String>,
}

/// Writes a session's chunks until it is finished (or the store fails), in slices
/// of about [`Recorder::write_bytes`] taken in order. While one slice is encoded,
/// up to [`Recorder::concurrent_writes`] earlier ones are written: the bastion's
/// work and the store's overlap instead of taking turns (a serial flusher left the
/// relay waiting for a third of a bulk transfer), and a store that gains from
/// several writes at once (PostgreSQL) gets them. Writes count as landed in order,
/// so the digest seals a prefix of the transcript, and writes that land after one
/// failed are removed again. A slice's chunks leave memory as soon as it and every
/// slice before it landed, which gives the relay room a slice at a time rather
/// than once a whole backlog is written.
async fn flush_loop(recorder: Arc<Recorder>, live: Arc<Live>, record: SessionRecord) -> Flushed {
    let mut flusher = Flusher {
        recorder,
        live,
        record,
        digest: TranscriptDigest::default(),
        write_failed: false,
    };
    let error = flusher.run().await.err();
    Flushed {
        record: flusher.record,
        digest: flusher.digest,
        error,
    }
}

/// One session's flusher: the record and digest as of the last write that landed.
struct Flusher {
    recorder: Arc<Recorder>,
    live: Arc<Live>,
    record: SessionRecord,
    digest: TranscriptDigest,
    /// A write failed: the writes after it follow a gap.
    write_failed: bool,
}

/// What a slice of pending chunks holds: its chunks (counted from the front of
/// the pending batch), their bytes in memory ([`held_by`]) and transcript bytes.
#[derive(Clone, Copy, Default)]
struct Footprint {
    chunks: usize,
    held: usize,
    plain: u64,
}

/// Where the next slice goes: the number of its first batch, and the digest over
/// every batch before it (those of writes still under way included).
#[derive(Clone, Default)]
struct Position {
    batches: u32,
    digest: TranscriptDigest,
}

/// A slice encoded for the store: its writes of about [`Recorder::write_bytes`],
/// each with the digest over the transcript up to its end.
struct Encoded {
    writes: Vec<(Vec<Vec<u8>>, TranscriptDigest)>,
}

impl Encoded {
    /// Cuts a slice's stored batches into writes ([`writes`]) and chains each
    /// write's batches onto `digest`, the digest over everything before them.
    fn new(mut batches: Vec<Vec<u8>>, mut digest: TranscriptDigest, write_bytes: usize) -> Encoded {
        let counts: Vec<usize> = writes(&batches, write_bytes)
            .map(<[Vec<u8>]>::len)
            .collect();
        let mut rest = batches.drain(..);
        let writes = counts
            .into_iter()
            .map(|count| {
                let write: Vec<Vec<u8>> = rest.by_ref().take(count).collect();
                write.iter().for_each(|batch| digest.update(batch));
                (write, digest.clone())
            })
            .collect();
        Encoded { writes }
    }

    /// Where the slice after this one goes, this one following `before`.
    fn after(&self, before: &Position) -> Position {
        let batches: usize = self.writes.iter().map(|(write, _)| write.len()).sum();
        Position {
            batches: before.batches + batches as u32,
            digest: self
                .writes
                .last()
                .map_or_else(|| before.digest.clone(), |(_, d)| d.clone()),
        }
    }
}

/// A write on the blocking pool, and what its slice holds (released from the
/// pending batch once it landed).
struct InFlight {
    task: JoinHandle<Landed>,
    slice: Footprint,
}

impl Flusher {
    /// Flushes until the session ends. After a failure it ends the session at
    /// once, then waits for the writes still under way, so that none lands
    /// after the seal ([`Flusher::abandon`]).
    async fn run(&mut self) -> Result<(), String> {
        let mut writing = VecDeque::new();
        let flushed = self.pump(&mut writing).await;
        if let Err(error) = &flushed {
            tracing::error!(session = self.record.id, %error, "cannot write recording; ending the session");
            let live = &self.live;
            live.failure
                .send_replace(Some(format!("the recording cannot be written ({error})")));
            live.room.notify_waiters();
            self.abandon(writing).await;
        }
        flushed
    }

    async fn pump(&mut self, writing: &mut VecDeque<InFlight>) -> Result<(), String> {
        // Sessions that start together must not flush together: a random phase
        // spreads hundreds of flushers over the interval instead of waking them in
        // one burst.
        let phase = FLUSH_INTERVAL.mul_f64(rand::rng().random::<f64>());
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, FLUSH_INTERVAL);
        // A backlog keeps the flusher busy past its ticks; those are not owed.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ahead = Position {
            batches: self.record.batches,
            digest: self.digest.clone(),
        };
        // Everything pending is due (at a tick, on request, at the end), not only
        // full slices.
        let mut due = false;
        loop {
            let (waiting, finished) = self.waiting();
            due |= finished;
            if waiting >= self.recorder.write_bytes || (due && waiting > 0) {
                let (chunks, slice, rest) = self.take();
                due = due && rest > 0;
                let (encoded, writer) = self
                    .encode_landing(chunks, slice.held, &ahead, writing)
                    .await?;
                while writing.len() >= self.recorder.concurrent_writes {
                    let oldest = writing.pop_front().expect("a write is under way");
                    self.land(oldest).await?;
                }
                let first = ahead.batches;
                ahead = encoded.after(&ahead);
                writing.push_back(self.write(encoded, first, slice, writer));
                continue;
            }
            if let Some(oldest) = writing.front_mut() {
                // Lands the oldest write, unless the relay fills a slice (or the
                // session ends) first: that slice is encoded while it is written.
                let landed = tokio::select! {
                    landed = &mut oldest.task => landed,
                    _ = self.live.flush_now.notified() => continue,
                };
                let oldest = writing.pop_front().expect("the write that landed");
                self.settle(landed, oldest.slice)?;
                continue;
            }
            if finished {
                return Ok(());
            }
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.live.flush_now.notified() => {}
            }
            due = true;
        }
    }

    /// Encodes `chunks` (holding `held`, see [`held_by`]) to follow `ahead`, landing
    /// the writes under way that end meanwhile, oldest first.
    async fn encode_landing(
        &mut self,
        chunks: Vec<Chunk>,
        held: usize,
        ahead: &Position,
        writing: &mut VecDeque<InFlight>,
    ) -> Result<(Encoded, OwnedSemaphorePermit), String> {
        let encoding = encode(
            self.recorder.writers.clone(),
            chunks,
            held,
            ahead.digest.clone(),
            self.recorder.write_bytes,
        );
        tokio::pin!(encoding);
        loop {
            let Some(oldest) = writing.front_mut() else {
                return encoding.await;
            };
            let landed = tokio::select! {
                encoded = &mut encoding => return encoded,
                landed = &mut oldest.task => landed,
            };
            let oldest = writing.pop_front().expect("the write that landed");
            self.settle(landed, oldest.slice)?;
        }
    }

    /// Bytes pending that no slice has taken yet, and whether the session ended.
    fn waiting(&self) -> (usize, bool) {
        let pending = self.live.inner.lock().expect("recording lock poisoned");
        (pending.bytes - pending.taken.held, pending.finished)
    }

    /// The next pending chunks no slice has taken, about [`Recorder::write_bytes`] of them,
    /// what they hold, and the bytes left untaken after them.
    fn take(&self) -> (Vec<Chunk>, Footprint, usize) {
        let mut pending = self.live.inner.lock().expect("recording lock poisoned");
        let chunks = cut(
            &pending.chunks[pending.taken.chunks..],
            self.recorder.write_bytes,
            held_by,
        )
        .next()
        .unwrap_or_default()
        .to_vec();
        let slice = Footprint {
            chunks: chunks.len(),
            held: chunks.iter().map(held_by).sum(),
            plain: chunks.iter().map(|c| c.data.len() as u64).sum(),
        };
        pending.taken.chunks += slice.chunks;
        pending.taken.held += slice.held;
        let rest = pending.bytes - pending.taken.held;
        (chunks, slice, rest)
    }

    /// Starts storing an encoded slice as batches `first`, `first + 1`, … (the
    /// numbers after those of every write before it). The write holds `writer`
    /// until it is done.
    fn write(
        &self,
        encoded: Encoded,
        first: u32,
        slice: Footprint,
        writer: OwnedSemaphorePermit,
    ) -> InFlight {
        let (store, totals) = (self.recorder.store.clone(), self.recorder.totals.clone());
        let id = self.record.id;
        let task = tokio::task::spawn_blocking(move || {
            let _writer = writer;
            store_writes(&store, (id, first), encoded, &totals)
        });
        InFlight { task, slice }
    }

    /// Waits for a write, counts what landed (even when the rest failed: the seal's
    /// digest and batch count then match the store, and `audit verify` agrees), and
    /// releases its chunks from memory.
    async fn land(&mut self, write: InFlight) -> Result<(), String> {
        let landed = write.task.await;
        self.settle(landed, write.slice)
    }

    /// Counts what a write that ended left in the store; see [`Flusher::land`].
    fn settle(
        &mut self,
        landed: Result<Landed, tokio::task::JoinError>,
        slice: Footprint,
    ) -> Result<(), String> {
        let landed = landed.unwrap_or_else(|panicked| Landed::nothing(panicked.to_string()));
        let record = &mut self.record;
        record.stored_bytes += landed.bytes;
        record.batches += landed.batches;
        self.digest = landed.digest.unwrap_or_else(|| self.digest.clone());
        if let Some(error) = landed.failed {
            self.write_failed = true;
            return Err(error);
        }
        record.transcript_bytes += slice.plain;
        let mut pending = self.live.inner.lock().expect("recording lock poisoned");
        pending.chunks.drain(..slice.chunks);
        pending.taken.chunks -= slice.chunks;
        pending.taken.held -= slice.held;
        pending.bytes -= slice.held;
        let held = pending.bytes;
        pending.account.hold(held); // shrinking: refunds the written excess
        pending.batches = record.batches;
        drop(pending);
        self.live
            .stored
            .store(record.stored_bytes, Ordering::Relaxed);
        if let Some(reason) = self.recorder.over_quota(&self.live) {
            tracing::warn!(session = record.id, user = %record.user, %reason, "ending the session");
            stop(&self.live, reason);
        }
        self.live.room.notify_waiters();
        Ok(())
    }

    /// After the flusher failed: lands the writes still under way in order, as
    /// long as none failed (the failure may have been an encoding's), and
    /// removes what the writes after a failed one stored: they follow a gap,
    /// past the seal. Best effort: the store may be down (then retention
    /// removes them), and a write whose outcome the store could not tell may
    /// still commit afterwards; the same removal also takes a failed write's
    /// own batches that its store kept after all.
    async fn abandon(&mut self, writing: VecDeque<InFlight>) {
        for write in writing {
            let landed = write.task.await;
            if !self.write_failed {
                // A failure here sets `write_failed`; the session already failed.
                let _ = self.settle(landed, write.slice);
            }
        }
        if !self.write_failed {
            return;
        }
        let (store, id, from) = (
            self.recorder.store.clone(),
            self.record.id,
            self.record.batches,
        );
        let removed = tokio::task::spawn_blocking(move || store.delete_batches_from(id, from));
        let error = match removed.await {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => error.to_string(),
            Err(panicked) => panicked.to_string(),
        };
        tracing::warn!(session = id, %error, "cannot remove transcript writes past a failed one");
    }
}

/// One of the writer slots (the recorder's [`Recorder::concurrent_writes`] and
/// one more) for encoding and writing slices.
async fn writer(writers: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    writers
        .clone()
        .acquire_owned()
        .await
        .expect("the writer semaphore is never closed")
}

/// Slices that hold at most this much memory ([`held_by`]: their bytes and a slot
/// per chunk, so that a slice of many empty chunks counts) are encoded on the
/// runtime worker that flushes them. Encoding that much (framing, a compression
/// attempt, SHA-256) takes tens of microseconds, about what relaying one packet
/// does, while a trip through the blocking pool wakes a thread of its own: with 500
/// sessions typing, each flushing a second of keystrokes and echoes, the blocking
/// pool's threads ran 0.12 s a second between them (README, Performance, Load).
const ENCODE_INLINE_BYTES: usize = 8 * 1024;

/// Encodes chunks, which hold `held` ([`held_by`]), and chains them onto `digest`,
/// under a writer slot, which it hands on with the writes: encoded slices waiting
/// for their turn count against the slots too, so however many sessions are
/// behind, at most that many hold one. A slice that holds more than
/// [`ENCODE_INLINE_BYTES`] is encoded on the blocking pool (a MiB took a runtime
/// worker away from the relays behind it). A panic while encoding is an error of
/// this flush either way, not of the task that flushes.
async fn encode(
    writers: Arc<Semaphore>,
    chunks: Vec<Chunk>,
    held: usize,
    digest: TranscriptDigest,
    write_bytes: usize,
) -> Result<(Encoded, OwnedSemaphorePermit), String> {
    let writer = writer(&writers).await;
    let encoding = move || Encoded::new(encode_runs(&chunks), digest, write_bytes);
    let encoded = if held <= ENCODE_INLINE_BYTES {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(encoding))
            .map_err(|panicked| panic_message(&*panicked))?
    } else {
        tokio::task::spawn_blocking(encoding)
            .await
            .map_err(|e| e.to_string())?
    };
    Ok((encoded, writer))
}

/// What a caught panic said, as a `JoinError` of a task that panicked says it.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let said = payload
        .downcast_ref::<&str>()
        .map(|said| said.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    format!("encoding panicked with message {said:?}")
}

/// Frames chunks and compresses them where that pays: runs of about
/// [`STORED_VALUE_BYTES`], consecutive runs that compress stored as one batch (see
/// [`transcript::encode_runs`]).
fn encode_runs(chunks: &[Chunk]) -> Vec<Vec<u8>> {
    #[cfg(test)]
    if chunks
        .iter()
        .any(|chunk| chunk.data == tests::ENCODING_PANICS)
    {
        panic!("injected encoding failure");
    }
    transcript::encode_runs(pieces(chunks))
}

/// What a write left in the store. (The stored record is written at the start
/// and the end only: a crash recovery recounts the batches, and one write per
/// flush would cost a store write per session per interval.)
struct Landed {
    /// The digest over every batch stored so far, up to the last of this
    /// slice's writes that landed; `None` if none did.
    digest: Option<TranscriptDigest>,
    batches: u32,
    bytes: u64,
    failed: Option<String>,
}

impl Landed {
    fn nothing(error: String) -> Landed {
        Landed {
            digest: None,
            batches: 0,
            bytes: 0,
            failed: Some(error),
        }
    }
}

/// Stores an encoded slice as batches `first`, `first + 1`, … of session `id`, a
/// write at a time, each counted in `totals` with its time, up to the first that
/// fails; a batch moves into the store without a copy.
fn store_writes(
    store: &SessionStore,
    (id, first): (u64, u32),
    encoded: Encoded,
    totals: &Totals,
) -> Landed {
    let mut landed = Landed {
        digest: None,
        batches: 0,
        bytes: 0,
        failed: None,
    };
    for (write, digest) in encoded.writes {
        let count = write.len() as u32;
        let size: u64 = write.iter().map(|batch| batch.len() as u64).sum();
        // A panic in the store is a failed write, counted with what landed before
        // it, so the seal still matches the store.
        let writing = Instant::now();
        let put = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.put_batches(id, first + landed.batches, write)
        }))
        .unwrap_or_else(|_| Err(StoreError::Backend("the store panicked".into())));
        totals.wrote(writing.elapsed());
        if let Err(error) = put {
            landed.failed = Some(error.to_string());
            return landed;
        }
        landed.digest = Some(digest);
        landed.batches += count;
        landed.bytes += size;
    }
    landed
}

/// Cuts a flush's stored batches into writes of about `write_bytes`, each batch
/// whole in one write (a crash keeps whole batches, which recovery counts). One
/// write per flush would hold sled's process-wide write lock, or one PostgreSQL
/// statement, for as long as a flush of up to [`Recorder::pending_cap`] takes.
fn writes(batches: &[Vec<u8>], write_bytes: usize) -> impl Iterator<Item = &[Vec<u8>]> {
    cut(batches, write_bytes, Vec::len)
}

/// What one unflushed chunk holds in memory: its bytes and its own slot. Empty
/// chunks are not free: a client may send empty data packets or window changes at
/// wire speed, and counting only their bytes would let them pile up without bound
/// while the disk is behind.
fn held_by(chunk: &Chunk) -> usize {
    std::mem::size_of::<Chunk>() + chunk.data.len()
}

/// Splits pending chunks into runs of about [`STORED_VALUE_BYTES`] (a chunk is never
/// cut; one bigger than that is a run of its own).
fn pieces(chunks: &[Chunk]) -> impl Iterator<Item = &[Chunk]> {
    cut(chunks, STORED_VALUE_BYTES, |chunk| chunk.data.len())
}

/// Splits `items` into consecutive runs whose sizes add up to at most `limit`
/// (an item is never cut; one bigger than `limit` is a run of its own).
fn cut<T>(items: &[T], limit: usize, size_of: impl Fn(&T) -> usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut size = 0;
        let mut end = 0;
        while end < rest.len() && (end == 0 || size + size_of(&rest[end]) <= limit) {
            size += size_of(&rest[end]);
            end += 1;
        }
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stored::Late;

    /// Output whose encoding panics, as a bug in it would.
    pub(super) const ENCODING_PANICS: &[u8] = b"(a chunk whose encoding panics)";

    fn failed() -> AuditEvent {
        AuditEvent::new(crate::audit::AuditKind::SessionFailed, "alice", Utc::now())
    }

    fn info() -> SessionInfo {
        SessionInfo {
            certificate: None,
            user: "alice".into(),
            target: "db".into(),
            login: "postgres".into(),
            grant: "abcdef".into(),
            client: "127.0.0.1:5000".into(),
            kind: "shell".into(),
            command: None,
            term: Some("xterm".into()),
            cols: 80,
            rows: 24,
            file_transfer: false,
        }
    }

    /// A recorder on a fresh sled store with one session started.
    fn recording() -> (tempfile::TempDir, Arc<Recorder>, SessionRecorder) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let recorder = Arc::new(Recorder::open(store, true, false).unwrap());
        let session = recorder
            .start(recorder.reserve(failed()).unwrap(), info())
            .unwrap();
        (dir, recorder, session)
    }

    /// [`recording`] with no recording memory beyond each session's own
    /// allowance ([`BATCH_BYTES`]).
    fn recording_without_memory() -> (tempfile::TempDir, Arc<Recorder>, SessionRecorder) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let recorder = Arc::new(
            Recorder::open(store, true, false)
                .unwrap()
                .with_memory(Budget::new(0)),
        );
        let session = recorder
            .start(recorder.reserve(failed()).unwrap(), info())
            .unwrap();
        (dir, recorder, session)
    }

    /// Why `session` failed: an injected write failure, noticed within 2 s.
    async fn injected_failure(session: &SessionRecorder) {
        let reason = tokio::time::timeout(Duration::from_secs(2), session.failed())
            .await
            .expect("the failure is noticed within a flush interval");
        assert!(reason.contains("injected write failure"), "{reason}");
    }

    #[tokio::test]
    async fn a_recording_that_cannot_be_written_fails_the_session() {
        let (_dir, recorder, session) = recording();
        session
            .output(Stream::Stdout, &Bytes::from_static(b"before\r\n"))
            .await;
        recorder.store.fail_batch_writes(true);
        session
            .output(Stream::Stdout, &Bytes::from_static(b"after\r\n"))
            .await;
        injected_failure(&session).await;
        let mut announced = None;
        let (record, error) = session
            .finish(SessionEnd::default(), |_, error| {
                announced = error.map(str::to_string);
                async {}
            })
            .await;
        let error = error.unwrap();
        assert!(error.contains("injected"), "{error}");
        assert_eq!(announced.as_deref(), Some(error.as_str()));
        assert_eq!(record.digest.unwrap(), recorder.digest_of(1).unwrap());
    }

    /// A flush whose later writes fail seals what its earlier writes stored: the
    /// record's digest and batch count match the store.
    #[tokio::test]
    async fn a_flush_that_fails_half_way_seals_what_landed() {
        let (_dir, recorder, session) = recording();
        recorder.store.fail_batch_writes_after(1);
        // Three incompressible batches of a MiB in one flush: three writes.
        for _ in 0..3 {
            let random: Vec<u8> = (0..recorder.write_bytes)
                .map(|_| rand::random::<u8>())
                .collect();
            session.output(Stream::Stdout, &Bytes::from(random)).await;
        }
        injected_failure(&session).await;
        let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert!(error.unwrap().contains("injected"));
        assert_eq!(record.batches, 1, "one write landed");
        assert_eq!(recorder.store.batch(1, 1).unwrap(), None);
        assert_eq!(record.digest.unwrap(), recorder.digest_of(1).unwrap());
    }

    impl Recorder {
        /// The recorder with `writes` writes per session under way at once, as
        /// on a store that takes several ([`crate::store::Backend::concurrent_writes`]).
        fn with_concurrent_writes(mut self, writes: usize) -> Recorder {
            self.concurrent_writes = writes.max(1);
            self.writers = Arc::new(Semaphore::new(self.concurrent_writes + 1));
            self
        }
    }

    /// [`recording`] on a recorder that keeps two writes under way, whose
    /// transcript writes after the first `writes` are `late`.
    fn recording_with_a_late_write(
        writes: i64,
        late: Late,
    ) -> (tempfile::TempDir, Arc<Recorder>, SessionRecorder) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let recorder = Recorder::open(store, true, false).unwrap();
        let recorder = Arc::new(recorder.with_concurrent_writes(2));
        recorder.store.make_one_batch_write_late(writes, late);
        let session = recorder
            .start(recorder.reserve(failed()).unwrap(), info())
            .unwrap();
        (dir, recorder, session)
    }

    /// The bytes of session `id`'s stored transcript, streams and times aside.
    fn transcript_of(recorder: &Recorder, id: u64) -> Vec<u8> {
        (recorder.chunks(id).unwrap().into_iter())
            .flat_map(|chunk| chunk.data.to_vec())
            .collect()
    }

    /// The store holds batches 0 to the sealed count of session 1 and no other,
    /// and the seal's digest is theirs.
    fn assert_sealed_exactly(recorder: &Recorder, record: &SessionRecord) {
        assert_eq!(
            recorder.store.batch_numbers(1),
            (0..record.batches).collect::<Vec<_>>(),
            "stored batches against the seal's {}",
            record.batches
        );
        assert_eq!(
            record.digest.as_deref(),
            Some(recorder.digest_of(1).unwrap().as_str())
        );
    }

    /// Incompressible output of `mib` MiB, shown in 32 KiB packets as a relay
    /// passes it on; returns what was shown.
    async fn show_random(session: &SessionRecorder, mib: usize) -> Vec<u8> {
        let shown: Vec<u8> = (0..mib << 20).map(|_| rand::random::<u8>()).collect();
        for packet in shown.chunks(32 * 1024) {
            session
                .output(Stream::Stdout, &Bytes::copy_from_slice(packet))
                .await;
        }
        shown
    }

    /// With two writes under way at once, a later write lands before an earlier
    /// one that is late; the transcript is still stored whole and in order, and
    /// the seal covers all of it.
    #[tokio::test]
    async fn writes_that_land_out_of_order_store_the_transcript_in_order() {
        let late = Late {
            by: Duration::from_secs(1),
            ..Late::default()
        };
        let (_dir, recorder, session) = recording_with_a_late_write(1, late);
        let shown = show_random(&session, 12).await;
        let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert_eq!(error, None);
        let landed = recorder.store.landed();
        assert!(
            landed.windows(2).any(|pair| pair[0] > pair[1]),
            "no write landed before an earlier one: {landed:?}"
        );
        assert_sealed_exactly(&recorder, &record);
        let stored = transcript_of(&recorder, 1);
        assert!(
            stored == shown,
            "the transcript differs from what was shown"
        );
    }

    /// A write that fails while a later one lands: the seal covers the writes
    /// before the failed one, and what the later one stored is removed, so no
    /// batch of the session is left past the seal.
    #[tokio::test]
    async fn a_failed_write_leaves_no_later_write_behind() {
        let late = Late {
            by: Duration::from_millis(300),
            fails: true,
            ..Late::default()
        };
        let (_dir, recorder, session) = recording_with_a_late_write(1, late);
        show_random(&session, 6).await;
        injected_failure(&session).await;
        let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert!(error.unwrap().contains("injected"));
        let landed = recorder.store.landed();
        assert!(
            landed.len() >= 2 && landed[1] > record.batches,
            "a write after the failed one landed: {landed:?}"
        );
        assert!(record.batches > 0, "the first write landed");
        assert_sealed_exactly(&recorder, &record);
    }

    /// A failed write ends the session at once, not once the write under way
    /// beside it has landed (which may take as long as a store's timeout).
    #[tokio::test]
    async fn a_failed_write_ends_the_session_without_waiting_for_the_other() {
        let late = Late {
            by: Duration::from_millis(300),
            fails: true,
            others_by: Duration::from_secs(3),
        };
        let (_dir, recorder, session) = recording_with_a_late_write(1, late);
        show_random(&session, 6).await;
        let told = tokio::time::timeout(Duration::from_secs(2), session.failed()).await;
        assert!(
            told.is_ok(),
            "the session was told only after the other write"
        );
        assert!(recorder.store.landed().len() <= 1, "the other write landed");
        let (record, _) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert_sealed_exactly(&recorder, &record);
    }

    /// A failure that is no write's (here the encoding of a slice panicked)
    /// still counts the writes under way that land: nothing good is removed.
    #[tokio::test]
    async fn writes_under_way_when_the_flusher_fails_otherwise_are_kept() {
        let late = Late {
            by: Duration::from_secs(2),
            ..Late::default()
        };
        let (_dir, recorder, session) = recording_with_a_late_write(0, late);
        // A MiB is a slice: its write starts, late.
        show_random(&session, 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The rest is written at the end, and its encoding fails meanwhile.
        let panics = Bytes::from_static(ENCODING_PANICS);
        session.output(Stream::Stdout, &panics).await;
        let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert!(error.unwrap().contains("injected encoding failure"));
        assert!(record.batches > 0, "the late write counted");
        assert_sealed_exactly(&recorder, &record);
    }

    /// A panic while a slice is encoded fails that flush and ends the recording with
    /// the panic's message, whether the slice was small enough to encode on the
    /// worker or went to the blocking pool (a `JoinError`, "task … panicked"), as a
    /// slice of many empty chunks does; what landed before it stays sealed.
    #[tokio::test]
    async fn a_panic_while_encoding_fails_the_flush_on_either_path() {
        let empty_chunks = ENCODE_INLINE_BYTES / std::mem::size_of::<Chunk>() + 1;
        let cases = [
            ("nothing", vec![], "encoding panicked"),
            ("a slice too large", vec![ENCODE_INLINE_BYTES], "task "),
            ("empty chunks", vec![0; empty_chunks], "task "),
        ];
        for (before, shown, path) in cases {
            let (_dir, recorder, session) = recording();
            show_random(&session, 1).await;
            // Everything shown is written, so the next slice holds only what follows.
            let flushed = Instant::now() + Duration::from_secs(10);
            while recorder.queued_bytes() > 0 {
                assert!(Instant::now() < flushed, "the MiB was never written");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for len in shown {
                let data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
                session.output(Stream::Stdout, &Bytes::from(data)).await;
            }
            let panics = Bytes::from_static(ENCODING_PANICS);
            session.output(Stream::Stdout, &panics).await;
            let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
            let error = error.expect("the flush failed");
            assert!(
                error.contains("injected encoding failure") && error.starts_with(path),
                "{before} before: {error}"
            );
            assert!(record.batches > 0, "{before} before: the MiB counted");
            assert_sealed_exactly(&recorder, &record);
        }
    }

    /// A crash that kept a later write without an earlier one: recovery seals
    /// the batches before the gap, and leaves those after it to retention (a
    /// sweep never removes what a node it took for dead may still have written).
    #[tokio::test]
    async fn recovery_seals_the_batches_before_a_gap() {
        let (_dir, recorder, session) = recording();
        let id = session.id();
        std::mem::forget(session); // the bastion stopped: nothing seals it
        let batch = |text: &str| {
            let chunk = Chunk {
                offset_us: 0,
                stream: Stream::Stdout,
                data: Bytes::copy_from_slice(text.as_bytes()),
            };
            encode_runs(&[chunk])
        };
        recorder.store.put_batches(id, 0, batch("landed")).unwrap();
        recorder
            .store
            .put_batches(id, 2, batch("after a gap"))
            .unwrap();
        let recovered = recorder.recover("", |_| Ok(())).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].batches, 1);
        assert_eq!(recovered[0].transcript_bytes, 6);
        assert_eq!(recovered[0].digest, Some(recorder.digest_of(id).unwrap()));
        assert_eq!(transcript_of(&recorder, id), b"landed");
        assert_eq!(recorder.store.batch_numbers(id), [0, 2]);
        recorder.store.delete_batches(id).unwrap();
        assert_eq!(recorder.store.batch_numbers(id), [] as [u32; 0]);
    }

    #[tokio::test]
    async fn empty_chunks_count_against_the_unflushed_batch() {
        let (_dir, recorder, session) = recording_without_memory();
        // The disk is behind: no batch can be written.
        let _disk = recorder
            .writers
            .acquire_many(recorder.concurrent_writes as u32 + 1)
            .await
            .unwrap();
        let most = BATCH_BYTES / std::mem::size_of::<Chunk>() + 1;
        let empty = Bytes::new();
        for pushed in 0.. {
            if tokio::time::timeout(Duration::from_millis(50), session.input(&empty))
                .await
                .is_err()
            {
                break;
            }
            assert!(
                pushed <= most,
                "{pushed} empty chunks held while the disk is behind"
            );
        }
        assert!(recorder.queued_bytes() <= BATCH_BYTES);
    }

    /// A relay that waits for its recording to be written counts the wait (here
    /// the recording memory is spent and every writer slot is taken, as when
    /// the disk is behind), and every write counts with its time (`/metrics`).
    #[tokio::test]
    async fn waits_for_the_store_and_its_writes_are_counted() {
        let (_dir, recorder, session) = recording_without_memory();
        assert_eq!(recorder.totals(), RecordingTotals::default());
        let disk = recorder
            .writers
            .clone()
            .acquire_many_owned(recorder.concurrent_writes as u32 + 1)
            .await
            .unwrap();
        let batch = Bytes::from(vec![b'x'; BATCH_BYTES]);
        session.output(Stream::Stdout, &batch).await;
        let behind = Duration::from_millis(200);
        let catching_up = tokio::spawn(async move {
            tokio::time::sleep(behind).await;
            drop(disk);
        });
        session.output(Stream::Stdout, &batch).await;
        catching_up.await.unwrap();
        let totals = recorder.totals();
        assert!(totals.waited >= behind / 2, "{totals:?}");
        assert!(totals.writes >= 1, "{totals:?}");
        assert!(totals.writing > Duration::ZERO, "{totals:?}");
        assert!(
            totals.writing < behind / 2,
            "the writes, not the wait for a slot: {totals:?}"
        );
        let (_, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert_eq!(error, None);
    }

    /// Megabytes of mixed output go to the store in slices, each encoded while
    /// the one before it is written: the transcript comes back exactly, in
    /// order, its seal matches the store, and nothing stays held in memory.
    #[tokio::test]
    async fn a_transcript_written_slice_by_slice_replays_exactly() {
        let (_dir, recorder, session) = recording();
        let id = session.id();
        let mut sent = Vec::new();
        for n in 0..400 {
            let data: Vec<u8> = if n % 3 == 0 {
                format!("line {n} of a listing\r\n")
                    .repeat(500)
                    .into_bytes()
            } else {
                (0..16 * 1024).map(|_| rand::random::<u8>()).collect()
            };
            sent.extend_from_slice(&data);
            session.output(Stream::Stdout, &Bytes::from(data)).await;
        }
        let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert_eq!(error, None);
        let stored = transcript_of(&recorder, id);
        assert!(stored == sent, "the transcript differs from the output");
        assert_eq!(record.transcript_bytes, sent.len() as u64);
        assert!(record.batches > 4, "{} batches", record.batches);
        assert_eq!(recorder.store.batch(id, record.batches).unwrap(), None);
        assert_eq!(record.digest.unwrap(), recorder.digest_of(id).unwrap());
        assert_eq!(recorder.queued_bytes(), 0);
    }

    /// The target shows `text` in `session`.
    async fn show(session: &SessionRecorder, text: &'static [u8]) {
        session
            .output(Stream::Stdout, &Bytes::from_static(text))
            .await;
    }

    /// A session feeds each watcher while it watches, forgets one that left, feeds
    /// a later one only what is new, and at the end every watcher sees the close.
    #[tokio::test]
    async fn watchers_are_fed_only_while_they_watch() {
        let (_dir, recorder, session) = recording();
        let id = session.id();
        let watched = || {
            !(recorder.live.lock().unwrap()[&id].inner.lock().unwrap())
                .watchers
                .is_empty()
        };
        show(&session, b"before anyone watched\r\n").await;
        assert!(!watched(), "nobody watches yet");
        let first = recorder.follow(id, "auditor").unwrap().expect("live");
        assert!(watched());
        drop(first);
        show(&session, b"after the first left\r\n").await;
        assert!(!watched(), "forgotten once the last watcher left");
        let mut second = recorder.follow(id, "auditor").unwrap().expect("live");
        show(&session, b"while the second watches\r\n").await;
        let Some(Watched::Chunk(chunk)) = second.live.recv().await else {
            panic!("a chunk")
        };
        assert_eq!(&chunk.data[..], b"while the second watches\r\n");
        let (_, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert_eq!(error, None);
        assert!(second.live.recv().await.is_none(), "closed");
        assert!(recorder.follow(id, "auditor").unwrap().is_none(), "ended");
    }

    /// A session whose task stops before the session ends (a panic in the relay
    /// drops its recorder) still ends: what it showed is written, the record
    /// is sealed `interrupted` with its event, which `audit verify` accepts, and
    /// it leaves the live sessions.
    #[tokio::test]
    async fn a_session_whose_task_stopped_is_sealed_as_interrupted() {
        let (_dir, recorder, session) = recording();
        let id = session.id();
        show(&session, b"shown before the task stopped\r\n").await;
        let task = tokio::spawn(async move {
            let _owned = session;
            panic!("a bug in the relay");
        });
        assert!(task.await.unwrap_err().is_panic());
        let sealed = async {
            loop {
                let record = recorder.session(id).unwrap().unwrap();
                if !record.is_live() {
                    return record;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let record = tokio::time::timeout(Duration::from_secs(5), sealed)
            .await
            .expect("sealed within 5 s, not left live");
        assert_eq!(record.state, SessionState::Interrupted);
        assert_eq!(record.digest, Some(recorder.digest_of(id).unwrap()));
        assert_eq!(
            transcript_of(&recorder, id),
            b"shown before the task stopped\r\n"
        );
        assert!(
            !recorder.live.lock().unwrap().contains_key(&id),
            "forgotten"
        );
        let events = recorder.store.audit_events().unwrap();
        let ends: Vec<_> = (events.iter())
            .filter(|e| e.kind == "session.interrupted")
            .collect();
        assert_eq!(ends.len(), 1, "one end event: {events:?}");
        assert!(ends[0].details["reason"]
            .as_str()
            .unwrap()
            .contains("task stopped"));
        let start = AuditEvent::new(AuditKind::SessionStart, &record.user, record.started_at)
            .target(&record.target)
            .grant(&record.grant)
            .detail("session", id)
            .detail("login", record.login.as_str())
            .detail("kind", record.kind.as_str())
            .detail("command", record.command.clone())
            .detail("client", record.client.as_str());
        // The recorder's own chain, behind the start the relay would have chained.
        let chain: Vec<AuditEvent> = std::iter::once(start).chain(events).collect();
        let records = [record];
        let checked = check::cross_check(&records, id, &BTreeSet::new(), &chain, &records);
        assert_eq!(checked.unwrap().unsealed, [id]);
    }

    /// A watcher whose client reads nothing never holds up the session, and holds
    /// at most its bound however much the session shows; it then learns how much
    /// it missed.
    #[tokio::test]
    async fn a_watcher_that_reads_nothing_holds_a_bounded_backlog() {
        let (_dir, recorder, session) = recording();
        let mut watcher = recorder
            .follow(session.id(), "auditor")
            .unwrap()
            .expect("live");
        let piece = Bytes::from(vec![b'x'; 32 * 1024]);
        for _ in 0..(4 * WATCH_BYTES / piece.len()) {
            session.output(Stream::Stdout, &piece).await;
        }
        assert!(
            watcher.live.queued() <= WATCH_BYTES,
            "{} queued",
            watcher.live.queued()
        );
        session.finish(SessionEnd::default(), |_, _| async {}).await;
        let (mut chunks, mut missed) = (0, 0);
        while let Some(watched) = watcher.live.recv().await {
            match watched {
                Watched::Chunk(_) => chunks += 1,
                Watched::Missed(n) => missed += n,
            }
        }
        assert_eq!(chunks + missed, 4 * WATCH_BYTES as u64 / piece.len() as u64);
        assert!(
            missed >= 3 * WATCH_BYTES as u64 / piece.len() as u64,
            "{missed} missed"
        );
    }

    #[tokio::test]
    async fn a_recording_is_flushed_within_the_interval_and_replayable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let recorder = Arc::new(Recorder::open(store.clone(), true, false).unwrap());
        let session = recorder
            .start(recorder.reserve(failed()).unwrap(), info())
            .unwrap();
        let id = session.id();
        session.input(&Bytes::from_static(b"ls\r")).await;
        session
            .output(Stream::Stdout, &Bytes::from_static(b"file\r\n"))
            .await;
        tokio::time::sleep(FLUSH_INTERVAL * 2).await;
        assert_eq!(
            recorder.chunks(id).unwrap().len(),
            2,
            "on disk before the end"
        );
        let (record, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
        assert_eq!(error, None);
        assert_eq!(record.state, SessionState::Closed);
        assert_eq!(record.digest_source, Some(DigestSource::Bastion));
        assert_eq!(record.digest.unwrap(), recorder.digest_of(id).unwrap());
    }

    #[tokio::test]
    async fn a_user_over_their_quota_is_ended_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let limits = RecordingLimits {
            user_quota: Some(100 * 1024),
            ..RecordingLimits::UNLIMITED
        };
        let recorder = Arc::new(
            Recorder::open(store, true, false)
                .unwrap()
                .with_limits(limits, dir.path().into()),
        );
        let first = recorder
            .start(recorder.reserve(failed()).unwrap(), info())
            .unwrap();
        let second = recorder
            .start(recorder.reserve(failed()).unwrap(), info())
            .unwrap();
        // Incompressible, so stored bytes grow with what is recorded.
        let mut x: u64 = 1;
        let noise: Bytes = (0..80 * 1024)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        first.output(Stream::Stdout, &noise).await;
        tokio::time::sleep(FLUSH_INTERVAL * 2).await;
        assert_eq!(recorder.room_for("alice"), Ok(()), "80 KiB of 100");
        second.output(Stream::Stdout, &noise).await;
        let reason = tokio::time::timeout(Duration::from_secs(3), second.failed())
            .await
            .expect("the session that crossed the quota is ended");
        assert!(reason.contains("user_quota = 100KiB"), "{reason}");
        let refusal = recorder.room_for("alice").unwrap_err();
        assert!(refusal.contains("user_quota"), "{refusal}");
        assert_eq!(recorder.room_for("bob"), Ok(()));
        for session in [first, second] {
            let (_, error) = session.finish(SessionEnd::default(), |_, _| async {}).await;
            assert_eq!(error, None, "everything recorded was stored");
        }
        assert_eq!(
            recorder.room_for("alice"),
            Ok(()),
            "ended sessions do not count"
        );
    }

    /// Reservations live in the store, so every node sees every node's ids in
    /// flight; the ids of a node that stopped before recording are given up with an
    /// event each, and nobody else's are.
    #[test]
    fn reservations_are_shared_and_a_stopped_nodes_orphans_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let node_a = Arc::new(
            Recorder::open(store.clone(), true, false)
                .unwrap()
                .with_node("a"),
        );
        let node_b = Recorder::open(store.clone(), true, false)
            .unwrap()
            .with_node("b");
        let in_flight = node_a.reserve(failed()).unwrap();
        assert_eq!(
            node_b
                .reservations()
                .unwrap()
                .1
                .into_iter()
                .collect::<Vec<_>>(),
            vec![1]
        );
        // Node a "crashes": its reservation is never dropped.
        std::mem::forget(in_flight);
        let mut announced = Vec::new();
        let mut announce = |id| {
            announced.push(id);
            Ok(())
        };
        assert!(node_b
            .release_orphans("b", &mut announce)
            .unwrap()
            .is_empty());
        assert_eq!(node_b.release_orphans("a", &mut announce).unwrap(), vec![1]);
        assert_eq!(announced, vec![1]);
        assert!(node_b.reservations().unwrap().1.is_empty());
    }

    #[tokio::test]
    async fn an_unused_reservation_is_audited_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let recorder = Arc::new(Recorder::open(store.clone(), true, false).unwrap());
        let given_up = recorder.reserve(failed()).unwrap();
        let used = recorder.reserve(failed()).unwrap();
        let (last, reserved) = recorder.reservations().unwrap();
        assert_eq!(
            (last, reserved.into_iter().collect::<Vec<_>>()),
            (2, vec![1, 2])
        );
        given_up.fail("target unreachable").await;
        let session = recorder.start(used, info()).unwrap();
        assert!(recorder.reservations().unwrap().1.is_empty());
        let events = crate::audit::AuditLog::open(&store)
            .unwrap()
            .events()
            .unwrap();
        assert_eq!(
            events.len(),
            1,
            "only the unused id is explained by an event"
        );
        assert_eq!(events[0].kind, "session.failed");
        assert_eq!(events[0].details["session"], 1);
        assert_eq!(events[0].details["reason"], "target unreachable");
        session.finish(SessionEnd::default(), |_, _| async {}).await;
    }
}
