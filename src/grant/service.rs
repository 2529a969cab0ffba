//! The grant service: applies the lifecycle rules under one lock, persists every change,
//! writes the audit event, notifies the webhook, and wakes everyone waiting on a grant
//! (`request --wait`, a session waiting for approval, a live session that must end when
//! its grant does).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngExt;
use thiserror::Error;
use tokio::sync::watch;

use super::lifecycle::{self, RequestSpec, RuleError, SYSTEM_ACTOR};
use super::{Grant, GrantState};
use crate::audit::{AuditEvent, AuditKind};
use crate::grant::notify::Notifier;
use crate::policy::Policy;
use crate::store::{Store, StoreError};

/// Length of a grant id: six hex digits are short enough to type and, with a
/// collision check, plenty for the requests one bastion sees.
const ID_LEN: usize = 6;

#[derive(Debug, Error)]
pub enum GrantError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("no request '{0}'; run `requests --all` to see the ones you can access")]
    NotFound(String),
    #[error(
        "'{0}' is not a request id: ids are 6 hex digits like 7f3a9c; run `requests` to list them"
    )]
    BadId(String),
    #[error("the bastion cannot store this right now ({0}); nothing was changed, try again or tell an operator")]
    Store(#[from] StoreError),
    #[error("{}", crate::audit::refused_unaudited(.0))]
    Unaudited(StoreError),
}

/// Per-user limits on requests that wait for an approver (`[limits]` in the config),
/// so one user cannot flood the approvers and the webhook. Auto-approved requests are
/// not limited: nobody has to decide them, and a session may need one to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Requests of one user waiting for a decision at once.
    pub pending_per_user: usize,
    /// Requests one user may file within `window`.
    pub per_window: usize,
    pub window: Duration,
}

impl Default for RequestLimits {
    fn default() -> RequestLimits {
        RequestLimits {
            pending_per_user: 10,
            per_window: 20,
            window: Duration::from_secs(600),
        }
    }
}

/// Which request limit refused a request, for the user and the audit log.
struct LimitRefusal {
    /// The `[limits]` key.
    key: &'static str,
    max: usize,
    message: String,
}

/// Requests and grants, backed by the store.
pub struct Grants {
    store: Arc<Store>,
    /// Held for each read-modify-write, so two approvers cannot both count as the
    /// last approval, and an expiry cannot race a revocation.
    write: Mutex<()>,
    /// Bumped after every change; receivers re-read the grants they care about.
    changes: watch::Sender<u64>,
    notifier: Notifier,
    /// Pending and approved grants by id, kept in step with the store by `commit`.
    /// The sweep (every second) and the check at every session start read these
    /// instead of parsing every request ever filed, which only grows.
    live: Mutex<HashMap<String, Grant>>,
    limits: RequestLimits,
    /// When each user filed their recent requests that needed a decision (a sliding
    /// window of at most `limits.per_window` entries per user).
    filed: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
}

impl Grants {
    pub fn new(store: Arc<Store>, notifier: Notifier) -> Result<Grants, StoreError> {
        let live = store
            .grants()?
            .into_iter()
            .filter(|g| g.state.is_live())
            .map(|g| (g.id.clone(), g))
            .collect();
        Ok(Grants {
            store,
            write: Mutex::new(()),
            changes: watch::channel(0).0,
            notifier,
            live: Mutex::new(live),
            limits: RequestLimits::default(),
            filed: Mutex::new(HashMap::new()),
        })
    }

    /// The same service with these per-user request limits.
    pub fn with_limits(mut self, limits: RequestLimits) -> Grants {
        self.limits = limits;
        self
    }

