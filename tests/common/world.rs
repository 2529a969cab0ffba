//! One test's universe: target sshd, bastion and engineers, built together.

use super::*;

/// Choices for [`World::start_with`].
#[derive(Debug, Clone, Default)]
pub struct WorldOptions {
    /// Pin this host key for the target instead of the real one (to test a
    /// changed host key).
    pub pinned_host_key: Option<String>,
    /// Extra lines for portcullis.toml (e.g. a `[notify]` table), shared with
    /// [`World::another_node`]s.
    pub extra_config: String,
    /// Lines for this world's bastion only, after `extra_config` (its `[cluster]`
    /// table: each node has its own `node_id`).
    pub node_config: String,
    /// Also start a second sshd that trusts only the bastion's CA (no
    /// authorized_keys at all), as target `certs` with `auth = "certificate"`.
    pub certificate_target: bool,
    /// Extra lines for the target sshd's config (e.g. `ChannelTimeout`).
    pub sshd_config: String,
}

/// One test's universe: a temp dir, a target sshd that trusts only the
/// bastion's upstream key, a bastion whose policies know `alice` and the
/// target `local`, and clients for `alice` (known) and `mallory` (unknown).
///
/// Fields drop in order: the bastion, then sshd, then the directory.
pub struct World {
    pub bastion: Bastion,
    pub sshd: Sshd,
    /// The certificate-only target, when asked for.
    pub cert_sshd: Option<Sshd>,
    /// Engineer (group engineers).
    pub alice: Client,
    /// Approver (group sre-leads).
    pub bob: Client,
    /// Approver (group sre-leads).
    pub carol: Client,
    /// Engineer and auditor.
    pub dave: Client,
    /// A key the bastion has never heard of.
    pub mallory: Client,
    pub keys: BastionKeys,
    pub dir: TempDir,
}

impl World {
    /// A world with default options.
    pub fn start() -> World {
        World::start_with(WorldOptions::default())
    }

    pub fn start_with(options: WorldOptions) -> World {
        let mut world = World::prepare(options);
        let bastion = Bastion::start(world.dir.path());
        world.follow(bastion.port());
        world.bastion = bastion;
        world
    }

    /// Everything of [`World::start_with`] but the bastion process, for tests that
    /// run the bastion in their own process ([`InProcess`]); clients point nowhere
    /// until [`World::follow`].
    pub fn prepare(options: WorldOptions) -> World {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-test-")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path();
        let mut users = Vec::new();
        for (name, groups) in [
            (USER, vec![GROUP]),
            ("bob", vec!["sre-leads"]),
            ("carol", vec!["sre-leads"]),
            ("dave", vec![GROUP, "auditors"]),
        ] {
            let public = keygen(&root.join(name), name);
            let groups = groups.iter().map(|g| g.to_string()).collect();
            users.push((name.to_string(), public, groups));
        }
        let mallory_key = root.join("mallory");
        keygen(&mallory_key, "mallory");
        // PORTCULLIS_TEST_STORE=postgres runs the world's bastion on PostgreSQL
        // (scripts/test runs some suites that way too), unless the test chose a
        // store itself, in either file (the benchmarks' BENCH_STORE does).
        let chosen = |config: &str| config.contains("[store]");
        let store = match chosen(&options.extra_config) || chosen(&options.node_config) {
            true => String::new(),
            false => store_chosen_by("PORTCULLIS_TEST_STORE", postgres).0,
        };
        fs::write(
            root.join(EXTRA_CONFIG),
            options.extra_config.clone() + &store,
        )
        .expect("write extra config");
        fs::write(root.join(NODE_CONFIG), &options.node_config).expect("write node config");

        let keys = Bastion::keys(root);
        let ca_pub = root.join("data").join("ca_ed25519.pub");
        // Trusting the bastion's CA as well lets certificate mode work against
        // the same target once it exists.
        let mut extra = if ca_pub.exists() {
            format!("TrustedUserCAKeys {}\n", ca_pub.display())
        } else {
            String::new()
        };
        extra.push_str(&options.sshd_config);
        let sshd = Sshd::start_with(
            &root.join("sshd"),
            std::slice::from_ref(&keys.upstream),
            &extra,
        );
        let cert_sshd = options
            .certificate_target
            .then(|| Sshd::start_with(&root.join("sshd-certs"), &[], &extra));

        Policies {
            users,
            cert_target: cert_sshd
                .as_ref()
                .map(|c| (c.address(), c.host_public_key())),
            target_address: sshd.address(),
            target_host_key: options
                .pinned_host_key
                .clone()
                .unwrap_or_else(|| sshd.host_public_key()),
            logins: default_logins(),
        }
        .write(&root.join("policies"));
        let bastion = Bastion::placeholder(root);
        let client = |name: &str| Client::new(&root.join(name), 0);
        World {
            cert_sshd,
            alice: client(USER),
            bob: client("bob"),
            carol: client("carol"),
            dave: client("dave"),
            mallory: client("mallory"),
            bastion,
            sshd,
            keys,
            dir,
        }
    }

