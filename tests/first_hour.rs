//! Issue 16, the first hour: the README's first path walked as a newcomer walks
//! it, and everything a newcomer trips over on the way.
//!
//! The newcomer has a fresh HOME holding nothing but an SSH key, a clone with the
//! example policies, and this machine's sshd (here a real sshd on a loopback
//! port). They start the bastion as the quickstart says, run `portcullis init`
//! and `portcullis reload`, ask for a shell, approve it as the demo teammate,
//! connect, and replay and export the session as the auditor: every command line
//! is the README's (checked against it), run through `sh -c` with the real ssh.
//!
//! OpenSSH reads `~/.ssh` from the passwd entry, not from `$HOME`, so the
//! newcomer's `ssh` is a wrapper that points it at the fresh HOME's config
//! (their key, their known_hosts); nothing else differs from a real first run.
//! The one other difference: the bastion listens on a free port (a config file
//! saying only that), not on 2222, so tests can run side by side.

pub mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    assert_failure_mentions, assert_success, describe, fingerprint, free_port, keygen, login_user,
    run, shell_quote, text, wait_until, Background, Bastion, Client, Daemon, Sshd, Tmux, World,
    CONTROL_USER, STARTUP_TIMEOUT,
};

/// The README, whose first path this test walks.
fn readme() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

/// Fails unless the README has `line`, written with its port 2222 where this
/// test uses `port`.
fn in_readme(readme: &str, line: &str, port: u16) {
    let written = line
        .replace(&format!("-p {port} "), "-p 2222 ")
        .replace(" --config portcullis.toml", "");
    assert!(
        readme
            .lines()
            .any(|l| l.trim() == written || l.trim().starts_with(&format!("{written}  "))),
        "the README does not say: {written}"
    );
}

/// Where the real ssh is, for the wrappers.
fn real_ssh() -> String {
    let out = run(Command::new("sh").args(["-c", "command -v ssh"]));
    assert_success(&out, "command -v ssh");
    text(&out.stdout).trim().to_string()
}

/// A directory with an `ssh` that runs the real one with `options` first.
fn ssh_wrapper(dir: &Path, options: &str) -> PathBuf {
    fs::create_dir_all(dir).expect("wrapper dir");
    let path = dir.join("ssh");
    fs::write(
        &path,
        format!("#!/bin/sh\nexec {} {options} \"$@\"\n", real_ssh()),
    )
    .expect("write ssh wrapper");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod ssh wrapper");
    dir.to_path_buf()
}

/// `PATH` with `dir` first.
fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The newcomer: a fresh HOME, a clone, and their shell.
struct Newcomer {
    root: tempfile::TempDir,
    home: PathBuf,
    checkout: PathBuf,
    bin: PathBuf,
}

