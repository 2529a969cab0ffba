//! End-to-end tests of the proxy path: real OpenSSH clients → portcullis →
//! a real sshd, asserting what an engineer sees (output, exit status, files,
//! terminal size, error messages). Each test builds its own [`World`].

pub mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A world whose target sshd gets `sshd_config` first.
fn world_with_sshd(sshd_config: &str) -> World {
    World::start_with(WorldOptions {
        sshd_config: sshd_config.into(),
        ..WorldOptions::default()
    })
}

/// How long to wait for something a remote process writes.
const REMOTE_WAIT: Duration = Duration::from_secs(10);

/// A remote command that leaves `marker` behind, to prove that a refused
/// session never ran anything on the target.
fn touch_command(marker: &Path) -> String {
    format!("touch {}", marker.display())
}

/// Asserts a refused session left the target untouched and the bastion alive.
fn assert_not_run(world: &mut World, marker: &Path) {
    assert!(
        !marker.exists(),
        "the refused command ran on the target ({} exists)",
        marker.display()
    );
    assert!(
        world.bastion.is_running(),
        "the bastion died after refusing a session"
    );
}

/// Reads a small text file a remote process wrote, trimmed; empty when absent.
fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------

#[test]
fn exec_propagates_exit_status() {
    let w = World::start();
    let out = w.alice.ssh(&w.target_user(), &["exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
}

/// The target's EOF reaches a client whose input is still open when the command
/// closes its output, not when the session ends; and the exit status (or signal)
/// still arrives, with a ControlMaster too.
#[test]
fn eof_is_forwarded_when_it_happens_and_the_status_still_arrives() {
    let w = World::start();
    let started = Instant::now();
    let mut child = w
        .alice
        .ssh_command(
            &w.target_user(),
            &[],
            &["echo hi; exec >&- 2>&-; sleep 3; exit 7"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let eof_after = started.elapsed();
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert_eq!(stdout, "hi\n");
    assert!(
        eof_after < Duration::from_secs(2),
        "EOF came after {eof_after:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(status.code(), Some(7));

    for stdin_closed in [true, false] {
        let out = run_with_timeout(
            &mut w.alice.ssh_command(
                &w.target_user(),
                &[],
                &["echo hi; exec >&- 2>&-; sleep 1; exit 7"],
            ),
            (!stdin_closed).then(Vec::new),
            REMOTE_WAIT,
        );
        assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    }
    let out = w
        .alice
        .ssh(&w.target_user(), &["exec >&- 2>&-; kill -9 $$"]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    let sessions: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
    assert_eq!(
        sessions.last().unwrap()["exit_signal"],
        "KILL",
        "{sessions:?}"
    );

    let control = w.path("cm");
    let _master = w
        .alice
        .control_master(&w.target_user(), &control, &w.path("master.log"));
    let path_opt = format!("ControlPath={}", control.display());
    for command in ["exit 7", "echo hi; exec >&- 2>&-; sleep 1; exit 7"] {
        let out = w
            .alice
            .ssh_with(&w.target_user(), &["-o", &path_opt], &[command]);
        assert_eq!(out.status.code(), Some(7), "{command}: {}", describe(&out));
    }
}

/// A target that closes a channel on its own (sshd's `ChannelTimeout`) is
/// reported as that, not as a lost connection.
#[test]
fn a_channel_the_target_closes_is_not_a_lost_connection() {
    let w = world_with_sshd("ChannelTimeout session:*=1s\n");
    let out = w.alice.ssh(&w.target_user(), &["sleep 30"]);
    assert_failure_mentions(
        &out,
        "ChannelTimeout",
        &["the target closed the session without an exit status"],
    );
    assert!(!text(&out.stderr).contains("lost"), "{}", describe(&out));
}

#[test]
fn exec_keeps_stdout_and_stderr_apart() {
    let w = World::start();
    let out = w.alice.ssh(&w.target_user(), &["echo out; echo err >&2"]);
    assert_success(&out, "echo out; echo err >&2");
    assert_eq!(text(&out.stdout), "out\n", "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.lines().any(|line| line == "err") && !stderr.contains("out"),
        "stderr should carry exactly the remote stderr:\n{}",
        describe(&out)
    );
}

#[test]
fn large_stdin_round_trips_byte_identical() {
    let w = World::start();
    let input = random_bytes(10 << 20);
    let out = w.alice.ssh_stdin(&w.target_user(), &["cat"], input.clone());
    assert_success(&out, "cat of 10 MiB");
    assert_eq!(out.stdout.len(), input.len(), "length differs");
    assert_eq!(sha256(&out.stdout), sha256(&input), "content differs");
}

#[test]
fn bare_target_uses_default_login() {
    let w = World::start();
    let out = w.alice.ssh(TARGET, &["id -un"]);
    assert_success(&out, "ssh -l local");
    assert_eq!(text(&out.stdout).trim(), login_user());
}

#[test]
fn remote_environment_is_the_target_not_the_bastion() {
    // The command must run under sshd on the target, in the login's session:
    // sshd sets SSH_CONNECTION to the bastion→target connection, whose server
    // port is the target sshd's, not the bastion's.
    let w = World::start();
    let out = w.alice.ssh(&w.target_user(), &["echo $SSH_CONNECTION"]);
    assert_success(&out, "echo $SSH_CONNECTION");
    let fields: Vec<String> = text(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        fields.get(3).map(String::as_str),
        Some(w.sshd.port().to_string().as_str()),
        "{}",
        describe(&out)
    );
}

/// `accept_env` decides which variables reach the target (the target's sshd
/// accepts `LANG LC_* TZ`): `LC_*` and `TZ` pass, others do not, and a session
/// passes at most 64 variables and 64 KiB of them.
#[test]
fn accept_env_passes_what_it_names_and_no_more_than_its_bounds() {
    let w = World::start_with(WorldOptions {
        extra_config: "accept_env = \"LC_* TZ\"\n".into(),
        ..WorldOptions::default()
    });
    let mut vars: Vec<String> = (0..70).map(|n| format!("LC_V{n:02}=v{n}")).collect();
    vars.insert(0, "TZ=UTC".into());
    vars.insert(1, "LANG=C".into()); // the target accepts it; the bastion does not
    vars.insert(2, format!("LC_BIG={}", "x".repeat(70 * 1024)));
    let set_env = format!("SetEnv={}", vars.join(" "));
    let out = w.alice.ssh_with(
        &w.target_user(),
        &["-o", &set_env],
        &["echo TZ=$TZ LANG=${LANG-unset}; env | grep -c ^LC_V; echo ${#LC_BIG}"],
    );
    assert_success(&out, "ssh -o SetEnv");
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines[0], "TZ=UTC LANG=unset", "{}", describe(&out));
    // TZ and 63 LC_V* make 64: LC_BIG is over the byte budget and dropped.
    assert_eq!(lines[1], "63", "{}", describe(&out));
    assert_eq!(lines[2], "0", "{}", describe(&out));
}

// ---------------------------------------------------------------------------
// pty
// ---------------------------------------------------------------------------

#[test]
fn tt_allocates_a_pty_and_plain_exec_does_not() {
    let w = World::start();
    let user = w.target_user();
    let with_pty = w.alice.ssh_with(&user, &["-tt"], &["tty"]);
    assert_success(&with_pty, "ssh -tt tty");
    assert!(
        text(&with_pty.stdout).trim().starts_with("/dev/pts/"),
        "{}",
        describe(&with_pty)
    );
    let without = w.alice.ssh(&user, &["tty"]);
    assert!(
        text(&without.stdout).contains("not a tty"),
        "{}",
        describe(&without)
    );
}

#[test]
fn window_size_and_window_change_reach_the_target() {
    let w = World::start();
    let initial = w.path("initial-size");
    let changed = w.path("changed-size");
    // The remote shell records its size at start and on every SIGWINCH (the
    // trap runs between the short sleeps). Files are written then renamed so
    // the test never reads half a line.
    let script = format!(
        "trap 'stty size > {c}.tmp && mv {c}.tmp {c}' WINCH; \
         stty size > {i}.tmp && mv {i}.tmp {i}; \
         n=0; while [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done",
        c = changed.display(),
        i = initial.display()
    );
    let line = w
        .alice
        .ssh_shell_line(&w.target_user(), &["-tt"], &[&script]);
    let tmux = Tmux::start(w.dir.path(), 100, 30, &line);

    let started = wait_until(REMOTE_WAIT, || !read_trimmed(&initial).is_empty());
    assert!(started, "remote shell never started:\n{}", tmux.screen());
    assert_eq!(read_trimmed(&initial), "30 100", "initial pty size");

    tmux.resize(120, 40);
    let resized = wait_until(REMOTE_WAIT, || read_trimmed(&changed) == "40 120");
    assert!(
        resized,
        "window change not seen by the target (last size {:?}):\n{}",
        read_trimmed(&changed),
        tmux.screen()
    );
}

// ---------------------------------------------------------------------------
// file transfer
// ---------------------------------------------------------------------------

/// Uploads a random file with scp `flags`, downloads it again, and checks
/// both copies are identical to the original.
fn scp_round_trip(flags: &[&str]) {
    let w = World::start();
    let user = w.target_user();
    let original = w.path("original.bin");
    random_file(&original, 3 << 20);
    let uploaded = w.path("uploaded.bin");
    let downloaded = w.path("downloaded.bin");

    let up = w.alice.scp(
        flags,
        original.to_str().unwrap(),
        &remote_path(&user, &uploaded),
    );
    assert_success(&up, "scp upload");
    assert_eq!(sha256_file(&uploaded), sha256_file(&original), "upload");

    let down = w.alice.scp(
        flags,
        &remote_path(&user, &uploaded),
        downloaded.to_str().unwrap(),
    );
    assert_success(&down, "scp download");
    assert_eq!(sha256_file(&downloaded), sha256_file(&original), "download");
}

#[test]
fn scp_sftp_mode_uploads_and_downloads() {
    scp_round_trip(&[]);
}

#[test]
fn scp_legacy_mode_uploads_and_downloads() {
    scp_round_trip(&["-O"]);
}

#[test]
fn sftp_batch_puts_and_gets() {
    let w = World::start();
    let original = w.path("original.bin");
    random_file(&original, 2 << 20);
    let remote = w.path("remote.bin");
    let back = w.path("back.bin");
    let batch = w.path("batch");
    fs::write(
        &batch,
        format!(
            "put {o} {r}\nget {r} {b}\n",
            o = original.display(),
            r = remote.display(),
            b = back.display()
        ),
    )
    .unwrap();

    let out = w.alice.sftp_batch(&w.target_user(), &batch);
    assert_success(&out, "sftp -b");
    assert_eq!(sha256_file(&remote), sha256_file(&original), "put");
    assert_eq!(sha256_file(&back), sha256_file(&original), "get");
}

#[test]
fn rsync_copies_a_directory_tree_both_ways() {
    let w = World::start();
    let user = w.target_user();
    let tree = w.path("tree");
    random_file(&tree.join("a.bin"), 100_000);
    random_file(&tree.join("empty"), 0);
    random_file(&tree.join("sub/b.bin"), 300_000);
    random_file(&tree.join("sub/deeper/c.bin"), 1_000);
    let expected = tree_digest(&tree);
    assert_eq!(expected.len(), 6, "fixture tree: {expected:?}");

    let remote = w.path("remote-tree");
    let up = w.alice.rsync(
        &format!("{}/", tree.display()),
        &remote_path(&user, &remote),
    );
    assert_success(&up, "rsync upload");
    assert_eq!(tree_digest(&remote), expected, "uploaded tree");

    let back = w.path("back-tree");
    let down = w.alice.rsync(
        &format!("{}/", remote_path(&user, &remote)),
        back.to_str().unwrap(),
    );
    assert_success(&down, "rsync download");
    assert_eq!(tree_digest(&back), expected, "downloaded tree");
}

// ---------------------------------------------------------------------------
// refusals
// ---------------------------------------------------------------------------

#[test]
fn unknown_key_is_denied() {
    let mut w = World::start();
    let marker = w.path("ran");
    let out = w.mallory.ssh(&w.target_user(), &[&touch_command(&marker)]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert_failure_mentions(&out, "unknown key", &["Permission denied"]);
    assert_not_run(&mut w, &marker);
}

#[test]
fn unknown_target_names_the_available_targets() {
    let mut w = World::start();
    let marker = w.path("ran");
    let user = format!("{}@nowhere", login_user());
    let out = w.alice.ssh(&user, &[&touch_command(&marker)]);
    assert_failure_mentions(&out, "unknown target", &["unknown target", TARGET]);
    assert_not_run(&mut w, &marker);
}

#[test]
fn disallowed_login_lists_the_allowed_logins() {
    let mut w = World::start();
    let marker = w.path("ran");
    let out = w
        .alice
        .ssh(&format!("postgres@{TARGET}"), &[&touch_command(&marker)]);
    assert_failure_mentions(&out, "login postgres", &["not allowed", login_user()]);
    assert_not_run(&mut w, &marker);
}

#[test]
fn changed_target_host_key_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let other = keys.path().join("other_host_key");
    let pinned = keygen(&other, "not-the-target");
    let mut w = World::start_with(WorldOptions {
        pinned_host_key: Some(pinned),
        ..WorldOptions::default()
    });
    let marker = w.path("ran");
    let out = w.alice.ssh(&w.target_user(), &[&touch_command(&marker)]);
    let expected = fingerprint(&other.with_extension("pub"));
    let seen = fingerprint(&w.sshd.host_public_key_path());
    assert_failure_mentions(
        &out,
        "pinned host key differs",
        &["host key", "mismatch", &expected, &seen],
    );
    assert_not_run(&mut w, &marker);
}

#[test]
fn direct_tcpip_forwarding_is_refused() {
    let mut w = World::start();
    let user = w.target_user();
    let dest = format!("127.0.0.1:{}", w.sshd.port());
    let out = w.alice.ssh_with(&user, &["-W", &dest], &[]);
    assert!(
        !out.status.success(),
        "ssh -W succeeded:\n{}",
        describe(&out)
    );
    assert!(
        !text(&out.stdout).contains("SSH-2.0"),
        "the forwarded connection reached the target:\n{}",
        describe(&out)
    );
    let stderr = text(&out.stderr);
    assert!(
        [
            "administratively prohibited",
            "open failed",
            "forwarding failed"
        ]
        .iter()
        .any(|needle| stderr.contains(needle)),
        "{}",
        describe(&out)
    );
    // The refusal is per channel: the bastion still serves sessions.
    assert!(w.bastion.is_running());
    assert_success(&w.alice.ssh(&user, &["true"]), "session after refusal");
}

#[test]
fn remote_forwarding_is_refused() {
    let mut w = World::start();
    let out = w.alice.ssh_with(
        &w.target_user(),
        &["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22"],
        &["true"],
    );
    assert_failure_mentions(&out, "ssh -R", &["forwarding failed"]);
    assert!(w.bastion.is_running());
}

// ---------------------------------------------------------------------------
// concurrency
// ---------------------------------------------------------------------------

#[test]
fn multiplexed_channels_share_one_connection() {
    let w = World::start();
    let user = w.target_user();
    let control_path = w.path("cm");
    let mut master = w
        .alice
        .control_master(&user, &control_path, &w.path("master.log"));

    // The mux clients carry mallory's key: if they fell back to a connection
    // of their own instead of the master's, the bastion would refuse them.
    let path_opt = format!("ControlPath={}", control_path.display());
    let outputs: Vec<_> = thread::scope(|scope| {
        let handles: Vec<_> = ["one", "two"]
            .into_iter()
            .map(|word| {
                let (client, user, path_opt) = (&w.mallory, &user, &path_opt);
                scope.spawn(move || {
                    let echo = format!("sleep 0.5; echo {word}");
                    let flags = ["-o", path_opt.as_str(), "-o", "ControlMaster=no"];
                    (word, client.ssh_with(user, &flags, &[&echo]))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (word, out) in &outputs {
        assert_success(out, "multiplexed session");
        assert_eq!(text(&out.stdout), format!("{word}\n"));
    }

    let exit = w.alice.mux_control(&user, &control_path, "exit");
    assert_success(&exit, "ssh -O exit");
    let status = master.wait_exit(REMOTE_WAIT);
    assert!(
        status.is_some(),
        "master still running after -O exit:\n{}",
        master.output()
    );
}

/// A command that registers itself in `dir` and then waits until `count`
/// commands have (giving up after 60 s), so that they all hold their session at
/// once; then it prints `word`.
fn gathering_command(dir: &Path, count: usize, word: &str) -> String {
    let dir = dir.display();
    format!(
        "touch {dir}/{word}; i=0; while [ $(ls {dir} | wc -l) -lt {count} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo {word}"
    )
}

/// How many connections the target's sshd accepted so far.
fn target_logins(w: &World) -> usize {
    w.sshd.log().matches("Accepted publickey").count()
}

/// Runs `commands` at once as mux clients of the ControlMaster on `control_path`.
fn multiplexed(w: &World, control_path: &Path, commands: &[String]) -> Vec<std::process::Output> {
    let user = w.target_user();
    let path_opt = format!("ControlPath={}", control_path.display());
    thread::scope(|scope| {
        let handles: Vec<_> = commands
            .iter()
            .map(|command| {
                let (client, user, path_opt) = (&w.alice, &user, &path_opt);
                scope.spawn(move || {
                    let flags = ["-o", path_opt.as_str(), "-o", "ControlMaster=no"];
                    client.ssh_with(user, &flags, &[command])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// sshd allows 10 sessions per connection (`MaxSessions`). Thirty commands that all
/// hold their session at once over one ControlMaster still all run: the bastion
/// opens more connections to the target when it refuses a channel (issue 17 §1),
/// and each command is recorded and audited as its own session.
#[test]
fn thirty_commands_at_once_over_one_control_master_pass_max_sessions() {
    let w = world_with_sshd("MaxSessions 10\n");
    let control_path = w.path("cm");
    let _master = w
        .alice
        .control_master(&w.target_user(), &control_path, &w.path("master.log"));
    let gathering = w.path("gathering");
    fs::create_dir(&gathering).unwrap();
    let commands: Vec<String> = (0..30)
        .map(|n| gathering_command(&gathering, 30, &format!("w{n}")))
        .collect();
    let outputs = multiplexed(&w, &control_path, &commands);
    for (n, out) in outputs.iter().enumerate() {
        assert_success(out, &format!("session {n}\n{}", w.logs()));
        assert_eq!(text(&out.stdout), format!("w{n}\n"), "session {n}");
    }
    // Thirty sessions held at once need at least three connections of ten.
    assert!(target_logins(&w) >= 3, "{}", w.logs());

    let sessions: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
    let ours: std::collections::BTreeSet<String> = sessions
        .iter()
        .filter(|s| s["state"] == "closed" && s["exit_status"] == 0)
        .filter_map(|s| s["command"].as_str())
        .filter(|c| c.contains("gathering"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        ours.len(),
        30,
        "one closed session per command: {sessions:#?}"
    );
    let kinds = w.audit_kinds();
    assert_eq!(kinds.iter().filter(|k| *k == "session.start").count(), 30);
    assert_eq!(kinds.iter().filter(|k| *k == "session.end").count(), 30);
}

/// Past `[limits] upstream_connections_per_client` the session is refused with a
/// message naming the limit, and the sessions already open are untouched.
#[test]
fn sessions_past_the_upstream_connection_limit_are_refused_by_name() {
    let w = World::start_with(WorldOptions {
        sshd_config: "MaxSessions 2\n".into(),
        extra_config:
            "[limits]\npenalty_exempt = [\"127.0.0.1\"]\nupstream_connections_per_client = 1\n"
                .into(),
        ..WorldOptions::default()
    });
    let control_path = w.path("cm");
    let _master = w
        .alice
        .control_master(&w.target_user(), &control_path, &w.path("master.log"));
    let gathering = w.path("gathering");
    fs::create_dir(&gathering).unwrap();
    // Two sessions wait for a third file, which the refused session never makes.
    let holders = [0, 1].map(|n| gathering_command(&gathering, 3, &format!("h{n}")));
    thread::scope(|scope| {
        let held = scope.spawn(|| multiplexed(&w, &control_path, &holders));
        assert!(
            wait_until(REMOTE_WAIT, || fs::read_dir(&gathering).unwrap().count()
                == 2),
            "{}",
            w.logs()
        );
        let marker = gathering.join("refused");
        let refused = multiplexed(&w, &control_path, &[touch_command(&marker)]);
        assert_failure_mentions(
            &refused[0],
            "a third session on one upstream connection",
            &["upstream_connections_per_client = 1", "MaxSessions"],
        );
        assert!(!marker.exists(), "the refused session ran");
        fs::write(gathering.join("go"), "").unwrap();
        for (n, out) in held.join().unwrap().iter().enumerate() {
            assert_success(out, &format!("holder {n}"));
        }
    });
    assert_eq!(target_logins(&w), 1, "{}", w.logs());
}

/// A session that a policy reload sends elsewhere (here: another default login)
/// does not reuse the upstream connection of the sessions before it.
#[test]
fn a_reload_that_changes_the_login_opens_a_new_upstream_connection() {
    let w = World::start();
    let control_path = w.path("cm");
    // The bare target name: its default login, the first in `logins`.
    let _master = w
        .alice
        .control_master(TARGET, &control_path, &w.path("master.log"));
    let path_opt = format!("ControlPath={}", control_path.display());
    let flags = ["-o", path_opt.as_str(), "-o", "ControlMaster=no"];
    let out = w.alice.ssh_with(TARGET, &flags, &["id -un"]);
    assert_success(&out, "before the reload");
    assert_eq!(text(&out.stdout).trim(), login_user());
    let logins = default_logins();
    assert!(logins.len() > 1, "the test policies have a second login");
    let (first, second) = (logins[0].clone(), logins[1].clone());
    w.edit_policy("targets.toml", |targets| {
        targets.replace(
            &format!("logins = [\"{first}\", \"{second}\"]"),
            &format!("logins = [\"{second}\", \"{first}\"]"),
        )
    });
    let out = w.alice.ssh_with(TARGET, &flags, &["id -un"]);
    assert_ne!(text(&out.stdout).trim(), login_user(), "{}", describe(&out));
    assert!(
        wait_until(REMOTE_WAIT, || w
            .sshd
            .log()
            .contains(&format!("Accepted publickey for {second} "))),
        "{}",
        w.logs()
    );
}

/// A target that refuses a session on a connection carrying no other one is not
/// asked again on new connections: the refusal is reported at once.
#[test]
fn a_target_that_allows_no_sessions_is_reported_without_retrying() {
    let w = world_with_sshd("MaxSessions 0\n");
    let out = w.alice.ssh(&w.target_user(), &["true"]);
    assert_failure_mentions(
        &out,
        "a session to a target with MaxSessions 0",
        &["refused to open a session"],
    );
    assert_eq!(target_logins(&w), 1, "{}", w.logs());
}

#[test]
fn thirty_two_concurrent_sessions_all_succeed() {
    let w = World::start();
    let user = w.target_user();
    let outputs: Vec<_> = thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|n| {
                let (client, user) = (&w.alice, &user);
                scope.spawn(move || client.ssh(user, &[&format!("echo {n}")]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, out) in outputs.iter().enumerate() {
        assert_success(out, &format!("session {n}"));
        assert_eq!(text(&out.stdout), format!("{n}\n"), "session {n}");
    }
}

// ---------------------------------------------------------------------------
// control plane
// ---------------------------------------------------------------------------

#[test]
fn control_plane_whoami_names_the_user() {
    let w = World::start();
    let out = w.control(&["whoami"]);
    assert_success(&out, "whoami");
    let stdout = text(&out.stdout);
    assert!(stdout.contains(USER), "{}", describe(&out));
    assert!(stdout.contains(GROUP), "{}", describe(&out));
}

#[test]
fn control_plane_help_lists_the_commands() {
    let w = World::start();
    let out = w.control(&["help"]);
    assert_success(&out, "help");
    let stdout = text(&out.stdout);
    // Only the commands every build has; the table grows with the control plane.
    for command in ["whoami", "help"] {
        assert!(
            stdout.contains(command),
            "no {command}:\n{}",
            describe(&out)
        );
    }
}

#[test]
fn control_plane_refuses_unknown_keys() {
    let w = World::start();
    let out = w.mallory.ssh(CONTROL_USER, &["whoami"]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert_failure_mentions(&out, "unknown key on control plane", &["Permission denied"]);
}
