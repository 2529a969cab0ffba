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

/// Writes this node's heartbeat every `[cluster] heartbeat` and marks the live
/// sessions of nodes the cluster finds dead `interrupted`, with a `node.lost`
/// event first. Returns (for the server to exit non-zero) when this node finds
/// itself declared dead: its sessions are on record as interrupted already.
pub async fn keep_heartbeat(state: Arc<State>) -> String {
    let mut tick = tokio::time::interval(state.cluster.settings().heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beating = state.clone();
        match tokio::task::spawn_blocking(move || beat_and_sweep(&beating)).await {
            Ok(Some(lost)) => return lost,
            Ok(None) => {}
            Err(err) => tracing::error!(error = %err, "the heartbeat task failed"),
        }
    }
}

/// One heartbeat and one sweep; `Some(reason)` when this node was declared dead.
fn beat_and_sweep(state: &State) -> Option<String> {
    let now = Utc::now();
    match state.cluster.beat(now) {
        Ok(Ok(())) => {}
        Ok(Err(lost)) => return Some(lost.to_string()),
        Err(err) => {
            // `/healthz` reports the store; the next beat tries again.
            tracing::error!(error = %err, "cannot write this node's heartbeat");
            return None;
        }
    }
    let dead = match state.cluster.claim_dead(now) {
        Ok(dead) => dead,
        Err(err) => {
            tracing::error!(error = %err, "cannot read the other nodes' heartbeats");
            return None;
        }
    };
    let me = state.cluster.node();
    for node in dead {
        tracing::warn!(%node, "node stopped sending heartbeats; marking its live sessions interrupted");
        // On the blocking pool already: the grant service appends where it is.
        let swept = state
            .grants
            .audit(
                AuditEvent::new(AuditKind::NodeLost, "portcullis", now)
                    .detail("node", node.as_str())
                    .detail("declared_by", me),
            )
            .map_err(anyhow::Error::from)
            .and_then(|()| super::mark_interrupted_sessions(state, &node, Some(me)))
            .and_then(|()| Ok(state.cluster.swept(&node)?));
        if let Err(err) = swept {
            tracing::error!(%node, error = %err, "cannot mark the sessions of a dead node; trying again at the next heartbeat");
        }
    }
    None
}
