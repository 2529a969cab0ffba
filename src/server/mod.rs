//! The SSH front door: listens, authenticates engineers by public key, and hands each
//! session channel to the control plane or to the proxy.

mod channel;
mod env;
mod gate;
mod handler;
mod per_user;
mod route;
mod upkeep;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use russh::{cipher, kex, mac, Preferred};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::audit::AuditEvent;
use crate::budget::Budget;
use crate::config::Config;
use crate::grant::Grants;
use crate::keys::KeySet;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::policy::{self, Policy, PolicyErrors};
use crate::record::Recorder;
use crate::store::{Store, StoreError};
use crate::totp::Totp;

pub use channel::{
    ChannelContext, ClientChannel, ClientOut, Identity, PtyRequest, SessionSetup, Start, CTRL_C,
    CTRL_D,
};
pub use env::{AcceptEnv, DEFAULT_ACCEPT_ENV};
pub use gate::{Gate, Limits, MaxStartups, Preauth, Prefix, Refusal};
pub use per_user::{PerUser, Slot};
pub use route::{InvalidUsername, Route, CONTROL_USER};

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
    ) -> Result<State, StoreError> {
        let notifier = Notifier::new(config.notify.webhook.clone());
        let memory = Budget::new(config.limits.relay_memory);
        Ok(State {
            grants: Grants::new(store.clone(), notifier)?.with_limits(config.limits.requests()),
            recorder: Arc::new(
                Recorder::new(
                    store.clone(),
                    config.record_input,
                    config.record_file_transfers,
                )
                .with_limits(config.recording, config.data_dir.clone())
                .with_memory(memory.clone()),
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
        })
    }

    /// Appends an audit event durably; on failure (logged) the caller must refuse
    /// what the event records.
    pub fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.grants.audit(event)
    }

    /// [`State::audit`] for callers that answer a user: the refusal to show when the
    /// event cannot be written.
    pub fn audit_or_refuse(&self, event: AuditEvent) -> Result<(), String> {
        self.audit(event)
            .map_err(|err| crate::audit::refused_unaudited(&err))
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
    /// all the same.
    pub fn forget_users_not_in(&self, policy: &Policy) {
        let now = chrono::Utc::now();
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
            let _ = self.audit(
                AuditEvent::new("user.removed", "portcullis", now)
                    .detail("user", user.as_str())
                    .detail("grants", ended),
            );
        }
    }
}

/// Logs what `portcullis policy check` warns about.
fn warn_about(policy: &crate::policy::Policy, auditors: &[String]) {
    for warning in policy.warnings_for(auditors) {
        tracing::warn!("policy: {warning}");
    }
}

/// Tells `portcullis reload` how the policy load numbered `seq` went.
fn report_load(state: &State, seq: u64, result: Result<(), &PolicyErrors>) {
    let policy = state.policy();
    let status = match result {
        Ok(()) => crate::datadir::ReloadStatus {
            pid: std::process::id(),
            seq,
            ok: true,
            summary: format!(
                "{} users, {} targets, {} flows",
                policy.users.len(),
                policy.targets.len(),
                policy.flows.len()
            ),
            warnings: policy.warnings_for(&state.config.auditors),
        },
        Err(errors) => crate::datadir::ReloadStatus {
            pid: std::process::id(),
            seq,
            ok: false,
            summary: errors.to_string(),
            warnings: Vec::new(),
        },
    };
    if let Err(err) = status.write(&state.config.data_dir) {
        tracing::warn!(error = %err, "cannot write the reload status for `portcullis reload`");
    }
}

