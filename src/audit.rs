//! The audit log: every decision and lifecycle event, appended to the `audit` tree as
//! a SHA-256 hash chain. Each event carries the digest of the previous event's
//! canonical form (its JSON serialisation), so editing, removing or reordering any
//! event breaks every link after it.
//!
//! Trees: `audit` (seq → event, JSON) and the index `audit_by_time`
//! (`at (ms) ‖ seq` → nothing), which `audit --since` reads instead of the whole
//! chain. The index is not part of the chain: `audit verify` never reads it, and
//! a reader checks every event it finds through it. Its entry is written before
//! the event, so it never misses one; an entry too many (an append that lost its
//! number to another appender and failed before it could take its entry back) is
//! skipped by that check. Databases from before the index get it built once, at
//! open (schema 1).

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::table::{millis, trailing_u64};
use crate::store::{self, Key, Store, StoreError, Table};

/// The tree of events, by sequence number (big-endian).
const TREE: &str = "audit";
/// The index of events by time: `at (ms) ‖ seq` → nothing.
const BY_TIME: &str = "audit_by_time";
/// The schema this module migrates databases to.
const SCHEMA: u64 = 1;

/// `prev` of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the chain, from 1.
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// What happened, e.g. `request.approved`, `session.denied`.
    pub kind: String,
    /// Who did it: a user name, or `portcullis` for the bastion itself.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// Everything else worth knowing (reason, command, approvers, …).
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
    /// SHA-256 (hex) of the previous event's canonical form.
    pub prev: String,
}

impl AuditEvent {
    pub fn new(kind: AuditKind, actor: &str, at: DateTime<Utc>) -> AuditEvent {
        AuditEvent {
            seq: 0,
            at,
            kind: kind.to_string(),
            actor: actor.to_string(),
            target: None,
            grant: None,
            details: serde_json::Map::new(),
            prev: String::new(),
        }
    }

    pub fn target(mut self, target: &str) -> AuditEvent {
        self.target = Some(target.to_string());
        self
    }

    pub fn grant(mut self, id: &str) -> AuditEvent {
        self.grant = Some(id.to_string());
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> AuditEvent {
        self.details.insert(key.to_string(), value.into());
        self
    }

    /// Sets `seq` and `prev` so this event follows `previous` in the chain.
    pub fn link_after(&mut self, previous: Option<&AuditEvent>) {
        match previous {
            Some(previous) => {
                self.seq = previous.seq + 1;
                self.prev = previous.digest();
            }
            None => {
                self.seq = 1;
                self.prev = GENESIS.to_string();
            }
        }
    }

    /// SHA-256 (hex) of the canonical form: the JSON serialisation, whose field order
    /// is fixed by this struct and whose `details` keys are sorted.
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("events always serialise");
        hex::encode(Sha256::digest(canonical))
    }
}

/// The chain as stored: appends link each event to the one before it, inside the
/// store's atomic ordered append, so concurrent appenders (tasks, or bastions on
/// one database) can never fork the chain.
#[derive(Clone)]
pub struct AuditLog {
    events: Table<u64, AuditEvent>,
}

impl AuditLog {
    /// The log on `store`, building the time index an older database lacks.
    pub fn open(store: &Arc<Store>) -> Result<AuditLog, StoreError> {
        let log = AuditLog {
            events: Table::new(store, TREE),
        };
        if store::schema_version(store, "audit")? < SCHEMA {
            for entry in log.events.iter() {
                let (_, event) = entry?;
                store.backend().put(BY_TIME, &time_key(&event), b"")?;
            }
            store::set_schema_version(store, "audit", SCHEMA)?;
        }
        Ok(log)
    }

