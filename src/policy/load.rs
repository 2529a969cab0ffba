//! Reading a policy directory and turning the raw files into a validated [`Policy`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use russh::keys::PublicKey;
use serde::de::DeserializeOwned;

use super::error::{PolicyError, PolicyErrors, Reporter};
use super::files::{FlowsFile, RawFlow, RawTarget, RawUser, TargetsFile, UsersFile};
use super::{
    is_valid_login, is_valid_name, Flow, Policy, Target, UpstreamAuth, User, CONTROL_USER,
    GROUP_PREFIX,
};

const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// Loads and validates `users.toml`, `targets.toml` and `flows.toml` from `dir`.
///
/// A missing file counts as empty, so a bastion with no `flows.toml` simply has no
/// flows. Every error found is reported, not just the first.
pub fn load_dir(dir: &Path) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    if !dir.is_dir() {
        errors.push(PolicyError {
            file: dir.to_path_buf(),
            line: None,
            key: String::new(),
            message: "policy directory not found: `portcullis init` writes a working set for this machine (or write users.toml, targets.toml and flows.toml there; see the README's policy reference)".into(),
        });
        return Err(PolicyErrors(errors));
    }
    let users = read::<UsersFile>(&dir.join("users.toml"), &mut errors)
        .map(|(text, file)| build_users(&dir.join("users.toml"), &text, file, &mut errors));
    let targets = read::<TargetsFile>(&dir.join("targets.toml"), &mut errors)
        .map(|(text, file)| build_targets(&dir.join("targets.toml"), &text, file, &mut errors));
    let flows = read::<FlowsFile>(&dir.join("flows.toml"), &mut errors)
        .map(|(text, file)| build_flows(&dir.join("flows.toml"), &text, file, &mut errors));
    match (users, targets, flows) {
        (Some(users), Some(targets), Some(flows)) if errors.is_empty() => {
            Ok(Policy::new(users, targets, flows))
        }
        _ => Err(PolicyErrors(errors)),
    }
}

/// Reads one file; a missing file is an empty one.
fn read<T: DeserializeOwned + Default>(
    path: &Path,
    errors: &mut Vec<PolicyError>,
) -> Option<(String, T)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Some((String::new(), T::default()))
        }
        Err(err) => {
            errors.push(PolicyError {
                file: path.to_path_buf(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {err}"),
            });
            return None;
        }
    };
    match toml::from_str(&text) {
        Ok(file) => Some((text, file)),
        Err(err) => {
            Reporter {
                file: path,
                text: &text,
                errors,
            }
            .error(
                err.span().map(|span| span.start),
                "",
                err.message().to_string(),
            );
            None
        }
    }
}

fn build_users(
    path: &Path,
    text: &str,
    file: UsersFile,
    errors: &mut Vec<PolicyError>,
) -> BTreeMap<String, User> {
    let mut report = Reporter {
        file: path,
        text,
        errors,
    };
    let mut seen_keys: HashSet<String> = HashSet::new();
    let mut users = BTreeMap::new();
    for (name, raw) in file.users {
        let key_path = format!("users.{}", name.get_ref());
        if !is_valid_name(name.get_ref()) {
            report.error(
                Some(name.span().start),
                &key_path,
                "user names use letters, digits, '-', '_' and '.' (at most 64)",
            );
            continue;
        }
        if name.get_ref() == CONTROL_USER {
            report.error(
                Some(name.span().start),
                &key_path,
                "'portcullis' is the reserved control-plane username; pick another name",
            );
        }
        let user = build_user(name.get_ref(), raw, &key_path, &mut seen_keys, &mut report);
        users.insert(name.into_inner(), user);
    }
    users
}