/// Algorithms offered to clients and targets: post-quantum hybrid key exchange first,
/// AEAD ciphers only. The cipher order only matters where portcullis is the SSH
/// client (towards targets; the client's order wins a negotiation), and there it puts
/// AES-GCM first only when the CPU has AES instructions, ChaCha20-Poly1305 otherwise.
///
/// curve25519 stays behind ML-KEM unless `post_quantum_only`: OpenSSH before 9.9
/// (Debian 12 ships 9.2) has no ML-KEM, and russh has no sntrup761.
///
/// `legacy_clients` (server side only) adds AES-CTR with SHA-2 MACs after the AEAD
/// ciphers, for clients that have nothing else (Paramiko 2.12, libssh2 1.10): a
/// client that has an AEAD cipher still picks it, since its own order wins.
pub fn preferred_algorithms(post_quantum_only: bool, legacy_clients: bool) -> Preferred {
    const WITH_CLASSIC: &[kex::Name] = &[
        kex::MLKEM768X25519_SHA256,
        kex::CURVE25519,
        kex::CURVE25519_PRE_RFC_8731,
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_SUPPORT_AS_CLIENT,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    ];
    const PQ_ONLY: &[kex::Name] = &[
        kex::MLKEM768X25519_SHA256,
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_SUPPORT_AS_CLIENT,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    ];
    const AEAD_AES_FIRST: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
    ];
    const AEAD_CHACHA_FIRST: &[cipher::Name] = &[
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
    ];
    const LEGACY: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ];
    // With AEAD ciphers only, no MAC is ever used; the list is still advertised, and
    // encrypt-then-MAC is the only kind worth advertising. Legacy clients get the
    // plain SHA-2 MACs too (Paramiko 2.12 and libssh2 1.10 have no -etm).
    const ETM: &[mac::Name] = &[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM];
    const LEGACY_MACS: &[mac::Name] = &[
        mac::HMAC_SHA256_ETM,
        mac::HMAC_SHA512_ETM,
        mac::HMAC_SHA256,
        mac::HMAC_SHA512,
    ];
    let cipher: &[cipher::Name] = match (legacy_clients, has_aes_hardware()) {
        (true, _) => LEGACY,
        (false, true) => AEAD_AES_FIRST,
        (false, false) => AEAD_CHACHA_FIRST,
    };
    Preferred {
        kex: std::borrow::Cow::Borrowed(if post_quantum_only {
            PQ_ONLY
        } else {
            WITH_CLASSIC
        }),
        cipher: std::borrow::Cow::Borrowed(cipher),
        mac: std::borrow::Cow::Borrowed(if legacy_clients { LEGACY_MACS } else { ETM }),
        ..Preferred::default()
    }
}