    /// Kills the bastion (SIGKILL, like a crash) and starts it again on the same data
    /// directory; clients follow it to its new port.
    pub fn restart_bastion(&mut self) {
        self.restart_bastion_after(false, |_| {});
    }

    /// Stops the bastion (SIGTERM and a wait when `graceful`, SIGKILL otherwise), runs
    /// `between` with the data directory (the database is unlocked then), and starts
    /// it again; clients follow it to its new port.
    pub fn restart_bastion_after(&mut self, graceful: bool, between: impl FnOnce(&Path)) {
        let root = self.dir.path().to_path_buf();
        let mut old = std::mem::replace(&mut self.bastion, Bastion::placeholder(&root));
        if graceful {
            let _ = Command::new("kill")
                .args(["-TERM", &old.pid().to_string()])
                .status();
            let stopped = wait_until(STARTUP_TIMEOUT, || !old.is_running());
            assert!(
                stopped,
                "the bastion did not stop on SIGTERM:\n{}",
                old.log()
            );
        }
        drop(old);
        between(&root.join("data"));
        self.bastion = Bastion::start(&root);
        self.follow(self.bastion.port());
    }

    /// A second sshd as an OpenSSH jump host (the ProxyJump route) that lets alice
    /// in, and alice let in on the target with her own key too: what benchmarks
    /// compare the bastion with, on the same machine and target.
    pub fn jump_host(&self) -> Sshd {
        let alice = public_key_of(self.alice.key());
        self.sshd.authorize_key(&alice);
        Sshd::start(&self.path("jump"), &[alice])
    }

    /// Another bastion node beside this world's, in its own directory `name`
    /// (under the world's), running `binary`: the same keys, policies and extra
    /// config, then `extra` for it alone (e.g. its own `[cluster]` table). Targets
    /// trust it and the world's clients may use it at its port. For several nodes
    /// on one database and for benchmarks against another build.
    pub fn another_node(&self, name: &str, binary: &Path, extra: &str) -> Bastion {
        let dir = self.node_dir(name, extra);
        let mut keys = Command::new("cp");
        keys.arg("-a");
        for key in ["host_ed25519", "upstream_ed25519", "ca_ed25519", "totp.key"] {
            keys.arg(self.path("data").join(key));
        }
        assert!(
            keys.arg(dir.join("data"))
                .status()
                .expect("run cp")
                .success(),
            "copy the keys to {name}"
        );
        Bastion::start_binary(&dir, binary)
    }

    /// The directory of another node `name` (see [`World::another_node`]) with the
    /// world's policies and config and `extra` for it alone, but no keys yet (a
    /// node started from it makes its own); returns it.
    pub fn node_dir(&self, name: &str, extra: &str) -> PathBuf {
        let dir = self.path(name);
        let data = dir.join("data");
        fs::create_dir_all(&data).expect("create the node's data dir");
        fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod the node's data dir");
        let root = self.dir.path();
        let copied = Command::new("cp")
            .arg("-a")
            .arg(root.join("policies"))
            .arg(&dir)
            .status()
            .expect("run cp");
        assert!(copied.success(), "copy the policies to {name}");
        fs::copy(root.join(EXTRA_CONFIG), dir.join(EXTRA_CONFIG)).expect("copy extra config");
        fs::write(dir.join(NODE_CONFIG), extra).expect("write node config");
        dir
    }

    /// Points every engineer's client at the bastion on `port`.
    pub fn follow(&mut self, port: u16) {
        for client in [
            &mut self.alice,
            &mut self.bob,
            &mut self.carol,
            &mut self.dave,
            &mut self.mallory,
        ] {
            client.port = port;
        }
    }

