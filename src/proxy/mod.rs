//! Proxied sessions: authorise, connect to the target, replay the client's set-up and
//! relay the channel.

mod admit;
mod ask;
pub mod certificate;
mod pipe;
mod pool;
mod relay;
mod sftp;
mod upstream;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use russh::client;

use chrono::{DateTime, Utc};

use crate::audit::{AuditEvent, AuditKind};
use crate::grant::{Clock, Grant, GrantState, Grants, Permit};
use crate::policy::UpstreamAuth;
use crate::record::{SessionEnd, SessionInfo};
use crate::session::{ChannelContext, ClientChannel, SessionSetup, Start};
use crate::session::{LiveSession, Phase, PtyRequest};
use admit::admit;

pub use pool::{Lease, UpstreamPool};
pub use relay::{Outcome, PendingReply};
pub use upstream::{client_config, connect, Credential, PinnedHostKey, Upstream, UpstreamError};

/// The client configuration towards targets, built once.
fn shared_client_config() -> Arc<client::Config> {
    static CONFIG: OnceLock<Arc<client::Config>> = OnceLock::new();
    CONFIG.get_or_init(|| Arc::new(client_config())).clone()
}

/// Runs one proxied session channel to its end.
///
/// The order is what makes the two promises hold: the grant is watched from before
/// the decision and re-checked after the (slow) target connect and again right
/// before the first byte is relayed, so a revocation that lands during set-up
/// never lets a session run; and the recording starts before the target is asked to
/// start anything, so nothing runs on a target unrecorded.
pub async fn run(
    context: &ChannelContext,
    upstream: &Arc<UpstreamPool>,
    mut client: ClientChannel,
    mut setup: SessionSetup,
    start: Start,
    target: &str,
    login: Option<&str>,
) {
    let user = context.identity.user.as_str();
    let _place = match context.state.user_sessions.take(user) {
        Ok(slot) => slot,
        Err(why) => {
            tracing::warn!(user, target, "refused: {why}");
            client.out.fail(&why, 1).await;
            return;
        }
    };
    let Some(permit) = admit(context, &mut client, &mut setup, &start, target, login).await else {
        return;
    };
    // Watched from here, before every later check of the grant, so no change is missed.
    let id = permit.grant.id.clone();
    let watched = (context.state)
        .blocking(move |state| state.grants.watch(&id))
        .await;
    let grant_changes = match watched {
        Ok(changes) => changes,
        Err(err) => {
            client.out.fail(&err.to_string(), 1).await;
            return;
        }
    };
    // From here on, "what runs" is the canonical command wherever there is one: sent
    // to the target, pinned in the certificate, audited and recorded.
    let start = match &permit.command {
        Some(canonical) => Start::Exec(canonical.clone().into_bytes()),
        None => start,
    };
    // A session that may run only granted commands gets a closed environment: no
    // list of the variables that make a program run another is ever complete
    // (`config::accept_env`).
    if !permit.grant.scope.shell {
        let accept_env = &context.state.config.accept_env;
        setup
            .env
            .retain(|(name, _)| accept_env.allows_for_commands(name));
    }
    // Before an id is taken or the target is reached: a session that could not be
    // recorded to its end (disk nearly full, quota used up, store failed) never starts.
    if let Err(refusal) = context.state.recorder.room_for(user) {
        tracing::warn!(user, target, reason = %refusal, "session refused");
        // Refused either way; a failed append is logged.
        let _ = context
            .state
            .audit(
                AuditEvent::new(AuditKind::SessionRefused, user, Utc::now())
                    .target(target)
                    .grant(&permit.grant.id)
                    .detail("reason", refusal.as_str()),
            )
            .await;
        client.out.fail(&refusal, 1).await;
        return;
    }
    let failed = AuditEvent::new(AuditKind::SessionFailed, user, Utc::now())
        .target(target)
        .grant(&permit.grant.id);
    let reserved = (context.state)
        .blocking(move |state| state.recorder.reserve(failed))
        .await;
    let reservation = match reserved {
        Ok(reservation) => reservation,
        Err(err) => {
            client
                .out
                .fail(&format!("this session cannot be recorded ({err}); portcullis never proxies unrecorded sessions"), 1)
                .await;
            return;
        }
    };
    let session = reservation.id();
    let opened = match open_target_channel(context, upstream, &permit, &start, session).await {
        Ok(opened) => opened,
        Err(err) => {
            tracing::warn!(user, target, error = %err, "cannot open target session");
            reservation.fail(&err.to_string()).await;
            client.out.fail(&err.to_string(), 1).await;
            return;
        }
    };
    let grant = &permit.grant;
    if let Some(ended) = no_longer_allowed(context, grant).await {
        let _ = opened.channel.close().await;
        reservation.fail(&ended).await;
        client.out.fail(&ended, 1).await;
        return;
    }
    let TargetChannel {
        channel,
        connection: _connection,
        certificate,
        symlink_guard,
    } = opened;
    let pty = setup.pty.clone();
    let info = session_info(context, &permit, &start, pty.as_ref(), certificate);
    let (kind, command) = (info.kind.clone(), info.command.clone());
    let started = (context.state)
        .blocking(move |state| state.recorder.start(reservation, info))
        .await;
    let recording = match started {
        Ok(recording) => recording,
        Err(err) => {
            tracing::error!(user, target, error = %err, "cannot start the recording; session refused");
            let _ = channel.close().await;
            client
                .out
                .fail(&format!("this session cannot be recorded ({err}); portcullis never proxies unrecorded sessions"), 1)
                .await;
            return;
        }
    };
    tracing::info!(user, target, login = %permit.login, grant = %grant.id, session, action = %start.action().describe(), "session started");
    // Everything the record says about the start, so `audit verify` can hold the
    // record to it; its time is the record's `started_at`.
    let started = context
        .state
        .audit(
            AuditEvent::new(AuditKind::SessionStart, user, recording.started_at())
                .target(target)
                .grant(&grant.id)
                .detail("session", session)
                .detail("login", permit.login.as_str())
                .detail("kind", kind)
                .detail("command", command)
                .detail("action", start.action().describe())
                .detail("client", peer(context)),
        )
        .await;
    if let Err(err) = started {
        // Nothing has run on the target yet, and nothing will without its event.
        recording
            .finish(SessionEnd::default(), |_, _| async {})
            .await;
        let _ = channel.close().await;
        client
            .out
            .fail(&crate::audit::refused_unaudited(&err), 1)
            .await;
        return;
    }
    let _live = LiveSession::new(&context.state.live_sessions);
    context.state.metrics.sessions_total.inc();
    // The last check before anything runs on the target, and one right after: a
    // revocation or a withdrawn key that lands while the target starts the command
    // ends it before the first byte is relayed.
    let refused = match no_longer_allowed(context, grant).await {
        Some(ended) => Err(ended),
        None => match start_remote_session(&channel, setup, &start).await {
            Ok(pending) => match no_longer_allowed(context, grant).await {
                None => Ok(pending),
                Some(ended) => Err(ended),
            },
            Err(err) => Err(format!("target '{target}' closed the session: {err}")),
        },
    };
    let pending = match refused {
        Ok(pending) => pending,
        Err(message) => {
            relay::stop_remote(&channel).await;
            client.out.fail(&message, 1).await;
            end_session(context, &permit, session, recording, &Outcome::default()).await;
            return;
        }
    };
    let channel_id = client.out.writer.id();
    let (symlink_guard, symlink_refused) = match symlink_guard {
        Some((guard, refused)) => (Some(guard), Some(refused)),
        None => (None, None),
    };
    let stop = async {
        tokio::select! {
            message = sftp::refused(symlink_refused) => message,
            message = grant_ends(grant, grant_changes, context.state.grants.clock()) => message,
            message = bastion_stops(context, channel_id) => message,
            reason = recording.failed() => format!("{reason} — session closed; portcullis never proxies unrecorded sessions"),
        }
    };
    let bounds = relay::Bounds {
        idle_window: context.state.config.limits.idle_window_timeout,
        memory: &context.state.memory,
    };
    let (outcome, out, stopped) = relay::relay(
        client,
        channel,
        pending,
        &recording,
        stop,
        bounds,
        symlink_guard,
    )
    .await;
    end_session(context, &permit, session, recording, &outcome).await;
    if let Some(message) = stopped {
        tracing::info!(user, target, session, reason = %message, "session closed by the bastion");
        relay::tell(&out, &message).await;
        let _ = out.writer.exit_status(relay::ENDED_BY_BASTION).await;
    }
    out.close().await;
}

