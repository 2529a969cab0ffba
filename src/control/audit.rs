//! Auditor commands on the audit log: `audit [--since] [--json]` and
//! `audit verify [--recordings] [--anchor SEQ:DIGEST]...`.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::error::{ControlError, Reply};
use crate::audit::{verify_chain, Anchor, AuditEvent};
use crate::record::check::cross_check;
use crate::session::State;

/// `audit [--since]`: the events (at or after `now - since`), on the blocking pool
/// (the whole chain, without `--since`, is a full-history read).
pub async fn list(
    state: &Arc<State>,
    now: DateTime<Utc>,
    since: Option<String>,
    json: bool,
) -> Reply {
    let since = match since {
        Some(text) => Some(
            now - crate::duration::parse(&text)
                .map_err(|e| ControlError::refused(format!("--since: {e}")))?,
        ),
        None => None,
    };
    state
        .blocking(move |state| listing(state, since, json))
        .await
}

fn listing(state: &State, since: Option<DateTime<Utc>>, json: bool) -> Reply {
    let log = state.grants.audit_log();
    let events = match since {
        Some(at) => log.since(at)?,
        None => log.events()?,
    };
    let mut out = String::new();
    for event in &events {
        if json {
            out.push_str(&serde_json::to_string(event).expect("events serialise"));
        } else {
            out.push_str(&human(event));
        }
        out.push('\n');
    }
    Ok(out)
}

/// `#12 2026-11-24T19:23:08Z request.approved bob target=db grant=7f3a9c comment="ok"`,
/// escaped: details carry users' reasons, comments and commands.
fn human(event: &AuditEvent) -> String {
    let mut line = format!(
        "#{} {} {} {}",
        event.seq,
        event.at.format("%Y-%m-%dT%H:%M:%SZ"),
        event.kind,
        event.actor
    );
    if let Some(target) = &event.target {
        line.push_str(&format!(" target={target}"));
    }
    if let Some(grant) = &event.grant {
        line.push_str(&format!(" grant={grant}"));
    }
    for (key, value) in &event.details {
        line.push_str(&format!(" {key}={value}"));
    }
    crate::display::escape(&line).into_owned()
}

/// Recomputes the chain, checks it against the operator's anchors, holds every
/// session record to its chained events and, with `recordings`, recomputes every
/// transcript digest. The first problem found is the error. Reads the whole
/// history (and decompresses every transcript): on the blocking pool.
pub async fn verify(state: &Arc<State>, recordings: bool, anchors: Vec<Anchor>) -> Reply {
    state
        .blocking(move |state| verify_now(state, recordings, &anchors))
        .await
}

fn verify_now(state: &State, recordings: bool, anchors: &[Anchor]) -> Reply {
    let (recorder, audit) = (&state.recorder, state.grants.audit_log());
    // This order lets a busy bastion go on writing meanwhile (see `record::check`).
    let before = recorder.sessions()?;
    let (issued, reserved) = recorder.reservations()?;
    let events = audit.events()?;
    let after = recorder.sessions()?;
    let summary = verify_chain(&events)?;
    let mut report = format!(
        "audit chain OK: {} events, head #{} {}\n",
        summary.events, summary.head_seq, summary.head_digest
    );
    for anchor in anchors {
        anchor.check(&events).map_err(ControlError::Refused)?;
        report.push_str(&format!(
            "anchor OK: event {} matches {anchor}\n",
            anchor.seq
        ));
    }
    let sessions =
        cross_check(&before, issued, &reserved, &events, &after).map_err(ControlError::Refused)?;
    report.push_str(&format!(
        "sessions OK: {} records match their chained start and end events; no session id is missing ({} failed before recording)\n",
        sessions.matched, sessions.failed
    ));
    if !sessions.live.is_empty() {
        report.push_str(&format!(
            "{} live: checked once they end: ids {}\n",
            plural(sessions.live.len(), "session is", "sessions are"),
            ids(&sessions.live)
        ));
    }
    if recordings {
        let checked = verify_recordings(state, &events)?;
        report.push_str(&format!(
            "recordings OK: {checked} transcripts match their digests\n"
        ));
    }
    if !sessions.unsealed.is_empty() {
        report.push_str(&format!(
            "{} sealed at recovery, not by a live bastion: ids {}\n",
            plural(
                sessions.unsealed.len(),
                "transcript was",
                "transcripts were"
            ),
            ids(&sessions.unsealed)
        ));
    }
    Ok(report)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn ids(ids: &[u64]) -> String {
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks each session's transcript against the digest in its end (or interrupted)
/// event. Sessions pruned by retention are skipped only if a `recordings.pruned`
/// event says so.
fn verify_recordings(state: &State, events: &[AuditEvent]) -> Result<usize, ControlError> {
    let pruned: HashSet<u64> = events
        .iter()
        .filter(|e| e.kind == "recordings.pruned")
        .filter_map(|e| e.details.get("sessions")?.as_array().cloned())
        .flatten()
        .filter_map(|id| id.as_u64())
        .collect();
    let mut checked = 0;
    for event in events {
        if event.kind != "session.end" && event.kind != "session.interrupted" {
            continue;
        }
        let (Some(session), Some(expected)) = (
            event.details.get("session").and_then(|v| v.as_u64()),
            event
                .details
                .get("transcript_sha256")
                .and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        if pruned.contains(&session) {
            continue;
        }
        let actual = state.recorder.digest_of(session).map_err(|e| {
            ControlError::refused(format!(
                "recording of session {session} (event #{}) is damaged: {e}",
                event.seq
            ))
        })?;
        if actual != expected {
            return Err(ControlError::refused(format!(
                "recording of session {session} was altered: its transcript no longer matches the digest in audit event #{}",
                event.seq
            )));
        }
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_human_listing_escapes_what_users_wrote() {
        // JSON escapes C0 controls but not DEL, C1 controls or bidi overrides.
        let event = AuditEvent::new(
            crate::audit::AuditKind::RequestCreated,
            "alice",
            chrono::Utc::now(),
        )
        .detail("reason", "INC-1 \u{202e}gnitset\u{9b}2J\u{7f}\u{1b}[2K");
        let line = human(&event);
        assert!(!line.chars().any(crate::display::needs_escape), "{line:?}");
        assert!(
            line.contains(r#"reason="INC-1 \u{202e}gnitset\u{009b}2J\x7f\u001b[2K""#),
            "{line}"
        );
    }
}