    /// Files a request (approved at once by an `auto_approve` flow).
    pub fn file(
        &self,
        policy: &Policy,
        requester: &str,
        spec: RequestSpec,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantError> {
        let _guard = self.write.lock().expect("grant lock poisoned");
        let id = self.fresh_id()?;
        let seq = self.store.next_seq()?;
        let grant = lifecycle::file_request(policy, requester, spec, id, seq, now)?;
        if grant.state == GrantState::Pending {
            if let Err(refusal) = self.within_limits(&grant, now) {
                // Refused either way; a failed append is logged.
                let _ = self.audit(
                    AuditEvent::new(AuditKind::RequestLimited, requester, now)
                        .target(&grant.target)
                        .detail("limit", refusal.key)
                        .detail("max", refusal.max as u64),
                );
                return Err(RuleError(refusal.message).into());
            }
        }
        self.commit(&grant, AuditKind::RequestCreated, requester, now)?;
        if grant.state == GrantState::Approved {
            self.commit(&grant, AuditKind::RequestApproved, SYSTEM_ACTOR, now)?;
        }
        Ok(grant)
    }

    pub fn approve(
        &self,
        policy: &Policy,
        id: &str,
        approver: &str,
        comment: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantError> {
        self.change(id, now, |grant| {
            lifecycle::approve(grant, policy, approver, comment, now)?;
            Ok((
                if grant.state == GrantState::Approved {
                    AuditKind::RequestApproved
                } else {
                    AuditKind::RequestApproval
                },
                approver,
            ))
        })
    }

    pub fn deny(
        &self,
        policy: &Policy,
        id: &str,
        approver: &str,
        reason: String,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantError> {
        self.change(id, now, |grant| {
            lifecycle::deny(grant, policy, approver, reason, now)?;
            Ok((AuditKind::RequestDenied, approver))
        })
    }

    pub fn revoke(
        &self,
        policy: &Policy,
        id: &str,
        user: &str,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantError> {
        self.change(id, now, |grant| {
            lifecycle::revoke(grant, policy, user, reason, now)?;
            Ok((
                if grant.state == GrantState::Cancelled {
                    AuditKind::RequestCancelled
                } else {
                    AuditKind::RequestRevoked
                },
                user,
            ))
        })
    }

    /// Everyone with a pending request or a live grant.
    pub fn requesters(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .live
            .lock()
            .expect("live grants lock poisoned")
            .values()
            .map(|g| g.requester.clone())
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Withdraws every live grant and pending request of `user` (who left the
    /// policy); returns their ids. Their live sessions end as for a revocation.
    pub fn withdraw_all_of(&self, user: &str, reason: &str, now: DateTime<Utc>) -> Vec<String> {
        let live: Vec<String> = self
            .live_where(|g| g.requester == user)
            .into_iter()
            .map(|g| g.id)
            .collect();
        live.into_iter()
            .filter(|id| {
                self.change(id, now, |grant| {
                    lifecycle::withdraw(grant, reason, now)?;
                    Ok((
                        if grant.state == GrantState::Cancelled {
                            AuditKind::RequestCancelled
                        } else {
                            AuditKind::RequestRevoked
                        },
                        lifecycle::SYSTEM_ACTOR,
                    ))
                })
                .is_ok()
            })
            .collect()
    }

    /// Checks the requester's pending cap and request rate for a request that waits
    /// for a decision, and counts it.
    fn within_limits(&self, grant: &Grant, now: DateTime<Utc>) -> Result<(), LimitRefusal> {
        let limits = self.limits;
        let user = grant.requester.as_str();
        let pending = self
            .live
            .lock()
            .expect("live grants lock poisoned")
            .values()
            .filter(|g| g.requester == user && g.state == GrantState::Pending)
            .count();
        if pending >= limits.pending_per_user {
            return Err(LimitRefusal {
                key: "pending_requests_per_user",
                max: limits.pending_per_user,
                message: format!(
                    "you already have {pending} pending requests, the most allowed ([limits] pending_requests_per_user = {}); wait for a decision, or withdraw one with `revoke ID` (see `requests --pending --mine`)",
                    limits.pending_per_user
                ),
            });
        }
        let mut filed = self.filed.lock().expect("request rate lock poisoned");
        let recent = filed.entry(user.to_string()).or_default();
        let window = chrono::Duration::from_std(limits.window).unwrap_or(chrono::Duration::MAX);
        while recent.front().is_some_and(|at| *at + window <= now) {
            recent.pop_front();
        }
        if recent.len() >= limits.per_window {
            let wait = recent
                .front()
                .map(|at| (*at + window - now).num_seconds().max(1) as u64)
                .unwrap_or(1);
            return Err(LimitRefusal {
                key: "requests_per_user",
                max: limits.per_window,
                message: format!(
                    "you filed {} requests within {}, the most allowed ([limits] requests_per_user = {}, request_window = \"{}\"); try again in {}",
                    recent.len(),
                    crate::duration::format(limits.window),
                    limits.per_window,
                    crate::duration::format(limits.window),
                    crate::duration::format(Duration::from_secs(wait))
                ),
            });
        }
        recent.push_back(now);
        Ok(())
    }

    /// Expires every pending request and grant whose time is up. Runs every second.
    pub fn sweep(&self, now: DateTime<Utc>) -> Result<usize, GrantError> {
        let due: Vec<String> = self
            .live_where(|g| g.deadline().is_some_and(|at| at <= now))
            .into_iter()
            .map(|g| g.id)
            .collect();
        let mut expired = 0;
        for id in due {
            let result = self.change(&id, now, |grant| {
                if lifecycle::expire_if_due(grant, now) {
                    Ok((AuditKind::RequestExpired, SYSTEM_ACTOR))
                } else {
                    Err(RuleError("no longer due".into()))
                }
            });
            if result.is_ok() {
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// One grant by id (ids are checked for shape first, so junk never reaches sled).
    pub fn get(&self, id: &str) -> Result<Grant, GrantError> {
        check_id(id)?;
        self.store
            .grant(id)?
            .ok_or_else(|| GrantError::NotFound(id.to_string()))
    }

    /// Every grant ever filed, oldest first.
    pub fn all(&self) -> Result<Vec<Grant>, GrantError> {
        Ok(self.store.grants()?)
    }

    /// The user's grants for `target` that are active at `now`.
    pub fn active_for(
        &self,
        user: &str,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Grant>, GrantError> {
        Ok(self.live_where(|g| g.requester == user && g.target == target && g.is_active(now)))
    }

    /// How many requests wait for a decision.
    pub fn pending_count(&self) -> usize {
        self.live
            .lock()
            .expect("live grants lock poisoned")
            .values()
            .filter(|g| g.state == GrantState::Pending)
            .count()
    }

    /// The pending and approved grants (approved ones may be past their expiry until
    /// the next sweep) that `keep` selects, oldest first.
    fn live_where(&self, keep: impl Fn(&Grant) -> bool) -> Vec<Grant> {
        let mut live: Vec<Grant> = self
            .live
            .lock()
            .expect("live grants lock poisoned")
            .values()
            .filter(|g| keep(g))
            .cloned()
            .collect();
        live.sort_by_key(|g| g.seq);
        live
    }

    /// A receiver that wakes after every change to any grant.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until `id` is no longer pending and returns it. Wakes on the change itself,
    /// not on a polling interval.
    pub async fn wait_decided(&self, id: &str) -> Result<Grant, GrantError> {
        let mut changes = self.subscribe();
        loop {
            let grant = self.get(id)?;
            if grant.state != GrantState::Pending {
                return Ok(grant);
            }
            if changes.changed().await.is_err() {
                return Ok(grant); // the service is going away
            }
        }
    }

    /// Appends an audit event, durably. A failure is logged and returned: the
    /// caller must not go on with what the event records.
    pub fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        if let Err(err) = self.store.append_audit(event) {
            tracing::error!(error = %err, "cannot append to the audit log");
            return Err(err);
        }
        Ok(())
    }

    /// Reads, changes and saves one grant under the lock. `apply` returns the event
    /// kind and actor to record.
    fn change<'a>(
        &self,
        id: &str,
        now: DateTime<Utc>,
        apply: impl FnOnce(&mut Grant) -> Result<(AuditKind, &'a str), RuleError>,
    ) -> Result<Grant, GrantError> {
        let _guard = self.write.lock().expect("grant lock poisoned");
        let mut grant = self.get(id)?;
        let was = grant.state;
        match apply(&mut grant) {
            Ok((kind, actor)) => {
                self.commit(&grant, kind, actor, now)?;
                Ok(grant)
            }
            Err(refusal) => {
                // A decision attempt that found the request past its time still
                // records the expiry, even though the decision itself is refused.
                if grant.state == GrantState::Expired && was != GrantState::Expired {
                    self.commit(&grant, AuditKind::RequestExpired, SYSTEM_ACTOR, now)?;
                }
                Err(refusal.into())
            }
        }
    }

    /// Records the event, saves the grant, wakes waiters and notifies the webhook.
    /// The event goes first: a change whose event cannot be written is not made (an
    /// event whose change then fails to save is the lesser evil, and says so in the
    /// log).
    fn commit(
        &self,
        grant: &Grant,
        kind: AuditKind,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<(), GrantError> {
        self.audit(event_for(grant, kind, actor, now))
            .map_err(GrantError::Unaudited)?;
        if let Err(err) = self.store.save_grant(grant) {
            tracing::error!(event = kind.as_str(), grant = %grant.id, error = %err, "audited change not saved");
            return Err(err.into());
        }
        {
            let mut live = self.live.lock().expect("live grants lock poisoned");
            if grant.state.is_live() {
                live.insert(grant.id.clone(), grant.clone());
            } else {
                live.remove(&grant.id);
            }
        }
        self.changes.send_modify(|n| *n += 1);
        self.notifier.grant_event(kind.as_str(), actor, grant);
        tracing::info!(
            event = kind.as_str(),
            %actor,
            grant = %grant.id,
            requester = %grant.requester,
            target = %grant.destination(),
            state = %grant.state,
            "grant changed"
        );
        Ok(())
    }

    fn fresh_id(&self) -> Result<String, GrantError> {
        loop {
            let n: u32 = rand::rng().random_range(0..1 << (4 * ID_LEN));
            let id = format!("{n:0width$x}", width = ID_LEN);
            if !self.store.id_taken(&id)? {
                return Ok(id);
            }
        }
    }
}

/// Refuses anything that is not shaped like an id, before it is echoed or looked up.
fn check_id(id: &str) -> Result<(), GrantError> {
    if id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        let shown = crate::display::escape(&id.chars().take(20).collect::<String>()).into_owned();
        Err(GrantError::BadId(shown))
    }
}

/// The audit form of a lifecycle event.
fn event_for(grant: &Grant, kind: AuditKind, actor: &str, now: DateTime<Utc>) -> AuditEvent {
    let mut event = AuditEvent::new(kind, actor, now)
        .target(&grant.target)
        .grant(&grant.id)
        .detail("requester", grant.requester.as_str())
        .detail("login", grant.login.as_str())
        .detail("scope", grant.scope.describe())
        .detail("state", grant.state.as_str())
        .detail("flow", grant.flow.as_str());
    match kind {
        AuditKind::RequestCreated => {
            event = event
                .detail("reason", grant.reason.as_str())
                .detail("ttl_secs", grant.ttl_secs);
        }
        AuditKind::RequestApproved | AuditKind::RequestApproval => {
            if let Some(approval) = grant.approvals.last() {
                event = event.detail("comment", approval.comment.clone().unwrap_or_default());
            }
            event = event.detail(
                "approvals",
                grant
                    .approvals
                    .iter()
                    .map(|a| a.by.clone())
                    .collect::<Vec<_>>(),
            );
            if let Some(expires) = grant.expires_at {
                event = event.detail("expires_at", expires.to_rfc3339());
            }
        }
        _ => {
            if let Some(ended) = &grant.ended {
                event = event.detail("reason", ended.reason.clone().unwrap_or_default());
            }
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::Scope;

    fn policy(dir: &std::path::Path) -> Policy {
        let key = |_: &str| {
            russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .unwrap()
                .public_key()
                .to_openssh()
                .unwrap()
        };
        std::fs::write(
            dir.join("users.toml"),
            format!(
                "[users.alice]\nkeys = [\"{}\"]\ngroups = [\"eng\"]\n[users.bob]\nkeys = [\"{}\"]\n",
                key("alice"),
                key("bob")
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("targets.toml"),
            format!(
                "[targets.db]\naddress = \"127.0.0.1\"\nhost_key = \"{}\"\nlogins = [\"postgres\"]\n",
                key("db")
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("flows.toml"),
            "[[flows]]\nname = \"all\"\nrequesters = [\"group:eng\"]\napprovers = [\"bob\"]\nshell = true\npending_ttl = \"10m\"\nmax_ttl = \"1h\"\n",
        )
        .unwrap();
        crate::policy::load_dir(dir).unwrap()
    }

    /// A shell request for `db`.
    fn shell_spec() -> RequestSpec {
        RequestSpec {
            target: "db".into(),
            scope: Scope {
                shell: true,
                ..Scope::default()
            },
            reason: "INC-1".into(),
            ..RequestSpec::default()
        }
    }

    /// A policy, a store and the grant service on it, in `dir`.
    fn service(dir: &std::path::Path) -> (Policy, Arc<Store>, Grants) {
        let policy = policy(dir);
        let store = Arc::new(Store::open(dir).unwrap());
        let grants = Grants::new(store.clone(), Notifier::new(None)).unwrap();
        (policy, store, grants)
    }

    #[test]
    fn the_sweeper_expires_with_an_event_and_history_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, store, grants) = service(dir.path());
        let now = Utc::now();
        let pending = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let approved = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        grants
            .approve(&policy, &approved.id, "bob", None, now)
            .unwrap();

        assert_eq!(
            grants
                .sweep(now + std::time::Duration::from_secs(599))
                .unwrap(),
            0
        );
        assert_eq!(
            grants
                .sweep(now + std::time::Duration::from_secs(600))
                .unwrap(),
            1
        );
        assert_eq!(grants.get(&pending.id).unwrap().state, GrantState::Expired);
        assert_eq!(
            grants.get(&approved.id).unwrap().state,
            GrantState::Approved
        );
        assert_eq!(
            grants
                .sweep(now + std::time::Duration::from_secs(3600))
                .unwrap(),
            1
        );
        assert_eq!(grants.get(&approved.id).unwrap().state, GrantState::Expired);
        assert_eq!(grants.all().unwrap().len(), 2, "nothing disappears");

        let kinds: Vec<String> = store
            .audit_events()
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "request.created",
                "request.created",
                "request.approved",
                "request.expired",
                "request.expired"
            ]
        );
    }

    #[test]
    fn live_grants_follow_every_change_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, store, grants) = service(dir.path());
        let now = Utc::now();
        let kept = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let revoked = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let pending = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        for id in [&kept.id, &revoked.id] {
            grants.approve(&policy, id, "bob", None, now).unwrap();
        }
        grants
            .revoke(&policy, &revoked.id, "bob", None, now)
            .unwrap();
        let active = |grants: &Grants| -> Vec<String> {
            grants
                .active_for("alice", "db", now)
                .unwrap()
                .into_iter()
                .map(|g| g.id)
                .collect()
        };
        assert_eq!(active(&grants), vec![kept.id.clone()]);
        assert_eq!(grants.pending_count(), 1);
        assert!(active(&grants).iter().all(|id| *id != pending.id));

        drop(grants);
        let reopened = Grants::new(store, Notifier::new(None)).unwrap();
        assert_eq!(active(&reopened), vec![kept.id.clone()]);
        assert_eq!(reopened.pending_count(), 1);
        assert!(reopened.active_for("bob", "db", now).unwrap().is_empty());
    }

    #[test]
    fn one_user_cannot_flood_the_approvers() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, store, grants) = service(dir.path());
        let grants = grants.with_limits(RequestLimits {
            pending_per_user: 2,
            per_window: 3,
            window: Duration::from_secs(600),
        });
        let now = Utc::now();
        let first = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let capped = grants
            .file(&policy, "alice", shell_spec(), now)
            .unwrap_err()
            .to_string();
        assert!(
            capped.contains("2 pending requests") && capped.contains("pending_requests_per_user"),
            "{capped}"
        );
        // Withdrawing one makes room; the rate still counts it.
        grants
            .revoke(&policy, &first.id, "alice", None, now)
            .unwrap();
        grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let pending: Vec<Grant> = grants
            .all()
            .unwrap()
            .into_iter()
            .filter(|g| g.state == GrantState::Pending)
            .collect();
        for grant in &pending {
            grants
                .revoke(&policy, &grant.id, "alice", None, now)
                .unwrap();
        }
        let later = now + Duration::from_secs(60);
        let rate = grants
            .file(&policy, "alice", shell_spec(), later)
            .unwrap_err()
            .to_string();
        assert!(
            rate.contains("3 requests within 10m") && rate.contains("try again in 9m"),
            "{rate}"
        );
        let after_window = now + Duration::from_secs(600);
        grants
            .file(&policy, "alice", shell_spec(), after_window)
            .unwrap();
        let limited: Vec<_> = store
            .audit_events()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "request.limited")
            .map(|e| e.details["limit"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(limited, ["pending_requests_per_user", "requests_per_user"]);
    }

    #[test]
    fn ids_are_checked_before_use() {
        assert!(check_id("7f3a9c").is_ok());
        for bad in [
            "", "7F3A9C", "7f3a9", "7f3a9cc", "zzzzzz", "7f3a9\n", "ø7f3a9",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(1 << 20);
        let message = check_id(&long).unwrap_err().to_string();
        assert!(message.len() < 200, "{message}");
    }
}
