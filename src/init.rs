//! `portcullis init`: a working policy set for this machine in one command, so a
//! newcomer reaches an approved, recorded session without writing TOML.
//!
//! It writes `users.toml` with the caller's keys (`~/.ssh/id_*.pub` and the
//! agent's) and a demo teammate whose key pair it keeps in the data directory
//! (approver and auditor, so one person can play every part with `ssh -i`),
//! `targets.toml` with this machine's sshd and its host key pinned as scanned, and
//! `flows.toml` with one flow that needs one human approval. Everything that can
//! fail (no key, no sshd, files that would be overwritten) is checked before
//! anything is written.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use russh::keys::PublicKey;

use crate::config::Config;
use crate::policy::fingerprint;

/// The demo teammate: approver and auditor.
pub const TEAMMATE: &str = "teammate";

/// The policy files, with the examples shipped in the repository's `policies/`:
/// `init` replaces a file only if it is missing, or byte for byte the shipped
/// example (placeholder keys nobody can use), unless `--force`.
const FILES: [(&str, &str); 3] = [
    ("users.toml", include_str!("../policies/users.toml")),
    ("targets.toml", include_str!("../policies/targets.toml")),
    ("flows.toml", include_str!("../policies/flows.toml")),
];

/// How long the target's sshd may take to show its host key.
const SCAN_TIMEOUT: Duration = Duration::from_secs(5);

/// What `portcullis init` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The target to pin: `HOST[:PORT]`.
    pub target: String,
    /// Login on the target; default: the caller's own user name.
    pub login: Option<String>,
    /// The caller's public key file, instead of `~/.ssh/id_*.pub` and the agent.
    pub key: Option<PathBuf>,
    /// Replace policy files that exist.
    pub force: bool,
    /// Add the bastion's upstream key to `~/.ssh/authorized_keys` when the
    /// target is this machine and the login the caller's own.
    pub authorize: bool,
    /// `--config FILE` as given, repeated in the commands printed at the end.
    pub config_arg: Option<PathBuf>,
}

/// Whether `dir` holds exactly the example policies shipped in the repository.
pub fn is_shipped_example(dir: &Path) -> bool {
    FILES
        .iter()
        .all(|(name, text)| fs::read_to_string(dir.join(name)).is_ok_and(|t| t == *text))
}

/// One public key of the caller and where it came from.
struct CallerKey {
    line: String,
    key: PublicKey,
    source: String,
}