impl Newcomer {
    fn new() -> Newcomer {
        let root = tempfile::Builder::new()
            .prefix("portcullis-first-hour-")
            .tempdir()
            .expect("temp dir");
        let home = root.path().join("home");
        let ssh_dir = home.join(".ssh");
        fs::create_dir_all(&ssh_dir).expect("~/.ssh");
        fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700)).expect("chmod ~/.ssh");
        keygen(&ssh_dir.join("id_ed25519"), "newcomer@laptop");
        // What OpenSSH would read from this HOME; BatchMode so a mistake fails
        // instead of waiting for a password.
        fs::write(
            ssh_dir.join("config"),
            format!(
                "IdentityFile {dir}/id_ed25519\nUserKnownHostsFile {dir}/known_hosts\nStrictHostKeyChecking accept-new\nBatchMode yes\nLogLevel ERROR\n",
                dir = ssh_dir.display()
            ),
        )
        .expect("~/.ssh/config");
        let bin = ssh_wrapper(
            &root.path().join("bin"),
            &format!(
                "-F {}",
                shell_quote(&ssh_dir.join("config").display().to_string())
            ),
        );
        // A clone: the example policies as the repository ships them.
        let checkout = root.path().join("checkout");
        let policies = checkout.join("policies");
        fs::create_dir_all(&policies).expect("checkout");
        for file in ["users.toml", "targets.toml", "flows.toml"] {
            fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("policies")
                    .join(file),
                policies.join(file),
            )
            .expect("copy example policy");
        }
        Newcomer {
            root,
            home,
            checkout,
            bin,
        }
    }

    /// A command in the checkout, in the newcomer's environment.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.checkout)
            .env("HOME", &self.home)
            .env("PATH", path_with(&self.bin))
            .env_remove("SSH_AUTH_SOCK")
            .env("NO_COLOR", "1");
        cmd
    }

    /// A line typed at the newcomer's shell.
    fn sh(&self, line: &str) -> Output {
        run(self.command("sh").args(["-c", line]))
    }

    fn ok(&self, line: &str) -> String {
        let out = self.sh(line);
        assert_success(&out, line);
        text(&out.stdout)
    }

    /// `portcullis ARGS --config portcullis.toml` (the README's commands, with the
    /// config that moves the port).
    fn portcullis(&self, args: &[&str]) -> Output {
        run(self
            .command(Bastion::binary())
            .args(args)
            .args(["--config", "portcullis.toml"]))
    }

    /// The quickstart's `serve`, kept running.
    fn serve(&self) -> Daemon {
        Daemon::start("portcullis", &self.root.path().join("serve.log"), |port| {
            fs::write(
                self.checkout.join("portcullis.toml"),
                format!("listen = \"127.0.0.1:{port}\"\n"),
            )
            .expect("write portcullis.toml");
            let mut cmd = self.command(Bastion::binary());
            cmd.args(["serve", "--config", "portcullis.toml"]);
            cmd
        })
    }
}

