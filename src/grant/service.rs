//! The grant service: applies the lifecycle rules, persists every change as a
//! compare-and-swap on the grant's version, writes the audit event, notifies the
//! webhook, and hands the changed grant to everyone watching it (`request --wait`,
//! a session waiting for approval, a live session that must end when its grant
//! does).
//!
//! No lock orders the changes: a change reads the grant, applies the rules, and
//! writes only if the grant is still the version it read; a lost race reads again
//! and re-applies the rules to what won (so two approvals by one approver still
//! count once, wherever they were made). The methods block (they sync the store to
//! disk); async code runs them through [`Grants::run`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngExt;
use thiserror::Error;
use tokio::sync::watch;

use super::clock::Clock;
use super::lifecycle::{self, RequestSpec, RuleError, SYSTEM_ACTOR};
use super::table::{GrantTable, Read};
use super::{Grant, GrantState};
use crate::audit::{AuditEvent, AuditKind, AuditLog};
use crate::grant::notify::Notifier;
use crate::policy::Policy;
use crate::store::{Change, Store, StoreError, Subscription};

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

/// Requests and grants, backed by the store. Cheap to clone (one shared service).
#[derive(Clone)]
pub struct Grants {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    table: GrantTable,
    audit: AuditLog,
    notifier: Notifier,
    limits: RequestLimits,
    /// Where "now" comes from for the callers of this service (its own methods
    /// take the time they act at).
    clock: Clock,
    /// When each user filed their recent requests that needed a decision (a sliding
    /// window of at most `limits.per_window` entries per user). Held while a
    /// pending request is checked and filed, so this bastion's count and cap hold.
    filed: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
    /// The grants someone is watching, by seq (the key the store's change feed
    /// names): the version last handed out, and its channel. One entry per
    /// watched grant (a live session, a waiting request); entries nobody holds a
    /// receiver of are dropped at the next [`Grants::watch`].
    watched: Mutex<HashMap<u64, (u64, watch::Sender<Grant>)>>,
    /// The store's change feed of the grants, until the first [`Grants::watch`]
    /// hands it to the thread that follows it (changes before then queue up to
    /// the feed's bound, then become a resync).
    feed: Mutex<Option<Subscription>>,
}

impl Grants {
    /// The service on `store`, subscribed to the store's change feed of the
    /// grants (followed from the first [`Grants::watch`] on).
    pub fn new(store: Arc<Store>, notifier: Notifier) -> Result<Grants, StoreError> {
        let table = GrantTable::open(&store)?;
        let changes = table.subscribe()?;
        Ok(Grants {
            inner: Arc::new(Inner {
                table,
                audit: AuditLog::open(&store)?,
                store,
                notifier,
                limits: RequestLimits::default(),
                clock: Clock::Wall,
                filed: Mutex::new(HashMap::new()),
                watched: Mutex::new(HashMap::new()),
                feed: Mutex::new(Some(changes)),
            }),
        })
    }

    /// The same service with these per-user request limits (before it is shared).
    pub fn with_limits(mut self, limits: RequestLimits) -> Grants {
        Arc::get_mut(&mut self.inner)
            .expect("limits are set before the service is shared")
            .limits = limits;
        self
    }

    /// The same service reading the time from `clock` (before it is shared).
    pub fn with_clock(mut self, clock: Clock) -> Grants {
        Arc::get_mut(&mut self.inner)
            .expect("the clock is set before the service is shared")
            .clock = clock;
        self
    }

