//! The single authorisation decision: may this user do this on this target as this login?
//!
//! Every channel request that would reach a target goes through [`authorize`], so the
//! rules live in one place and one test suite.

use crate::policy::{Policy, Target};

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
}

/// Where an allowed request goes.
#[derive(Debug, Clone)]
pub struct Permit {
    pub target: Target,
    pub login: String,
}

#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Box<Permit>),
    /// The reason is shown to the user: it says what was wrong and what they can use.
    Deny(String),
}

/// Decides a request against the current policy.
pub fn authorize(policy: &Policy, request: &AccessRequest) -> Decision {
    if !policy.users.contains_key(request.user) {
        return Decision::Deny(format!("user {:?} is not in the policy", request.user));
    }
    let Some(target) = policy.targets.get(request.target) else {
        return Decision::Deny(format!(
            "unknown target '{}'. Targets you can use: {}",
            request.target,
            list_or_none(policy.targets.keys())
        ));
    };
    let login = request.login.unwrap_or(target.default_login());
    if !target.logins.iter().any(|allowed| allowed == login) {
        return Decision::Deny(format!(
            "login '{login}' is not allowed on target '{}'. Allowed logins: {}",
            target.name,
            target.logins.join(", ")
        ));
    }
    Decision::Allow(Box::new(Permit {
        target: target.clone(),
        login: login.to_string(),
    }))
}

fn list_or_none<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBnPj0TH2hTmIobo5mbbFnqBThDCSdHTvEKAbAeRh9+H";

    fn policy() -> Policy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("users.toml"),
            format!("[users.alice]\nkeys = [\"{KEY}\"]\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("targets.toml"),
            format!("[targets.db]\naddress = \"127.0.0.1\"\nhost_key = \"{KEY}\"\nlogins = [\"postgres\", \"ubuntu\"]\n"),
        )
        .unwrap();
        crate::policy::load_dir(dir.path()).unwrap()
    }

    fn decide(user: &str, target: &str, login: Option<&str>) -> Decision {
        authorize(
            &policy(),
            &AccessRequest {
                user,
                target,
                login,
                action: Action::Shell,
            },
        )
    }

    #[test]
    fn default_login_is_the_first() {
        match decide("alice", "db", None) {
            Decision::Allow(permit) => assert_eq!(permit.login, "postgres"),
            Decision::Deny(reason) => panic!("{reason}"),
        }
    }

    #[test]
    fn denials_say_what_to_use() {
        let Decision::Deny(reason) = decide("alice", "nowhere", None) else {
            panic!()
        };
        assert_eq!(reason, "unknown target 'nowhere'. Targets you can use: db");
        let Decision::Deny(reason) = decide("alice", "db", Some("root")) else {
            panic!()
        };
        assert!(
            reason.contains("not allowed") && reason.contains("postgres, ubuntu"),
            "{reason}"
        );
        assert!(matches!(decide("mallory", "db", None), Decision::Deny(_)));
    }
}