/// The identification string clients see. The comment names OpenSSH because
/// SFTP clients such as asyncssh and libssh choose the argument order of
/// `SSH_FXP_SYMLINK` by looking for "OpenSSH" in it: OpenSSH's sftp-server reads
/// the two paths in the reverse of the draft's order, every other major client
/// (OpenSSH's own, Paramiko, PuTTY) always sends that order, and the bastion makes
/// sure that order is what a target gets (see `proxy::sftp`). OpenSSH itself matches
/// its compatibility table against the start of the string, which stays
/// `portcullis_`.
pub fn server_id() -> String {
    format!(
        "SSH-2.0-portcullis_{} OpenSSH_9.0-compatible",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether AES-GCM runs in hardware here (AES-NI and carry-less multiply on x86,
/// the crypto extension on ARM); without it ChaCha20 is the faster AEAD.
fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Flow-control settings shared by both sides of the relay. Large windows keep bulk
/// copies from stalling on round trips; the per-channel message queue stays at russh's
/// bounded default so a slow reader still makes the writer wait.
pub const WINDOW_SIZE: u32 = 8 * 1024 * 1024;
pub const MAX_PACKET_SIZE: u32 = 32 * 1024;

/// Read buffer in front of every SSH connection, client or target. russh reads a
/// packet with two exact reads (its first block, then the rest); unbuffered, each is
/// a `recv` of its own, plus one more that finds the socket empty. Buffered, one
/// `recv` brings a keystroke's whole packet, or a burst of them. Reads bigger than
/// the buffer (bulk copies) bypass it.
pub const READ_BUFFER: usize = 16 * 1024;

fn russh_config(keys: &KeySet, config: &Config) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(server_id().into()),
        // Keyboard-interactive only ever follows a verified public key (TOTP step-up);
        // the handler enforces that order, this list only advertises.
        methods: russh::MethodSet::from(
            &[
                russh::MethodKind::PublicKey,
                russh::MethodKind::KeyboardInteractive,
            ][..],
        ),
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![keys.host.clone()],
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        preferred: preferred_algorithms(config.post_quantum_only, config.legacy_clients),
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    }
}

/// Runs the bastion until SIGTERM or Ctrl-C.
pub async fn serve(config: Config) -> Result<()> {
    // The policy first: started in the wrong directory, nothing is created there.
    let policy = policy::load_dir(&config.policies).map_err(|errors| {
        anyhow::anyhow!("the policy has errors; fix them and start again:\n{errors}")
    })?;
    crate::datadir::prepare(&config.data_dir)?;
    // One bastion per data directory; held until the process ends.
    let _lock = crate::datadir::Lock::acquire(&config.data_dir)?;
    let keys = KeySet::load_or_create(&config)?;
    warn_about(&policy, &config.auditors);
    if crate::init::is_shipped_example(&config.policies) {
        tracing::warn!(
            "the policies in {} are the examples shipped with portcullis, with placeholder keys: nobody can log in. `portcullis init` writes a working set for this machine; then run `portcullis reload`",
            config.policies.display()
        );
    }
    let store =
        Arc::new(Store::open(&config.data_dir).with_context(|| {
            format!("cannot open the database in {}", config.data_dir.display())
        })?);
    let russh_config = Arc::new(russh_config(&keys, &config));
    let (users, targets, flows) = (policy.users.len(), policy.targets.len(), policy.flows.len());
    let totp = Totp::open(&config.data_dir, store.clone())?;
    let state = Arc::new(
        State::new(config, keys, policy, store, totp)
            .context("cannot read the grants from the database")?,
    );
    mark_interrupted_sessions(&state)?;
    state.forget_users_not_in(&state.policy());
    report_load(&state, 0, Ok(()));
    tokio::spawn(reload_on_sighup(state.clone()));
    tokio::spawn(expire_grants(state.clone()));
    tokio::spawn(upkeep::anchor_audit_chain(state.clone()));
    if let Some(retention) = state.config.recordings_retention {
        tokio::spawn(upkeep::prune_recordings(state.clone(), retention));
    }
    if let Some(listen) = state.config.metrics_listen {
        crate::metrics::serve(listen, state.clone())?;
    }
    // The SSH port opens last: once it accepts, everything behind it is ready.
    let listen = state.config.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        users,
        targets,
        flows,
        "portcullis listening"
    );
    let gate = Gate::new(state.config.limits.clone());
    tokio::select! {
        _ = accept(listener, state.clone(), russh_config, gate) => {}
        _ = termination() => {}
        failure = upkeep::watch_disk(state.clone()) => {
            // Live sessions could not be recorded any more: nothing to drain.
            tracing::error!(reason = %failure, "exiting so that the service manager restarts portcullis with the database reopened");
            anyhow::bail!("{failure}");
        }
    }
    drain(&state).await;
    state.store.flush().context("cannot flush the database")?;
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections, refusing at the door penalised sources and, under a flood,
/// a random share of new ones; the rest wait in `drive` for a pre-auth slot.
async fn accept(
    listener: TcpListener,
    state: Arc<State>,
    config: Arc<russh::server::Config>,
    gate: Arc<Gate>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off, do not spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match gate.admit(peer.ip(), std::time::Instant::now()) {
            Ok(preauth) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handler::drive(
                    state.clone(),
                    config.clone(),
                    gate.clone(),
                    stream,
                    peer,
                    preauth,
                ));
            }
            Err(refusal) => {
                tracing::debug!(%peer, ?refusal, "connection refused at the door");
                // sshd's words, then close: best effort, never waiting for the peer.
                let _ = stream.try_write(refusal.message());
            }
        }
    }
}

/// Graceful shutdown: tell live sessions, let them finish within `shutdown_grace`,
/// then close the rest (which ends and stores their recordings).
async fn drain(state: &State) {
    let live = *state.live_sessions.borrow();
    let grace = state.config.shutdown_grace;
    tracing::info!(live_sessions = live, grace = ?grace, "shutting down: no new connections");
    // Stopping is not refused for want of an event; a failed append is logged.
    let _ = state.audit(
        AuditEvent::new("bastion.shutdown", "portcullis", chrono::Utc::now())
            .detail("live_sessions", live),
    );
    state.phase.send_replace(Phase::Draining);
    let mut sessions = state.live_sessions.subscribe();
    let all_done = tokio::time::timeout(grace, sessions.wait_for(|n| *n == 0))
        .await
        .is_ok();
    if !all_done {
        tracing::info!(
            live_sessions = *state.live_sessions.borrow(),
            "grace period over; closing sessions"
        );
        state.phase.send_replace(Phase::Closing);
        let _ = tokio::time::timeout(Duration::from_secs(10), sessions.wait_for(|n| *n == 0)).await;
        // A closed session tells its client why as its very last step (after its
        // recording is sealed); give the connections a moment to put that on the
        // wire before the process exits.
        tokio::time::sleep(LAST_WORDS).await;
    }
}

