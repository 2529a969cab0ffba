//! Waiting for a decision on a request, with the client on the line: the one loop
//! behind `request --wait` on the control plane and request-on-connect in the
//! proxy. It wakes on every change of that grant (never on a polling interval), redraws a
//! status line once a second on a terminal, and hands every message from the
//! client to the caller, who says whether it ends the wait.

use std::time::{Duration, Instant};

use russh::ChannelMsg;

use super::{ClientChannel, State};
use crate::grant::{Grant, GrantError, GrantState};

/// How often the waiting line's elapsed time is redrawn.
const REDRAW: Duration = Duration::from_secs(1);

/// How a wait ended.
pub enum Waited {
    /// The request is no longer pending: approved, denied, expired or revoked.
    Decided(Box<Grant>),
    /// The client sent a message the caller took as leaving (`None`: the channel
    /// is gone). The request may still be pending.
    Left,
    /// The grant could not be read.
    Failed(GrantError),
}

/// What the status line looks like while waiting.
pub struct StatusLine<'a> {
    /// Redraw it at all (only on a terminal).
    pub shown: bool,
    /// Who decides, as shown in the line.
    pub approvers: &'a str,
    /// Text around the line, e.g. `portcullis: {line} · Ctrl-C cancels`.
    pub decorate: fn(&str) -> String,
}

/// Waits until `id` is decided or the client leaves; `leaves` sees every message
/// from the client (`None` once the channel is gone) and says whether it ends
/// the wait. The status line is not cleared: the caller's next output does that.
pub async fn until_decided(
    state: &State,
    client: &mut ClientChannel,
    id: &str,
    status: &StatusLine<'_>,
    mut leaves: impl FnMut(Option<&ChannelMsg>) -> bool,
) -> Waited {
    // The grant's own watch: woken by its changes only, with the change in hand.
    let wanted = id.to_string();
    let watched = state.grants.run(move |grants| grants.watch(&wanted)).await;
    let mut changes = match watched {
        Ok(changes) => changes,
        Err(err) => return Waited::Failed(err),
    };
    let started = Instant::now();
    let mut redraw = tokio::time::interval(REDRAW);
    loop {
        let current = changes.borrow_and_update().clone();
        if current.state != GrantState::Pending {
            return Waited::Decided(Box::new(current));
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = redraw.tick(), if status.shown => {
                let line = current.waiting_status(status.approvers, started.elapsed());
                let line = (status.decorate)(&line);
                client.out.stderr(&format!("\r\x1b[K{line}")).await;
            }
            msg = client.reader.wait() => {
                if leaves(msg.as_ref()) {
                    return Waited::Left;
                }
            }
        }
    }
}
