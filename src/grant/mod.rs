//! Grants: the model, its lifecycle, scope matching, and the single authorisation
//! decision.
//!
//! Every channel request that would reach a target goes through [`authorize`], so the
//! rules live in one place and one test suite: a user may do something on a target only
//! while they hold an approved, unexpired grant for that exact target and login whose
//! scope covers it.

pub use crate::command;
mod clock;
pub mod lifecycle;
mod model;
pub mod notify;
pub mod scope;
mod service;
mod table;

use chrono::{DateTime, Utc};

use crate::policy::{Flow, Policy, Target, UpstreamAuth};

pub use clock::Clock;
pub use lifecycle::{RequestSpec, RuleError};
pub use model::{Approval, Ending, Grant, GrantState};
pub use scope::Scope;
pub use service::{GrantError, Grants, RequestLimits};

/// What the client asked to run on its session channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    Shell,
    Exec(&'a [u8]),
    Subsystem(&'a str),
}

impl Action<'_> {
    /// A short description for logs and messages.
    pub fn describe(&self) -> String {
        match self {
            Action::Shell => "shell".to_string(),
            Action::Exec(command) => format!("exec {:?}", String::from_utf8_lossy(command)),
            Action::Subsystem(name) => format!("subsystem {name}"),
        }
    }
}

/// One request for access, as seen by the bastion.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    pub user: &'a str,
    pub target: &'a str,
    /// `None` asks for the target's default login.
    pub login: Option<&'a str>,
    pub action: Action<'a>,
    /// Whether the channel asked for a pseudo-terminal.
    pub pty: bool,
}

/// Where an allowed request goes, under which grant, and what exactly runs there.
#[derive(Debug, Clone)]
pub struct Permit {
    pub target: Target,
    pub login: String,
    pub grant: Grant,
    /// The canonical command line the target runs instead of the client's string:
    /// set for every exec under a command grant.
    pub command: Option<String>,
    /// A provable file transfer (sftp forced to `internal-sftp` by a certificate):
    /// the only sessions that may be recorded as metadata.
    pub file_transfer: bool,
}

/// Why a request was refused, and whether filing a request could change that.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Shown to the user: what was wrong and what they can do.
    pub reason: String,
    /// Set when the user may request a grant for this target and login.
    pub requestable: Option<Requestable>,
}

/// What a refused user could request.
#[derive(Debug, Clone)]
pub struct Requestable {
    pub target: Target,
    pub login: String,
    pub flow: Flow,
}

#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Box<Permit>),
    Deny(Box<Denial>),
}

fn deny(reason: String, requestable: Option<Requestable>) -> Decision {
    Decision::Deny(Box::new(Denial {
        reason,
        requestable,
    }))
}

/// Decides a request against the policy and the user's grants for the target.
pub fn authorize(
    policy: &Policy,
    grants: &[Grant],
    request: &AccessRequest,
    now: DateTime<Utc>,
) -> Decision {
    if !policy.users.contains_key(request.user) {
        return deny(
            format!("user {:?} is not in the policy", request.user),
            None,
        );
    }
    let Some(target) = policy.targets.get(request.target) else {
        return deny(
            format!(
                "unknown target '{}'. Targets you may request: {}",
                crate::display::escape(request.target),
                lifecycle::list_or_none(&policy.requestable_by(request.user))
            ),
            None,
        );
    };
    let login = request.login.unwrap_or(target.default_login());
    if !target.logins.iter().any(|allowed| allowed == login) {
        return deny(
            format!(
                "login '{login}' is not allowed on target '{}'. Allowed logins: {}",
                target.name,
                target.logins.join(", ")
            ),
            None,
        );
    }
    let requestable = policy
        .flow_for(target)
        .filter(|flow| policy.is_member(request.user, &flow.requesters))
        .map(|flow| Requestable {
            target: target.clone(),
            login: login.to_string(),
            flow: flow.clone(),
        });
    let mut held: Vec<&Grant> = grants
        .iter()
        .filter(|g| {
            g.requester == request.user
                && g.target == target.name
                && g.login == login
                && g.is_active(now)
        })
        .collect();
    // Prefer the grant that lasts longest, so a session outlives a shorter overlap.
    held.sort_by_key(|g| std::cmp::Reverse(g.expires_at));
    let mut refusals = Vec::new();
    for grant in &held {
        match grant.scope.covers(&request.action, request.pty) {
            Ok(compared) => {
                let (command, file_transfer) = what_runs(request, target, compared);
                return Decision::Allow(Box::new(Permit {
                    target: target.clone(),
                    login: login.to_string(),
                    grant: (*grant).clone(),
                    command,
                    file_transfer,
                }));
            }
            Err(why) => refusals.push(format!("grant {}: {why}", grant.id)),
        }
    }
    if !refusals.is_empty() {
        return deny(
            format!(
                "not covered by your grants for {login}@{} ({})",
                target.name,
                refusals.join("; ")
            ),
            requestable,
        );
    }
    let hint = match (&requestable, policy.flow_for(target)) {
        (Some(_), _) => "request one first".to_string(),
        (None, Some(flow)) => format!(
            "flow '{}' accepts requests only from {}",
            flow.name,
            flow.requesters.join(", ")
        ),
        (None, None) => "no approval flow matches this target, so it cannot be requested".into(),
    };
    deny(
        format!("no active grant for {login}@{}; {hint}", target.name),
        requestable,
    )
}

