//! Per-connection russh handler: authentication, channel admission and request replies.
//!
//! russh delivers every channel event twice: to these callbacks and to the
//! `Channel<Msg>` we hand to the channel task. The callbacks only *reply* (in order,
//! as the protocol requires, since russh keeps one want-reply flag per channel); the
//! channel task does the work from the queue, so events stay ordered with the data.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::watch;

use chrono::Utc;
use russh::keys::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Response, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, MethodKind, MethodSet};

use super::channel::serve_channel;
use super::gate::{Attempts, Ending, Gate, Preauth};
use super::proxy_protocol::{self, HeaderError};
use crate::audit::{AuditEvent, AuditKind};
use crate::policy::fingerprint;
use crate::proxy::UpstreamPool;
use crate::session::{ChannelContext, Identity, Route, State};
use crate::totp::Verdict;

/// Runs one accepted TCP connection: waits for a pre-auth slot, then the SSH
/// handshake within `handshake_timeout` and authentication within the login grace
/// (both counted from the connect), then the session until either side ends it. A
/// connection that ends unauthenticated is charged to its source (see `gate`).
pub async fn drive(
    state: Arc<State>,
    config: Arc<russh::server::Config>,
    gate: Arc<Gate>,
    mut stream: TcpStream,
    mut peer: SocketAddr,
    mut preauth: Preauth,
) {
    let limits = gate.limits();
    let deadline = tokio::time::Instant::now() + limits.login_grace;
    if preauth.relayed() {
        let Some(client) =
            client_behind_balancer(&state, &gate, &mut stream, peer, &mut preauth, deadline).await
        else {
            return;
        };
        peer = client;
    }
    match tokio::time::timeout_at(deadline, preauth.wait_for_slot()).await {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => {
            // Locked out while it waited.
            say(&stream, refusal.message()).await;
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "closed: no pre-auth slot within the login grace time");
            return;
        }
    }
    let slotted = std::time::Instant::now();
    let handshake_deadline = deadline.min(tokio::time::Instant::now() + limits.handshake_timeout);
    let (identity, authenticated) = watch::channel(None);
    let (kex_done, key_exchanged) = watch::channel(false);
    let attempts = Arc::new(Mutex::new(Attempts::default()));
    let policy_changes = state.policy_changes();
    let connection = Connection {
        state: state.clone(),
        peer: Some(peer),
        identity,
        kex_done,
        awaiting_step_up: None,
        upstream: UpstreamPool::new(state.config.limits.upstream_connections_per_client),
        gate: gate.clone(),
        preauth: Some(preauth),
        attempts: attempts.clone(),
        open_channels: Arc::new(()),
        user_slot: None,
        refused: None,
    };
    // Until the connection is charged, the client should not see it closed: a
    // client that reconnects at once would otherwise pass the door before its
    // penalty lands. A second descriptor of the socket keeps it open (no FIN)
    // when the stream is dropped: a handshake that timed out or failed. (Where
    // russh ends the session itself, after too many authentication attempts,
    // it shuts the socket down first; the charge follows a moment later.) The
    // descriptor goes once the user authenticated, or once the ending is charged.
    let mut held_open = stream.as_fd().try_clone_to_owned().ok();
    let mut signed_in = authenticated.clone();
    let running = run(
        &state,
        config,
        stream,
        peer,
        connection,
        (handshake_deadline, key_exchanged),
        (deadline, authenticated.clone()),
        policy_changes,
    );
    tokio::pin!(running);
    let mut watching = true;
    let ending = loop {
        tokio::select! {
            ending = &mut running => break ending,
            changed = signed_in.changed(), if watching => match changed {
                Ok(()) if signed_in.borrow().is_some() => {
                    held_open = None;
                    watching = false;
                }
                Ok(()) => {}
                // The connection is gone; its ending is charged below.
                Err(_) => watching = false,
            },
        }
    };
    if authenticated.borrow().is_some() {
        return;
    }
    if ending == Ending::Silent && slotted.elapsed() < PROBE_GRACE {
        // A port probe or TCP health check: it cost no key exchange.
        return;
    }
    let attempts = std::mem::take(&mut *attempts.lock().expect("attempts lock poisoned"));
    charge(&state, &gate, peer.ip(), ending, &attempts).await;
    drop(held_open);
}

