//! Just-in-time grants end to end: real OpenSSH clients for alice (engineer), bob and
//! carol (approvers), dave (engineer and auditor); a real sshd behind four targets
//! with different flows (see `common::Policies`).

pub mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use portcullis::grant::GrantState;
use serde_json::Value;

/// `LOGIN@TARGET` for one of the test targets.
fn on(target: &str) -> String {
    format!("{}@{target}", login_user())
}

/// Runs a control command that must fail, and returns its stderr.
fn refused(world: &World, client: &Client, command: &[&str]) -> String {
    let out = world.control_as(client, command);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{command:?} should be refused: {}",
        describe(&out)
    );
    text(&out.stderr)
}

/// Files a request as alice with `--json` and returns its id.
fn request(world: &World, args: &[&str]) -> String {
    let mut command = vec!["request"];
    command.extend_from_slice(args);
    command.push("--json");
    let doc: Value = serde_json::from_str(&world.ok(&world.alice, &command)).expect("json");
    doc["id"].as_str().expect("id").to_string()
}

fn state_of(world: &World, id: &str) -> String {
    let doc: Value =
        serde_json::from_str(&world.ok(&world.bob, &["show", id, "--json"])).expect("json");
    doc["state"].as_str().expect("state").to_string()
}

/// A command grant for alice on `target`, approved by bob.
fn granted(world: &World, target: &str, args: &[&str]) -> String {
    let mut full = vec![target, "--reason", "INC-4411"];
    full.extend_from_slice(args);
    let id = request(world, &full);
    world.ok(&world.bob, &["approve", &id, "--comment", "go ahead"]);
    id
}

