//! The bastion under test: the real `portcullis` binary, its config, keys and
//! the test policies.

use super::*;

/// Public keys printed by `portcullis keys`.
#[derive(Debug, Clone)]
pub struct BastionKeys {
    /// Presented to engineers.
    pub host: String,
    /// Used towards targets; goes into their authorized_keys.
    pub upstream: String,
    /// Signs user certificates; targets may trust it with TrustedUserCAKeys.
    pub ca: String,
}

/// The portcullis binary under test, running `serve`.
pub struct Bastion {
    daemon: Daemon,
    dir: PathBuf,
}

impl Bastion {
    /// Path of the binary Cargo built for this test run.
    pub fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_portcullis")
    }

    /// Path of the config file in `dir`.
    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("portcullis.toml")
    }

    /// Writes `DIR/portcullis.toml` listening on `port`, with relative data and
    /// policies directories (which the bastion resolves against the config's
    /// directory).
    pub fn write_config(dir: &Path, port: u16) -> PathBuf {
        let path = Bastion::config_path(dir);
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n\
             data_dir = \"data\"\n\
             policies = \"policies\"\n\
             log_format = \"text\"\n"
        );
        let mut extra = String::new();
        for file in [EXTRA_CONFIG, NODE_CONFIG] {
            extra.push_str(&fs::read_to_string(dir.join(file)).unwrap_or_default());
            extra.push('\n');
        }
        if !extra.contains("[limits]") {
            // Tests fail authentications on purpose, and the harness probes the
            // port with bare TCP connects: keep 127.0.0.1 from being locked out as
            // a whole. Tests of the limits set their own.
            extra.push_str("\n[limits]\npenalty_exempt = [\"127.0.0.1\"]\n");
        }
        fs::write(&path, config + &extra).expect("write portcullis.toml");
        path
    }

    /// Runs `portcullis keys`, which creates missing keys and prints
    /// `ROLE<TAB>PATH<TAB>PUBLIC KEY` lines; the harness needs the upstream key
    /// before the target sshd starts.
    pub fn keys(dir: &Path) -> BastionKeys {
        let config = Bastion::config_path(dir);
        if !config.exists() {
            Bastion::write_config(dir, free_port());
        }
        let out = run(Command::new(Bastion::binary())
            .arg("keys")
            .arg("--config")
            .arg(&config));
        assert_success(&out, "portcullis keys");
        let stdout = text(&out.stdout);
        let key = |role: &str| {
            stdout
                .lines()
                .filter_map(|line| {
                    let mut fields = line.splitn(3, '\t');
                    match (fields.next(), fields.next(), fields.next()) {
                        (Some(r), Some(_path), Some(key)) if r == role => {
                            Some(key.trim().to_string())
                        }
                        _ => None,
                    }
                })
                .next()
                .unwrap_or_else(|| panic!("portcullis keys printed no {role} key:\n{stdout}"))
        };
        BastionKeys {
            host: key("host"),
            upstream: key("upstream"),
            ca: key("ca"),
        }
    }

    /// Starts `portcullis serve` for the config in `dir` (rewritten with a
    /// fresh port) and waits until it accepts TCP connections.
    pub fn start(dir: &Path) -> Bastion {
        Bastion::start_binary(dir, Path::new(Bastion::binary()))
    }

    /// [`Bastion::start`] with another build of portcullis (benchmarks compare
    /// with an older commit's).
    pub fn start_binary(dir: &Path, binary: &Path) -> Bastion {
        let daemon = Daemon::start("portcullis", &dir.join("bastion.log"), |port| {
            let config = Bastion::write_config(dir, port);
            let mut cmd = Command::new(binary);
            cmd.arg("serve").arg("--config").arg(config);
            // The log is a file read by people on failure: no colour codes.
            cmd.env("NO_COLOR", "1");
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info,portcullis=debug");
            }
            cmd
        });
        Bastion {
            daemon,
            dir: dir.to_path_buf(),
        }
    }

    pub fn port(&self) -> u16 {
        self.daemon.port()
    }

    /// The bastion's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    /// Waits up to `timeout` for the bastion to exit and returns how it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.daemon.child, timeout)
    }

    /// A stand-in while the real bastion restarts: a process that is already gone.
    pub(super) fn placeholder(dir: &Path) -> Bastion {
        let child = Command::new("true").spawn().expect("spawn true");
        Bastion {
            daemon: Daemon {
                what: "placeholder",
                child,
                port: 0,
                log: dir.join("bastion.log"),
            },
            dir: dir.to_path_buf(),
        }
    }

    /// Everything the bastion logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn policies_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// Whether the bastion process is still running (it must survive bad clients).
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }
}