/// Logs, counts, seals the recording of and audits the end of a session.
async fn end_session(
    context: &ChannelContext,
    permit: &Permit,
    session: u64,
    recording: crate::record::SessionRecorder,
    outcome: &Outcome,
) {
    let user = context.identity.user.as_str();
    let (target, grant) = (permit.target.name.as_str(), &permit.grant);
    tracing::info!(
        user,
        target,
        grant = %grant.id,
        session,
        exit_status = ?outcome.exit_status,
        exit_signal = ?outcome.exit_signal,
        bytes_in = outcome.bytes_to_target,
        bytes_out = outcome.bytes_from_target,
        "session ended"
    );
    let metrics = &context.state.metrics;
    metrics.bytes_to_targets.inc_by(outcome.bytes_to_target);
    metrics.bytes_from_targets.inc_by(outcome.bytes_from_target);
    let end = SessionEnd {
        exit_status: outcome.exit_status,
        exit_signal: outcome.exit_signal.clone(),
        bytes_in: outcome.bytes_to_target,
        bytes_out: outcome.bytes_from_target,
    };
    let event = AuditEvent::new(AuditKind::SessionEnd, user, Utc::now())
        .target(target)
        .grant(&grant.id)
        .detail("session", session)
        .detail("exit_status", outcome.exit_status)
        .detail("exit_signal", outcome.exit_signal.clone())
        .detail("bytes_in", outcome.bytes_to_target)
        .detail("bytes_out", outcome.bytes_from_target);
    let (_, error) = recording
        .finish(end, |record, error| {
            let mut event = event.detail("transcript_sha256", record.digest.clone());
            if let Some(error) = error {
                event = event.detail("recording_error", error);
            }
            // The session is over; a failed append is logged, and the store's
            // failure restarts the bastion (see `server::upkeep`).
            async move {
                let _ = context.state.audit(event).await;
            }
        })
        .await;
    if let Some(error) = error {
        tracing::error!(session, %error, "the recording ended with an error");
    }
}