/// Spawns `ssh` as alice running `command` on `target`, output captured.
fn spawn_session(world: &World, target: &str, command: &str) -> std::process::Child {
    world
        .alice
        .ssh_command(&on(target), &[], &[command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh")
}

/// Waits until the bastion logged a session start under `grant`.
fn wait_session_started(world: &World, grant: &str) {
    let needle = format!("grant={grant}");
    assert!(
        wait_until(Duration::from_secs(10), || world
            .bastion
            .log()
            .lines()
            .any(|l| l.contains("session started") && l.contains(&needle))),
        "session under {grant} never started\n{}",
        world.logs()
    );
}

#[test]
fn without_a_grant_the_user_is_told_the_exact_request_command() {
    let w = World::start();
    let out = w.alice.ssh(&on("prod"), &["uname -a"]);
    assert_failure_mentions(
        &out,
        "no grant",
        &[
            "no active grant for",
            &format!(
                "request prod --login {} --command 'uname -a' --reason",
                login_user()
            ),
        ],
    );
    let out = w.alice.ssh(&on("prod"), &["uname -a; id"]);
    assert_failure_mentions(&out, "no grant", &["--shell"]);
}

#[test]
fn the_whole_story_of_a_command_grant() {
    let w = World::start();
    let id = request(
        &w,
        &["prod", "--command", "uname *", "--reason", "INC-4411"],
    );
    assert_eq!(state_of(&w, &id), "pending");

    let err = refused(&w, &w.alice, &["approve", &id]);
    assert!(err.contains("cannot approve your own request"), "{err}");
    let err = refused(&w, &w.dave, &["approve", &id]);
    assert!(err.contains("not an approver"), "{err}");
    let out = w.alice.ssh(&on("prod"), &["uname -a"]);
    assert_failure_mentions(&out, "pending is not a grant", &["no active grant"]);

    let approved = w.ok(&w.bob, &["approve", &id, "--comment", "ok"]);
    assert!(approved.contains("approved by bob"), "{approved}");

    let out = w.alice.ssh(&on("prod"), &["uname -a"]);
    assert_success(&out, "granted command");
    assert!(text(&out.stdout).contains("Linux"), "{}", describe(&out));

    let marker = w.path("pwned");
    for hostile in [
        format!("uname -a; touch {}", marker.display()),
        format!("uname $(touch {})", marker.display()),
        format!("uname -a && touch {}", marker.display()),
    ] {
        let out = w.alice.ssh(&on("prod"), &[&hostile]);
        assert_failure_mentions(&out, "control syntax", &["never allows"]);
    }
    let out = w.alice.ssh(&on("prod"), &["id"]);
    assert_failure_mentions(
        &out,
        "other command",
        &["matches none of the granted commands"],
    );
    let out = w.alice.ssh(&on("prod"), &["uname -a -r"]);
    assert_failure_mentions(&out, "extra argument", &["matches none"]);
    let out = w.alice.ssh("nobody@prod", &["uname -a"]);
    assert_failure_mentions(&out, "other login", &["no active grant for nobody@prod"]);
    let out = w.alice.ssh_with(&on("prod"), &["-tt"], &["uname -a"]);
    assert_failure_mentions(&out, "pty", &["needs a shell grant"]);
    let out = w.alice.ssh(&on("crit"), &["uname -a"]);
    assert_failure_mentions(&out, "other target", &["no active grant"]);
    assert!(!marker.exists(), "a refused command ran");

    let listed = w.ok(&w.alice, &["requests"]);
    assert!(
        listed.contains(&id) && listed.contains("approved") && listed.contains("expires in"),
        "{listed}"
    );
    let shown = w.ok(&w.alice, &["show", &id]);
    assert!(shown.contains("bob") && shown.contains("ok"), "{shown}");
}

/// A command grant's session gets a closed environment: of what `accept_env`
/// allows, only the language, time zone and git protocol variables reach the target
/// (a variable such as `TAR_OPTIONS` or `npm_config_script_shell` would make the
/// granted program run another). A shell session gets all of `accept_env`.
#[test]
fn a_command_grant_passes_only_language_and_time_zone_to_the_target() {
    let w = World::start_with(WorldOptions {
        extra_config: "accept_env = \"LANG LC_* TZ PROBE_MODE\"\n".into(),
        sshd_config: "AcceptEnv PROBE_MODE\n".into(),
        ..WorldOptions::default()
    });
    let set_env = "SetEnv=PROBE_MODE=on LC_PROBE=yes TZ=UTC";
    granted(&w, "prod", &["--command", "env"]);
    let out = w.alice.ssh_with(&on("prod"), &["-o", set_env], &["env"]);
    assert_success(&out, "granted env");
    let env = text(&out.stdout);
    assert!(
        env.contains("LC_PROBE=yes\n") && env.contains("TZ=UTC\n"),
        "{}",
        describe(&out)
    );
    assert!(!env.contains("PROBE_MODE"), "{}", describe(&out));

    let out = w.alice.ssh_with(
        &w.target_user(),
        &["-o", set_env],
        &["echo ${PROBE_MODE-unset}"],
    );
    assert_success(&out, "shell session");
    assert_eq!(text(&out.stdout), "on\n", "{}", describe(&out));
}

/// The canonical-command promise through the real client and sshd: whatever the
/// client's string, the target's shell runs exactly the words that were compared.
#[test]
fn the_target_runs_exactly_the_compared_words() {
    let w = World::start();
    let marker = w.path("pwned");
    granted(
        &w,
        "prod",
        &[
            "--command",
            "echo *",
            "--command",
            "tail -n * /etc/hostname",
            "--command",
            "tail -n 20 /var/log/*",
            "--command",
            "find /etc -maxdepth 1 -name **",
        ],
    );
    for (command, printed) in [
        ("echo {a,b}", "{a,b}\n"),
        ("echo ~root", "~root\n"),
        ("echo ~", "~\n"),
        ("echo A=b", "A=b\n"),
        ("echo 'a #b'", "a #b\n"),
        ("echo é語", "é語\n"),
        ("echo \"it's\"", "it's\n"),
    ] {
        let out = w.alice.ssh(&on("prod"), &[command]);
        assert_success(&out, command);
        assert_eq!(text(&out.stdout), printed, "{command}");
    }

    // Brace expansion would have read /etc/shadow or run find's -fprint.
    let out = w
        .alice
        .ssh(&on("prod"), &["tail -n {1,/etc/shadow} /etc/hostname"]);
    assert_failure_mentions(&out, "a / inside *", &["matches none"]);
    assert!(!text(&out.stdout).contains("root:"), "{}", describe(&out));
    let hostile = format!(
        "find /etc -maxdepth 1 -name {{hostname,-fprint,{}}}",
        marker.display()
    );
    let out = w.alice.ssh(&on("prod"), &[&hostile]);
    assert_success(&out, "find with a literal brace name");
    assert!(!marker.exists(), "find's -fprint ran: braces were expanded");

    // `*` never climbs out of /var/log.
    for escape in [
        "tail -n 20 /var/log/../../etc/shadow",
        "tail -n 20 /var/log/..",
    ] {
        let out = w.alice.ssh(&on("prod"), &[escape]);
        assert_failure_mentions(&out, escape, &["matches none"]);
        assert!(!text(&out.stdout).contains("root:"), "{}", describe(&out));
    }
    // A comment, csh history, a bidi override and an invisible letter are refused,
    // not guessed at.
    for (refused, why) in [
        ("echo a #b", "comment"),
        ("echo '/var/log/syslog!#:1'", "history expansion"),
        ("echo a\u{202e}b", "U+202E"),
        ("echo a\u{3164}b", "U+3164"),
    ] {
        let out = w.alice.ssh(&on("prod"), &[refused]);
        assert_failure_mentions(&out, refused, &[why]);
    }

    // What ran is what the session record and the audit log say ran.
    let sessions: Vec<Value> =
        serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
    let commands: Vec<&str> = sessions
        .iter()
        .filter_map(|s| s["command"].as_str())
        .collect();
    assert!(commands.contains(&"'echo' '{a,b}'"), "{commands:?}");
    assert!(commands.contains(&"'echo' '~root'"), "{commands:?}");
    assert!(commands.contains(&r#"'echo' 'it'"'"'s'"#), "{commands:?}");
    let audit = w.ok(&w.dave, &["audit", "--json"]);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("session.start") && l.contains(r#"exec \"'echo' '{a,b}'\""#)),
        "{audit}"
    );
}

#[test]
fn a_shell_grant_lets_a_terminal_session_in() {
    let w = World::start();
    granted(&w, "prod", &["--shell", "--ttl", "30m"]);
    let out = w
        .alice
        .ssh_with(&on("prod"), &["-tt"], &["tty; echo shell-ok"]);
    assert_success(&out, "shell grant with pty");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("/dev/pts/") && stdout.contains("shell-ok"),
        "{stdout}"
    );
    let grants = w.ok(&w.alice, &["grants"]);
    assert!(
        grants.contains("shell") && grants.contains("expires in 2"),
        "{grants}"
    );
}

#[test]
fn only_requesters_request_and_flows_limit_scope_and_ttl() {
    let w = World::start();
    let err = refused(
        &w,
        &w.bob,
        &["request", "prod", "--shell", "--reason", "curious"],
    );
    assert!(
        err.contains("accepts requests from group:engineers"),
        "{err}"
    );
    let err = refused(
        &w,
        &w.alice,
        &["request", "prod", "--shell", "--ttl", "2h", "--reason", "x"],
    );
    assert!(err.contains("max_ttl is 1h"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &["request", "cmds", "--shell", "--reason", "x"],
    );
    assert!(err.contains("does not grant shells"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &["request", "cmds", "--command", "rm -rf *", "--reason", "x"],
    );
    assert!(
        err.contains("outside what flow 'restricted' allows"),
        "{err}"
    );
    let err = refused(&w, &w.alice, &["request", "prod", "--shell"]);
    assert!(err.contains("--reason"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &[
            "request", "prod", "--shell", "--login", "root2", "--reason", "x",
        ],
    );
    assert!(err.contains("not allowed on target 'prod'"), "{err}");
    // Inside the flow's commands: fine.
    request(&w, &["cmds", "--command", "uname -a", "--reason", "x"]);
    let all = w.ok(&w.dave, &["requests", "--all", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&all).unwrap();
    assert_eq!(list.len(), 1, "refused requests must not be stored: {all}");
}

#[test]
fn two_approvals_need_two_distinct_approvers() {
    let w = World::start();
    let id = request(&w, &["crit", "--shell", "--reason", "INC-7"]);
    let first = w.ok(&w.bob, &["approve", &id]);
    assert!(first.contains("1 of 2 approvals, still pending"), "{first}");
    let err = refused(&w, &w.bob, &["approve", &id]);
    assert!(err.contains("already approved"), "{err}");
    assert_eq!(state_of(&w, &id), "pending");
    let out = w.alice.ssh(&on("crit"), &["true"]);
    assert_failure_mentions(&out, "half approved", &["no active grant"]);
    w.ok(&w.carol, &["approve", &id]);
    assert_eq!(state_of(&w, &id), "approved");
    assert_success(&w.alice.ssh(&on("crit"), &["true"]), "fully approved");
}

#[test]
fn denied_revoked_and_expired_grants_never_come_back() {
    let w = World::start();
    let id = request(&w, &["prod", "--shell", "--reason", "INC-1"]);
    let err = refused(&w, &w.bob, &["deny", &id]);
    assert!(err.contains("--reason"), "{err}");
    w.ok(&w.bob, &["deny", &id, "--reason", "use staging"]);
    let err = refused(&w, &w.carol, &["approve", &id]);
    assert!(err.contains("is denied"), "{err}");
    assert_failure_mentions(
        &w.alice.ssh(&on("prod"), &["true"]),
        "denied",
        &["no active grant"],
    );

    let id = granted(&w, "prod", &["--shell"]);
    w.ok(&w.alice, &["revoke", &id, "--reason", "done"]);
    let err = refused(&w, &w.bob, &["approve", &id]);
    assert!(err.contains("is revoked"), "{err}");
    assert_failure_mentions(
        &w.alice.ssh(&on("prod"), &["true"]),
        "revoked",
        &["no active grant"],
    );
    let shown = w.ok(&w.bob, &["show", &id]);
    assert!(
        shown.contains("by alice") && shown.contains("done"),
        "{shown}"
    );
}

#[test]
fn revocation_ends_a_live_session_within_a_second() {
    let w = World::start();
    let id = granted(&w, "prod", &["--command", "sleep *"]);
    let session = spawn_session(&w, "prod", "sleep 60");
    wait_session_started(&w, &id);
    w.ok(&w.bob, &["revoke", &id, "--reason", "incident over"]);
    assert_revoked_within_a_second(session, &id, "incident over");
}

/// A client that never reads (its window stays shut while the target writes)
/// cannot keep a revoked session open: the recording is finished and the
/// `session.end` event written first, then the client is told within a bound.
#[test]
fn a_revoked_session_ends_even_when_its_client_never_reads() {
    let w = World::start();
    let id = granted(&w, "prod", &["--shell"]);
    let mut stalled = w
        .alice
        .ssh_command(&on("prod"), &[], &["cat /dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read: ssh stops reading once the pipe is full
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_session_started(&w, &id);
    thread::sleep(Duration::from_secs(1)); // the windows fill up
    w.ok(&w.bob, &["revoke", &id, "--reason", "stalled"]);
    let revoked = Instant::now();
    let closed = wait_until(Duration::from_secs(2), || {
        let sessions: Vec<Value> =
            serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
        sessions
            .iter()
            .any(|s| s["grant"] == id.as_str() && s["state"] == "closed")
    });
    let took = revoked.elapsed();
    let _ = stalled.kill();
    let _ = stalled.wait();
    assert!(
        closed,
        "the session was still live {took:?} after the revocation\n{}",
        w.logs()
    );
    let audit = w.ok(&w.dave, &["audit", "--json"]);
    assert!(
        audit.lines().any(|l| l.contains("session.end")
            && l.contains(&id)
            && l.contains("transcript_sha256")),
        "{audit}"
    );
}

#[test]
fn a_grant_ends_its_live_session_at_expiry() {
    let w = World::start();
    let id = granted(&w, "prod", &["--command", "sleep *", "--ttl", "3s"]);
    let started = Instant::now();
    let session = spawn_session(&w, "prod", "sleep 60");
    wait_session_started(&w, &id);
    let (out, _) = wait_output(session, Duration::from_secs(15));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        text(&out.stderr).contains(&format!("grant {id} expired — session closed")),
        "{}",
        describe(&out)
    );
    assert!(
        wait_until(Duration::from_secs(3), || state_of(&w, &id) == "expired"),
        "the sweeper marks it expired"
    );
}

/// A key of the test world, for russh clients in the test's process.
fn russh_key(w: &World, name: &str) -> std::sync::Arc<russh::keys::PrivateKey> {
    std::sync::Arc::new(russh::keys::load_secret_key(w.path(name), None).expect("key"))
}

/// Runs a control-plane command as `user` on an in-process bastion; its stdout.
async fn russh_control(
    port: u16,
    user: &std::sync::Arc<russh::keys::PrivateKey>,
    command: String,
) -> String {
    let session = russh_login(port, CONTROL_USER, user).await;
    let out = russh_exec(&session, &command).await;
    assert_eq!(out.status, Some(0), "{command}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Waits (in virtual time) until the grant's stored state is `state`, as the
/// once-a-second expiry sweep leaves it.
async fn wait_state(bastion: &InProcess, id: &str, state: GrantState) -> bool {
    for _ in 0..5 {
        if bastion.state.grants.get(id).expect("the grant").state == state {
            return true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

/// The same rule with the bastion in this process on tokio's paused clock: the grant
/// lasts a minute, which passes in virtual time as soon as the session is idle, so
/// the test takes as long as setting the session up. The grant service reads the
/// time from a clock that follows tokio's, so the sweeper marks the grant expired
/// in virtual time too. The target is still the real sshd; only the clients are
/// russh sessions in this process (an OpenSSH child process would go on in real
/// time while the bastion's clock jumps).
#[tokio::test(start_paused = true)]
async fn a_grant_ends_its_live_session_at_expiry_on_a_paused_clock() {
    let ttl = Duration::from_secs(60);
    let mut w = World::prepare(WorldOptions::default());
    let bastion = InProcess::start(w.dir.path()).await;
    w.follow(bastion.port);
    let (alice, bob) = (russh_key(&w, USER), russh_key(&w, "bob"));
    let control = |user, command| russh_control(bastion.port, user, command);
    let filed = control(
        &alice,
        format!(
            "request prod --command 'sleep *' --ttl {}s --reason INC-4411 --json",
            ttl.as_secs()
        ),
    )
    .await;
    let id = serde_json::from_str::<Value>(&filed).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    control(&bob, format!("approve {id} --comment 'go ahead'")).await;

    // Longer than the test takes in real time, and unique to this run.
    let seconds = format!("90.{}", bastion.port);
    // The session is set up with the clock held (the real sshd answers in real
    // time); it lasts from the moment `sleep` runs on the target.
    let (session, mut channel) = with_clock_held(async {
        let session = russh_login(bastion.port, &on("prod"), &alice).await;
        let channel = session.channel_open_session().await.expect("channel");
        channel
            .exec(true, format!("sleep {seconds}"))
            .await
            .expect("exec");
        let running = tokio::task::spawn_blocking(move || {
            wait_until(STARTUP_TIMEOUT, || process_running(&["sleep", &seconds]))
        });
        assert!(
            running.await.unwrap(),
            "the command never ran on the target"
        );
        (session, channel)
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut out = Exec::default();
    let ended = tokio::time::timeout(ttl * 2, async {
        while let Some(msg) = channel.wait().await {
            match msg {
                russh::ChannelMsg::ExtendedData { data, .. } => out.stderr.extend_from_slice(&data),
                russh::ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                _ => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the session outlived its grant: {out:?}");
    let lasted = started.elapsed();
    let said = text(&out.stderr);
    assert!(
        said.contains(&format!("grant {id} expired — session closed")),
        "{out:?}"
    );
    // Closed at its expiry: not before (setting the session up took a few virtual
    // seconds of the minute), and not at the end of `sleep`.
    assert!(lasted > ttl - Duration::from_secs(15), "lasted {lasted:?}");
    assert!(lasted <= ttl, "lasted {lasted:?}");
    assert!(
        wait_state(&bastion, &id, GrantState::Expired).await,
        "the sweeper marks it expired"
    );
    drop(session);
    bastion.stop().await;
}

/// A request nobody decides expires after the flow's `pending_ttl` (an hour by
/// default): on the paused clock the hour passes in virtual time, and the
/// requester is told, and the audit log says, that it expired.
#[tokio::test(start_paused = true)]
async fn an_undecided_request_expires_after_its_pending_ttl_on_a_paused_clock() {
    let mut w = World::prepare(WorldOptions::default());
    let bastion = InProcess::start(w.dir.path()).await;
    w.follow(bastion.port);
    let alice = russh_key(&w, USER);
    let filed = russh_control(
        bastion.port,
        &alice,
        "request prod --shell --reason INC-4412 --json".into(),
    )
    .await;
    let id = serde_json::from_str::<Value>(&filed).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    // Filing took a few virtual seconds of the hour: wait for what is left of it.
    let pending_until = bastion
        .state
        .grants
        .get(&id)
        .expect("the grant")
        .pending_until;
    let left = (pending_until - bastion.state.now())
        .to_std()
        .expect("in the future");
    assert!(left > Duration::from_secs(3500), "{left:?} left");
    tokio::time::sleep(left - Duration::from_secs(5)).await;
    assert_eq!(
        bastion.state.grants.get(&id).expect("the grant").state,
        GrantState::Pending,
        "still pending just before its hour is up"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        wait_state(&bastion, &id, GrantState::Expired).await,
        "expired an hour after it was filed"
    );
    let shown = russh_control(bastion.port, &alice, format!("show {id}")).await;
    assert!(shown.contains("expired"), "{shown}");
    let events = bastion.state.grants.audit_log().events().expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "request.expired" && e.grant.as_deref() == Some(id.as_str())),
        "{events:?}"
    );
    bastion.stop().await;
}

#[test]
fn auto_approve_connects_straight_through_and_is_recorded() {
    let w = World::start();
    assert_success(&w.alice.ssh(&on(TARGET), &["true"]), "auto-approved");
    let all = w.ok(&w.alice, &["requests", "--mine", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&all).unwrap();
    assert_eq!(list.len(), 1, "{all}");
    assert_eq!(list[0]["reason"], "auto");
    assert_eq!(list[0]["state"], "approved");
    assert_eq!(list[0]["approvals"][0]["by"], "portcullis");
    // The same grant serves the next connection.
    assert_success(&w.alice.ssh(&on(TARGET), &["true"]), "second");
    let all = w.ok(&w.alice, &["requests", "--json"]);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&all).unwrap().len(), 1);
}

/// Starts `request prod --shell --reason REASON --wait` as alice in the background
/// and returns it with the request's id once bob can see it pending.
fn request_and_wait(w: &World, reason: &str) -> (std::process::Child, String) {
    let waiting = w
        .alice
        .ssh_command(
            CONTROL_USER,
            &[],
            &[&quote_words(&[
                "request", "prod", "--shell", "--reason", reason, "--wait",
            ])],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn request --wait");
    let mut id = None;
    let seen = wait_until(Duration::from_secs(10), || {
        let list: Vec<Value> =
            serde_json::from_str(&w.ok(&w.bob, &["requests", "--pending", "--json"])).unwrap();
        id = list
            .iter()
            .find(|r| r["reason"] == reason)
            .map(|r| r["id"].as_str().unwrap().to_string());
        id.is_some()
    });
    assert!(seen, "request never showed up");
    (waiting, id.unwrap())
}

#[test]
fn wait_returns_as_soon_as_the_request_is_approved() {
    let w = World::start();
    let (waiting, id) = request_and_wait(&w, "INC-9");
    let approving = Instant::now();
    w.ok(&w.bob, &["approve", &id]);
    let approve_took = approving.elapsed();
    let (out, _) = wait_output(waiting, Duration::from_secs(10));
    eprintln!(
        "approval latency: `approve` ran {approve_took:?}; request --wait exited {:?} after it started",
        approving.elapsed()
    );
    assert_success(&out, "request --wait");
    assert!(
        text(&out.stdout).contains("approved by bob"),
        "{}",
        describe(&out)
    );
}

#[test]
fn wait_reports_a_denial_with_exit_status_one() {
    let w = World::start();
    let (waiting, id) = request_and_wait(&w, "INC-10");
    w.ok(&w.bob, &["deny", &id, "--reason", "no"]);
    let (out, _) = wait_output(waiting, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("denied by bob: no"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_restart_keeps_pending_and_approved_grants() {
    let mut w = World::start();
    let pending = request(&w, &["prod", "--shell", "--reason", "later"]);
    let approved = granted(&w, "crit", &["--shell"]);
    w.ok(&w.carol, &["approve", &approved]);
    w.restart_bastion();
    assert_eq!(state_of(&w, &pending), "pending");
    assert_eq!(state_of(&w, &approved), "approved");
    assert_success(&w.alice.ssh(&on("crit"), &["true"]), "grant survived");
    w.ok(&w.bob, &["approve", &pending]);
    assert_success(
        &w.alice.ssh(&on("prod"), &["true"]),
        "approved after restart",
    );
}

#[test]
fn hostile_input_gets_clear_errors_and_changes_nothing() {
    let mut w = World::start();
    let before = w.ok(&w.dave, &["requests", "--all", "--json"]);
    let long_id = "a".repeat(300);
    for id in [
        long_id.as_str(),
        "7f3a9c'; id",
        "ÆØÅ",
        "\u{1b}[2J",
        "../../etc",
    ] {
        let err = refused(&w, &w.bob, &["approve", id]);
        assert!(err.contains("is not a request id"), "{id:?}: {err}");
        assert!(err.len() < 300, "errors stay short: {err}");
        assert!(!err.contains('\u{1b}'), "control characters are not echoed");
    }
    let err = refused(&w, &w.bob, &["show", "abcdef"]);
    assert!(err.contains("no request 'abcdef'"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &["request", "prod", "--shell", "--reason", "a\u{7}b"],
    );
    assert!(err.contains("control characters"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &["request", "prod", "--shell", "--reason", &"x".repeat(501)],
    );
    assert!(err.contains("longer than 500"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &["request", "ünïcödé", "--shell", "--reason", "x"],
    );
    assert!(err.contains("unknown target"), "{err}");
    let err = refused(
        &w,
        &w.alice,
        &[
            "request", "prod", "--ttl", "forever", "--shell", "--reason", "x",
        ],
    );
    assert!(err.contains("invalid duration"), "{err}");
    let err = refused(&w, &w.alice, &["request", "prod", "--frobnicate"]);
    assert!(err.contains("--frobnicate"), "{err}");
    // Huge command lines, in 64 KiB words (the OS limits a single argument). Up to
    // the SSH packet limit (256 KiB, as in sshd) the bastion answers with an error;
    // beyond it the SSH layer drops the connection, as sshd does. Either way the
    // bastion survives and files nothing.
    let chunk = "x".repeat(64 * 1024);
    for (count, expected) in [(3, Some("at most 65536")), (16, None)] {
        let mut words = vec!["request", "prod", "--shell", "--reason"];
        words.extend(std::iter::repeat_n(chunk.as_str(), count));
        let out = w.alice.ssh(CONTROL_USER, &words);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "status {:?}", out.status);
        assert!(
            stderr.len() < 1000,
            "errors stay short: {} bytes",
            stderr.len()
        );
        if let Some(expected) = expected {
            assert!(stderr.contains(expected), "{stderr}");
        }
    }

    assert!(w.bastion.is_running(), "the bastion survives");
    assert!(
        w.bastion.log().len() < 1 << 20,
        "the bastion does not log megabytes"
    );
    let after = w.ok(&w.dave, &["requests", "--all", "--json"]);
    assert_eq!(before, after, "nothing was filed");
}

/// A webhook receiver on a local port: its URL, and the JSON bodies it receives.
fn webhook_receiver() -> (String, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook listener");
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel::<Value>();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(value) = lower.strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(doc) = serde_json::from_slice(&body) {
                    let _ = tx.send(doc);
                }
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, rx)
}

#[test]
fn a_webhook_receives_lifecycle_events() {
    let (url, rx) = webhook_receiver();
    let w = World::start_with(WorldOptions {
        extra_config: format!("[notify]\nwebhook = \"{url}\"\n"),
        ..WorldOptions::default()
    });
    let id = request(&w, &["prod", "--shell", "--reason", "INC-12"]);
    w.ok(&w.bob, &["approve", &id]);
    w.ok(&w.alice, &["revoke", &id]);
    let mut events = Vec::new();
    while events.len() < 3 {
        let doc = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("webhook got only {events:?}\n{}", w.logs()));
        events.push(doc);
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["request.created", "request.approved", "request.revoked"]
    );
    assert!(events.iter().all(|e| e["id"] == id.as_str()));
    let text0 = events[0]["text"].as_str().unwrap();
    assert!(
        text0.contains("alice requests shell") && text0.contains("INC-12"),
        "{text0}"
    );
}

#[test]
fn a_dead_webhook_never_blocks_a_decision() {
    // A port nobody listens on: every delivery fails.
    let dead = free_port();
    let w = World::start_with(WorldOptions {
        extra_config: format!("[notify]\nwebhook = \"http://127.0.0.1:{dead}/\"\n"),
        ..WorldOptions::default()
    });
    let id = granted(&w, "prod", &["--shell"]);
    assert_eq!(state_of(&w, &id), "approved");
    assert!(
        wait_until(Duration::from_secs(10), || w
            .bastion
            .log()
            .contains("webhook failed")),
        "{}",
        w.logs()
    );
}

#[test]
fn a_terminal_without_a_grant_files_the_request_and_continues_once_approved() {
    let w = World::start();
    let tmux = request_at_the_terminal(&w, &on("prod"), "INC-77 disk full");
    let list: Vec<Value> =
        serde_json::from_str(&w.ok(&w.bob, &["requests", "--pending", "--json"])).unwrap();
    assert_eq!(list[0]["reason"], "INC-77 disk full");
    assert_eq!(list[0]["scope"]["shell"], true);
    w.ok(&w.bob, &["approve", list[0]["id"].as_str().unwrap()]);
    assert!(
        tmux.wait_for("approved by bob", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    tmux.send("echo through-$((40+2))", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("through-42", Duration::from_secs(10)),
        "{}\n{}",
        tmux.screen(),
        w.logs()
    );
}

#[test]
fn ctrl_c_at_the_terminal_cancels_the_request() {
    let w = World::start();
    let tmux = request_at_the_terminal(&w, &on("prod"), "INC-78");
    tmux.send("C-c", false);
    assert!(
        tmux.wait_for("cancelled", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    let all: Vec<Value> =
        serde_json::from_str(&w.ok(&w.alice, &["requests", "--all", "--json"])).unwrap();
    assert_eq!(all[0]["state"], "cancelled");
}

#[test]
fn denial_at_the_terminal_ends_the_session_with_the_reason() {
    let w = World::start();
    let tmux = request_at_the_terminal(&w, &on("prod"), "INC-79");
    let list: Vec<Value> =
        serde_json::from_str(&w.ok(&w.bob, &["requests", "--pending", "--json"])).unwrap();
    w.ok(
        &w.bob,
        &[
            "deny",
            list[0]["id"].as_str().unwrap(),
            "--reason",
            "not during the freeze",
        ],
    );
    assert!(
        tmux.wait_for(
            "denied by bob: not during the freeze",
            Duration::from_secs(10)
        ),
        "{}",
        tmux.screen()
    );
    assert!(
        tmux.wait_for("[exited 1]", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
}

#[test]
fn policy_reload_keeps_the_last_good_policy() {
    let w = World::start();
    let flows = w.bastion.policies_dir().join("flows.toml");
    let good = std::fs::read_to_string(&flows).unwrap();
    std::fs::write(&flows, "[[flows]]\nname = \"broken\"\nmax_ttl = \"soon\"\n").unwrap();
    let pid = w.bastion.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        wait_until(Duration::from_secs(10), || w
            .bastion
            .log()
            .contains("policy reload failed")),
        "{}",
        w.logs()
    );
    // Still the old policy: prod is requestable.
    request(&w, &["prod", "--shell", "--reason", "after bad reload"]);
    std::fs::write(&flows, good).unwrap();
}

#[test]
fn webhook_text_cannot_mention_everyone_or_forge_links() {
    let (url, rx) = webhook_receiver();
    let w = World::start_with(WorldOptions {
        extra_config: format!("[notify]\nwebhook = \"{url}\"\n"),
        ..WorldOptions::default()
    });
    let reason = "<!channel> see <http://evil.example|INC-1> & <@U024BE7LH>";
    request(&w, &["prod", "--shell", "--reason", reason]);
    let event = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no webhook\n{}", w.logs()));
    let text = event["text"].as_str().unwrap();
    assert!(
        text.contains(
            "&lt;!channel&gt; see &lt;http://evil.example|INC-1&gt; &amp; &lt;@U024BE7LH&gt;"
        ),
        "{text}"
    );
    assert!(!text.contains('<') && !text.contains('>'), "{text}");
    assert_eq!(event["reason"], reason, "structured fields stay exact");
}

#[test]
fn reasons_and_comments_with_invisible_formatting_are_refused() {
    let w = World::start();
    for reason in [
        "INC-1 \u{202e}lanigiro",
        "ok\u{200b}",
        "\u{2066}INC-2\u{2069}",
    ] {
        let err = refused(
            &w,
            &w.alice,
            &["request", "prod", "--shell", "--reason", reason],
        );
        assert!(err.contains("invisible formatting"), "{reason:?}: {err}");
        assert!(!err.contains(reason), "not echoed: {err}");
    }
    let id = request(&w, &["prod", "--shell", "--reason", "INC-3"]);
    let err = refused(&w, &w.bob, &["approve", &id, "--comment", "fine\u{202e}"]);
    assert!(err.contains("invisible formatting"), "{err}");
    let err = refused(&w, &w.bob, &["deny", &id, "--reason", "no\u{feff}"]);
    assert!(err.contains("invisible formatting"), "{err}");
    let err = refused(&w, &w.bob, &["deny", &id, "--reason", "no\u{1b}[2J"]);
    assert!(err.contains("control characters"), "{err}");
    assert_eq!(state_of(&w, &id), "pending");
}

#[test]
fn approvers_see_every_pattern_of_a_scope() {
    let w = World::start();
    let id = request(
        &w,
        &[
            "prod",
            "--command",
            "systemctl restart nginx-frontend-eu-west-1",
            "--command",
            "journalctl -u nginx -n *",
            "--command",
            "bash -c *",
            "--reason",
            "INC-5",
        ],
    );
    let table = w.ok(&w.bob, &["requests", "--pending"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("bash -c *") || row.contains(" more"),
        "the table says there is more: {row}"
    );
    assert!(!row.contains("bash -…") && !row.contains('…'), "{row}");
    let shown = w.ok(&w.bob, &["show", &id]);
    for pattern in [
        "cmd 'systemctl restart nginx-frontend-eu-west-1'",
        "cmd 'journalctl -u nginx -n *'",
        "cmd 'bash -c *'",
    ] {
        assert!(shown.contains(pattern), "{shown}");
    }
}

#[test]
fn refusals_list_only_targets_the_user_may_request() {
    let w = World::start();
    // bob approves but requests nothing: no flow takes requests from sre-leads.
    let err = refused(
        &w,
        &w.bob,
        &["request", "nowhere", "--shell", "--reason", "x"],
    );
    assert!(err.contains("targets you may request: (none)"), "{err}");
    let out = w.bob.ssh(&format!("{}@nowhere", login_user()), &["true"]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Targets you may request: (none)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("prod") && !err.contains("prod"),
        "{stderr} {err}"
    );
    // alice, an engineer, is told about every target she may request.
    let err = refused(
        &w,
        &w.alice,
        &["request", "nowhere", "--shell", "--reason", "x"],
    );
    assert!(err.contains("prod") && err.contains("vault"), "{err}");
}

/// `command` with the word `ID` replaced by `id`.
fn with_id<'a>(command: &[&'a str], id: &'a str) -> Vec<&'a str> {
    command
        .iter()
        .map(|word| if *word == "ID" { id } else { word })
        .collect()
}

#[test]
fn a_request_you_may_not_see_answers_like_an_unknown_id() {
    let w = World::start();
    // dave's request in the step-up flow `vault`: alice is neither its requester,
    // an approver of its flow, nor an auditor.
    let doc: Value = serde_json::from_str(&w.ok(
        &w.dave,
        &["request", "vault", "--shell", "--reason", "INC-6", "--json"],
    ))
    .unwrap();
    let id = doc["id"].as_str().unwrap().to_string();
    let unknown = if id == "000000" { "000001" } else { "000000" };
    for command in [
        vec!["approve", "ID"],
        vec!["approve", "ID", "--totp", "123456"],
        vec!["deny", "ID", "--reason", "no"],
        vec!["revoke", "ID"],
        vec!["show", "ID"],
    ] {
        let invisible = refused(&w, &w.alice, &with_id(&command, &id)).replace(&id, "ID");
        let missing = refused(&w, &w.alice, &with_id(&command, unknown)).replace(unknown, "ID");
        assert_eq!(invisible, missing, "{command:?}");
    }
    assert!(!w.audit_kinds().iter().any(|k| k.starts_with("stepup.")));
}

/// `[limits]` for a world, keeping the test harness's connection limits.
fn limits(extra: &str) -> WorldOptions {
    WorldOptions {
        extra_config: format!("[limits]\npenalty_exempt = [\"127.0.0.1\"]\n{extra}"),
        ..WorldOptions::default()
    }
}

#[test]
fn one_user_cannot_flood_the_approvers() {
    let w = World::start_with(limits(
        "pending_requests_per_user = 2\nrequests_per_user = 3\nrequest_window = \"10m\"\n",
    ));
    let first = request(&w, &["prod", "--shell", "--reason", "INC-1"]);
    let second = request(&w, &["prod", "--shell", "--reason", "INC-2"]);
    let err = refused(
        &w,
        &w.alice,
        &["request", "prod", "--shell", "--reason", "INC-3"],
    );
    assert!(
        err.contains("2 pending requests") && err.contains("pending_requests_per_user = 2"),
        "{err}"
    );
    // Others are not affected, and auto-approved requests are not limited.
    w.ok(
        &w.dave,
        &["request", "prod", "--shell", "--reason", "INC-4"],
    );
    w.ok(
        &w.alice,
        &["request", TARGET, "--shell", "--reason", "INC-5"],
    );
    w.ok(&w.alice, &["revoke", &first]);
    request(&w, &["prod", "--shell", "--reason", "INC-6"]);
    w.ok(&w.alice, &["revoke", &second]);
    let err = refused(
        &w,
        &w.alice,
        &["request", "crit", "--shell", "--reason", "INC-7"],
    );
    assert!(
        err.contains("3 requests within 10m") && err.contains("try again in"),
        "{err}"
    );
    let kinds = w.audit_kinds();
    assert_eq!(
        kinds.iter().filter(|k| *k == "request.limited").count(),
        2,
        "{kinds:?}"
    );
}

#[test]
fn the_default_pending_cap_is_ten() {
    let w = World::start();
    for n in 0..10 {
        request(&w, &["prod", "--shell", "--reason", &format!("INC-{n}")]);
    }
    let err = refused(
        &w,
        &w.alice,
        &["request", "prod", "--shell", "--reason", "INC-11"],
    );
    assert!(err.contains("pending_requests_per_user = 10"), "{err}");
}

#[test]
fn policy_check_warns_about_one_host_under_different_approval_rules() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(&dir.path().join("alice"), "alice");
    let lead = keygen(&dir.path().join("bob"), "bob");
    let host = keygen(&dir.path().join("host"), "host");
    let other = keygen(&dir.path().join("other"), "other");
    // Otherwise clean: someone approves, someone audits.
    fs::write(
        dir.path().join("users.toml"),
        format!("[users.alice]\nkeys = [\"{key}\"]\ngroups = [\"engineers\"]\n[users.bob]\nkeys = [\"{lead}\"]\ngroups = [\"sre\", \"auditors\"]\n"),
    )
    .unwrap();
    fs::write(
        dir.path().join("flows.toml"),
        "[[flows]]\nname = \"staging\"\nmatch = { env = \"staging\" }\nrequesters = [\"group:engineers\"]\nauto_approve = true\nshell = true\n\
         [[flows]]\nname = \"production\"\nmatch = { env = \"production\" }\nrequesters = [\"group:engineers\"]\napprovers = [\"group:sre\"]\nshell = true\n",
    )
    .unwrap();
    let check = |targets: &str| {
        fs::write(dir.path().join("targets.toml"), targets).unwrap();
        run(Command::new(Bastion::binary())
            .args(["policy", "check"])
            .arg(dir.path()))
    };
    let target = |name: &str, address: &str, key: &str, env: &str| {
        format!("[targets.{name}]\naddress = \"{address}\"\nhost_key = \"{key}\"\nlogins = [\"ubuntu\"]\nlabels = {{ env = \"{env}\" }}\n")
    };
    // The same address (10.0.0.5 is 10.0.0.5:22) as staging and as production.
    let out = check(
        &(target("db", "10.0.0.5:22", &host, "production")
            + &target("db-staging", "10.0.0.5", &other, "staging")),
    );
    assert_success(&out, "warnings do not fail the check");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning: targets 'db' (flow 'production'")
            && stderr.contains("'db-staging' (flow 'staging': auto_approve)")
            && stderr.contains("address 10.0.0.5:22"),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).contains("1 warning"),
        "{}",
        describe(&out)
    );
    // The same host key at another address.
    let out = check(
        &(target("db", "10.0.0.5:22", &host, "production")
            + &target("db-alias", "db.internal:22", &host, "staging")),
    );
    assert!(
        text(&out.stderr).contains("share the host key SHA256:"),
        "{}",
        describe(&out)
    );
    // Same rules, or different hosts: nothing to say.
    let out = check(
        &(target("db", "10.0.0.5:22", &host, "production")
            + &target("db-2", "10.0.0.5:22", &host, "production")
            + &target("web", "10.0.0.6:22", &other, "staging")),
    );
    assert_success(&out, "clean policy");
    assert!(!text(&out.stderr).contains("warning"), "{}", describe(&out));
}