/// How long a refusal waits for a socket that has just moved to this runtime to
/// be seen writable (its first readiness event): never for the peer, whose
/// receive buffer is not involved.
const REFUSAL_WRITE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Writes a refusal (sshd's words) on a connection about to be closed, best
/// effort: `try_write` alone fails on a socket whose first readiness event this
/// runtime has not seen yet.
async fn say(stream: &TcpStream, message: &[u8]) {
    if tokio::time::timeout(REFUSAL_WRITE_WAIT, stream.writable())
        .await
        .is_ok()
    {
        let _ = stream.try_write(message);
    }
}

/// Charges a connection from `ip` that ended unauthenticated, and audits the
/// lockouts that starts.
async fn charge(state: &State, gate: &Gate, ip: IpAddr, ending: Ending, attempts: &Attempts) {
    for lockout in gate.charge(ip, ending, attempts, std::time::Instant::now()) {
        let key = lockout.key.as_deref().unwrap_or("any");
        tracing::warn!(source = %ip, key, seconds = lockout.duration.as_secs(), ?ending, "penalty threshold reached; locked out");
        let _ = state
            .audit(
                AuditEvent::new(AuditKind::PreauthLockout, "portcullis", Utc::now())
                    .detail("source", ip.to_string())
                    .detail("key", key)
                    .detail("seconds", lockout.duration.as_secs()),
            )
            .await;
    }
}

/// For a connection from a load balancer in `proxy_protocol_from`: reads its PROXY
/// header (within the handshake timeout and the login grace) and returns the
/// client it names, now the connection's address for the gate and everything
/// after. Without a valid header the connection is closed, logged and charged to
/// the balancer's own address like any pre-auth failure (a TCP health check that
/// closes at once costs nothing); `None` then.
async fn client_behind_balancer(
    state: &State,
    gate: &Gate,
    stream: &mut TcpStream,
    balancer: SocketAddr,
    preauth: &mut Preauth,
    deadline: tokio::time::Instant,
) -> Option<SocketAddr> {
    let started = std::time::Instant::now();
    let by = deadline.min(tokio::time::Instant::now() + gate.limits().handshake_timeout);
    let read = proxy_protocol::read_client_address(stream, balancer);
    let (ending, why) = match tokio::time::timeout_at(by, read).await {
        Ok(Ok(client)) => {
            if let Err(refusal) = preauth.readdress(client.ip(), std::time::Instant::now()) {
                tracing::debug!(%balancer, %client, ?refusal, "connection refused at the door");
                say(stream, refusal.message()).await;
                return None;
            }
            tracing::debug!(%balancer, %client, "client address from the PROXY header");
            return Some(client);
        }
        Ok(Err(HeaderError::Silent)) if started.elapsed() < PROBE_GRACE => return None,
        Ok(Err(error)) => (header_ending(&error), error.to_string()),
        Err(_) => (
            Ending::TimedOut,
            format!(
                "no PROXY header within {:?} (limits.handshake_timeout)",
                gate.limits().handshake_timeout
            ),
        ),
    };
    tracing::warn!(%balancer, "closed: a connection from a load balancer in proxy_protocol_from came without a valid PROXY header: {why}; the balancer must send one (HAProxy: `send-proxy-v2` on the server line), and clients must connect through it");
    charge(state, gate, balancer.ip(), ending, &Attempts::default()).await;
    None
}

/// How a balancer's connection without a valid header is charged: like an SSH
/// connection that closed, or sent something that is not SSH.
fn header_ending(error: &HeaderError) -> Ending {
    match error {
        HeaderError::Silent => Ending::Silent,
        HeaderError::Truncated | HeaderError::Io(_) => Ending::Closed,
        HeaderError::TooLong(_) | HeaderError::Invalid(_) => Ending::ProtocolError,
    }
}

/// How long a connection may hold a slot and close without a word, free of penalty.
const PROBE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The SSH connection itself; returns how it ended, for the penalty of a
/// connection that never authenticated.
#[allow(clippy::too_many_arguments)]
async fn run(
    state: &State,
    config: Arc<russh::server::Config>,
    stream: TcpStream,
    peer: SocketAddr,
    connection: Connection,
    (handshake_deadline, key_exchanged): (tokio::time::Instant, watch::Receiver<bool>),
    (deadline, authenticated): (tokio::time::Instant, watch::Receiver<Option<Arc<Identity>>>),
    policy_changes: watch::Receiver<Arc<crate::policy::Policy>>,
) -> Ending {
    let started = tokio::time::timeout_at(
        handshake_deadline,
        russh::server::run_stream(
            config,
            BufReader::with_capacity(crate::session::READ_BUFFER, stream),
            connection,
        ),
    )
    .await;
    let running = match started {
        Ok(Ok(running)) => running,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "SSH handshake failed");
            return match ending_of(&error) {
                Ending::Closed => Ending::Silent,
                protocol_error => protocol_error,
            };
        }
        Err(_) => {
            tracing::info!(%peer, "closed: no SSH version exchange within the handshake timeout");
            return Ending::TimedOut;
        }
    };
    let handle = running.handle();
    let handshake_over = async {
        tokio::time::sleep_until(handshake_deadline).await;
        if *key_exchanged.borrow() {
            std::future::pending::<()>().await;
        }
    };
    let grace_over = async {
        tokio::time::sleep_until(deadline).await;
        if authenticated.borrow().is_some() {
            std::future::pending::<()>().await;
        }
    };
    let withdrawn = identity_withdrawn(authenticated.clone(), policy_changes);
    let (why, log) = tokio::select! {
        result = running => {
            return match result {
                Err(error) => {
                    match no_common_algorithm(&error, state.config.legacy_clients) {
                        // Info, not a warning: anyone can make one per connection.
                        Some(why) => tracing::info!(%peer, "refused a client: {why}"),
                        None => tracing::debug!(%peer, %error, "connection ended with an error"),
                    }
                    ending_of(&error)
                }
                Ok(()) => Ending::Closed,
            };
        }
        (identity, why) = withdrawn => {
            tracing::warn!(%peer, user = %identity.user, reason = %why, "identity withdrawn; connection closed");
            let _ = state
                .audit(
                    AuditEvent::new(AuditKind::AuthWithdrawn, &identity.user, Utc::now())
                        .detail("key", fingerprint(&identity.key))
                        .detail("client", peer.to_string())
                        .detail("reason", why.as_str()),
                )
                .await;
            (format!("portcullis: {why}; connection closed"), None)
        }
        _ = handshake_over => {
            ("key exchange took too long".to_string(), Some("closed: no key exchange within the handshake timeout"))
        }
        _ = grace_over => {
            ("authentication took too long".to_string(), Some("closed: not authenticated within the login grace time"))
        }
    };
    if let Some(log) = log {
        tracing::info!(%peer, "{log}");
    }
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, why, String::new())
        .await;
    if log.is_some() {
        Ending::TimedOut
    } else {
        Ending::Closed
    }
}

