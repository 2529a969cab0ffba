//! Admission: decide a session channel against the user's grants, and when there is no
//! grant, get one the way the flow allows: on the spot for an `auto_approve` flow, by
//! asking on the user's terminal when there is a pty, or by telling the user the exact
//! `request` command to run.

use chrono::Utc;

use super::ask;
use crate::audit::{AuditEvent, AuditKind};
use crate::grant::{
    authorize, AccessRequest, Decision, Denial, Grant, Permit, RequestSpec, Requestable, Scope,
};
use crate::session::{ChannelContext, ClientChannel, SessionSetup, Start};

/// Returns the permit to proxy under, or `None` after telling the client why not.
pub async fn admit(
    context: &ChannelContext,
    client: &mut ClientChannel,
    setup: &mut SessionSetup,
    start: &Start,
    target: &str,
    login: Option<&str>,
) -> Option<Permit> {
    if let Some(refusal) = not_enrolled(context, target).await {
        client.out.fail(&refusal, 1).await;
        return None;
    }
    let denial = match decide(context, setup, start, target, login).await {
        Decision::Allow(permit) => return stepped_up(context, client, setup, *permit).await,
        Decision::Deny(denial) => denial,
    };
    let Some(requestable) = denial.requestable.clone() else {
        audit_denial(context, start, target, &denial).await;
        client
            .out
            .fail(&crate::display::escape(&denial.reason), 1)
            .await;
        return None;
    };
    let filed = if requestable.flow.auto_approve {
        // Not a refusal unless filing fails: an auto-approved session starts here.
        let filed = auto_approve(context, client, &requestable, start, setup.pty.is_some()).await;
        if !filed {
            audit_denial(context, start, target, &denial).await;
        }
        filed
    } else if setup.pty.is_some() {
        audit_denial(context, start, target, &denial).await;
        ask::request_on_terminal(context, client, setup, &requestable, &denial.reason).await
    } else {
        audit_denial(context, start, target, &denial).await;
        let reason = crate::display::escape(&denial.reason);
        let config = &context.state.config;
        let message = match crate::session::hint::request(config, &requestable, start, false) {
            Ok(line) => format!("{reason}\nrequest it with:\n  {line}"),
            Err(why) => format!("{reason}\n{why}"),
        };
        client.out.fail(&message, 1).await;
        false
    };
    if !filed {
        return None;
    }
    match decide(context, setup, start, target, login).await {
        Decision::Allow(permit) => stepped_up(context, client, setup, *permit).await,
        Decision::Deny(denial) => {
            client.out.fail(&denial.reason, 1).await;
            None
        }
    }
}

/// In a `step_up = "totp"` flow, a user without TOTP is told how to enrol before
/// anything is filed for them.
async fn not_enrolled(context: &ChannelContext, target: &str) -> Option<String> {
    let policy = context.state.policy();
    let flow = policy.flow_for(policy.targets.get(target)?)?;
    let user = &context.identity.user;
    if !flow.step_up_totp {
        return None;
    }
    if context.state.totp_enrolled(user).await.unwrap_or(true) {
        return None;
    }
    let enroll = crate::session::hint::control_line(&context.state.config, &["totp", "enroll"]);
    Some(format!(
        "target '{target}' needs a TOTP step-up and {user} has no TOTP enrolled: run `{enroll}` first"
    ))
}

/// Returns the permit once the session's step-up is fresh enough for its flow:
/// passed within `step_up_max_age`, and after a human approved the grant (so a
/// ControlMaster that stepped up long ago cannot start a session under a grant
/// approved since). With a pty the code is asked for right here; without one the
/// user is told to reconnect.
async fn stepped_up(
    context: &ChannelContext,
    client: &mut ClientChannel,
    setup: &mut SessionSetup,
    permit: Permit,
) -> Option<Permit> {
    let policy = context.state.policy();
    let needed = policy
        .flow_for(&permit.target)
        .is_some_and(|flow| flow.step_up_totp);
    let Some(stale) = needed
        .then(|| stale_step_up(context, &permit.grant))
        .flatten()
    else {
        return Some(permit);
    };
    let target = &permit.target.name;
    if setup.pty.is_none() {
        let message = format!(
            "target '{target}' needs a TOTP step-up {stale}; reconnect and enter your code at the prompt (or connect with -t to be asked in the session)"
        );
        client.out.fail(&message, 1).await;
        return None;
    }
    let user = &context.identity.user;
    client
        .out
        .stderr(&format!(
            "portcullis: target '{target}' needs a TOTP step-up {stale}.\r\nTOTP code for {user}: "
        ))
        .await;
    let Some(code) = client
        .read_line(false, |msg| setup.keep_window_change(msg))
        .await
    else {
        client.out.fail("cancelled", 1).await;
        return None;
    };
    client.out.stderr("\r\n").await;
    match context
        .check_totp(&code, &format!("to start a session on {target}"))
        .await
    {
        Ok(()) => Some(permit),
        Err(why) => {
            client.out.fail(&why, 1).await;
            None
        }
    }
}