    /// Now, by this service's clock: the time every grant rule is applied at.
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// The clock [`Grants::now`] reads.
    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    /// Runs `work` on the service on a thread where blocking is fine (tokio's
    /// blocking pool): changes sync the store to disk, which must not stall the
    /// runtime's worker threads.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Grants) -> T + Send + 'static,
    ) -> T {
        let grants = self.clone();
        tokio::task::spawn_blocking(move || work(&grants))
            .await
            .expect("grant work does not panic")
    }

    /// Files a request (approved at once by an `auto_approve` flow).
    pub fn file(
        &self,
        policy: &Policy,
        requester: &str,
        spec: RequestSpec,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantError> {
        self.writable()?;
        let seq = self.inner.table.next_seq()?;
        let grant = lifecycle::file_request(policy, requester, spec, String::new(), seq, now)?;
        let mut filed = self.inner.filed.lock().expect("request rate lock poisoned");
        if grant.state == GrantState::Pending {
            let pending = self
                .live_of(requester)?
                .iter()
                .filter(|g| g.state == GrantState::Pending)
                .count();
            if let Err(refusal) = self.within_limits(&mut filed, &grant, pending, now) {
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
        let grant = self.insert(grant)?;
        drop(filed);
        let audited = self.audit(event_for(&grant, AuditKind::RequestCreated, requester, now));
        let audited = audited.and_then(|()| match grant.state {
            GrantState::Approved => self.audit(event_for(
                &grant,
                AuditKind::RequestApproved,
                SYSTEM_ACTOR,
                now,
            )),
            _ => Ok(()),
        });
        if let Err(err) = audited {
            if let Err(undo) = self.inner.table.uninsert(&grant) {
                tracing::error!(grant = %grant.id, error = %undo, "unaudited request not removed");
            }
            return Err(GrantError::Unaudited(err));
        }
        self.announce(&grant, AuditKind::RequestCreated, requester);
        if grant.state == GrantState::Approved {
            self.announce(&grant, AuditKind::RequestApproved, SYSTEM_ACTOR);
        }
        Ok(grant)
    }

    /// Stores a new grant under a fresh id (ids are claimed atomically, so a
    /// collision just draws another).
    fn insert(&self, mut grant: Grant) -> Result<Grant, GrantError> {
        loop {
            grant.id = self.fresh_id()?;
            if self.inner.table.insert(&grant)? {
                return Ok(grant);
            }
        }
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
            lifecycle::approve(grant, policy, approver, comment.clone(), now)?;
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
            lifecycle::deny(grant, policy, approver, reason.clone(), now)?;
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
            lifecycle::revoke(grant, policy, user, reason.clone(), now)?;
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

    /// Everyone with a pending request or a live grant (none, logged, when the
    /// store cannot be read).
    pub fn requesters(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .live()
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "cannot list the live grants");
                Vec::new()
            })
            .into_iter()
            .map(|g| g.requester)
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Withdraws every live grant and pending request of `user` (who left the
    /// policy); returns their ids. Their live sessions end as for a revocation.
    pub fn withdraw_all_of(&self, user: &str, reason: &str, now: DateTime<Utc>) -> Vec<String> {
        let live: Vec<String> = match self.inner.table.live_of(user) {
            Ok(grants) => grants.into_iter().map(|g| g.id).collect(),
            Err(err) => {
                tracing::error!(%user, error = %err, "cannot read the grants to withdraw");
                Vec::new()
            }
        };
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

    /// Checks the requester's pending cap (`pending`: their requests waiting now)
    /// and request rate for a request that waits for a decision, and counts it.
    fn within_limits(
        &self,
        filed: &mut HashMap<String, VecDeque<DateTime<Utc>>>,
        grant: &Grant,
        pending: usize,
        now: DateTime<Utc>,
    ) -> Result<(), LimitRefusal> {
        let limits = self.inner.limits;
        let user = grant.requester.as_str();
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
            .inner
            .table
            .due(now)?
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
        Ok(self.read(id)?.grant)
    }

    fn read(&self, id: &str) -> Result<Read, GrantError> {
        check_id(id)?;
        self.inner
            .table
            .read(id)?
            .ok_or_else(|| GrantError::NotFound(id.to_string()))
    }

    /// Every grant ever filed, oldest first (history: a full scan).
    pub fn all(&self) -> Result<Vec<Grant>, GrantError> {
        Ok(self.inner.table.all()?)
    }

    /// The pending and approved grants, oldest first (read through an index).
    pub fn live(&self) -> Result<Vec<Grant>, GrantError> {
        Ok(self.inner.table.live()?)
    }

    /// The pending and approved grants of `user`, oldest first (read through an
    /// index).
    pub fn live_of(&self, user: &str) -> Result<Vec<Grant>, GrantError> {
        Ok(self.inner.table.live_of(user)?)
    }

    /// Every grant `user` filed, oldest first (read through an index).
    pub fn of_user(&self, user: &str) -> Result<Vec<Grant>, GrantError> {
        Ok(self.inner.table.of_user(user)?)
    }

    /// The user's grants for `target` that are active at `now`.
    pub fn active_for(
        &self,
        user: &str,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Grant>, GrantError> {
        Ok(self
            .live_of(user)?
            .into_iter()
            .filter(|g| g.target == target && g.is_active(now))
            .collect())
    }

    /// How many requests wait for a decision (0, logged, when the store cannot be
    /// read).
    pub fn pending_count(&self) -> usize {
        self.live_where(|g| g.state == GrantState::Pending)
            .map(|pending| pending.len())
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "cannot count the pending requests");
                0
            })
    }

    /// The pending and approved grants (approved ones may be past their expiry until
    /// the next sweep) that `keep` selects, oldest first.
    fn live_where(&self, keep: impl Fn(&Grant) -> bool) -> Result<Vec<Grant>, GrantError> {
        Ok(self.live()?.into_iter().filter(|g| keep(g)).collect())
    }

    /// A receiver that holds grant `id` as it is now and gets every change to it,
    /// the changed grant in hand: only the watchers of a grant wake when it
    /// changes. Changes made here are handed out as they are saved; changes made
    /// by another bastion on the same database arrive through the store's change
    /// feed (see [`follow`]).
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<Grant>, GrantError> {
        self.follow_feed()?;
        let mut watched = self.watched();
        watched.retain(|_, (_, sender)| sender.receiver_count() > 0);
        // Read under the lock: a change saved after this read is handed out after
        // the entry exists (see `publish`), so none is missed.
        let read = self.read(id)?;
        let (version, seq) = (read.version(), read.grant.seq);
        if let Some((seen, sender)) = watched.get_mut(&seq) {
            if version > *seen {
                *seen = version;
                sender.send_replace(read.grant);
            }
            return Ok(sender.subscribe());
        }
        let (sender, receiver) = watch::channel(read.grant);
        watched.insert(seq, (version, sender));
        Ok(receiver)
    }

    /// Starts the thread that follows the store's change feed, once.
    fn follow_feed(&self) -> Result<(), StoreError> {
        let mut feed = self.inner.feed.lock().expect("grant feed lock poisoned");
        let Some(changes) = feed.take() else {
            return Ok(());
        };
        let service = Arc::downgrade(&self.inner);
        let started = std::thread::Builder::new()
            .name("grant-feed".into())
            .spawn(move || follow(&service, changes));
        started.map(drop).map_err(|err| {
            StoreError::Backend(format!("cannot start the grant feed thread: {err}"))
        })
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, watch::Sender<Grant>)>> {
        self.inner
            .watched
            .lock()
            .expect("grant watch lock poisoned")
    }

    /// Re-reads the watched grant stored under `seq` (changed, perhaps by another
    /// bastion) and hands it to its watchers if it is newer than what they have.
    fn refresh(&self, seq: u64) {
        if !self.watched().contains_key(&seq) {
            return;
        }
        match self.inner.table.read_seq(seq) {
            Ok(Some(read)) => self.publish(&read.grant, read.version()),
            Ok(None) => {}
            Err(err) => tracing::warn!(seq, error = %err, "cannot re-read a changed grant"),
        }
    }

    /// Re-reads every watched grant (the feed may have missed changes).
    fn refresh_all(&self) {
        let seqs: Vec<u64> = self.watched().keys().copied().collect();
        for seq in seqs {
            self.refresh(seq);
        }
    }

    /// Appends an audit event, durably. A failure is logged and returned: the
    /// caller must not go on with what the event records.
    pub fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        if let Err(err) = self.inner.audit.append(event) {
            tracing::error!(error = %err, "cannot append to the audit log");
            return Err(err);
        }
        Ok(())
    }

    /// The audit log this service appends to.
    pub fn audit_log(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Refuses a change up front when the store already failed: its event could
    /// not be written, and nothing happens here without its event.
    fn writable(&self) -> Result<(), GrantError> {
        match self.inner.store.failure() {
            Some(failure) => Err(GrantError::Unaudited(StoreError::Backend(failure))),
            None => Ok(()),
        }
    }

    /// Reads, changes and saves one grant, as a compare-and-swap on the version it
    /// read; a lost race starts over, rules and all. `apply` returns the event kind
    /// and actor to record.
    fn change<'a>(
        &self,
        id: &str,
        now: DateTime<Utc>,
        apply: impl Fn(&mut Grant) -> Result<(AuditKind, &'a str), RuleError>,
    ) -> Result<Grant, GrantError> {
        self.writable()?;
        loop {
            let read = self.read(id)?;
            let mut grant = read.grant.clone();
            let was = grant.state;
            let (outcome, kind, actor) = match apply(&mut grant) {
                Ok((kind, actor)) => (Ok(()), kind, actor),
                // A decision attempt that found the request past its time still
                // records the expiry, even though the decision itself is refused.
                Err(refusal)
                    if grant.state == GrantState::Expired && was != GrantState::Expired =>
                {
                    (Err(refusal), AuditKind::RequestExpired, SYSTEM_ACTOR)
                }
                Err(refusal) => return Err(refusal.into()),
            };
            if self.commit(&read, &grant, kind, actor, now)? {
                return outcome.map(|()| grant).map_err(GrantError::from);
            }
        }
    }

    /// Saves the change if the grant is still as `read` saw it (`Ok(false)`: it
    /// is not; nothing was written), then records the event, hands the grant to
    /// its watchers and notifies the webhook. An event that cannot be written
    /// undoes the change: nothing happens without its event.
    fn commit(
        &self,
        read: &Read,
        grant: &Grant,
        kind: AuditKind,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GrantError> {
        let Some(written) = self.inner.table.update(read, grant)? else {
            return Ok(false);
        };
        if let Err(err) = self.audit(event_for(grant, kind, actor, now)) {
            match self.inner.table.restore(&written, read) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(event = kind.as_str(), grant = %grant.id, "unaudited change changed again before it could be undone")
                }
                Err(undo) => {
                    tracing::error!(event = kind.as_str(), grant = %grant.id, error = %undo, "unaudited change not undone")
                }
            }
            return Err(GrantError::Unaudited(err));
        }
        self.publish(grant, written.version());
        self.announce(grant, kind, actor);
        Ok(true)
    }

    /// Hands `grant` (at `version`) to its watchers, unless they have a later one.
    fn publish(&self, grant: &Grant, version: u64) {
        if let Some((seen, sender)) = self.watched().get_mut(&grant.seq) {
            if version > *seen {
                *seen = version;
                sender.send_replace(grant.clone());
            }
        }
    }

    /// Notifies the webhook and logs a change that is saved and audited.
    fn announce(&self, grant: &Grant, kind: AuditKind, actor: &str) {
        self.inner.notifier.grant_event(kind.as_str(), actor, grant);
        tracing::info!(
            event = kind.as_str(),
            %actor,
            grant = %grant.id,
            requester = %grant.requester,
            target = %grant.destination(),
            state = %grant.state,
            "grant changed"
        );
    }

    fn fresh_id(&self) -> Result<String, GrantError> {
        loop {
            let n: u32 = rand::rng().random_range(0..1 << (4 * ID_LEN));
            let id = format!("{n:0width$x}", width = ID_LEN);
            if !self.inner.table.id_taken(&id)? {
                return Ok(id);
            }
        }
    }
}

