//! The engineer's side: the OpenSSH client tools of one key, and a russh
//! handler for tests that drive the bastion from their own process.

use super::*;

/// A russh client handler that accepts any host key: for tests and benchmarks that
/// drive the bastion through russh on loopback, against servers they started.
pub struct AnyHostKey;

impl russh::client::Handler for AnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A russh session to `127.0.0.1:port`, authenticated as `user` with `key`, low
/// latency (`nodelay`): how tests and benchmarks that run their clients in their own
/// process log in.
pub async fn russh_login(
    port: u16,
    user: &str,
    key: &std::sync::Arc<russh::keys::PrivateKey>,
) -> russh::client::Handle<AnyHostKey> {
    let session = russh::client::connect(russh_config(), ("127.0.0.1", port), AnyHostKey)
        .await
        .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
    authenticated(session, user, key).await
}

/// A russh client configuration with Nagle off, as OpenSSH's interactive sessions.
pub fn russh_config() -> std::sync::Arc<russh::client::Config> {
    std::sync::Arc::new(russh::client::Config {
        nodelay: true,
        ..Default::default()
    })
}

/// `session` once it authenticated as `user` with `key`; panics when refused.
pub async fn authenticated(
    mut session: russh::client::Handle<AnyHostKey>,
    user: &str,
    key: &std::sync::Arc<russh::keys::PrivateKey>,
) -> russh::client::Handle<AnyHostKey> {
    let auth = session
        .authenticate_publickey(
            user,
            russh::keys::PrivateKeyWithHashAlg::new(key.clone(), None),
        )
        .await
        .unwrap_or_else(|e| panic!("authenticate as {user}: {e}"));
    assert!(auth.success(), "authentication as {user} refused");
    session
}

/// What a command run over russh printed, and how it ended.
#[derive(Debug, Default)]
pub struct Exec {
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `command` on a new channel of `session` and collects its output until the
/// channel closes.
pub async fn russh_exec(session: &russh::client::Handle<AnyHostKey>, command: &str) -> Exec {
    let mut channel = session.channel_open_session().await.expect("open channel");
    channel.exec(true, command).await.expect("exec");
    let mut exec = Exec::default();
    while let Some(msg) = channel.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => exec.stdout.extend_from_slice(&data),
            russh::ChannelMsg::ExtendedData { data, .. } => exec.stderr.extend_from_slice(&data),
            russh::ChannelMsg::ExitStatus { exit_status } => exec.status = Some(exit_status),
            _ => {}
        }
    }
    exec
}

/// The OpenSSH client tools of one engineer (one key) pointed at one port.
#[derive(Debug, Clone)]
pub struct Client {
    key: PathBuf,
    pub(super) port: u16,
    /// Answers keyboard-interactive prompts (TOTP) with this program instead of
    /// refusing them (`BatchMode`).
    askpass: Option<PathBuf>,
}

impl Client {
    pub fn new(key: &Path, port: u16) -> Client {
        Client {
            key: key.to_path_buf(),
            port,
            askpass: None,
        }
    }

    /// The same engineer, answering the TOTP prompt with `program` through
    /// `SSH_ASKPASS` (one attempt per connection).
    pub fn with_askpass(&self, program: &Path) -> Client {
        Client {
            askpass: Some(program.to_path_buf()),
            ..self.clone()
        }
    }

