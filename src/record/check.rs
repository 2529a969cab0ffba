//! Holds session records to the audit chain. Records live in the `sessions` tree,
//! outside the chain, so whoever holds the database can edit them at will; each
//! one must therefore match what its chained `session.start` and `session.end` (or
//! `session.interrupted`) events say, and every session id the counter handed out
//! must be accounted for, so that deleting a session shows as a gap.
//!
//! The bastion keeps writing while this runs, so the caller reads the records
//! twice, with the reservations and the events in between. Sessions write in this
//! order: reservation, record (`live`), `session.start`, `session.end`, record
//! (`closed`); a session that gives up before recording appends `session.failed`
//! before its reservation ends. A record that did not change between the two reads
//! therefore has every event it implies in the events read in between, and any id
//! handed out before the reservations were read was either still reserved or
//! already accounted for.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::{DigestSource, SessionRecord, SessionState};
use crate::audit::AuditEvent;

/// What the cross-check found, when it found nothing wrong.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionsChecked {
    /// Records that match their start and end events.
    pub matched: usize,
    /// Ids given up before recording (`session.failed`).
    pub failed: usize,
    /// Sessions live (or starting or ending) while the check ran: their end is
    /// checked by a later run.
    pub live: Vec<u64>,
    /// Sessions whose transcript digest was computed at recovery, not sealed by a
    /// live bastion.
    pub unsealed: Vec<u64>,
}

/// Cross-checks records against the chain; the error names the first problem by
/// session id and event sequence number (and how many more there are).
pub fn cross_check(
    before: &[SessionRecord],
    issued: u64,
    reserved: &BTreeSet<u64>,
    events: &[AuditEvent],
    after: &[SessionRecord],
) -> Result<SessionsChecked, String> {
    let mut problems: Vec<(u64, String)> = Vec::new();
    let mut starts: BTreeMap<u64, &AuditEvent> = BTreeMap::new();
    let mut ends: BTreeMap<u64, &AuditEvent> = BTreeMap::new();
    let mut failed: BTreeMap<u64, &AuditEvent> = BTreeMap::new();
    let mut pruned: BTreeSet<u64> = BTreeSet::new();
    for event in events {
        if event.kind == "recordings.pruned" {
            let ids = event.details.get("sessions").and_then(Value::as_array);
            pruned.extend(ids.into_iter().flatten().filter_map(Value::as_u64));
            continue;
        }
        let by_id = match event.kind.as_str() {
            "session.start" => &mut starts,
            "session.end" | "session.interrupted" => &mut ends,
            "session.failed" => &mut failed,
            _ => continue,
        };
        let Some(id) = event.details.get("session").and_then(Value::as_u64) else {
            problems.push((
                0,
                format!("event #{} ({}) names no session", event.seq, event.kind),
            ));
            continue;
        };
        if let Some(first) = by_id.insert(id, event) {
            problems.push((
                id,
                format!(
                    "session {id} has two such events: #{} {} and #{} {}",
                    first.seq, first.kind, event.seq, event.kind
                ),
            ));
        }
    }

    let before: BTreeMap<u64, &SessionRecord> = before.iter().map(|r| (r.id, r)).collect();
    let after: BTreeMap<u64, &SessionRecord> = after.iter().map(|r| (r.id, r)).collect();
    // The counter names the last id handed out; an attacker who lowers it hides
    // deleted sessions at the top, which only an anchor then reveals.
    let highest = before.keys().next_back().copied().unwrap_or(0).max(issued);
    let ids: BTreeSet<u64> = after
        .keys()
        .chain(starts.keys())
        .chain(ends.keys())
        .chain(failed.keys())
        .copied()
        .collect();
    // Ids with nothing at all, found between known ids rather than by counting to
    // `highest`, which an attacker may have set to anything.
    let mut next = 1u64;
    for known in ids
        .iter()
        .chain(reserved)
        .copied()
        .collect::<BTreeSet<u64>>()
    {
        if known > next && next <= highest {
            problems.push((next, missing(next, (known - 1).min(highest), highest)));
        }
        next = next.max(known.saturating_add(1));
    }
    if next <= highest {
        problems.push((next, missing(next, highest, highest)));
    }

    let mut checked = SessionsChecked::default();
    for id in ids {
        let problem = match (after.get(&id), failed.get(&id)) {
            (None, Some(_)) => {
                checked.failed += 1;
                None
            }
            (Some(_), Some(failure)) => Some(format!(
                "session {id} has a record, but event #{} says it failed before recording",
                failure.seq
            )),
            (None, None) => starts.get(&id).or(ends.get(&id)).map(|event| {
                format!(
                    "session {id} has no record, but event #{} ({}) says it ran: its record was deleted",
                    event.seq, event.kind
                )
            }),
            (Some(record), None) if before.get(&id) != Some(record) || record.is_live() => {
                // Changing while we read, or live: its start is checked if chained yet.
                checked.live.push(id);
                starts.get(&id).and_then(|start| start_differs(record, start))
            }
            (Some(record), None) => {
                let pruned = pruned.contains(&id);
                let problem = finished_differs(record, starts.get(&id), ends.get(&id), pruned);
                if problem.is_none() {
                    checked.matched += 1;
                    if record.unsealed() {
                        checked.unsealed.push(id);
                    }
                }
                problem
            }
        };
        problems.extend(problem.map(|problem| (id, problem)));
    }
    problems.sort_by_key(|(id, _)| *id);
    match problems.split_first() {
        None => Ok(checked),
        Some(((_, first), [])) => Err(format!(
            "session records do not match the audit chain: {first}"
        )),
        Some(((_, first), rest)) => Err(format!(
            "session records do not match the audit chain: {first} (and {} more problems)",
            rest.len()
        )),
    }
}

