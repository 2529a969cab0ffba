//! Request-on-connect: a user with a terminal and no grant is asked for a reason,
//! the request is filed, and a status line shows who must approve and how long it
//! has been waiting. Approval continues the very session; denial or expiry ends it
//! with the reason; Ctrl-C (or closing the session) cancels the request.
//!

use std::time::{Duration, Instant};

use chrono::Utc;
use russh::ChannelMsg;

use super::admit::{file_request, scope_for};
use crate::grant::{Grant, GrantState, Requestable};
use crate::session::{ChannelContext, ClientChannel, SessionSetup, Start};

use crate::session::{CTRL_C, CTRL_D};

/// How often the waiting line's elapsed time is redrawn.
const REDRAW: Duration = Duration::from_secs(1);

/// Asks, files and waits. Returns whether the grant was approved.
pub async fn request_on_terminal(
    context: &ChannelContext,
    client: &mut ClientChannel,
    setup: &mut SessionSetup,
    requestable: &Requestable,
    why_refused: &str,
) -> bool {
    let Some(scope) = scope_for(requestable, &Start::Shell, true) else {
        let config = &context.state.config;
        let why = crate::session::hint::request(config, requestable, &Start::Shell, true)
            .unwrap_or_else(|why| why);
        client
            .out
            .fail(
                &format!("{}.\n{why}", crate::display::escape(why_refused)),
                1,
            )
            .await;
        return false;
    };
    let flow = &requestable.flow;
    client
        .out
        .stderr(&format!(
            "portcullis: {why_refused}.\nFlow '{}' needs {} approval(s) from {}.\nReason for access (Enter to send, Ctrl-C to cancel): ",
            flow.name,
            flow.approvals,
            flow.approvers.join(", ")
        ))
        .await;
    let Some(reason) = client
        .read_line(true, |msg| keep_window_change(setup, msg))
        .await
    else {
        client.out.fail("cancelled; no request filed", 1).await;
        return false;
    };
    match file_request(context, client, requestable, scope, reason).await {
        Some(grant) => wait_for_decision(context, client, setup, grant).await,
        None => false,
    }
}

/// Shows a live status line until the request is decided. Ctrl-C cancels it.
async fn wait_for_decision(
    context: &ChannelContext,
    client: &mut ClientChannel,
    setup: &mut SessionSetup,
    grant: Grant,
) -> bool {
    let grants = &context.state.grants;
    let mut changes = match grants.watch(&grant.id) {
        Ok(changes) => changes,
        Err(err) => {
            client.out.fail(&err.to_string(), 1).await;
            return false;
        }
    };
    let started = Instant::now();
    let mut redraw = tokio::time::interval(REDRAW);
    let approvers = context
        .state
        .policy()
        .targets
        .get(&grant.target)
        .and_then(|t| {
            context
                .state
                .policy()
                .flow_for(t)
                .map(|f| f.approvers.join(", "))
        })
        .unwrap_or_default();
    loop {
        let current = changes.borrow_and_update().clone();
        if current.state != GrantState::Pending {
            return report_decision(client, &current).await;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = redraw.tick() => {
                let line = current.waiting_status(&approvers, started.elapsed());
                client.out.stderr(&format!("\r\x1b[Kportcullis: {line} · Ctrl-C cancels")).await;
            }
            msg = client.reader.wait() => {
                let cancelled = match &msg {
                    None | Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) => true,
                    Some(ChannelMsg::Data { data }) => data.contains(&CTRL_C) || data.contains(&CTRL_D),
                    Some(other) => {
                        keep_window_change(setup, other);
                        false
                    }
                };
                if cancelled {
                    let user = context.identity.user.as_str();
                    let (policy, id, user) = (context.state.policy(), grant.id.clone(), user.to_string());
                    let result = grants
                        .run(move |grants| {
                            grants.revoke(&policy, &id, &user, Some("cancelled at the prompt".into()), Utc::now())
                        })
                        .await;
                    if result.is_ok() {
                        // End the status line first: the notice starts a line of its own.
                        client.out.stderr("\r\x1b[K").await;
                        client.out.fail(&format!("request {} cancelled", grant.id), 1).await;
                        return false;
                    }
                    // Decided in the meantime: the next round reports it.
                }
            }
        }
    }
}

async fn report_decision(client: &ClientChannel, grant: &Grant) -> bool {
    let by = grant
        .approvals
        .iter()
        .map(|a| a.by.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match grant.state {
        GrantState::Approved => {
            client
                .out
                .stderr(&format!(
                    "\r\x1b[Kportcullis: request {} approved by {by}; connecting to {}\n",
                    grant.id,
                    grant.destination()
                ))
                .await;
            true
        }
        state => {
            let ending = grant.ended.as_ref();
            let who = ending.map(|e| e.by.as_str()).unwrap_or("portcullis");
            let why = ending
                .and_then(|e| e.reason.as_deref())
                .map(|r| format!(": {}", crate::display::escape(r)))
                .unwrap_or_default();
            client.out.stderr("\r\x1b[K").await;
            client
                .out
                .fail(&format!("request {} {state} by {who}{why}", grant.id), 1)
                .await;
            false
        }
    }
}

pub(super) fn keep_window_change(setup: &mut SessionSetup, msg: &ChannelMsg) {
    if let (
        Some(pty),
        ChannelMsg::WindowChange {
            col_width,
            row_height,
            pix_width,
            pix_height,
        },
    ) = (setup.pty.as_mut(), msg)
    {
        (pty.cols, pty.rows, pty.pix_width, pty.pix_height) =
            (*col_width, *row_height, *pix_width, *pix_height);
    }
}
