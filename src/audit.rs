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

#[cfg(test)]
mod tests {
    use super::*;

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
