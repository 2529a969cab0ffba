//! TOTP on the control plane: `totp enroll`, `totp status`, and the approver's
//! step-up before deciding a request in a `step_up = "totp"` flow.

use chrono::Utc;

use super::cmd::Call;
use super::error::{ControlError, Reply};
use super::requests::Caller;
use crate::audit::{AuditEvent, AuditKind};
use crate::session::{ChannelContext, ClientChannel};
use crate::totp::invite;

pub async fn status(context: &ChannelContext, caller: &Caller<'_>) -> Reply {
    // TOTP runs on the wall clock, as authenticator apps do. Read on the blocking
    // pool: a round trip on PostgreSQL.
    let user = caller.user.to_string();
    let status = (context.state)
        .blocking(move |state| state.totp.status(&user, Utc::now()))
        .await?;
    let mut text = match status.enrolled_at {
        Some(at) => format!("TOTP: enrolled {}\n", at.format("%Y-%m-%d %H:%M UTC")),
        None => format!(
            "TOTP: not enrolled; run `{}`\n",
            crate::session::hint::control_line(&caller.state.config, &["totp", "enroll"])
        ),
    };
    if let Some(until) = status.locked_until {
        text.push_str(&format!(
            "step-up locked until {} after repeated wrong codes\n",
            until.format("%H:%M:%S UTC")
        ));
    }
    Ok(text)
}

/// Shows a fresh secret, then activates it once the user types a valid code from
/// it. Re-enrolling first needs a valid code of the current secret; a first
/// enrolment needs the operator's one-time code when `totp_require_invite` is set.
pub async fn enroll(
    context: &ChannelContext,
    client: &mut ClientChannel,
    invite: Option<String>,
) -> Reply {
    let user = context.identity.user.as_str();
    let totp = &context.state.totp;
    let mut invited = None;
    if context.state.totp_enrolled(user).await? {
        check_code(context, client, None, "to replace your TOTP", true).await?;
    } else if context.state.config.totp_require_invite {
        invited = Some(check_invite(context, client, invite).await?);
    }
    let enrolment = totp.begin_enrolment(user);
    client
        .out
        .stdout(&format!(
            "Scan this QR code with your authenticator app (or add the URL by hand):\n\n{}\n{}\n\n",
            enrolment.qr, enrolment.url
        ))
        .await;
    client.out.stderr("Code shown by the app: ").await;
    let code = client
        .read_line(true, |_| {})
        .await
        .ok_or(ControlError::refused("cancelled; nothing changed"))?;
    // Storing the secret syncs it to disk: on the blocking pool.
    let enrolling = user.to_string();
    let confirmed = context
        .state
        .blocking(move |state| {
            state
                .totp
                .confirm(&enrolling, &enrolment, &code, Utc::now())
        })
        .await?;
    if !confirmed {
        return Err(ControlError::refused(format!(
            "that code does not match the new secret; nothing changed. Check the app's clock and run `{}` again",
            crate::session::hint::control_line(&context.state.config, &["totp", "enroll"])
        )));
    }
    let mut event = AuditEvent::new(AuditKind::TotpEnrolled, user, Utc::now());
    if let Some(claim) = invited {
        event = event.detail("invite_issued_at", claim.issued_at.to_rfc3339());
        claim.consume();
    }
    // The secret is active now; with the disk full, storing it would have failed
    // first, so this refusal only catches a disk that filled in between.
    context
        .state
        .audit_or_refuse(event)
        .await
        .map_err(ControlError::Refused)?;
    Ok(format!("TOTP enrolled for {user}\n"))
}

/// The operator's enrolment code, from `--invite` or asked for, claimed so that no
/// other enrolment can use it meanwhile (it is released if this one fails). A
/// refusal is an audit event: it may be a stolen key trying to enrol.
async fn check_invite(
    context: &ChannelContext,
    client: &mut ClientChannel,
    given: Option<String>,
) -> Result<invite::Claim, ControlError> {
    let user = context.identity.user.as_str();
    let code = match given {
        Some(code) => code,
        None => {
            client
                .out
                .stderr("Enrolment code from your operator (portcullis totp invite): ")
                .await;
            client
                .read_line(true, |_| {})
                .await
                .ok_or(ControlError::refused("cancelled; nothing changed"))?
        }
    };
    match invite::claim(&context.state.config.data_dir, user, &code, Utc::now()) {
        Ok(claim) => Ok(claim),
        Err(err) => {
            // Refused either way; a failed append is logged.
            let _ = context
                .state
                .audit(
                    AuditEvent::new(AuditKind::TotpInviteRefused, user, Utc::now())
                        .detail("reason", err.to_string()),
                )
                .await;
            Err(ControlError::Refused(err.to_string()))
        }
    }
}

/// Before an approver decides request `id`: if its flow wants TOTP, the connection
/// must have passed TOTP within `step_up_max_age`, or pass it now (`--totp CODE`,
/// or a prompt on a terminal).
pub async fn for_decision(
    call: &mut Call<'_>,
    id: &str,
    code: Option<String>,
) -> Result<(), ControlError> {
    let (context, caller) = (call.context, &call.caller);
    // A request the caller may not see must answer exactly like an unknown id, so
    // visibility is checked before anything that depends on the request's flow.
    let Ok(grant) = caller.visible(id).await else {
        return Ok(()); // the decision itself reports the bad, unknown or invisible id
    };
    let policy = &caller.policy;
    let step_up = policy
        .targets
        .get(&grant.target)
        .and_then(|target| policy.flow_for(target))
        .is_some_and(|flow| flow.step_up_totp);
    if !step_up {
        return Ok(());
    }
    let recent = context
        .identity
        .stepped_up_within(context.state.config.step_up_max_age);
    if recent && code.is_none() {
        return Ok(());
    }
    check_code(
        context,
        call.client,
        code,
        &format!("to decide {id}"),
        false,
    )
    .await
}

/// Checks a TOTP code given on the command line, or asks for one: on a terminal,
/// or also on plain stdin when `ask_without_pty` (enrolment reads its input anyway;
/// a decision should not sit waiting on a script's stdin).
async fn check_code(
    context: &ChannelContext,
    client: &mut ClientChannel,
    code: Option<String>,
    purpose: &str,
    ask_without_pty: bool,
) -> Result<(), ControlError> {
    let user = context.identity.user.as_str();
    let code = match code {
        Some(code) => code,
        None if client.out.pty || ask_without_pty => {
            client
                .out
                .stderr(&format!("TOTP code for {user} ({purpose}): "))
                .await;
            client
                .read_line(false, |_| {})
                .await
                .ok_or(ControlError::refused("cancelled"))?
        }
        None => {
            return Err(ControlError::refused(format!(
                "a TOTP code is needed {purpose}: add --totp CODE"
            )))
        }
    };
    context
        .check_totp(&code, purpose)
        .await
        .map_err(ControlError::Refused)
}