/// The grant service's end of the store's change feed of the grants: one thread
/// per service (it reads the store, which blocks), waking only the watchers of
/// the grant that changed. It ends with the service or the store.
fn follow(service: &std::sync::Weak<Inner>, mut changes: Subscription) {
    while let Some(change) = changes.blocking_recv() {
        let Some(inner) = service.upgrade() else {
            return;
        };
        let grants = Grants { inner };
        match change {
            Change::Key(key) => match GrantTable::seq_of(&key) {
                Some(seq) => grants.refresh(seq),
                None => grants.refresh_all(),
            },
            Change::Resync => grants.refresh_all(),
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
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::store::intercept::{Hooks, Intercepted, Write};
    use crate::store::table::{millis, trailing_u64};
    use crate::store::Key;

    fn policy(dir: &std::path::Path) -> Policy {
        policy_needing(dir, 1)
    }

    /// A policy whose flow needs `approvals` approvals from bob and carol.
    fn policy_needing(dir: &std::path::Path, approvals: u32) -> Policy {
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
                "[users.alice]\nkeys = [\"{}\"]\ngroups = [\"eng\"]\n[users.bob]\nkeys = [\"{}\"]\n[users.carol]\nkeys = [\"{}\"]\ngroups = [\"eng\"]\n",
                key("alice"),
                key("bob"),
                key("carol")
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
            format!("[[flows]]\nname = \"all\"\nrequesters = [\"group:eng\"]\napprovers = [\"bob\", \"carol\"]\napprovals = {approvals}\nshell = true\npending_ttl = \"10m\"\nmax_ttl = \"1h\"\n"),
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

    /// The kinds of the audit events so far, in order.
    fn event_kinds(grants: &Grants) -> Vec<String> {
        let events = grants.audit_log().events().unwrap();
        events.into_iter().map(|e| e.kind).collect()
    }

    /// A policy, a store and the grant service on it, in `dir`.
    fn service(dir: &std::path::Path) -> (Policy, Arc<Store>, Grants) {
        let policy = policy(dir);
        let store = Arc::new(Store::sled(dir).unwrap());
        let grants = Grants::new(store.clone(), Notifier::new(None)).unwrap();
        (policy, store, grants)
    }

    /// A service on a store whose writes the test intercepts, with an approved
    /// grant (an hour long) to work on.
    fn approved_on_intercepted(
        dir: &std::path::Path,
    ) -> (Policy, Arc<Store>, Hooks, Grants, Grant) {
        let policy = policy(dir);
        let (store, hooks) = Intercepted::sled(dir);
        let store = Arc::new(store);
        let grants = Grants::new(store.clone(), Notifier::new(None)).unwrap();
        let now = Utc::now();
        let filed = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let approved = grants
            .approve(&policy, &filed.id, "bob", None, now)
            .unwrap();
        (policy, store, hooks, grants, approved)
    }

    fn injected() -> StoreError {
        StoreError::Backend("injected by the test".into())
    }

    /// The entries an index tree holds.
    fn entries(store: &Store, tree: &str) -> usize {
        store.backend().scan(tree, b"", None).count()
    }

    /// The grant is approved, listed as live, and the sweep expires it once
    /// its time is up.
    fn assert_still_approved_and_expires(grants: &Grants, approved: &Grant) {
        assert_eq!(
            grants.get(&approved.id).unwrap().state,
            GrantState::Approved
        );
        assert_eq!(grants.live().unwrap(), vec![approved.clone()]);
        let after_expiry = approved.expires_at.unwrap() + Duration::from_secs(1);
        assert_eq!(grants.sweep(after_expiry).unwrap(), 1, "still expires");
    }

    /// A flag a hook raises, for the test to check that its race happened.
    fn flag() -> (Arc<AtomicBool>, Arc<AtomicBool>) {
        let raised = Arc::new(AtomicBool::new(false));
        (raised.clone(), raised)
    }

    /// Revokes `approved` with its audit event failing, so the revocation is
    /// undone; `during_undo` runs once, just before the undo's swap of the
    /// grant, and what it returns is that swap's fate. Checks the revocation
    /// was refused as unaudited and `during_undo` ran.
    fn revoke_unaudited(
        policy: &Policy,
        hooks: &Hooks,
        grants: &Grants,
        approved: &Grant,
        mut during_undo: impl FnMut(Write<'_>) -> Result<(), StoreError> + Send + 'static,
    ) {
        let (ran, raise) = flag();
        let mut event_failed = false;
        hooks.set(Box::new(move |write| match write {
            Write::Swap { tree: "audit", .. } if !event_failed => {
                event_failed = true;
                Err(injected())
            }
            Write::Swap {
                tree: "requests", ..
            } if event_failed && !raise.swap(true, Ordering::SeqCst) => during_undo(write),
            _ => Ok(()),
        }));
        let refused = grants.revoke(policy, &approved.id, "bob", None, Utc::now());
        assert!(
            matches!(refused, Err(GrantError::Unaudited(_))),
            "{refused:?}"
        );
        assert!(ran.load(Ordering::SeqCst), "the hook ran in the undo");
    }

    /// Two hours on: past the test grants' expiry.
    fn two_hours_on() -> DateTime<Utc> {
        Utc::now() + Duration::from_secs(7200)
    }

    #[test]
    fn an_unaudited_revocation_is_undone_and_the_grant_still_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, _, hooks, grants, approved) = approved_on_intercepted(dir.path());
        // While the change is being undone, between putting back the index
        // entries and the grant, a sweep (here or on another bastion) reads the
        // grant as revoked and drops its entries.
        let table = grants.inner.table.clone();
        revoke_unaudited(&policy, &hooks, &grants, &approved, move |_| {
            sweep_reader(&table, two_hours_on());
            live_reader(&table, two_hours_on());
            Ok(())
        });

        assert_still_approved_and_expires(&grants, &approved);
        let kinds = event_kinds(&grants);
        assert!(!kinds
            .iter()
            .any(|k| k == AuditKind::RequestRevoked.as_str()));
        assert_eq!(kinds.last().unwrap(), AuditKind::RequestExpired.as_str());
    }

    #[test]
    fn an_undo_whose_answer_is_lost_counts_and_indexes_again() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, store, hooks, grants, approved) = approved_on_intercepted(dir.path());
        // A sweep drops the grant's entries while it is undone, and the undo's
        // swap lands but its answer is lost (a database connection that broke
        // after the commit).
        let table = grants.inner.table.clone();
        revoke_unaudited(&policy, &hooks, &grants, &approved, move |write| {
            sweep_reader(&table, two_hours_on());
            let Write::Swap { key, old, new, .. } = write else {
                unreachable!("called for the undo's swap")
            };
            assert!(store
                .backend()
                .compare_and_swap("requests", key, old, new)
                .unwrap());
            Err(injected())
        });

        assert_still_approved_and_expires(&grants, &approved);
    }

    /// A grant revoked without its `tree` entry removed (the removal fails);
    /// then `read` (a reader of that index) finds the grant revoked, and just
    /// before it removes the entry, the revocation is undone (its event failed)
    /// on another bastion, whose entries land before the reader's removal. With
    /// `fail_reindex`, the reader's own attempt to index the grant again fails.
    /// Afterwards the grant must be live in every index.
    fn reader_meets_an_undo(
        tree: &'static str,
        fail_reindex: bool,
        read: fn(&GrantTable, DateTime<Utc>),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (_, store, hooks, grants, approved) = approved_on_intercepted(dir.path());
        let table = grants.inner.table.clone();
        let before = table.read(&approved.id).unwrap().unwrap();
        let mut revoked = approved.clone();
        revoked.state = GrantState::Revoked;
        let mut failed = false;
        hooks.set(Box::new(move |write| match write {
            Write::Remove { tree: t, .. } if t == tree && !failed => {
                failed = true;
                Err(injected())
            }
            _ => Ok(()),
        }));
        let written = table.update(&before, &revoked).unwrap().expect("swapped");
        assert_eq!(entries(&store, tree), 1, "the removal failed");

        let undo_table = table.clone();
        let mut undo = Some((written, before));
        let mut reindex_failed = !fail_reindex;
        let (undone, raise) = flag();
        hooks.set(Box::new(move |write| {
            match write {
                Write::Remove { tree: t, .. } if t == tree => {
                    if let Some((written, before)) = undo.take() {
                        assert!(undo_table.restore(&written, &before).unwrap());
                        raise.store(true, Ordering::SeqCst);
                    }
                }
                Write::Put { tree: t, .. } if t == tree && undo.is_none() && !reindex_failed => {
                    reindex_failed = true;
                    return Err(injected());
                }
                _ => {}
            }
            Ok(())
        }));
        let later = approved.expires_at.unwrap() + Duration::from_secs(1);
        read(&table, later);
        assert!(undone.load(Ordering::SeqCst), "the undo ran in the read");

        assert_eq!(
            grants.get(&approved.id).unwrap().state,
            GrantState::Approved
        );
        let due: Vec<String> = table
            .due(later)
            .unwrap()
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(due, vec![approved.id.clone()], "{tree}");
        assert_eq!(grants.live().unwrap(), vec![approved], "{tree}");
    }

    fn sweep_reader(table: &GrantTable, now: DateTime<Utc>) {
        assert!(table.due(now).unwrap().is_empty(), "read as revoked");
    }

    fn live_reader(table: &GrantTable, _: DateTime<Utc>) {
        assert!(table.live().unwrap().is_empty(), "read as revoked");
    }

    #[test]
    fn a_reader_that_drops_an_entry_as_an_undo_lands_puts_it_back() {
        reader_meets_an_undo("grants_due", false, sweep_reader);
        reader_meets_an_undo("grants_live", false, live_reader);
    }

    #[test]
    fn a_reader_that_cannot_index_an_undone_grant_again_keeps_the_entry() {
        reader_meets_an_undo("grants_due", true, sweep_reader);
        reader_meets_an_undo("grants_live", true, live_reader);
    }

    #[test]
    fn a_sweep_while_a_request_is_filed_keeps_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, _, hooks, grants, _) = approved_on_intercepted(dir.path());
        // Between the new request's index entries and the request itself.
        let table = grants.inner.table.clone();
        let (swept, raise) = flag();
        hooks.set(Box::new(move |write| {
            if let Write::Swap {
                tree: "requests", ..
            } = write
            {
                if !raise.swap(true, Ordering::SeqCst) {
                    let later = Utc::now() + Duration::from_secs(7200);
                    table.due(later).unwrap();
                }
            }
            Ok(())
        }));
        let now = Utc::now();
        let pending = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        assert!(swept.load(Ordering::SeqCst), "the sweep ran in the filing");

        let after = pending.pending_until + Duration::from_secs(1);
        let due = grants.inner.table.due(after).unwrap();
        assert!(due.iter().any(|g| g.id == pending.id), "{due:?}");
    }

    #[test]
    fn a_due_entry_with_no_grant_goes_a_day_after_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store, _, grants, _) = approved_on_intercepted(dir.path());
        let now = Utc::now();
        let orphan = |ago: u64, seq: u64| {
            let mut key = millis(now - Duration::from_secs(ago)).encode();
            key.extend_from_slice(&seq.encode());
            store.backend().put("grants_due", &key, b"").unwrap();
        };
        let (kept, dropped) = (u64::MAX - 1, u64::MAX);
        orphan(23 * 3600, kept);
        orphan(25 * 3600, dropped);
        let present = || -> Vec<u64> {
            store
                .backend()
                .scan("grants_due", b"", None)
                .map(|entry| trailing_u64(&entry.unwrap().0).unwrap())
                .filter(|seq| *seq >= kept)
                .collect()
        };
        assert_eq!(present(), vec![dropped, kept]);

        assert!(grants.inner.table.due(now).unwrap().is_empty());
        assert_eq!(present(), vec![kept]);
    }

    #[test]
    fn a_stale_live_entry_is_removed_by_its_first_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, store, hooks, grants, approved) = approved_on_intercepted(dir.path());
        let mut failed = false;
        hooks.set(Box::new(move |write| match write {
            Write::Remove {
                tree: "grants_live",
                ..
            } if !failed => {
                failed = true;
                Err(injected())
            }
            _ => Ok(()),
        }));
        grants
            .revoke(&policy, &approved.id, "bob", None, Utc::now())
            .unwrap();
        assert_eq!(entries(&store, "grants_live"), 1, "the removal failed");

        assert!(grants.live().unwrap().is_empty());
        assert_eq!(entries(&store, "grants_live"), 0, "the reader removed it");
        assert!(grants.live_of("alice").unwrap().is_empty());
    }

    #[test]
    fn the_sweeper_expires_with_an_event_and_history_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, _, grants) = service(dir.path());
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

        let kinds = event_kinds(&grants);
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
        let (policy, _, grants) = service(dir.path());
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
        let limited: Vec<_> = grants
            .audit_log()
            .events()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "request.limited")
            .map(|e| e.details["limit"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(limited, ["pending_requests_per_user", "requests_per_user"]);
    }

    /// Approvals race on threads: the same approver's yes counts once however
    /// many times it lands at once, and two approvals need two distinct approvers.
    #[test]
    fn racing_approvals_count_each_approver_once() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Arc::new(policy_needing(dir.path(), 2));
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let grants = Grants::new(store, Notifier::new(None)).unwrap();
        let now = Utc::now();
        let grant = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let approve = |approver: &'static str| {
            let (grants, policy, id) = (grants.clone(), policy.clone(), grant.id.clone());
            std::thread::spawn(move || grants.approve(&policy, &id, approver, None, now).is_ok())
        };
        let bobs: Vec<_> = (0..8).map(|_| approve("bob")).collect();
        let counted = bobs
            .into_iter()
            .filter_map(|t| t.join().unwrap().then_some(()))
            .count();
        assert_eq!(counted, 1, "one approver counts once");
        let pending = grants.get(&grant.id).unwrap();
        assert_eq!(
            (pending.state, pending.approvals.len()),
            (GrantState::Pending, 1)
        );
        assert!(approve("carol").join().unwrap());
        let approved = grants.get(&grant.id).unwrap();
        assert_eq!(approved.state, GrantState::Approved);
        let kinds = event_kinds(&grants);
        assert_eq!(
            kinds,
            ["request.created", "request.approval", "request.approved"]
        );
    }

    /// A watcher of one grant wakes with that grant's change in hand, and not for
    /// another grant's.
    #[tokio::test]
    async fn a_change_wakes_only_the_watchers_of_its_grant() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, _, grants) = service(dir.path());
        let now = Utc::now();
        let watched = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let other = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        let mut changes = grants.watch(&watched.id).unwrap();
        assert_eq!(changes.borrow_and_update().state, GrantState::Pending);
        grants
            .approve(&policy, &other.id, "bob", None, now)
            .unwrap();
        assert!(!changes.has_changed().unwrap(), "another grant's change");
        grants
            .deny(&policy, &watched.id, "bob", "no".into(), now)
            .unwrap();
        changes.changed().await.unwrap();
        assert_eq!(changes.borrow_and_update().state, GrantState::Denied);
        assert_eq!(grants.inner.watched.lock().unwrap().len(), 1);
        drop(changes);
        grants.watch(&other.id).unwrap();
        assert_eq!(
            grants.inner.watched.lock().unwrap().len(),
            1,
            "entries nobody watches are dropped"
        );
    }

    /// A database written before the indexes (grants without versions, no index
    /// trees, seqs from sled's id generator) gets its indexes at open, once.
    #[test]
    fn indexes_are_built_for_an_old_database() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path());
        let now = Utc::now();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let seam = store.backend();
        for (seq, id, user) in [(7u64, "00000a", "alice"), (9, "00000b", "carol")] {
            let grant =
                lifecycle::file_request(&policy, user, shell_spec(), id.into(), seq, now).unwrap();
            let json = serde_json::to_vec(&grant).unwrap();
            seam.put("requests", &seq.to_be_bytes(), &json).unwrap();
            seam.put("request_ids", id.as_bytes(), &seq.to_be_bytes())
                .unwrap();
        }
        assert_eq!(crate::store::schema_version(&store, "grants").unwrap(), 0);
        let grants = Grants::new(store.clone(), Notifier::new(None)).unwrap();
        assert_eq!(crate::store::schema_version(&store, "grants").unwrap(), 1);
        let ids = |list: Vec<Grant>| list.into_iter().map(|g| g.id).collect::<Vec<_>>();
        assert_eq!(ids(grants.live().unwrap()), ["00000a", "00000b"]);
        assert_eq!(ids(grants.of_user("carol").unwrap()), ["00000b"]);
        grants.approve(&policy, "00000a", "bob", None, now).unwrap();
        let filed = grants.file(&policy, "alice", shell_spec(), now).unwrap();
        assert_eq!(filed.seq, 10, "new seqs follow the old ones");
        assert_eq!(grants.all().unwrap().len(), 3);
        let expired = grants.sweep(now + Duration::from_secs(600)).unwrap();
        assert_eq!(expired, 2, "the old and the new pending request are due");
    }

    /// What a property test does to the grants.
    #[derive(Debug, Clone)]
    enum Step {
        File(bool),
        Approve(usize),
        Deny(usize),
        Revoke(usize),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            any::<bool>().prop_map(Step::File),
            (0..8usize).prop_map(Step::Approve),
            (0..8usize).prop_map(Step::Deny),
            (0..8usize).prop_map(Step::Revoke),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever happens to the grants, the index queries return what a full
        /// scan filtered in Rust would.
        #[test]
        fn index_queries_agree_with_a_full_scan(steps in proptest::collection::vec(step(), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let (policy, _, grants) = service(dir.path());
            let now = Utc::now();
            let mut ids: Vec<String> = Vec::new();
            let pick = |ids: &[String], n: usize| ids.get(n % ids.len().max(1)).cloned();
            for step in steps {
                // Refusals (a decision on a decided grant) are part of the test.
                let _ = match step {
                    Step::File(alice) => {
                        let user = if alice { "alice" } else { "carol" };
                        grants.file(&policy, user, shell_spec(), now).map(|g| ids.push(g.id))
                    }
                    Step::Approve(n) => match pick(&ids, n) {
                        Some(id) => grants.approve(&policy, &id, "bob", None, now).map(drop),
                        None => Ok(()),
                    },
                    Step::Deny(n) => match pick(&ids, n) {
                        Some(id) => grants.deny(&policy, &id, "bob", "no".into(), now).map(drop),
                        None => Ok(()),
                    },
                    Step::Revoke(n) => match pick(&ids, n) {
                        Some(id) => grants.revoke(&policy, &id, "bob", None, now).map(drop),
                        None => Ok(()),
                    },
                };
            }
            let all = grants.all().unwrap();
            let scan = |keep: &dyn Fn(&Grant) -> bool| -> Vec<Grant> {
                all.iter().filter(|g| keep(g)).cloned().collect()
            };
            proptest::prop_assert_eq!(grants.live().unwrap(), scan(&|g| g.state.is_live()));
            for later in [0, 600, 3600] {
                let at = now + Duration::from_secs(later);
                let mut due = grants.inner.table.due(at).unwrap();
                due.sort_by_key(|g| g.seq);
                proptest::prop_assert_eq!(
                    due,
                    scan(&|g| g.state.is_live() && g.deadline().is_some_and(|d| d <= at))
                );
            }
            for user in ["alice", "carol", "bob"] {
                proptest::prop_assert_eq!(
                    grants.of_user(user).unwrap(),
                    scan(&|g| g.requester == user)
                );
                proptest::prop_assert_eq!(
                    grants.live_of(user).unwrap(),
                    scan(&|g| g.requester == user && g.state.is_live())
                );
            }
        }
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