/// How long a stopping bastion waits, after its last session ended, for the
/// connections to deliver their last messages.
const LAST_WORDS: Duration = Duration::from_millis(300);

async fn termination() {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Sessions that were live when the bastion last stopped can no longer end cleanly:
/// mark them `interrupted` (their transcript up to the last flush stays replayable).
fn mark_interrupted_sessions(state: &State) -> Result<()> {
    state
        .recorder
        .recover(|session| {
            tracing::warn!(session = session.id, user = %session.user, target = %session.target, "session was interrupted by a bastion stop; its transcript digest is computed now, unsealed");
            state.audit(
                AuditEvent::new("session.interrupted", "portcullis", chrono::Utc::now())
                    .target(&session.target)
                    .grant(&session.grant)
                    .detail("session", session.id)
                    .detail("user", session.user.as_str())
                    .detail("transcript_sha256", session.digest.clone())
                    .detail(
                        "digest_source",
                        session.digest_source.map(|s| s.as_str()),
                    ),
            )
        })
        .context("cannot recover the recordings of interrupted sessions")?;
    Ok(())
}

/// Expires pending requests and grants whose time is up, once a second. (Live
/// sessions do not wait for this: each watches its own grant's deadline.)
async fn expire_grants(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = chrono::Utc::now();
        if let Err(err) = state.grants.run(move |grants| grants.sweep(now)).await {
            tracing::error!(error = %err, "cannot expire grants");
        }
    }
}

async fn reload_on_sighup(state: Arc<State>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install SIGHUP handler; policy reload disabled");
        return;
    };
    let mut seq = 0;
    while hup.recv().await.is_some() {
        let now = chrono::Utc::now();
        seq += 1;
        match state.reload_policy() {
            Ok(()) => {
                tracing::info!("policy reloaded");
                // In force already; a failed append is logged.
                let _ = state.audit(AuditEvent::new("policy.reloaded", "portcullis", now));
                report_load(&state, seq, Ok(()));
            }
            Err(errors) => {
                tracing::error!(%errors, "policy reload failed; keeping the previous policy");
                let _ = state.audit(
                    AuditEvent::new("policy.reload_failed", "portcullis", now)
                        .detail("errors", errors.to_string()),
                );
                report_load(&state, seq, Err(&errors));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// asyncssh looks for "OpenSSH" anywhere; libssh for "OpenSSH_" and a version;
    /// OpenSSH matches its compatibility table against the start.
    #[test]
    fn the_identification_names_openssh_only_in_its_comment() {
        let id = server_id();
        let (software, comment) = id.split_once(' ').unwrap();
        assert!(software.starts_with("SSH-2.0-portcullis_"), "{id}");
        assert!(comment.starts_with("OpenSSH_9.0"), "{id}");
        assert!(id.len() <= 253 && id.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    }

    #[test]
    fn legacy_clients_adds_ctr_with_sha2_macs_after_the_aead_ciphers() {
        let strict = preferred_algorithms(false, false);
        assert!(strict
            .cipher
            .iter()
            .all(|c| c.as_ref().contains("gcm") || c.as_ref().contains("chacha")));
        let legacy = preferred_algorithms(false, true);
        let ciphers: Vec<&str> = legacy.cipher.iter().map(|c| c.as_ref()).collect();
        assert_eq!(&ciphers[3..], ["aes256-ctr", "aes128-ctr"]);
        let macs: Vec<&str> = legacy.mac.iter().map(|m| m.as_ref()).collect();
        assert!(macs.contains(&"hmac-sha2-256") && macs.contains(&"hmac-sha2-512-etm@openssh.com"));
    }
}
