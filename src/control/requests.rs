//! The request and grant commands: `request`, `requests`, `show`, `approve`, `deny`,
//! `revoke`, `grants`, and the grant part of `whoami`.
//!
//! Each returns the text for stdout, or an error message for stderr. Who may see a
//! request: its requester, the approvers of its flow, and auditors; everyone else is
//! told it does not exist, so ids cannot be probed.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::error::{ControlError, Reply};
use super::table::{clip, relative, render, scope_cell, short_span};
use crate::display::escape;
use crate::grant::lifecycle::{approvers_of, is_approver};
use crate::grant::{Ending, Grant, GrantError, GrantState, Grants, RequestSpec, Scope};
use crate::policy::Policy;
use crate::session::State;

/// Who is asking, against which policy, at what time.
pub struct Caller<'a> {
    pub user: &'a str,
    pub state: &'a State,
    pub policy: Arc<Policy>,
    pub now: DateTime<Utc>,
}

impl Caller<'_> {
    fn can_see(&self, grant: &Grant) -> bool {
        grant.requester == self.user
            || is_approver(grant, &self.policy, self.user)
            || self
                .policy
                .is_member(self.user, &self.state.config.auditors)
    }

    /// A grant the caller may see; others look exactly like unknown ids. Read on
    /// the blocking pool, as every read of the grants here: on PostgreSQL a read
    /// is a round trip, which would stall the other connections of this shard.
    pub(super) async fn visible(&self, id: &str) -> Result<Grant, ControlError> {
        let wanted = id.to_string();
        let grant = (self.state.grants)
            .run(move |grants| grants.get(&wanted))
            .await?;
        if self.can_see(&grant) {
            Ok(grant)
        } else {
            Err(GrantError::NotFound(id.to_string()).into())
        }
    }
}

/// Everything `request` was given on the command line.
pub struct RequestArgs {
    pub target: String,
    pub login: Option<String>,
    pub scope: Scope,
    pub ttl: Option<String>,
    pub reason: String,
}

pub async fn request(caller: &Caller<'_>, args: RequestArgs) -> Result<Grant, ControlError> {
    let ttl = match &args.ttl {
        Some(text) => Some(
            crate::duration::parse(text)
                .map_err(|e| ControlError::refused(format!("--ttl: {e}")))?,
        ),
        None => None,
    };
    let spec = RequestSpec {
        target: args.target,
        login: args.login,
        scope: args.scope,
        ttl,
        reason: args.reason,
    };
    let (policy, user, now) = (caller.policy.clone(), caller.user.to_string(), caller.now);
    caller
        .state
        .grants
        .run(move |grants| grants.file(&policy, &user, spec, now))
        .await
        .map_err(ControlError::from)
}

/// What a command that changed `grant` answers: the grant as JSON, or in words.
pub fn outcome(caller: &Caller, grant: &Grant, json: bool) -> String {
    if json {
        to_json(grant)
    } else {
        describe_outcome(caller, grant)
    }
}

/// What `request` prints once the request is filed (or decided, with `--wait`).
pub fn describe_outcome(caller: &Caller, grant: &Grant) -> String {
    match grant.state {
        GrantState::Pending => format!(
            "request {} pending: needs {} approval(s) from {}\napprovers run: {}\n",
            grant.id,
            grant.approvals_needed,
            approvers_of(grant, &caller.policy)
                .map(|a| a.join(", "))
                .unwrap_or_else(|| "(nobody)".into()),
            crate::session::hint::control_line(
                &caller.state.config,
                &["approve", grant.id.as_str()]
            )
        ),
        GrantState::Approved => format!(
            "request {} approved by {}; {} on {} expires {}\n",
            grant.id,
            grant.approver_names(),
            escape(&grant.scope.describe()),
            grant.destination(),
            grant
                .expires_at
                .map(|at| relative(at, caller.now))
                .unwrap_or_default()
        ),
        state => format!(
            "request {} {state} by {}{}\n",
            grant.id,
            grant.ended.as_ref().map(|e| e.by.as_str()).unwrap_or("-"),
            escape(
                &grant
                    .ended
                    .as_ref()
                    .map(Ending::because)
                    .unwrap_or_default()
            )
        ),
    }
}