/// What the recorder stores about a starting session.
fn session_info(
    context: &ChannelContext,
    permit: &Permit,
    start: &Start,
    pty: Option<&PtyRequest>,
    certificate: Option<String>,
) -> SessionInfo {
    let (kind, command) = match start {
        Start::Shell => ("shell", None),
        Start::Exec(command) => ("exec", Some(String::from_utf8_lossy(command).into_owned())),
        Start::Subsystem(name) => ("subsystem", Some(name.clone())),
    };
    SessionInfo {
        certificate,
        user: context.identity.user.clone(),
        target: permit.target.name.clone(),
        login: permit.login.clone(),
        grant: permit.grant.id.clone(),
        client: peer(context),
        kind: kind.to_string(),
        command,
        term: pty.map(|p| p.term.clone()),
        cols: pty.map_or(80, |p| p.cols),
        rows: pty.map_or(24, |p| p.rows),
        file_transfer: permit.file_transfer,
    }
}

/// Resolves when the bastion closes this session during shutdown; when the grace
/// period starts, the user is told right away that the session will be closed.
async fn bastion_stops(context: &ChannelContext, channel: russh::ChannelId) -> String {
    let mut phase = context.state.phase.subscribe();
    if phase.wait_for(|p| *p != Phase::Running).await.is_err() {
        std::future::pending::<()>().await;
    }
    let grace = context.state.config.shutdown_grace;
    let notice = format!(
        "\r\nportcullis: the bastion is shutting down; this session will be closed within {}s\r\n",
        grace.as_secs()
    );
    let _ = context
        .handle
        .extended_data(channel, 1, notice.into_bytes())
        .await;
    if phase.wait_for(|p| *p == Phase::Closing).await.is_err() {
        std::future::pending::<()>().await;
    }
    "the bastion is shutting down — session closed".to_string()
}

