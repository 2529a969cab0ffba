//! `request`: ask for access to a target; with `--wait`, stay on the line until
//! the request is decided.

use clap::Args;
use russh::ChannelMsg;

use super::Call;
use crate::control::error::{ControlError, Reply};
use crate::control::requests::{self, to_json, Caller, RequestArgs};
use crate::grant::lifecycle::approvers_of;
use crate::grant::{Grant, GrantState, Scope};
use crate::session::wait::{self, StatusLine, Waited};

#[derive(Debug, Args)]
pub struct Request {
    target: String,
    /// Login on the target (default: the target's first login).
    #[arg(long)]
    login: Option<String>,
    /// An interactive shell (also covers any command and sftp).
    #[arg(long)]
    shell: bool,
    /// File transfer with sftp and scp.
    #[arg(long)]
    sftp: bool,
    /// A command pattern; `*` matches within one argument. Repeatable.
    #[arg(long = "command", value_name = "PATTERN")]
    commands: Vec<String>,
    /// How long the grant lasts once approved, e.g. 30m or 1h30m.
    #[arg(long)]
    ttl: Option<String>,
    /// Why you need access (ticket, incident).
    #[arg(long)]
    reason: String,
    /// Block until the request is decided.
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    json: bool,
}

impl Request {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        let (wait, json) = (self.wait, self.json);
        let args = RequestArgs {
            target: self.target,
            login: self.login,
            scope: Scope {
                shell: self.shell,
                sftp: self.sftp,
                commands: self.commands,
            },
            ttl: self.ttl,
            reason: self.reason,
        };
        let grant = requests::request(&call.caller, args).await?;
        if !(wait && grant.state == GrantState::Pending) {
            return Ok(requests::outcome(&call.caller, &grant, json));
        }
        if !json {
            let filed = requests::describe_outcome(&call.caller, &grant);
            call.client.out.stdout(&filed).await;
        }
        wait_and_report(call, grant, json).await
    }
}

/// `request --wait`: blocks until the request is decided (woken by the decision
/// itself), redrawing a status line on a terminal. Succeeds only when approved. A
/// client that goes away stops waiting; the request stays pending.
async fn wait_and_report(call: &mut Call<'_>, grant: Grant, json: bool) -> Reply {
    let approvers = approvers_of(&grant, &call.caller.policy)
        .map(|a| a.join(", "))
        .unwrap_or_default();
    let status = StatusLine {
        shown: call.client.out.pty,
        approvers: &approvers,
        decorate: str::to_string,
    };
    let gone = |msg: Option<&ChannelMsg>| matches!(msg, None | Some(ChannelMsg::Close));
    let state = &call.context.state;
    let decided = match wait::until_decided(state, call.client, &grant.id, &status, gone).await {
        Waited::Decided(decided) => *decided,
        Waited::Left => return Err(ControlError::Gone),
        Waited::Failed(err) => return Err(err.into()),
    };
    if call.client.out.pty {
        call.client.out.stderr("\r\x1b[K").await;
    }
    let caller = Caller {
        now: call.caller.state.now(),
        policy: call.caller.policy.clone(),
        ..call.caller
    };
    let approved = decided.state == GrantState::Approved;
    match (json, approved) {
        (true, true) => Ok(to_json(&decided)),
        (true, false) => Err(ControlError::NotApprovedJson(to_json(&decided))),
        (false, true) => Ok(requests::describe_outcome(&caller, &decided)),
        (false, false) => Err(ControlError::refused(
            requests::describe_outcome(&caller, &decided).trim_end(),
        )),
    }
}
