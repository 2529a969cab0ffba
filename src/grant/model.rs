//! The grant record as stored in sled and shown by the control plane.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Scope;

/// Where a grant is in its life. `Pending → Approved → Expired | Revoked`, or
/// `Pending → Denied | Expired | Cancelled`. Every state but `Pending` and `Approved`
/// is final: nothing ever brings a grant back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantState {
    Pending,
    Approved,
    Denied,
    Expired,
    Revoked,
    Cancelled,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Pending => "pending",
            GrantState::Approved => "approved",
            GrantState::Denied => "denied",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
            GrantState::Cancelled => "cancelled",
        }
    }

    /// Pending or approved: the grant may still change.
    pub fn is_live(self) -> bool {
        matches!(self, GrantState::Pending | GrantState::Approved)
    }
}

impl std::fmt::Display for GrantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One approver's yes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: DateTime<Utc>,
    pub comment: Option<String>,
}

/// Who ended a grant (denied, revoked, cancelled) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ending {
    /// A user, or `portcullis` for expiry.
    pub by: String,
    pub at: DateTime<Utc>,
    pub reason: Option<String>,
}

impl Ending {
    /// `: REASON`, or nothing when none was given; unescaped (callers escape for
    /// where it is shown).
    pub fn because(&self) -> String {
        self.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    }
}

/// A request for access and, once approved, the grant itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Short, typeable id (`7f3a9c`).
    pub id: String,
    /// Store order; ids are random, this is not.
    pub seq: u64,
    pub requester: String,
    pub target: String,
    pub login: String,
    pub scope: Scope,
    /// Lifetime once approved, in seconds.
    pub ttl_secs: u64,
    pub reason: String,
    /// The flow that matched the target when the request was filed.
    pub flow: String,
    /// Approvals needed (copied from the flow at request time).
    pub approvals_needed: u32,
    pub state: GrantState,
    pub created_at: DateTime<Utc>,
    /// When an undecided request expires.
    pub pending_until: DateTime<Utc>,
    pub approvals: Vec<Approval>,
    pub approved_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub ended: Option<Ending>,
    /// Granted on the spot by an `auto_approve` flow.
    pub auto: bool,
}

impl Grant {
    /// Who approved it so far, `a, b`.
    pub fn approver_names(&self) -> String {
        let names: Vec<&str> = self.approvals.iter().map(|a| a.by.as_str()).collect();
        names.join(", ")
    }

    /// Approved and not past its expiry at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.state == GrantState::Approved && self.expires_at.is_some_and(|at| now < at)
    }

    /// The moment this grant's current state runs out, if it does.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        match self.state {
            GrantState::Pending => Some(self.pending_until),
            GrantState::Approved => self.expires_at,
            _ => None,
        }
    }

    /// One line for a terminal while waiting: `request 7f3a9c waiting for group:sre
    /// (0/1 approvals) · 1:05`.
    pub fn waiting_status(&self, approvers: &str, waited: std::time::Duration) -> String {
        let secs = waited.as_secs();
        format!(
            "request {} waiting for {approvers} ({}/{} approvals) · {}:{:02}",
            self.id,
            self.approvals.len(),
            self.approvals_needed,
            secs / 60,
            secs % 60
        )
    }

    /// `LOGIN@TARGET`.
    pub fn destination(&self) -> String {
        format!("{}@{}", self.login, self.target)
    }
}
