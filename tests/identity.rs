//! Identity stays true for the life of a connection: a removed or rotated key, a
//! removed user and a revocation take effect on live connections and sessions at
//! once, through real OpenSSH clients (ControlMaster included) and a real sshd.

mod common;

use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn on(target: &str) -> String {
    format!("{}@{target}", login_user())
}

/// Files a request as alice and has bob approve it; returns the grant id.
fn granted(world: &World, target: &str) -> String {
    let doc: Value = serde_json::from_str(&world.ok(
        &world.alice,
        &["request", target, "--shell", "--reason", "INC-1", "--json"],
    ))
    .unwrap();
    let id = doc["id"].as_str().unwrap().to_string();
    world.ok(&world.bob, &["approve", &id]);
    id
}

fn spawn(mut command: std::process::Command) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh")
}

/// Waits for a child to exit; returns its output and how long that took.
fn wait_output(child: Child, timeout: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(timeout)
        .expect("the session did not end in time")
        .expect("wait for ssh");
    (out, started.elapsed())
}

/// Waits until the bastion has logged `count` session starts.
fn wait_sessions_started(world: &World, count: usize) {
    assert!(
        wait_until(Duration::from_secs(10), || world
            .bastion
            .log()
            .matches("session started")
            .count()
            >= count),
        "{}",
        world.logs()
    );
}

fn show(world: &World, id: &str) -> Value {
    serde_json::from_str(&world.ok(&world.bob, &["show", id, "--json"])).unwrap()
}

#[test]
fn a_rotated_key_ends_the_connections_it_opened() {
    let w = World::start();
    let control = w.path("ctl");
    let mut master = w
        .alice
        .control_master(&w.target_user(), &control, &w.path("master.log"));
    let through_master = format!("ControlPath={}", control.display());
    let session = spawn(w.alice.ssh_command(
        &w.target_user(),
        &["-o", &through_master],
        &["sleep 30"],
    ));
    wait_sessions_started(&w, 1);

    let old_key = public_key_of(w.alice.key());
    let new_key = keygen(&w.path("alice-new"), "alice-new");
    w.edit_policy("users.toml", |users| users.replace(&old_key, &new_key));

    let (_, took) = wait_output(session, Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(2),
        "the live session lasted {took:?}"
    );
    assert!(
        master.wait_exit(Duration::from_secs(5)).is_some(),
        "the ControlMaster outlived its key: {}",
        master.output()
    );
    let out = w.alice.ssh(&w.target_user(), &["true"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let rotated = Client::new(&w.path("alice-new"), w.bastion.port());
    assert_success(&rotated.ssh(&w.target_user(), &["true"]), "the new key");
    let audit = w.ok(&w.dave, &["audit", "--json"]);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("auth.withdrawn") && l.contains("was removed from user alice")),
        "{audit}"
    );
}

#[test]
fn a_removed_user_loses_sessions_and_grants() {
    let w = World::start();
    let grant = granted(&w, "prod");
    let doc: Value = serde_json::from_str(&w.ok(
        &w.alice,
        &["request", "crit", "--shell", "--reason", "INC-2", "--json"],
    ))
    .unwrap();
    let pending = doc["id"].as_str().unwrap().to_string();
    let session = spawn(w.alice.ssh_command(&on("prod"), &[], &["sleep 30"]));
    wait_sessions_started(&w, 1);

    w.edit_policy("users.toml", |users| {
        let start = users.find("[users.alice]").unwrap();
        let end = users[start + 1..]
            .find("[users.")
            .map_or(users.len(), |at| start + 1 + at);
        format!("{}{}", &users[..start], &users[end..])
    });

    let (_, took) = wait_output(session, Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(2),
        "the live session lasted {took:?}"
    );
    let revoked = show(&w, &grant);
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    assert_eq!(revoked["ended"]["by"], "portcullis");
    assert_eq!(revoked["ended"]["reason"], "user removed from the policy");
    assert_eq!(show(&w, &pending)["state"], "cancelled");
    let kinds = w.audit_kinds();
    for kind in [
        "user.removed",
        "request.revoked",
        "request.cancelled",
        "auth.withdrawn",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
}

/// Revocations fired at every point of a session's set-up (admission, target
/// connect, start) leave no session running a second later.
#[test]
fn revocation_during_set_up_leaves_no_session_running() {
    let w = World::start();
    for trial in 0..12u64 {
        let grant = granted(&w, "prod");
        let session = spawn(w.alice.ssh_command(&on("prod"), &[], &["sleep 30"]));
        thread::sleep(Duration::from_millis(trial * 30));
        w.ok(&w.bob, &["revoke", &grant, "--reason", "race"]);
        let revoked = Instant::now();
        let (out, _) = wait_output(session, Duration::from_secs(15));
        let survived = revoked.elapsed();
        assert!(
            survived < Duration::from_secs(1),
            "trial {trial}: the session outlived its revocation by {survived:?}: {}",
            describe(&out)
        );
        assert!(!out.status.success(), "trial {trial}: {}", describe(&out));
    }
}