fn peer(context: &ChannelContext) -> String {
    context
        .identity
        .peer
        .map(|p| p.to_string())
        .unwrap_or_default()
}

/// Why this session may not go on, if it may not: its grant ended, or the key its
/// connection authenticated with was withdrawn (the connection is being closed, but
/// a channel task may be in the middle of set-up).
async fn no_longer_allowed(context: &ChannelContext, grant: &Grant) -> Option<String> {
    if let Some(why) = context.identity.withdrawn(&context.state.policy()) {
        return Some(format!("{why} — session closed"));
    }
    // On the blocking pool: on PostgreSQL the read is a round trip, which would
    // stall the other connections of this shard.
    let grant = grant.clone();
    (context.state)
        .blocking(move |state| grant_ended(&state.grants, &grant))
        .await
}

/// Why the grant no longer allows its sessions, if it does not: re-read from the
/// grants service, so a revocation or expiry decided a moment ago counts.
fn grant_ended(grants: &Grants, grant: &Grant) -> Option<String> {
    let Ok(current) = grants.get(&grant.id) else {
        return Some(format!(
            "grant {} can no longer be read — session closed",
            grant.id
        ));
    };
    ending(&current, grants.now())
}

/// Why `current` (the grant as it is now) no longer allows its sessions at `now`,
/// if it does not.
fn ending(current: &Grant, now: DateTime<Utc>) -> Option<String> {
    if current.state == GrantState::Approved {
        let expired = current.expires_at.is_some_and(|at| at <= now);
        return expired.then(|| format!("grant {} expired — session closed", current.id));
    }
    let by = current
        .ended
        .as_ref()
        .map(|e| e.by.clone())
        .unwrap_or_default();
    let why = current
        .ended
        .as_ref()
        .and_then(|e| e.reason.clone())
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    Some(format!(
        "grant {} {} by {by}{why} — session closed",
        current.id, current.state
    ))
}

