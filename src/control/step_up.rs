//! TOTP on the control plane: `totp enroll`, `totp status`, and the approver's
//! step-up before deciding a request in a `step_up = "totp"` flow.

use chrono::{Duration, Utc};

use super::requests::{Caller, Reply};
use crate::audit::AuditEvent;
use crate::server::{ChannelContext, ClientChannel};
use crate::totp::Verdict;

/// A connection that passed TOTP this recently may decide without a new code.
const STEP_UP_VALID: Duration = Duration::minutes(5);

pub fn status(caller: &Caller) -> Reply {
    let status = caller
        .state
        .totp
        .status(caller.user, caller.now)
        .map_err(|e| e.to_string())?;
    let mut text = match status.enrolled_at {
        Some(at) => format!("TOTP: enrolled {}\n", at.format("%Y-%m-%d %H:%M UTC")),
        None => "TOTP: not enrolled; run `totp enroll`\n".to_string(),
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
/// it. Re-enrolling first needs a valid code of the current secret.
pub async fn enroll(context: &ChannelContext, client: &mut ClientChannel) -> Reply {
    let user = context.identity.user.as_str();
    let totp = &context.state.totp;
    if totp.is_enrolled(user).map_err(|e| e.to_string())? {
        check_code(context, client, None, "to replace your TOTP", true).await?;
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
        .ok_or("cancelled; nothing changed")?;
    let confirmed = totp
        .confirm(user, &enrolment, &code, Utc::now())
        .map_err(|e| e.to_string())?;
    if !confirmed {
        return Err("that code does not match the new secret; nothing changed. Check the app's clock and run `totp enroll` again".into());
    }
    context
        .state
        .audit(AuditEvent::new("totp.enrolled", user, Utc::now()));
    Ok(format!("TOTP enrolled for {user}\n"))
}

/// Before an approver decides request `id`: if its flow wants TOTP, the connection
/// must have passed TOTP in the last five minutes, or pass it now (`--totp CODE`,
/// or a prompt on a terminal).
pub async fn for_decision(
    context: &ChannelContext,
    client: &mut ClientChannel,
    caller: &Caller<'_>,
    id: &str,
    code: Option<String>,
) -> Result<(), String> {
    // A request the caller may not see must answer exactly like an unknown id, so
    // visibility is checked before anything that depends on the request's flow.
    let Ok(grant) = caller.visible(id) else {
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
        .stepped_up_at()
        .is_some_and(|at| Utc::now() - at < STEP_UP_VALID);
    if recent && code.is_none() {
        return Ok(());
    }
    check_code(context, client, code, &format!("to decide {id}"), false).await
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
) -> Result<(), String> {
    let user = context.identity.user.as_str();
    let code = match code {
        Some(code) => code,
        None if client.out.pty || ask_without_pty => {
            client
                .out
                .stderr(&format!("TOTP code for {user} ({purpose}): "))
                .await;
            client.read_line(false, |_| {}).await.ok_or("cancelled")?
        }
        None => return Err(format!("a TOTP code is needed {purpose}: add --totp CODE")),
    };
    let now = Utc::now();
    let verdict = context
        .state
        .totp
        .verify(user, &code, now)
        .map_err(|e| e.to_string())?;
    let kind = if verdict == Verdict::Accepted {
        "stepup.success"
    } else {
        "stepup.failure"
    };
    context.state.audit(
        AuditEvent::new(kind, user, now)
            .detail("purpose", purpose)
            .detail("result", verdict.explain(user)),
    );
    if verdict.locked_now() {
        context
            .state
            .audit(AuditEvent::new("stepup.locked", user, now).detail("purpose", purpose));
    }
    if verdict == Verdict::Accepted {
        context.identity.mark_stepped_up(now);
        Ok(())
    } else {
        Err(verdict.explain(user))
    }
}