fn build_user(
    name: &str,
    raw: RawUser,
    key_path: &str,
    seen_keys: &mut HashSet<String>,
    report: &mut Reporter,
) -> User {
    let mut keys = Vec::new();
    for (i, line) in raw.keys.iter().enumerate() {
        let at = Some(line.span().start);
        match PublicKey::from_openssh(line.get_ref().trim()) {
            Ok(key) => {
                if !seen_keys.insert(super::fingerprint(&key)) {
                    report.error(at, format!("{key_path}.keys[{i}]"), "this key is already listed (for this or another user); a key identifies exactly one user");
                }
                keys.push(key);
            }
            Err(err) => report.error(
                at,
                format!("{key_path}.keys[{i}]"),
                format!("not an OpenSSH public key ({err}); paste the whole line of the .pub file, e.g. \"ssh-ed25519 AAAA... alice@laptop\""),
            ),
        }
    }
    // `keys = []` is a disabled account, not an error: refusing it would keep the
    // previous policy, and with it the very key an operator is trying to remove.
    let mut groups = Vec::new();
    for group in raw.groups {
        if is_valid_name(group.get_ref()) {
            groups.push(group.into_inner());
        } else {
            report.error(
                Some(group.span().start),
                format!("{key_path}.groups"),
                format!("invalid group name {:?}", group.get_ref()),
            );
        }
    }
    User {
        name: name.to_string(),
        keys,
        groups,
    }
}

fn build_targets(
    path: &Path,
    text: &str,
    file: TargetsFile,
    errors: &mut Vec<PolicyError>,
) -> BTreeMap<String, Target> {
    let mut report = Reporter {
        file: path,
        text,
        errors,
    };
    let mut targets = BTreeMap::new();
    for (name, raw) in file.targets {
        let key_path = format!("targets.{}", name.get_ref());
        if !is_valid_name(name.get_ref()) || name.get_ref() == CONTROL_USER {
            report.error(Some(name.span().start), &key_path, "target names use letters, digits, '-', '_' and '.' (at most 64), and 'portcullis' is reserved");
            continue;
        }
        if let Some(target) = build_target(name.get_ref(), raw, &key_path, &mut report) {
            targets.insert(name.into_inner(), target);
        }
    }
    targets
}

fn build_target(
    name: &str,
    raw: RawTarget,
    key_path: &str,
    report: &mut Reporter,
) -> Option<Target> {
    let before = report.errors.len();
    let address = normalize_address(raw.address.get_ref());
    if address.is_none() {
        report.error(
            Some(raw.address.span().start),
            format!("{key_path}.address"),
            "expected \"host:port\" or \"host\" (port 22), e.g. \"10.0.0.5:22\"",
        );
    }
    let host_key = PublicKey::from_openssh(raw.host_key.get_ref().trim());
    if let Err(err) = &host_key {
        report.error(
            Some(raw.host_key.span().start),
            format!("{key_path}.host_key"),
            host_key_problem(raw.host_key.get_ref(), err),
        );
    }
    let logins_at = Some(raw.logins.span().start);
    let logins: Vec<String> = raw
        .logins
        .into_inner()
        .into_iter()
        .map(|l| l.into_inner())
        .collect();
    if logins.is_empty() {
        report.error(
            logins_at,
            format!("{key_path}.logins"),
            "list at least one login; the first is the default",
        );
    }
    for login in logins.iter().filter(|login| !is_valid_login(login)) {
        report.error(
            logins_at,
            format!("{key_path}.logins"),
            format!("invalid login {login:?}"),
        );
    }
    let auth = match raw.auth.as_ref().map(|a| a.get_ref().as_str()) {
        None | Some("key") => UpstreamAuth::Key,
        Some("certificate") => UpstreamAuth::Certificate,
        Some(other) => {
            report.error(
                raw.auth.as_ref().map(|a| a.span().start),
                format!("{key_path}.auth"),
                format!("{other:?} is not an upstream auth mode: use \"key\" or \"certificate\""),
            );
            UpstreamAuth::Key
        }
    };
    if report.errors.len() != before {
        return None;
    }
    Some(Target {
        name: name.to_string(),
        address: address?,
        host_key: host_key.ok()?,
        logins,
        labels: raw.labels,
        auth,
    })
}

