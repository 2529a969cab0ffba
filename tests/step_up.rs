//! TOTP step-up and certificate mode, end to end: real OpenSSH clients (the TOTP
//! answered by an `SSH_ASKPASS` helper that computes the code), real sshd targets.

pub mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::Utc;
use common::*;
use serde_json::Value;

fn on(target: &str) -> String {
    format!("{}@{target}", login_user())
}

/// An `SSH_ASKPASS` program that prints the TOTP code for `secret`, `offset` steps
/// of 30 s away from now (the bastion accepts one step of skew).
fn askpass(dir: &Path, name: &str, secret: &str, offset: i64) -> PathBuf {
    let path = dir.join(format!("askpass-{name}-{offset}"));
    let script = format!(
        r#"#!/usr/bin/env python3
import base64, hashlib, hmac, struct, time
secret = "{secret}"
key = base64.b32decode(secret + "=" * (-len(secret) % 8))
counter = int(time.time()) // 30 + ({offset})
mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
o = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000))
"#
    );
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn enrolment_needs_a_correct_confirmation_code() {
    let w = World::start();
    let (_, out) = enroll(&w, &w.alice, USER, Some("000000"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("does not match"),
        "{}",
        describe(&out)
    );
    assert!(w.ok(&w.alice, &["totp", "status"]).contains("not enrolled"));

    let (secret, out) = enroll(&w, &w.alice, USER, None);
    assert_success(&out, "totp enroll");
    assert!(
        text(&out.stdout).contains("TOTP enrolled for alice"),
        "{}",
        describe(&out)
    );
    assert!(w
        .ok(&w.alice, &["totp", "status"])
        .contains("TOTP: enrolled"));
    assert!(w.ok(&w.alice, &["whoami"]).contains("totp:   enrolled"));
    assert!(
        !w.bastion.log().contains(&secret),
        "the secret is never logged"
    );

    // Re-enrolling needs a valid current code first: without a terminal and with
    // a wrong one, nothing changes.
    let again = enroll_with_current(&w.alice, "000000");
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    assert!(
        text(&again.stderr).contains("wrong TOTP code"),
        "{}",
        describe(&again)
    );
    assert!(w.audit_kinds().iter().any(|k| k == "totp.enrolled"));
}

/// `totp enroll` for an enrolled user: answers the "current code" question with
/// `current`.
fn enroll_with_current(client: &Client, current: &str) -> std::process::Output {
    run_with_timeout(
        &mut client.ssh_command(CONTROL_USER, &[], &["totp enroll"]),
        Some(format!("{current}\n").into_bytes()),
        COMMAND_TIMEOUT,
    )
}

#[test]
fn secrets_are_not_readable_in_the_data_dir() {
    let w = World::start();
    let (secret, out) = enroll(&w, &w.alice, USER, None);
    assert_success(&out, "enroll");
    let raw = totp_rs::Secret::Encoded(secret.clone()).to_bytes().unwrap();
    for file in files_below(&w.bastion.data_dir()) {
        let bytes = fs::read(&file).unwrap();
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(
            !contains(secret.as_bytes()) && !contains(&raw),
            "{} holds the TOTP secret in plain text",
            file.display()
        );
    }
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_below(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_step_up_target_asks_for_the_code_and_refuses_wrong_or_replayed_ones() {
    let w = World::start();
    let (secret, out) = enroll(&w, &w.alice, USER, None);
    assert_success(&out, "enroll");
    let dir = w.dir.path();

    // The enrolment used the current step; the next step is within the skew. The
    // code is computed once, so the second connection types the very same code even
    // if a 30 s step boundary passes in between.
    let next_step = Utc::now() + chrono::Duration::seconds(30);
    let code = portcullis::totp::code_at(&secret, USER, next_step).unwrap();
    let fixed = fixed_askpass(dir, "askpass-fixed", &code);
    let good = w.alice.with_askpass(&fixed);
    let out = good.ssh(&on("secure"), &["echo stepped-up"]);
    assert_success(&out, "step-up with the right code");
    assert!(text(&out.stdout).contains("stepped-up"));

    // The very same code on a second connection: refused.
    let out = good.ssh(&on("secure"), &["echo again"]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        describe(&out)
    );

    let wrong = w.alice.with_askpass(&askpass(dir, USER, &secret, 20));
    let out = wrong.ssh(&on("secure"), &["echo never"]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));

    // Batch mode cannot answer at all.
    let out = w.alice.ssh(&on("secure"), &["echo never"]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));

    let kinds = w.audit_kinds();
    assert!(kinds.iter().any(|k| k == "stepup.success"), "{kinds:?}");
    assert!(
        kinds.iter().filter(|k| *k == "stepup.failure").count() >= 2,
        "{kinds:?}"
    );
    // Targets without step-up are unaffected.
    assert_success(
        &w.alice.ssh(&on(TARGET), &["true"]),
        "no step-up on staging",
    );
}

#[test]
fn users_without_totp_are_told_how_to_enrol() {
    let w = World::start();
    let out = w.dave.ssh(&on("secure"), &["true"]);
    assert_failure_mentions(
        &out,
        "not enrolled",
        &["needs a TOTP step-up", "totp enroll"],
    );
}

#[test]
fn five_wrong_codes_lock_the_step_up() {
    let w = World::start();
    let (secret, out) = enroll(&w, &w.alice, USER, None);
    assert_success(&out, "enroll");
    let dir = w.dir.path();
    let wrong = w.alice.with_askpass(&askpass(dir, USER, &secret, 40));
    for _ in 0..5 {
        let out = wrong.ssh(&on("secure"), &["true"]);
        assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    }
    let good = w.alice.with_askpass(&askpass(dir, USER, &secret, 1));
    let out = good.ssh(&on("secure"), &["true"]);
    assert_eq!(
        out.status.code(),
        Some(255),
        "a locked user is refused even with the right code"
    );
    assert!(
        w.bastion
            .log()
            .contains("step-up for alice is locked until"),
        "{}",
        w.logs()
    );
    assert!(w.audit_kinds().iter().any(|k| k == "stepup.locked"));
    assert!(w.ok(&w.alice, &["totp", "status"]).contains("locked until"));
}

#[test]
fn an_approvers_decision_in_a_step_up_flow_needs_their_code() {
    let w = World::start();
    let (secret, out) = enroll(&w, &w.bob, "bob", None);
    assert_success(&out, "bob enrols");
    let doc: Value = serde_json::from_str(&w.ok(
        &w.alice,
        &["request", "vault", "--shell", "--reason", "INC-5", "--json"],
    ))
    .unwrap();
    let id = doc["id"].as_str().unwrap();

    let out = w.control_as(&w.bob, &["approve", id]);
    assert_failure_mentions(&out, "no code", &["TOTP code is needed", "--totp"]);
    let out = w.control_as(&w.bob, &["approve", id, "--totp", "000000"]);
    assert_failure_mentions(&out, "wrong code", &["wrong TOTP code"]);
    assert_eq!(
        serde_json::from_str::<Value>(&w.ok(&w.bob, &["show", id, "--json"])).unwrap()["state"],
        "pending"
    );
    let next_step = Utc::now() + chrono::Duration::seconds(30);
    let code = portcullis::totp::code_at(&secret, "bob", next_step).unwrap();
    let approved = w.ok(&w.bob, &["approve", id, "--totp", &code]);
    assert!(approved.contains("approved by bob"), "{approved}");
    // Deciding in a flow without step-up needs no code.
    let doc: Value = serde_json::from_str(&w.ok(
        &w.alice,
        &["request", "prod", "--shell", "--reason", "INC-6", "--json"],
    ))
    .unwrap();
    w.ok(&w.bob, &["approve", doc["id"].as_str().unwrap()]);
}

/// A step-up is per session, not per connection: over a ControlMaster that passed
/// TOTP before a grant was approved, or longer ago than `step_up_max_age`, a new
/// session needs a new code (asked on its terminal, or refused without one).
#[test]
fn every_session_needs_a_step_up_newer_than_its_approval_and_max_age() {
    let w = World::start_with(WorldOptions {
        extra_config: "step_up_max_age = \"4s\"\n".into(),
        ..WorldOptions::default()
    });
    let (secret, out) = enroll_with(&w, &w.alice, USER, Code::PreviousStep, "");
    assert_success(&out, "alice enrols");
    let (bob_secret, out) = enroll(&w, &w.bob, "bob", None);
    assert_success(&out, "bob enrols");
    let control = w.path("ctl");
    let stepped = w
        .alice
        .with_askpass(&askpass(w.dir.path(), USER, &secret, 0));
    let _master = stepped.control_master(&on("vault"), &control, &w.path("master.log"));
    let through_master = format!("ControlPath={}", control.display());

    let doc: Value = serde_json::from_str(&w.ok(
        &w.alice,
        &["request", "vault", "--shell", "--reason", "INC-9", "--json"],
    ))
    .unwrap();
    let id = doc["id"].as_str().unwrap();
    let next_step = Utc::now() + chrono::Duration::seconds(30);
    let bob_code = portcullis::totp::code_at(&bob_secret, "bob", next_step).unwrap();
    w.ok(&w.bob, &["approve", id, "--totp", &bob_code]);

    let out = w
        .alice
        .ssh_with(&on("vault"), &["-o", &through_master], &["echo never"]);
    assert_failure_mentions(
        &out,
        "step-up older than the approval",
        &[
            &format!("newer than the approval of grant {id}"),
            "reconnect",
        ],
    );

    let code = portcullis::totp::code_at(&secret, USER, next_step).unwrap();
    let out = run_with_timeout(
        &mut w.alice.ssh_command(
            &on("vault"),
            &["-tt", "-o", &through_master],
            &["echo fresh-$((1+1))"],
        ),
        Some(format!("{code}\n").into_bytes()),
        COMMAND_TIMEOUT,
    );
    assert!(text(&out.stdout).contains("fresh-2"), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("TOTP code for alice"),
        "{}",
        describe(&out)
    );

    std::thread::sleep(std::time::Duration::from_secs(5));
    let out = w
        .alice
        .ssh_with(&on("vault"), &["-o", &through_master], &["echo never"]);
    assert_failure_mentions(
        &out,
        "step-up too old",
        &["within the last 4s", "reconnect"],
    );
}

/// With `totp_require_invite`, only an operator's one-time code lets a user enrol:
/// a stolen key of a user who never enrolled cannot enrol itself.
#[test]
fn first_enrolment_needs_the_operators_one_time_code() {
    let w = World::start_with(WorldOptions {
        extra_config: "totp_require_invite = true\n".into(),
        ..WorldOptions::default()
    });
    let out = w.control_as(&w.alice, &["totp", "enroll", "--invite", "AAAA-BBBB-CCCC"]);
    assert_failure_mentions(
        &out,
        "no invite",
        &[
            "no enrolment code was issued for alice",
            "portcullis totp invite alice",
        ],
    );
    assert!(w.ok(&w.alice, &["totp", "status"]).contains("not enrolled"));

    let invite = |user: &str| {
        run(std::process::Command::new(Bastion::binary())
            .args(["totp", "invite", user, "--config"])
            .arg(Bastion::config_path(w.dir.path())))
    };
    let out = invite("nobody-here");
    assert_failure_mentions(&out, "unknown user", &["is not a user"]);
    let out = invite(USER);
    assert_success(&out, "portcullis totp invite");
    let code = text(&out.stdout).trim().to_string();
    assert_eq!(code.len(), 14, "{code}");

    let out = w.control_as(&w.alice, &["totp", "enroll", "--invite", "AAAA-BBBB-CCCC"]);
    assert_failure_mentions(
        &out,
        "wrong invite",
        &["not the enrolment code issued for alice"],
    );
    let (_, out) = enroll_with(
        &w,
        &w.alice,
        USER,
        Code::Typed(None),
        &format!("--invite {code}"),
    );
    assert_success(&out, "enrolment with the invite");

    // The code was used up: carol cannot use it, and nobody can use it again.
    let out = w.control_as(&w.carol, &["totp", "enroll", "--invite", &code]);
    assert_failure_mentions(
        &out,
        "someone else's code",
        &["no enrolment code was issued for carol"],
    );
    let kinds = w.audit_kinds();
    assert!(
        kinds.iter().any(|k| k == "totp.invite_refused"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "totp.enrolled"), "{kinds:?}");
}

/// `ssh-keygen -L` of the certificate recorded with the only session, with TZ=UTC.
fn recorded_certificate(world: &World) -> String {
    let sessions: Vec<Value> =
        serde_json::from_str(&world.ok(&world.dave, &["sessions", "--json"])).unwrap();
    let cert = sessions
        .last()
        .and_then(|s| s["certificate"].as_str())
        .expect("the session records its certificate");
    let file = world.path("captured-cert.pub");
    fs::write(&file, format!("{cert}\n")).unwrap();
    let out = run(Command::new("ssh-keygen")
        .env("TZ", "UTC")
        .arg("-L")
        .arg("-f")
        .arg(&file));
    assert_success(&out, "ssh-keygen -L");
    text(&out.stdout)
}

fn expiry_of(world: &World, id: &str) -> String {
    let grant: Value =
        serde_json::from_str(&world.ok(&world.bob, &["show", id, "--json"])).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(grant["expires_at"].as_str().unwrap()).unwrap();
    expires
        .with_timezone(&Utc)
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string()
}

fn approved(world: &World, args: &[&str]) -> String {
    let mut command = vec!["request", "certs", "--reason", "CHG-1", "--json"];
    command.extend_from_slice(args);
    let doc: Value = serde_json::from_str(&world.ok(&world.alice, &command)).unwrap();
    let id = doc["id"].as_str().unwrap().to_string();
    world.ok(&world.bob, &["approve", &id]);
    id
}

#[test]
fn certificate_mode_reaches_a_target_that_only_trusts_the_ca() {
    let w = World::start_with(WorldOptions {
        certificate_target: true,
        ..WorldOptions::default()
    });
    let id = approved(&w, &["--shell", "--ttl", "20m"]);
    let out = w
        .alice
        .ssh_with(&on("certs"), &["-tt"], &["echo via-certificate"]);
    assert_success(&out, "shell through certificate mode");
    assert!(text(&out.stdout).contains("via-certificate"));
    let cert_sshd = w.cert_sshd.as_ref().unwrap();
    assert!(
        cert_sshd.log().contains("Accepted certificate ID"),
        "{}",
        cert_sshd.log()
    );

    let listing = recorded_certificate(&w);
    assert!(
        listing.contains(&format!("Principals: \n                {}", login_user())),
        "{listing}"
    );
    assert!(
        listing.contains(&format!(" to {}", expiry_of(&w, &id))),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("portcullis user=alice grant={id}")),
        "{listing}"
    );
    assert!(listing.contains("permit-pty"), "{listing}");
    assert!(
        !listing.contains("port-forwarding") && !listing.contains("agent-forwarding"),
        "{listing}"
    );
}