/// Ids `first..=last` have no record and no event (and are not being connected).
fn missing(first: u64, last: u64, highest: u64) -> String {
    let which = match first == last {
        true => format!("session {first} is missing"),
        false => format!("sessions {first} to {last} are missing"),
    };
    format!(
        "{which}: no record and no session.start or session.failed event, though ids up to {highest} were handed out: deleted with their events"
    )
}

/// Where a finished record disagrees with the chain.
fn finished_differs(
    record: &SessionRecord,
    start: Option<&&AuditEvent>,
    end: Option<&&AuditEvent>,
    pruned: bool,
) -> Option<String> {
    let id = record.id;
    let (start, end) = match (start, end) {
        (None, _) => return Some(format!("session {id} has a record but no session.start event")),
        (Some(_), None) => {
            return Some(format!(
                "session {id}'s record says {}, but no session.end or session.interrupted event says so",
                record.state.as_str()
            ))
        }
        (Some(start), Some(end)) => (start, end),
    };
    start_differs(record, start)
        .or_else(|| end_differs(record, end))
        .or_else(|| {
            (record.pruned != pruned).then(|| {
                format!(
                    "session {id}'s record says pruned = {}, but the recordings.pruned events say {pruned}",
                    record.pruned
                )
            })
        })
}

/// Where a record disagrees with its `session.start` event.
fn start_differs(record: &SessionRecord, start: &AuditEvent) -> Option<String> {
    let detail = |key: &str| start.details.get(key).cloned().unwrap_or(Value::Null);
    disagreement(
        record.id,
        start,
        &[
            ("user", json!(record.user), json!(start.actor)),
            ("target", json!(record.target), json!(start.target)),
            ("grant", json!(record.grant), json!(start.grant)),
            ("login", json!(record.login), detail("login")),
            ("kind", json!(record.kind), detail("kind")),
            ("command", json!(record.command), detail("command")),
            ("client", json!(record.client), detail("client")),
            ("started_at", json!(record.started_at), json!(start.at)),
        ],
    )
}

