//! The SSH front door: listens, authenticates engineers by public key, and hands each
//! session channel to the control plane or to the proxy.

mod channel;
mod gate;
mod handler;
mod proxy_protocol;
mod shards;
mod upkeep;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use russh::keys::HashAlg;

use crate::audit::{AuditEvent, AuditKind};
use crate::cluster::{Cluster, NodeSettings};
use crate::config::Config;
use crate::grant::Clock;
use crate::keys::{KeySet, Role};
use crate::policy::{self, PolicyErrors};
use crate::session::{
    preferred_algorithms, server_id, warn_about, Phase, State, CHANNEL_QUEUE, MAX_PACKET_SIZE,
    WINDOW_SIZE,
};
use crate::store::Store;
use crate::totp::Totp;

pub use gate::{Gate, Preauth, Refusal};
pub use shards::Shards;

/// What the metrics thread reads: the state, and the runtimes whose tasks it counts.
struct MetricsSource {
    state: Arc<State>,
    runtimes: Vec<tokio::runtime::Handle>,
}

impl crate::metrics::Source for MetricsSource {
    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.state.metrics
    }

    fn snapshot(&self) -> crate::metrics::Snapshot {
        let state = &self.state;
        let recording = state.recorder.totals();
        crate::metrics::Snapshot {
            live_sessions: *state.live_sessions.borrow(),
            pending_requests: state.grants.pending_count(),
            recording_queue_bytes: state.recorder.queued_bytes() as u64,
            recording_wait_seconds: recording.waited.as_secs_f64(),
            recording_writes: recording.writes,
            recording_write_seconds: recording.writing.as_secs_f64(),
            relay_memory_bytes: state.memory.used(),
            tasks_alive: self
                .runtimes
                .iter()
                .map(|runtime| runtime.metrics().num_alive_tasks())
                .sum(),
            unhealthy: unhealthy(state),
        }
    }
}

/// Why `/healthz` should turn new users away now: draining, a failed store, a
/// nearly full disk.
fn unhealthy(state: &State) -> Option<String> {
    if *state.phase.borrow() != Phase::Running {
        return Some("draining".to_string());
    }
    if let Some(failure) = state.store.failure() {
        let then = if state.store.failure_is_sticky() {
            "restarting once the disk has room"
        } else {
            "waiting for the database"
        };
        return Some(format!("store failed: {failure}; {then}"));
    }
    let free = state.recorder.disk_low()?;
    let min = state.recorder.limits().min_free_disk;
    Some(format!(
        "disk nearly full: {free} bytes free, min_free_disk = {min}; new sessions are refused"
    ))
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
        channel_buffer_size: CHANNEL_QUEUE,
        preferred: preferred_algorithms(config.post_quantum_only, config.legacy_clients),
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    }
}

/// Runs the bastion until SIGTERM or Ctrl-C, its connections on a shard per core.
pub async fn serve(config: Config) -> Result<()> {
    let (state, _lock) = open(config)?;
    tokio::spawn(reload_on_sighup(state.clone()));
    let shards = Shards::per_core()?;
    if let Some(listen) = state.config.metrics_listen {
        let mut runtimes = shards.handles();
        runtimes.push(tokio::runtime::Handle::current());
        let source = MetricsSource {
            state: state.clone(),
            runtimes,
        };
        crate::metrics::serve(listen, Arc::new(source))?;
    }
    // The SSH port opens last: once it accepts, everything behind it is ready.
    let listen = state.config.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let policy = state.policy();
    tracing::info!(
        listen = %listener.local_addr()?,
        users = policy.users.len(),
        targets = policy.targets.len(),
        flows = policy.flows.len(),
        "portcullis listening"
    );
    drop(policy);
    let served = run_on(listener, state, termination(), &shards).await;
    // What a shard still runs once the sessions drained is dropped with it.
    let _ = tokio::task::spawn_blocking(move || drop(shards)).await;
    served
}

/// Opens everything a bastion needs before it accepts connections: the policy, the
/// data directory (locked: one bastion per directory, for as long as the returned
/// lock lives), the keys and the database; marks the sessions a previous run left
/// open as interrupted and forgets users the policy no longer knows.
pub fn open(config: Config) -> Result<(Arc<State>, crate::datadir::Lock)> {
    open_with_clock(config, Clock::Wall)
}