#[test]
fn certificate_mode_pins_command_grants_with_force_command() {
    let w = World::start_with(WorldOptions {
        certificate_target: true,
        ..WorldOptions::default()
    });
    approved(&w, &["--command", "uname *"]);
    let out = w.alice.ssh(&on("certs"), &["uname -s"]);
    assert_success(&out, "command through certificate mode");
    assert!(text(&out.stdout).contains("Linux"));
    let listing = recorded_certificate(&w);
    assert!(listing.contains("force-command 'uname' -s"), "{listing}");
    assert!(!listing.contains("permit-pty"), "{listing}");
}

/// sshd runs `force-command` through the login shell: it must hold the canonical
/// command, so braces and tildes reach the program as the words that were compared.
#[test]
fn certificate_mode_forces_the_canonical_command() {
    let w = World::start_with(WorldOptions {
        certificate_target: true,
        ..WorldOptions::default()
    });
    approved(&w, &["--command", "echo * *"]);
    let out = w.alice.ssh(&on("certs"), &["echo {a,b} ~root"]);
    assert_success(&out, "command through certificate mode");
    assert_eq!(text(&out.stdout), "{a,b} ~root\n");
    let listing = recorded_certificate(&w);
    assert!(
        listing.contains("force-command 'echo' '{a,b}' '~root'"),
        "{listing}"
    );
}