/// Where a finished record disagrees with its `session.end` or
/// `session.interrupted` event.
fn end_differs(record: &SessionRecord, end: &AuditEvent) -> Option<String> {
    let detail = |key: &str| end.details.get(key).cloned().unwrap_or(Value::Null);
    let (kind, source) = match record.state {
        SessionState::Closed => ("session.end", DigestSource::Bastion),
        _ => ("session.interrupted", DigestSource::Recovery),
    };
    if end.kind != kind {
        return Some(format!(
            "session {}'s record says {}, but its event #{} is {}",
            record.id,
            record.state.as_str(),
            end.seq,
            end.kind
        ));
    }
    let mut fields = vec![
        (
            "transcript digest",
            json!(record.digest),
            detail("transcript_sha256"),
        ),
        ("digest source", json!(record.digest_source), json!(source)),
    ];
    if record.state == SessionState::Closed {
        fields.extend([
            (
                "exit status",
                json!(record.exit_status),
                detail("exit_status"),
            ),
            (
                "exit signal",
                json!(record.exit_signal),
                detail("exit_signal"),
            ),
            ("bytes in", json!(record.bytes_in), detail("bytes_in")),
            ("bytes out", json!(record.bytes_out), detail("bytes_out")),
        ]);
    } else {
        fields.push(("user", json!(record.user), detail("user")));
    }
    disagreement(record.id, end, &fields)
}

