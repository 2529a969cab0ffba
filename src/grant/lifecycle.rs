//! The rules of a grant's life, as pure functions of the policy, the grant and the
//! time: who may request what, who may decide, when a grant expires. The service
//! ([`super::Grants`]) applies them under a lock and persists the result; keeping them
//! pure makes every rule testable without a database or a clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use thiserror::Error;

use super::scope::{pattern_within, Scope};
use super::{Approval, Ending, Grant, GrantState};
use crate::command::pattern_problem;
use crate::duration::format as format_duration;
use crate::policy::{Flow, Policy, Target};

/// The actor recorded for what the bastion does by itself (expiry, auto-approval).
pub const SYSTEM_ACTOR: &str = "portcullis";

/// TTL of a request that does not name one, unless the flow's `max_ttl` is shorter.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Longest reason, comment or denial text, in characters.
pub const MAX_TEXT: usize = 500;

/// Most command patterns in one request.
pub const MAX_COMMANDS: usize = 16;

/// A rule said no. The message says what was wrong and what to do instead.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct RuleError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, RuleError> {
    Err(RuleError(message.into()))
}

/// What an engineer asks for.
#[derive(Debug, Clone, Default)]
pub struct RequestSpec {
    pub target: String,
    /// `None`: the target's default login.
    pub login: Option<String>,
    pub scope: Scope,
    pub ttl: Option<Duration>,
    pub reason: String,
}

/// Validates a request against the policy and builds the grant: pending, or
/// approved at once when the flow auto-approves.
pub fn file_request(
    policy: &Policy,
    requester: &str,
    spec: RequestSpec,
    id: String,
    seq: u64,
    now: DateTime<Utc>,
) -> Result<Grant, RuleError> {
    let target = policy.targets.get(&spec.target).ok_or_else(|| {
        RuleError(format!(
            "unknown target '{}'; targets you may request: {}",
            crate::display::escape(&spec.target.chars().take(64).collect::<String>()),
            list_or_none(&policy.requestable_by(requester))
        ))
    })?;
    let login = spec
        .login
        .unwrap_or_else(|| target.default_login().to_string());
    if !target.logins.contains(&login) {
        return refuse(format!(
            "login '{login}' is not allowed on target '{}'; use --login with one of: {}",
            target.name,
            target.logins.join(", ")
        ));
    }
    let flow = flow_for(policy, target)?;
    if !policy.is_member(requester, &flow.requesters) {
        return refuse(format!(
            "you may not request access to '{}': flow '{}' accepts requests from {}",
            target.name,
            flow.name,
            flow.requesters.join(", ")
        ));
    }
    check_text("--reason", &spec.reason)?;
    check_scope(flow, &spec.scope)?;
    let ttl = match spec.ttl {
        Some(ttl) if ttl > flow.max_ttl => {
            return refuse(format!(
                "--ttl {} is longer than flow '{}' allows: max_ttl is {}; ask for --ttl {} or less",
                format_duration(ttl),
                flow.name,
                format_duration(flow.max_ttl),
                format_duration(flow.max_ttl)
            ))
        }
        Some(ttl) => ttl,
        None => DEFAULT_TTL.min(flow.max_ttl),
    };
    let mut grant = Grant {
        id,
        seq,
        requester: requester.to_string(),
        target: target.name.clone(),
        login,
        scope: spec.scope,
        ttl_secs: ttl.as_secs(),
        reason: spec.reason,
        flow: flow.name.clone(),
        approvals_needed: flow.approvals,
        state: GrantState::Pending,
        created_at: now,
        pending_until: now + flow.pending_ttl,
        approvals: Vec::new(),
        approved_at: None,
        expires_at: None,
        ended: None,
        auto: flow.auto_approve,
    };
    if flow.auto_approve {
        grant.approvals.push(Approval {
            by: SYSTEM_ACTOR.to_string(),
            at: now,
            comment: Some(format!("auto_approve in flow '{}'", flow.name)),
        });
        activate(&mut grant, now);
    }
    Ok(grant)
}