/// Which requests `requests` lists.
pub struct Filter {
    pub pending: bool,
    pub mine: bool,
    pub all: bool,
}

pub async fn list(caller: &Caller<'_>, filter: Filter, json: bool) -> Reply {
    // Read through an index unless the whole history was asked for (a full scan:
    // on the blocking pool, as are the others, whose size the user decides).
    let (user, mine, all) = (caller.user.to_string(), filter.mine, filter.all);
    let read = caller
        .state
        .grants
        .run(move |grants| match (mine, all) {
            (true, true) => grants.of_user(&user),
            (true, false) => grants.live_of(&user),
            (false, true) => grants.all(),
            (false, false) => grants.live(),
        })
        .await;
    let grants: Vec<Grant> = visible(caller, read)?
        .into_iter()
        .filter(|g| !filter.mine || g.requester == caller.user)
        .filter(|g| !filter.pending || g.state == GrantState::Pending)
        .filter(|g| filter.all || g.state.is_live())
        .collect();
    if json {
        return Ok(to_json(&grants));
    }
    if grants.is_empty() {
        return Ok(if filter.all {
            "no requests\n".to_string()
        } else {
            "no pending or active requests (add --all for history)\n".to_string()
        });
    }
    Ok(table(caller, &grants))
}

pub async fn grants(caller: &Caller<'_>, json: bool) -> Reply {
    let live = caller.state.grants.run(|grants| grants.live()).await;
    let active: Vec<Grant> = visible(caller, live)?
        .into_iter()
        .filter(|g| g.is_active(caller.now))
        .collect();
    if json {
        return Ok(to_json(&active));
    }
    if active.is_empty() {
        return Ok("no active grants\n".to_string());
    }
    Ok(table(caller, &active))
}

/// The caller's own active grants, for `whoami`.
pub async fn own_active(caller: &Caller<'_>) -> Result<Vec<Grant>, ControlError> {
    let user = caller.user.to_string();
    let live = caller
        .state
        .grants
        .run(move |grants| grants.live_of(&user))
        .await;
    Ok(visible(caller, live)?
        .into_iter()
        .filter(|g| g.requester == caller.user && g.is_active(caller.now))
        .collect())
}

pub async fn show(caller: &Caller<'_>, id: &str, json: bool) -> Reply {
    let grant = caller.visible(id).await?;
    if json {
        return Ok(to_json(&grant));
    }
    let now = caller.now;
    let mut out = String::new();
    // Every value is escaped: reasons, comments and patterns are the users' own text.
    let mut field =
        |name: &str, value: String| out.push_str(&format!("{name:<10} {}\n", escape(&value)));
    field("id", grant.id.clone());
    field("state", grant.state.to_string());
    field("requester", grant.requester.clone());
    field("target", grant.destination());
    // One line per part, so a long list of patterns is never cut.
    let parts = grant.scope.parts();
    if parts.is_empty() {
        field("scope", grant.scope.describe());
    }
    for (i, part) in parts.into_iter().enumerate() {
        field(if i == 0 { "scope" } else { "" }, part);
    }
    field("ttl", short_span(grant.ttl_secs));
    field("reason", grant.reason.clone());
    field("flow", grant.flow.clone());
    field(
        "created",
        format!(
            "{} ({})",
            grant.created_at.to_rfc3339(),
            relative(grant.created_at, now)
        ),
    );
    field(
        "approvals",
        format!(
            "{} of {} needed",
            grant.approvals.len(),
            grant.approvals_needed
        ),
    );
    for approval in &grant.approvals {
        field(
            "",
            format!(
                "{} {}{}",
                approval.by,
                relative(approval.at, now),
                approval
                    .comment
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            ),
        );
    }
    if grant.state == GrantState::Pending {
        field("decide by", relative(grant.pending_until, now));
    }
    if let Some(expires) = grant.expires_at {
        field(
            "expires",
            format!("{} ({})", expires.to_rfc3339(), relative(expires, now)),
        );
    }
    if let Some(ended) = &grant.ended {
        field(
            grant.state.as_str(),
            format!(
                "by {} {}{}",
                ended.by,
                relative(ended.at, now),
                ended.because()
            ),
        );
    }
    Ok(out)
}