/// Resolves, with the message for the user, when the grant a session runs under
/// stops being active: at its expiry, or as soon as it is revoked. `changes`
/// watches this grant alone (it wakes with the changed grant in hand) and was
/// created before the last check of the grant, so no change since is missed.
/// `clock` is the grant service's: its expiry is a tokio timer, so on a clock
/// following tokio's both move together.
async fn grant_ends(
    grant: &Grant,
    mut changes: tokio::sync::watch::Receiver<Grant>,
    clock: Clock,
) -> String {
    let left = grant
        .expires_at
        .map(|at| (at - clock.now()).to_std().unwrap_or_default())
        .unwrap_or_default();
    let expiry = tokio::time::sleep(left);
    tokio::pin!(expiry);
    loop {
        if let Some(ended) = ending(&changes.borrow_and_update(), clock.now()) {
            return ended;
        }
        tokio::select! {
            _ = &mut expiry => return format!("grant {} expired — session closed", grant.id),
            changed = changes.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// A session channel on the target: on one of the client connection's pooled
/// connections (key mode), or on a connection of its own (certificate mode).
async fn open_target_channel(
    context: &ChannelContext,
    upstream: &Arc<UpstreamPool>,
    permit: &Permit,
    start: &Start,
    session: u64,
) -> Result<TargetChannel, UpstreamError> {
    let state = &context.state;
    let target = &permit.target;
    let (channel, connection, certificate) = match target.auth {
        UpstreamAuth::Key => {
            let route = format!(
                "{}@{} {} {}",
                permit.login,
                target.name,
                target.address,
                crate::policy::fingerprint(&target.host_key)
            );
            let (channel, lease) = upstream
                .open_session(&target.name, &route, || {
                    timed(
                        context,
                        connect(
                            shared_client_config(),
                            target,
                            &permit.login,
                            Credential::Key(state.keys.upstream.clone()),
                            state.config.connect_timeout,
                        ),
                    )
                })
                .await?;
            (channel, Connection::Pooled(lease), None)
        }
        UpstreamAuth::Certificate => {
            let issued = session_certificate(context, permit, start, session)?;
            let openssh = issued.openssh();
            let own = timed(
                context,
                connect(
                    shared_client_config(),
                    target,
                    &permit.login,
                    Credential::Certificate(issued.key, Box::new(issued.certificate)),
                    state.config.connect_timeout,
                ),
            )
            .await?;
            let channel = own.handle.channel_open_session().await.map_err(|source| {
                UpstreamError::Protocol {
                    target: target.name.clone(),
                    source,
                }
            })?;
            (channel, Connection::Own(own), Some(openssh))
        }
    };
    let sftp = matches!(start, Start::Subsystem(name) if name == "sftp");
    let symlink_guard = (sftp && !connection.upstream().reads_openssh_symlink_order())
        .then(|| sftp::SymlinkGuard::new(&target.name));
    Ok(TargetChannel {
        channel,
        connection,
        certificate,
        symlink_guard,
    })
}

/// Runs an upstream connect, recording how long it took.
async fn timed<T>(context: &ChannelContext, connecting: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let result = connecting.await;
    context
        .state
        .metrics
        .upstream_connect_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// A session channel on a target, with what must live as long as it.
struct TargetChannel {
    channel: russh::Channel<client::Msg>,
    connection: Connection,
    /// The certificate used, in OpenSSH format, for the session record.
    certificate: Option<String>,
    /// For an sftp session to a target whose symlink order is unknown, with the
    /// receiver of its refusal.
    symlink_guard: Option<(sftp::SymlinkGuard, tokio::sync::oneshot::Receiver<String>)>,
}

/// The upstream connection a session runs on, kept open while the session lives.
enum Connection {
    /// Shared with the client connection's other sessions.
    Pooled(Lease),
    /// A certificate-mode connection belongs to its one session (its certificate may
    /// force a command), so it is not shared.
    Own(Upstream),
}

impl Connection {
    fn upstream(&self) -> &Upstream {
        match self {
            Connection::Pooled(lease) => lease.upstream(),
            Connection::Own(upstream) => upstream,
        }
    }
}

/// Issues the certificate for one session: a shell grant gets a pty, anything
/// narrower is pinned with `force-command` to the canonical command (already in
/// `start`), and every sftp session to `internal-sftp`.
fn session_certificate(
    context: &ChannelContext,
    permit: &Permit,
    start: &Start,
    session: u64,
) -> Result<certificate::SessionCertificate, UpstreamError> {
    let force_command = match (permit.grant.scope.shell, start) {
        // sftp never goes through the login shell, whatever the grant: that is
        // what makes it a provable file transfer (see `grant::what_runs`).
        (_, Start::Subsystem(name)) if name == "sftp" => Some("internal-sftp".to_string()),
        (true, _) => None,
        (false, Start::Exec(command)) => Some(String::from_utf8_lossy(command).into_owned()),
        (false, _) => Some("internal-sftp".to_string()),
    };
    let request = certificate::CertificateRequest {
        user: &context.identity.user,
        grant: &permit.grant,
        login: &permit.login,
        session,
        force_command: force_command.as_deref(),
        now: Utc::now(),
    };
    certificate::issue(&context.state.keys.ca, &request).map_err(|err| UpstreamError::Certificate {
        target: permit.target.name.clone(),
        detail: err.to_string(),
    })
}

/// Replays pty and environment, then sends the session-starting request. Returns the
/// replies the target still owes, in order.
async fn start_remote_session(
    channel: &russh::Channel<client::Msg>,
    setup: SessionSetup,
    start: &Start,
) -> Result<VecDeque<PendingReply>, russh::Error> {
    let mut pending = VecDeque::new();
    if let Some(pty) = &setup.pty {
        channel
            .request_pty(
                true,
                &pty.term,
                pty.cols,
                pty.rows,
                pty.pix_width,
                pty.pix_height,
                &pty.modes,
            )
            .await?;
        pending.push_back(PendingReply::Pty);
    }
    for (name, value) in setup.env {
        channel.set_env(false, name, value).await?;
    }
    match start {
        Start::Shell => channel.request_shell(true).await?,
        Start::Exec(command) => channel.exec(true, command.clone()).await?,
        Start::Subsystem(name) => channel.request_subsystem(true, name).await?,
    }
    pending.push_back(PendingReply::Start(start.action().describe()));
    Ok(pending)
}