/// Records `approver`'s approval; the grant becomes active once it has as many
/// distinct approvals as its flow needs.
pub fn approve(
    grant: &mut Grant,
    policy: &Policy,
    approver: &str,
    comment: Option<String>,
    now: DateTime<Utc>,
) -> Result<(), RuleError> {
    check_decidable(grant, now)?;
    check_decider(grant, policy, approver, "approve")?;
    if let Some(comment) = &comment {
        check_text("--comment", comment)?;
    }
    if grant.approvals.iter().any(|a| a.by == approver) {
        return refuse(format!(
            "you already approved {}; it needs {} distinct approvers and has {}",
            grant.id,
            grant.approvals_needed,
            grant.approvals.len()
        ));
    }
    grant.approvals.push(Approval {
        by: approver.to_string(),
        at: now,
        comment,
    });
    // Only approvals by people who are approvers *now* count: one cast by someone
    // since removed from the policy (or from the approvers) no longer vouches.
    let standing = grant
        .approvals
        .iter()
        .filter(|a| is_approver(grant, policy, &a.by))
        .count();
    if standing >= grant.approvals_needed as usize {
        activate(grant, now);
    }
    Ok(())
}

/// Denies a pending request for good.
pub fn deny(
    grant: &mut Grant,
    policy: &Policy,
    approver: &str,
    reason: String,
    now: DateTime<Utc>,
) -> Result<(), RuleError> {
    check_decidable(grant, now)?;
    check_decider(grant, policy, approver, "deny")?;
    check_text("--reason", &reason)?;
    end(grant, GrantState::Denied, approver, Some(reason), now);
    Ok(())
}

/// Ends an approved grant (revoked) or withdraws a pending request (cancelled). The
/// requester may always do it; otherwise only the flow's approvers.
pub fn revoke(
    grant: &mut Grant,
    policy: &Policy,
    user: &str,
    reason: Option<String>,
    now: DateTime<Utc>,
) -> Result<(), RuleError> {
    if user != grant.requester && !is_approver(grant, policy, user) {
        return refuse(format!(
            "only {} or an approver of flow '{}' may revoke {}",
            grant.requester, grant.flow, grant.id
        ));
    }
    if let Some(reason) = &reason {
        check_text("--reason", reason)?;
    }
    expire_if_due(grant, now);
    let state = match grant.state {
        GrantState::Approved => GrantState::Revoked,
        GrantState::Pending => GrantState::Cancelled,
        done => return refuse(format!("{} is already {done}; nothing to revoke", grant.id)),
    };
    end(grant, state, user, reason, now);
    Ok(())
}

/// Ends a live grant on the bastion's own authority (its requester left the
/// policy): an approved grant is revoked, a pending request cancelled.
pub fn withdraw(grant: &mut Grant, reason: &str, now: DateTime<Utc>) -> Result<(), RuleError> {
    let state = match grant.state {
        GrantState::Approved => GrantState::Revoked,
        GrantState::Pending => GrantState::Cancelled,
        done => return refuse(format!("{} is already {done}", grant.id)),
    };
    end(grant, state, SYSTEM_ACTOR, Some(reason.to_string()), now);
    Ok(())
}

/// Marks a pending request past its `pending_until`, or a grant past its expiry, as
/// expired. Returns whether it did.
pub fn expire_if_due(grant: &mut Grant, now: DateTime<Utc>) -> bool {
    let due = grant.state.is_live() && grant.deadline().is_some_and(|at| at <= now);
    if due {
        let reason = match grant.state {
            GrantState::Pending => "nobody decided in time",
            _ => "ttl elapsed",
        };
        end(
            grant,
            GrantState::Expired,
            SYSTEM_ACTOR,
            Some(reason.into()),
            now,
        );
    }
    due
}

/// Whether `user` is an approver of the flow that now matches the grant's target.
pub fn is_approver(grant: &Grant, policy: &Policy, user: &str) -> bool {
    approvers_of(grant, policy).is_some_and(|approvers| policy.is_member(user, approvers))
}

/// The approvers of the flow that now matches the grant's target.
pub fn approvers_of<'p>(grant: &Grant, policy: &'p Policy) -> Option<&'p [String]> {
    let target = policy.targets.get(&grant.target)?;
    Some(&policy.flow_for(target)?.approvers)
}