/// For a client that shares no algorithm with the bastion, what it lacked and
/// what to do about it: a cipher or MAC is what `legacy_clients` adds. The client's
/// list is its own text, so it is escaped and shortened.
fn no_common_algorithm(error: &russh::Error, legacy_clients: bool) -> Option<String> {
    let russh::Error::NoCommonAlgo { kind, theirs, .. } = error else {
        return None;
    };
    let offered = theirs.join(",");
    let offered =
        crate::display::escape(&offered.chars().take(300).collect::<String>()).into_owned();
    let what = format!("{kind:?}").to_lowercase();
    let hint = match kind {
        russh::AlgorithmKind::Cipher | russh::AlgorithmKind::Mac if !legacy_clients => {
            "; set `legacy_clients = true` in portcullis.toml to also offer AES-CTR with SHA-2 MACs (Paramiko 2.12, libssh2 1.10, curl)"
        }
        _ => "",
    };
    Some(format!(
        "no common {what} algorithm (the client offers {offered}){hint}"
    ))
}

/// Malformed input is a protocol error; a client that goes away, or cannot agree on
/// algorithms (an old client, not an attack), merely closed.
fn ending_of(error: &russh::Error) -> Ending {
    use russh::Error as E;
    match error {
        E::Version
        | E::KexInit
        | E::Kex
        | E::PacketAuth
        | E::PacketSize(_)
        | E::DecryptionError
        | E::Inconsistent
        | E::StrictKeyExchangeViolation { .. }
        | E::SshEncoding(_)
        | E::Utf8(_) => Ending::ProtocolError,
        _ => Ending::Closed,
    }
}

