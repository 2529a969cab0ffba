//! Policies: who may connect (users and their keys), where to (targets with pinned host
//! keys), and under which approval flow. Loaded from `policies/*.toml`, validated as a
//! whole, and swapped in atomically so a bad edit never replaces a good policy.

mod error;
mod files;
mod lint;
mod load;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use russh::keys::{HashAlg, PublicKey};

pub use error::{describe_toml_error, PolicyError, PolicyErrors};

/// The reserved username that reaches the control plane; no user or target may
/// take the name.
pub const CONTROL_USER: &str = "portcullis";
pub use load::{load_dir, normalize_address};

/// Principal prefix for group membership in `requesters`, `approvers`, `auditors`.
pub const GROUP_PREFIX: &str = "group:";

/// An engineer, approver or auditor, identified by their SSH keys.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub keys: Vec<PublicKey>,
    pub groups: Vec<String>,
}

/// A host the bastion can proxy to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// `host:port` as given (port defaults to 22).
    pub address: String,
    /// The only host key the bastion accepts from this target.
    pub host_key: PublicKey,
    /// Permitted logins; the first is the default.
    pub logins: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// How the bastion logs in to this target.
    pub auth: UpstreamAuth,
}

/// The bastion's credential towards a target (`auth` in targets.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamAuth {
    /// The bastion's upstream key, listed in the login's authorized_keys.
    #[default]
    Key,
    /// A fresh key pair and a short-lived certificate from the bastion's CA per
    /// session; the target trusts the CA with `TrustedUserCAKeys`.
    Certificate,
}

impl Target {
    pub fn default_login(&self) -> &str {
        &self.logins[0]
    }
}

/// How requests for matching targets are approved.
#[derive(Debug, Clone)]
pub struct Flow {
    pub name: String,
    pub matches: BTreeMap<String, String>,
    pub requesters: Vec<String>,
    pub approvers: Vec<String>,
    pub approvals: u32,
    pub max_ttl: Duration,
    pub pending_ttl: Duration,
    pub step_up_totp: bool,
    pub shell: bool,
    pub auto_approve: bool,
    pub commands: Vec<String>,
}

impl Flow {
    /// A flow applies to a target when every `match` label is equal on the target.
    pub fn matches(&self, target: &Target) -> bool {
        self.matches
            .iter()
            .all(|(key, value)| target.labels.get(key) == Some(value))
    }
}

/// A validated, immutable policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub users: BTreeMap<String, User>,
    pub targets: BTreeMap<String, Target>,
    pub flows: Vec<Flow>,
    /// SHA-256 key fingerprint → user name.
    by_fingerprint: HashMap<String, String>,
}

impl Policy {
    fn new(
        users: BTreeMap<String, User>,
        targets: BTreeMap<String, Target>,
        flows: Vec<Flow>,
    ) -> Policy {
        let by_fingerprint = users
            .values()
            .flat_map(|user| {
                user.keys
                    .iter()
                    .map(move |key| (fingerprint(key), user.name.clone()))
            })
            .collect();
        Policy {
            users,
            targets,
            flows,
            by_fingerprint,
        }
    }

    /// The user who owns `key`, if any.
    pub fn user_by_key(&self, key: &PublicKey) -> Option<&User> {
        let name = self.by_fingerprint.get(&fingerprint(key))?;
        self.users.get(name)
    }

    /// The first flow whose `match` fits the target's labels.
    pub fn flow_for(&self, target: &Target) -> Option<&Flow> {
        self.flows.iter().find(|flow| flow.matches(target))
    }

    /// The targets `user` may request: those whose flow accepts requests from them.
    /// Refusals list only these, so a user never learns of targets they cannot use.
    pub fn requestable_by(&self, user: &str) -> Vec<&str> {
        self.targets
            .values()
            .filter(|target| {
                self.flow_for(target)
                    .is_some_and(|flow| self.is_member(user, &flow.requesters))
            })
            .map(|target| target.name.as_str())
            .collect()
    }

    /// Problems that are not errors: pairs of targets that reach the same address or
    /// the same host key through flows with different approval rules. Whoever may
    /// request the weaker one reaches the host without the stronger one's approvals
    /// (e.g. the same machine as auto-approved `staging` and as `production`).
    pub fn warnings(&self) -> Vec<String> {
        let rules = |flow: &Flow| {
            let mut approvers = flow.approvers.clone();
            approvers.sort();
            (
                flow.auto_approve,
                approvers,
                flow.approvals,
                flow.step_up_totp,
            )
        };
        let describe = |flow: &Flow| {
            let decided = if flow.auto_approve {
                "auto_approve".to_string()
            } else {
                format!(
                    "{} approval(s) from {}",
                    flow.approvals,
                    flow.approvers.join(", ")
                )
            };
            let step_up = if flow.step_up_totp {
                ", step_up totp"
            } else {
                ""
            };
            format!("{decided}{step_up}")
        };
        let with_flows: Vec<(&Target, &Flow)> = self
            .targets
            .values()
            .filter_map(|target| Some((target, self.flow_for(target)?)))
            .collect();
        let mut warnings = Vec::new();
        for (i, (a, flow_a)) in with_flows.iter().enumerate() {
            for (b, flow_b) in &with_flows[i + 1..] {
                if rules(flow_a) == rules(flow_b) {
                    continue;
                }
                let shared = if a.address.eq_ignore_ascii_case(&b.address) {
                    format!("address {}", a.address)
                } else if fingerprint(&a.host_key) == fingerprint(&b.host_key) {
                    format!("host key {}", fingerprint(&a.host_key))
                } else {
                    continue;
                };
                warnings.push(format!(
                    "targets '{}' (flow '{}': {}) and '{}' (flow '{}': {}) share the {shared} but not their approval rules; the same host is reachable under the weaker rules",
                    a.name,
                    flow_a.name,
                    describe(flow_a),
                    b.name,
                    flow_b.name,
                    describe(flow_b),
                ));
            }
        }
        warnings
    }

    /// Whether `user` is named by any of `principals` (`alice` or `group:sre`).
    pub fn is_member(&self, user: &str, principals: &[String]) -> bool {
        let groups = self
            .users
            .get(user)
            .map(|u| u.groups.as_slice())
            .unwrap_or(&[]);
        principals
            .iter()
            .any(|principal| match principal.strip_prefix(GROUP_PREFIX) {
                Some(group) => groups.iter().any(|g| g == group),
                None => principal == user,
            })
    }
}

/// The `SHA256:…` fingerprint OpenSSH prints for a key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Target, user and group names: short, printable, safe in usernames and logs.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.'])
}

/// Unix login names as accepted by common `useradd` implementations.
pub fn is_valid_login(login: &str) -> bool {
    !login.is_empty()
        && login.len() <= 32
        && login
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !login.starts_with(['-', '.'])
}

/// A policy from the text of its three files, for unit tests.
#[cfg(test)]
pub fn from_texts(users: &str, targets: &str, flows: &str) -> Policy {
    let dir = tempfile::tempdir().expect("a scratch directory");
    for (file, text) in [
        ("users.toml", users),
        ("targets.toml", targets),
        ("flows.toml", flows),
    ] {
        std::fs::write(dir.path().join(file), text).expect("write a policy file");
    }
    load_dir(dir.path()).expect("a valid test policy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("db-prod-1"));
        assert!(is_valid_name("web.eu_1"));
        for bad in ["", "-x", ".x", "a b", "a@b", "a:b", "ä", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(is_valid_login("postgres"));
        assert!(!is_valid_login("root;id"));
    }
}