/// The canonical command to run (the compared words of a command grant; anything
/// under a shell grant runs as asked, since the grant allows it all) and whether
/// the session is a provable file transfer.
///
/// Only an sftp subsystem on a certificate-mode target is provable: its
/// certificate forces `internal-sftp`, which sshd runs in-process, without the
/// login shell. Everything else starts through `$SHELL -c`, whose start-up files
/// (`~/.bashrc` under sshd, `~/.zshenv`) the user may have written, so an `scp -t`
/// or `rsync --server` could be an interactive shell in disguise.
fn what_runs(
    request: &AccessRequest,
    target: &Target,
    compared: Option<Vec<String>>,
) -> (Option<String>, bool) {
    let file_transfer = matches!(request.action, Action::Subsystem("sftp"))
        && !request.pty
        && target.auth == UpstreamAuth::Certificate;
    (compared.as_deref().map(command::canonical), file_transfer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBnPj0TH2hTmIobo5mbbFnqBThDCSdHTvEKAbAeRh9+H";

    fn policy() -> Policy {
        crate::policy::from_texts(
            &format!("[users.alice]\nkeys = [\"{KEY}\"]\ngroups = [\"eng\"]\n"),
            &format!("[targets.db]\naddress = \"127.0.0.1\"\nhost_key = \"{KEY}\"\nlogins = [\"postgres\", \"ubuntu\"]\nlabels = {{ env = \"prod\" }}\n"),
            "[[flows]]\nname = \"prod\"\nmatch = { env = \"prod\" }\nrequesters = [\"group:eng\"]\napprovers = [\"bob\"]\n",
        )
    }

    fn grant(login: &str, scope: Scope, now: DateTime<Utc>) -> Grant {
        let spec = RequestSpec {
            target: "db".into(),
            login: Some(login.into()),
            scope,
            ttl: None,
            reason: "test".into(),
        };
        let mut grant =
            lifecycle::file_request(&policy(), "alice", spec, "abcdef".into(), 1, now).unwrap();
        grant.state = GrantState::Approved;
        grant.expires_at = Some(now + std::time::Duration::from_secs(60));
        grant
    }

    fn decide(grants: &[Grant], target: &str, login: Option<&str>, action: Action) -> Decision {
        let request = AccessRequest {
            user: "alice",
            target,
            login,
            action,
            pty: false,
        };
        authorize(&policy(), grants, &request, Utc::now())
    }

    fn reason(decision: Decision) -> Box<Denial> {
        match decision {
            Decision::Deny(denial) => denial,
            Decision::Allow(permit) => panic!("allowed under {}", permit.grant.id),
        }
    }

    #[test]
    fn nothing_without_a_grant() {
        let denial = reason(decide(&[], "db", None, Action::Shell));
        assert_eq!(
            denial.reason,
            "no active grant for postgres@db; request one first"
        );
        let requestable = denial.requestable.expect("alice may request");
        assert_eq!(
            (requestable.login.as_str(), requestable.flow.name.as_str()),
            ("postgres", "prod")
        );
    }

    #[test]
    fn a_grant_covers_only_its_login_scope_and_time() {
        let now = Utc::now();
        let ids = Scope {
            commands: vec!["id".into()],
            ..Scope::default()
        };
        let grants = [grant("postgres", ids, now)];
        assert!(matches!(
            decide(&grants, "db", None, Action::Exec(b"id")),
            Decision::Allow(_)
        ));
        let denial = reason(decide(&grants, "db", None, Action::Exec(b"id -u")));
        assert!(
            denial
                .reason
                .contains("matches none of the granted commands ('id')"),
            "{}",
            denial.reason
        );
        assert!(
            reason(decide(&grants, "db", Some("ubuntu"), Action::Exec(b"id")))
                .reason
                .contains("no active grant for ubuntu@db")
        );
        let mut expired = grants.clone();
        expired[0].expires_at = Some(now - chrono::Duration::seconds(1));
        assert!(matches!(
            decide(&expired, "db", None, Action::Exec(b"id")),
            Decision::Deny(_)
        ));
        let mut revoked = grants.clone();
        revoked[0].state = GrantState::Revoked;
        assert!(matches!(
            decide(&revoked, "db", None, Action::Exec(b"id")),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn denials_say_what_to_use() {
        let denial = reason(decide(&[], "nowhere", None, Action::Shell));
        assert_eq!(
            denial.reason,
            "unknown target 'nowhere'. Targets you may request: db"
        );
        assert!(denial.requestable.is_none());
        let denial = reason(decide(&[], "db", Some("root"), Action::Shell));
        assert!(
            denial.reason.contains("not allowed") && denial.reason.contains("postgres, ubuntu"),
            "{}",
            denial.reason
        );
    }
}