    /// Appends an event to the chain, linking it to the previous one, and returns
    /// it as stored, on disk: callers act only once their event is durable, so an
    /// action can never outlive a lost event (a full disk fails the append, and
    /// with it the action). The flush syncs to disk: call it off the runtime's
    /// worker threads where a caller can wait (`spawn_blocking`).
    pub fn append(&self, mut event: AuditEvent) -> Result<AuditEvent, StoreError> {
        let store = self.events.store();
        // The number this append tried last and its index entry: taken back when
        // another appender got that number first (unless the winner's entry is the
        // same key: both events fell in one millisecond).
        let mut indexed: Option<(u64, Vec<u8>)> = None;
        let (_, stored) = store.append(TREE, |seq, previous| {
            let previous: Option<AuditEvent> =
                previous.map(|bytes| self.events.parse(bytes)).transpose()?;
            event.link_after(previous.as_ref());
            if event.seq != seq {
                return Err(StoreError::Corrupt {
                    tree: TREE,
                    detail: format!("event {} is stored under key {}", event.seq - 1, seq - 1),
                });
            }
            if let Some((lost, key)) = indexed.take() {
                let winner = self.events.get(&lost)?.map(|e| time_key(&e));
                if winner.as_ref() != Some(&key) {
                    store.backend().remove(BY_TIME, &key)?;
                }
            }
            let key = time_key(&event);
            store.backend().put(BY_TIME, &key, b"")?;
            indexed = Some((seq, key));
            Ok(crate::store::table::to_json(&event))
        })?;
        store.flush()?;
        self.events.parse(&stored)
    }

    /// Audit events in chain order.
    pub fn events(&self) -> Result<Vec<AuditEvent>, StoreError> {
        self.events
            .iter()
            .map(|e| e.map(|(_, event)| event))
            .collect()
    }

    /// The events at or after `at`, in chain order, read through the time index
    /// (events are appended in about time order, but not exactly: the index finds
    /// a late one wherever it sits in the chain).
    pub fn since(&self, at: DateTime<Utc>) -> Result<Vec<AuditEvent>, StoreError> {
        let seam = self.events.store().backend();
        let mut seqs = BTreeSet::new();
        for entry in seam.scan(BY_TIME, b"", Some(&millis(at).encode())) {
            let (key, _) = entry?;
            match trailing_u64(&key).filter(|_| key.len() == 16) {
                Some(seq) => seqs.insert(seq),
                None => {
                    return Err(StoreError::Corrupt {
                        tree: BY_TIME,
                        detail: format!("a key of {} bytes", key.len()),
                    })
                }
            };
        }
        let mut events = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match self.events.get(&seq)? {
                Some(event) if event.at >= at => events.push(event),
                _ => {}
            }
        }
        Ok(events)
    }

    /// The last audit event, the head of the chain.
    pub fn head(&self) -> Result<Option<AuditEvent>, StoreError> {
        Ok(self.events.last()?.map(|(_, event)| event))
    }
}

/// An event's key in the time index.
fn time_key(event: &AuditEvent) -> Vec<u8> {
    let mut key = millis(event.at).encode();
    key.extend_from_slice(&event.seq.encode());
    key
}

/// A verified chain: how long it is and where its head is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub events: u64,
    pub head_seq: u64,
    pub head_digest: String,
}

/// The first place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at event {seq}: {problem}")]
pub struct ChainBreak {
    pub seq: u64,
    pub problem: String,
}

/// Recomputes the chain over `events` (in stored order) and reports the first break:
/// a missing event (a gap in the sequence), an event out of order, or an event whose
/// content no longer matches the digest its successor recorded.
pub fn verify_chain(events: &[AuditEvent]) -> Result<ChainSummary, ChainBreak> {
    let mut previous: Option<&AuditEvent> = None;
    for (position, event) in events.iter().enumerate() {
        let expected = previous.map_or(1, |p| p.seq + 1);
        let later = || events[position..].iter().any(|e| e.seq == expected);
        if event.seq > expected && !later() {
            return Err(ChainBreak {
                seq: expected,
                problem: format!(
                    "event {expected} is missing (the next stored event is {})",
                    event.seq
                ),
            });
        }
        if event.seq != expected {
            return Err(ChainBreak {
                seq: expected,
                problem: format!(
                    "found event {} where event {expected} belongs (reordered)",
                    event.seq
                ),
            });
        }
        let link = previous.map_or_else(|| GENESIS.to_string(), AuditEvent::digest);
        if event.prev != link {
            let altered = expected.saturating_sub(1).max(1);
            return Err(ChainBreak {
                seq: altered,
                problem: format!(
                    "event {altered} was altered: event {expected} recorded a different digest for it"
                ),
            });
        }
        previous = Some(event);
    }
    Ok(ChainSummary {
        events: events.len() as u64,
        head_seq: previous.map_or(0, |p| p.seq),
        head_digest: previous.map_or_else(|| GENESIS.to_string(), AuditEvent::digest),
    })
}