/// `a, b, c`, or `(none)`.
pub fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// The flow for `target`, or an error saying none matches.
pub fn flow_for<'p>(policy: &'p Policy, target: &Target) -> Result<&'p Flow, RuleError> {
    policy.flow_for(target).ok_or_else(|| {
        RuleError(format!(
            "target '{}' cannot be requested: no flow in flows.toml matches its labels {:?}; ask an operator to add one",
            target.name, target.labels
        ))
    })
}

fn activate(grant: &mut Grant, now: DateTime<Utc>) {
    grant.state = GrantState::Approved;
    grant.approved_at = Some(now);
    grant.expires_at = Some(now + Duration::from_secs(grant.ttl_secs));
}

fn end(grant: &mut Grant, state: GrantState, by: &str, reason: Option<String>, now: DateTime<Utc>) {
    grant.state = state;
    grant.ended = Some(Ending {
        by: by.to_string(),
        at: now,
        reason,
    });
}

fn check_decidable(grant: &mut Grant, now: DateTime<Utc>) -> Result<(), RuleError> {
    expire_if_due(grant, now);
    match grant.state {
        GrantState::Pending => Ok(()),
        state => refuse(format!(
            "{} is {state}, not pending; it can no longer be decided",
            grant.id
        )),
    }
}

fn check_decider(grant: &Grant, policy: &Policy, user: &str, verb: &str) -> Result<(), RuleError> {
    if user == grant.requester {
        return refuse(format!(
            "you cannot {verb} your own request; ask an approver of flow '{}'{}",
            grant.flow,
            approvers_of(grant, policy)
                .map(|a| format!(" ({})", a.join(", ")))
                .unwrap_or_default()
        ));
    }
    if !is_approver(grant, policy, user) {
        return refuse(format!(
            "you are not an approver for {} (flow '{}')",
            grant.id, grant.flow
        ));
    }
    Ok(())
}

fn check_scope(flow: &Flow, scope: &Scope) -> Result<(), RuleError> {
    if !scope.shell && !scope.sftp && scope.commands.is_empty() {
        return refuse("say what you need: --shell, --sftp and/or --command PATTERN");
    }
    if scope.shell && !flow.shell {
        return refuse(format!(
            "flow '{}' does not grant shells (shell = false); ask for --command PATTERN instead",
            flow.name
        ));
    }
    if scope.sftp && !flow.shell && !flow.commands.is_empty() {
        return refuse(format!(
            "flow '{}' only grants the commands {}; sftp is not among them",
            flow.name,
            flow.commands.join(", ")
        ));
    }
    if scope.commands.len() > MAX_COMMANDS {
        return refuse(format!(
            "at most {MAX_COMMANDS} --command patterns per request"
        ));
    }
    for pattern in &scope.commands {
        if let Some(problem) = pattern_problem(pattern) {
            return refuse(format!(
                "--command {:?} contains {problem}; patterns are plain words with * (within a path segment) and ** (a whole path segment) as the only wildcards",
                pattern.chars().take(80).collect::<String>()
            ));
        }
        if !flow.commands.is_empty() && !flow.commands.iter().any(|f| pattern_within(pattern, f)) {
            return refuse(format!(
                "--command '{pattern}' is outside what flow '{}' allows: {}",
                flow.name,
                flow.commands.join(", ")
            ));
        }
    }
    Ok(())
}