/// [`open`] with the grant rules reading the time from `clock` (a test's bastion
/// on tokio's paused clock: [`Clock::following_tokio`]).
pub fn open_with_clock(config: Config, clock: Clock) -> Result<(Arc<State>, crate::datadir::Lock)> {
    // The policy first: started in the wrong directory, nothing is created there.
    let policy = policy::load_dir(&config.policies).map_err(|errors| {
        anyhow::anyhow!("the policy has errors; fix them and start again:\n{errors}")
    })?;
    crate::datadir::prepare(&config.data_dir)?;
    let lock = crate::datadir::Lock::acquire(&config.data_dir)?;
    let keys = KeySet::load_or_create(&config)?;
    warn_about(&policy, &config.auditors);
    if crate::init::is_shipped_example(&config.policies) {
        tracing::warn!(
            "the policies in {} are the examples shipped with portcullis, with placeholder keys: nobody can log in. `portcullis init` writes a working set for this machine; then run `portcullis reload`",
            config.policies.display()
        );
    }
    let store = Arc::new(
        Store::open(&config.store, &config.data_dir)
            .with_context(|| format!("cannot open the database ({})", config.store_location()))?,
    );
    let totp = Totp::open(&config.data_dir, store.clone())?;
    let cluster = join_cluster(&config, &store, &keys, &totp)?;
    let state = Arc::new(
        State::new(config, keys, policy, store, totp, cluster, clock)
            .context("cannot read the grants from the database")?,
    );
    let node = state.cluster.node().to_string();
    mark_interrupted_sessions(&state, &node, None)?;
    state.forget_users_not_in(&state.policy());
    report_load(&state, 0, Ok(()));
    Ok((state, lock))
}

/// Serves SSH on `listener` until `shutdown` resolves, then drains: the one path
/// from an opened [`State`] to a stopped bastion, shared by `serve` and by tests
/// that run a bastion in their own process (on port 0, and on a paused tokio clock
/// for timing tests: every timer here is tokio's). The background jobs (grant
/// expiry, audit anchoring, recording retention, the allocator's trim) live as long
/// as this call. Connections run on the caller's runtime.
pub async fn run(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    run_on(listener, state, shutdown, &Shards::none()).await
}

