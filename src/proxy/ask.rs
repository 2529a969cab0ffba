//! Request-on-connect: a user with a terminal and no grant is asked for a reason,
//! the request is filed, and a status line shows who must approve and how long it
//! has been waiting. Approval continues the very session; denial or expiry ends it
//! with the reason; Ctrl-C (or closing the session) cancels the request.
//!

use russh::ChannelMsg;

use super::admit::{file_request, scope_for};
use crate::grant::lifecycle::approvers_of;
use crate::grant::{Ending, Grant, GrantState, Requestable};
use crate::session::wait::{self, StatusLine, Waited};
use crate::session::{ChannelContext, ClientChannel, SessionSetup, Start, CTRL_C, CTRL_D};

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
        .read_line(true, |msg| setup.keep_window_change(msg))
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

/// Shows a live status line until the request is decided. Ctrl-C (or Ctrl-D, or
/// closing the session) cancels it.
async fn wait_for_decision(
    context: &ChannelContext,
    client: &mut ClientChannel,
    setup: &mut SessionSetup,
    grant: Grant,
) -> bool {
    let policy = context.state.policy();
    let approvers = approvers_of(&grant, &policy)
        .map(|a| a.join(", "))
        .unwrap_or_default();
    let status = StatusLine {
        shown: true,
        approvers: &approvers,
        decorate: |line| format!("portcullis: {line} · Ctrl-C cancels"),
    };
    let cancels = |msg: Option<&ChannelMsg>| match msg {
        None | Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) => true,
        Some(ChannelMsg::Data { data }) => data.contains(&CTRL_C) || data.contains(&CTRL_D),
        Some(other) => {
            setup.keep_window_change(other);
            false
        }
    };
    let mut cancels = cancels;
    loop {
        match wait::until_decided(&context.state, client, &grant.id, &status, &mut cancels).await {
            Waited::Decided(decided) => return report_decision(client, &decided).await,
            Waited::Failed(err) => {
                client.out.fail(&err.to_string(), 1).await;
                return false;
            }
            Waited::Left => {
                let (policy, id) = (context.state.policy(), grant.id.clone());
                let user = context.identity.user.clone();
                let result = context
                    .state
                    .grants
                    .run(move |grants| {
                        grants.revoke(
                            &policy,
                            &id,
                            &user,
                            Some("cancelled at the prompt".into()),
                            grants.now(),
                        )
                    })
                    .await;
                if result.is_ok() {
                    // End the status line first: the notice starts a line of its own.
                    client.out.stderr("\r\x1b[K").await;
                    client
                        .out
                        .fail(&format!("request {} cancelled", grant.id), 1)
                        .await;
                    return false;
                }
                // Decided in the meantime: the next round reports it.
            }
        }
    }
}

async fn report_decision(client: &ClientChannel, grant: &Grant) -> bool {
    let by = grant.approver_names();
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
            let why = ending.map(Ending::because).unwrap_or_default();
            let why = crate::display::escape(&why);
            client.out.stderr("\r\x1b[K").await;
            client
                .out
                .fail(&format!("request {} {state} by {who}{why}", grant.id), 1)
                .await;
            false
        }
    }
}