fn disagreement(id: u64, event: &AuditEvent, fields: &[(&str, Value, Value)]) -> Option<String> {
    let differing: Vec<String> = fields
        .iter()
        .filter(|(_, record, chained)| record != chained)
        .map(|(name, record, chained)| format!("{name} (record: {record}, event: {chained})"))
        .collect();
    (!differing.is_empty()).then(|| {
        format!(
            "session {id}'s record disagrees with its {} event #{} on {}",
            event.kind,
            event.seq,
            differing.join(", ")
        )
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use chrono::Utc;

    /// A session record of alice's on `db`, started now, in `state`.
    pub(in crate::record) fn record(id: u64, state: SessionState) -> SessionRecord {
        let mut record: SessionRecord = serde_json::from_value(json!({
            "id": id, "user": "alice", "target": "db", "login": "postgres", "grant": "7f3a9c",
            "client": "127.0.0.1:5000", "started_at": Utc::now(), "ended_at": null,
            "kind": "exec", "command": "true", "term": null, "cols": 80, "rows": 24,
            "resizes": 0, "exit_status": null, "exit_signal": null, "bytes_in": 0,
            "bytes_out": 0, "state": "live", "full_transcript": true,
            "input_recorded": true, "batches": 0, "transcript_bytes": 0, "stored_bytes": 0,
            "digest": null, "pruned": false,
        }))
        .unwrap();
        if state != SessionState::Live {
            record.state = state;
            record.exit_status = Some(0);
            record.digest = Some("d1".into());
            record.digest_source = Some(match state {
                SessionState::Closed => DigestSource::Bastion,
                _ => DigestSource::Recovery,
            });
        }
        record
    }

    /// The events the bastion chains for `record`.
    fn chained(record: &SessionRecord) -> Vec<AuditEvent> {
        let start = AuditEvent::new(
            crate::audit::AuditKind::SessionStart,
            &record.user,
            record.started_at,
        )
        .target(&record.target)
        .grant(&record.grant)
        .detail("session", record.id)
        .detail("login", record.login.as_str())
        .detail("kind", record.kind.as_str())
        .detail("command", record.command.clone())
        .detail("client", record.client.as_str());
        let end = match record.state {
            SessionState::Live => return vec![start],
            SessionState::Closed => AuditEvent::new(
                crate::audit::AuditKind::SessionEnd,
                &record.user,
                Utc::now(),
            )
            .detail("exit_status", record.exit_status)
            .detail("exit_signal", record.exit_signal.clone())
            .detail("bytes_in", record.bytes_in)
            .detail("bytes_out", record.bytes_out),
            SessionState::Interrupted => AuditEvent::new(
                crate::audit::AuditKind::SessionInterrupted,
                "portcullis",
                Utc::now(),
            )
            .detail("user", record.user.as_str())
            .detail("digest_source", "recovery"),
        };
        vec![
            start,
            end.detail("session", record.id)
                .detail("transcript_sha256", record.digest.clone()),
        ]
    }

    fn failed(id: u64) -> AuditEvent {
        AuditEvent::new(crate::audit::AuditKind::SessionFailed, "alice", Utc::now())
            .detail("session", id)
    }

    fn check(records: &[SessionRecord], events: &[AuditEvent]) -> Result<SessionsChecked, String> {
        cross_check(records, 0, &BTreeSet::new(), events, records)
    }

    #[test]
    fn matching_records_pass_and_unsealed_ones_are_listed() {
        let records = [
            record(1, SessionState::Closed),
            record(3, SessionState::Interrupted),
            record(4, SessionState::Live),
        ];
        let mut events: Vec<AuditEvent> = records.iter().flat_map(chained).collect();
        events.push(failed(2));
        let checked = check(&records, &events).unwrap();
        assert_eq!(
            checked,
            SessionsChecked {
                matched: 2,
                failed: 1,
                live: vec![4],
                unsealed: vec![3]
            }
        );
    }

    #[test]
    fn each_problem_is_named_by_session() {
        let closed = record(1, SessionState::Closed);
        let events = chained(&closed);
        let mut edited = closed.clone();
        edited.user = "dave".into();
        let err = check(&[edited], &events).unwrap_err();
        assert!(
            err.contains("session 1's record disagrees with its session.start"),
            "{err}"
        );
        assert!(
            err.contains("user (record: \"dave\", event: \"alice\")"),
            "{err}"
        );

        let mut resealed = closed.clone();
        resealed.digest = Some("d2".into());
        let err = check(&[resealed], &events).unwrap_err();
        assert!(err.contains("transcript digest"), "{err}");

        let err = check(std::slice::from_ref(&closed), &events[..1]).unwrap_err();
        assert!(err.contains("no session.end"), "{err}");
        let err = check(&[], &events).unwrap_err();
        assert!(err.contains("session 1 has no record"), "{err}");

        let two = record(2, SessionState::Closed);
        let err = check(&[closed.clone(), two.clone()], &chained(&two)).unwrap_err();
        assert!(
            err.contains("session 1 has a record but no session.start"),
            "{err}"
        );
    }

    #[test]
    fn gaps_are_deletions_unless_reserved_and_busy_sessions_wait() {
        let two = [record(2, SessionState::Closed)];
        let events = chained(&two[0]);
        let err = check(&two, &events).unwrap_err();
        assert!(err.contains("session 1 is missing"), "{err}");
        let gap = |issued: u64, events: &[AuditEvent]| {
            cross_check(&two, issued, &BTreeSet::from([1]), events, &two).unwrap_err()
        };
        // The counter reveals a deletion above the highest record.
        assert!(gap(3, &events).contains("session 3 is missing"));
        // A counter set to anything is reported, not counted up to.
        let max = u64::MAX;
        assert!(gap(max, &events).contains(&format!("sessions 3 to {max} are missing")));
        let far = [events.clone(), vec![failed(max)]].concat();
        let err = gap(max, &far);
        assert!(
            err.contains(&format!("sessions 3 to {} are missing", max - 1)),
            "{err}"
        );
        // An id still connecting is no gap.
        cross_check(&two, 3, &BTreeSet::from([1, 3]), &events, &two).unwrap();
        // A record that changed while verify read is checked next time.
        let mut ending = two.clone();
        ending[0].state = SessionState::Live;
        let checked = cross_check(&ending, 2, &BTreeSet::from([1]), &events[..1], &two).unwrap();
        assert_eq!(checked.live, [2]);
    }
}