/// [`run`] with the connections on `shards`.
pub async fn run_on(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
    shards: &Shards,
) -> Result<()> {
    let mut jobs = tokio::task::JoinSet::new();
    jobs.spawn(expire_grants(state.clone()));
    jobs.spawn(upkeep::anchor_audit_chain(state.clone()));
    jobs.spawn(crate::allocator::trim_periodically());
    if let Some(retention) = state.config.recordings_retention {
        jobs.spawn(upkeep::prune_recordings(state.clone(), retention));
    }
    let russh_config = Arc::new(russh_config(&state.keys, &state.config));
    let gate = Gate::new(state.config.limits.clone());
    tokio::select! {
        _ = accept(listener, state.clone(), russh_config, gate, shards) => {}
        _ = shutdown => {}
        failure = upkeep::watch_disk(state.clone()) => {
            // Live sessions could not be recorded any more: nothing to drain.
            tracing::error!(reason = %failure, "exiting so that the service manager restarts portcullis with the database reopened");
            anyhow::bail!("{failure}");
        }
        lost = upkeep::keep_heartbeat(state.clone()) => {
            tracing::error!(reason = %lost, "exiting so that the service manager restarts portcullis");
            anyhow::bail!("{lost}");
        }
    }
    // Heartbeats go on while draining: a node that stopped beating would be
    // declared dead, its draining sessions marked interrupted under it.
    tokio::select! {
        _ = drain(&state) => {}
        lost = upkeep::keep_heartbeat(state.clone()) => anyhow::bail!("{lost}"),
    }
    jobs.shutdown().await;
    // A node that stopped with sessions still live leaves them to be swept.
    let all_ended = *state.live_sessions.borrow() == 0;
    if all_ended {
        if let Err(err) = state.cluster.leave(chrono::Utc::now()) {
            tracing::warn!(error = %err, "cannot record this node's stop; the others will find it dead after node_timeout");
        }
    }
    state
        .blocking(|state| state.store.flush())
        .await
        .context("cannot flush the database")?;
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections, refusing at the door penalised sources and, under a flood,
/// a random share of new ones; the rest wait in `drive`, on a shard, for a
/// pre-auth slot.
async fn accept(
    listener: TcpListener,
    state: Arc<State>,
    config: Arc<russh::server::Config>,
    gate: Arc<Gate>,
    shards: &Shards,
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
        let admitted = if proxy_protocol::is_balancer(&state.config.proxy_protocol_from, peer.ip())
        {
            gate.admit_relayed(peer.ip())
        } else {
            gate.admit(peer.ip(), std::time::Instant::now())
        };
        match admitted {
            Ok(preauth) => {
                let _ = stream.set_nodelay(true);
                let (state, config, gate) = (state.clone(), config.clone(), gate.clone());
                shards.spawn(stream, move |stream| {
                    handler::drive(state, config, gate, stream, peer, preauth)
                });
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
    let _ = state
        .audit(
            AuditEvent::new(AuditKind::BastionShutdown, "portcullis", chrono::Utc::now())
                .detail("live_sessions", live),
        )
        .await;
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

/// Registers this node with the cluster (one node alone is a cluster of one) and
/// checks that its keys are the cluster's.
fn join_cluster(
    config: &Config,
    store: &Arc<Store>,
    keys: &KeySet,
    totp: &Totp,
) -> Result<Cluster> {
    let settings = NodeSettings {
        id: config.cluster.node_id.clone(),
        machine: format!(
            "{}:{}",
            rustix::system::uname().nodename().to_string_lossy(),
            config.data_dir.display()
        ),
        heartbeat: config.cluster.heartbeat,
        timeout: config.cluster.node_timeout,
    };
    let cluster = Cluster::join(store, settings, chrono::Utc::now())?;
    let mut fingerprints: Vec<(&str, String)> = Role::ALL
        .iter()
        .map(|role| {
            let fingerprint = keys.get(*role).public_key().fingerprint(HashAlg::Sha256);
            (role.name(), fingerprint.to_string())
        })
        .collect();
    fingerprints.push(("totp sealing", totp.key_fingerprint().to_string()));
    for change in cluster.check_identity(&fingerprints, chrono::Utc::now())? {
        tracing::warn!("no other node is running: the cluster takes this node's keys ({change})");
    }
    Ok(cluster)
}

/// Sessions that were live on `node` when it stopped can no longer end cleanly:
/// mark them `interrupted` (their transcript up to the last flush stays
/// replayable). `declared_by`: the node that found `node` dead, when it was not
/// this node's own previous run.
pub(crate) fn mark_interrupted_sessions(
    state: &State,
    node: &str,
    declared_by: Option<&str>,
) -> Result<()> {
    state
        .recorder
        .recover(node, |session| {
            tracing::warn!(session = session.id, user = %session.user, target = %session.target, node = %session.node, "session was interrupted by a bastion stop; its transcript digest is computed now, unsealed");
            state
                .grants
                .audit(crate::record::interrupted_event(session, declared_by))
        })
        .context("cannot recover the recordings of interrupted sessions")?;
    state
        .recorder
        .release_orphans(node, |id| {
            tracing::warn!(session = id, %node, "a session id was taken but its session never started recording: the node stopped first");
            state
                .grants
                .audit(
                    AuditEvent::new(AuditKind::SessionFailed, "portcullis", chrono::Utc::now())
                        .detail("session", id)
                        .detail("node", node)
                        .detail("reason", "the bastion node stopped before the session's recording started"),
                )
                .map(|_| ())
        })
        .context("cannot release the session ids of sessions that never started")?;
    Ok(())
}

/// Expires pending requests and grants whose time is up, once a second. (Live
/// sessions do not wait for this: each watches its own grant's deadline.)
async fn expire_grants(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = state.now();
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
        seq += 1;
        // Withdrawing removed users' grants and the events sync to disk.
        state.blocking(move |state| reload(state, seq)).await;
    }
}

/// Loads the policy again (reload number `seq`), with its audit event, and tells
/// `portcullis reload` how it went. Blocks.
fn reload(state: &State, seq: u64) {
    let now = chrono::Utc::now();
    match state.reload_policy() {
        Ok(()) => {
            tracing::info!("policy reloaded");
            // In force already; a failed append is logged.
            let _ = state.grants.audit(AuditEvent::new(
                AuditKind::PolicyReloaded,
                "portcullis",
                now,
            ));
            report_load(state, seq, Ok(()));
        }
        Err(errors) => {
            tracing::error!(%errors, "policy reload failed; keeping the previous policy");
            let _ = state.grants.audit(
                AuditEvent::new(AuditKind::PolicyReloadFailed, "portcullis", now)
                    .detail("errors", errors.to_string()),
            );
            report_load(state, seq, Err(&errors));
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
