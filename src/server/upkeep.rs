//! Background upkeep of the store: anchoring the audit chain in the logs, and
//! pruning old recordings.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::audit::{AuditEvent, AuditKind};
use crate::session::State;

/// How often the audit chain's head is logged.
const ANCHOR_EVERY: Duration = Duration::from_secs(60);

/// How often retention runs (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Logs the head of the audit chain (sequence number and digest) at start and then
/// periodically, so an external log store holds anchors: an attacker who rewrites or
/// truncates the chain cannot also rewrite what was already shipped off the host.
pub async fn anchor_audit_chain(state: Arc<State>) {
    let mut tick = tokio::time::interval(ANCHOR_EVERY);
    let mut last_logged = None;
    loop {
        tick.tick().await;
        match state.grants.audit_log().head() {
            Ok(Some(head)) if last_logged != Some(head.seq) => {
                tracing::info!(seq = head.seq, digest = %head.digest(), "audit chain head");
                last_logged = Some(head.seq);
            }
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "cannot read the audit chain head"),
        }
    }
}

/// Removes transcripts older than `retention`, recording each pruning in the audit log
/// (which itself is never pruned).
pub async fn prune_recordings(state: Arc<State>, retention: Duration) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tick.tick().await;
        // Deleting transcripts and the event write to disk: off the runtime.
        state
            .blocking(move |state| prune(state, Utc::now() - retention))
            .await;
    }
}

/// Removes the transcripts of sessions last seen before `cutoff`, with the audit
/// event. Blocks.
fn prune(state: &State, cutoff: chrono::DateTime<Utc>) {
    match state.recorder.prune(cutoff) {
        Ok((pruned, _)) if pruned.is_empty() => {}
        Ok((pruned, freed)) => {
            tracing::info!(
                sessions = pruned.len(),
                bytes = freed,
                "pruned old recordings"
            );
            // Done already; a failed append is logged (and the store's failure
            // restarts the bastion, see `watch_store`).
            let _ = state.grants.audit(
                AuditEvent::new(AuditKind::RecordingsPruned, "portcullis", Utc::now())
                    .detail("sessions", pruned)
                    .detail("bytes", freed)
                    .detail("cutoff", cutoff.to_rfc3339()),
            );
        }
        Err(err) => tracing::error!(error = %err, "cannot prune recordings"),
    }
}

/// How often free space and the store's health are checked.
const DISK_EVERY: Duration = Duration::from_secs(1);