/// The README's "The first hour", from the quickstart's `serve` to the auditor's
/// export.
#[test]
fn the_readme_first_path_works_for_a_newcomer() {
    let started = Instant::now();
    let readme = readme();
    let me = Newcomer::new();
    // This machine's sshd, reading the newcomer's authorized_keys.
    let sshd = Sshd::start_with(
        &me.root.path().join("sshd"),
        &[],
        &format!(
            "AuthorizedKeysFile {}/.ssh/authorized_keys\n",
            me.home.display()
        ),
    );

    // The quickstart: the bastion runs with the example policies, and says so.
    in_readme(&readme, "cargo run --release -- serve", 0);
    let serve = me.serve();
    let port = serve.port();
    assert!(
        wait_until(STARTUP_TIMEOUT, || serve
            .log()
            .contains("examples shipped with portcullis")),
        "{}",
        serve.log()
    );

    // init, pointed at the test's sshd (the README's --target), then reload.
    in_readme(&readme, "portcullis init", port);
    let init = me.portcullis(&["init", "--target", &sshd.address()]);
    assert_success(&init, "portcullis init");
    let said = text(&init.stdout);
    assert!(
        said.contains(&format!("portcullis (pid {}) is serving", serve.pid()))
            && said.contains("portcullis reload --config portcullis.toml"),
        "init does not say to reload the running bastion:\n{said}"
    );
    let users = fs::read_to_string(me.checkout.join("policies/users.toml")).unwrap();
    let key = fingerprint(&me.home.join(".ssh/id_ed25519.pub"));
    assert!(
        said.contains(&key),
        "init does not name the key it took:\n{said}"
    );
    assert!(users.contains("newcomer@laptop"), "{users}");
    let targets = fs::read_to_string(me.checkout.join("policies/targets.toml")).unwrap();
    let host_key = sshd.host_public_key();
    let host_key_blob = host_key.split_whitespace().nth(1).unwrap();
    assert!(
        targets.contains(host_key_blob),
        "the target's host key is not pinned:\n{targets}"
    );
    for file in ["portcullis-data", "portcullis-data/demo"] {
        let mode = fs::metadata(me.checkout.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{file}");
    }
    let check = me.portcullis(&["policy", "check"]);
    assert_success(&check, "policy check");
    assert!(
        !text(&check.stderr).contains("warning"),
        "{}",
        describe(&check)
    );

    in_readme(&readme, "portcullis reload", port);
    let reload = me.portcullis(&["reload"]);
    assert_success(&reload, "portcullis reload");
    assert!(
        text(&reload.stdout).contains(&format!(
            "policy reloaded by portcullis (pid {}): 2 users, 1 targets, 1 flows",
            serve.pid()
        )),
        "{}",
        describe(&reload)
    );

    // The engineer asks.
    let request = format!(
        "ssh -p {port} portcullis@127.0.0.1 \"request localhost --shell --reason 'first try'\""
    );
    in_readme(&readme, &request, port);
    let asked = me.ok(&request);
    let id = asked
        .split_whitespace()
        .nth(1)
        .filter(|_| asked.starts_with("request "))
        .unwrap_or_else(|| panic!("no request id in {asked}"))
        .to_string();
    let approve = asked
        .lines()
        .find_map(|l| l.strip_prefix("approvers run: "))
        .unwrap_or_else(|| panic!("no approver command in {asked}"))
        .to_string();
    assert_eq!(
        approve,
        format!("ssh -p {port} portcullis@127.0.0.1 approve {id}")
    );

    // The teammate approves with the demo key.
    let teammate =
        "teammate() { ssh -o IdentitiesOnly=yes -i portcullis-data/demo/teammate \"$@\"; }";
    in_readme(&readme, teammate, port);
    let as_teammate = |line: &str| me.ok(&format!("{teammate}\n{line}"));
    let pending = format!("teammate -p {port} portcullis@127.0.0.1 requests --pending");
    in_readme(&readme, &pending, port);
    assert!(
        as_teammate(&pending).contains(&id),
        "the request is not pending"
    );
    let approve = approve.replacen("ssh ", "teammate ", 1);
    in_readme(&readme, &approve.replace(&id, "7f3a9c"), port);
    assert!(
        as_teammate(&approve).contains(&format!("request {id} approved by teammate")),
        "not approved"
    );

    // The engineer's session, on a terminal.
    let connect = format!("ssh -p {port} localhost@127.0.0.1");
    in_readme(&readme, &connect, port);
    let shell_line = format!(
        "cd {} && HOME={} PATH={} {connect}",
        shell_quote(&me.checkout.display().to_string()),
        shell_quote(&me.home.display().to_string()),
        shell_quote(&path_with(&me.bin)),
    );
    let tmux = Tmux::start(me.root.path(), 100, 30, &shell_line);
    tmux.send("echo first-hour-$((6*7))", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("first-hour-42", Duration::from_secs(20)),
        "{}\n{}",
        tmux.screen(),
        serve.log()
    );
    tmux.send("exit", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("[exited 0]", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );

    // The auditor looks.
    let sessions = format!("teammate -p {port} portcullis@127.0.0.1 sessions");
    in_readme(&readme, &sessions, port);
    let listed = as_teammate(&sessions);
    assert!(
        listed.contains(&format!("{}@localhost", login_user())) && listed.contains("typed"),
        "{listed}"
    );
    let replay = format!("teammate -t -p {port} portcullis@127.0.0.1 replay 1");
    in_readme(&readme, &replay, port);
    assert!(as_teammate(&replay).contains("first-hour-42"), "replay");
    let export = format!("teammate -p {port} portcullis@127.0.0.1 export 1 > first.cast");
    in_readme(&readme, &export, port);
    as_teammate(&export);
    let cast = fs::read_to_string(me.checkout.join("first.cast")).expect("first.cast");
    assert!(
        cast.starts_with("{\"env\"")
            && cast.contains("\"version\":2")
            && cast.contains("first-hour-42"),
        "{cast}"
    );
    eprintln!(
        "first path, from serve to export: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // After editing a policy: reload says whether it took.
    let flows = me.checkout.join("policies/flows.toml");
    let good = fs::read_to_string(&flows).unwrap();
    fs::write(&flows, good.replace("group:sre-leads", "group:sre-lead")).unwrap();
    let reload = me.portcullis(&["reload"]);
    assert_success(&reload, "a reload with warnings");
    assert!(
        text(&reload.stderr)
            .contains("no user is in group 'sre-lead' (did you mean group:sre-leads?)")
            && text(&reload.stderr).contains("flow 'production' can never be approved"),
        "{}",
        describe(&reload)
    );
    fs::write(&flows, format!("{good}bogus = 1\n")).unwrap();
    let reload = me.portcullis(&["reload"]);
    assert_failure_mentions(
        &reload,
        "a reload of a broken policy",
        &["unknown field `bogus`", "keeps the previous policy"],
    );
}

/// `init` checks everything before writing anything: no sshd, existing files.
/// And it finds the key in an agent when ~/.ssh has none.
#[test]
fn init_says_what_is_missing_and_writes_nothing_until_it_can_work() {
    let me = Newcomer::new();
    fs::write(
        me.checkout.join("portcullis.toml"),
        format!("listen = \"127.0.0.1:{}\"\n", free_port()),
    )
    .unwrap();
    let examples = fs::read_to_string(me.checkout.join("policies/users.toml")).unwrap();
    // Nothing listens there.
    let closed = format!("127.0.0.1:{}", free_port());
    let out = me.portcullis(&["init", "--target", &closed]);
    assert_failure_mentions(
        &out,
        "init without an sshd",
        &[
            "no SSH server to pin",
            &closed,
            "connection refused",
            "--target HOST:PORT",
        ],
    );
    assert!(
        !me.checkout.join("portcullis-data").exists(),
        "init wrote a data dir"
    );
    assert_eq!(
        fs::read_to_string(me.checkout.join("policies/users.toml")).unwrap(),
        examples
    );

    // The key from an agent, with no ~/.ssh/id_*.
    let sshd = Sshd::start(&me.root.path().join("sshd"), &[]);
    fs::rename(
        me.home.join(".ssh/id_ed25519.pub"),
        me.root.path().join("agent-key.pub"),
    )
    .unwrap();
    fs::rename(
        me.home.join(".ssh/id_ed25519"),
        me.root.path().join("agent-key"),
    )
    .unwrap();
    let socket = me.root.path().join("agent.sock");
    let _agent = Background::spawn(
        {
            let mut cmd = Command::new("ssh-agent");
            cmd.arg("-D").arg("-a").arg(&socket);
            cmd
        },
        &me.root.path().join("agent.log"),
    );
    assert!(wait_until(STARTUP_TIMEOUT, || socket.exists()), "no agent");
    let added = run(Command::new("ssh-add")
        .env("SSH_AUTH_SOCK", &socket)
        .arg(me.root.path().join("agent-key")));
    assert_success(&added, "ssh-add");
    let out = run(me
        .command(Bastion::binary())
        .env("SSH_AUTH_SOCK", &socket)
        .args(["init", "--no-authorize", "--target", &sshd.address()])
        .args(["--config", "portcullis.toml"]));
    assert_success(&out, "init with the agent's key");
    let users = fs::read_to_string(me.checkout.join("policies/users.toml")).unwrap();
    assert!(users.contains("# the agent"), "{users}");
    assert!(
        text(&out.stdout).contains("add this line to ~"),
        "--no-authorize prints the line instead:\n{}",
        describe(&out)
    );
    assert!(!me.home.join(".ssh/authorized_keys").exists());

    // Now the files are the user's: init leaves them alone unless --force.
    let again = run(me
        .command(Bastion::binary())
        .env("SSH_AUTH_SOCK", &socket)
        .args([
            "init",
            "--target",
            &sshd.address(),
            "--config",
            "portcullis.toml",
        ]));
    assert_failure_mentions(
        &again,
        "init over existing policies",
        &[
            "policies/users.toml, policies/targets.toml, policies/flows.toml already exist",
            "--force",
        ],
    );
    let forced = run(me
        .command(Bastion::binary())
        .env("SSH_AUTH_SOCK", &socket)
        .args([
            "init",
            "--force",
            "--target",
            &sshd.address(),
            "--config",
            "portcullis.toml",
        ]));
    assert_success(&forced, "init --force");
}

/// A shell wrapper directory whose `ssh` is `client`'s (its key, no prompts).
fn client_shell(dir: &Path, client: &Client) -> PathBuf {
    let options: Vec<String> = client.options().iter().map(|o| shell_quote(o)).collect();
    ssh_wrapper(dir, &options.join(" "))
}

/// Runs a printed command line in `sh -c`, with `bin`'s ssh.
fn paste(bin: &Path, line: &str) -> Output {
    run(Command::new("sh")
        .args(["-c", line])
        .env("PATH", path_with(bin)))
}

/// The line after `request it with:` (or after `marker`) in a refusal.
fn suggested(stderr: &str, marker: &str) -> String {
    let mut lines = stderr.lines();
    lines
        .find(|l| l.trim_end().ends_with(marker))
        .and_then(|_| lines.next())
        .unwrap_or_else(|| panic!("no line after {marker:?} in:\n{stderr}"))
        .trim()
        .to_string()
}

/// Every command line the bastion suggests works when pasted: run through `sh -c`
/// and the real ssh, it does what it says. Only what the flow allows is
/// suggested, and a command broken by ssh's word joining is explained with its
/// quoted form.
#[test]
fn suggested_command_lines_work_when_pasted() {
    let w = World::start();
    let alice = client_shell(&w.path("alice-bin"), &w.alice);
    let bob = client_shell(&w.path("bob-bin"), &w.bob);
    let port = w.bastion.port();
    let login = login_user();
    let control = format!("ssh -p {port} portcullis@127.0.0.1");

    // An exec the commands-only flow allows: exactly that command.
    let out = w.alice.ssh(&format!("{login}@cmds"), &["uname", "-a"]);
    let line = suggested(&text(&out.stderr), "request it with:");
    assert_eq!(
        line,
        format!("{control} \"request cmds --login {login} --command 'uname -a' --reason 'WHY'\"")
    );
    let filed = paste(&alice, &line);
    assert_success(&filed, &line);
    assert!(
        text(&filed.stdout).contains("pending"),
        "{}",
        describe(&filed)
    );

    // One it does not allow: never --shell, but what the flow does allow.
    let out = w
        .alice
        .ssh(&format!("{login}@cmds"), &["cat", "/etc/hostname"]);
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("--shell"), "{stderr}");
    assert!(
        stderr.contains("flow 'restricted' grants only the commands id, 'uname *', 'sleep *'; this is not one of them"),
        "{stderr}"
    );
    let line = suggested(&stderr, "Request those with:");
    assert_success(&paste(&alice, &line), &line);

    // A terminal on that flow: no shell to offer.
    let out = w.alice.ssh_with(&format!("{login}@cmds"), &["-tt"], &[]);
    let stderr = text(&out.stderr).replace('\r', "");
    assert!(!stderr.contains("--shell"), "{stderr}");
    let line = suggested(&stderr, "request them and run one without -t:");
    assert!(
        line.contains("--command id --command 'uname *' --command 'sleep *'"),
        "{line}"
    );
    assert_success(&paste(&alice, &line), &line);

    // Shell syntax on a flow with shells: --shell, quoted right.
    let out = w.alice.ssh(&format!("{login}@prod"), &["echo $HOME; ls"]);
    let line = suggested(&text(&out.stderr), "request it with:");
    assert!(line.ends_with("--shell --reason 'WHY'\""), "{line}");
    assert_success(&paste(&alice, &line), &line);

    // The old hint, pasted as it used to be printed: ssh joins the words.
    let broken = format!("{control} request prod --command 'uname -a' --reason 'WHY'");
    let out = paste(&alice, &broken);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("-- -a"),
        "{}",
        describe(&out)
    );
    assert!(
        stderr.contains("ssh joins its arguments with spaces, so --command 'uname -a' arrived as separate words"),
        "{stderr}"
    );
    let line = stderr.lines().last().unwrap().trim().to_string();
    assert_eq!(
        line,
        format!("{control} \"request prod --command 'uname -a' --reason 'WHY'\"")
    );
    let filed = paste(&alice, &line);
    assert_success(&filed, &line);
    // ...and the approver's line, pasted by the approver.
    let approve = text(&filed.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("approvers run: ").map(str::to_string))
        .expect("an approver command");
    let approved = paste(&bob, &approve);
    assert_success(&approved, &approve);
    assert!(
        text(&approved.stdout).contains("approved by bob"),
        "{}",
        describe(&approved)
    );

    // A bad option: clap's words without its `-- -a` tip, and a --help that works.
    let out = paste(&alice, &format!("{control} requests -a"));
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("-- -a") && !stderr.contains("try '--help'"),
        "{stderr}"
    );
    let help = format!("{control} \"requests --help\"");
    assert!(
        stderr.contains(&format!("For more information: {help} (in quotes")),
        "{stderr}"
    );
    let out = paste(&alice, &help);
    assert_success(&out, &help);
    assert!(
        text(&out.stdout).contains(&format!("Usage: {control} requests")),
        "{}",
        describe(&out)
    );

    // Enrolment, named for this bastion.
    let out = w.alice.ssh(&format!("{login}@vault"), &["id"]);
    let stderr = text(&out.stderr);
    let enroll = stderr
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command in {stderr}"))
        .to_string();
    assert_eq!(enroll, format!("{control} totp enroll"));
    let out = paste(&alice, &enroll);
    assert!(
        text(&out.stdout).contains("Scan this QR code"),
        "{}",
        describe(&out)
    );
}