pub async fn approve(caller: &Caller<'_>, id: &str, comment: Option<String>, json: bool) -> Reply {
    let now = caller.now;
    let grant = decide(caller, id, move |grants, policy, id, user| {
        grants.approve(policy, id, user, comment, now)
    })
    .await?;
    if json {
        return Ok(to_json(&grant));
    }
    Ok(match grant.state {
        GrantState::Approved => describe_outcome(caller, &grant),
        _ => format!(
            "approved {}: {} of {} approvals, still pending\n",
            grant.id,
            grant.approvals.len(),
            grant.approvals_needed
        ),
    })
}

pub async fn deny(caller: &Caller<'_>, id: &str, reason: String, json: bool) -> Reply {
    let now = caller.now;
    let grant = decide(caller, id, move |grants, policy, id, user| {
        grants.deny(policy, id, user, reason, now)
    })
    .await?;
    Ok(outcome(caller, &grant, json))
}

pub async fn revoke(caller: &Caller<'_>, id: &str, reason: Option<String>, json: bool) -> Reply {
    let now = caller.now;
    let grant = decide(caller, id, move |grants, policy, id, user| {
        grants.revoke(policy, id, user, reason, now)
    })
    .await?;
    Ok(outcome(caller, &grant, json))
}

/// Changes grant `id`, which the caller must be able to see, as the caller with
/// `change(grants, policy, id, caller)`, on the blocking pool: a change syncs the
/// store to disk.
async fn decide(
    caller: &Caller<'_>,
    id: &str,
    change: impl FnOnce(&Grants, &Policy, &str, &str) -> Result<Grant, GrantError> + Send + 'static,
) -> Result<Grant, ControlError> {
    let known = caller.visible(id).await?;
    let (policy, user) = (caller.policy.clone(), caller.user.to_string());
    caller
        .state
        .grants
        .run(move |grants| change(grants, &policy, &known.id, &user))
        .await
        .map_err(ControlError::from)
}

/// The grants of `read` the caller may see.
fn visible(
    caller: &Caller,
    read: Result<Vec<Grant>, GrantError>,
) -> Result<Vec<Grant>, ControlError> {
    Ok(read?.into_iter().filter(|g| caller.can_see(g)).collect())
}

fn table(caller: &Caller, grants: &[Grant]) -> String {
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                g.state.to_string(),
                g.requester.clone(),
                g.destination(),
                scope_cell(&g.scope, 40),
                format!("{}/{}", g.approvals.len(), g.approvals_needed),
                when(g, caller.now),
                clip(&g.reason, 40),
            ]
        })
        .collect();
    render(
        &[
            "ID",
            "STATE",
            "REQUESTER",
            "TARGET",
            "SCOPE",
            "APPROVALS",
            "WHEN",
            "REASON",
        ],
        &rows,
    )
}

/// The time that matters for a grant in its current state.
fn when(grant: &Grant, now: DateTime<Utc>) -> String {
    match (grant.state, &grant.ended) {
        (GrantState::Pending, _) => format!("decide {}", relative(grant.pending_until, now)),
        (GrantState::Approved, _) => match grant.expires_at {
            Some(at) if at > now => format!("expires {}", relative(at, now)),
            Some(at) => format!("expired {}", relative(at, now)),
            None => "-".into(),
        },
        (state, Some(ended)) => format!("{state} {}", relative(ended.at, now)),
        (state, None) => state.to_string(),
    }
}

pub fn to_json<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("grants always serialise");
    text.push('\n');
    text
}
