//! Background upkeep of the store: anchoring the audit chain in the logs, and
//! pruning old recordings.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::State;
use crate::audit::AuditEvent;

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
        match state.store.audit_head() {
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
        let cutoff = Utc::now() - retention;
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
                let _ = state.audit(
                    AuditEvent::new("recordings.pruned", "portcullis", Utc::now())
                        .detail("sessions", pruned)
                        .detail("bytes", freed)
                        .detail("cutoff", cutoff.to_rfc3339()),
                );
            }
            Err(err) => tracing::error!(error = %err, "cannot prune recordings"),
        }
    }
}