/// Why a `host_key` value is not a key, and exactly what to write instead.
fn host_key_problem(value: &str, err: &impl std::fmt::Display) -> String {
    const FETCH: &str = "`portcullis init --target HOST:PORT` pins it for you, or run `ssh-keyscan -t ed25519 -p PORT HOST | cut -d' ' -f2-` (ssh-keyscan prints the host name first), or copy the target's /etc/ssh/ssh_host_ed25519_key.pub";
    let value = value.trim();
    if value.is_empty() {
        return format!(
            "host_key is empty (an ssh-keyscan that found no SSH server prints nothing); {FETCH}"
        );
    }
    // A known_hosts or ssh-keyscan line: `HOST ssh-ed25519 AAAA...`.
    if let Some((host, rest)) = value.split_once(char::is_whitespace) {
        let rest = rest.trim_start();
        if PublicKey::from_openssh(rest).is_ok() {
            let shown = crate::display::escape(host);
            return format!(
                "this is an ssh-keyscan (known_hosts) line: drop the host name '{shown}' in front and write host_key = \"{rest}\""
            );
        }
    }
    format!("not an OpenSSH public key ({err}); {FETCH}")
}

/// `host:port`, `host` (port 22) or `[v6]:port`, returned as `host:port`.
pub fn normalize_address(address: &str) -> Option<String> {
    let address = address.trim();
    if address.is_empty() || address.contains(char::is_whitespace) {
        return None;
    }
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return Some(address.to_string());
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            (!host.is_empty()).then(|| format!("{host}:{port}"))
        }
        Some(_) => None,
        None => Some(format!("{address}:22")),
    }
}

fn build_flows(
    path: &Path,
    text: &str,
    file: FlowsFile,
    errors: &mut Vec<PolicyError>,
) -> Vec<Flow> {
    let mut report = Reporter {
        file: path,
        text,
        errors,
    };
    let mut names = HashSet::new();
    let mut flows = Vec::new();
    for (i, raw) in file.flows.into_iter().enumerate() {
        let at = raw.span().start;
        let raw = raw.into_inner();
        let key_path = format!("flows[{i}] ({})", raw.name.get_ref());
        if !names.insert(raw.name.get_ref().clone()) {
            report.error(
                Some(raw.name.span().start),
                format!("{key_path}.name"),
                "flow names must be unique",
            );
        }
        if let Some(flow) = build_flow(raw, &key_path, at, &mut report) {
            flows.push(flow);
        }
    }
    flows
}