/// Runs `init`; returns what to print.
pub async fn run(config: &Config, options: &Options) -> Result<String> {
    // Checks first: nothing is written unless all of them pass.
    let existing: Vec<PathBuf> = FILES
        .iter()
        .map(|(name, example)| (config.policies.join(name), example))
        .filter(|(path, example)| {
            path.exists() && fs::read_to_string(path).map_or(true, |t| t != **example)
        })
        .map(|(path, _)| path)
        .collect();
    if !existing.is_empty() && !options.force {
        bail!(
            "{} already exist{}; portcullis init does not overwrite policy files. Move them away, or run it again with --force to replace them",
            existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if existing.len() == 1 { "s" } else { "" }
        );
    }
    let login_name = caller_login()?;
    let user = policy_user_name(&login_name);
    let login = options.login.clone().unwrap_or_else(|| login_name.clone());
    if !crate::policy::is_valid_login(&login) {
        bail!("{login:?} is not a login name the policy accepts; name one with --login");
    }
    let keys = caller_keys(options.key.as_deref()).await?;
    let address = crate::policy::normalize_address(&options.target).with_context(|| {
        format!(
            "--target {:?}: expected HOST or HOST:PORT, e.g. 127.0.0.1:22",
            options.target
        )
    })?;
    let host_key = scan_host_key(&address).await.map_err(anyhow::Error::msg)?;
    let loopback = is_loopback(&address).await;

    // Writes.
    crate::datadir::prepare(&config.data_dir)?;
    let bastion = crate::keys::KeySet::load_or_create(config)?;
    let demo_dir = config.data_dir.join("demo");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&demo_dir)
        .with_context(|| format!("cannot create {}", demo_dir.display()))?;
    let teammate_path = demo_dir.join(TEAMMATE);
    let teammate = crate::keys::load_or_create(&teammate_path)?;
    let teammate_line = format!(
        "{} {TEAMMATE}@portcullis-demo",
        teammate.public_key().to_openssh()?
    );

    let target_name = if loopback {
        "localhost".to_string()
    } else {
        let host = address.rsplit_once(':').map_or(&*address, |(h, _)| h);
        let host = host.trim_matches(['[', ']']).replace(':', "-");
        if crate::policy::is_valid_name(&host) {
            host
        } else {
            "target".to_string()
        }
    };
    fs::create_dir_all(&config.policies)
        .with_context(|| format!("cannot create {}", config.policies.display()))?;
    let users = users_toml(&user, &keys, &teammate_line, &teammate_path);
    let targets = targets_toml(&target_name, &address, &host_key, &login);
    let flows = FLOWS_TOML.to_string();
    for (name, text) in [
        ("users.toml", &users),
        ("targets.toml", &targets),
        ("flows.toml", &flows),
    ] {
        write_policy_file(&config.policies.join(name), text)?;
    }
    let policy = crate::policy::load_dir(&config.policies).map_err(|errors| {
        anyhow::anyhow!("portcullis init wrote a policy it cannot load (a bug):\n{errors}")
    })?;

    let authorized = if options.authorize && loopback && login == login_name {
        Some(authorize_upstream(
            &bastion.upstream.public_key().to_openssh()?,
        )?)
    } else {
        None
    };

    // The report.
    let mut out = String::new();
    let dir = config.policies.display();
    let _ = writeln!(
        out,
        "portcullis init wrote a working policy set for this machine:"
    );
    let _ = writeln!(
        out,
        "  {dir}/users.toml    {user} (you; group engineers): {}",
        keys.iter()
            .map(|k| format!("{} from {}", fingerprint(&k.key), k.source))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "  {:width$}    {TEAMMATE} (demo approver and auditor): key pair {}",
        "",
        teammate_path.display(),
        width = dir.to_string().len() + "/users.toml".len()
    );
    let _ = writeln!(
        out,
        "  {dir}/targets.toml  {target_name}: {login} on {address}, host key {} pinned",
        fingerprint(&host_key)
    );
    let _ = writeln!(
        out,
        "  {dir}/flows.toml    production: 1 approval from group:sre-leads, shells, at most 1h"
    );
    match &authorized {
        Some(path) => {
            let _ = writeln!(
                out,
                "  {}  now lists the bastion's upstream key, so it can log in to {target_name} as {login}",
                path.display()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "The bastion logs in to {address} as {login} with its upstream key; add this line to ~{login}/.ssh/authorized_keys there:\n  {}",
                bastion.upstream.public_key().to_openssh()?
            );
        }
    }
    for warning in policy.warnings_for(&config.auditors) {
        let _ = writeln!(out, "warning: {warning}");
    }
    let _ = writeln!(
        out,
        "The bastion's host key, which ssh asks you to accept on first connect: {}",
        fingerprint(bastion.host.public_key())
    );
    let config_arg = options
        .config_arg
        .as_ref()
        .map(|p| {
            format!(
                " --config {}",
                crate::session::hint::quote_word(&p.display().to_string())
            )
        })
        .unwrap_or_default();
    let ssh = crate::session::hint::ssh_prefix(config);
    let _ = writeln!(out, "\nNext (README, \"The first hour\"):");
    match crate::datadir::serving_pid(&config.data_dir)? {
        Some(pid) => {
            let _ = writeln!(
                out,
                "  portcullis reload{config_arg}    # portcullis (pid {pid}) is serving {} with the old policies",
                config.data_dir.display()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  portcullis serve{config_arg}     # in a terminal of its own"
            );
        }
    }
    let _ = writeln!(
        out,
        "  {ssh} \"request {target_name} --shell --reason 'first try'\""
    );
    Ok(out)
}

