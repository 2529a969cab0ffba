//! Hardened by default: what ssh-audit (the real tool) thinks of the bastion, and
//! how it holds up against floods of failed authentications and odd clients.

pub mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The ssh-audit CLI that `scripts/test` installs, or one on PATH.
fn ssh_audit() -> String {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pytools/bin/ssh-audit");
    if local.exists() {
        return local.display().to_string();
    }
    let found = run(Command::new("sh").args(["-c", "command -v ssh-audit"]));
    assert!(
        found.status.success(),
        "ssh-audit is missing: run scripts/test, which installs it"
    );
    text(&found.stdout).trim().to_string()
}

/// Runs ssh-audit against a bastion started with `extra_config` (which keeps the
/// default `[limits]`, so its connection-rate test meets the real door).
fn audit(extra_config: &str) -> (String, World) {
    let w = World::start_with(WorldOptions {
        extra_config: format!("{extra_config}\n[limits]\n"),
        ..WorldOptions::default()
    });
    let out = run(Command::new(ssh_audit()).args([
        "-n",
        "-p",
        &w.bastion.port().to_string(),
        "127.0.0.1",
    ]));
    (text(&out.stdout), w)
}

fn lines_with<'a>(report: &'a str, level: &str) -> Vec<&'a str> {
    report.lines().filter(|l| l.contains(level)).collect()
}

/// The DHEat rate heuristic may appear as an `(nfo)` line, never as a warning or
/// failure.
fn assert_dheat_is_only_a_note(report: &str) {
    for line in report.lines().filter(|l| l.contains("DHEat")) {
        assert!(line.starts_with("(nfo)"), "{report}");
    }
}

#[test]
fn ssh_audit_finds_no_failure_and_only_the_classic_kex_fallback() {
    let (report, w) = audit("");
    assert!(lines_with(&report, "[fail]").is_empty(), "{report}");
    let warnings = lines_with(&report, "[warn]");
    assert!(
        warnings
            .iter()
            .all(|l| l.contains("(kex) curve25519-sha256")),
        "only the documented curve25519 fallback may warn:\n{report}"
    );
    // ssh-audit's DHEat rate test counts banners per second from one source; a
    // burst of logins must pass (issue 15 §4), so it may print its note. What the
    // attack costs is bounded elsewhere: no finite-field DH is offered, key
    // exchanges from one network are capped by `preauth_per_prefix`, and each that
    // ends unauthenticated is penalised (tests/door.rs). The note stays a note:
    assert_dheat_is_only_a_note(&report);
    assert!(report.contains("mlkem768x25519-sha256"), "{report}");
    // The audit's connection flood came from 127.0.0.1 too: the rate limit refills
    // within a second, and nobody is locked out.
    let user = format!("{}@local", login_user());
    assert!(
        wait_until(Duration::from_secs(5), || w
            .alice
            .ssh(&user, &["true"])
            .status
            .success()),
        "alice gets in again after the audit"
    );
}

#[test]
fn post_quantum_only_satisfies_ssh_audit_completely() {
    let (report, _w) = audit("post_quantum_only = true\n");
    assert!(lines_with(&report, "[fail]").is_empty(), "{report}");
    assert!(lines_with(&report, "[warn]").is_empty(), "{report}");
    assert_dheat_is_only_a_note(&report);
}

/// One failed authentication attempt from `source`: connect, offer an unknown key.
/// Returns whether the bastion let the attacker as far as authentication.
async fn failed_attempt(
    source: std::net::IpAddr,
    port: u16,
    key: std::sync::Arc<russh::keys::PrivateKey>,
) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let Ok(stream) = socket.connect(([127, 0, 0, 1], port).into()).await else {
        return false;
    };
    let config = std::sync::Arc::new(russh::client::Config::default());
    let Ok(Ok(mut session)) = tokio::time::timeout(
        Duration::from_secs(5),
        russh::client::connect_stream(config, stream, AnyHostKey),
    )
    .await
    else {
        return false;
    };
    let key = russh::keys::PrivateKeyWithHashAlg::new(key, None);
    let result = session.authenticate_publickey("local", key).await;
    assert!(!result.is_ok_and(|r| r.success()), "an unknown key got in");
    true
}

/// Ten thousand authentication attempts from 127.0.0.2 with a key nobody knows;
/// alice, from 127.0.0.1, gets in all along, and the lockout is audited.
#[test]
fn a_flood_of_failed_authentications_does_not_keep_a_user_out() {
    let w = World::start_with(WorldOptions {
        extra_config: "[limits]\n".into(),
        ..WorldOptions::default()
    });
    let port = w.bastion.port();
    let flood = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let key = std::sync::Arc::new(
                russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                    .unwrap(),
            );
            let source: std::net::IpAddr = [127, 0, 0, 2].into();
            let mut reached_auth = 0;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..10_000 {
                if tasks.len() >= 32 {
                    reached_auth += usize::from(tasks.join_next().await.unwrap().unwrap());
                }
                tasks.spawn(failed_attempt(source, port, key.clone()));
            }
            while let Some(done) = tasks.join_next().await {
                reached_auth += usize::from(done.unwrap());
            }
            reached_auth
        })
    });
    let started = Instant::now();
    let mut served = 0;
    while !flood.is_finished() {
        assert_success(
            &w.alice.ssh(&format!("{}@local", login_user()), &["true"]),
            "alice during the flood",
        );
        served += 1;
    }
    let reached_auth = flood.join().unwrap();
    eprintln!(
        "10000 attempts in {:?}: {reached_auth} reached authentication, the rest were refused at the door; alice connected {served} times meanwhile",
        started.elapsed()
    );
    assert!(served > 0);
    assert!(
        reached_auth < 1000,
        "throttling and lockout refuse most attempts early"
    );
    let audit = w.ok(&w.dave, &["audit"]);
    assert!(audit.contains("preauth.lockout"), "the lockout is audited");
}

/// A connection that never authenticates (here: never even says hello) is closed
/// after the login grace time.
#[test]
fn silent_connections_are_closed_after_the_login_grace_time() {
    let w = World::start_with(WorldOptions {
        extra_config: "[limits]\nlogin_grace = \"1s\"\n".into(),
        ..WorldOptions::default()
    });
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", w.bastion.port())).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut silent, &mut buffer) {
            Ok(0) => break,
            Ok(_) => continue, // the server's version string
            Err(err) => panic!("not closed: {err}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
