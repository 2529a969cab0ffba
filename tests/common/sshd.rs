//! A real OpenSSH server on loopback, and the keys the harness makes for it.

use super::*;

/// Generates an unencrypted ed25519 key pair at `path` (+ `.pub`) and returns
/// the public key line.
pub fn keygen(path: &Path, comment: &str) -> String {
    let out = run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path));
    assert_success(&out, "ssh-keygen");
    public_key_of(path)
}

/// The public key line stored next to the private key at `path`.
pub fn public_key_of(path: &Path) -> String {
    let pub_path = path.with_extension("pub");
    fs::read_to_string(&pub_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", pub_path.display()))
        .trim()
        .to_string()
}

/// The `SHA256:…` fingerprint of the public key file `pub_path`, as OpenSSH
/// prints it (and as error messages about host keys are expected to).
pub fn fingerprint(pub_path: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(pub_path));
    assert_success(&out, "ssh-keygen -lf");
    text(&out.stdout)
        .split_whitespace()
        .find(|word| word.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no fingerprint in {}", describe(&out)))
        .to_string()
}

/// A real OpenSSH server on loopback: the target behind the bastion.
pub struct Sshd {
    daemon: Daemon,
    dir: PathBuf,
    host_key: PathBuf,
}

impl Sshd {
    /// Starts sshd with its files (host key, authorized_keys, config, log) in
    /// `dir`, letting in any of `authorized_keys`.
    pub fn start(dir: &Path, authorized_keys: &[String]) -> Sshd {
        Sshd::start_with(dir, authorized_keys, "")
    }

    /// Like [`Sshd::start`], with `extra_config` placed before the defaults:
    /// sshd keeps the first value it reads for a keyword, so this overrides them.
    pub fn start_with(dir: &Path, authorized_keys: &[String], extra_config: &str) -> Sshd {
        fs::create_dir_all(dir).expect("create sshd dir");
        // Privilege separation directory; sshd refuses to start without it.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let host_key = dir.join("host_key");
        keygen(&host_key, "portcullis-test-target");
        let authorized = dir.join("authorized_keys");
        let mut keys = authorized_keys.join("\n");
        keys.push('\n');
        fs::write(&authorized, keys).expect("write authorized_keys");
        let config = dir.join("sshd_config");
        let daemon = Daemon::start("sshd", &dir.join("sshd.log"), |port| {
            fs::write(
                &config,
                sshd_config(port, &host_key, &authorized, extra_config),
            )
            .expect("write sshd_config");
            let mut cmd = Command::new("/usr/sbin/sshd");
            cmd.args(["-D", "-e", "-f"]).arg(&config);
            cmd
        });
        Sshd {
            daemon,
            dir: dir.to_path_buf(),
            host_key,
        }
    }

    pub fn port(&self) -> u16 {
        self.daemon.port()
    }

    /// `127.0.0.1:PORT`, as a target address in policies.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The host public key line (`ssh-ed25519 AAAA… comment`).
    pub fn host_public_key(&self) -> String {
        public_key_of(&self.host_key)
    }

    /// Path of the host public key file.
    pub fn host_public_key_path(&self) -> PathBuf {
        self.host_key.with_extension("pub")
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Process id of the listening sshd; it leads its process group, which also
    /// holds the per-connection sshd processes.
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lets `key` in too (sshd reads authorized_keys at every login).
    pub fn authorize_key(&self, key: &str) {
        let path = self.dir.join("authorized_keys");
        let mut keys = fs::read_to_string(&path).expect("read authorized_keys");
        keys.push_str(key.trim());
        keys.push('\n');
        fs::write(&path, keys).expect("write authorized_keys");
    }
}

/// The sshd configuration for tests: loopback only, public keys only, our own
/// files only, verbose logging to stderr.
fn sshd_config(port: u16, host_key: &Path, authorized_keys: &Path, extra: &str) -> String {
    format!(
        "{extra}
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
AcceptEnv LANG LC_* TZ
AllowTcpForwarding yes
LogLevel VERBOSE
{concurrency}",
        host_key = host_key.display(),
        authorized_keys = authorized_keys.display(),
        // Concurrency tests open dozens of connections at once; the defaults
        // (MaxStartups 10:30:100) would drop some of them at random. Unlike most
        // keywords, sshd keeps the *last* MaxStartups it reads, so an `extra` that
        // sets it (the door benchmark's stock sshd) must not be followed by this.
        concurrency = if extra.contains("MaxStartups") {
            ""
        } else {
            "MaxStartups 200\nMaxSessions 100\n"
        },
    )
}