/// The caller's user name on this machine.
fn caller_login() -> Result<String> {
    if let Ok(out) = std::process::Command::new("id").arg("-un").output() {
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !name.is_empty() {
            return Ok(name);
        }
    }
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .context("cannot tell who you are (id -un failed and USER is not set)")
}

/// The caller's name in the policy: their login, unless the policy cannot take it.
fn policy_user_name(login: &str) -> String {
    if crate::policy::is_valid_name(login)
        && login != crate::policy::CONTROL_USER
        && login != TEAMMATE
    {
        login.to_string()
    } else {
        "me".to_string()
    }
}

/// The caller's keys: the one named with `--key`, or every `~/.ssh/id_*.pub`
/// and every key in the agent (`SSH_AUTH_SOCK`), as ssh would offer them.
async fn caller_keys(named: Option<&Path>) -> Result<Vec<CallerKey>> {
    if let Some(path) = named {
        return Ok(vec![read_key_file(path)?]);
    }
    let mut keys = Vec::new();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(ssh_dir) = home.as_ref().map(|h| h.join(".ssh")) {
        let mut files: Vec<PathBuf> = fs::read_dir(&ssh_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        name.starts_with("id_")
                            && name.ends_with(".pub")
                            && !name.ends_with("-cert.pub")
                    })
                    .collect()
            })
            .unwrap_or_default();
        // ssh's own order of preference.
        let rank = |p: &PathBuf| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
                .iter()
                .position(|n| *n == name)
                .unwrap_or(9)
        };
        files.sort_by_key(|p| (rank(p), p.clone()));
        for path in files {
            if let Ok(key) = read_key_file(&path) {
                keys.push(CallerKey {
                    source: format!(
                        "~/.ssh/{}",
                        path.file_name().unwrap_or_default().to_string_lossy()
                    ),
                    ..key
                });
            }
        }
    }
    for (key, comment) in agent_keys().await {
        keys.push(CallerKey {
            line: format!("{} {comment}", key.to_openssh()?)
                .trim()
                .to_string(),
            key,
            source: "the agent".into(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(fingerprint(&k.key)));
    if keys.is_empty() {
        bail!(
            "no SSH key of yours found: none in ~/.ssh (id_*.pub) and none in an agent (SSH_AUTH_SOCK). Make one with `ssh-keygen -t ed25519` and run portcullis init again, or name a public key with --key FILE.pub"
        );
    }
    Ok(keys)
}

/// A public key file (or the `.pub` next to a private key named by mistake).
fn read_key_file(path: &Path) -> Result<CallerKey> {
    let read = |path: &Path| -> Result<CallerKey> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim().to_string();
        let key = PublicKey::from_openssh(&line).map_err(|err| {
            anyhow::anyhow!("{} is not an OpenSSH public key ({err})", path.display())
        })?;
        Ok(CallerKey {
            line,
            key,
            source: path.display().to_string(),
        })
    };
    read(path).or_else(|err| {
        let public = PathBuf::from(format!("{}.pub", path.display()));
        if public.exists() {
            read(&public)
        } else {
            Err(err)
        }
    })
}

/// The agent's plain keys (not certificates), if there is an agent.
async fn agent_keys() -> Vec<(PublicKey, String)> {
    if std::env::var_os("SSH_AUTH_SOCK").is_none() {
        return Vec::new();
    }
    let listed = tokio::time::timeout(Duration::from_secs(3), async {
        let mut agent = russh::keys::agent::client::AgentClient::connect_env().await?;
        agent.request_identities().await
    })
    .await;
    match listed {
        Ok(Ok(identities)) => identities
            .into_iter()
            .filter_map(|identity| match identity {
                russh::keys::agent::AgentIdentity::PublicKey { key, comment } => {
                    Some((key, comment))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Captures the host key a server shows, and ends the handshake there.
struct Scan(Arc<Mutex<Option<PublicKey>>>);

impl russh::client::Handler for Scan {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key {
            *self.0.lock().expect("scan lock poisoned") = Some(key.clone());
        }
        Ok(false)
    }
}

/// The host key the target's sshd shows the bastion (the same algorithms the
/// bastion negotiates later, so the pinned key is the one it will see).
async fn scan_host_key(address: &str) -> Result<PublicKey, String> {
    let advice = "The first path proxies to this machine's own sshd: start it (Debian/Ubuntu: sudo apt-get install openssh-server && sudo systemctl start ssh; macOS: System Settings > Sharing > Remote Login), or name another SSH server with --target HOST:PORT";
    let stream =
        match tokio::time::timeout(SCAN_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                return Err(format!(
                    "no SSH server to pin: cannot connect to {address} ({err}). {advice}"
                ))
            }
            Err(_) => {
                return Err(format!(
                    "no SSH server to pin: {address} did not answer within {}s. {advice}",
                    SCAN_TIMEOUT.as_secs()
                ))
            }
        };
    let seen = Arc::new(Mutex::new(None));
    let config = Arc::new(crate::proxy::client_config());
    let handshake = tokio::time::timeout(
        SCAN_TIMEOUT,
        russh::client::connect_stream(config, stream, Scan(seen.clone())),
    )
    .await;
    let key = seen.lock().expect("scan lock poisoned").take();
    match (key, handshake) {
        (Some(key), _) => Ok(key),
        (None, Ok(Err(err))) => Err(format!(
            "{address} answered, but not with an SSH host key ({err}). {advice}"
        )),
        (None, _) => Err(format!(
            "{address} did not show an SSH host key within {}s. {advice}",
            SCAN_TIMEOUT.as_secs()
        )),
    }
}

/// Whether `address` (`host:port`) is this machine.
async fn is_loopback(address: &str) -> bool {
    match tokio::net::lookup_host(address).await {
        Ok(mut addrs) => addrs.all(|a| a.ip().is_loopback()),
        Err(_) => false,
    }
}

/// Writes one policy file, never through a symbolic link: with `--force`, a link
/// planted where a policy file goes would otherwise have the file written
/// wherever it points (as root, anywhere).
fn write_policy_file(path: &Path, text: &str) -> Result<()> {
    let opened = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match opened {
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link; portcullis init does not write through links. Remove it, or run init with --config pointing at another policies directory",
            path.display()
        ),
        opened => opened.with_context(|| format!("cannot write {}", path.display()))?,
    };
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Appends the upstream key to `~/.ssh/authorized_keys` unless it is there.
fn authorize_upstream(upstream: &str) -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set; cannot find ~/.ssh/authorized_keys")?;
    let ssh_dir = home.join(".ssh");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&ssh_dir)
        .with_context(|| format!("cannot create {}", ssh_dir.display()))?;
    let path = ssh_dir.join("authorized_keys");
    let blob = upstream.split_whitespace().nth(1).unwrap_or(upstream);
    let present = fs::read_to_string(&path)
        .map(|text| {
            text.lines()
                .any(|l| l.split_whitespace().any(|w| w == blob))
        })
        .unwrap_or(false);
    if !present {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let text = fs::read(&path).unwrap_or_default();
        let newline = if text.is_empty() || text.ends_with(b"\n") {
            ""
        } else {
            "\n"
        };
        writeln!(
            file,
            "{newline}{upstream} portcullis-upstream (added by portcullis init)"
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path)
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn users_toml(user: &str, keys: &[CallerKey], teammate: &str, teammate_path: &Path) -> String {
    let mut out = String::from(
        "# Who may use the bastion (written by `portcullis init`; the README's \"Policy\n\
         # reference\" lists every key). A user is known by their SSH public keys.\n",
    );
    let _ = writeln!(out, "[users.{user}]");
    let _ = writeln!(out, "keys = [");
    for key in keys {
        let _ = writeln!(out, "    {},   # {}", toml_string(&key.line), key.source);
    }
    let _ = writeln!(out, "]");
    let _ = writeln!(out, "groups = [\"engineers\"]\n");
    let _ = writeln!(
        out,
        "# A demo teammate, so that one person can play approver and auditor:\n\
         #   ssh -o IdentitiesOnly=yes -i {} ...\n\
         # Remove this user (and that key pair) before anyone else relies on the bastion.",
        teammate_path.display()
    );
    let _ = writeln!(out, "[users.{TEAMMATE}]");
    let _ = writeln!(out, "keys = [{}]", toml_string(teammate));
    let _ = writeln!(out, "groups = [\"sre-leads\", \"auditors\"]");
    out
}

fn targets_toml(name: &str, address: &str, host_key: &PublicKey, login: &str) -> String {
    format!(
        "# Hosts the bastion proxies to (written by `portcullis init`). host_key is pinned:\n\
         # the bastion refuses a target that shows any other key.\n\
         [targets.{name}]\n\
         address  = {}\n\
         host_key = {}   # as {address} showed it to portcullis init\n\
         logins   = [{}]              # the first is the default\n\
         labels   = {{ env = \"production\" }}   # flows match on labels\n",
        toml_string(address),
        toml_string(&host_key.to_openssh().unwrap_or_default()),
        toml_string(login),
    )
}

const FLOWS_TOML: &str = r#"# Approval flows (written by `portcullis init`): the first flow whose `match`
# fits a target's labels decides how its requests are approved.

# One approval from an sre-lead (the demo teammate); nobody approves their own.
[[flows]]
name       = "production"
match      = { env = "production" }
requesters = ["group:engineers"]
approvers  = ["group:sre-leads"]
approvals  = 1
max_ttl    = "1h"
shell      = true

# Other flows you may want (README, "Policy reference"):
#
# [[flows]]                      # a second factor for sessions and decisions
# name       = "vault"
# match      = { env = "vault" }
# requesters = ["group:engineers"]
# approvers  = ["group:sre-leads"]
# step_up    = "totp"            # everyone enrols first: ssh ... portcullis@BASTION "totp enroll"
# shell      = true
#
# [[flows]]                      # no human in the loop
# name         = "staging"
# match        = { env = "staging" }
# requesters   = ["group:engineers"]
# auto_approve = true
# shell        = true
#
# [[flows]]                      # these commands only
# name       = "web-restarts"
# match      = { role = "web" }
# requesters = ["group:engineers"]
# approvers  = ["group:sre-leads"]
# commands   = ["systemctl restart nginx", "journalctl -u nginx -n *"]
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_flows_parse_and_the_examples_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("flows.toml"), FLOWS_TOML).unwrap();
        let policy = crate::policy::load_dir(dir.path()).unwrap();
        assert_eq!(policy.flows.len(), 1);
        assert!(!policy.flows[0].auto_approve && !policy.flows[0].step_up_totp);
        assert!(!is_shipped_example(dir.path()));
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        assert!(is_shipped_example(&shipped));
    }

    #[test]
    fn policy_files_are_never_written_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        let planted = dir.path().join("users.toml");
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        let refused = write_policy_file(&planted, "[users]\n").unwrap_err();
        assert!(
            refused.to_string().contains("is a symbolic link"),
            "{refused}"
        );
        assert!(!elsewhere.exists(), "nothing written where the link points");
        let plain = dir.path().join("flows.toml");
        write_policy_file(&plain, "# flows\n").unwrap();
        write_policy_file(&plain, "# again\n").unwrap();
        assert_eq!(fs::read_to_string(&plain).unwrap(), "# again\n");
    }

    #[test]
    fn user_names_the_policy_cannot_take_become_me() {
        assert_eq!(policy_user_name("alice"), "alice");
        assert_eq!(policy_user_name("portcullis"), "me");
        assert_eq!(policy_user_name(TEAMMATE), "me");
        assert_eq!(policy_user_name("jean paul"), "me");
    }
}