fn build_flow(raw: RawFlow, key_path: &str, at: usize, report: &mut Reporter) -> Option<Flow> {
    let before = report.errors.len();
    let mut duration =
        |value: &Option<toml::Spanned<String>>, key: &str, default: Duration| match value {
            None => default,
            Some(text) => crate::duration::parse(text.get_ref()).unwrap_or_else(|err| {
                report.error(
                    Some(text.span().start),
                    format!("{key_path}.{key}"),
                    err.to_string(),
                );
                default
            }),
        };
    let max_ttl = duration(&raw.max_ttl, "max_ttl", DEFAULT_MAX_TTL);
    let pending_ttl = duration(&raw.pending_ttl, "pending_ttl", DEFAULT_PENDING_TTL);
    let approvals = match &raw.approvals {
        None => 1,
        Some(n) if (1..=10).contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            report.error(
                Some(n.span().start),
                format!("{key_path}.approvals"),
                "approvals must be between 1 and 10",
            );
            1
        }
    };
    let step_up_totp = match &raw.step_up {
        None => false,
        Some(value) if value.get_ref() == "totp" => true,
        Some(value) => {
            report.error(
                Some(value.span().start),
                format!("{key_path}.step_up"),
                "the only step-up method is \"totp\"",
            );
            false
        }
    };
    if raw.requesters.is_empty() {
        report.error(
            Some(at),
            format!("{key_path}.requesters"),
            "name who may request, e.g. [\"group:engineers\"]",
        );
    }
    if raw.approvers.is_empty() && !raw.auto_approve {
        report.error(
            Some(at),
            format!("{key_path}.approvers"),
            "a flow without auto_approve = true needs approvers, e.g. [\"group:sre-leads\"]",
        );
    }
    let principals =
        |list: Vec<toml::Spanned<String>>, key: &str, report: &mut Reporter| -> Vec<String> {
            let mut out = Vec::new();
            for principal in list {
                let name = principal
                    .get_ref()
                    .strip_prefix(GROUP_PREFIX)
                    .unwrap_or(principal.get_ref());
                if is_valid_name(name) {
                    out.push(principal.into_inner());
                } else {
                    report.error(
                        Some(principal.span().start),
                        format!("{key_path}.{key}"),
                        format!(
                            "{:?} is neither a user name nor group:NAME",
                            principal.get_ref()
                        ),
                    );
                }
            }
            out
        };
    let requesters = principals(raw.requesters, "requesters", report);
    let approvers = principals(raw.approvers, "approvers", report);
    // Named approvers only (no group): more approvals than names can never be met,
    // whoever is in users.toml.
    let named: HashSet<&String> = approvers.iter().collect();
    if !raw.auto_approve
        && !named.is_empty()
        && approvers.iter().all(|p| !p.starts_with(GROUP_PREFIX))
        && named.len() < approvals as usize
    {
        report.error(
            raw.approvals.as_ref().map(|n| n.span().start).or(Some(at)),
            format!("{key_path}.approvals"),
            format!(
                "approvals = {approvals} but only {} approver(s) are listed ({}), so no request could ever be approved; lower approvals or list a group",
                named.len(),
                approvers.join(", ")
            ),
        );
    }
    let mut commands = Vec::new();
    for pattern in raw.commands {
        match crate::command::pattern_problem(pattern.get_ref()) {
            None => commands.push(pattern.into_inner()),
            Some(problem) => report.error(
                Some(pattern.span().start),
                format!("{key_path}.commands"),
                format!(
                    "{:?} contains {problem}; command patterns are plain words with * (within a path segment) and ** (a whole path segment) as the only wildcards",
                    pattern.get_ref()
                ),
            ),
        }
    }
    if report.errors.len() != before {
        return None;
    }
    Some(Flow {
        name: raw.name.into_inner(),
        matches: raw.matches,
        requesters,
        approvers,
        approvals,
        max_ttl,
        pending_ttl,
        step_up_totp,
        shell: raw.shell,
        auto_approve: raw.auto_approve,
        commands,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBnPj0TH2hTmIobo5mbbFnqBThDCSdHTvEKAbAeRh9+H alice@laptop";

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn target_toml(host_key: &str) -> String {
        format!("[targets.db]\naddress = \"127.0.0.1:22\"\nhost_key = \"{host_key}\"\nlogins = [\"postgres\"]\nlabels = {{ env = \"production\" }}\n")
    }

    #[test]
    fn loads_a_valid_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "users.toml",
            &format!("[users.alice]\nkeys = [\"{KEY}\"]\ngroups = [\"engineers\"]\n"),
        );
        write(dir.path(), "targets.toml", &target_toml(KEY));
        write(dir.path(), "flows.toml", "[[flows]]\nname = \"prod\"\nmatch = { env = \"production\" }\nrequesters = [\"group:engineers\"]\napprovers = [\"bob\"]\nmax_ttl = \"1h\"\n");
        let policy = load_dir(dir.path()).unwrap();
        let key = PublicKey::from_openssh(KEY).unwrap();
        assert_eq!(policy.user_by_key(&key).unwrap().name, "alice");
        let target = &policy.targets["db"];
        assert_eq!(target.default_login(), "postgres");
        assert_eq!(policy.flow_for(target).unwrap().name, "prod");
        assert!(policy.is_member("alice", &["group:engineers".into()]));
        assert!(!policy.is_member("alice", &["bob".into()]));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "users.toml",
            &format!("[users.alice]\nkeys = [\"{KEY}\"]\n"),
        );
        write(
            dir.path(),
            "targets.toml",
            &target_toml("ssh-ed25519 garbage"),
        );
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("targets.toml:3: targets.db.host_key: not an OpenSSH public key"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "users.toml",
            "[users.alice]\nkeys = []\nkeyz = 1\n",
        );
        write(dir.path(), "targets.toml", "[targets.x\n");
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("users.toml:3") && text.contains("keyz"),
            "{text}"
        );
        assert!(text.contains("targets.toml:1"), "{text}");
    }

    #[test]
    fn duplicate_keys_and_bad_flows_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "users.toml",
            &format!("[users.alice]\nkeys = [\"{KEY}\"]\n[users.bob]\nkeys = [\"{KEY}\"]\n"),
        );
        write(dir.path(), "flows.toml", "[[flows]]\nname = \"x\"\nrequesters = [\"bad name\"]\napprovals = 0\nmax_ttl = \"soon\"\n");
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(text.contains("already listed"), "{text}");
        assert!(text.contains("approvals must be between"), "{text}");
        assert!(text.contains("max_ttl"), "{text}");
        assert!(text.contains("needs approvers"), "{text}");
        assert!(text.contains("neither a user name"), "{text}");
        write(dir.path(), "flows.toml", "[[flows]]\nname = \"x\"\nrequesters = [\"a\"]\napprovers = [\"b\"]\ncommands = [\"ok *\", \"rm -rf / ; id\"]\n");
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("flows.toml:5: flows[0] (x).commands") && text.contains("';'"),
            "{text}"
        );
    }

    #[test]
    fn host_keys_pasted_from_ssh_keyscan_say_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "targets.toml",
            &target_toml(&format!("127.0.0.1 {KEY}")),
        );
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "drop the host name '127.0.0.1' in front and write host_key = \"{KEY}\""
            )),
            "{err}"
        );
        write(dir.path(), "targets.toml", &target_toml(""));
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("host_key is empty") && err.contains("cut -d' ' -f2-"),
            "{err}"
        );
    }

    #[test]
    fn more_approvals_than_named_approvers_can_never_work() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "flows.toml", "[[flows]]\nname = \"x\"\nrequesters = [\"a\"]\napprovers = [\"b\", \"c\"]\napprovals = 3\n");
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("flows.toml:5: flows[0] (x).approvals: approvals = 3 but only 2 approver(s) are listed (b, c)"), "{err}");
        write(dir.path(), "flows.toml", "[[flows]]\nname = \"x\"\nrequesters = [\"a\"]\napprovers = [\"b\", \"group:g\"]\napprovals = 3\n");
        load_dir(dir.path()).unwrap();
    }

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(normalize_address("10.0.0.5"), Some("10.0.0.5:22".into()));
        assert_eq!(
            normalize_address("db.internal:2200"),
            Some("db.internal:2200".into())
        );
        assert_eq!(normalize_address("[::1]:22"), Some("[::1]:22".into()));
        assert_eq!(normalize_address("host:0"), None);
        assert_eq!(normalize_address("a b"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any file content is either a policy or a list of errors, never a panic.
        #[test]
        fn any_policy_text_loads_or_is_refused(
            users in ".{0,200}",
            targets in "(\\[targets\\.[a-z]{1,4}\\]\n)?([a-z_]{1,8} = (\"[^\"\n]{0,20}\"|\\[\\]|[0-9]{1,3})\n){0,5}",
            flows in "(\\[\\[flows\\]\\]\n)?([a-z_]{1,12} = (\"[^\"\n]{0,20}\"|\\[\"[a-z:]{1,10}\"\\]|true|[0-9]{1,2})\n){0,6}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "users.toml", &users);
            write(dir.path(), "targets.toml", &targets);
            write(dir.path(), "flows.toml", &flows);
            if let Err(errors) = load_dir(dir.path()) {
                proptest::prop_assert!(!errors.to_string().is_empty());
            }
        }
    }
}