/// What the test policies say; [`Policies::write`] turns it into TOML files.
///
/// Users: `alice` (engineers), `bob` and `carol` (sre-leads, approvers), `dave`
/// (engineers and auditors). Targets, all the same sshd under different labels:
///
/// | target | flow | rules |
/// |---|---|---|
/// | `local` | staging | auto-approve, shells |
/// | `prod` | production | 1 approval by sre-leads, shells, max_ttl 1h |
/// | `crit` | critical | 2 approvals by sre-leads, shells |
/// | `cmds` | restricted | 1 approval, commands `id`, `uname *`, `sleep *` only |
/// | `secure` | secure | auto-approve, shells, TOTP step-up |
/// | `vault` | vault | 1 approval, shells, TOTP step-up (for approvers too) |
/// | `certs` | production | (optional second sshd) certificate mode |
#[derive(Debug, Clone)]
pub struct Policies {
    /// (name, public key, groups) of every user.
    pub users: Vec<(String, String, Vec<String>)>,
    /// Address and host key of the certificate-only sshd, if any.
    pub cert_target: Option<(String, String)>,
    /// `host:port` of the target sshd.
    pub target_address: String,
    /// Host key pinned for the target.
    pub target_host_key: String,
    /// Allowed logins on the target, default first.
    pub logins: Vec<String>,
}

/// The flows of the test policies (see [`Policies`]).
const FLOWS: &str = r#"
[[flows]]
name = "staging"
match = { env = "staging" }
requesters = ["group:engineers"]
auto_approve = true
shell = true
max_ttl = "8h"

[[flows]]
name = "production"
match = { env = "production" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
max_ttl = "1h"
shell = true

[[flows]]
name = "critical"
match = { env = "critical" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
approvals = 2
max_ttl = "1h"
shell = true

[[flows]]
name = "secure"
match = { env = "secure" }
requesters = ["group:engineers"]
auto_approve = true
shell = true
step_up = "totp"

[[flows]]
name = "vault"
match = { env = "vault" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
shell = true
step_up = "totp"

[[flows]]
name = "restricted"
match = { env = "restricted" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
max_ttl = "1h"
commands = ["id", "uname *", "sleep *"]
"#;

impl Policies {
    /// Writes users.toml, targets.toml and flows.toml into `dir`.
    pub fn write(&self, dir: &Path) {
        fs::create_dir_all(dir).expect("create policies dir");
        let mut users = String::new();
        for (name, key, groups) in &self.users {
            let groups: Vec<String> = groups.iter().map(|g| toml_str(g)).collect();
            users.push_str(&format!(
                "[users.{name}]\nkeys = [{}]\ngroups = [{}]\n",
                toml_str(key),
                groups.join(", ")
            ));
        }
        let logins: Vec<String> = self.logins.iter().map(|l| toml_str(l)).collect();
        let mut targets = String::new();
        for (name, env) in [
            (TARGET, "staging"),
            ("prod", "production"),
            ("crit", "critical"),
            ("cmds", "restricted"),
            ("secure", "secure"),
            ("vault", "vault"),
        ] {
            targets.push_str(&format!(
                "[targets.{name}]\naddress = {}\nhost_key = {}\nlogins = [{}]\nlabels = {{ env = \"{env}\" }}\n",
                toml_str(&self.target_address),
                toml_str(&self.target_host_key),
                logins.join(", ")
            ));
        }
        if let Some((address, host_key)) = &self.cert_target {
            targets.push_str(&format!(
                "[targets.certs]\naddress = {}\nhost_key = {}\nlogins = [{}]\nlabels = {{ env = \"production\" }}\nauth = \"certificate\"\n",
                toml_str(address),
                toml_str(host_key),
                logins.join(", ")
            ));
        }
        fs::write(dir.join("users.toml"), users).expect("write users.toml");
        fs::write(dir.join("targets.toml"), targets).expect("write targets.toml");
        fs::write(dir.join("flows.toml"), FLOWS).expect("write flows.toml");
    }
}

/// The allowed logins on the test target: the current user first (the only
/// one sshd can really log in as), then `nobody` so lists have two entries.
pub fn default_logins() -> Vec<String> {
    let mut logins = vec![login_user().to_string()];
    if login_user() != "nobody" {
        logins.push("nobody".to_string());
    }
    logins
}

/// Quotes a string for a TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `users` (users.toml text) without the `[users.NAME]` table.
pub fn without_user(users: &str, name: &str) -> String {
    let header = format!("[users.{name}]");
    let start = users.find(&header).expect("the user is in users.toml");
    let end = users[start + 1..]
        .find("[users.")
        .map_or(users.len(), |at| start + 1 + at);
    format!("{}{}", &users[..start], &users[end..])
}
