//! An insider who holds the sled files edits them while the bastion is down, then
//! starts it again: what `audit verify` catches, and with which help (issue 14, §3).
//! Each attack is the careful version: where a change would break the hash chain,
//! the attacker re-links the chain after it with the bastion's own code, as anyone
//! with the source can.

pub mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use portcullis::audit::AuditEvent;
use portcullis::record::TranscriptDigest;
use serde_json::Value;

fn local() -> String {
    format!("{}@{TARGET}", login_user())
}

fn verify(world: &World, flags: &[&str]) -> std::process::Output {
    let mut command = vec!["audit", "verify"];
    command.extend_from_slice(flags);
    world.control_as(&world.dave, &command)
}

fn verified(world: &World, flags: &[&str]) -> String {
    let out = verify(world, flags);
    assert_success(&out, &format!("audit verify {flags:?}"));
    text(&out.stdout)
}

fn sessions(world: &World) -> Vec<Value> {
    serde_json::from_str(&world.ok(&world.dave, &["sessions", "--json"])).expect("sessions --json")
}

/// Restarts the bastion gracefully and returns the chain head it logs at start, as
/// `SEQ:DIGEST`: the anchor an operator keeps from the shipped logs.
fn logged_anchor(world: &mut World) -> String {
    let heads = |log: &str| {
        log.lines()
            .filter(|l| l.contains("audit chain head"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = heads(&world.bastion.log()).len();
    world.restart_bastion_after(true, |_| {});
    assert!(
        wait_until(Duration::from_secs(10), || heads(&world.bastion.log())
            .len()
            > before),
        "the bastion never logged its chain head:\n{}",
        world.logs()
    );
    let line = heads(&world.bastion.log()).pop().unwrap();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    format!("{}:{}", field("seq="), field("digest="))
}

fn seq_of(anchor: &str) -> u64 {
    anchor.split(':').next().unwrap().parse().unwrap()
}

/// Edits the (stopped) bastion's database.
fn with_db(data: &Path, change: impl FnOnce(&sled::Db)) {
    let db = portcullis::store::sled_config(&data.join("db"))
        .open()
        .expect("open the bastion's database");
    change(&db);
    db.flush().unwrap();
}

/// Changes the audit events, then re-links the whole chain as the bastion would
/// have written it: every event before the first change keeps its digest.
fn rechain(db: &sled::Db, change: impl FnOnce(&mut Vec<AuditEvent>)) {
    let tree = db.open_tree("audit").unwrap();
    let mut events: Vec<AuditEvent> = tree
        .iter()
        .values()
        .map(|v| serde_json::from_slice(&v.unwrap()).unwrap())
        .collect();
    change(&mut events);
    tree.clear().unwrap();
    let mut previous: Option<AuditEvent> = None;
    for mut event in events {
        event.link_after(previous.as_ref());
        tree.insert(event.seq.to_be_bytes(), serde_json::to_vec(&event).unwrap())
            .unwrap();
        previous = Some(event);
    }
}

fn session_of(event: &AuditEvent) -> Option<u64> {
    event.details.get("session").and_then(Value::as_u64)
}

fn edit_record(db: &sled::Db, id: u64, change: impl FnOnce(&mut Value)) {
    let tree = db.open_tree("sessions").unwrap();
    let mut record: Value =
        serde_json::from_slice(&tree.get(id.to_be_bytes()).unwrap().unwrap()).unwrap();
    change(&mut record);
    tree.insert(id.to_be_bytes(), serde_json::to_vec(&record).unwrap())
        .unwrap();
}

/// Rewrites every stored batch of a session with `forge` applied to its plain
/// bytes; returns the digest the bastion would have computed over the forgery.
fn forge_transcript(db: &sled::Db, id: u64, forge: impl Fn(&mut Vec<u8>)) -> String {
    let chunks = db.open_tree("chunks").unwrap();
    let mut digest = TranscriptDigest::default();
    for entry in chunks.scan_prefix(id.to_be_bytes()) {
        let (key, value) = entry.unwrap();
        // A short batch is stored as it is, behind a zero tag byte; others are zstd.
        let forged = if value[0] == 0 {
            let mut plain = value[1..].to_vec();
            forge(&mut plain);
            [&[0u8][..], &plain].concat()
        } else {
            let mut plain = zstd::bulk::decompress(&value, 1 << 26).unwrap();
            forge(&mut plain);
            zstd::bulk::compress(&plain, 3).unwrap()
        };
        digest.update(&forged);
        chunks.insert(key, forged).unwrap();
    }
    digest.hex()
}

/// Replaces every occurrence of `from` (a batch may not hold any).
fn replace(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    while let Some(at) = bytes.windows(from.len()).position(|w| w == from) {
        bytes[at..at + to.len()].copy_from_slice(to);
    }
}

#[test]
fn truncating_the_tail_of_the_chain_is_caught_by_a_logged_anchor() {
    let mut w = World::start();
    assert_success(&w.alice.ssh(&local(), &["true"]), "a session");
    verified(&w, &[]);
    let anchor = logged_anchor(&mut w);
    let out = verified(&w, &["--anchor", &anchor]);
    assert!(
        out.contains(&format!("anchor OK: event {}", seq_of(&anchor))),
        "{out}"
    );

    // Cut everything after the session's end: auditor checks, the shutdown...
    w.restart_bastion_after(true, |data| {
        with_db(data, |db| {
            let tree = db.open_tree("audit").unwrap();
            let events: Vec<AuditEvent> = tree
                .iter()
                .values()
                .map(|v| serde_json::from_slice(&v.unwrap()).unwrap())
                .collect();
            let end = events
                .iter()
                .rposition(|e| e.kind == "session.end")
                .unwrap();
            for event in &events[end + 1..] {
                tree.remove(event.seq.to_be_bytes()).unwrap();
            }
        })
    });
    verified(&w, &[]); // the links alone cannot tell
    let out = verify(&w, &["--anchor", &anchor]);
    assert_failure_mentions(
        &out,
        "truncated chain",
        &["audit chain", &format!("anchor {anchor}")],
    );

    let bad = verify(&w, &["--anchor", "12:not-a-digest"]);
    assert_failure_mentions(&bad, "malformed anchor", &["SEQ:DIGEST", "64 hex digits"]);
}

#[test]
fn rewriting_an_event_and_rechaining_after_it_is_caught_by_a_logged_anchor() {
    let mut w = World::start();
    assert_success(&w.alice.ssh(&local(), &["true"]), "a session");
    let anchor = logged_anchor(&mut w);
    w.restart_bastion_after(true, |data| {
        with_db(data, |db| {
            rechain(db, |events| {
                let created = events
                    .iter_mut()
                    .find(|e| e.kind == "request.created")
                    .unwrap();
                created
                    .details
                    .insert("reason".into(), "routine maintenance".into());
            })
        })
    });
    verified(&w, &[]); // a re-linked chain is consistent on its own
    let out = verify(&w, &["--anchor", &anchor]);
    assert_failure_mentions(
        &out,
        "re-chained",
        &["rewritten", &format!("event {}", seq_of(&anchor))],
    );
}

#[test]
fn an_edited_session_record_fails_verify_naming_the_session() {
    let mut w = World::start();
    assert_success(&w.alice.ssh(&local(), &["true"]), "a session");
    verified(&w, &["--recordings"]);
    w.restart_bastion_after(true, |data| {
        with_db(data, |db| {
            edit_record(db, 1, |record| {
                record["user"] = "dave".into();
                record["command"] = "uptime".into();
            })
        })
    });
    for flags in [&[][..], &["--recordings"][..]] {
        let out = verify(&w, flags);
        assert_failure_mentions(
            &out,
            "edited record",
            &[
                "session 1",
                "session.start",
                "user (record: \"dave\"",
                "command (record: \"uptime\"",
            ],
        );
    }
}

/// The full forgery: new transcript, its digest patched into the record and into
/// the chained `session.end`, and the chain re-linked from there. Nothing inside the
/// database can tell; an anchor logged after the session can, one logged before it
/// cannot (it vouches only for what came before).
#[test]
fn a_swapped_transcript_with_patched_digests_is_caught_by_a_later_anchor() {
    let mut w = World::start();
    verified(&w, &[]);
    let before = logged_anchor(&mut w);
    assert_success(
        &w.alice
            .ssh_stdin(&local(), &[], b"echo secret-output\n".to_vec()),
        "a session",
    );
    let after = logged_anchor(&mut w);
    w.restart_bastion_after(true, |data| {
        with_db(data, |db| {
            let digest = forge_transcript(db, 1, |plain| replace(plain, b"secret", b"boring"));
            edit_record(db, 1, |record| record["digest"] = digest.clone().into());
            rechain(db, |events| {
                let end = events
                    .iter_mut()
                    .find(|e| e.kind == "session.end" && session_of(e) == Some(1))
                    .unwrap();
                end.details
                    .insert("transcript_sha256".into(), digest.into());
            })
        })
    });
    let replayed = w.ok(&w.dave, &["replay", "1", "--speed", "100"]);
    assert!(
        replayed.contains("boring-output"),
        "the forgery is in place: {replayed}"
    );
    verified(&w, &["--recordings"]);
    verified(&w, &["--recordings", "--anchor", &before]);
    let out = verify(
        &w,
        &["--recordings", "--anchor", &before, "--anchor", &after],
    );
    assert_failure_mentions(
        &out,
        "forged transcript",
        &["rewritten", &format!("anchor {after}")],
    );
}

/// Session ids come from a counter, and every id is accounted for in the chain (a
/// session that failed before recording has `session.failed`), so a session deleted
/// with its events leaves a gap; lowering the counter too hides a deletion at the
/// top from everything but an anchor.
#[test]
fn a_session_deleted_with_its_events_leaves_a_gap_in_session_ids() {
    let mut w = World::start();
    let authorized = w.sshd.dir().join("authorized_keys");
    let keys = fs::read(&authorized).unwrap();
    for n in 1..=5 {
        if n == 2 {
            fs::write(&authorized, "").unwrap(); // the target refuses the bastion
            let out = w.alice.ssh(&local(), &["true"]);
            assert!(!out.status.success(), "{}", describe(&out));
            fs::write(&authorized, &keys).unwrap();
        } else {
            assert_success(&w.alice.ssh(&local(), &["true"]), "a session");
        }
    }
    let out = verified(&w, &[]);
    assert!(out.contains("1 failed before recording"), "{out}");
    let anchor = logged_anchor(&mut w);

    let delete = |db: &sled::Db, id: u64| {
        db.open_tree("sessions")
            .unwrap()
            .remove(id.to_be_bytes())
            .unwrap();
        let chunks = db.open_tree("chunks").unwrap();
        for key in chunks.scan_prefix(id.to_be_bytes()).keys() {
            chunks.remove(key.unwrap()).unwrap();
        }
        rechain(db, |events| events.retain(|e| session_of(e) != Some(id)));
    };
    w.restart_bastion_after(true, |data| with_db(data, |db| delete(db, 5)));
    let out = verify(&w, &[]);
    assert_failure_mentions(&out, "top session deleted", &["session 5 is missing"]);

    w.restart_bastion_after(true, |data| {
        with_db(data, |db| {
            let meta = db.open_tree("meta").unwrap();
            meta.insert("session_id", &4u64.to_be_bytes()).unwrap();
        })
    });
    verified(&w, &[]); // nothing left inside the database tells
    let out = verify(&w, &["--anchor", &anchor]);
    assert_failure_mentions(&out, "counter lowered", &[&format!("anchor {anchor}")]);

    w.restart_bastion_after(true, |data| with_db(data, |db| delete(db, 3)));
    let out = verify(&w, &[]);
    assert_failure_mentions(&out, "middle session deleted", &["session 3 is missing"]);
}

/// Recovery can only digest what it finds: a transcript replaced while the bastion
/// was down is sealed over the forgery, so it is marked as never sealed by a live
/// bastion, everywhere an auditor looks.
#[test]
fn a_transcript_replaced_after_a_crash_is_marked_unsealed() {
    let mut w = World::start();
    let _tmux = flushed_shell_session(&w);
    w.restart_bastion_after(false, |data| {
        with_db(data, |db| {
            forge_transcript(db, 1, |plain| replace(plain, b"survived-9", b"harmless-1"));
        })
    });
    let replayed = w.ok(&w.dave, &["replay", "1", "--speed", "100"]);
    assert!(replayed.contains("harmless-1"), "{replayed}");

    let session = &sessions(&w)[0];
    assert_eq!(session["state"], "interrupted");
    assert_eq!(session["digest_source"], "recovery");
    let table = w.ok(&w.dave, &["sessions"]);
    assert!(table.contains("interrupted (unsealed)"), "{table}");
    let audit = w.ok(&w.dave, &["audit", "--json"]);
    let interrupted: Value = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["kind"] == "session.interrupted")
        .expect("a session.interrupted event");
    assert_eq!(interrupted["details"]["digest_source"], "recovery");

    let out = verified(&w, &["--recordings"]);
    assert!(
        out.contains("1 transcript was sealed at recovery, not by a live bastion: ids 1"),
        "{out}"
    );
}

/// The README's advice for targets, run against a real sshd: under a shell grant a
/// user plants their own key and walks in past the bastion; with the README's
/// `AuthorizedKeysFile none` the planted key is ignored while a certificate signed
/// by the bastion's CA still logs in.
#[test]
fn a_planted_key_is_refused_by_a_target_set_up_as_the_readme_says() {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("### What a grant lets a user leave behind")
        .nth(1)
        .expect("the README says what a grant lets a user leave behind");
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    for said in [
        "authorized_keys",
        "crontab",
        "systemd user unit",
        "setuid",
        "auth = \"certificate\"",
        "AuthorizedKeysFile /etc/ssh/authorized_keys/%u",
        "only the session's metadata",
    ] {
        assert!(section.contains(said), "the README section lacks {said:?}");
    }
    let hardening = section
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AuthorizedKeysFile none"))
        .expect("the README gives the sshd line");

    let w = World::start();
    let alice_key = w.path(USER);
    let alice_pub = public_key_of(&alice_key);
    let login = login_user();
    // The plant, through the bastion, into the file the target's sshd reads.
    let keys_file = w.sshd.dir().join("authorized_keys");
    let out = w.alice.ssh_stdin(
        &local(),
        &[&format!("cat >> {}", keys_file.display())],
        format!("{alice_pub}\n").into_bytes(),
    );
    assert_success(&out, "planting a key under a shell grant");
    let direct = Client::new(&alice_key, w.sshd.port()).ssh(login, &["echo", "walked-in"]);
    assert_success(&direct, "the planted key bypasses the bastion");
    assert!(text(&direct.stdout).contains("walked-in"));

    let ca = w.dir.path().join("data").join("ca_ed25519");
    let hardened = Sshd::start_with(
        &w.path("hardened"),
        std::slice::from_ref(&alice_pub), // planted, and ignored
        &format!("{hardening}\nTrustedUserCAKeys {}.pub\n", ca.display()),
    );
    let direct = Client::new(&alice_key, hardened.port()).ssh(login, &["true"]);
    assert!(!direct.status.success(), "{}", describe(&direct));

    let signed = w.path("signed");
    fs::copy(&alice_key, &signed).unwrap();
    fs::write(signed.with_extension("pub"), format!("{alice_pub}\n")).unwrap();
    let out = run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca)
        .args(["-I", "portcullis test", "-n", login, "-V", "-1m:+5m"])
        .arg(signed.with_extension("pub")));
    assert_success(&out, "ssh-keygen -s");
    let certified = Client::new(&signed, hardened.port()).ssh(login, &["echo", "certified"]);
    assert_success(
        &certified,
        "a certificate from the bastion's CA still logs in",
    );
}