/// Why this connection's last step-up does not cover a session under `grant`, if
/// it does not. An auto-approved grant is filed by the session itself, so only the
/// age counts for it.
fn stale_step_up(context: &ChannelContext, grant: &crate::grant::Grant) -> Option<String> {
    let max_age = context.state.config.step_up_max_age;
    let Some(at) = context.identity.stepped_up_at() else {
        return Some("and this connection has not passed one".into());
    };
    if !context.identity.stepped_up_within(max_age) {
        return Some(format!(
            "within the last {}",
            crate::duration::format(max_age)
        ));
    }
    match grant.approved_at {
        Some(approved) if !grant.auto && at < approved => {
            Some(format!("newer than the approval of grant {}", grant.id))
        }
        _ => None,
    }
}

/// Whether the user's grants allow the session. The grants are read on the
/// blocking pool: on PostgreSQL each read is a round trip, which would stall the
/// other connections of this shard.
async fn decide(
    context: &ChannelContext,
    setup: &SessionSetup,
    start: &Start,
    target: &str,
    login: Option<&str>,
) -> Decision {
    let user = context.identity.user.as_str();
    let now = context.state.now();
    let (owner, place) = (user.to_string(), target.to_string());
    let active = (context.state)
        .blocking(move |state| state.grants.active_for(&owner, &place, now))
        .await;
    let grants = match active {
        Ok(grants) => grants,
        Err(err) => {
            return Decision::Deny(Box::new(Denial {
                reason: err.to_string(),
                requestable: None,
            }))
        }
    };
    let request = AccessRequest {
        user,
        target,
        login,
        action: start.action(),
        pty: setup.pty.is_some(),
    };
    authorize(&context.state.policy(), &grants, &request, now)
}

/// Files an `auto_approve` request covering what the client is doing (a shell grant
/// when the flow allows shells, which covers the next scp or rsync too).
async fn auto_approve(
    context: &ChannelContext,
    client: &ClientChannel,
    requestable: &Requestable,
    start: &Start,
    pty: bool,
) -> bool {
    let Some(scope) = scope_for(requestable, start, pty) else {
        client
            .out
            .fail(
                &format!(
                    "flow '{}' does not grant shells or terminals; run an allowed command without -t",
                    requestable.flow.name
                ),
                1,
            )
            .await;
        return false;
    };
    file_request(context, client, requestable, scope, "auto".to_string())
        .await
        .is_some()
}

/// Files a request for `requestable` with the flow's default ttl as the connected
/// user; on refusal the client is told why and `None` returned.
pub async fn file_request(
    context: &ChannelContext,
    client: &ClientChannel,
    requestable: &Requestable,
    scope: Scope,
    reason: String,
) -> Option<Grant> {
    let spec = RequestSpec {
        target: requestable.target.name.clone(),
        login: Some(requestable.login.clone()),
        scope,
        ttl: None,
        reason,
    };
    let (policy, user) = (context.state.policy(), context.identity.user.clone());
    // Filing syncs the store to disk: on the blocking pool.
    let filed = context
        .state
        .grants
        .run(move |grants| grants.file(&policy, &user, spec, grants.now()))
        .await;
    match filed {
        Ok(grant) => Some(grant),
        Err(err) => {
            client.out.fail(&err.to_string(), 1).await;
            None
        }
    }
}

/// The scope to request for `start`: the shell when the flow grants shells (or a
/// terminal is wanted), otherwise exactly the command or sftp.
pub fn scope_for(requestable: &Requestable, start: &Start, pty: bool) -> Option<Scope> {
    let flow = &requestable.flow;
    if flow.shell {
        return Some(Scope {
            shell: true,
            ..Scope::default()
        });
    }
    match start {
        _ if pty => None,
        Start::Shell => None,
        Start::Subsystem(name) if name == "sftp" => Some(Scope {
            sftp: true,
            ..Scope::default()
        }),
        Start::Subsystem(_) => None,
        Start::Exec(command) => Some(Scope {
            commands: vec![String::from_utf8_lossy(command).into_owned()],
            ..Scope::default()
        }),
    }
}

async fn audit_denial(context: &ChannelContext, start: &Start, target: &str, denial: &Denial) {
    let user = context.identity.user.as_str();
    tracing::warn!(user, target = %crate::display::escape(target), action = %crate::display::escape(&start.action().describe()), reason = %crate::display::escape(&denial.reason), "denied");
    // Denied either way; a failed append is logged.
    let _ = context
        .state
        .audit(
            AuditEvent::new(AuditKind::SessionDenied, user, Utc::now())
                .target(target)
                .detail("action", start.action().describe())
                .detail("reason", denial.reason.as_str()),
        )
        .await;
}