/// A chain head an operator kept from the bastion's logs (`audit chain head seq=…
/// digest=…`, logged every minute) or from an earlier `audit verify`: event `seq`
/// must still exist and still have this digest. The chain links each event to the
/// one before it, so an anchor vouches for every event up to `seq`; events after
/// it are covered only by a later anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    /// SHA-256 (lowercase hex) of event `seq`'s canonical form, as
    /// [`AuditEvent::digest`] and the logged head print it.
    pub digest: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:DIGEST`, e.g. `1234:9f86d081884c7d65…` (64 hex digits).
    fn from_str(text: &str) -> Result<Anchor, String> {
        const FORM: &str = "expected SEQ:DIGEST, the seq and digest of a logged \
            `audit chain head seq=… digest=…` line (digest: 64 hex digits)";
        let (seq, digest) = text
            .split_once(':')
            .ok_or_else(|| format!("no ':' in it; {FORM}"))?;
        let seq: u64 = seq
            .trim()
            .parse()
            .map_err(|_| format!("'{seq}' is not a sequence number; {FORM}"))?;
        if seq == 0 {
            return Err(format!("sequence numbers start at 1; {FORM}"));
        }
        let digest = digest.trim().to_ascii_lowercase();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("the digest is not 64 hex digits; {FORM}"));
        }
        Ok(Anchor { seq, digest })
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.digest)
    }
}

impl Anchor {
    /// Checks a verified chain (`events`, in order from seq 1) against this anchor.
    /// A chain that no longer reaches `seq` lost its tail; a different event at `seq`
    /// means the chain was rewritten at or before it and re-linked, which the links
    /// alone cannot show.
    pub fn check(&self, events: &[AuditEvent]) -> Result<(), String> {
        let head = events.last().map_or(0, |e| e.seq);
        let Some(event) = events.iter().find(|e| e.seq == self.seq) else {
            return Err(format!(
                "audit chain truncated: anchor {self} names event {}, but the chain ends at event {head}",
                self.seq
            ));
        };
        if event.digest() != self.digest {
            return Err(format!(
                "audit chain rewritten: event {} no longer matches anchor {self} (its digest is now {}); events up to {} were changed and the chain re-linked",
                self.seq,
                event.digest(),
                self.seq
            ));
        }
        Ok(())
    }
}

/// What a user is told when the audit event of what they asked for cannot be
/// written: nothing is done unaudited.
pub fn refused_unaudited(err: &crate::store::StoreError) -> String {
    format!(
        "refused: the audit log cannot be written ({err}), and nothing happens here \
         without its audit event; tell an operator (the bastion's disk may be full, or its database unreachable)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tasks appending 1000 events each leave one unbroken chain of 2000.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&Arc::new(Store::sled(dir.path()).unwrap())).unwrap();
        let tasks: Vec<_> = ["alice", "bob"]
            .into_iter()
            .map(|actor| {
                let log = log.clone();
                tokio::task::spawn_blocking(move || {
                    for i in 0..1000u64 {
                        log.append(
                            AuditEvent::new(AuditKind::SessionStart, actor, Utc::now())
                                .detail("i", i),
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let events = log.events().unwrap();
        let summary = verify_chain(&events).unwrap();
        assert_eq!((summary.events, summary.head_seq), (2000, 2000));
        assert_eq!(log.head().unwrap().unwrap().digest(), summary.head_digest);
        // Appends that lost their number took their index entry back.
        let store = log.events.store();
        assert_eq!(store.backend().scan(BY_TIME, b"", None).count(), 2000);
        assert_eq!(log.since(DateTime::UNIX_EPOCH).unwrap(), events);
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap() + chrono::Duration::milliseconds(ms)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Events appended with times out of order (as concurrent appenders leave
        /// them): `since` finds through the index what a full scan filtered in
        /// Rust would, in chain order.
        #[test]
        fn since_agrees_with_a_full_scan(times in proptest::collection::vec(0..3000i64, 0..30)) {
            let dir = tempfile::tempdir().unwrap();
            let log = AuditLog::open(&Arc::new(Store::sled(dir.path()).unwrap())).unwrap();
            for ms in times {
                log.append(AuditEvent::new(AuditKind::SessionStart, "alice", at(ms))).unwrap();
            }
            let events = log.events().unwrap();
            for ms in [-1, 0, 1, 1499, 1500, 2999, 3000] {
                let scanned: Vec<_> = events.iter().filter(|e| e.at >= at(ms)).cloned().collect();
                proptest::prop_assert_eq!(log.since(at(ms)).unwrap(), scanned);
            }
        }
    }

    /// A chain from before the time index gets it at open, once.
    #[test]
    fn the_time_index_is_built_for_an_old_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let mut old: Vec<AuditEvent> = Vec::new();
        for ms in [30, 10, 20] {
            let mut event = AuditEvent::new(AuditKind::SessionStart, "alice", at(ms));
            event.link_after(old.last());
            let json = serde_json::to_vec(&event).unwrap();
            store
                .backend()
                .put(TREE, &event.seq.encode(), &json)
                .unwrap();
            old.push(event);
        }
        assert_eq!(store::schema_version(&store, "audit").unwrap(), 0);
        let log = AuditLog::open(&store).unwrap();
        assert_eq!(store::schema_version(&store, "audit").unwrap(), SCHEMA);
        let seqs = |from: i64| -> Vec<u64> {
            log.since(at(from)).unwrap().iter().map(|e| e.seq).collect()
        };
        assert_eq!(seqs(15), [1, 3]);
        log.append(AuditEvent::new(AuditKind::SessionEnd, "alice", at(40)))
            .unwrap();
        assert_eq!(seqs(25), [1, 4]);
        verify_chain(&log.events().unwrap()).unwrap();
    }

    fn chain(n: u64) -> Vec<AuditEvent> {
        let mut events: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let mut event =
                AuditEvent::new(AuditKind::SessionStart, "alice", Utc::now()).detail("i", i);
            event.link_after(events.last());
            events.push(event);
        }
        events
    }

    #[test]
    fn verify_finds_the_first_break() {
        let events = chain(5);
        assert_eq!(verify_chain(&events).unwrap().head_seq, 5);
        assert_eq!(verify_chain(&[]).unwrap().events, 0);

        let mut edited = events.clone();
        edited[2].actor = "mallory".into();
        let err = verify_chain(&edited).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.problem.contains("altered"));

        let mut removed = events.clone();
        removed.remove(1);
        assert_eq!(verify_chain(&removed).unwrap_err().seq, 2);

        let mut swapped = events.clone();
        swapped.swap(2, 3);
        let err = verify_chain(&swapped).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.problem.contains("reordered"));
    }

    #[test]
    fn events_chain_by_digest() {
        let now = Utc::now();
        let mut first = AuditEvent::new(AuditKind::RequestCreated, "alice", now).grant("7f3a9c");
        first.link_after(None);
        let mut second =
            AuditEvent::new(AuditKind::RequestApproved, "bob", now).detail("comment", "ok");
        second.link_after(Some(&first));
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(first.prev, GENESIS);
        assert_eq!(second.prev, first.digest());
        let mut edited = first.clone();
        edited.actor = "mallory".into();
        assert_ne!(edited.digest(), second.prev);
    }
    #[test]
    fn anchors_parse_with_clear_errors() {
        let digest = "ab".repeat(32);
        let anchor: Anchor = format!("12:{}", digest.to_uppercase()).parse().unwrap();
        assert_eq!(
            anchor,
            Anchor {
                seq: 12,
                digest: digest.clone()
            }
        );
        assert_eq!(anchor.to_string(), format!("12:{digest}"));
        for (bad, says) in [
            ("12", "no ':'"),
            (&format!("x:{digest}")[..], "not a sequence number"),
            (&format!("0:{digest}")[..], "start at 1"),
            ("3:abc", "64 hex digits"),
            (&format!("3:{}", "zz".repeat(32))[..], "64 hex digits"),
        ] {
            let err = bad.parse::<Anchor>().unwrap_err();
            assert!(
                err.contains(says) && err.contains("SEQ:DIGEST"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn anchors_catch_truncation_and_rechaining() {
        let events = chain(5);
        let anchor = Anchor {
            seq: 4,
            digest: events[3].digest(),
        };
        anchor.check(&events).unwrap();
        let err = anchor.check(&events[..3]).unwrap_err();
        assert!(
            err.contains("truncated") && err.contains("ends at event 3"),
            "{err}"
        );

        let mut rechained = events.clone();
        rechained[1].actor = "mallory".into();
        for i in 2..rechained.len() {
            let (before, after) = rechained.split_at_mut(i);
            after[0].link_after(before.last());
        }
        verify_chain(&rechained).expect("a re-linked chain verifies on its own");
        let err = anchor.check(&rechained).unwrap_err();
        assert!(
            err.contains("rewritten") && err.contains("event 4"),
            "{err}"
        );
        // An anchor before the change cannot see it.
        Anchor {
            seq: 1,
            digest: events[0].digest(),
        }
        .check(&rechained)
        .unwrap();
    }
}

/// Every kind of audit event, in one place. The strings are the stored form:
/// `as_str`, `Display` and serde all give exactly these, so events already in a
/// chain read, list and verify byte for byte as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuditKind {
    #[serde(rename = "auditor.audit")]
    AuditorAudit,
    #[serde(rename = "auditor.export")]
    AuditorExport,
    #[serde(rename = "auditor.replay")]
    AuditorReplay,
    #[serde(rename = "auditor.sessions")]
    AuditorSessions,
    #[serde(rename = "auditor.verify")]
    AuditorVerify,
    #[serde(rename = "auditor.watch")]
    AuditorWatch,
    #[serde(rename = "auth.failure")]
    AuthFailure,
    #[serde(rename = "auth.publickey")]
    AuthPublickey,
    #[serde(rename = "auth.success")]
    AuthSuccess,
    #[serde(rename = "auth.withdrawn")]
    AuthWithdrawn,
    #[serde(rename = "bastion.shutdown")]
    BastionShutdown,
    #[serde(rename = "connection.limited")]
    ConnectionLimited,
    #[serde(rename = "node.lost")]
    NodeLost,
    #[serde(rename = "policy.reload_failed")]
    PolicyReloadFailed,
    #[serde(rename = "policy.reloaded")]
    PolicyReloaded,
    #[serde(rename = "preauth.lockout")]
    PreauthLockout,
    #[serde(rename = "recordings.pruned")]
    RecordingsPruned,
    #[serde(rename = "request.approval")]
    RequestApproval,
    #[serde(rename = "request.approved")]
    RequestApproved,
    #[serde(rename = "request.cancelled")]
    RequestCancelled,
    #[serde(rename = "request.created")]
    RequestCreated,
    #[serde(rename = "request.denied")]
    RequestDenied,
    #[serde(rename = "request.expired")]
    RequestExpired,
    #[serde(rename = "request.limited")]
    RequestLimited,
    #[serde(rename = "request.revoked")]
    RequestRevoked,
    #[serde(rename = "session.denied")]
    SessionDenied,
    #[serde(rename = "session.disk_full")]
    SessionDiskFull,
    #[serde(rename = "session.end")]
    SessionEnd,
    #[serde(rename = "session.failed")]
    SessionFailed,
    #[serde(rename = "session.interrupted")]
    SessionInterrupted,
    #[serde(rename = "session.refused")]
    SessionRefused,
    #[serde(rename = "session.start")]
    SessionStart,
    #[serde(rename = "stepup.failure")]
    StepupFailure,
    #[serde(rename = "stepup.locked")]
    StepupLocked,
    #[serde(rename = "stepup.success")]
    StepupSuccess,
    #[serde(rename = "totp.enrolled")]
    TotpEnrolled,
    #[serde(rename = "totp.invite_refused")]
    TotpInviteRefused,
    #[serde(rename = "user.removed")]
    UserRemoved,
}

impl AuditKind {
    /// Every kind, for checks that must cover them all.
    pub const ALL: [AuditKind; 38] = [
        AuditKind::AuditorAudit,
        AuditKind::AuditorExport,
        AuditKind::AuditorReplay,
        AuditKind::AuditorSessions,
        AuditKind::AuditorVerify,
        AuditKind::AuditorWatch,
        AuditKind::AuthFailure,
        AuditKind::AuthPublickey,
        AuditKind::AuthSuccess,
        AuditKind::AuthWithdrawn,
        AuditKind::BastionShutdown,
        AuditKind::ConnectionLimited,
        AuditKind::NodeLost,
        AuditKind::PolicyReloadFailed,
        AuditKind::PolicyReloaded,
        AuditKind::PreauthLockout,
        AuditKind::RecordingsPruned,
        AuditKind::RequestApproval,
        AuditKind::RequestApproved,
        AuditKind::RequestCancelled,
        AuditKind::RequestCreated,
        AuditKind::RequestDenied,
        AuditKind::RequestExpired,
        AuditKind::RequestLimited,
        AuditKind::RequestRevoked,
        AuditKind::SessionDenied,
        AuditKind::SessionDiskFull,
        AuditKind::SessionEnd,
        AuditKind::SessionFailed,
        AuditKind::SessionInterrupted,
        AuditKind::SessionRefused,
        AuditKind::SessionStart,
        AuditKind::StepupFailure,
        AuditKind::StepupLocked,
        AuditKind::StepupSuccess,
        AuditKind::TotpEnrolled,
        AuditKind::TotpInviteRefused,
        AuditKind::UserRemoved,
    ];

    /// The stored name, e.g. `request.approved`.
    pub fn as_str(self) -> &'static str {
        use AuditKind::*;
        match self {
            AuditorAudit => "auditor.audit",
            AuditorExport => "auditor.export",
            AuditorReplay => "auditor.replay",
            AuditorSessions => "auditor.sessions",
            AuditorVerify => "auditor.verify",
            AuditorWatch => "auditor.watch",
            AuthFailure => "auth.failure",
            AuthPublickey => "auth.publickey",
            AuthSuccess => "auth.success",
            AuthWithdrawn => "auth.withdrawn",
            BastionShutdown => "bastion.shutdown",
            ConnectionLimited => "connection.limited",
            NodeLost => "node.lost",
            PolicyReloadFailed => "policy.reload_failed",
            PolicyReloaded => "policy.reloaded",
            PreauthLockout => "preauth.lockout",
            RecordingsPruned => "recordings.pruned",
            RequestApproval => "request.approval",
            RequestApproved => "request.approved",
            RequestCancelled => "request.cancelled",
            RequestCreated => "request.created",
            RequestDenied => "request.denied",
            RequestExpired => "request.expired",
            RequestLimited => "request.limited",
            RequestRevoked => "request.revoked",
            SessionDenied => "session.denied",
            SessionDiskFull => "session.disk_full",
            SessionEnd => "session.end",
            SessionFailed => "session.failed",
            SessionInterrupted => "session.interrupted",
            SessionRefused => "session.refused",
            SessionStart => "session.start",
            StepupFailure => "stepup.failure",
            StepupLocked => "stepup.locked",
            StepupSuccess => "stepup.success",
            TotpEnrolled => "totp.enrolled",
            TotpInviteRefused => "totp.invite_refused",
            UserRemoved => "user.removed",
        }
    }
}

impl std::fmt::Display for AuditKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod kind_tests {
    use super::AuditKind;

    #[test]
    fn every_kind_is_stored_as_its_name() {
        for kind in AuditKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<AuditKind>(&json).unwrap(), kind);
            assert_eq!(kind.to_string(), kind.as_str());
        }
    }
}