    /// The same engineer connecting to `port` instead (a load balancer's).
    pub fn via(&self, port: u16) -> Client {
        Client {
            port,
            ..self.clone()
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn key(&self) -> &Path {
        &self.key
    }

    /// Options shared by ssh, scp and sftp: no user config, no known_hosts, only
    /// this key, never prompt, only errors on stderr. (The port flag differs
    /// between tools, so it is not included.)
    pub fn options(&self) -> Vec<String> {
        let mut opts: Vec<String> = [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            if self.askpass.is_some() {
                "NumberOfPasswordPrompts=1"
            } else {
                "BatchMode=yes"
            },
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        opts.push(self.key.display().to_string());
        opts
    }

    /// `ssh OPTIONS -p PORT FLAGS -l USER 127.0.0.1 COMMAND...`, not yet run.
    pub fn ssh_command(&self, user: &str, flags: &[&str], command: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        if let Some(askpass) = &self.askpass {
            cmd.env("SSH_ASKPASS", askpass)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0");
        }
        cmd.args(self.options())
            .args(["-p", &self.port.to_string()])
            .args(flags)
            .args(["-l", user, "127.0.0.1"])
            .args(command);
        cmd
    }

    /// The same command line as [`Client::ssh_command`], as one shell string
    /// (for tmux).
    pub fn ssh_shell_line(&self, user: &str, flags: &[&str], command: &[&str]) -> String {
        let cmd = self.ssh_command(user, flags, command);
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|arg| shell_quote(&arg.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs a remote command as `user` (e.g. `root@local`).
    pub fn ssh(&self, user: &str, command: &[&str]) -> Output {
        run(&mut self.ssh_command(user, &[], command))
    }

    /// Like [`Client::ssh`] with extra ssh flags (before the destination).
    pub fn ssh_with(&self, user: &str, flags: &[&str], command: &[&str]) -> Output {
        run(&mut self.ssh_command(user, flags, command))
    }

    /// Like [`Client::ssh`], feeding `input` on stdin.
    pub fn ssh_stdin(&self, user: &str, command: &[&str], input: Vec<u8>) -> Output {
        run_with_timeout(
            &mut self.ssh_command(user, &[], command),
            Some(input),
            COMMAND_TIMEOUT,
        )
    }

    /// `scp OPTIONS -P PORT FLAGS FROM TO` (sftp protocol unless FLAGS has `-O`).
    pub fn scp(&self, flags: &[&str], from: &str, to: &str) -> Output {
        run(Command::new("scp")
            .args(self.options())
            .args(["-P", &self.port.to_string()])
            .args(flags)
            .args([from, to]))
    }

    /// `sftp OPTIONS -P PORT -b BATCH USER@127.0.0.1`; sftp exits non-zero when
    /// any batch command fails.
    pub fn sftp_batch(&self, user: &str, batch: &Path) -> Output {
        run(Command::new("sftp")
            .args(self.options())
            .args(["-P", &self.port.to_string(), "-b"])
            .arg(batch)
            .arg(format!("{user}@127.0.0.1")))
    }

    /// `rsync -a -e 'ssh OPTIONS -p PORT' FROM TO`.
    pub fn rsync(&self, from: &str, to: &str) -> Output {
        let mut ssh = vec!["ssh".to_string()];
        ssh.extend(self.options().iter().map(|o| shell_quote(o)));
        ssh.extend(["-p".to_string(), self.port.to_string()]);
        run(Command::new("rsync").args(["-a", "-e", &ssh.join(" "), from, to]))
    }
    /// Starts `ssh -M -N` as a ControlMaster on `control_path` in the
    /// background (output to `log`) and waits until it accepts multiplexed
    /// sessions. Running it in the foreground, rather than with `-f`, keeps it
    /// our child so it is always reaped.
    pub fn control_master(&self, user: &str, control_path: &Path, log: &Path) -> Background {
        let path_opt = format!("ControlPath={}", control_path.display());
        let master = Background::spawn(
            self.ssh_command(
                user,
                &["-M", "-N", "-o", &path_opt, "-o", "ControlPersist=no"],
                &[],
            ),
            log,
        );
        let ready = wait_until(STARTUP_TIMEOUT, || {
            self.mux_control(user, control_path, "check")
                .status
                .success()
        });
        assert!(
            ready,
            "ControlMaster never became ready:\n{}",
            master.output()
        );
        master
    }

    /// `ssh -O OPERATION` (check, exit, …) against the master on `control_path`.
    pub fn mux_control(&self, user: &str, control_path: &Path, operation: &str) -> Output {
        let path_opt = format!("ControlPath={}", control_path.display());
        run(&mut self.ssh_command(user, &["-o", &path_opt, "-O", operation], &[]))
    }
}

/// Words quoted for a POSIX shell and joined into one command line.
pub fn quote_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `USER@127.0.0.1:PATH`, the remote-path syntax of scp and rsync (OpenSSH
/// splits the host at the last `@`, so USER may be `root@local`).
pub fn remote_path(user: &str, path: &Path) -> String {
    format!("{user}@127.0.0.1:{}", path.display())
}
