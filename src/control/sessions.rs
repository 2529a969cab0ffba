//! Auditor commands on recordings: `sessions`, `replay`, `watch`, `export`.

use std::time::Duration;

use bytes::Bytes;
use russh::ChannelMsg;

use super::error::{ControlError, Reply};
use super::requests::{to_json, Caller};
use super::table::{clip, relative, render, short_span};
use crate::record::screen::ScreenFilter;
use crate::record::{
    asciicast, replay, Chunk, Recorder, SessionQuery, SessionRecord, Watched, FLUSH_INTERVAL,
};
use crate::session::{ClientChannel, ClientOut};

/// Filters of `sessions`.
pub struct SessionFilter {
    pub user: Option<String>,
    pub target: Option<String>,
    pub since: Option<String>,
    pub active: bool,
    pub grep: Option<String>,
}

pub async fn list(caller: &Caller<'_>, filter: SessionFilter, json: bool) -> Reply {
    let since = match &filter.since {
        Some(text) => Some(
            caller.now
                - crate::duration::parse(text)
                    .map_err(|e| ControlError::refused(format!("--since: {e}")))?,
        ),
        None => None,
    };
    let query = SessionQuery {
        user: filter.user,
        target: filter.target,
        since,
        live: filter.active,
    };
    // Reading the records, and with `--grep` decompressing transcripts, blocks: it
    // runs on the blocking pool, not on a runtime worker.
    let recorder = caller.state.recorder.clone();
    let grep = filter.grep;
    let sessions = tokio::task::spawn_blocking(move || matching(&recorder, &query, grep))
        .await
        .map_err(|e| ControlError::refused(e.to_string()))??;
    if json {
        return Ok(to_json(&sessions));
    }
    if sessions.is_empty() {
        return Ok("no sessions match\n".to_string());
    }
    let rows: Vec<Vec<String>> = sessions.iter().map(|s| row(s, caller)).collect();
    Ok(render(
        &[
            "ID", "USER", "TARGET", "GRANT", "STARTED", "DURATION", "STATE", "NODE", "EXIT",
            "INPUT", "IN/OUT", "COMMAND",
        ],
        &rows,
    ))
}

/// The sessions `query` selects whose transcript holds `grep` (if given), oldest
/// first, with the live ones' counts as they are now.
fn matching(
    recorder: &Recorder,
    query: &SessionQuery,
    grep: Option<String>,
) -> Result<Vec<SessionRecord>, ControlError> {
    let mut sessions = Vec::new();
    for mut session in recorder.find(query)? {
        if let Some(needle) = &grep {
            if !recorder.transcript_contains(session.id, needle.as_bytes())? {
                continue;
            }
        }
        if session.is_live() {
            session.received_input = recorder.live_received_input(session.id);
            if let Some((bytes_in, bytes_out)) = recorder.live_bytes(session.id) {
                (session.bytes_in, session.bytes_out) = (bytes_in, bytes_out);
            }
        }
        sessions.push(session);
    }
    Ok(sessions)
}

fn row(session: &SessionRecord, caller: &Caller) -> Vec<String> {
    let end = session.ended_at.unwrap_or(caller.now);
    let exit = match (&session.exit_status, &session.exit_signal) {
        (_, Some(signal)) => signal.clone(),
        (Some(status), None) => status.to_string(),
        (None, None) => "-".into(),
    };
    vec![
        session.id.to_string(),
        session.user.clone(),
        format!("{}@{}", session.login, session.target),
        session.grant.clone(),
        relative(session.started_at, caller.now),
        short_span((end - session.started_at).num_seconds().max(0) as u64),
        state_mark(session),
        match session.node.as_str() {
            "" => "-".to_string(),
            node => node.to_string(),
        },
        exit,
        input_mark(session).to_string(),
        format!(
            "{}/{}",
            human_bytes(session.bytes_in),
            human_bytes(session.bytes_out)
        ),
        clip(session.command.as_deref().unwrap_or(&session.kind), 40),
    ]
}

/// The state, and `unsealed` when the transcript's digest was computed at recovery
/// rather than by the live bastion (see `audit verify`).
fn state_mark(session: &SessionRecord) -> String {
    match session.unsealed() {
        true => format!("{} (unsealed)", session.state.as_str()),
        false => session.state.as_str().to_string(),
    }
}

/// `typed` (at a terminal) or `piped` when the user sent the session anything:
/// what an auditor looks at first.
fn input_mark(session: &SessionRecord) -> &'static str {
    match (session.received_input, session.echoes_input()) {
        (false, _) => "-",
        (true, true) => "typed",
        (true, false) => "piped",
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n}B"),
        1024..1_048_576 => format!("{:.1}K", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}M", n as f64 / 1_048_576.0),
        _ => format!("{:.1}G", n as f64 / 1_073_741_824.0),
    }
}