/// Reasons and comments: present, not huge, printable, and read the same by
/// everyone: no control characters (which could rewrite an approver's screen) and
/// no Unicode format characters (bidi overrides and zero-width characters, which
/// make text read differently from what it is).
fn check_text(flag: &str, text: &str) -> Result<(), RuleError> {
    if text.trim().is_empty() {
        return refuse(format!(
            "{flag} must not be empty: say why, e.g. {flag} \"INC-4411: disk full\""
        ));
    }
    if text.chars().count() > MAX_TEXT {
        return refuse(format!("{flag} is longer than {MAX_TEXT} characters"));
    }
    if text.chars().any(char::is_control) {
        return refuse(format!("{flag} must not contain control characters"));
    }
    if let Some(c) = text.chars().find(|c| crate::display::is_format(*c)) {
        return refuse(format!(
            "{flag} must not contain invisible formatting characters such as bidi overrides or zero-width spaces (found U+{:04X}); retype it as plain text",
            c as u32
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBnPj0TH2hTmIobo5mbbFnqBThDCSdHTvEKAbAeRh9+H";

    fn policy() -> Policy {
        let users = ["alice", "bob", "carol", "dave"]
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let group = if i == 0 { "engineers" } else { "sre" };
                let key = russh::keys::PrivateKey::random(
                    &mut rand::rng(),
                    russh::keys::Algorithm::Ed25519,
                )
                .unwrap();
                let key = key.public_key().to_openssh().unwrap();
                format!("[users.{u}]\nkeys = [\"{key}\"]\ngroups = [\"{group}\"]\n")
            })
            .collect::<String>();
        crate::policy::from_texts(
            &users,
            &format!(
                "[targets.db]\naddress = \"127.0.0.1\"\nhost_key = \"{KEY}\"\nlogins = [\"postgres\"]\nlabels = {{ env = \"production\" }}\n\
                 [targets.web]\naddress = \"127.0.0.1\"\nhost_key = \"{KEY}\"\nlogins = [\"ubuntu\"]\nlabels = {{ env = \"staging\" }}\n\
                 [targets.lab]\naddress = \"127.0.0.1\"\nhost_key = \"{KEY}\"\nlogins = [\"ubuntu\"]\n"
            ),
            "[[flows]]\nname = \"production\"\nmatch = { env = \"production\" }\nrequesters = [\"group:engineers\"]\n\
             approvers = [\"group:sre\", \"alice\"]\napprovals = 2\nmax_ttl = \"1h\"\nshell = false\ncommands = [\"uname *\", \"id\"]\n\
             [[flows]]\nname = \"staging\"\nmatch = { env = \"staging\" }\nrequesters = [\"group:engineers\"]\nauto_approve = true\nshell = true\n",
        )
    }

    fn commands(list: &[&str]) -> Scope {
        Scope {
            commands: list.iter().map(|c| c.to_string()).collect(),
            ..Scope::default()
        }
    }

    fn spec(target: &str, scope: Scope) -> RequestSpec {
        RequestSpec {
            target: target.into(),
            scope,
            reason: "INC-1".into(),
            ..RequestSpec::default()
        }
    }

    fn request(user: &str, spec: RequestSpec) -> Result<Grant, RuleError> {
        file_request(&policy(), user, spec, "abc123".into(), 1, Utc::now())
    }

    fn error(result: Result<impl std::fmt::Debug, RuleError>) -> String {
        result.unwrap_err().0
    }

    #[test]
    fn only_requesters_may_request_and_scope_must_fit_the_flow() {
        let grant = request("alice", spec("db", commands(&["uname -a"]))).unwrap();
        assert_eq!(
            (grant.state, grant.login.as_str()),
            (GrantState::Pending, "postgres")
        );
        assert_eq!(grant.ttl_secs, 3600);
        assert!(error(request("bob", spec("db", commands(&["id"]))))
            .contains("accepts requests from group:engineers"));
        let shell = Scope {
            shell: true,
            ..Scope::default()
        };
        assert!(error(request("alice", spec("db", shell))).contains("does not grant shells"));
        assert!(error(request("alice", spec("db", commands(&["rm -rf /"]))))
            .contains("outside what flow"));
        assert!(error(request("alice", spec("db", commands(&["id; rm"])))).contains("';'"));
        assert!(error(request("alice", spec("db", Scope::default()))).contains("--shell, --sftp"));
        assert!(error(request("alice", spec("lab", commands(&["id"])))).contains("no flow"));
        assert!(error(request("alice", spec("nope", commands(&["id"]))))
            .contains("targets you may request: db, web"));
        assert!(error(request("bob", spec("nope", commands(&["id"]))))
            .ends_with("targets you may request: (none)"));
        let mut long = spec("db", commands(&["id"]));
        long.ttl = Some(Duration::from_secs(7200));
        assert!(error(request("alice", long)).contains("max_ttl is 1h"));
        let mut bad_login = spec("db", commands(&["id"]));
        bad_login.login = Some("root".into());
        assert!(error(request("alice", bad_login)).contains("one of: postgres"));
        let mut no_reason = spec("db", commands(&["id"]));
        no_reason.reason = " ".into();
        assert!(error(request("alice", no_reason)).contains("--reason must not be empty"));
        let mut control = spec("db", commands(&["id"]));
        control.reason = "a\u{1b}[2Jb".into();
        assert!(error(request("alice", control)).contains("control characters"));
        for hidden in [
            "INC-1 \u{202e}nimda",
            "a\u{200b}b",
            "x\u{2066}y",
            "l\u{2028}2",
        ] {
            let mut bidi = spec("db", commands(&["id"]));
            bidi.reason = hidden.into();
            let message = error(request("alice", bidi));
            assert!(message.contains("invisible formatting"), "{message}");
            assert!(!message.contains(hidden), "the refusal does not echo it");
        }
    }

    #[test]
    fn approvals_need_distinct_approvers_other_than_the_requester() {
        let policy = policy();
        let now = Utc::now();
        let mut grant = request("alice", spec("db", commands(&["id"]))).unwrap();
        assert!(
            error(approve(&mut grant, &policy, "alice", None, now)).contains("your own request")
        );
        assert!(
            error(approve(&mut grant, &policy, "mallory", None, now)).contains("not an approver")
        );
        approve(&mut grant, &policy, "bob", None, now).unwrap();
        assert_eq!(grant.state, GrantState::Pending);
        assert!(error(approve(&mut grant, &policy, "bob", None, now)).contains("already approved"));
        approve(&mut grant, &policy, "carol", Some("ok".into()), now).unwrap();
        assert_eq!(grant.state, GrantState::Approved);
        assert_eq!(grant.expires_at, Some(now + Duration::from_secs(3600)));
        assert!(grant.is_active(now));
        assert!(error(approve(&mut grant, &policy, "dave", None, now)).contains("not pending"));
    }

    #[test]
    fn ended_grants_never_come_back() {
        let policy = policy();
        let now = Utc::now();
        let mut denied = request("alice", spec("db", commands(&["id"]))).unwrap();
        assert!(error(deny(&mut denied, &policy, "alice", "x".into(), now)).contains("your own"));
        deny(&mut denied, &policy, "bob", "not now".into(), now).unwrap();
        assert_eq!(denied.state, GrantState::Denied);
        assert!(approve(&mut denied, &policy, "carol", None, now).is_err());
        assert!(revoke(&mut denied, &policy, "alice", None, now).is_err());

        let mut granted = request("alice", spec("db", commands(&["id"]))).unwrap();
        approve(&mut granted, &policy, "bob", None, now).unwrap();
        approve(&mut granted, &policy, "carol", None, now).unwrap();
        let later = now + Duration::from_secs(3600);
        assert!(!granted.is_active(later));
        assert!(expire_if_due(&mut granted, later));
        assert_eq!(granted.state, GrantState::Expired);
        assert!(
            error(revoke(&mut granted, &policy, "bob", None, later)).contains("already expired")
        );

        let mut pending = request("alice", spec("db", commands(&["id"]))).unwrap();
        let too_late = now + Duration::from_secs(3601);
        assert!(error(approve(&mut pending, &policy, "bob", None, too_late)).contains("expired"));

        let mut withdrawn = request("alice", spec("db", commands(&["id"]))).unwrap();
        assert!(error(revoke(&mut withdrawn, &policy, "mallory", None, now)).contains("only alice"));
        revoke(&mut withdrawn, &policy, "alice", None, now).unwrap();
        assert_eq!(withdrawn.state, GrantState::Cancelled);
    }

    #[test]
    fn auto_approve_grants_at_once() {
        let shell = Scope {
            shell: true,
            ..Scope::default()
        };
        let grant = request("alice", spec("web", shell)).unwrap();
        assert_eq!(grant.state, GrantState::Approved);
        assert!(grant.auto);
        assert_eq!(grant.approvals[0].by, SYSTEM_ACTOR);
    }
}