/// Signs a certificate with the bastion's CA for a grant that expires at
/// `expires`, writes key and certificate files, and connects with plain ssh
/// straight to the certificate-only sshd, bypassing the bastion entirely.
fn direct_with_certificate(
    world: &World,
    expires: chrono::DateTime<Utc>,
    name: &str,
) -> std::process::Output {
    use portcullis::grant::{Grant, GrantState, Scope};
    use portcullis::proxy::certificate::{issue, CertificateRequest};
    let ca =
        russh::keys::load_secret_key(world.bastion.data_dir().join("ca_ed25519"), None).unwrap();
    let now = Utc::now();
    let grant = Grant {
        id: "abcdef".into(),
        seq: 1,
        requester: USER.into(),
        target: "certs".into(),
        login: login_user().into(),
        scope: Scope {
            shell: true,
            ..Scope::default()
        },
        ttl_secs: 60,
        reason: "test".into(),
        flow: "production".into(),
        approvals_needed: 1,
        state: GrantState::Approved,
        created_at: now,
        pending_until: now,
        approvals: Vec::new(),
        approved_at: Some(now),
        expires_at: Some(expires),
        ended: None,
        auto: false,
    };
    let request = CertificateRequest {
        user: USER,
        grant: &grant,
        login: login_user(),
        session: 1,
        force_command: Some("echo reached-the-target"),
        now,
    };
    let issued = issue(&ca, &request).unwrap();
    let key_path = world.path(name);
    let private = issued
        .key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .unwrap();
    fs::write(&key_path, private.as_bytes()).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(
        format!("{}-cert.pub", key_path.display()),
        issued.openssh() + "\n",
    )
    .unwrap();
    // OpenSSH offers KEY-cert.pub along with -i KEY.
    let port = world.cert_sshd.as_ref().unwrap().port();
    Client::new(&key_path, port).ssh(login_user(), &["true"])
}

#[test]
fn the_target_itself_refuses_a_certificate_past_its_grant() {
    let w = World::start_with(WorldOptions {
        certificate_target: true,
        ..WorldOptions::default()
    });
    let live = direct_with_certificate(&w, Utc::now() + chrono::Duration::minutes(5), "live-key");
    assert_success(&live, "a certificate within its grant works directly");
    assert!(
        text(&live.stdout).contains("reached-the-target"),
        "force-command ran: {}",
        describe(&live)
    );
    let expired = direct_with_certificate(
        &w,
        Utc::now() - chrono::Duration::seconds(10),
        "expired-key",
    );
    assert_eq!(expired.status.code(), Some(255), "{}", describe(&expired));
    assert!(
        text(&expired.stderr).contains("Permission denied"),
        "{}",
        describe(&expired)
    );
    let log = w.cert_sshd.as_ref().unwrap().log();
    assert!(
        log.contains("expired") || log.contains("invalid"),
        "sshd says why: {log}"
    );
}