/// Keeps the disk from filling and gets the bastion out of a failed store.
///
/// While the data directory's free space is below `min_free_disk`, ends the live
/// session that has recorded the most, one a second, with a notice (new sessions
/// are refused meanwhile, see `Recorder::room_for`).
///
/// Once sled has failed a write, it fails every later one until it is reopened, and
/// everything that needs a write is refused meanwhile (`/healthz` says why). This
/// returns, for the server to exit non-zero so that systemd (`Restart=on-failure`)
/// starts it again on a freshly opened store, as soon as free space is back above
/// `min_free_disk`: restarting earlier would only fail again. A failure that
/// clears by itself (a database server that cannot be reached for a while) is
/// waited out instead.
pub async fn watch_disk(state: Arc<State>) -> String {
    let mut tick = tokio::time::interval(DISK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let recorder = &state.recorder;
    loop {
        tick.tick().await;
        let low = recorder.disk_low();
        if let Some(failure) = state.store.failure() {
            if low.is_none() && state.store.failure_is_sticky() {
                return format!(
                    "the database failed a write ({failure}) and the disk has room again"
                );
            }
            continue;
        }
        let Some(free) = low else { continue };
        let min = recorder.limits().min_free_disk;
        let notice = crate::record::disk_full_message(
            free,
            min,
            "the largest live sessions are ended so that the recordings made so far are kept",
        );
        if let Some((session, user, stored)) = recorder.end_largest(&notice) {
            tracing::warn!(session, %user, stored, free, min_free_disk = min, "disk nearly full; ending the largest live session");
            // Ended either way; a failed append is logged.
            let _ = state
                .audit(
                    AuditEvent::new(AuditKind::SessionDiskFull, "portcullis", Utc::now())
                        .detail("session", session)
                        .detail("user", user.as_str())
                        .detail("stored_bytes", stored)
                        .detail("free_bytes", free)
                        .detail("min_free_disk", min),
                )
                .await;
        }
    }
}

/// Writes this node's heartbeat every `[cluster] heartbeat`, and sweeps the nodes
/// the cluster finds dead (see [`sweep`]). Returns, for the server to exit
/// non-zero, when this node must stop:
/// - it finds itself declared dead (its sessions are on record as interrupted);
/// - while other nodes run, it could not write a heartbeat for half of
///   `node_timeout`: it fences itself, stopping before they may declare it dead,
///   so that no session goes on unrecorded behind a node the cluster thinks dead.
///
/// A node alone waits out an unreachable database instead: nobody could claim it.
/// A sweep waits until this node's own beats have gone through for a whole
/// `node_timeout`, so a node back from an outage does not claim the others, who
/// could not beat either.
pub async fn keep_heartbeat(state: Arc<State>) -> String {
    let settings = state.cluster.settings().clone();
    let fence = settings.timeout / 2;
    let mut tick = tokio::time::interval(settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = tokio::time::Instant::now();
    let mut beating_since = Some(last_beat);
    loop {
        tick.tick().await;
        let cluster_state = state.clone();
        let beat = tokio::task::spawn_blocking(move || cluster_state.cluster.beat(Utc::now()));
        let left = fence
            .saturating_sub(last_beat.elapsed())
            .max(settings.heartbeat);
        match tokio::time::timeout(left, beat).await {
            Ok(Ok(Ok(Ok(())))) => {
                last_beat = tokio::time::Instant::now();
                beating_since.get_or_insert(last_beat);
            }
            Ok(Ok(Ok(Err(lost)))) => return lost.to_string(),
            Ok(Ok(Err(err))) => {
                tracing::error!(error = %err, "cannot write this node's heartbeat");
                beating_since = None;
            }
            Ok(Err(err)) => {
                tracing::error!(error = %err, "the heartbeat task failed");
                beating_since = None;
            }
            Err(_) => beating_since = None,
        }
        if last_beat.elapsed() >= fence && state.cluster.has_peers() {
            return format!(
                "node {} could not write its heartbeat for {} (half of node_timeout) while other nodes run; stopping before they declare it dead",
                state.cluster.node(),
                crate::duration::format(last_beat.elapsed())
            );
        }
        let steady = beating_since.is_some_and(|since| since.elapsed() >= settings.timeout);
        if steady && state.cluster.start_sweep() {
            let sweeping = state.clone();
            tokio::task::spawn_blocking(move || {
                sweep(&sweeping);
                sweeping.cluster.end_sweep();
            });
        }
    }
}

/// Claims the nodes whose heartbeats stopped and marks their live sessions
/// `interrupted` (and gives up the session ids they had taken), with a
/// `node.lost` event when the claim is new. Runs on the blocking pool, apart from
/// the heartbeat, so a long sweep never delays this node's own beats; one sweep
/// at a time.
fn sweep(state: &State) {
    let claims = match state.cluster.claim_dead(Utc::now()) {
        Ok(claims) => claims,
        Err(err) => {
            tracing::error!(error = %err, "cannot read the other nodes' heartbeats");
            return;
        }
    };
    let me = state.cluster.node();
    for claim in claims {
        let node = claim.node.as_str();
        tracing::warn!(%node, "node stopped sending heartbeats; marking its live sessions interrupted");
        let announced = match claim.fresh {
            // The grant service appends where it is: this is the blocking pool.
            true => state
                .grants
                .audit(
                    AuditEvent::new(AuditKind::NodeLost, "portcullis", Utc::now())
                        .detail("node", node)
                        .detail("declared_by", me),
                )
                .map_err(anyhow::Error::from),
            false => Ok(()),
        };
        let swept = announced
            .and_then(|()| super::mark_interrupted_sessions(state, node, Some(me)))
            .and_then(|()| Ok(state.cluster.swept(node)?));
        if let Err(err) = swept {
            tracing::error!(%node, error = %err, "cannot mark the sessions of a dead node; trying again at the next heartbeat");
        }
    }
}