/// Parses a session id and loads its record (on the blocking pool: a round trip
/// on PostgreSQL, which would stall the other connections of this shard).
pub async fn find(caller: &Caller<'_>, text: &str) -> Result<SessionRecord, ControlError> {
    let shown = crate::display::escape(&text.chars().take(20).collect::<String>()).into_owned();
    let list = crate::session::hint::control_line(&caller.state.config, &["sessions"]);
    let id: u64 = text.parse().map_err(|_| {
        ControlError::refused(format!(
            "'{shown}' is not a session id: ids are numbers like 42; `{list}` lists them"
        ))
    })?;
    (caller.state.recorder.read_session(id).await?)
        .ok_or_else(|| ControlError::refused(format!("no session {id}; `{list}` lists them")))
}

/// The stored transcript of a session, read one batch at a time, unless retention
/// removed it.
fn transcript(
    caller: &Caller,
    session: &SessionRecord,
) -> Result<crate::record::BatchReader, ControlError> {
    if session.pruned {
        return Err(ControlError::refused(format!(
            "the recording of session {} was pruned by retention",
            session.id
        )));
    }
    Ok(caller.state.recorder.reader(session.id))
}

/// What reaches the auditor's terminal: the recorded bytes, less the sequences that
/// act outside the screen unless `--raw` ([`ScreenFilter`]), each write waiting at
/// most `idle` for an auditor whose client reads nothing (`[limits]
/// idle_window_timeout`, as for sessions): a stalled `watch` must not keep its
/// slot, nor a stalled `replay` its channel, for ever.
struct Shown {
    filter: Option<ScreenFilter>,
    idle: Duration,
}

impl Shown {
    fn new(raw: bool, idle: Duration) -> Shown {
        Shown {
            filter: (!raw).then(ScreenFilter::new),
            idle,
        }
    }

    fn pass(&mut self, data: Bytes) -> Bytes {
        match &mut self.filter {
            Some(filter) => Bytes::from(filter.filter(&data)),
            None => data,
        }
    }
}

/// Writes what may be shown of `data`; false once the auditor went away, or read
/// nothing for the idle window.
async fn show(out: &ClientOut, shown: &mut Shown, data: Bytes) -> bool {
    let data = shown.pass(data);
    if data.is_empty() {
        return true;
    }
    match tokio::time::timeout(shown.idle, out.writer.data_bytes(data)).await {
        Ok(written) => written.is_ok(),
        Err(_) => {
            tracing::info!(idle = ?shown.idle, "an auditor's client read nothing for the idle window; its replay or watch ends");
            false
        }
    }
}

/// `replay`: the recording's output, with its pauses, to the caller's terminal.
pub async fn replay(
    caller: &Caller<'_>,
    out: &ClientOut,
    session: &SessionRecord,
    speed: f64,
    raw: bool,
) -> Reply {
    if !(0.01..=1000.0).contains(&speed) {
        return Err(ControlError::refused(
            "--speed must be between 0.01 and 1000",
        ));
    }
    let mut batches = transcript(caller, session)?;
    let with_input = !session.echoes_input();
    let mut shown = Shown::new(raw, caller.state.config.limits.idle_window_timeout);
    let mut timing = replay::Timing::default();
    while let Some(chunks) = batches.next().await? {
        for (pause, data) in timing.schedule(&chunks, speed, with_input) {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if !show(out, &mut shown, data).await {
                return Ok(String::new()); // the auditor went away
            }
        }
    }
    Ok(String::new())
}

/// `export`: asciicast v2 on stdout, written as it is (no line-end translation).
pub async fn export(caller: &Caller<'_>, out: &ClientOut, session: &SessionRecord) -> Reply {
    let mut batches = transcript(caller, session)?;
    let mut cast = asciicast::Cast::default();
    if !send_in_pieces(out, Bytes::from(cast.header(session))).await {
        return Ok(String::new());
    }
    while let Some(chunks) = batches.next().await? {
        if !send_in_pieces(out, Bytes::from(cast.events(&chunks))).await {
            break; // the auditor went away
        }
    }
    Ok(String::new())
}

/// Writes `data` to the client's stdout in pieces its window can take; false once
/// the client went away.
async fn send_in_pieces(out: &ClientOut, data: Bytes) -> bool {
    const PIECE: usize = 32 * 1024;
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + PIECE).min(data.len());
        if out
            .writer
            .data_bytes(data.slice(offset..end))
            .await
            .is_err()
        {
            return false;
        }
        offset = end;
    }
    true
}

