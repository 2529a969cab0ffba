//! The audit log: every decision and lifecycle event, appended to the `audit` tree as
//! a SHA-256 hash chain. Each event carries the digest of the previous event's
//! canonical form (its JSON serialisation), so editing, removing or reordering any
//! event breaks every link after it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    pub fn new(kind: &str, actor: &str, at: DateTime<Utc>) -> AuditEvent {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEvent> {
        let mut events: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let mut event = AuditEvent::new("test", "alice", Utc::now()).detail("i", i);
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
        let mut first = AuditEvent::new("request.created", "alice", now).grant("7f3a9c");
        first.link_after(None);
        let mut second = AuditEvent::new("request.approved", "bob", now).detail("comment", "ok");
        second.link_after(Some(&first));
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(first.prev, GENESIS);
        assert_eq!(second.prev, first.digest());
        let mut edited = first.clone();
        edited.actor = "mallory".into();
        assert_ne!(edited.digest(), second.prev);
    }
}