/// Resolves when the connection's identity stops holding under the policy (a key
/// removed or rotated, a user removed), re-checked when the connection
/// authenticates and at every policy reload. Closing the connection ends its live
/// sessions, so a ControlMaster cannot outlive its key.
async fn identity_withdrawn(
    mut authenticated: watch::Receiver<Option<Arc<Identity>>>,
    mut policy: watch::Receiver<Arc<crate::policy::Policy>>,
) -> (Arc<Identity>, String) {
    loop {
        let current = authenticated.borrow_and_update().clone();
        if let Some(identity) = current {
            let why = identity.withdrawn(&policy.borrow_and_update());
            if let Some(why) = why {
                return (identity, why);
            }
        }
        tokio::select! {
            changed = authenticated.changed() => if changed.is_err() { std::future::pending::<()>().await },
            changed = policy.changed() => if changed.is_err() { std::future::pending::<()>().await },
        }
    }
}

/// A public key verified for `username`, waiting for its TOTP.
struct StepUp {
    username: String,
    user: String,
    key: PublicKey,
}

pub struct Connection {
    state: Arc<State>,
    peer: Option<SocketAddr>,
    /// Set once authentication succeeded; `drive` watches it against the policy.
    identity: watch::Sender<Option<Arc<Identity>>>,
    /// Set once the key exchange is over (the client asked for authentication).
    kex_done: watch::Sender<bool>,
    /// Set when the public key was accepted and a TOTP code is still owed.
    awaiting_step_up: Option<StepUp>,
    /// The upstream SSH connections, shared by this connection's channels.
    upstream: Arc<UpstreamPool>,
    gate: Arc<Gate>,
    /// The pre-authentication slot, released on success.
    preauth: Option<Preauth>,
    /// Keys refused on this connection, charged if it ends unauthenticated.
    attempts: Arc<Mutex<Attempts>>,
    /// One clone per open session channel (its strong count, minus this one, is the
    /// number of channels).
    open_channels: Arc<()>,
    /// This connection's place under `[limits] connections_per_user`.
    user_slot: Option<crate::session::Slot>,
    /// Why every channel of this connection is refused (the user is over a cap).
    refused: Option<String>,
}

impl Connection {
    /// Authentication succeeded: free the pre-auth slot, stop the grace timer.
    async fn authenticated(&mut self, identity: Identity) {
        // Over the user's connection cap, the connection is still let in so that
        // each of its channels can say why it is refused (a bare authentication
        // failure would only read "Permission denied").
        match self.state.user_connections.take(&identity.user) {
            Ok(slot) => self.user_slot = Some(slot),
            Err(why) => {
                tracing::warn!(peer = %self.peer(), user = %identity.user, "refused: {why}");
                let _ = self
                    .state
                    .audit(
                        AuditEvent::new(AuditKind::ConnectionLimited, &identity.user, Utc::now())
                            .detail("client", self.peer())
                            .detail("reason", why.as_str()),
                    )
                    .await;
                self.refused = Some(why);
            }
        }
        self.identity.send_replace(Some(Arc::new(identity)));
        if let Some(mut preauth) = self.preauth.take() {
            preauth.release();
        }
    }

    /// Whether this key is serving a lockout from this address; trying it anyway is
    /// charged to the address.
    fn key_locked_out(&self, key: &PublicKey) -> bool {
        let Some(peer) = self.peer else { return false };
        let fp = fingerprint(key);
        if !self
            .gate
            .locked(peer.ip(), Some(&fp), std::time::Instant::now())
        {
            return false;
        }
        tracing::warn!(peer = %peer, key = %fp, "key refused: locked out from this address");
        self.attempts
            .lock()
            .expect("attempts lock poisoned")
            .retried_locked = true;
        true
    }

    /// Notes a refused key, charged to (address, key) if the connection ends
    /// unauthenticated.
    fn key_failed(&self, key: &PublicKey) {
        let fp = fingerprint(key);
        let mut attempts = self.attempts.lock().expect("attempts lock poisoned");
        if !attempts.failed_keys.contains(&fp) {
            attempts.failed_keys.push(fp);
        }
    }

    fn known_user(&self, key: &PublicKey) -> Option<String> {
        self.state
            .policy()
            .user_by_key(key)
            .map(|user| user.name.clone())
    }

    /// Whether the username routes to a target whose flow requires TOTP step-up.
    fn needs_step_up(&self, username: &str) -> bool {
        let Ok(Route::Target { target, .. }) = Route::parse(username) else {
            return false;
        };
        let policy = self.state.policy();
        policy
            .targets
            .get(&target)
            .and_then(|t| policy.flow_for(t))
            .is_some_and(|flow| flow.step_up_totp)
    }

