//! The bastion's shared state, and where it is in its life.

use std::sync::Arc;

use tokio::sync::watch;

use super::per_user::PerUser;
use crate::audit::{AuditEvent, AuditKind};
use crate::budget::Budget;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::grant::notify::Notifier;
use crate::grant::{Clock, Grants};
use crate::keys::KeySet;
use crate::metrics::Metrics;
use crate::policy::{self, Policy, PolicyErrors};
use crate::record::Recorder;
use crate::store::{Store, StoreError};
use crate::totp::Totp;

/// Everything connections share: configuration, keys, the current policy and the
/// database.
pub struct State {
    pub config: Config,
    pub keys: KeySet,
    /// The policy in force; connections subscribe to re-check their identity at
    /// every reload.
    policy: watch::Sender<Arc<Policy>>,
    pub store: Arc<Store>,
    pub grants: Grants,
    pub recorder: Arc<Recorder>,
    /// What sessions may hold in memory beyond their own allowances
    /// (`[limits] relay_memory`), shared by relay pipes and recordings.
    pub memory: Arc<Budget>,
    pub totp: Totp,
    /// Where the bastion is in its life; sessions watch it to end gracefully.
    pub phase: watch::Sender<Phase>,
    /// Proxied sessions running now.
    pub live_sessions: watch::Sender<usize>,
    /// Authenticated connections per user (`[limits] connections_per_user`).
    pub user_connections: Arc<PerUser>,
    /// Proxied sessions per user (`[limits] sessions_per_user`).
    pub user_sessions: Arc<PerUser>,
    pub metrics: Metrics,
    /// This node among the bastions sharing the database.
    pub cluster: Cluster,
}

/// The bastion's life cycle, as sessions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// SIGTERM received: no new connections; live sessions were told and may finish.
    Draining,
    /// The grace period is over: remaining sessions are closed now.
    Closing,
}

/// Counts a proxied session for graceful shutdown while it lives.
pub struct LiveSession<'a>(&'a watch::Sender<usize>);

impl<'a> LiveSession<'a> {
    pub fn new(counter: &'a watch::Sender<usize>) -> LiveSession<'a> {
        counter.send_modify(|n| *n += 1);
        LiveSession(counter)
    }
}

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl State {
    pub fn new(
        config: Config,
        keys: KeySet,
        policy: Policy,
        store: Arc<Store>,
        totp: Totp,
        cluster: Cluster,
        clock: Clock,
    ) -> Result<State, StoreError> {
        let notifier = Notifier::new(config.notify.webhook.clone());
        let memory = Budget::new(config.limits.relay_memory);
        Ok(State {
            grants: Grants::new(store.clone(), notifier)?
                .with_limits(config.limits.requests())
                .with_clock(clock),
            recorder: Arc::new(
                Recorder::open(
                    store.clone(),
                    config.record_input,
                    config.record_file_transfers,
                )?
                .with_limits(config.recording, config.data_dir.clone())
                .with_memory(memory.clone())
                .with_node(cluster.node()),
            ),
            memory,
            user_connections: PerUser::new(
                "connections",
                "connections_per_user",
                config.limits.connections_per_user,
            ),
            user_sessions: PerUser::new(
                "sessions",
                "sessions_per_user",
                config.limits.sessions_per_user,
            ),
            config,
            keys,
            policy: watch::channel(Arc::new(policy)).0,
            store,
            totp,
            phase: watch::channel(Phase::Running).0,
            live_sessions: watch::channel(0).0,
            metrics: Metrics::default(),
            cluster,
        })
    }

    /// Appends an audit event durably, on the blocking pool (the append syncs the
    /// store to disk, which must not stall a runtime worker); on failure (logged)
    /// the caller must refuse what the event records. Code that already runs where
    /// blocking is fine appends with `grants.audit`.
    pub async fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.grants.run(move |grants| grants.audit(event)).await
    }