/// Refusals log one line with the key's fingerprint; the client sees what the
/// README says. An auto-approved connection logs no refusal.
#[test]
fn refusals_are_logged_once_with_the_key() {
    let w = World::start();
    let out = w.mallory.ssh(CONTROL_USER, &["whoami"]);
    assert_failure_mentions(
        &out,
        "an unknown key",
        &["Permission denied (publickey,keyboard-interactive)"],
    );
    assert!(
        readme().contains("Permission denied (publickey,keyboard-interactive)"),
        "the README does not show the client's message"
    );
    let mallory = fingerprint(&w.path("mallory.pub"));
    let lines: Vec<String> = w
        .bastion
        .log()
        .lines()
        .filter(|l| l.contains(&mallory))
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("authentication refused: key not in users.toml"),
        "{lines:#?}"
    );

    // Auto-approved: straight through, no `denied` on the way.
    let out = w.alice.ssh(&w.target_user(), &["true"]);
    assert_success(&out, "auto-approved");
    assert!(!w.bastion.log().contains(" denied "), "{}", w.bastion.log());
}

/// The waiting line on a terminal is ended before the denial or the cancel
/// notice, and `sessions --active` shows a live session's bytes.
#[test]
fn status_lines_end_and_live_sessions_show_their_bytes() {
    let w = World::start();
    let login = login_user();
    let wait_request = |tmux: &Tmux| {
        assert!(
            tmux.wait_for("Reason for access", Duration::from_secs(10)),
            "{}",
            tmux.screen()
        );
        tmux.send("INC-16", true);
        tmux.send("Enter", false);
        assert!(
            tmux.wait_for("Ctrl-C cancels", Duration::from_secs(10)),
            "{}",
            tmux.screen()
        );
        let pending = w.ok(&w.bob, &["requests", "--pending", "--json"]);
        let pending: serde_json::Value = serde_json::from_str(&pending).unwrap();
        pending[0]["id"].as_str().unwrap().to_string()
    };
    // A terminal whose ssh waits at the request prompt for `prod`.
    let prompt_in = |name: &str| {
        let dir = w.path(name);
        fs::create_dir_all(&dir).unwrap();
        Tmux::start(
            &dir,
            120,
            20,
            &w.alice
                .ssh_shell_line(&format!("{login}@prod"), &["-tt"], &[]),
        )
    };
    let tmux = prompt_in("deny");
    let id = wait_request(&tmux);
    w.ok(&w.bob, &["deny", &id, "--reason", "use the replica"]);
    assert!(
        tmux.wait_for("use the replica", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    let screen = tmux.screen();
    assert!(
        screen.lines().any(|l| l.starts_with(&format!(
            "portcullis: request {id} denied by bob: use the replica"
        ))),
        "{screen}"
    );
    assert!(
        !screen
            .lines()
            .any(|l| l.contains("cancels") && l.contains("denied")),
        "{screen}"
    );
    drop(tmux);

    let tmux = prompt_in("cancel");
    let id = wait_request(&tmux);
    tmux.send("C-c", false);
    assert!(
        tmux.wait_for("cancelled", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    let screen = tmux.screen();
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with(&format!("portcullis: request {id} cancelled"))),
        "{screen}"
    );
    drop(tmux);

    // A live session with output: its bytes so far, not 0B/0B.
    let dir = w.path("live");
    fs::create_dir_all(&dir).unwrap();
    let tmux = Tmux::start(
        &dir,
        100,
        20,
        &w.alice.ssh_shell_line(&w.target_user(), &["-tt"], &[]),
    );
    tmux.send("echo live-$((6*7))", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("live-42", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    let active = w.ok(&w.dave, &["sessions", "--active"]);
    let row = active
        .lines()
        .find(|l| l.contains(" live "))
        .unwrap_or_else(|| panic!("no live session:\n{active}"));
    assert!(!row.contains("0B/0B"), "{active}");
}

/// The data directory: 0700 and every file 0600 whatever the umask; one bastion
/// at a time, with one line naming the other; refused with the fix when others
/// can read it or a key; its own message when it cannot be written; and nothing
/// created when the policies are not there.
#[test]
fn the_data_dir_is_private_single_and_explained() {
    let root = tempfile::Builder::new()
        .prefix("portcullis-data-dir-")
        .tempdir()
        .unwrap();
    // Not a policy directory: nothing is created.
    let out = run(Command::new(Bastion::binary())
        .arg("serve")
        .current_dir(root.path()));
    assert_failure_mentions(
        &out,
        "serve without policies",
        &["policy directory not found", "portcullis init"],
    );
    assert!(
        !root.path().join("portcullis-data").exists(),
        "serve left a data dir behind"
    );
    let help = run(Command::new(Bastion::binary()).args(["serve", "--help"]));
    for needle in [
        "--config",
        "127.0.0.1:2222",
        "./portcullis-data",
        "./policies",
        "portcullis reload",
    ] {
        assert!(
            text(&help.stdout).contains(needle),
            "serve --help lacks {needle}:\n{}",
            describe(&help)
        );
    }

    // A minimal policy; the bastion under umask 000.
    let policies = root.path().join("policies");
    fs::create_dir(&policies).unwrap();
    let key = keygen(&root.path().join("alice"), "alice");
    fs::write(
        policies.join("users.toml"),
        format!("[users.alice]\nkeys = [\"{key}\"]\ngroups = [\"auditors\"]\n"),
    )
    .unwrap();
    let config = root.path().join("portcullis.toml");
    let serve = |port: u16| {
        fs::write(&config, format!("listen = \"127.0.0.1:{port}\"\n")).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "umask 000; exec {} serve --config {}",
            Bastion::binary(),
            config.display()
        ));
        cmd
    };
    let first = Daemon::start("portcullis", &root.path().join("first.log"), serve);
    // A session's worth of files: the database, keys, the pid and reload files.
    let out =
        Client::new(&root.path().join("alice"), first.port()).ssh(CONTROL_USER, &["sessions"]);
    assert_success(&out, "sessions");
    let data = root.path().join("portcullis-data");
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push((
                path.clone(),
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            ));
            if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut modes = vec![(
        data.clone(),
        fs::metadata(&data).unwrap().permissions().mode() & 0o777,
    )];
    walk(&data, &mut modes);
    assert!(modes.len() > 8, "{modes:?}");
    for (path, mode) in &modes {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:o}", path.display());
    }

    // A second bastion on the same data: one line, naming the first.
    let out = run(Command::new(Bastion::binary())
        .args(["serve", "--config"])
        .arg(&config));
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "portcullis: another portcullis (pid {}) is using {}",
            first.pid(),
            data.display()
        )
    );
    drop(first);

    let refused = |why: &str, needles: &[&str]| {
        let out = run(Command::new(Bastion::binary())
            .args(["serve", "--config"])
            .arg(&config));
        assert_failure_mentions(&out, why, needles);
    };
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    refused(
        "an open data dir",
        &[
            "open to other users (mode 755)",
            &format!("chmod 700 {}", data.display()),
        ],
    );
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    let host_key = data.join("host_ed25519");
    fs::set_permissions(&host_key, fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        "a readable key",
        &[&format!("chmod 600 {}", host_key.display())],
    );
    fs::set_permissions(&host_key, fs::Permissions::from_mode(0o600)).unwrap();

    // Another user's data dir (root can write anywhere, so only root can test it).
    if login_user() == "root" {
        for dir in [root.path(), &policies] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(
            policies.join("users.toml"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
        // The build directory may sit in a home only root can enter.
        let binary = root.path().join("portcullis");
        fs::copy(Bastion::binary(), &binary).unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
        let as_nobody = || {
            run(Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&binary)
                .args(["serve", "--config"])
                .arg(&config))
        };
        let out = as_nobody();
        assert_failure_mentions(
            &out,
            "someone else's data dir",
            &["not writable by this user (uid 65534)", "chown -R 65534"],
        );
        assert!(
            !text(&out.stderr).contains("another portcullis"),
            "{}",
            describe(&out)
        );
        fs::remove_dir_all(&data).unwrap();
        let out = as_nobody();
        assert_failure_mentions(
            &out,
            "a data dir it cannot create",
            &["not writable by this user (uid 65534)", "belongs to uid 0"],
        );
    }
}

/// The deploy files say what Docker needs (point 8): a stripped image, a stop
/// timeout that covers `shutdown_grace`, and how to get keys out and reload.
#[test]
fn deploy_files_cover_what_docker_and_systemd_need() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| fs::read_to_string(repo.join(p)).unwrap();
    assert!(read("deploy/Dockerfile").contains("CARGO_PROFILE_RELEASE_STRIP=symbols"));
    assert!(!read("deploy/portcullis.service").contains("Documentation=http"));
    let readme = readme();
    for needle in [
        "--stop-timeout 45",
        "docker exec portcullis portcullis keys --config /etc/portcullis/portcullis.toml",
        "docker exec portcullis portcullis reload --config /etc/portcullis/portcullis.toml",
    ] {
        assert!(readme.contains(needle), "the README does not say {needle}");
    }
    let compose = read("deploy/compose.yaml");
    assert!(compose.contains("stop_grace_period: 15s"), "{compose}");
    assert!(read("deploy/playground/portcullis.toml").contains("shutdown_grace = \"5s\""));
}