    /// Whether `user` has TOTP enrolled (yes when it cannot be read: then the
    /// step-up fails closed). On the blocking pool: a round trip on PostgreSQL.
    async fn enrolled(&self, user: &str) -> bool {
        self.state.totp_enrolled(user).await.unwrap_or(true)
    }

    /// The keyboard-interactive question; when the user is locked out, the
    /// instructions say so (any answer is then refused).
    async fn step_up_prompt(&self, user: &str, now: chrono::DateTime<Utc>) -> Auth {
        let owner = user.to_string();
        let status = (self.state)
            .blocking(move |state| state.totp.status(&owner, now))
            .await;
        let instructions = match status {
            Ok(status) => status
                .locked_until
                .map(|until| Verdict::Locked { until }.explain(user))
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        Auth::Partial {
            name: "portcullis step-up".into(),
            instructions: instructions.into(),
            prompts: vec![(format!("TOTP code for {user}: ").into(), false)].into(),
        }
    }

    async fn audit_step_up(
        &self,
        user: &str,
        username: &str,
        verdict: &Verdict,
        now: chrono::DateTime<Utc>,
    ) {
        let username: String = username.chars().take(128).collect();
        let (result, locked) = crate::session::channel::step_up_events(user, verdict, now);
        // Refusing a step-up for want of its event would not help: the session it
        // is for needs its own `session.start`, which fails the same way.
        let result = result
            .detail("client", self.peer())
            .detail("username", username);
        let _ = self.state.audit(result).await;
        if let Some(locked) = locked {
            let locked = locked
                .detail("client", self.peer())
                .detail("minutes", crate::totp::LOCKOUT_SECS / 60);
            let _ = self.state.audit(locked).await;
        }
    }

    /// Records an authentication outcome with the key's fingerprint and the client's
    /// address.
    async fn audit_auth(&self, kind: AuditKind, user: &str, key: &PublicKey, username: &str) {
        let username: String = username.chars().take(128).collect();
        // Best effort: every action after authentication (a session, a request, a
        // decision) needs its own event and is refused when that cannot be written.
        let _ = self
            .state
            .audit(
                AuditEvent::new(kind, user, chrono::Utc::now())
                    .detail("key", fingerprint(key))
                    .detail("client", self.peer())
                    .detail("username", username),
            )
            .await;
    }

    fn peer(&self) -> String {
        self.peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into())
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        // The client asks for authentication only once the key exchange is over.
        self.kex_done.send_replace(true);
        Ok(None)
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Telling the client early that a key is unknown saves it a signature.
        if self.key_locked_out(offer.public_key) {
            return Ok(Auth::reject());
        }
        Ok(match self.known_user(offer.public_key) {
            Some(_) => Auth::Accept,
            None => {
                // OpenSSH offers each key before signing with it, so this is where an
                // unknown key is refused: one console line, as for every refusal.
                tracing::warn!(peer = %self.peer(), key = %fingerprint(offer.public_key), username = %crate::display::escape(user), "authentication refused: key not in users.toml");
                self.key_failed(offer.public_key);
                self.state.metrics.auth_failures.inc();
                self.audit_auth(AuditKind::AuthFailure, "-", offer.public_key, user)
                    .await;
                Auth::reject()
            }
        })
    }

    async fn auth_publickey(
        &mut self,
        username: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fp = fingerprint(key.public_key);
        if self.key_locked_out(key.public_key) {
            return Ok(Auth::reject());
        }
        let Some(user) = self.known_user(key.public_key) else {
            tracing::warn!(peer = %self.peer(), key = %fp, username = %crate::display::escape(username), "authentication refused: key not in users.toml");
            self.key_failed(key.public_key);
            self.state.metrics.auth_failures.inc();
            self.audit_auth(AuditKind::AuthFailure, "-", key.public_key, username)
                .await;
            return Ok(Auth::reject());
        };
        if self.needs_step_up(username) && self.enrolled(&user).await {
            tracing::info!(peer = %self.peer(), %user, key = %fp, username, "public key accepted; TOTP step-up required");
            self.audit_auth(AuditKind::AuthPublickey, &user, key.public_key, username)
                .await;
            self.awaiting_step_up = Some(StepUp {
                username: username.to_string(),
                user,
                key: key.public_key.clone(),
            });
            return Ok(Auth::Reject {
                proceed_with_methods: Some(MethodSet::from(&[MethodKind::KeyboardInteractive][..])),
                partial_success: true,
            });
        }
        tracing::info!(peer = %self.peer(), %user, key = %fp, username, "authenticated");
        self.audit_auth(AuditKind::AuthSuccess, &user, key.public_key, username)
            .await;
        let identity = Identity::new(
            user,
            key.public_key.clone(),
            Route::parse(username),
            self.peer,
            None,
        );
        self.authenticated(identity).await;
        Ok(Auth::Accept)
    }