    /// [`State::audit`] for callers that answer a user: the refusal to show when the
    /// event cannot be written.
    pub async fn audit_or_refuse(&self, event: AuditEvent) -> Result<(), String> {
        self.audit(event)
            .await
            .map_err(|err| crate::audit::refused_unaudited(&err))
    }

    /// Runs `work` on tokio's blocking pool: store writes that sync to disk, and
    /// reads of whole histories, must not stall the runtime's worker threads. A
    /// panic in `work` goes on in the caller, as if it had run there.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&State) -> T + Send + 'static,
    ) -> T {
        let state = self.clone();
        match tokio::task::spawn_blocking(move || work(&state)).await {
            Ok(done) => done,
            Err(failed) => std::panic::resume_unwind(failed.into_panic()),
        }
    }

    /// Whether `user` has TOTP enrolled, read on the blocking pool (a round trip
    /// on PostgreSQL would stall the other connections of this shard).
    pub async fn totp_enrolled(self: &Arc<Self>, user: &str) -> Result<bool, StoreError> {
        let user = user.to_string();
        self.blocking(move |state| state.totp.is_enrolled(&user))
            .await
    }

    /// Now, by the grant service's clock: the time grants are filed, decided,
    /// checked and expired at (the wall clock, unless a test runs the bastion on
    /// tokio's paused clock).
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.grants.now()
    }

    /// The policy in force right now; callers keep the `Arc` for one decision.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().clone()
    }

    /// A receiver that wakes at every successful policy reload.
    pub fn policy_changes(&self) -> watch::Receiver<Arc<Policy>> {
        self.policy.subscribe()
    }

    /// Re-reads the policy directory; on error the previous policy stays in force.
    /// Users that the new policy no longer knows lose their grants and TOTP state
    /// (their connections end on their own: see `handler::identity_withdrawn`).
    pub fn reload_policy(&self) -> Result<(), PolicyErrors> {
        let fresh = Arc::new(policy::load_dir(&self.config.policies)?);
        warn_about(&fresh, &self.config.auditors);
        self.policy.send_replace(fresh.clone());
        self.forget_users_not_in(&fresh);
        Ok(())
    }

    /// Withdraws the grants and pending requests of users the policy does not know,
    /// and forgets their TOTP state, with a `user.removed` event each. Runs at every
    /// reload and at start, so a user removed while the bastion was down is removed
    /// all the same. Blocks (grant changes and events sync to disk): the reload
    /// runs on the blocking pool, the start before the bastion serves.
    pub fn forget_users_not_in(&self, policy: &Policy) {
        let now = self.now();
        let mut gone: std::collections::BTreeSet<String> =
            self.grants.requesters().into_iter().collect();
        gone.extend(self.totp.users().unwrap_or_else(|err| {
            tracing::error!(error = %err, "cannot list TOTP users");
            Vec::new()
        }));
        gone.retain(|user| !policy.users.contains_key(user));
        for user in gone {
            let ended = self
                .grants
                .withdraw_all_of(&user, "user removed from the policy", now);
            if let Err(err) = self.totp.forget(&user) {
                tracing::error!(%user, error = %err, "cannot forget the TOTP state of a removed user");
            }
            crate::totp::invite::withdraw(&self.config.data_dir, &user);
            tracing::warn!(%user, grants = ended.len(), "user removed from the policy; grants withdrawn, TOTP forgotten");
            // Taking access away needs no permission; a failed append is logged.
            let _ = self.grants.audit(
                AuditEvent::new(AuditKind::UserRemoved, "portcullis", now)
                    .detail("user", user.as_str())
                    .detail("grants", ended),
            );
        }
    }
}

/// Logs what `portcullis policy check` warns about.
pub fn warn_about(policy: &crate::policy::Policy, auditors: &[String]) {
    for warning in policy.warnings_for(auditors) {
        tracing::warn!("policy: {warning}");
    }
}