/// `watch`: what the session has shown so far, then its output as it happens, until
/// it ends or the auditor leaves. Read-only: the auditor's input goes nowhere.
pub async fn watch(
    caller: &Caller<'_>,
    client: &mut ClientChannel,
    session: &SessionRecord,
    raw: bool,
) -> Reply {
    let follow = (caller.state.recorder.follow(session.id, caller.user))
        .map_err(|full| ControlError::refused(full.to_string()))?;
    let Some(mut follow) = follow else {
        if session.is_live() && session.node != caller.state.cluster.node() {
            return watch_elsewhere(caller, client, session, raw).await;
        }
        let replay = crate::session::hint::control_line(
            &caller.state.config,
            &["replay", &session.id.to_string()],
        );
        return Err(ControlError::refused(format!(
            "session {} is not live; replay it: `{replay}`",
            session.id
        )));
    };
    let out = &client.out;
    let with_input = !session.echoes_input();
    let mut shown = Shown::new(raw, caller.state.config.limits.idle_window_timeout);
    // What it showed so far: the stored batches one at a time, then what is not
    // stored yet. Live chunks queue meanwhile (up to `WATCH_BYTES`).
    let mut stored = caller.state.recorder.reader(session.id);
    while stored.read() < follow.stored {
        let Some(chunks) = stored.next().await? else {
            break;
        };
        if !show_all(out, &mut shown, chunks, with_input).await {
            return Ok(String::new());
        }
    }
    let pending = std::mem::take(&mut follow.pending);
    if !show_all(out, &mut shown, pending, with_input).await {
        return Ok(String::new());
    }
    loop {
        tokio::select! {
            received = follow.live.recv() => match received {
                Some(Watched::Chunk(chunk)) if replay::shown(&chunk, with_input) => {
                    if !show(out, &mut shown, chunk.data).await {
                        return Ok(String::new());
                    }
                }
                Some(Watched::Chunk(_)) => {}
                Some(Watched::Missed(missed)) => {
                    out.stderr(&format!("\n[portcullis: watch fell behind; {missed} chunks skipped]\n")).await;
                }
                None => break,
            },
            msg = client.reader.wait() => {
                if matches!(msg, None | Some(ChannelMsg::Close)) {
                    return Ok(String::new());
                }
            }
        }
    }
    Ok(format!("\n[portcullis: session {} ended]\n", session.id))
}

/// Shows the chunks `watch` shows (input only when the terminal does not echo
/// it); false once the auditor is gone.
async fn show_all(
    out: &ClientOut,
    shown: &mut Shown,
    chunks: Vec<Chunk>,
    with_input: bool,
) -> bool {
    for chunk in chunks.into_iter().filter(|c| replay::shown(c, with_input)) {
        if !show(out, shown, chunk.data).await {
            return false;
        }
    }
    true
}

/// `watch` of a session that another node carries: its transcript as that node
/// flushes it (every `FLUSH_INTERVAL`), read from the shared database, until the
/// session's record says it is over and every batch is shown.
async fn watch_elsewhere(
    caller: &Caller<'_>,
    client: &mut ClientChannel,
    session: &SessionRecord,
    raw: bool,
) -> Reply {
    let out = &client.out;
    let with_input = !session.echoes_input();
    let mut shown = Shown::new(raw, caller.state.config.limits.idle_window_timeout);
    let mut next = 0;
    let mut tick = tokio::time::interval(FLUSH_INTERVAL / 2);
    loop {
        let (batches, ended) =
            read_flushed(caller.state.recorder.clone(), session.id, next).await?;
        let read = batches.len();
        for chunks in batches {
            if !show_all(out, &mut shown, chunks, with_input).await {
                return Ok(String::new());
            }
        }
        next += read as u32;
        if ended && read == 0 {
            break;
        }
        if read == BATCHES_PER_LOOK {
            continue; // behind: catch up before waiting for the next flush
        }
        tokio::select! {
            _ = tick.tick() => {}
            msg = client.reader.wait() => {
                if matches!(msg, None | Some(ChannelMsg::Close)) {
                    return Ok(String::new());
                }
            }
        }
    }
    Ok(format!("\n[portcullis: session {} ended]\n", session.id))
}

/// At most this many batches are read per look, so a watcher that joins a long
/// session holds a bounded number in memory.
const BATCHES_PER_LOOK: usize = 4;

/// The batches flushed from `first` on (up to [`BATCHES_PER_LOOK`]), and whether
/// the session had ended before they were read, on the blocking pool.
async fn read_flushed(
    recorder: std::sync::Arc<Recorder>,
    id: u64,
    first: u32,
) -> Result<(Vec<Vec<Chunk>>, bool), ControlError> {
    tokio::task::spawn_blocking(move || {
        // The state first: batches flushed before the end are then all read.
        let ended = recorder.session(id)?.is_none_or(|record| !record.is_live());
        let batches = recorder
            .batches_from(id, first)
            .take(BATCHES_PER_LOOK)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((batches, ended))
    })
    .await
    .map_err(|e| ControlError::refused(e.to_string()))?
}