    /// The TOTP step-up, only ever after this connection verified a public key for
    /// the same username (russh hands us any method the client names, in any order).
    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        username: &str,
        _submethods: &str,
        response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(step_up) = self
            .awaiting_step_up
            .as_ref()
            .filter(|s| s.username == username)
        else {
            return Ok(Auth::reject());
        };
        let (user, key) = (step_up.user.clone(), step_up.key.clone());
        let now = Utc::now();
        let Some(mut response) = response else {
            return Ok(self.step_up_prompt(&user, now).await);
        };
        let code = response
            .next()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        // The check syncs the consumed step to disk: on the blocking pool.
        let checked = user.clone();
        let verified = self
            .state
            .blocking(move |state| state.totp.verify(&checked, &code, now))
            .await;
        let verdict = match verified {
            Ok(verdict) => verdict,
            Err(err) => {
                tracing::error!(%user, error = %err, "cannot check TOTP");
                return Ok(Auth::reject());
            }
        };
        self.audit_step_up(&user, username, &verdict, now).await;
        if verdict != Verdict::Accepted {
            // The TOTP lockout (per user) deals with wrong codes; the gate charges
            // the connection as unauthenticated.
            self.state.metrics.auth_failures.inc();
            tracing::warn!(peer = %self.peer(), %user, username, result = %verdict.explain(&user), "TOTP step-up failed");
            return Ok(Auth::Reject {
                proceed_with_methods: Some(MethodSet::from(&[MethodKind::KeyboardInteractive][..])),
                partial_success: false,
            });
        }
        tracing::info!(peer = %self.peer(), %user, username, "authenticated with TOTP step-up");
        self.awaiting_step_up = None;
        let identity = Identity::new(user, key, Route::parse(username), self.peer, Some(now));
        self.authenticated(identity).await;
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(identity) = self.identity.borrow().clone() else {
            return Ok(()); // dropping `reply` refuses the channel
        };
        // A reload may have landed since authentication: the key must still be
        // this user's now, for every new channel.
        if let Some(why) = identity.withdrawn(&self.state.policy()) {
            tracing::warn!(peer = %self.peer(), user = %identity.user, reason = %why, "refused a channel: identity withdrawn");
            return Ok(());
        }
        let limit = self.gate.limits().channels_per_connection;
        if Arc::strong_count(&self.open_channels) > limit {
            tracing::warn!(peer = %self.peer(), limit, "refused a session channel over the per-connection limit");
            return Ok(());
        }
        reply.accept().await;
        let context = ChannelContext {
            refused: self.refused.clone(),
            state: self.state.clone(),
            identity,
            handle: session.handle(),
        };
        let counted = self.open_channels.clone();
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            serve_channel(context, upstream, channel).await;
            drop(counted);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        _reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = %self.peer(), host, port, "refused port forwarding (direct-tcpip)");
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        _reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = %self.peer(), "refused X11 channel");
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        _reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = %self.peer(), socket_path, "refused unix socket forwarding");
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::warn!(peer = %self.peer(), address, port = *port, "refused remote port forwarding");
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::warn!(peer = %self.peer(), socket_path, "refused remote unix socket forwarding");
        Ok(false)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::info!(peer = %self.peer(), "refused agent forwarding");
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::info!(peer = %self.peer(), "refused X11 forwarding");
        session.channel_failure(channel)
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // `accept_env`; `TERM` travels with the pty request.
        if self.state.config.accept_env.allows(name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    // Shell, exec and subsystem are always accepted at the protocol level: a refusal is
    // explained on stderr with a non-zero exit status, which OpenSSH shows to the user,
    // instead of the bare "exec request failed" a protocol failure would produce.
    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
}