    /// Rewrites one policy file with `edit`, sends the bastion SIGHUP and waits
    /// until it logged that the policy was reloaded.
    pub fn edit_policy(&self, file: &str, edit: impl FnOnce(String) -> String) {
        let path = self.bastion.policies_dir().join(file);
        let before = fs::read_to_string(&path).expect("read policy file");
        fs::write(&path, edit(before)).expect("write policy file");
        let reloads = || self.bastion.log().matches("policy reloaded").count();
        let seen = reloads();
        let sent = Command::new("kill")
            .args(["-HUP", &self.bastion.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(sent.success());
        assert!(
            wait_until(STARTUP_TIMEOUT, || reloads() > seen),
            "the bastion did not reload {file}:\n{}",
            self.logs()
        );
    }

    /// Runs a control-plane command as `client` that must succeed; returns stdout.
    pub fn ok(&self, client: &Client, command: &[&str]) -> String {
        let out = self.control_as(client, command);
        assert!(
            out.status.success(),
            "{command:?} failed: {}\n{}",
            describe(&out),
            self.logs()
        );
        text(&out.stdout)
    }

    /// The kinds of all audit events, in order, as the auditor dave sees them.
    pub fn audit_kinds(&self) -> Vec<String> {
        self.ok(&self.dave, &["audit", "--json"])
            .lines()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                event["kind"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }

    /// Runs a control-plane command as `client`. The words are quoted into one
    /// command line, as a user types `ssh portcullis@bastion "request db --reason 'a b'"`
    /// (ssh joins separate arguments with bare spaces).
    pub fn control_as(&self, client: &Client, command: &[&str]) -> Output {
        client.ssh(CONTROL_USER, &[&quote_words(command)])
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `LOGIN@local` with the current user as the login.
    pub fn target_user(&self) -> String {
        format!("{}@{TARGET}", login_user())
    }

    /// Runs a control-plane command as alice.
    pub fn control(&self, command: &[&str]) -> Output {
        self.alice.ssh(CONTROL_USER, command)
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- bastion log ({}) ---\n{}\n--- sshd log ---\n{}",
            self.dir.path().display(),
            truncate_tail(&self.bastion.log(), 20_000),
            truncate_tail(&self.sshd.log(), 10_000)
        )
    }
}

impl Drop for World {
    /// On a failing test, show what the daemons said: it is usually the answer.
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The last `max` bytes of `s`, where the interesting part of a log usually is.
fn truncate_tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[… {start} bytes]\n{}", &s[start..])
}

/// An interactive shell session of alice on the local target, in tmux, that has
/// printed `survived-9` and waited past the recording's flush interval, so its
/// output is on disk (for crash and tampering tests).
pub fn flushed_shell_session(world: &World) -> Tmux {
    let line = world
        .alice
        .ssh_shell_line(&format!("{}@{TARGET}", login_user()), &["-tt"], &[]);
    let tmux = Tmux::start(world.dir.path(), 100, 30, &line);
    tmux.send("echo survived-$((3*3))", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("survived-9", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    // Longer than the flush interval, so the output is on disk.
    thread::sleep(Duration::from_millis(2500));
    tmux
}

/// `watch ID` as `dave` (an auditor's client, on any node) of the live shell
/// session in `tmux`: it starts with what was shown so far (`so_far`), follows
/// new output, and ends when the session does.
pub fn assert_watch_follows(world: &World, dave: &Client, tmux: &Tmux, id: &str, so_far: &str) {
    let mut watcher = Background::spawn(
        dave.ssh_command(CONTROL_USER, &[], &["watch", id]),
        &world.path("watch.log"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || watcher
            .output()
            .contains(so_far)),
        "watch starts with what was shown so far: {}",
        watcher.output()
    );
    tmux.send("echo after-$((20+22))", true);
    tmux.send("Enter", false);
    assert!(
        wait_until(Duration::from_secs(10), || watcher
            .output()
            .contains("after-42")),
        "watch sees new output: {}",
        watcher.output()
    );
    tmux.send("exit", true);
    tmux.send("Enter", false);
    let status = watcher.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {}",
        watcher.output()
    );
    assert!(
        watcher.output().contains(&format!("session {id} ended")),
        "{}",
        watcher.output()
    );
}

/// The `ssh` of a session under grant `id` ends within a second of `bob`'s
/// revocation (just made) with `reason`, and tells its user why.
pub fn assert_revoked_within_a_second(session: Child, id: &str, reason: &str) {
    let (out, took) = wait_output(session, Duration::from_secs(10));
    eprintln!("revoke → session closed in {took:?}");
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "grant {id} revoked by bob ({reason}) — session closed"
        )),
        "{stderr}"
    );
}

/// Connects alice as `username` with a terminal and no grant, answers the
/// bastion's question with `reason`, and returns once the request is waiting
/// for its approvers (`group:sre-leads`, as for `prod`).
pub fn request_at_the_terminal(w: &World, username: &str, reason: &str) -> Tmux {
    let line = w.alice.ssh_shell_line(username, &["-tt"], &[]);
    let tmux = Tmux::start(w.dir.path(), 120, 30, &line);
    assert!(
        tmux.wait_for("Reason for access", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    tmux.send(reason, true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("waiting for group:sre-leads", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    tmux
}
